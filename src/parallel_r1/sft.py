"""Supervised cold start: teach the format on teacher solutions, loss on response tokens only.

Each record becomes `prompt_ids + response_ids`, where the prompt is tokenized as the rollout engine
tokenizes it and the response is `canonicalize(response)` followed by EOS, so that what the model learns
here is exactly what it later samples. Log-probabilities come from `attention.response_logprobs` under
the stage's variant (seen: causal; unseen: paths isolated), the same function GRPO trains with.

Batches are length-bucketed and the data order is a pure function of (seed, epoch), so a resumed run
continues with the very next batch. The loss is the mean over all response tokens of an optimiser step
(gradient accumulation and processes included), not a mean of per-batch means.

This module also holds what both trainers share: the accelerator, model loading, optimiser and schedule.
"""

from __future__ import annotations

import logging
import math
import random
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from accelerate import Accelerator

from parallel_r1.attention import response_logprobs
from parallel_r1.checkpoint import TrainerState, latest_checkpoint, load_checkpoint, save_checkpoint
from parallel_r1.config import LoggingConfig, StageConfig
from parallel_r1.format import TagIds, canonicalize
from parallel_r1.metrics import MetricsLogger

log = logging.getLogger(__name__)

DONE_FILE = "DONE"


# ---------------------------------------------------------------------------------------------------
# Shared by both trainers.


def load_stage_model(stage: StageConfig, source: str | Path, seed: int):
    """(model, tokenizer) for `stage` from `source`: a preset, a model folder or a checkpoint folder."""
    from parallel_r1.models import TINY, load_model_and_tokenizer

    tiny_kwargs = asdict(stage.model.tiny) if str(source) == TINY else None
    model, tokenizer = load_model_and_tokenizer(source, dtype=stage.model.dtype, tiny_kwargs=tiny_kwargs, seed=seed)
    if model.config._attn_implementation != stage.model.attn_implementation:
        model.set_attn_implementation(stage.model.attn_implementation)
    return model, tokenizer


def build_optimizer(model: torch.nn.Module, stage: StageConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=stage.lr,
        betas=(stage.adam_beta1, stage.adam_beta2),
        weight_decay=stage.weight_decay,
    )


def build_scheduler(optimizer: torch.optim.Optimizer, stage: StageConfig, total_steps: int):
    from transformers import get_scheduler

    name = "constant_with_warmup" if stage.lr_schedule == "constant" else stage.lr_schedule
    return get_scheduler(name, optimizer, num_warmup_steps=stage.warmup_steps, num_training_steps=total_steps)


def clip_gradients(accelerator: Accelerator, model: torch.nn.Module, max_norm: float) -> float:
    """Clip to `max_norm` (0: no clipping) and return the norm before clipping."""
    limit = max_norm if max_norm > 0 else float("inf")
    return float(accelerator.clip_grad_norm_(model.parameters(), limit))


def stage_is_done(directory: str | Path) -> bool:
    return (Path(directory) / DONE_FILE).is_file()


def final_model(directory: str | Path) -> Path:
    """The model folder a finished stage hands to the next one (its last checkpoint)."""
    directory = Path(directory)
    if not stage_is_done(directory):
        raise FileNotFoundError(f"stage folder {directory} has no finished run ({DONE_FILE} is missing)")
    return directory / (directory / DONE_FILE).read_text().strip()


def mark_done(directory: Path, checkpoint: Path) -> None:
    tmp = directory / (DONE_FILE + ".tmp")
    tmp.write_text(checkpoint.name + "\n")
    tmp.replace(directory / DONE_FILE)


def make_progress(total: int, completed: int, description: str, enabled: bool):
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        disable=not enabled,
    )
    task = progress.add_task(description, total=total, completed=completed, info="")
    return progress, task


# ---------------------------------------------------------------------------------------------------
# Data.


@dataclass
class Example:
    """One tokenized record: prompt then response ids; the response part is trained on."""

    input_ids: list[int]
    prompt_len: int


def encode_record(tokenizer, prompt: str, response: str, max_length: int) -> Example:
    """Tokenize like the engine: the prompt as `tokenizer(prompt)`, then canonical response + EOS."""
    prompt_ids = tokenizer(prompt)["input_ids"]
    response_ids = tokenizer(canonicalize(response), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
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


QUESTION_TEMPLATE = "Problem: {question}\n"


def prompt_template(name: str) -> str:
    """The template string of a `data.prompt` setting."""
    from parallel_r1 import data

    return {"parallel": data.PROMPT_TEMPLATE, "sequential": data.SEQUENTIAL_TEMPLATE, "question": QUESTION_TEMPLATE}[
        name
    ]


def load_records(stage: StageConfig, seed: int) -> list:
    """The stage's SFT records (`data.SFTRecord`), from the built-in task or `data.load_sft_records`."""
    from parallel_r1 import data

    cfg = stage.data
    template = prompt_template(cfg.prompt)
    if cfg.source == "task":
        from parallel_r1 import task

        levels = tuple(cfg.task_levels or task.COLD_START_LEVELS)
        return task.make_sft_records(cfg.limit or cfg.task_size, levels, seed, cfg.task_style, template)
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


class StageTrainer:
    """What the SFT and GRPO trainers share: the stage's model (from its latest checkpoint when there is
    one, else `init_model`), its checkpoints and its metrics log. Subclasses set state, optimizer and
    scheduler."""

    kind = ""

    def __init__(
        self,
        stage: StageConfig,
        output_dir: str | Path,
        *,
        init_model: str | Path,
        seed: int = 0,
        logging_config: LoggingConfig | None = None,
        accelerator: Accelerator | None = None,
    ):
        if stage.kind != self.kind:
            raise ValueError(f"stage {stage.name!r} is a {stage.kind} stage, not {self.kind}")
        self.stage = stage
        self.output_dir = Path(output_dir)
        self.init_model = init_model
        self.seed = seed
        self.logging_config = logging_config or LoggingConfig()
        self.accelerator = accelerator or Accelerator()
        self.resume_from = latest_checkpoint(self.output_dir)
        self.model, self.tokenizer = load_stage_model(stage, self.resume_from or init_model, seed)
        self.tags = TagIds.from_tokenizer(self.tokenizer)

    def save(self) -> Path:
        return save_checkpoint(
            self.output_dir,
            self.state,
            accelerator=self.accelerator,
            model=self.model,
            tokenizer=self.tokenizer,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            keep_last=self.stage.keep_last,
        )

    def finish(self, last_saved: int) -> Path:
        """Save the last step unless it was just saved, mark the stage done, and wait for every process."""
        final = self.save() if last_saved != self.state.step else latest_checkpoint(self.output_dir)
        if self.accelerator.is_main_process:
            mark_done(self.output_dir, final)
        self.accelerator.wait_for_everyone()
        return final

    def open_metrics(self) -> MetricsLogger:
        lc = self.logging_config
        return MetricsLogger(
            self.output_dir,
            resume_step=self.state.step,
            tensorboard=lc.tensorboard,
            wandb=lc.wandb,
            wandb_project=lc.wandb_project,
            run_name=f"{self.output_dir.parent.name}/{self.stage.name}",
            enabled=self.accelerator.is_main_process,
        )


class SFTTrainer(StageTrainer):
    """Runs one SFT stage into `output_dir`, resuming from its latest checkpoint if there is one."""

    kind = "sft"

    def __init__(self, stage: StageConfig, output_dir: str | Path, **kwargs):
        super().__init__(stage, output_dir, **kwargs)
        self.cfg = stage.sft
        resume, seed = self.resume_from, self.seed

        records = load_records(stage, seed)
        train_idx, eval_idx = split_eval(len(records), stage.data.eval_size, seed)
        encode = lambda r: encode_record(self.tokenizer, r.prompt, r.response, self.cfg.max_length)  # noqa: E731
        self.train_examples = [encode(records[i]) for i in train_idx]
        self.eval_examples = [encode(records[i]) for i in eval_idx]
        check_truncation(self.train_examples, stage)
        self.global_batch = self.cfg.batch_size * self.accelerator.num_processes
        num_batches = math.ceil(len(self.train_examples) / self.global_batch)
        self.steps_per_epoch = math.ceil(num_batches / self.cfg.grad_accum)
        self.total_steps = stage.max_steps or self.cfg.epochs * self.steps_per_epoch

        self.optimizer = build_optimizer(self.model, stage)
        self.scheduler = build_scheduler(self.optimizer, stage, self.total_steps)
        # The scheduler is stepped by hand once per optimiser step, so it is not handed to `prepare`.
        self.model, self.optimizer = self.accelerator.prepare(self.model, self.optimizer)
        self.state = TrainerState(data_seed=seed)
        if resume is not None:
            self.state = load_checkpoint(
                resume, accelerator=self.accelerator, optimizer=self.optimizer, scheduler=self.scheduler
            )
            log.info("resuming %s from %s (step %d)", stage.name, resume.name, self.state.step)

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

    def train(self) -> Path:
        """Train to `total_steps`, checkpointing on the way; returns the final model folder."""
        acc, stage, lc = self.accelerator, self.stage, self.logging_config
        main = acc.is_main_process
        metrics = self.open_metrics()
        progress, task = make_progress(self.total_steps, self.state.step, f"sft {stage.name}", main and lc.progress)
        last_saved = self.state.step if self.resume_from is not None else -1
        with progress:
            while self.state.step < self.total_steps:
                start = time.perf_counter()
                batches = self._next_step_batches()
                record = self.train_step(batches)
                self.state.step += 1
                step = self.state.step
                record.update(
                    lr=self.scheduler.get_last_lr()[0],
                    epoch=self.state.epoch,
                    tokens_per_s=record["tokens"] / (time.perf_counter() - start),
                    data_indices=[i for b in batches for i in b],
                )
                if self.eval_examples and (
                    (stage.eval_every and step % stage.eval_every == 0) or step == self.total_steps
                ):
                    record["eval_loss"] = self.evaluate()
                metrics.log(step, record)
                progress.update(task, completed=step, info=f"loss {record['loss']:.3f}")
                if step % stage.log_every == 0 and not lc.progress:
                    log.info("sft %s step %d/%d loss %.4f", stage.name, step, self.total_steps, record["loss"])
                if stage.save_every and step % stage.save_every == 0:
                    self.save()
                    last_saved = step
        final = self.finish(last_saved)
        metrics.close()
        return final
