"""Checkpoints a killed run resumes from exactly.

One folder per checkpoint, `<stage dir>/checkpoint-<step:06d>/`, holding

* the model and tokenizer in Hugging Face format (`from_pretrained` loads the folder directly),
* `optimizer.pt`, `scheduler.pt`,
* `rng_state_<process>.pt`: Python, NumPy and torch (CPU and CUDA) generator states of each process,
* `trainer_state.json`: the step count and the data position (epoch, index in the epoch, the seed of
  the sampler's permutation), which is all a trainer needs to continue with the next unseen example.

A checkpoint is written into `checkpoint-<step>.tmp` and renamed when complete, so a kill at any moment
leaves either the whole checkpoint or none; `latest_checkpoint` ignores unfinished folders.

Optimizer state is saved with `optimizer.state_dict()` from the main process: right for one process
and for DDP. Sharded set-ups (FSDP, DeepSpeed ZeRO) keep optimizer shards per process; see
docs/training.md for how they are launched.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

PREFIX = "checkpoint-"
STATE_FILE = "trainer_state.json"
_NAME_RE = re.compile(rf"^{PREFIX}(\d+)$")


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


def capture_rng() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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

    Every process must call it (gathering a sharded model's weights is a collective operation).
    """
    directory = Path(directory)
    final = directory / f"{PREFIX}{state.step:06d}"
    tmp = final.with_name(final.name + ".tmp")
    main = accelerator.is_main_process
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    state_dict = accelerator.get_state_dict(model)
    torch.save(capture_rng(), tmp / f"rng_state_{accelerator.process_index}.pt")
    if main:
        accelerator.unwrap_model(model).save_pretrained(tmp, state_dict=state_dict)
        tokenizer.save_pretrained(tmp)
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        # Written last: `list_checkpoints` only counts folders that have it.
        (tmp / STATE_FILE).write_text(json.dumps(asdict(state), indent=2))
    accelerator.wait_for_everyone()
    if main:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(directory)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        log.info("saved %s", final)
    accelerator.wait_for_everyone()
    return final


def load_trainer_state(path: str | Path) -> TrainerState:
    return TrainerState(**json.loads((Path(path) / STATE_FILE).read_text()))


def load_checkpoint(path: str | Path, *, accelerator, optimizer, scheduler) -> TrainerState:
    """Restore optimizer, scheduler and this process's RNG from `path`; return its TrainerState.

    The model's weights are not touched here: trainers build the model from the checkpoint folder
    (it is a Hugging Face model folder) before handing it to the accelerator.
    """
    path = Path(path)
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    rng_file = path / f"rng_state_{accelerator.process_index}.pt"
    if rng_file.is_file():
        # Python's and NumPy's generator states are tuples/arrays, not plain tensors.
        restore_rng(torch.load(rng_file, weights_only=False))
    else:
        log.warning("%s has no RNG state for process %d (different process count?)", path, accelerator.process_index)
    return load_trainer_state(path)
