"""GRPO with parallel-thinking rewards (docs/training.md): sample groups, score, normalise, clip, update.

One training step:

1. take the next `prompts_per_step` problems of the shuffled data;
2. sample `n` responses for each with the rollout engine, under the stage's variant (the same mask and
   positions the training forward uses);
3. score them with the reward schedule at this step, and turn rewards into group-normalised advantages;
4. old log-probs: the engine's sampling log-probs when the backend guarantees they equal the training
   forward's (hf), otherwise a no-grad forward; the gap between the two is logged every step (`mismatch_*`),
   and truncated importance sampling (`tis_cap`) can weight each token by min(exp(old - sampler), C).
   With `behaviour_logprobs` every log-prob, the engine's and the trainer's, is of the distribution the
   engine sampled from (bans, top-k/top-p, renormalised: `bans.Behaviour`); the mass those remove
   is logged as `ban_mass_*`;
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

from parallel_r1 import data, tasks
from parallel_r1.attention import response_logprobs
from parallel_r1.backends import make_engine
from parallel_r1.bans import Behaviour, ban_rows, ban_table
from parallel_r1.config import GRPOConfig, StageConfig
from parallel_r1.format import TagIds
from parallel_r1.models import PRESETS, save_model
from parallel_r1.prompts import stage_prompt_format
from parallel_r1.rewards import score_batch
from parallel_r1.rollout import Rollout, rollout_record, sampling_params
from parallel_r1.trainer import StageTrainer, clip_gradients, load_stage_model

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


def tis_weights(old_logp_BT: torch.Tensor, sampler_logp_BT: torch.Tensor, cap: float) -> torch.Tensor:
    """Truncated importance weights [B, T]: min(exp(old_logp - sampler_logp), cap) (verl's TIS).

    The rollouts came from the sampler's distribution, while the surrogate is an expectation under the
    trainer's: weighting each token by the ratio of the two corrects the gradient, and the cap bounds the
    variance that rare tokens with a large ratio would add."""
    return torch.exp(old_logp_BT - sampler_logp_BT).clamp(max=cap)


def logprob_gap(logp_BT: torch.Tensor, sampler_logp_BT: torch.Tensor, mask_BT: torch.Tensor, threshold: float) -> dict:
    """Sums over masked tokens of |logp - sampler_logp|: {gap_sum, gap_max, gap_over (count above
    `threshold`), gap_tokens}, as floats to add up over micro-batches and processes."""
    gap_BT = (logp_BT.detach() - sampler_logp_BT).abs() * mask_BT
    return {
        "gap_sum": gap_BT.sum().item(),
        "gap_max": gap_BT.max().item() if gap_BT.numel() else 0.0,
        "gap_over": ((gap_BT > threshold) & (mask_BT > 0)).sum().item(),
        "gap_tokens": mask_BT.sum().item(),
    }


def token_mean(values_BT: torch.Tensor, mask_BT: torch.Tensor, num_tokens: float | None = None) -> torch.Tensor:
    """Token-level aggregation: sum of values over masked tokens / num_tokens (default: mask.sum()).
    Passing the whole mini-batch's token count lets micro-batches add up to the mini-batch mean."""
    total = (values_BT * mask_BT).sum()
    if num_tokens is None:
        return total / mask_BT.sum().clamp(min=1.0)
    return total * (1.0 / max(float(num_tokens), 1.0))


# ---------------------------------------------------------------------------------------------------
# From rollouts to tensors, and the policy update.


@dataclass
class RolloutBatch:
    """Left-padded training tensors for B rollouts of varying length."""

    input_ids_BT: torch.Tensor
    attention_mask_BT: torch.Tensor
    loss_mask_BT: torch.Tensor  # 1.0 on response tokens the model sampled
    old_logp_BT: torch.Tensor  # the policy's log-probs before the update: the engine's, or recomputed
    adv_B: torch.Tensor
    sampler_logp_BT: torch.Tensor  # the engine's sampling log-probs on response tokens, 0 elsewhere
    weight_BT: torch.Tensor  # per-token weight of the surrogate (1, or the TIS weight)
    ban_rows_BT: torch.Tensor  # long: the engine's ban-table row each token was sampled under (0 elsewhere)

    def to(self, device) -> RolloutBatch:
        return RolloutBatch(*(t.to(device) for t in vars(self).values()))

    def rows(self, index: list[int]) -> RolloutBatch:
        idx = torch.tensor(index, dtype=torch.long)
        return RolloutBatch(*(t[idx.to(t.device)] for t in vars(self).values()))

    def micro_batch(self, index: list[int]) -> RolloutBatch:
        """The given rows without the columns that are padding in all of them (rows are left-padded), so
        a micro-batch of short rows is not computed at the width of the step's longest."""
        part = self.rows(index)
        first = int(part.attention_mask_BT.any(0).nonzero()[0]) if part.attention_mask_BT.any() else 0
        return RolloutBatch(*(t[:, first:] if t.dim() == 2 else t for t in vars(part).values()))

    def by_length(self) -> list[int]:
        """Row indices, longest first: micro-batches of neighbours in this order carry little padding."""
        lengths = self.attention_mask_BT.sum(1).tolist()
        return sorted(range(len(lengths)), key=lambda i: -lengths[i])

    def behaviour(self, table: torch.Tensor | None, top_k: int, top_p: float) -> Behaviour | None:
        """What the engine sampled these tokens from, given its ban `table` (None: score the unwarped
        softmax)."""
        return None if table is None else Behaviour(self.ban_rows_BT, table, top_k, top_p)


def collate_rollouts(
    rollouts: list, advantages: list[float], pad_id: int, response_ban_rows: list[list[int]] | None = None
) -> RolloutBatch:
    """Stack `prompt_ids + response_ids` of each rollout, left-padded to the longest; `response_ban_rows`
    (`bans.ban_rows` of each rollout's response) fill `ban_rows_BT`, zeros without them."""
    width = max(len(r.prompt_ids) + len(r.response_ids) for r in rollouts)
    ids, attn, loss, old, rows = [], [], [], [], []
    for k, r in enumerate(rollouts):
        pad = width - len(r.prompt_ids) - len(r.response_ids)
        head = pad + len(r.prompt_ids)
        ids.append([pad_id] * pad + list(r.prompt_ids) + list(r.response_ids))
        attn.append([0] * pad + [1] * (len(r.prompt_ids) + len(r.response_ids)))
        loss.append([0.0] * head + [1.0 if s else 0.0 for s in r.sampled_mask])
        old.append([0.0] * head + [float(lp) for lp in r.logprobs])
        rows.append([0] * head + (response_ban_rows[k] if response_ban_rows else [0] * len(r.response_ids)))
    sampler = torch.tensor(old, dtype=torch.float32)
    loss_mask = torch.tensor(loss)
    return RolloutBatch(
        torch.tensor(ids),
        torch.tensor(attn),
        loss_mask,
        sampler.clone(),
        torch.tensor(advantages, dtype=torch.float32),
        sampler,
        torch.ones_like(loss_mask),
        torch.tensor(rows, dtype=torch.long),
    )


@torch.no_grad()
def recompute_logprobs(
    model,
    batch: RolloutBatch,
    tags: TagIds,
    variant: str,
    temperature: float,
    micro_batch_size: int,
    ban_table: torch.Tensor | None = None,
    top_k: int = 0,
    top_p: float = 1.0,
) -> torch.Tensor:
    """Log-probs [B, T] of the batch under `model` (no grad), micro-batch by micro-batch; with the engine's
    `ban_table`, of the distribution it sampled from (`RolloutBatch.behaviour`)."""
    was_training = model.training
    model.eval()
    B, T = batch.input_ids_BT.shape
    out_BT = torch.zeros(B, T, device=batch.input_ids_BT.device)
    order = batch.by_length()
    for start in range(0, B, micro_batch_size):
        index = order[start : start + micro_batch_size]
        part = batch.micro_batch(index)
        logp, _ = response_logprobs(
            model,
            part.input_ids_BT,
            part.attention_mask_BT,
            tags,
            variant=variant,
            temperature=temperature,
            behaviour=part.behaviour(ban_table, top_k, top_p),
        )
        # where, not a product: under behaviour log-probs an untrained token may be -inf (see policy_update)
        logp = torch.where(part.loss_mask_BT > 0, logp, 0.0)
        out_BT[torch.tensor(index, device=out_BT.device), T - logp.shape[1] :] = logp
    model.train(was_training)
    return out_BT


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
    measure_gap: bool = False,
    ban_table: torch.Tensor | None = None,
) -> dict[str, float]:
    """One optimiser step on `batch` (this process's rows of a mini-batch).

    `num_tokens` is the mini-batch's trained-on token count over all processes: each micro-batch's
    loss is its token sum divided by it, so the accumulated gradient is that of the mini-batch's
    token-level mean. Rows with all-zero loss mask may stand in on a process left without data.
    Returns sums over this process's tokens (loss, clipped, entropy, KL) and the grad norm; with
    `measure_gap` (the policy has not moved since sampling) also `logprob_gap` of the forward's log-probs
    against the sampler's. With the engine's `ban_table` the policy and the reference are scored on the
    distribution the engine sampled from (`RolloutBatch.behaviour`), entropy included.
    """
    model.train()
    order = batch.by_length()
    starts = list(range(0, len(order), cfg.micro_batch_size))
    sums = {
        "loss": 0.0,
        "clipped": 0.0,
        "entropy": 0.0,
        "kl": 0.0,
        "tokens": 0.0,
        "tis_weight": 0.0,
        "tis_truncated": 0.0,
    }
    for k, start in enumerate(starts):
        mb = batch.micro_batch(order[start : start + cfg.micro_batch_size])
        sync = accelerator.no_sync(model) if k < len(starts) - 1 else nullcontext()
        with sync:
            # The policy and the reference score the same tokens the same way.
            inputs = (mb.input_ids_BT, mb.attention_mask_BT, tags)
            scoring = {
                "variant": variant,
                "temperature": cfg.rollout.temperature,
                "behaviour": mb.behaviour(ban_table, cfg.rollout.top_k, cfg.rollout.top_p),
            }
            logp_BT, entropy_BT = response_logprobs(model, *inputs, **scoring, with_entropy=True)
            # Under behaviour log-probs an untrained token (prompt, engine-inserted tag) may be one the
            # sampler could not have drawn, at -inf: zeroed here so no nan (-inf * 0, -inf - -inf) reaches
            # the loss; the masked fill passes no gradient to it.
            untrained_BT = mb.loss_mask_BT == 0
            logp_BT = logp_BT.masked_fill(untrained_BT, 0.0)
            per_token_BT, clipped_BT = clipped_policy_loss(
                logp_BT, mb.old_logp_BT, mb.adv_B, cfg.clip_low, cfg.clip_high
            )
            per_token_BT = per_token_BT * mb.weight_BT
            if ref_model is not None:
                with torch.no_grad():
                    ref_logp_BT, _ = response_logprobs(ref_model, *inputs, **scoring)
                ref_logp_BT = ref_logp_BT.masked_fill(untrained_BT, 0.0)
                kl_BT = kl_k3(logp_BT, ref_logp_BT)
                per_token_BT = per_token_BT + cfg.kl_coef * kl_BT
                sums["kl"] += (kl_BT.detach() * mb.loss_mask_BT).sum().item()
            loss = token_mean(per_token_BT, mb.loss_mask_BT, num_tokens)
            # DDP averages gradients over processes; the token mean wants their sum.
            accelerator.backward(loss * accelerator.num_processes)
        mask = mb.loss_mask_BT
        if measure_gap:
            add_gap(sums, logprob_gap(logp_BT, mb.sampler_logp_BT, mask, cfg.mismatch_threshold))
        sums["loss"] += (per_token_BT.detach() * mask).sum().item()
        sums["clipped"] += (clipped_BT.float() * mask).sum().item()
        sums["entropy"] += (entropy_BT.detach() * mask).sum().item()
        if cfg.tis_cap is not None:
            sums["tis_weight"] += (mb.weight_BT * mask).sum().item()
            sums["tis_truncated"] += ((mb.weight_BT >= cfg.tis_cap) & (mask > 0)).sum().item()
        sums["tokens"] += mask.sum().item()
    sums["grad_norm"] = clip_gradients(accelerator, model, max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return sums


def add_gap(sums: dict[str, float], gap: dict[str, float]) -> None:
    """Fold one `logprob_gap` into running sums (the maximum stays a maximum)."""
    for key, value in gap.items():
        sums[key] = max(sums.get(key, 0.0), value) if key == "gap_max" else sums.get(key, 0.0) + value


# ---------------------------------------------------------------------------------------------------
# The trainer.


def load_stage_problems(stage: StageConfig, seed: int) -> list:
    """The stage's RL problems (`data.Problem`): the built-in task or `data.load_problems`."""
    cfg = stage.data
    if cfg.source == "task":
        levels = cfg.task_levels or tasks.task_module(cfg.task).RL_EASY_LEVELS
        return tasks.make_problems(cfg.limit or cfg.task_size, levels, "train", seed, cfg.task, pool="rl")
    return data.load_problems(cfg.source, split=cfg.split, limit=cfg.limit)


class GRPOTrainer(StageTrainer):
    """Runs one GRPO stage into `output_dir`, resuming from its latest checkpoint if there is one."""

    kind = "grpo"
    logs_rollouts = True

    def __init__(self, stage: StageConfig, output_dir: str | Path, **kwargs):
        super().__init__(stage, output_dir, **kwargs)
        self.cfg, acc, seed = stage.grpo, self.accelerator, self.seed
        self.ref_model = None
        self._vllm_stale = False
        if self.cfg.kl_coef > 0:
            # The reference is the stage's starting model, also when resuming from a checkpoint.
            ref, _ = load_stage_model(stage, self.init_model, seed)
            self.ref_model = ref.to(acc.device).eval().requires_grad_(False)

        self.problems = load_stage_problems(stage, seed)
        if not self.problems:
            raise ValueError(f"stage {stage.name!r}: data source {stage.data.source!r} gave no problems")
        prompt_format = stage_prompt_format(stage, self.tokenizer)
        self.prompts = [prompt_format.render(p.question) for p in self.problems]
        self.schedule = self.cfg.reward.schedule()
        mode = self.cfg.old_logprobs
        self.use_engine_logprobs = mode == "engine" or (
            mode == "auto" and self.cfg.rollout.backend == "hf" and self.cfg.tis_cap is None
        )
        behaviour = self.cfg.behaviour_logprobs
        # Opt in until the 2-process Unseen gap it opens is understood (GRPOConfig.behaviour_logprobs).
        self.behaviour_logprobs = bool(behaviour)

        self.prepare(stage.max_steps)
        self.ban_table = None
        if self.behaviour_logprobs:
            vocab = acc.unwrap_model(self.model).get_output_embeddings().weight.shape[0]
            self.ban_table = ban_table(self.tags, vocab, acc.device)
        self.engine = self._make_engine()
        self.resume()

    def _make_engine(self):
        """The rollout engine. hf: on the trained model itself. vllm: an engine in this process, on this
        process's GPU next to the trained model, loaded from the stage's starting folder; `train_step`
        loads the trained weights into it before sampling."""
        rollout, acc = self.cfg.rollout, self.accelerator
        if rollout.backend == "hf":
            model = acc.unwrap_model(self.model)
            return make_engine(
                "hf",
                model,
                self.tokenizer,
                max_batch_size=rollout.max_batch_size,
                behaviour_logprobs=self.behaviour_logprobs,
            )
        source = self.resume_from or self.init_model
        if str(source) in PRESETS:
            source = save_model(acc.unwrap_model(self.model), self.tokenizer, self.output_dir / "rollout_init")
        return make_engine(
            "vllm",
            str(source),
            self.tokenizer,
            colocate=True,
            num_processes=acc.num_processes,
            gpu_memory_utilization=rollout.vllm_gpu_memory_utilization,
            dtype=self.stage.model.dtype,
        )

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
        acc = self.accelerator
        # A seed per step: a resumed run samples exactly what the first one would have. The hf engine draws
        # each sample from (seed, problem index, sample index) alone (`train_step` passes the problem indices
        # as keys), so the seed is the same on every process and any process count samples the same
        # rollouts; vLLM has no per-prompt keys, so there each process gets a seed of its own.
        seed = self.seed * 1_000_003 + step
        if self.cfg.rollout.backend != "hf":
            seed = seed * acc.num_processes + acc.process_index
        return sampling_params(self.cfg.rollout, variant=self.stage.variant, seed=seed)

    def step(self) -> tuple[dict, list[dict]]:
        return self.train_step(self.state.step, self._next_prompts())

    def describe(self, metrics: dict) -> str:
        return f"reward {metrics['reward']:.2f} acc {metrics['accuracy']:.2f} par {metrics['parallel_ratio']:.2f}"

    def train_step(self, step: int, problem_indices: list[int]) -> tuple[dict, list[dict]]:
        """Run training step `step` (0-based) on the given problems; return (metrics, rollout records)."""
        acc, cfg = self.accelerator, self.cfg
        started = time.perf_counter()
        # Sample: each process samples whole groups, prompts i, i + P, ... of the step.
        mine = problem_indices[acc.process_index :: acc.num_processes]
        if cfg.rollout.backend == "vllm" and self._vllm_stale:
            self.engine.load_weights(acc.get_state_dict(self.model).items())
        keys = {"keys": mine} if cfg.rollout.backend == "hf" else {}
        if cfg.rollout.backend == "hf":
            self.engine.reset_stats()
        params = self.sampling_params(step)
        rollouts = self.engine.generate([self.prompts[i] for i in mine], n=cfg.n, params=params, **keys)
        sample_s = time.perf_counter() - started

        # Score with the schedule's reward at this step.
        golds = [self.problems[mine[r.prompt_index]].answer for r in rollouts]
        reward = cfg.reward
        scores = score_batch(
            [x.text for x in rollouts], golds, step, self.schedule,
            correct_value=reward.correct_value, wrong_value=reward.wrong_value,
            parallel_value=reward.parallel_value, timeout_s=reward.verify_timeout_s,
            format_error_value=reward.format_error_value,
        )  # fmt: skip

        # Advantages relative to the group; groups whose rewards are all equal carry no signal.
        rewards_PG = torch.tensor([s.reward for s in scores], dtype=torch.float32).view(len(mine), cfg.n)
        adv_PG = group_advantages(rewards_PG, scale=cfg.advantage == "grpo")
        keep_P = informative_groups(rewards_PG) if cfg.filter_zero_variance else torch.ones(len(mine), dtype=torch.bool)

        # Batch: training tensors and old log-probs. Dropped groups' rows stay, with their loss mask zeroed:
        # they serve as stand-in rows for a process left without data.
        variant = self.stage.variant
        response_ban_rows = None
        if self.ban_table is not None:
            response_ban_rows = [ban_rows(r.response_ids, self.tags, variant, params.max_blocks) for r in rollouts]
        batch = collate_rollouts(rollouts, adv_PG.flatten().tolist(), self.tokenizer.pad_token_id, response_ban_rows)
        batch.loss_mask_BT[(~keep_P).repeat_interleave(cfg.n)] = 0.0
        gap: dict[str, float] = {}
        if not self.use_engine_logprobs:
            old_logp_BT = recompute_logprobs(
                acc.unwrap_model(self.model),
                batch.to(acc.device),
                self.tags,
                variant,
                cfg.rollout.temperature,
                cfg.micro_batch_size,
                self.ban_table,
                cfg.rollout.top_k,
                cfg.rollout.top_p,
            )
            batch.old_logp_BT = old_logp_BT.cpu()
            gap = logprob_gap(batch.old_logp_BT, batch.sampler_logp_BT, batch.loss_mask_BT, cfg.mismatch_threshold)
            if cfg.tis_cap is not None:
                batch.weight_BT = tis_weights(batch.old_logp_BT, batch.sampler_logp_BT, cfg.tis_cap)

        # Update: `ppo_epochs` passes, one optimiser step per mini-batch of prompts.
        sums, updates = self._update(batch, keep_P, len(problem_indices), measure_gap=not gap)
        add_gap(sums, gap)
        elapsed = time.perf_counter() - started

        records = self._rollout_records(step, mine, rollouts, scores, adv_PG.flatten().tolist())
        metrics = self._step_metrics(step, records, sums, updates, keep_P, rollouts, sample_s, elapsed)
        return {**metrics, "data_indices": problem_indices}, records

    def _update(
        self, batch: RolloutBatch, keep_P: torch.Tensor, num_prompts: int, measure_gap: bool
    ) -> tuple[dict[str, float], int]:
        """`ppo_epochs` passes over the step's batch, one optimiser step per mini-batch of prompts; then the
        schedule's step. Returns the summed `policy_update` statistics and the number of optimiser steps.
        `measure_gap`: the first optimiser step, scored before the policy moves, measures the sampler gap."""
        acc, cfg = self.accelerator, self.cfg
        sums: dict[str, float] = {}
        updates = 0
        for _ in range(cfg.ppo_epochs):
            for m in range(cfg.prompts_per_step // cfg.mini_batch_size):
                rows, num_tokens = self._minibatch_rows(m, num_prompts, batch, keep_P)
                if num_tokens == 0:
                    continue
                minibatch = batch.rows(rows).to(acc.device)
                out = policy_update(
                    acc,
                    self.model,
                    self.optimizer,
                    minibatch,
                    cfg,
                    self.tags,
                    self.stage.variant,
                    self.stage.max_grad_norm,
                    num_tokens,
                    self.ref_model,
                    measure_gap=measure_gap and updates == 0,
                    ban_table=self.ban_table,
                )
                updates += 1
                self._vllm_stale = True
                add_gap(sums, {k: out.pop(k) for k in list(out) if k.startswith("gap_")})
                for key, value in out.items():
                    sums[key] = sums.get(key, 0.0) + value
        with warnings.catch_warnings():
            # Steps whose groups were all dropped make no optimiser step, yet the schedule still advances.
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
            self.scheduler.step()
        return sums, updates

    def _minibatch_rows(
        self, m: int, num_prompts: int, batch: RolloutBatch, keep_P: torch.Tensor
    ) -> tuple[list[int], float]:
        """(this process's rows of mini-batch `m`, the mini-batch's trained-on tokens over all processes).

        Mini-batch m is the step's prompts [m * mini_batch_size, (m + 1) * mini_batch_size); this process
        holds prompts process_index, process_index + P, ... as its groups 0, 1, ... Every process joins the
        token all-reduce, and the backward pass whenever some process has tokens: a process without kept
        rows of its own runs one stand-in row whose loss mask is zero (a dropped group's row, or row 0).
        """
        acc, cfg = self.accelerator, self.cfg
        local_slots = range(acc.process_index, num_prompts, acc.num_processes)
        lo, hi = m * cfg.mini_batch_size, (m + 1) * cfg.mini_batch_size
        groups = [g for g, slot in enumerate(local_slots) if lo <= slot < hi]
        rows = [g * cfg.n + j for g in groups if keep_P[g] for j in range(cfg.n)]
        local_tokens = batch.loss_mask_BT[rows].sum().item() if rows else 0.0
        num_tokens = acc.reduce(torch.tensor(local_tokens, device=acc.device), "sum").item()
        if not rows:
            rows = [groups[0] * cfg.n] if groups else [0]
        return rows, num_tokens

    def _rollout_records(
        self, step: int, mine: list[int], rollouts: list[Rollout], scores: list, advantages: list[float]
    ) -> list[dict]:
        """The step's rollout records (`rollout.RolloutRecord`), every process's, in process order."""
        records = []
        for r, s, advantage in zip(rollouts, scores, advantages):
            index = mine[r.prompt_index]
            problem = self.problems[index]
            context = {"step": step + 1, "problem_index": index, "problem_id": problem.id}
            scored = {"accuracy": s.accuracy, "parallel_bonus": s.parallel_bonus, "advantage": advantage}
            records.append(
                rollout_record(r, question=problem.question, gold=problem.answer, score=s, **context, **scored)
            )
        return gather_object(records) if self.accelerator.num_processes > 1 else records

    def _step_metrics(
        self,
        step: int,
        records: list[dict],
        sums: dict[str, float],
        updates: int,
        keep_P: torch.Tensor,
        rollouts: list[Rollout],
        sample_s: float,
        elapsed: float,
    ) -> dict:
        """The step's metrics: rollout statistics over every process's records, loss statistics per
        trained-on token over every process."""
        acc = self.accelerator
        totals = torch.tensor(
            [sums.get(k, 0.0) for k in ("loss", "clipped", "entropy", "kl", "tokens", "tis_weight", "tis_truncated")]
            + [float(keep_P.sum()), float(sum(len(r.response_ids) for r in rollouts))],
            device=acc.device,
        )
        loss, clipped, entropy, kl, tokens, tis_weight, tis_truncated, kept, generated = acc.reduce(
            totals, "sum"
        ).tolist()
        gap = torch.tensor([sums.get(k, 0.0) for k in ("gap_sum", "gap_over", "gap_tokens")], device=acc.device)
        gap_sum, gap_over, gap_tokens = acc.reduce(gap, "sum").tolist()
        gap_max = acc.gather(torch.tensor([sums.get("gap_max", 0.0)], device=acc.device)).max().item()
        paths = [n for rec in records for n in rec["path_tokens"]]

        def mean(key: str) -> float:
            return sum(float(rec[key]) for rec in records) / len(records)

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
            "generated_tokens": generated,
            "tokens_per_s": generated / elapsed,
            "sample_s": sample_s,
            "step_s": elapsed,
            "epoch": self.state.epoch,
        }
        if gap_tokens:
            # Sampling vs training log-probs of the same tokens: ~0 for the hf engine (exact by design).
            metrics["mismatch_mean"] = gap_sum / gap_tokens
            metrics["mismatch_max"] = gap_max
            metrics["mismatch_share"] = gap_over / gap_tokens
            metrics["mismatch_tokens"] = gap_tokens
        if self.cfg.rollout.backend == "hf":
            # What the bans and top-k/top-p took from each sampled token's softmax: what behaviour_logprobs
            # corrects, measured whether it is on or off (vLLM does not report it).
            stats = self.engine.stats
            mass = torch.tensor([stats.ban_mass, float(stats.sampled_tokens)], device=acc.device)
            mass_sum, sampled = acc.reduce(mass, "sum").tolist()
            metrics["ban_mass_mean"] = mass_sum / max(sampled, 1.0)
            metrics["ban_mass_max"] = acc.gather(torch.tensor([stats.ban_mass_max], device=acc.device)).max().item()
        if self.cfg.tis_cap is not None:
            metrics["tis_weight"] = tis_weight / max(tokens, 1.0)
            metrics["tis_truncated"] = tis_truncated / max(tokens, 1.0)
        if self.ref_model is not None:
            metrics["kl"] = kl / max(tokens, 1.0)
        return metrics
