"""Checkpoints a killed run resumes from exactly, with one process, several (DDP) or a sharded model.

One folder per checkpoint, `<stage dir>/checkpoint-<step:06d>/`, holding

* the model and tokenizer in Hugging Face format (`from_pretrained` loads the folder directly), written
  by the main process from the gathered state dict (`accelerator.get_state_dict`), so a sharded (FSDP,
  DeepSpeed ZeRO) model is still saved as one plain model folder;
* `accelerator/`: what `accelerator.save_state` writes: the optimizer state (one `optimizer.bin`, or the
  shards of an FSDP/DeepSpeed optimizer, each process its own), the RNG state of every process
  (`random_states_<process>.pkl`: Python, NumPy, torch CPU and CUDA), and, for sharded set-ups only,
  the model's own shards (without sharding the Hugging Face folder above holds the very same weights,
  so they are not written twice);
* `scheduler.pt`: the learning-rate schedule (identical on every process; it is stepped by hand once
  per optimiser step, so it is not handed to `accelerator.prepare`);
* `trainer_state.json`: the step count and the data position (epoch, index in the epoch, the seed of
  the sampler's permutation), which is all a trainer needs to continue with the next unseen example,
  and the process count and distributed type that wrote the checkpoint.

A checkpoint is written into `checkpoint-<step>.tmp` and renamed when complete, so a kill at any moment
leaves either the whole checkpoint or none; `latest_checkpoint` ignores unfinished folders.

Resuming: the trainer builds the model from the checkpoint's Hugging Face folder, hands it and a fresh
optimizer to the accelerator, then `load_checkpoint` restores optimizer, schedule, RNG (and a sharded
model's shards) through `accelerator.load_state`. Checkpoints of the first format (`optimizer.pt`,
`rng_state_<process>.pt`, written by `optimizer.state_dict()` on the main process) still resume a
single-process or DDP run; a sharded run refuses them with a message that says why.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

PREFIX = "checkpoint-"
STATE_FILE = "trainer_state.json"
ACCELERATOR_DIR = "accelerator"
SCHEDULER_FILE = "scheduler.pt"
LEGACY_OPTIMIZER_FILE = "optimizer.pt"
FORMAT = 2
_NAME_RE = re.compile(rf"^{PREFIX}(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint that this run cannot resume from (the message says why and what to do)."""


@dataclass
class TrainerState:
    """Where a trainer is: steps done and the next data position."""

    step: int = 0
    """Steps completed (optimiser steps for SFT, training steps for GRPO)."""
    epoch: int = 0
    """Current pass over the data."""
    index: int = 0
    """Next batch (SFT) or prompt (GRPO) of the current epoch's order."""
    data_seed: int = 0
    """Seed of the sampler: epoch e's order is a permutation drawn from (data_seed, e)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Trainer-specific values (e.g. the best eval loss)."""


def checkpoint_step(path: str | Path) -> int | None:
    match = _NAME_RE.match(Path(path).name)
    return int(match.group(1)) if match else None


def list_checkpoints(directory: str | Path) -> list[Path]:
    """Complete checkpoints in `directory`, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if p.is_dir() and checkpoint_step(p) is not None]
    found = [p for p in found if (p / STATE_FILE).is_file()]
    return sorted(found, key=checkpoint_step)


def latest_checkpoint(directory: str | Path) -> Path | None:
    """The newest complete checkpoint in `directory`, or None."""
    found = list_checkpoints(directory)
    return found[-1] if found else None


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def is_sharded(accelerator) -> bool:
    """Whether model and optimizer are sharded over processes (FSDP, DeepSpeed, Megatron-LM)."""
    return str(accelerator.distributed_type).split(".")[-1] in ("FSDP", "DEEPSPEED", "MEGATRON_LM")


def _skip_full_weights(models: list, weights: list | None = None, *_) -> None:
    # `save_state` hands its hooks the list of full model state dicts it is about to write (empty for
    # sharded models, which it saves by their own route); `load_state` the list of models it is about
    # to load full weights into. Both are the Hugging Face folder's weights: nothing to write or read.
    (weights if weights is not None else models).clear()


def save_model_folder(model, state_dict: dict, folder: Path, *, sharded: bool) -> None:
    """A Hugging Face model folder from a full `state_dict` (on the main process only).

    A sharded model's own `save_pretrained` reads its parameters (DTensors under FSDP2) to find tied
    weights, a collective the other processes do not join: the folder is then written from the gathered
    state dict and the config alone, without touching the model."""
    if not sharded:
        model.save_pretrained(folder, state_dict=state_dict)
        return
    from huggingface_hub import save_torch_state_dict

    state_dict = dict(state_dict)
    output = model.get_output_embeddings() if getattr(model.config, "tie_word_embeddings", False) else None
    for name, module in model.named_modules() if output is not None else ():
        if module is output:
            state_dict.pop(f"{name}.weight", None)  # tied to the input embeddings, as save_pretrained leaves it
    model.config.save_pretrained(folder)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)
    save_torch_state_dict({k: v.contiguous() for k, v in state_dict.items()}, folder)


def save_checkpoint(
    directory: str | Path,
    state: TrainerState,
    *,
    accelerator,
    model,
    tokenizer,
    optimizer,
    scheduler,
    keep_last: int = 2,
) -> Path:
    """Write checkpoint-<state.step> into `directory` atomically and keep only the newest `keep_last`.

    Every process must call it (gathering a sharded model's weights and saving a sharded optimizer are
    collective operations). `model` and `optimizer` are the ones handed to `accelerator.prepare` (the
    accelerator saves the optimizers it prepared).
    """
    if not any(o is optimizer or getattr(o, "optimizer", None) is optimizer for o in accelerator._optimizers):
        raise ValueError("save_checkpoint: hand the optimizer to accelerator.prepare first (save_state saves those)")
    directory = Path(directory)
    final = directory / f"{PREFIX}{state.step:06d}"
    tmp = final.with_name(final.name + ".tmp")
    main = accelerator.is_main_process
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    state_dict = accelerator.get_state_dict(model)
    if main:
        save_model_folder(accelerator.unwrap_model(model), state_dict, tmp, sharded=is_sharded(accelerator))
        tokenizer.save_pretrained(tmp)
        torch.save(scheduler.state_dict(), tmp / SCHEDULER_FILE)
    del state_dict
    handle = accelerator.register_save_state_pre_hook(lambda models, weights, _dir: _skip_full_weights(models, weights))
    try:
        accelerator.save_state(str(tmp / ACCELERATOR_DIR))
    finally:
        handle.remove()
    accelerator.wait_for_everyone()
    if main:
        meta = {
            "format": FORMAT,
            "num_processes": accelerator.num_processes,
            "distributed_type": str(accelerator.distributed_type).split(".")[-1],
        }
        # Written last: `list_checkpoints` only counts folders that have it.
        (tmp / STATE_FILE).write_text(json.dumps({**asdict(state), **meta}, indent=2))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(directory)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        log.info("saved %s", final)
    accelerator.wait_for_everyone()
    return final


def checkpoint_info(path: str | Path) -> dict[str, Any]:
    """trainer_state.json of a checkpoint as written (the TrainerState fields and the run's metadata)."""
    return json.loads((Path(path) / STATE_FILE).read_text())


def load_trainer_state(path: str | Path) -> TrainerState:
    names = {f.name for f in fields(TrainerState)}
    return TrainerState(**{k: v for k, v in checkpoint_info(path).items() if k in names})


def load_checkpoint(path: str | Path, *, accelerator, optimizer, scheduler) -> TrainerState:
    """Restore optimizer, scheduler, RNG (and a sharded model's shards) from `path`; return its TrainerState.

    Call it after `accelerator.prepare(model, optimizer)`, on every process. Full model weights are not
    read here: trainers build the model from the checkpoint folder (a Hugging Face model folder) before
    handing it to the accelerator.
    """
    path = Path(path)
    info = checkpoint_info(path)
    if (path / ACCELERATOR_DIR).is_dir():
        saved_by = info.get("distributed_type", "?")
        if is_sharded(accelerator) != (saved_by in ("FSDP", "DEEPSPEED", "MEGATRON_LM")):
            raise CheckpointError(
                f"{path} was written by a {saved_by} run and this run is "
                f"{str(accelerator.distributed_type).split('.')[-1]}: optimizer states of sharded and unsharded "
                "runs differ in layout; resume with the set-up that wrote it, or start the stage from its model "
                f"folder (model.name_or_path: {path}) in a new run folder"
            )
        if info.get("num_processes", accelerator.num_processes) != accelerator.num_processes:
            log.warning(
                "%s was written by %s processes, this run has %d: the optimizer and schedule resume exactly, "
                "the RNG streams of the processes do not",
                path,
                info.get("num_processes"),
                accelerator.num_processes,
            )
        handle = accelerator.register_load_state_pre_hook(lambda models, _dir: _skip_full_weights(models))
        try:
            accelerator.load_state(str(path / ACCELERATOR_DIR))
        finally:
            handle.remove()
        scheduler.load_state_dict(torch.load(path / SCHEDULER_FILE, weights_only=True))
        return load_trainer_state(path)
    if (path / LEGACY_OPTIMIZER_FILE).is_file():
        return _load_legacy(path, accelerator=accelerator, optimizer=optimizer, scheduler=scheduler)
    raise CheckpointError(
        f"{path} has neither {ACCELERATOR_DIR}/ nor {LEGACY_OPTIMIZER_FILE}: it is not a checkpoint this version "
        "can resume (delete it to resume from the one before, or start the stage from its model folder)"
    )


def _load_legacy(path: Path, *, accelerator, optimizer, scheduler) -> TrainerState:
    """A checkpoint of the first format: `optimizer.pt` (a full optimizer state dict from the main process),
    `scheduler.pt`, `rng_state_<process>.pt`."""
    if is_sharded(accelerator):
        raise CheckpointError(
            f"{path} is a checkpoint of the first format ({LEGACY_OPTIMIZER_FILE}: one unsharded optimizer state) "
            f"and this run is {str(accelerator.distributed_type).split('.')[-1]}, which shards the optimizer: "
            "resume it with one process or DDP (it then writes checkpoints of the current format), or start the "
            f"stage from its model folder (model.name_or_path: {path}) in a new run folder"
        )
    optimizer.load_state_dict(torch.load(path / LEGACY_OPTIMIZER_FILE, map_location="cpu", weights_only=True))
    scheduler.load_state_dict(torch.load(path / SCHEDULER_FILE, weights_only=True))
    rng_file = path / f"rng_state_{accelerator.process_index}.pt"
    if rng_file.is_file():
        # Python's and NumPy's generator states are tuples/arrays, not plain tensors.
        restore_rng(torch.load(rng_file, weights_only=False))
    else:
        log.warning("%s has no RNG state for process %d (different process count?)", path, accelerator.process_index)
    return load_trainer_state(path)
