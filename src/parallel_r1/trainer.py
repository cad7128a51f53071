"""What the SFT and GRPO trainers share: the stage's model, optimiser and schedule, checkpoints, the metrics
log, the training loop, and the DONE file that marks a finished stage.

A trainer (`sft.SFTTrainer`, `grpo.GRPOTrainer`) is a `StageTrainer` that

1. calls `StageTrainer.__init__` (the model, from the stage's latest checkpoint when there is one), builds
   its data, then calls `prepare(total_steps)` (optimiser, schedule, accelerator) and `resume()` (the
   checkpoint's optimiser, schedule, RNG and data position);
2. implements `step()`: one training step, returning its metrics and any rollout records to log, and
   `describe(metrics)`: the short text the progress bar and the console show.

`train()` then runs the steps to `total_steps`, logging and checkpointing on the way, and marks the stage
done. A stage folder whose DONE file exists is finished; the file names its final checkpoint.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedType
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from transformers import get_scheduler

from parallel_r1.checkpoint import TrainerState, latest_checkpoint, load_checkpoint, save_checkpoint
from parallel_r1.config import LoggingConfig, StageConfig
from parallel_r1.files import JsonlWriter, atomic_write_text
from parallel_r1.format import TagIds
from parallel_r1.layout import DONE_FILE
from parallel_r1.metrics import MetricsLogger
from parallel_r1.models import TINY, load_model_and_tokenizer
from parallel_r1.settings import ConfigError

log = logging.getLogger(__name__)

ROLLOUTS_FILE = "rollouts.jsonl"


# ---------------------------------------------------------------------------------------------------
# The DONE protocol.


def stage_is_done(directory: str | Path) -> bool:
    return (Path(directory) / DONE_FILE).is_file()


def final_model(directory: str | Path) -> Path:
    """The model folder a finished stage hands to the next one (its last checkpoint)."""
    directory = Path(directory)
    if not stage_is_done(directory):
        raise FileNotFoundError(f"stage folder {directory} has no finished run ({DONE_FILE} is missing)")
    return directory / (directory / DONE_FILE).read_text().strip()


def mark_done(directory: Path, checkpoint: Path) -> None:
    atomic_write_text(directory / DONE_FILE, checkpoint.name + "\n")


# ---------------------------------------------------------------------------------------------------
# Builders.


def _has_accelerator_device() -> bool:
    if hasattr(torch, "accelerator"):
        return torch.accelerator.is_available()
    return torch.cuda.is_available()


def _uses_deepspeed(kwargs: dict) -> bool:
    # `accelerate launch --use_deepspeed` says so through this variable, as does an `Accelerator` given a plugin.
    flag = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    return flag or kwargs.get("deepspeed_plugin") is not None


class StageAccelerator(Accelerator):
    """accelerate's `Accelerator`, with `no_sync` meaning under DeepSpeed what it means under DDP.

    The trainers run a step's micro-batches but the last under `no_sync` and step the optimizer after the last.
    Under DeepSpeed accelerate runs the optimizer step inside `backward` whenever `sync_gradients` is set, and
    its `no_sync` does nothing under ZeRO-2/3, so every micro-batch would take an optimizer step. Here `no_sync`
    clears `sync_gradients` instead, which marks the backward as inside a gradient-accumulation window: the
    engine accumulates, and steps (clipping first) in the last micro-batch's backward."""

    @contextmanager
    def no_sync(self, model):
        if self.distributed_type != DistributedType.DEEPSPEED:
            with super().no_sync(model):
                yield
            return
        self.gradient_state._set_sync_gradients(False)
        try:
            yield
        finally:
            self.gradient_state._set_sync_gradients(True)


def make_accelerator(**kwargs) -> Accelerator:
    """The run's `Accelerator`. Several processes on a machine without GPUs (`torchrun --nproc_per_node 2`,
    `accelerate launch --multi_gpu --num_processes 2`) run data parallel on the CPU over gloo: accelerate
    only does that when told `cpu=True`, so that is set when WORLD_SIZE > 1 and no accelerator device exists.
    (`accelerate launch --cpu --num_processes 2` starts a single process unless MPI is set up:
    docs/training.md.)

    DeepSpeed on such a machine (`accelerate launch --use_deepspeed`): accelerate 1.16 then starts DeepSpeed's
    process group but, finding no device, records one process of rank 0 on every process, and `cpu=True`
    would turn DeepSpeed off. The CPU process state (gloo, the launcher's ranks) is set up first instead, and
    the DeepSpeed state builds on it."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not _has_accelerator_device():
        if _uses_deepspeed(kwargs):
            PartialState(cpu=True)
        else:
            kwargs.setdefault("cpu", True)
    return StageAccelerator(**kwargs)


def configure_deepspeed(accelerator: Accelerator, stage: StageConfig) -> None:
    """Set the DeepSpeed config entries that the trainers' loop decides, before `prepare` starts the engine.

    The trainers batch, shard and accumulate on their own (`sft.batch_size`, `grad_accum`, GRPO's micro-batches)
    and mark the last micro-batch (`StageAccelerator.no_sync`): to DeepSpeed each backward is one sample per
    process with no accumulation, so no loss is divided by its accumulation steps. DeepSpeed clips inside its
    step, which runs in the last backward, before the trainer's `clip_gradients` (which then reads the norm):
    the stage's `max_grad_norm` goes into the config. The stage's optimizer is torch's AdamW, also with an
    offloaded optimizer (DeepSpeedCPUAdam is a compiled op). ZeRO-3 gathers the weights for the checkpoint's
    Hugging Face folder."""
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    config["train_micro_batch_size_per_gpu"] = 1
    config["gradient_accumulation_steps"] = 1
    config["train_batch_size"] = accelerator.num_processes
    config["gradient_clipping"] = float(stage.max_grad_norm)
    config["zero_force_ds_cpu_optimizer"] = False
    zero = config.setdefault("zero_optimization", {})
    if zero.get("stage") == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
        refused = zero3_grpo_gaps(stage) if stage.kind == "grpo" else []
        if refused:
            # A recipe setting the launch cannot serve: an input error (one `error:` line), not a bug.
            raise ConfigError(
                f"stage {stage.name!r}: under DeepSpeed ZeRO-3 GRPO samples with the hf backend from the gathered "
                f"weights (trainer.full_weights), but {'; '.join(refused)}. Run the stage with ZeRO-2 "
                "(accelerate launch --use_deepspeed --zero_stage 2) or turn the setting off"
            )


def zero3_grpo_gaps(stage: StageConfig) -> list[str]:
    """The GRPO settings that read a ZeRO-3 model's weights outside `full_weights` (each says where)."""
    grpo = stage.grpo
    gaps = {
        "rollout.backend vllm loads the weights from get_state_dict, which ZeRO-3 gathers on the main process "
        "alone": grpo.rollout.backend == "vllm",
        "kl_coef > 0 loads the reference model sharded (zero.Init) with no engine to gather it": grpo.kl_coef > 0,
    }
    return [gap for gap, on in gaps.items() if on]


@contextmanager
def full_weights(accelerator: Accelerator, model):
    """Every process holds the full weights of `model` (as handed to `prepare`) inside the block.

    The hf rollout engine reads weights directly (the vocabulary from the output embedding) and runs its own
    number of forwards on each process. ZeRO-3 keeps each process's shard only and gathers a module's weights
    in hooks around its forward, a collective that would need the same forwards on every process: here the
    weights are gathered once for the block and those hooks taken off, then put back (what TRL's
    `unwrap_model_for_generation` does). Any other set-up holds the full weights already."""
    plugin = accelerator.state.deepspeed_plugin if accelerator.distributed_type == DistributedType.DEEPSPEED else None
    if plugin is None or plugin.zero_stage != 3:
        yield
        return
    import deepspeed

    offload = model.optimizer.parameter_offload
    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        for param in offload.module.parameters():
            param.ds_active_sub_modules.clear()
        for hook in offload.forward_hooks + offload.backward_hooks:
            hook.remove()
        offload.forward_hooks, offload.backward_hooks = [], []
        try:
            yield
        finally:
            offload._register_deepspeed_module(offload.module)


def load_stage_model(stage: StageConfig, source: str | Path, seed: int):
    """(model, tokenizer) for `stage` from `source`: a preset, a model folder or a checkpoint folder."""
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
    name = "constant_with_warmup" if stage.lr_schedule == "constant" else stage.lr_schedule
    return get_scheduler(name, optimizer, num_warmup_steps=stage.warmup_steps, num_training_steps=total_steps)


def clip_gradients(accelerator: Accelerator, model: torch.nn.Module, max_norm: float) -> float:
    """Clip to `max_norm` (0: no clipping) and return the norm before clipping."""
    limit = max_norm if max_norm > 0 else float("inf")
    return float(accelerator.clip_grad_norm_(model.parameters(), limit))


MODEL_ATTRIBUTES = ("config", "dtype", "is_gradient_checkpointing")


def expose_model_attributes(wrapped: torch.nn.Module, model: torch.nn.Module) -> None:
    """Give a wrapper (DDP) the attributes of the model it wraps that the scoring code reads (`config`, `dtype`,
    gradient checkpointing): the forward must go through the wrapper, which syncs gradients, but
    `attention.response_logprobs` picks the mask and kernel from the model's config."""
    if wrapped is model:
        return
    for name in MODEL_ATTRIBUTES:
        try:
            getattr(wrapped, name)
        except AttributeError:
            if hasattr(model, name):
                object.__setattr__(wrapped, name, getattr(model, name))


def make_progress(total: int, completed: int, description: str, enabled: bool):
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
# The trainer base.


class StageTrainer:
    """Runs one stage of kind `kind` into `output_dir`, resuming from its latest checkpoint if there is one
    (the module docstring says what a subclass provides)."""

    kind = ""
    logs_rollouts = False  # whether step() returns rollout records (written to rollouts.jsonl)

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
        self.accelerator = accelerator or make_accelerator()
        self.resume_from = latest_checkpoint(self.output_dir)
        self.model, self.tokenizer = load_stage_model(stage, self.resume_from or init_model, seed)
        self.tags = TagIds.from_tokenizer(self.tokenizer)

    def prepare(self, total_steps: int) -> None:
        """The optimiser and a schedule over `total_steps`; model and optimiser handed to the accelerator."""
        self.total_steps = total_steps
        # One accelerator runs every stage of a recipe: drop the previous stage's model and optimizer from
        # it, so that `save_state` saves this stage's only.
        self.accelerator.free_memory()
        self.optimizer = build_optimizer(self.model, self.stage)
        self.scheduler = build_scheduler(self.optimizer, self.stage, total_steps)
        if self.accelerator.distributed_type == DistributedType.DEEPSPEED:
            configure_deepspeed(self.accelerator, self.stage)
        # The scheduler is stepped by hand once per optimiser step, so it is not handed to `prepare`.
        self.model, self.optimizer = self.accelerator.prepare(self.model, self.optimizer)
        expose_model_attributes(self.model, self.accelerator.unwrap_model(self.model))

    def resume(self) -> None:
        """Restore the latest checkpoint's optimiser, schedule, RNG, data position (and a sharded model's
        shards: `checkpoint.load_checkpoint`); else start at step 0."""
        self.state = TrainerState(data_seed=self.seed)
        if self.resume_from is not None:
            self.state = load_checkpoint(
                self.resume_from, accelerator=self.accelerator, optimizer=self.optimizer, scheduler=self.scheduler
            )
            log.info("resuming %s from %s (step %d)", self.stage.name, self.resume_from.name, self.state.step)

    def step(self) -> tuple[dict, list[dict]]:
        """Run training step `self.state.step` (0-based); return (metrics, rollout records)."""
        raise NotImplementedError

    def describe(self, metrics: dict) -> str:
        """A short summary of a step's metrics for the progress bar."""
        raise NotImplementedError

    def train(self) -> Path:
        """Train to `total_steps`, checkpointing on the way; returns the final model folder."""
        acc, stage, lc = self.accelerator, self.stage, self.logging_config
        main = acc.is_main_process
        metrics_log = self.open_metrics()
        rollout_log = JsonlWriter(self.output_dir / ROLLOUTS_FILE, self.state.step, enabled=main and self.logs_rollouts)
        description = f"{self.kind} {stage.name}"
        progress, task = make_progress(self.total_steps, self.state.step, description, main and lc.progress)
        last_saved = self.state.step if self.resume_from is not None else -1
        with progress:
            while self.state.step < self.total_steps:
                metrics, rollouts = self.step()
                self.state.step += 1
                step = self.state.step
                metrics_log.log(step, metrics)
                for record in rollouts:
                    rollout_log.write(record)
                info = self.describe(metrics)
                progress.update(task, completed=step, info=info)
                if main and step % stage.log_every == 0 and not lc.progress:
                    log.info("%s step %d/%d %s", description, step, self.total_steps, info)
                if stage.save_every and step % stage.save_every == 0:
                    self.save()
                    last_saved = step
        final = self.finish(last_saved)
        metrics_log.close()
        rollout_log.close()
        return final

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
