"""GRPO with parallel-thinking rewards (SPEC section 5): sample groups, score, normalise, clip, update.

One training step:

1. take the next `prompts_per_step` problems of the shuffled data;
2. sample `n` responses for each with the rollout engine, under the stage's variant (the same mask and
   positions the training forward uses);
3. score them with the reward schedule at this step, and turn rewards into group-normalised advantages;
4. old log-probs: the engine's sampling log-probs when the backend guarantees they equal the training
   forward's (hf), otherwise a no-grad forward;
5. `ppo_epochs` passes of `prompts_per_step / mini_batch_size` optimiser steps, each over one mini-batch
   of groups, accumulating gradients over micro-batches; the loss is the clipped surrogate (and the k3 KL
   when asked) averaged over every trained-on token of the mini-batch (token-level aggregation).

Trained-on tokens are the response tokens the model sampled (`Rollout.sampled_mask`); tags the engine
inserted are context only. Groups whose rewards are all equal carry no signal and are dropped.

The pure functions below carry tensor shapes in their names: B rows, T tokens, P prompts, G group size.
"""

from __future__ import annotations

import logging
import random
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

from parallel_r1.attention import response_logprobs
from parallel_r1.checkpoint import TrainerState, load_checkpoint
from parallel_r1.config import GRPOConfig, StageConfig
from parallel_r1.format import TagIds
from parallel_r1.metrics import JsonlWriter
from parallel_r1.sft import (
    StageTrainer,
    build_optimizer,
    build_scheduler,
    clip_gradients,
    load_stage_model,
    make_progress,
    prompt_template,
)

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------------
# The math, as pure functions.


def group_advantages(rewards_PG: torch.Tensor, scale: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """Advantages [P, G]: reward minus its group's mean, divided by the group's std when `scale`
    (GRPO); `scale=False` is Dr. GRPO's unscaled form. A group of equal rewards gets zeros."""
    centred_PG = rewards_PG - rewards_PG.mean(dim=1, keepdim=True)
    if not scale:
        return centred_PG
    return centred_PG / (rewards_PG.std(dim=1, keepdim=True) + eps)


def informative_groups(rewards_PG: torch.Tensor) -> torch.Tensor:
    """Bool [P]: True where the group's rewards are not all equal (zero-variance groups give no gradient)."""
    return (rewards_PG != rewards_PG[:, :1]).any(dim=1)


def clipped_policy_loss(
    logp_BT: torch.Tensor, old_logp_BT: torch.Tensor, adv_B: torch.Tensor, clip_low: float, clip_high: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-token loss [B, T], clipped [B, T] bool) of the PPO surrogate with separate clip bounds.

    loss = max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high)) with r = exp(logp - old_logp); `clipped`
    marks tokens where the clipped term is the larger one (its gradient is zero there).
    """
    ratio_BT = torch.exp(logp_BT - old_logp_BT)
    adv_B1 = adv_B[:, None]
    unclipped_BT = -adv_B1 * ratio_BT
    clipped_BT = -adv_B1 * ratio_BT.clamp(1.0 - clip_low, 1.0 + clip_high)
    return torch.maximum(unclipped_BT, clipped_BT), clipped_BT > unclipped_BT


def kl_k3(logp_BT: torch.Tensor, ref_logp_BT: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate [B, T] of KL(policy || reference): exp(d) - d - 1 with d = ref - logp (>= 0)."""
    d_BT = ref_logp_BT - logp_BT
    return torch.exp(d_BT) - d_BT - 1.0


def token_mean(values_BT: torch.Tensor, mask_BT: torch.Tensor, num_tokens: float | None = None) -> torch.Tensor:
    """Token-level aggregation: sum of values over masked tokens / num_tokens (default: mask.sum()).
    Passing the whole mini-batch's token count lets micro-batches add up to the mini-batch mean."""
    total = (values_BT * mask_BT).sum()
    denominator = mask_BT.sum() if num_tokens is None else values_BT.new_tensor(float(num_tokens))
    return total / denominator.clamp(min=1.0)


# ---------------------------------------------------------------------------------------------------
# From rollouts to tensors, and the policy update.


@dataclass
class RolloutBatch:
    """Left-padded training tensors for B rollouts of varying length."""

    input_ids_BT: torch.Tensor
    attention_mask_BT: torch.Tensor
    loss_mask_BT: torch.Tensor  # 1.0 on response tokens the model sampled
    old_logp_BT: torch.Tensor  # the engine's sampling log-probs on response tokens, 0 elsewhere
    adv_B: torch.Tensor

    def to(self, device) -> "RolloutBatch":
        return RolloutBatch(*(t.to(device) for t in vars(self).values()))

    def rows(self, index: list[int]) -> "RolloutBatch":
        idx = torch.tensor(index, dtype=torch.long)
        return RolloutBatch(*(t[idx.to(t.device)] for t in vars(self).values()))


def collate_rollouts(rollouts: list, advantages: list[float], pad_id: int) -> RolloutBatch:
    """Stack `prompt_ids + response_ids` of each rollout, left-padded to the longest."""
    width = max(len(r.prompt_ids) + len(r.response_ids) for r in rollouts)
    ids, attn, loss, old = [], [], [], []
    for r in rollouts:
        pad = width - len(r.prompt_ids) - len(r.response_ids)
        head = pad + len(r.prompt_ids)
        ids.append([pad_id] * pad + list(r.prompt_ids) + list(r.response_ids))
        attn.append([0] * pad + [1] * (len(r.prompt_ids) + len(r.response_ids)))
        loss.append([0.0] * head + [1.0 if s else 0.0 for s in r.sampled_mask])
        old.append([0.0] * head + [float(lp) for lp in r.logprobs])
    return RolloutBatch(
        torch.tensor(ids),
        torch.tensor(attn),
        torch.tensor(loss),
        torch.tensor(old, dtype=torch.float32),
        torch.tensor(advantages, dtype=torch.float32),
    )


@torch.no_grad()
def recompute_logprobs(
    model, batch: RolloutBatch, tags: TagIds, variant: str, temperature: float, micro_batch_size: int
) -> torch.Tensor:
    """Log-probs [B, T] of the batch under `model` (no grad), micro-batch by micro-batch."""
    was_training = model.training
    model.eval()
    parts = []
    for start in range(0, batch.input_ids_BT.shape[0], micro_batch_size):
        part = batch.rows(list(range(start, min(start + micro_batch_size, batch.input_ids_BT.shape[0]))))
        logp, _ = response_logprobs(
            model, part.input_ids_BT, part.attention_mask_BT, tags, variant=variant, temperature=temperature
        )
        parts.append(logp * part.loss_mask_BT)
    model.train(was_training)
    return torch.cat(parts)


def policy_update(
    accelerator: Accelerator,
    model,
    optimizer: torch.optim.Optimizer,
    batch: RolloutBatch,
    cfg: GRPOConfig,
    tags: TagIds,
    variant: str,
    max_grad_norm: float,
    num_tokens: float,
    ref_model=None,
) -> dict[str, float]:
    """One optimiser step on `batch` (this process's rows of a mini-batch).

    `num_tokens` is the mini-batch's trained-on token count over all processes: each micro-batch's
    loss is its token sum divided by it, so the accumulated gradient is that of the mini-batch's
    token-level mean. Rows with all-zero loss mask may stand in on a process left without data.
    Returns sums over this process's tokens (loss, clipped, entropy, KL) and the grad norm.
    """
    model.train()
    rows = batch.input_ids_BT.shape[0]
    starts = list(range(0, rows, cfg.micro_batch_size))
    # DDP averages gradients over processes; the token mean wants their sum.
    scale = accelerator.num_processes / max(num_tokens, 1.0)
    sums = {"loss": 0.0, "clipped": 0.0, "entropy": 0.0, "kl": 0.0, "tokens": 0.0}
    for k, start in enumerate(starts):
        mb = batch.rows(list(range(start, min(start + cfg.micro_batch_size, rows))))
        sync = accelerator.no_sync(model) if k < len(starts) - 1 else nullcontext()
        with sync:
            logp_BT, entropy_BT = response_logprobs(
                model,
                mb.input_ids_BT,
                mb.attention_mask_BT,
                tags,
                variant=variant,
                temperature=cfg.rollout.temperature,
                with_entropy=True,
            )
            per_token_BT, clipped_BT = clipped_policy_loss(
                logp_BT, mb.old_logp_BT, mb.adv_B, cfg.clip_low, cfg.clip_high
            )
            if ref_model is not None:
                with torch.no_grad():
                    ref_logp_BT, _ = response_logprobs(
                        ref_model,
                        mb.input_ids_BT,
                        mb.attention_mask_BT,
                        tags,
                        variant=variant,
                        temperature=cfg.rollout.temperature,
                    )
                kl_BT = kl_k3(logp_BT, ref_logp_BT)
                per_token_BT = per_token_BT + cfg.kl_coef * kl_BT
                sums["kl"] += (kl_BT.detach() * mb.loss_mask_BT).sum().item()
            loss_sum = (per_token_BT * mb.loss_mask_BT).sum()
            accelerator.backward(loss_sum * scale)
        mask = mb.loss_mask_BT
        sums["loss"] += loss_sum.item()
        sums["clipped"] += (clipped_BT.float() * mask).sum().item()
        sums["entropy"] += (entropy_BT.detach() * mask).sum().item()
        sums["tokens"] += mask.sum().item()
    sums["grad_norm"] = clip_gradients(accelerator, model, max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return sums


# ---------------------------------------------------------------------------------------------------
# The trainer.


def load_stage_problems(stage: StageConfig, seed: int) -> list:
    """The stage's RL problems (`data.Problem`): the built-in task or `data.load_problems`."""
    from parallel_r1 import data

    cfg = stage.data
    if cfg.source == "task":
        from parallel_r1 import task

        levels = tuple(cfg.task_levels or task.RL_EASY_LEVELS)
        return task.make_problems(cfg.limit or cfg.task_size, levels, "train", seed)
    return data.load_problems(cfg.source, split=cfg.split, limit=cfg.limit)


def path_lengths(rollout) -> list[int]:
    """Token lengths of every path of a rollout (from the engine's parsed structure)."""
    return [
        p.token_span.end - p.token_span.start
        for b in rollout.structure.blocks
        for p in b.paths
        if p.token_span is not None
    ]


class GRPOTrainer(StageTrainer):
    """Runs one GRPO stage into `output_dir`, resuming from its latest checkpoint if there is one."""

    kind = "grpo"

    def __init__(self, stage: StageConfig, output_dir: str | Path, **kwargs):
        from parallel_r1.engine import ParallelEngine
        from parallel_r1.rewards import RewardSchedule

        super().__init__(stage, output_dir, **kwargs)
        self.cfg, acc, seed = stage.grpo, self.accelerator, self.seed
        self.total_steps = stage.max_steps
        self.ref_model = None
        self._vllm_stale = False
        if self.cfg.kl_coef > 0:
            # The reference is the stage's starting model, also when resuming from a checkpoint.
            ref, _ = load_stage_model(stage, self.init_model, seed)
            self.ref_model = ref.to(acc.device).eval().requires_grad_(False)

        self.problems = load_stage_problems(stage, seed)
        if not self.problems:
            raise ValueError(f"stage {stage.name!r}: data source {stage.data.source!r} gave no problems")
        template = prompt_template(stage.data.prompt)
        from parallel_r1.data import build_prompt

        self.prompts = [build_prompt(p.question, template) for p in self.problems]
        r = self.cfg.reward
        self.schedule = RewardSchedule(
            r.kind, window=r.window, parallel_steps=r.parallel_steps, switch_step=r.switch_step
        )
        mode = self.cfg.old_logprobs
        self.use_engine_logprobs = mode == "engine" or (mode == "auto" and self.cfg.rollout.backend == "hf")

        self.optimizer = build_optimizer(self.model, stage)
        self.scheduler = build_scheduler(self.optimizer, stage, self.total_steps)
        self.model, self.optimizer = acc.prepare(self.model, self.optimizer)
        if self.cfg.rollout.backend == "vllm":
            self.engine = self._vllm_engine(self.resume_from or self.init_model)
        else:
            self.engine = ParallelEngine(
                acc.unwrap_model(self.model), self.tokenizer, max_batch_size=self.cfg.rollout.max_batch_size
            )
        self.state = TrainerState(data_seed=seed)
        if self.resume_from is not None:
            self.state = load_checkpoint(
                self.resume_from, accelerator=acc, optimizer=self.optimizer, scheduler=self.scheduler
            )
            log.info("resuming %s from %s (step %d)", stage.name, self.resume_from.name, self.state.step)

    def _vllm_engine(self, source: str | Path):
        """A vLLM engine on this process's GPU, next to the trained model; `push_weights` keeps it current."""
        import os

        from parallel_r1.models import PRESETS, save_model
        from parallel_r1.vllm_backend import VLLMEngine

        acc = self.accelerator
        if str(source) in PRESETS:
            source = save_model(acc.unwrap_model(self.model), self.tokenizer, self.output_dir / "rollout_init")
        # In-process engine: its model object is reachable, so weights can be loaded into it each step.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        extra = {"distributed_executor_backend": "external_launcher"} if acc.num_processes > 1 else {}
        engine = VLLMEngine(
            str(source),
            self.tokenizer,
            gpu_memory_utilization=self.cfg.rollout.vllm_gpu_memory_utilization,
            dtype=self.stage.model.dtype,
            **extra,
        )
        return engine

    def push_weights(self) -> None:
        """Copy the trained weights into the vLLM engine (colocated, in-process vLLM)."""
        llm = self.engine.llm
        worker_model = llm.llm_engine.model_executor.driver_worker.worker.model_runner.model
        worker_model.load_weights(self.accelerator.get_state_dict(self.model).items())
        llm.reset_prefix_cache()

    # Data order: epoch e visits the problems in a permutation drawn from (data_seed, e).
    def _order(self, epoch: int) -> list[int]:
        order = list(range(len(self.problems)))
        random.Random(f"grpo-order-{self.state.data_seed}-{epoch}").shuffle(order)
        return order

    def _next_prompts(self) -> list[int]:
        chosen: list[int] = []
        while len(chosen) < self.cfg.prompts_per_step:
            order = self._order(self.state.epoch)
            take = order[self.state.index : self.state.index + self.cfg.prompts_per_step - len(chosen)]
            chosen += take
            self.state.index += len(take)
            if self.state.index >= len(order):
                self.state.epoch, self.state.index = self.state.epoch + 1, 0
        return chosen

    def sampling_params(self, step: int):
        from parallel_r1.engine import SamplingParams

        r, acc = self.cfg.rollout, self.accelerator
        return SamplingParams(
            temperature=r.temperature,
            top_p=r.top_p,
            top_k=r.top_k,
            # A seed per (step, process): a resumed run samples exactly what the first one would have.
            seed=(self.seed * 1_000_003 + step) * acc.num_processes + acc.process_index,
            max_response_tokens=r.max_response_tokens,
            max_path_tokens=r.max_path_tokens,
            max_blocks=r.max_blocks,
            num_paths=r.num_paths,
            variant=self.stage.variant,
        )

    def train_step(self, step: int, problem_indices: list[int]) -> tuple[dict, list[dict]]:
        """Run training step `step` (0-based) on the given problems; return (metrics, rollout records)."""
        from parallel_r1.rewards import score_batch

        acc, cfg = self.accelerator, self.cfg
        started = time.perf_counter()
        # Each process samples and scores whole groups: prompts i, i + P, ... of the step.
        mine = problem_indices[acc.process_index :: acc.num_processes]
        if cfg.rollout.backend == "vllm" and self._vllm_stale:
            self.push_weights()
        local_slots = list(range(acc.process_index, len(problem_indices), acc.num_processes))
        rollouts = self.engine.generate([self.prompts[i] for i in mine], n=cfg.n, params=self.sampling_params(step))
        sample_s = time.perf_counter() - started
        golds = [self.problems[mine[r.prompt_index]].answer for r in rollouts]
        reward = cfg.reward
        scores = score_batch(
            [x.text for x in rollouts], golds, step, self.schedule,
            correct_value=reward.correct_value, wrong_value=reward.wrong_value,
            parallel_value=reward.parallel_value, timeout_s=reward.verify_timeout_s,
        )  # fmt: skip
        rewards_PG = torch.tensor([s.reward for s in scores], dtype=torch.float32).view(len(mine), cfg.n)
        adv_PG = group_advantages(rewards_PG, scale=cfg.advantage == "grpo")
        keep_P = informative_groups(rewards_PG) if cfg.filter_zero_variance else torch.ones(len(mine), dtype=torch.bool)

        batch = collate_rollouts(rollouts, adv_PG.flatten().tolist(), self.tokenizer.pad_token_id)
        if not self.use_engine_logprobs:
            batch.old_logp_BT = recompute_logprobs(
                acc.unwrap_model(self.model),
                batch.to(acc.device),
                self.tags,
                self.stage.variant,
                cfg.rollout.temperature,
                cfg.micro_batch_size,
            ).cpu()
        # Dropped groups still serve as stand-in rows (loss mask zeroed) for a process left without data.
        drop_rows = (~keep_P).repeat_interleave(cfg.n)
        batch.loss_mask_BT[drop_rows] = 0.0

        sums: dict[str, float] = {}
        updates = 0
        num_mini = cfg.prompts_per_step // cfg.mini_batch_size
        for _ in range(cfg.ppo_epochs):
            for m in range(num_mini):
                lo, hi = m * cfg.mini_batch_size, (m + 1) * cfg.mini_batch_size
                groups = [g for g, slot in enumerate(local_slots) if lo <= slot < hi]
                rows = [g * cfg.n + j for g in groups if keep_P[g] for j in range(cfg.n)]
                local_tokens = batch.loss_mask_BT[rows].sum().item() if rows else 0.0
                num_tokens = acc.reduce(torch.tensor(local_tokens, device=acc.device), "sum").item()
                if num_tokens == 0:
                    continue
                if not rows:
                    rows = [groups[0] * cfg.n] if groups else [0]
                out = policy_update(
                    acc,
                    self.model,
                    self.optimizer,
                    batch.rows(rows).to(acc.device),
                    cfg,
                    self.tags,
                    self.stage.variant,
                    self.stage.max_grad_norm,
                    num_tokens,
                    self.ref_model,
                )
                updates += 1
                self._vllm_stale = True
                for key, value in out.items():
                    sums[key] = sums.get(key, 0.0) + value
        with warnings.catch_warnings():
            # Steps whose groups were all dropped make no optimiser step, yet the schedule still advances.
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
            self.scheduler.step()
        elapsed = time.perf_counter() - started

        records = [
            {
                "step": step + 1,
                "problem_index": mine[r.prompt_index],
                "problem_id": self.problems[mine[r.prompt_index]].id,
                "sample_index": r.sample_index,
                "gold": golds[k],
                "response": r.text,
                "reward": s.reward,
                "accuracy": s.accuracy,
                "parallel_bonus": s.parallel_bonus,
                "correct": s.correct,
                "answer": s.answer,
                "well_formed": s.well_formed,
                "num_blocks": s.num_blocks,
                "paths_per_block": r.structure.paths_per_block,
                "response_tokens": len(r.response_ids),
                "path_tokens": path_lengths(r),
                "finish_reason": r.finish_reason,
                "advantage": adv_PG.flatten()[k].item(),
            }
            for k, (r, s) in enumerate(zip(rollouts, scores))
        ]
        records = gather_object(records) if acc.num_processes > 1 else records
        totals = torch.tensor(
            [sums.get(k, 0.0) for k in ("loss", "clipped", "entropy", "kl", "tokens")]
            + [float(keep_P.sum()), float(sum(len(r.response_ids) for r in rollouts))],
            device=acc.device,
        )
        loss, clipped, entropy, kl, tokens, kept, generated = acc.reduce(totals, "sum").tolist()
        paths = [n for rec in records for n in rec["path_tokens"]]
        mean = lambda key: sum(float(rec[key]) for rec in records) / len(records)  # noqa: E731
        metrics = {
            "reward": mean("reward"),
            "reward_accuracy": mean("accuracy"),
            "reward_parallel_bonus": mean("parallel_bonus"),
            "accuracy": mean("correct"),
            "parallel_ratio": sum(rec["num_blocks"] > 0 for rec in records) / len(records),
            "well_formed": mean("well_formed"),
            "blocks_per_response": mean("num_blocks"),
            "response_length": mean("response_tokens"),
            "path_length": sum(paths) / len(paths) if paths else 0.0,
            "truncated": sum(rec["finish_reason"] == "length" for rec in records) / len(records),
            "parallel_active": float(self.schedule.parallel_active(step)),
            "groups_kept": kept,
            "optimizer_steps": updates,
            "loss": loss / max(tokens, 1.0),
            "entropy": entropy / max(tokens, 1.0),
            "clip_fraction": clipped / max(tokens, 1.0),
            "grad_norm": sums.get("grad_norm", 0.0) / max(updates, 1),
            "lr": self.scheduler.get_last_lr()[0],
            "trained_tokens": tokens,
            "tokens_per_s": generated / elapsed,
            "sample_s": sample_s,
            "step_s": elapsed,
            "epoch": self.state.epoch,
            "data_indices": problem_indices,
        }
        if self.ref_model is not None:
            metrics["kl"] = kl / max(tokens, 1.0)
        return metrics, records

    def train(self) -> Path:
        """Train to `max_steps`, checkpointing on the way; returns the final model folder."""
        acc, stage, lc = self.accelerator, self.stage, self.logging_config
        main = acc.is_main_process
        metrics = self.open_metrics()
        rollout_log = JsonlWriter(self.output_dir / "rollouts.jsonl", self.state.step, enabled=main)
        progress, task = make_progress(self.total_steps, self.state.step, f"grpo {stage.name}", main and lc.progress)
        last_saved = self.state.step if self.resume_from is not None else -1
        with progress:
            while self.state.step < self.total_steps:
                indices = self._next_prompts()
                record, rollouts = self.train_step(self.state.step, indices)
                self.state.step += 1
                step = self.state.step
                metrics.log(step, record)
                for rollout in rollouts:
                    rollout_log.write(rollout)
                info = f"reward {record['reward']:.2f} acc {record['accuracy']:.2f} par {record['parallel_ratio']:.2f}"
                progress.update(task, completed=step, info=info)
                if step % stage.log_every == 0 and not lc.progress:
                    log.info("grpo %s step %d/%d %s", stage.name, step, self.total_steps, info)
                if stage.save_every and step % stage.save_every == 0:
                    self.save()
                    last_saved = step
        final = self.finish(last_saved)
        metrics.close()
        rollout_log.close()
        return final
