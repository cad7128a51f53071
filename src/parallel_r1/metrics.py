"""Training metrics: a JSON Lines file always, tensorboard and Weights & Biases when asked."""

from __future__ import annotations

import numbers
from pathlib import Path
from typing import Any

from parallel_r1.files import JsonlWriter


class MetricsLogger:
    """One training stage's metrics: `metrics.jsonl` in `directory`, plus tensorboard/wandb if asked.

    `log(step, metrics)` writes every value to the JSONL (lists included, e.g. the data indices a step
    consumed) and the scalars to tensorboard/wandb. Only the main process should pass enabled=True.
    """

    def __init__(
        self,
        directory: str | Path,
        *,
        resume_step: int = 0,
        tensorboard: bool = False,
        wandb: bool = False,
        wandb_project: str = "parallel-r1",
        run_name: str | None = None,
        config: dict[str, Any] | None = None,
        enabled: bool = True,
    ):
        self.directory = Path(directory)
        self.jsonl = JsonlWriter(self.directory / "metrics.jsonl", resume_step, enabled)
        self._tb = None
        self._wandb = None
        if not enabled:
            return
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:
                raise ImportError("logging.tensorboard needs the tensorboard package: pip install tensorboard") from exc
            self._tb = SummaryWriter(str(self.directory / "tensorboard"), purge_step=resume_step + 1)
        if wandb:
            try:
                import wandb as wandb_lib
            except ImportError as exc:
                raise ImportError("logging.wandb needs the wandb package: pip install wandb") from exc
            self._wandb = wandb_lib.init(project=wandb_project, name=run_name, config=config, dir=str(self.directory))

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        self.jsonl.write({"step": step, **metrics})
        scalars = {k: float(v) for k, v in metrics.items() if isinstance(v, numbers.Real) and not isinstance(v, bool)}
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def close(self) -> None:
        self.jsonl.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
