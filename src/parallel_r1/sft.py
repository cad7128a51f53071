"""Supervised cold start: teach the format on teacher solutions, loss on response tokens only.

Each record becomes `prompt_ids + response_ids`, where the prompt is tokenized as the rollout engine
tokenizes it and the response is `canonicalize(response)` followed by EOS, so that what the model learns
here is exactly what it later samples. Under the chat template (`data.chat_template`) the record's prompt
is the user turn of `prompts.PromptFormat`, and the response ends with the template's end-of-turn token
instead of EOS: the template's tokens before the response are prompt, not trained on, and those after the
end of the turn are left out, so the loss covers exactly what the model writes in its turn.
Log-probabilities come from `attention.response_logprobs` under the stage's variant (seen: causal;
unseen: paths isolated), the same function GRPO trains with.

Batches are length-bucketed and the data order is a pure function of (seed, epoch), so a resumed run
continues with the very next batch. The loss is the mean over all response tokens of an optimiser step
(gradient accumulation and processes included), not a mean of per-batch means.

What both trainers share (model loading, optimiser, schedule, checkpoints, the loop) is in `trainer.py`.
"""

from __future__ import annotations

import logging
import math
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from parallel_r1 import data, tasks
from parallel_r1.attention import response_logprobs
from parallel_r1.config import StageConfig
from parallel_r1.format import TagIds, canonicalize
from parallel_r1.prompts import prompt_template, stage_prompt_format
from parallel_r1.trainer import StageTrainer, clip_gradients

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------
# Data.


@dataclass
class Example:
    """One tokenized record: prompt then response ids; the response part is trained on."""

    input_ids: list[int]
    prompt_len: int


def encode_record(tokenizer, prompt: str, response: str, max_length: int, end_id: int | None = None) -> Example:
    """Tokenize like the engine: the prompt as `tokenizer(prompt)`, then canonical response + `end_id`
    (default EOS; the end-of-turn token under a chat template)."""
    end_id = tokenizer.eos_token_id if end_id is None else end_id
    prompt_ids = tokenizer(prompt)["input_ids"]
    response_ids = tokenizer(canonicalize(response), add_special_tokens=False)["input_ids"] + [end_id]
    ids = (prompt_ids + response_ids)[:max_length]
    return Example(ids, min(len(prompt_ids), len(ids)))


def check_truncation(examples: list[Example], stage: StageConfig) -> None:
    """Fail when `sft.max_length` cuts every response away (the stage would train on nothing); warn when
    it cuts some."""
    empty = sum(len(e.input_ids) == e.prompt_len for e in examples)
    cut = sum(len(e.input_ids) == stage.sft.max_length for e in examples)
    where, n = f"stage {stage.name!r}: sft.max_length {stage.sft.max_length}", len(examples)
    if examples and empty == n:
        raise ValueError(f"{where} leaves no response token in any record (prompts alone are that long): raise it")
    if empty:
        log.warning("%s leaves no response token in %d of %d records: they train on nothing", where, empty, n)
    if cut > empty:
        log.warning("%s cuts the response of %d of %d records short (no EOS to learn)", where, cut - empty, n)


def load_records(stage: StageConfig, seed: int) -> list:
    """The stage's SFT records (`data.SFTRecord`), from the built-in task or `data.load_sft_records`."""
    cfg = stage.data
    template = prompt_template(cfg.prompt)
    if cfg.source == "task":
        return tasks.make_sft_records(
            cfg.limit or cfg.task_size, cfg.task_levels, seed, cfg.task_style, template, cfg.task
        )
    records = data.load_sft_records(cfg.source, template=template)
    return records[: cfg.limit] if cfg.limit else records


def split_eval(n: int, eval_size: int, seed: int) -> tuple[list[int], list[int]]:
    """(train indices, eval indices): a seeded draw of `eval_size` records is held out."""
    if eval_size >= n:
        raise ValueError(f"data.eval_size ({eval_size}) must be smaller than the number of records ({n})")
    order = list(range(n))
    random.Random(f"eval-split-{seed}").shuffle(order)
    return sorted(order[eval_size:]), sorted(order[:eval_size])


def epoch_batches(lengths: list[int], batch_size: int, bucket_batches: int, seed: int, epoch: int) -> list[list[int]]:
    """Epoch `epoch`'s batches of indices into `lengths`: a seeded shuffle, then within each window of
    `bucket_batches` batches the indices are sorted by length (less padding), then batch order is shuffled.
    Every index appears exactly once; the result depends on (seed, epoch) only."""
    rng = random.Random(f"sft-order-{seed}-{epoch}")
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = batch_size * bucket_batches
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: lengths[i])
        batches += [chunk[j : j + batch_size] for j in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def collate(examples: list[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-padded (input_ids[B, T], attention_mask[B, T], loss_mask[B, T]); loss_mask marks response tokens."""
    width = max(len(e.input_ids) for e in examples)
    ids, attn, loss = [], [], []
    for e in examples:
        pad = width - len(e.input_ids)
        ids.append([pad_id] * pad + e.input_ids)
        attn.append([0] * pad + [1] * len(e.input_ids))
        loss.append([0] * (pad + e.prompt_len) + [1] * (len(e.input_ids) - e.prompt_len))
    return torch.tensor(ids), torch.tensor(attn), torch.tensor(loss, dtype=torch.float32)


def response_nll_sum(model, input_ids_BT, attention_mask_BT, loss_mask_BT, tags: TagIds, variant: str) -> torch.Tensor:
    """Sum over response tokens of -log p(token | everything before it under `variant`) (a scalar)."""
    logp_BT, _ = response_logprobs(model, input_ids_BT, attention_mask_BT, tags, variant=variant)
    return -(logp_BT * loss_mask_BT).sum()


# ---------------------------------------------------------------------------------------------------
# The trainer.


class SFTTrainer(StageTrainer):
    """Runs one SFT stage into `output_dir`, resuming from its latest checkpoint if there is one."""

    kind = "sft"

    def __init__(self, stage: StageConfig, output_dir: str | Path, **kwargs):
        super().__init__(stage, output_dir, **kwargs)
        self.cfg, seed = stage.sft, self.seed
        prompt_format = stage_prompt_format(stage, self.tokenizer)
        end_id = prompt_format.end_id
        records = load_records(stage, seed)
        train_idx, eval_idx = split_eval(len(records), stage.data.eval_size, seed)

        def encode(record) -> Example:
            prompt = prompt_format.wrap(record.prompt)
            return encode_record(self.tokenizer, prompt, record.response, self.cfg.max_length, end_id)

        self.train_examples = [encode(records[i]) for i in train_idx]
        self.eval_examples = [encode(records[i]) for i in eval_idx]
        check_truncation(self.train_examples, stage)
        self.global_batch = self.cfg.batch_size * self.accelerator.num_processes
        num_batches = math.ceil(len(self.train_examples) / self.global_batch)
        self.steps_per_epoch = math.ceil(num_batches / self.cfg.grad_accum)
        self.prepare(stage.max_steps or self.cfg.epochs * self.steps_per_epoch)
        self.resume()

    def _batches(self, epoch: int) -> list[list[int]]:
        lengths = [len(e.input_ids) for e in self.train_examples]
        return epoch_batches(lengths, self.global_batch, self.cfg.bucket_batches, self.state.data_seed, epoch)

    def _next_step_batches(self) -> list[list[int]]:
        """The next optimiser step's batches; a step never spans two epochs."""
        batches = self._batches(self.state.epoch)
        if self.state.index >= len(batches):
            self.state.epoch, self.state.index = self.state.epoch + 1, 0
            batches = self._batches(self.state.epoch)
        step = batches[self.state.index : self.state.index + self.cfg.grad_accum]
        self.state.index += len(step)
        return step

    def _local_rows(self, batch: list[int]) -> tuple[list[Example], float]:
        """This process's share of a global batch and its loss weight (0 for a stand-in row)."""
        acc = self.accelerator
        rows = batch[acc.process_index :: acc.num_processes]
        if not rows:
            # A short last batch can leave a process without rows; it still runs a forward/backward so
            # the processes' gradient all-reduce lines up, with the loss weighted to zero.
            return [self.train_examples[batch[0]]], 0.0
        return [self.train_examples[i] for i in rows], 1.0

    def train_step(self, batches: list[list[int]]) -> dict:
        acc, model = self.accelerator, self.model
        model.train()
        tokens = sum(len(e.input_ids) - e.prompt_len for b in batches for e in (self.train_examples[i] for i in b))
        # Every process sees the global batch, so `tokens` is the step's global response-token count;
        # DDP averages gradients over processes, hence the factor num_processes.
        scale = acc.num_processes / max(tokens, 1)
        loss_total = 0.0
        for k, batch in enumerate(batches):
            rows, weight = self._local_rows(batch)
            ids, attn, loss_mask = (t.to(acc.device) for t in collate(rows, self.tokenizer.pad_token_id))
            sync = acc.no_sync(model) if k < len(batches) - 1 else nullcontext()
            with sync:
                nll = response_nll_sum(model, ids, attn, loss_mask, self.tags, self.stage.variant)
                acc.backward(nll * scale * weight)
            loss_total += nll.item() * weight
        grad_norm = clip_gradients(acc, model, self.stage.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        loss_total = acc.reduce(torch.tensor(loss_total, device=acc.device), "sum").item()
        return {"loss": loss_total / max(tokens, 1), "grad_norm": grad_norm, "tokens": tokens}

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean response-token NLL on the held-out records."""
        acc = self.accelerator
        self.model.eval()
        total = torch.zeros(2, device=acc.device)
        mine = self.eval_examples[acc.process_index :: acc.num_processes]
        for start in range(0, len(mine), self.cfg.batch_size):
            rows = mine[start : start + self.cfg.batch_size]
            ids, attn, loss_mask = (t.to(acc.device) for t in collate(rows, self.tokenizer.pad_token_id))
            total[0] += response_nll_sum(self.model, ids, attn, loss_mask, self.tags, self.stage.variant)
            total[1] += loss_mask.sum()
        total = acc.reduce(total, "sum")
        self.model.train()
        return (total[0] / total[1].clamp(min=1)).item()

    def step(self) -> tuple[dict, list[dict]]:
        start = time.perf_counter()
        batches = self._next_step_batches()
        metrics = self.train_step(batches)
        metrics.update(
            lr=self.scheduler.get_last_lr()[0],
            epoch=self.state.epoch,
            tokens_per_s=metrics["tokens"] / (time.perf_counter() - start),
            data_indices=[i for b in batches for i in b],
        )
        step, every = self.state.step + 1, self.stage.eval_every
        if self.eval_examples and ((every and step % every == 0) or step == self.total_steps):
            metrics["eval_loss"] = self.evaluate()
        return metrics, []

    def describe(self, metrics: dict) -> str:
        return f"loss {metrics['loss']:.4f}"
