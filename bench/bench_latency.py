"""Latency to the answer: does a parallel-thinking model answer sooner than a sequential one?

For a parallel model (its blocks decoded by the HF engine, paths side by side) and a sequential model,
on the same held-out problems of the built-in task, at batch 1 (one problem at a time) and at batch B
(default 64, all problems' samples decoded together), per problem:

* wall-clock seconds until the sample finished (EOS or the length cap; `ParallelEngine.last_finish_seconds`,
  counted from the start of its `generate` call);
* its response length in tokens, and its longest-path length (the critical path: the main thread plus,
  per block, its longest path -- the decode steps the sample needed);
* accuracy (`answers.is_correct`), so that a faster but worse model shows as such.

A model argument is a model folder or a finished stage folder (its DONE file names the checkpoint), e.g.
the study's SFT stages:

    python bench/bench_latency.py \\
        --parallel runs/study/sft/unseen-parallel-8e7d6fab/00-sft \\
        --sequential runs/study/sft/seen-sequential-bf5377e4/00-sft

Without them it falls back to two UNTRAINED tiny models (the parallel one gets an inserted first
`<Parallel>`), which times the machinery only and says nothing about trained models.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from parallel_r1 import tasks
from parallel_r1.answers import is_correct
from parallel_r1.engine import ParallelEngine
from parallel_r1.models import load_model_and_tokenizer
from parallel_r1.prompts import build_prompt, prompt_template
from parallel_r1.rollout import Rollout, SamplingParams


def model_folder(path: str) -> str:
    folder = Path(path)
    done = folder / "DONE"
    return str(folder / done.read_text().strip()) if done.is_file() else path


def critical_path(rollout: Rollout) -> int:
    """Response tokens minus, per block, all but its longest path: the sample's decode steps."""
    saved = 0
    for block in rollout.structure.blocks:
        lengths = [p.token_span.end - p.token_span.start for p in block.paths if p.token_span is not None]
        if lengths:
            saved += sum(lengths) - max(lengths)
    return len(rollout.response_ids) - saved


def run(engine: ParallelEngine, prompts: list[str], golds: list[str], params: SamplingParams, batch: int):
    """(seconds to finish, response tokens, critical path, correct, blocks) per problem, `batch` problems at a time."""
    engine.generate(prompts[:1], params=SamplingParams(**{**params.__dict__, "max_response_tokens": 4}))  # warm-up
    rows = []
    for start in range(0, len(prompts), batch):
        chunk = list(range(start, min(start + batch, len(prompts))))
        rollouts = engine.generate([prompts[i] for i in chunk], params=params, keys=chunk)
        for i, r, seconds in zip(chunk, rollouts, engine.last_finish_seconds):
            correct = is_correct(r.text, golds[i])
            rows.append((seconds, len(r.response_ids), critical_path(r), correct, r.structure.num_blocks))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parallel", help="the parallel model (folder or finished stage folder)")
    parser.add_argument("--sequential", help="the sequential model (folder or finished stage folder)")
    parser.add_argument("--variant", default="unseen", help="the parallel model's variant (unseen, threads, seen)")
    parser.add_argument("--task", default="search")
    parser.add_argument("--levels", type=int, nargs="+", default=[2, 3, 4])
    parser.add_argument("--problems", type=int, default=64, help="held-out problems")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--template", default="question", help="prompt template name")
    parser.add_argument("--max-response-tokens", type=int, default=200)
    parser.add_argument("--max-path-tokens", type=int, default=40)
    parser.add_argument("--num-paths", type=int, default=2)
    parser.add_argument("--max-blocks", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    trained = bool(args.parallel and args.sequential)
    if not trained:
        print("NO MODELS GIVEN: two UNTRAINED tiny models, the parallel one with an inserted <Parallel>.")
        print("These numbers time the engine only; they say nothing about trained models.\n")
    problems = tasks.make_eval_problems(args.problems, args.levels, seed=args.seed, task=args.task)
    template = prompt_template(args.template)
    prompts = [build_prompt(p.question, template) for p in problems]
    golds = [p.answer for p in problems]
    common = dict(
        seed=args.seed, max_response_tokens=args.max_response_tokens, max_path_tokens=args.max_path_tokens,
        num_paths=args.num_paths, max_blocks=args.max_blocks,
    )  # fmt: skip
    arms = {
        "parallel": (args.parallel if trained else "tiny", SamplingParams(variant=args.variant, **common)),
        "sequential": (args.sequential if trained else "tiny", SamplingParams(variant="seen", **common)),
    }
    if not trained:
        arms["parallel"] = ("tiny", SamplingParams(variant=args.variant, open_block=True, **common))
    print(f"{len(problems)} {args.task} problems (levels {args.levels}), {args.threads} threads")
    header = (
        f"{'model':<11} {'batch':>5} {'wall s':>7} {'s/answer mean':>14} {'median':>7} "
        f"{'tokens':>7} {'longest path':>13} {'accuracy':>9} {'blocks/resp':>11}"
    )
    print(header)
    for name, (path, params) in arms.items():
        model, tokenizer = load_model_and_tokenizer(model_folder(path))
        engine = ParallelEngine(model.eval(), tokenizer, max_batch_size=max(args.batches))
        for batch in args.batches:
            started = time.perf_counter()
            rows = run(engine, prompts, golds, params, batch)
            wall = time.perf_counter() - started
            seconds = [r[0] for r in rows]
            print(
                f"{name:<11} {batch:>5} {wall:>7.1f} {statistics.mean(seconds):>14.3f} "
                f"{statistics.median(seconds):>7.3f} {statistics.mean(r[1] for r in rows):>7.1f} "
                f"{statistics.mean(r[2] for r in rows):>13.1f} {statistics.mean(r[3] for r in rows):>9.2f} "
                f"{statistics.mean(r[4] for r in rows):>11.2f}"
            )
    print("\ns/answer: seconds from the start of a batch until that problem's sample finished (batch 1: per call)")


if __name__ == "__main__":
    main()
