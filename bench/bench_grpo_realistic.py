"""The GRPO update at realistic lengths: padded rows against packed rows and grouped rows (prompt once).

A GRPO step's update (old log-probs recomputed without gradients, then one optimiser step: forward and
backward of every micro-batch) on fixed, given responses (teacher-forced rollouts), so every layout
does exactly the same work: prompts of 100-600 tokens (GSM8K- to DAPO-like lengths), n responses per
prompt with lengths drawn from a lognormal clipped to [16, 512] tokens, made synthetically from the model's
tokenizer's vocabulary; in the unseen and threads variants half of the responses hold a block of two
paths. Each layout runs in a fresh process (so `ru_maxrss`, the peak resident set, is its own); the
figure is response tokens per second of the update, one warm-up update then the mean of the measured.
Memory is given twice: the process's peak, and the update's own (peak minus the resident set before the
first update, which leaves out what the imports and the model take).

With `--trl` (TRL installed: `pip install trl`), TRL's GRPOTrainer does the same update on the same
tokens in a process of its own: its no-grad log-prob pass for old log-probs
(`_get_per_token_logps_and_entropies`), then `compute_loss` and backward per micro-batch and one
optimiser step, its rows laid out as TRL lays out a generation batch (prompts left-padded and completions
right-padded to the batch's longest, every micro-batch as wide as the batch; TRL scores every row
causally, so for unseen and threads it does the sequential model's work on the same tokens). Its fastest
configuration for this on CPU: `gradient_checkpointing=False` (GRPOConfig turns it on by default, which
recomputes activations in the backward), its fused LM head (log-probs without the full logits, on by
default), fp32, `loss_type="dapo"`, `beta=0`.

    python bench/bench_grpo_realistic.py [--model tiny] [--variant seen] [--prompts 4] [--n 8] [--threads 1] [--trl]
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import time
from functools import partial

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
    return collate_rollouts(rollouts, advantages, tokenizer.pad_token_id), rollouts


def run_one(rows: str, model_name: str, variant: str, prompts: int, n: int, steps: int, micro: int) -> dict:
    from accelerate import Accelerator

    from parallel_r1.batch import recompute_logprobs
    from parallel_r1.config import GRPOConfig
    from parallel_r1.format import TagIds
    from parallel_r1.grpo import policy_update
    from parallel_r1.models import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(model_name)
    tags = TagIds.from_tokenizer(tokenizer)
    batch, _ = make_batch(tokenizer, tags, variant, prompts, n, seed=0)
    cfg = GRPOConfig(prompts_per_step=prompts, n=n, mini_batch_size=prompts, micro_batch_size=micro, update_rows=rows)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    accelerator = Accelerator(cpu=True)
    tokens = float(batch.loss_mask_BT.sum())
    rates, before = [], resident_mib()
    for step in range(steps + 1):
        started = time.perf_counter()
        batch.old_logp_BT = recompute_logprobs(model, batch, tags, variant, 1.0, micro, rows=rows)
        policy_update(accelerator, model, optimizer, batch, cfg, tags, variant, 1.0, tokens, float(len(batch.adv_B)))
        if step > 0:
            rates.append(tokens / (time.perf_counter() - started))
    columns = int(batch.attention_mask_BT.sum())
    return {"rate": sum(rates) / len(rates), **peak(before), "tokens": tokens, "columns": columns}


def resident_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def peak(before: float) -> dict:
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"peak_mib": peak_mib, "update_mib": peak_mib - before}


def run_trl(model_name: str, variant: str, prompts: int, n: int, steps: int, micro: int) -> dict:
    """TRL's GRPOTrainer's update on the tokens `make_batch` gives (see the module docstring)."""
    import tempfile

    import trl
    from datasets import Dataset

    from parallel_r1.format import TagIds
    from parallel_r1.models import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(model_name)
    tags = TagIds.from_tokenizer(tokenizer)
    batch, rollouts = make_batch(tokenizer, tags, variant, prompts, n, seed=0)
    B, pad = len(rollouts), tokenizer.pad_token_id
    P, C = max(len(r.prompt_ids) for r in rollouts), max(len(r.response_ids) for r in rollouts)
    prompt_ids, prompt_mask = torch.full((B, P), pad), torch.zeros(B, P, dtype=torch.long)
    completion_ids, completion_mask = torch.full((B, C), pad), torch.zeros(B, C, dtype=torch.long)
    for b, r in enumerate(rollouts):
        p, c = len(r.prompt_ids), len(r.response_ids)
        prompt_ids[b, P - p :], prompt_mask[b, P - p :] = torch.tensor(r.prompt_ids), 1
        completion_ids[b, :c], completion_mask[b, :c] = torch.tensor(r.response_ids), 1
    input_ids, attention_mask = torch.cat([prompt_ids, completion_ids], 1), torch.cat([prompt_mask, completion_mask], 1)
    tokens = completion_mask.sum()
    with tempfile.TemporaryDirectory() as out:
        config = trl.GRPOConfig(
            output_dir=out, per_device_train_batch_size=micro, gradient_accumulation_steps=B // micro,
            steps_per_generation=B // micro, num_generations=n, max_completion_length=C, learning_rate=1e-6,
            beta=0.0, loss_type="dapo", gradient_checkpointing=False, use_cpu=True, bf16=False, report_to="none",
        )  # fmt: skip
        trainer = trl.GRPOTrainer(
            model=model, reward_funcs=lambda completions, **_: [0.0] * len(completions), args=config,
            train_dataset=Dataset.from_list([{"prompt": "x"}] * B), processing_class=tokenizer,
        )  # fmt: skip
        trainer.current_gradient_accumulation_steps = B // micro
        model = trainer.model
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
        model.train()
        rates, before = [], resident_mib()
        for step in range(steps + 1):
            started = time.perf_counter()
            with torch.no_grad():
                old, _, _ = trainer._get_per_token_logps_and_entropies(model, input_ids, attention_mask, C, micro)
            for start in range(0, B, micro):
                part = slice(start, start + micro)
                inputs = {
                    "prompt_ids": prompt_ids[part], "prompt_mask": prompt_mask[part],
                    "completion_ids": completion_ids[part], "completion_mask": completion_mask[part],
                    "advantages": batch.adv_B[part], "old_per_token_logps": old[part], "num_items_in_batch": tokens,
                }  # fmt: skip
                trainer.compute_loss(model, inputs).backward()
            optimizer.step()
            optimizer.zero_grad()
            if step > 0:
                rates.append(float(tokens) / (time.perf_counter() - started))
    options = "gradient_checkpointing=False, fused LM head, fp32, loss_type=dapo, beta=0"
    return {"rate": sum(rates) / len(rates), **peak(before), "tokens": float(tokens), "trl": trl.__version__,
            "options": options}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="a preset (tiny, smollm2-135m) or a model folder")
    parser.add_argument("--variant", default="seen", choices=["seen", "unseen", "threads"])
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--steps", type=int, default=1, help="measured updates after one warm-up update")
    parser.add_argument("--micro-batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--trl", action="store_true", help="also TRL's GRPOTrainer on the same update")
    parser.add_argument("--one", choices=(*ROWS, "trl"), help=argparse.SUPPRESS)  # a child process: one side
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.one:
        run = run_trl if args.one == "trl" else partial(run_one, args.one)
        print(json.dumps(run(args.model, args.variant, args.prompts, args.n, args.steps, args.micro_batch_size)))
        return
    results = {}
    for side in (*ROWS, "trl") if args.trl else ROWS:
        child = [sys.executable, __file__, *sys.argv[1:], "--one", side]
        results[side] = json.loads(subprocess.run(child, check=True, capture_output=True, text=True).stdout)
    base = results["padded"]
    print(
        f"GRPO update (old log-probs + one optimiser step), {args.model}, {args.variant}, {args.prompts} prompts "
        f"x {args.n} responses, {base['tokens']:.0f} response tokens, {base['columns']} real tokens in padded rows, "
        f"micro-batch {args.micro_batch_size}, {args.threads} thread(s)"
    )
    if args.trl:
        print(f"trl: TRL {results['trl']['trl']} GRPOTrainer, {results['trl']['options']}")
    for side, r in results.items():
        line = (
            f"{side:8s} {r['rate']:8.0f} tokens/s  vs padded {r['rate'] / base['rate']:.2f}x  "
            f"peak {r['peak_mib']:6.0f} MiB ({r['peak_mib'] / base['peak_mib']:.2f}x)  "
            f"update {r['update_mib']:6.0f} MiB"
        )
        if args.trl:
            trl = results["trl"]
            line += (
                f"  | vs TRL {r['rate'] / trl['rate']:.2f}x tokens/s, peak {r['peak_mib'] / trl['peak_mib']:.2f}x, "
                f"update {r['update_mib'] / max(trl['update_mib'], 1.0):.2f}x"
            )
        print(line)


if __name__ == "__main__":
    main()
