"""Tokens per second of one GRPO step on the tiny model: parallel-r1 against TRL's GRPOTrainer.

Both sides start from the same freshly initialised tiny Llama (models preset "tiny", 3.4 M parameters),
train on the same built-in task prompts, sample 8 prompts x 8 responses of up to 128 tokens per step
and make 2 optimiser steps of 4 prompts each (no KL, clip 0.2/0.28, token-level loss). TRL uses its own
generation (plain sequential decoding) in its fastest CPU configuration (no gradient checkpointing,
which its GRPOConfig turns on by default; its fused LM head); parallel-r1 uses its rollout engine in the
Seen and the Unseen variant. A step's throughput is generated response tokens / wall time of the whole step (sampling,
scoring, old log-probs, updates). One warm-up step, then the mean over the measured steps.

TRL is a reference point only, not a dependency: `pip install trl`. Run:

    python bench/bench_grpo.py [--steps 2] [--threads 2]
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import torch

PROMPTS, N, MAX_TOKENS, MINI = 8, 8, 128, 4

RECIPE = f"""
name: bench
logging: {{progress: false}}
stages:
  - name: rl
    kind: grpo
    variant: VARIANT
    model: {{name_or_path: tiny}}
    data: {{source: task, task_size: 256, prompt: question}}
    lr: 1.0e-4
    max_steps: 100
    grpo:
      prompts_per_step: {PROMPTS}
      n: {N}
      mini_batch_size: {MINI}
      micro_batch_size: 32
      filter_zero_variance: false
      rollout: {{max_response_tokens: {MAX_TOKENS}, max_path_tokens: 64}}
      reward: {{kind: accuracy}}
"""


def bench_parallel_r1(variant: str, steps: int, workdir: Path) -> float:
    from parallel_r1.config import parse_recipe
    from parallel_r1.grpo import GRPOTrainer

    stage = parse_recipe(RECIPE.replace("VARIANT", variant)).stages[0]
    trainer = GRPOTrainer(stage, workdir / f"ours-{variant}", init_model="tiny", seed=0)
    rates = []
    for step in range(steps + 1):
        started = time.perf_counter()
        _, records = trainer.train_step(step, trainer._next_prompts(trainer.cfg.prompts_per_step))
        elapsed = time.perf_counter() - started
        if step > 0:
            rates.append(sum(r["response_tokens"] for r in records) / elapsed)
    return sum(rates) / len(rates)


def bench_trl(steps: int, workdir: Path) -> tuple[float, str]:
    import trl
    from datasets import Dataset
    from transformers import PrinterCallback, TrainerCallback

    from parallel_r1 import tasks
    from parallel_r1.models import load_model_and_tokenizer
    from parallel_r1.prompts import QUESTION_TEMPLATE, build_prompt
    from parallel_r1.rewards import RewardSchedule, score_batch

    model, tokenizer = load_model_and_tokenizer("tiny")
    problems = tasks.make_problems(256, tasks.arith.RL_EASY_LEVELS, "train", 0)
    dataset = Dataset.from_list(
        [{"prompt": build_prompt(p.question, QUESTION_TEMPLATE), "answer": p.answer} for p in problems]
    )
    schedule = RewardSchedule("accuracy")
    generated: list[int] = []

    def accuracy(prompts, completions, answer, completion_ids, **_):
        generated.append(sum(len(ids) for ids in completion_ids))
        return [s.reward for s in score_batch(completions, answer, 0, schedule)]

    marks: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            marks.append(time.perf_counter())

    optimiser_steps = PROMPTS // MINI
    config = trl.GRPOConfig(
        output_dir=str(workdir / "trl"),
        per_device_train_batch_size=MINI * N,
        steps_per_generation=optimiser_steps,
        num_generations=N,
        max_completion_length=MAX_TOKENS,
        learning_rate=1e-4,
        beta=0.0,
        epsilon=0.2,
        epsilon_high=0.28,
        loss_type="dapo",
        temperature=1.0,
        max_steps=(steps + 1) * optimiser_steps,
        use_cpu=True,
        gradient_checkpointing=False,  # GRPOConfig's default is True: recomputing activations is slower
        bf16=False,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
    )
    trainer = trl.GRPOTrainer(
        model=model,
        reward_funcs=accuracy,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[Clock()],
    )
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    # marks[k] ends optimiser step k; a GRPO step (one generation) spans `optimiser_steps` of them.
    step_ends = marks[optimiser_steps - 1 :: optimiser_steps]
    rates = [generated[i] / (step_ends[i] - step_ends[i - 1]) for i in range(1, len(step_ends))]
    return sum(rates) / len(rates), trl.__version__


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2, help="measured steps after one warm-up step")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        trl_rate, trl_version = bench_trl(args.steps, workdir)
        seen = bench_parallel_r1("seen", args.steps, workdir)
        unseen = bench_parallel_r1("unseen", args.steps, workdir)
    print(f"GRPO step, tiny model, {PROMPTS} prompts x {N} samples x <= {MAX_TOKENS} tokens, {args.threads} threads")
    print(f"TRL {trl_version} GRPOTrainer (sequential):  {trl_rate:8.0f} tokens/s  (reference)")
    print(f"parallel-r1 GRPO, seen:             {seen:8.0f} tokens/s  ratio {seen / trl_rate:.2f}x")
    print(f"parallel-r1 GRPO, unseen:           {unseen:8.0f} tokens/s  ratio {unseen / trl_rate:.2f}x")


if __name__ == "__main__":
    main()
