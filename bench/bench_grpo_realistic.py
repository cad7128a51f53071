"""The GRPO update at realistic lengths: padded rows against packed rows and grouped rows (prompt once).

A GRPO step's update (old log-probs recomputed without gradients, then one optimiser step: forward and
backward of every micro-batch) on fixed, given responses (teacher-forced rollouts), so every layout
does exactly the same work: prompts of 100-600 tokens (GSM8K- to DAPO-like lengths), n responses per
prompt with lengths drawn from a lognormal clipped to [16, 512] tokens, made synthetically from the tiny
tokenizer's vocabulary; in the unseen and threads variants half of the responses hold a block of two
paths. Each layout runs in a fresh process (so `ru_maxrss`, the peak resident set, is its own); the
figure is response tokens per second of the update, one warm-up update then the mean of the measured.

    python bench/bench_grpo_realistic.py [--variant seen] [--prompts 4] [--n 8] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import time

import torch

ROWS = ("padded", "packed", "grouped")


def make_batch(tokenizer, tags, variant: str, prompts: int, n: int, seed: int):
    from types import SimpleNamespace

    from parallel_r1.batch import collate_rollouts

    rng = random.Random(seed)
    words = [i for i in range(len(tokenizer)) if i not in set(tags.as_tuple()) and i > 3]

    def text(k: int) -> list[int]:
        return [rng.choice(words) for _ in range(k)]

    rollouts, advantages = [], []
    for _ in range(prompts):
        prompt = text(rng.randint(100, 600))
        for _ in range(n):
            length = int(min(512, max(16, rng.lognormvariate(4.6, 0.8))))
            response = text(length)
            if variant != "seen" and rng.random() < 0.5 and length >= 40:
                a, b = rng.randint(4, length // 3), rng.randint(4, length // 3)
                block = [tags.parallel_open, tags.path_open, *text(a), tags.path_close, tags.path_open]
                block += [*text(b), tags.path_close, tags.parallel_close, tags.summary_open, *text(4)]
                response = (response[: length // 4] + block + [tags.summary_close] + response[length // 4 :])[:512]
            # what `collate_rollouts` reads of a `rollout.Rollout`
            given = {"prompt_ids": prompt, "response_ids": response, "sampled_mask": [True] * len(response)}
            rollouts.append(SimpleNamespace(**given, logprobs=[-1.0] * len(response)))
            advantages.append(rng.gauss(0.0, 1.0))
    return collate_rollouts(rollouts, advantages, tokenizer.pad_token_id)


def run_one(rows: str, variant: str, prompts: int, n: int, steps: int, micro: int) -> dict:
    from accelerate import Accelerator

    from parallel_r1.batch import recompute_logprobs
    from parallel_r1.config import GRPOConfig
    from parallel_r1.format import TagIds
    from parallel_r1.grpo import policy_update
    from parallel_r1.models import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer("tiny")
    tags = TagIds.from_tokenizer(tokenizer)
    batch = make_batch(tokenizer, tags, variant, prompts, n, seed=0)
    cfg = GRPOConfig(prompts_per_step=prompts, n=n, mini_batch_size=prompts, micro_batch_size=micro, update_rows=rows)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    accelerator = Accelerator(cpu=True)
    tokens = float(batch.loss_mask_BT.sum())
    rates = []
    for step in range(steps + 1):
        started = time.perf_counter()
        batch.old_logp_BT = recompute_logprobs(model, batch, tags, variant, 1.0, micro, rows=rows)
        policy_update(accelerator, model, optimizer, batch, cfg, tags, variant, 1.0, tokens, float(len(batch.adv_B)))
        if step > 0:
            rates.append(tokens / (time.perf_counter() - started))
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    columns = int(batch.attention_mask_BT.sum())
    return {"rate": sum(rates) / len(rates), "peak_mib": peak_mib, "tokens": tokens, "columns": columns}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="seen", choices=["seen", "unseen", "threads"])
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--steps", type=int, default=1, help="measured updates after one warm-up update")
    parser.add_argument("--micro-batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--one", choices=ROWS, help=argparse.SUPPRESS)  # a child process: one layout
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.one:
        out = run_one(args.one, args.variant, args.prompts, args.n, args.steps, args.micro_batch_size)
        print(json.dumps(out))
        return
    results = {}
    for rows in ROWS:
        child = [sys.executable, __file__, "--one", rows, *sys.argv[1:]]
        results[rows] = json.loads(subprocess.run(child, check=True, capture_output=True, text=True).stdout)
    base = results["padded"]
    print(
        f"GRPO update (old log-probs + one optimiser step), tiny model, {args.variant}, {args.prompts} prompts "
        f"x {args.n} responses, {base['tokens']:.0f} response tokens, {base['columns']} real tokens in padded rows, "
        f"micro-batch {args.micro_batch_size}, {args.threads} thread(s)"
    )
    for rows, r in results.items():
        print(
            f"{rows:8s} {r['rate']:8.0f} tokens/s  ratio {r['rate'] / base['rate']:.2f}x  "
            f"peak {r['peak_mib']:6.0f} MiB  ({r['peak_mib'] / base['peak_mib']:.2f}x)"
        )


if __name__ == "__main__":
    main()
