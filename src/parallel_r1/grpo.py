"""GRPO with parallel-thinking rewards (docs/training.md): sample groups, score, normalise, clip, update.

One training step:

1. take the next `prompts_per_step` problems of the shuffled data;
2. sample `n` responses for each with the rollout engine, under the stage's variant (the same mask and
   positions the training forward uses);
3. score them with the reward schedule at this step (minus DAPO's soft overlong penalty when
   `overlong_buffer` is set), and turn rewards into group-normalised advantages. Groups whose rewards are
   all equal carry no signal and are dropped; with `dynamic_sampling` the next problems of the data order
   are sampled in further rounds until `prompts_per_step` groups are informative (or `max_refill_rounds`);
4. old log-probs: the engine's sampling log-probs when the backend guarantees they equal the training
   forward's (hf), otherwise a no-grad forward; the gap between the two is logged every step (`mismatch_*`),
   and importance weights (`tis_cap`, `tis_mode`) can correct each token or response for it.
   With `behaviour_logprobs` every log-prob, the engine's and the trainer's, is of the distribution the
   engine sampled from (bans, top-k/top-p, renormalised: `bans.Behaviour`); the mass those remove
   is logged as `ban_mass_*`;
5. `ppo_epochs` passes of `prompts_per_step / mini_batch_size` optimiser steps, each over one mini-batch
   of groups, accumulating gradients over micro-batches; the loss is the clipped surrogate (per token, or
   per response with `ratio_level: sequence`) and the k3 KL when asked, aggregated over the mini-batch by
   `loss_agg` (default: the mean over every trained-on token). Entropy is logged per step and per region.

Trained-on tokens are the response tokens the model sampled (`Rollout.sampled_mask`); tags the engine
inserted are context only, and with `overlong_filter` responses cut at the length cap are not trained on.
The math is in `objectives`, as pure functions.
"""

from __future__ import annotations

import logging
import random
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

from parallel_r1 import data, tasks
from parallel_r1.backends import make_engine
from parallel_r1.bans import BanTable, ban_rows
from parallel_r1.batch import RolloutBatch, batch_logprobs, collate_rollouts, recompute_logprobs
from parallel_r1.config import GRPOConfig, StageConfig
from parallel_r1.format import TagIds
from parallel_r1.models import PRESETS, save_model
from parallel_r1.objectives import (
    REGIONS,
    add_gap,
    aggregate_loss,
    clipped_policy_loss,
    group_advantages,
    informative_groups,
    kl_k3,
    logprob_gap,
    overlong_penalty,
    policy_log_ratio,
    refill_size,
    region_sums,
    tis_cut,
    tis_weights,
    token_regions,
)
from parallel_r1.prompts import stage_prompt_format
from parallel_r1.rewards import score_batch
from parallel_r1.rollout import Rollout, rollout_record, sampling_params, unseen_positions
from parallel_r1.trainer import StageTrainer, clip_gradients, full_weights, load_stage_model
from parallel_r1.vllm_backend import logprobs_mode

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------------
# The policy update.


# What `policy_update` sums over tokens, and `GRPOTrainer._step_metrics` over processes.
SUMMED = ("loss", "clipped", "entropy", "kl", "tokens", "tis_weight", "tis_truncated")
SUMMED += tuple(f"{key}_{region}" for key in ("entropy", "tokens") for region in REGIONS)


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
    num_sequences: float,
    ref_model=None,
    measure_gap: bool = False,
    ban_table: torch.Tensor | None = None,
) -> dict[str, float]:
    """One optimiser step on `batch` (this process's rows of a mini-batch).

    `num_tokens` and `num_sequences` are the mini-batch's trained-on tokens and rows over all processes:
    each micro-batch's loss is its share of the mini-batch's `cfg.loss_agg` (`objectives.aggregate_loss`),
    so the accumulated gradient is that of the whole mini-batch's loss. Rows with all-zero loss mask may
    stand in on a process left without data. Returns sums over this process's tokens (`SUMMED`: loss,
    clipped, entropy, by region too, KL, ...) and the grad norm; with `measure_gap` (the policy has not
    moved since sampling) also `logprob_gap` of the forward's log-probs against the sampler's. With the
    engine's `ban_table` the policy and the reference are scored on the distribution the engine sampled
    from (`RolloutBatch.behaviour`), entropy included.
    """
    model.train()
    parts = batch.micro_batches(cfg.update_rows, cfg.micro_batch_size, cfg.micro_batch_tokens)
    sums = dict.fromkeys(SUMMED, 0.0)
    for k, index in enumerate(parts):
        mb = batch.micro_batch(index)
        sync = accelerator.no_sync(model) if k < len(parts) - 1 else nullcontext()
        with sync:
            # The policy and the reference score the same tokens the same way.
            inputs = (mb, tags, cfg.update_rows, variant, cfg.rollout.temperature)
            behaviour = mb.behaviour(ban_table, cfg.rollout.top_k, cfg.rollout.top_p)
            logp_BT, entropy_BT = batch_logprobs(model, *inputs, with_entropy=True, behaviour=behaviour)
            # Under behaviour log-probs an untrained token (prompt, engine-inserted tag) may be one the
            # sampler could not have drawn, at -inf: zeroed here so no nan (-inf * 0, -inf - -inf) reaches
            # the loss; the masked fill passes no gradient to it.
            untrained_BT = mb.loss_mask_BT == 0
            logp_BT = logp_BT.masked_fill(untrained_BT, 0.0)
            log_ratio_BT = policy_log_ratio(logp_BT, mb.old_logp_BT, mb.loss_mask_BT, cfg.ratio_level)
            per_token_BT, clipped_BT = clipped_policy_loss(log_ratio_BT, mb.adv_B, cfg.clip_low, cfg.clip_high)
            per_token_BT = per_token_BT * mb.weight_BT
            if ref_model is not None:
                with torch.no_grad():
                    ref_logp_BT, _ = batch_logprobs(ref_model, *inputs, behaviour=behaviour)
                ref_logp_BT = ref_logp_BT.masked_fill(untrained_BT, 0.0)
                kl_BT = kl_k3(logp_BT, ref_logp_BT)
                per_token_BT = per_token_BT + cfg.kl_coef * kl_BT
                sums["kl"] += (kl_BT.detach() * mb.loss_mask_BT).sum().item()
            loss = aggregate_loss(per_token_BT, mb.loss_mask_BT, cfg.loss_agg, num_tokens, num_sequences)
            # DDP averages gradients over processes; the mini-batch's loss wants their sum.
            accelerator.backward(loss * accelerator.num_processes)
        mask = mb.loss_mask_BT
        if measure_gap:
            add_gap(sums, logprob_gap(logp_BT, mb.sampler_logp_BT, mask, cfg.mismatch_threshold))
        sums["loss"] += (per_token_BT.detach() * mask).sum().item()
        sums["clipped"] += (clipped_BT.float() * mask).sum().item()
        sums["entropy"] += (entropy_BT.detach() * mask).sum().item()
        # From the logits of this forward: where in a parallel response the policy is uncertain.
        by_region = region_sums(entropy_BT.detach(), mask, token_regions(mb.input_ids_BT, tags)).tolist()
        for region, entropy, tokens in zip(REGIONS, *by_region):
            sums[f"entropy_{region}"] += entropy
            sums[f"tokens_{region}"] += tokens
        if cfg.tis_cap is not None:
            sums["tis_weight"] += (mb.weight_BT * mask).sum().item()
            sums["tis_truncated"] += (tis_cut(mb.weight_BT, cfg.tis_cap, cfg.tis_mode) & (mask > 0)).sum().item()
        sums["tokens"] += mask.sum().item()
    sums["grad_norm"] = clip_gradients(accelerator, model, max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return sums


# ---------------------------------------------------------------------------------------------------
# The trainer.


def load_stage_problems(stage: StageConfig, seed: int) -> list:
    """The stage's RL problems (`data.Problem`): the built-in task or `data.load_problems`."""
    cfg = stage.data
    if cfg.source == "task":
        levels = cfg.task_levels or tasks.task_module(cfg.task).RL_EASY_LEVELS
        return tasks.make_problems(cfg.limit or cfg.task_size, levels, "train", seed, cfg.task, pool="rl")
    return data.load_problems(cfg.source, split=cfg.split, limit=cfg.limit)


@dataclass
class _Round:
    """One sampling round of a step: its prompts (every process's, in order) and this process's share."""

    prompts: list[int]
    mine: list[int]  # this process's prompts: prompts[process_index::num_processes]
    rollouts: list[Rollout]
    scores: list
    adv_PG: torch.Tensor
    keep: list[bool]  # informative, per prompt of `prompts` (every process's)
    penalty_B: torch.Tensor  # the overlong penalty in each rollout's reward (0 when off)
    ban_rows: list[list[int]] = field(default_factory=list)  # `bans.ban_rows` per rollout, with a ban table


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
        # null: on where the trainer can replay the sampler exactly, the hf engine (GRPOConfig.behaviour_logprobs).
        self.behaviour_logprobs = self.cfg.rollout.backend == "hf" if behaviour is None else behaviour

        self.prepare(stage.max_steps)
        self.bans = None
        if self.behaviour_logprobs:
            with full_weights(acc, self.model):  # ZeRO-3 holds a shard of the output embedding outside
                vocab = acc.unwrap_model(self.model).get_output_embeddings().weight.shape[0]
            self.bans = BanTable(self.tags, vocab, acc.device)
        self.engine = self._make_engine()
        self.resume()

    @property
    def ban_table(self) -> torch.Tensor | None:
        """The current [R, V] table of `self.bans` (it grows as `ban_rows` meets plan-dependent bans)."""
        return None if self.bans is None else self.bans.table

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
            logprobs_mode=logprobs_mode(rollout.temperature),
        )

    # Data order: epoch e visits the problems in a permutation drawn from (data_seed, e).
    def _order(self, epoch: int) -> list[int]:
        order = list(range(len(self.problems)))
        random.Random(f"grpo-order-{self.state.data_seed}-{epoch}").shuffle(order)
        return order

    def _next_prompts(self, count: int) -> list[int]:
        """The next `count` problems of the data order; the position is `state` (epoch, index), which
        checkpoints save, so a resumed run continues the stream where the last saved step left it."""
        chosen: list[int] = []
        while len(chosen) < count:
            order = self._order(self.state.epoch)
            take = order[self.state.index : self.state.index + count - len(chosen)]
            chosen += take
            self.state.index += len(take)
            if self.state.index >= len(order):
                self.state.epoch, self.state.index = self.state.epoch + 1, 0
        return chosen

    def sampling_params(self, step: int, round_: int = 0):
        acc = self.accelerator
        # A seed per step: a resumed run samples exactly what the first one would have. The hf engine draws
        # each sample from (seed, problem index, sample index) alone (`train_step` passes the problem indices
        # as keys), so the seed is the same on every process and any process count samples the same
        # rollouts; vLLM has no per-prompt keys, so there each process gets a seed of its own. Refill rounds
        # of dynamic sampling get seeds no step's first round has (steps stay below 1e9).
        seed = self.seed * 1_000_003 + step + round_ * 1_000_000_007
        if self.cfg.rollout.backend != "hf":
            seed = seed * acc.num_processes + acc.process_index
        return sampling_params(self.cfg.rollout, variant=self.stage.variant, seed=seed)

    def step(self) -> tuple[dict, list[dict]]:
        return self.train_step(self.state.step, self._next_prompts(self.cfg.prompts_per_step))

    def describe(self, metrics: dict) -> str:
        return f"reward {metrics['reward']:.2f} acc {metrics['accuracy']:.2f} par {metrics['parallel_ratio']:.2f}"

    def train_step(self, step: int, problem_indices: list[int]) -> tuple[dict, list[dict]]:
        """Run training step `step` (0-based) on the given problems, and with dynamic sampling on the next
        ones of the data order until enough groups are informative; return (metrics, rollout records)."""
        acc, cfg = self.accelerator, self.cfg
        started = time.perf_counter()
        if cfg.rollout.backend == "vllm" and self._vllm_stale:
            self.engine.load_weights(acc.get_state_dict(self.model).items())
        if cfg.rollout.backend == "hf":
            self.engine.reset_stats()
        rounds = [self._sample_round(step, 0, problem_indices)]
        while cfg.dynamic_sampling and len(rounds) <= cfg.max_refill_rounds:
            sampled, kept = sum(len(r.keep) for r in rounds), sum(sum(r.keep) for r in rounds)
            if kept >= cfg.prompts_per_step:
                break
            size = refill_size(cfg.prompts_per_step - kept, sampled, kept, cfg.prompts_per_step)
            rounds.append(self._sample_round(step, len(rounds), self._next_prompts(size)))
        informative = sum(sum(r.keep) for r in rounds)
        if cfg.dynamic_sampling and informative < cfg.prompts_per_step and acc.is_main_process:
            log.info(
                "step %d: %d of %d groups informative after %d sampling rounds (max_refill_rounds %d)",
                step + 1,
                informative,
                cfg.prompts_per_step,
                len(rounds),
                cfg.max_refill_rounds,
            )
        sample_s = time.perf_counter() - started

        # Batch: training tensors and old log-probs. Rows of groups not trained on stay, with their loss mask
        # zeroed: they serve as stand-in rows for a process left without data.
        slots = self._train_slots(rounds)
        trained = {g for process, g, keep in slots if keep and process == acc.process_index}
        rollouts = [x for r in rounds for x in r.rollouts]
        keep_P = torch.tensor([g in trained for g in range(len(rollouts) // cfg.n)], dtype=torch.bool)
        advantages = [a for r in rounds for a in r.adv_PG.flatten().tolist()]
        response_ban_rows = [b for r in rounds for b in r.ban_rows] if self.bans is not None else None
        batch = collate_rollouts(rollouts, advantages, self.tokenizer.pad_token_id, response_ban_rows)
        batch.loss_mask_BT[(~keep_P).repeat_interleave(cfg.n)] = 0.0
        if cfg.overlong_filter:
            batch.loss_mask_BT[torch.tensor([x.finish_reason == "length" for x in rollouts], dtype=torch.bool)] = 0.0
        gap: dict[str, float] = {}
        if not self.use_engine_logprobs:
            old_logp_BT = recompute_logprobs(
                acc.unwrap_model(self.model), batch.to(acc.device), self.tags, self.stage.variant,
                cfg.rollout.temperature, cfg.micro_batch_size, self.ban_table, cfg.rollout.top_k, cfg.rollout.top_p,
                cfg.update_rows, cfg.micro_batch_tokens,
            )  # fmt: skip
            batch.old_logp_BT = old_logp_BT.cpu()
            gap = logprob_gap(batch.old_logp_BT, batch.sampler_logp_BT, batch.loss_mask_BT, cfg.mismatch_threshold)
            if cfg.tis_cap is not None:
                batch.weight_BT = tis_weights(
                    batch.old_logp_BT, batch.sampler_logp_BT, cfg.tis_cap, cfg.tis_mode, batch.loss_mask_BT
                )

        # Update: `ppo_epochs` passes, one optimiser step per mini-batch of prompts.
        sums, updates = self._update(batch, slots, measure_gap=not gap)
        add_gap(sums, gap)
        elapsed = time.perf_counter() - started

        records = [rec for r in rounds for rec in self._rollout_records(step, r)]
        metrics = self._step_metrics(step, rounds, records, sums, updates, float(keep_P.sum()), sample_s, elapsed)
        return {**metrics, "data_indices": [i for r in rounds for i in r.prompts]}, records

    def _sample_round(self, step: int, round_: int, prompts: list[int]) -> _Round:
        """Sample, score and normalise the groups of `prompts` (round `round_` of step `step`): each process
        samples whole groups, prompts i, i + P, ... of the round."""
        acc, cfg = self.accelerator, self.cfg
        mine = prompts[acc.process_index :: acc.num_processes]
        keys = {"keys": mine} if cfg.rollout.backend == "hf" else {}
        params = self.sampling_params(step, round_)
        with full_weights(self.accelerator, self.model):  # ZeRO-3: every process gathers, sampling or not
            rollouts = (
                self.engine.generate([self.prompts[i] for i in mine], n=cfg.n, params=params, **keys) if mine else []
            )

        # Score with the schedule's reward at this step.
        golds = [self.problems[mine[r.prompt_index]].answer for r in rollouts]
        reward = cfg.reward
        speedups = None
        if reward.speedup_value and self.stage.variant == "unseen":
            speedups = [1 - unseen_positions(r) / max(1, len(r.response_ids)) for r in rollouts]
        scores = score_batch(
            [x.text for x in rollouts], golds, step, self.schedule,
            correct_value=reward.correct_value, wrong_value=reward.wrong_value,
            parallel_value=reward.parallel_value, timeout_s=reward.verify_timeout_s,
            format_error_value=reward.format_error_value, plans=params.plans, max_depth=params.max_depth,
            speedups=speedups, speedup_value=reward.speedup_value,
        )  # fmt: skip
        rewards_B = torch.tensor([s.reward for s in scores], dtype=torch.float32)
        penalty_B = torch.zeros_like(rewards_B)
        if cfg.overlong_buffer:
            lengths_B = torch.tensor([len(x.response_ids) for x in rollouts])
            penalty_B = overlong_penalty(
                lengths_B, cfg.rollout.max_response_tokens, cfg.overlong_buffer, cfg.overlong_penalty
            )

        # Advantages relative to the group; groups whose rewards are all equal carry no signal.
        rewards_PG = (rewards_B + penalty_B).view(len(mine), cfg.n)
        adv_PG = group_advantages(rewards_PG, scale=cfg.advantage == "grpo")
        keep_P = informative_groups(rewards_PG) if cfg.filter_zero_variance else torch.ones(len(mine), dtype=torch.bool)
        bans = []
        if self.bans is not None:
            caps = (params.max_blocks, params.plans, params.max_depth)
            distinct = (self.engine.plan_lines, self.bans) if params.distinct_plans else None
            bans = [ban_rows(r.response_ids, self.tags, self.stage.variant, *caps, distinct) for r in rollouts]
        return _Round(prompts, mine, rollouts, scores, adv_PG, self._global_keep(keep_P.tolist()), penalty_B, bans)

    def _global_keep(self, keep: list[bool]) -> list[bool]:
        """Every process's informative flags of a round, in the round's order: prompt j of the round is on
        process j modulo the process count."""
        acc = self.accelerator
        if acc.num_processes == 1:
            return keep
        parts = gather_object([keep])
        return [parts[j % acc.num_processes][j // acc.num_processes] for j in range(sum(map(len, parts)))]

    def _train_slots(self, rounds: list[_Round]) -> list[tuple[int, int, bool]]:
        """(process, its group index, trained) of the step's slots, in mini-batch order: the first round's
        prompts, or with dynamic sampling the first `prompts_per_step` informative groups of every round."""
        num = self.accelerator.num_processes
        slots, before = [], [0] * num
        for r in rounds:
            slots += [(j % num, before[j % num] + j // num, keep) for j, keep in enumerate(r.keep)]
            before = [b + len(r.prompts[p::num]) for p, b in enumerate(before)]
        if not self.cfg.dynamic_sampling:
            return slots
        return [slot for slot in slots if slot[2]][: self.cfg.prompts_per_step]

    def _update(self, batch: RolloutBatch, slots: list, measure_gap: bool) -> tuple[dict[str, float], int]:
        """`ppo_epochs` passes over the step's batch, one optimiser step per mini-batch of `slots`; then the
        schedule's step. Returns the summed `policy_update` statistics and the number of optimiser steps.
        `measure_gap`: the first optimiser step, scored before the policy moves, measures the sampler gap."""
        acc, cfg = self.accelerator, self.cfg
        sums: dict[str, float] = {}
        updates = 0
        for _ in range(cfg.ppo_epochs):
            for m in range(cfg.prompts_per_step // cfg.mini_batch_size):
                minibatch, num_tokens, num_sequences = self._minibatch(
                    slots[m * cfg.mini_batch_size :][: cfg.mini_batch_size], batch
                )
                if num_tokens == 0:
                    continue
                minibatch = minibatch.to(acc.device)
                out = policy_update(
                    acc, self.model, self.optimizer, minibatch, cfg, self.tags, self.stage.variant,
                    self.stage.max_grad_norm, num_tokens, num_sequences, self.ref_model,
                    measure_gap=measure_gap and updates == 0, ban_table=self.ban_table,
                )  # fmt: skip
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

    def _minibatch(self, slots: list, batch: RolloutBatch) -> tuple[RolloutBatch, float, float]:
        """(this process's rows of the mini-batch of `slots`, its trained-on tokens and rows over all processes).

        Every process joins the count all-reduce, and the backward pass whenever some process has tokens: a
        process without trained rows of its own runs one stand-in row with its loss mask zeroed (a dropped
        group's row, or row 0, which may be trained in another mini-batch).
        """
        acc, cfg = self.accelerator, self.cfg
        mine = [(g, keep) for process, g, keep in slots if process == acc.process_index]
        rows = [g * cfg.n + j for g, keep in mine if keep for j in range(cfg.n)]
        mask_BT = batch.loss_mask_BT[rows]
        counts = torch.tensor([mask_BT.sum().item(), (mask_BT.sum(1) > 0).sum().item()], device=acc.device)
        num_tokens, num_sequences = acc.reduce(counts, "sum").tolist()
        minibatch = batch.rows(rows or [mine[0][0] * cfg.n if mine else 0])
        if not rows:
            minibatch.loss_mask_BT.zero_()
        return minibatch, num_tokens, num_sequences

    def _rollout_records(self, step: int, round_: _Round) -> list[dict]:
        """A round's rollout records (`rollout.RolloutRecord`), every process's, in process order."""
        records = []
        for k, (r, s) in enumerate(zip(round_.rollouts, round_.scores)):
            index = round_.mine[r.prompt_index]
            problem = self.problems[index]
            context = {"step": step + 1, "problem_index": index, "problem_id": problem.id}
            advantage = round_.adv_PG.flatten()[k].item()
            scored = {"accuracy": s.accuracy, "parallel_bonus": s.parallel_bonus, "advantage": advantage}
            scored["speedup_bonus"] = s.speedup_bonus
            if self.cfg.overlong_buffer:
                scored["overlong_penalty"] = round_.penalty_B[k].item()
            records.append(
                rollout_record(r, question=problem.question, gold=problem.answer, score=s, **context, **scored)
            )
        return gather_object(records) if self.accelerator.num_processes > 1 else records

    def _step_metrics(
        self,
        step: int,
        rounds: list[_Round],
        records: list[dict],
        sums: dict[str, float],
        updates: int,
        kept: float,
        sample_s: float,
        elapsed: float,
    ) -> dict:
        """The step's metrics: rollout statistics over every process's records (every round's), loss
        statistics per trained-on token over every process."""
        acc = self.accelerator
        generated = float(sum(len(x.response_ids) for r in rounds for x in r.rollouts))
        totals = torch.tensor([sums.get(k, 0.0) for k in SUMMED] + [kept, generated], device=acc.device)
        *reduced, kept, generated = acc.reduce(totals, "sum").tolist()
        total = dict(zip(SUMMED, reduced))
        loss, clipped, entropy, kl, tokens, tis_weight, tis_truncated = (total[k] for k in SUMMED[:7])
        gap = torch.tensor([sums.get(k, 0.0) for k in ("gap_sum", "gap_over", "gap_tokens")], device=acc.device)
        gap_sum, gap_over, gap_tokens = acc.reduce(gap, "sum").tolist()
        gap_max = acc.gather(torch.tensor([sums.get("gap_max", 0.0)], device=acc.device)).max().item()
        paths = [n for rec in records for n in rec["path_tokens"]]
        widths = [k for rec in records for k in rec["paths_per_block"]]
        depths = [rec["depth"] for rec in records if rec["num_blocks"]]

        def mean(key: str) -> float:
            return sum(float(rec[key]) for rec in records) / len(records)

        metrics = {
            "reward": mean("reward"),
            "reward_accuracy": mean("accuracy"),
            "reward_parallel_bonus": mean("parallel_bonus"),
            "reward_speedup_bonus": mean("speedup_bonus"),
            "accuracy": mean("correct"),
            "parallel_ratio": sum(rec["num_blocks"] > 0 for rec in records) / len(records),
            "well_formed": mean("well_formed"),
            "blocks_per_response": mean("num_blocks"),
            "paths_per_block": sum(widths) / len(widths) if widths else 0.0,
            "block_depth": sum(depths) / len(depths) if depths else 0.0,
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
        for region in REGIONS:
            if total[f"tokens_{region}"]:
                metrics[f"entropy_{region}"] = total[f"entropy_{region}"] / total[f"tokens_{region}"]
        if self.cfg.dynamic_sampling:
            metrics["sampling_rounds"] = len(rounds)
            metrics["prompts_sampled"] = sum(len(r.prompts) for r in rounds)
        if self.cfg.overlong_buffer:
            metrics["overlong_penalty"] = mean("overlong_penalty")
        return metrics
