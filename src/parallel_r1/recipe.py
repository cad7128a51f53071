"""Run a recipe: its stages in order, each from the previous stage's final model, resumable.

Layout of a run directory::

    <run dir>/recipe.yaml            the recipe as run (after --set overrides)
    <run dir>/00-<stage>/            one folder per stage: checkpoints, metrics.jsonl, rollouts.jsonl
    <run dir>/00-<stage>/DONE        written when the stage finished; names its final checkpoint

Running the same recipe on the same run directory again resumes: finished stages are skipped, an
unfinished one continues from its latest checkpoint. `run_recipe` returns a `StageResult` per stage, the
skipped ones included, so that its callers need not look into the folder for what a stage did.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from parallel_r1.config import Recipe, dump_recipe, parse_recipe
from parallel_r1.files import atomic_write_text, read_jsonl
from parallel_r1.grpo import GRPOTrainer
from parallel_r1.layout import METRICS_FILE, RECIPE_FILE, stage_dir
from parallel_r1.sft import SFTTrainer
from parallel_r1.trainer import final_model, make_accelerator, stage_is_done

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StageResult:
    """What one stage of a recipe produced."""

    name: str
    kind: str
    folder: Path  # the stage's folder (checkpoints, metrics, rollouts)
    model: Path  # its final model (a checkpoint folder inside `folder`)
    seconds: float | None  # time it trained in this call; None: it had finished before and was skipped
    metrics: dict | None  # its last metrics row (the last step's), None when it logged no step

    @property
    def skipped(self) -> bool:
        return self.seconds is None


def _last_metrics(folder: Path) -> dict | None:
    path = folder / METRICS_FILE
    rows = read_jsonl(path, allow_cut_last_line=True) if path.is_file() else []
    return rows[-1] if rows else None


def _record_recipe(recipe: Recipe, run_dir: Path) -> None:
    path = run_dir / RECIPE_FILE
    text = dump_recipe(recipe)
    if path.is_file() and parse_recipe(path.read_text(), str(path)) != recipe:
        log.warning("%s holds a different recipe than this run's; resuming with the new one", path)
    atomic_write_text(path, text)


def run_recipe(recipe: Recipe, run_dir: str | Path) -> list[StageResult]:
    """Run (or resume) every stage of `recipe` in `run_dir`; return what each stage produced, in order (the
    last one's `model` is the recipe's final model)."""
    run_dir = Path(run_dir)
    accelerator = make_accelerator()
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        _record_recipe(recipe, run_dir)
    accelerator.wait_for_everyone()
    results: list[StageResult] = []
    for i, stage in enumerate(recipe.stages):
        out = stage_dir(run_dir, i, stage.name)
        if stage_is_done(out):
            model, seconds = final_model(out), None
            log.info("stage %s already finished (%s)", stage.name, model.name)
        else:
            init = stage.model.name_or_path or (results[-1].model if results else None)
            log.info(
                "stage %d/%d: %s (%s, %s) from %s",
                i + 1,
                len(recipe.stages),
                stage.name,
                stage.kind,
                stage.variant,
                init,
            )
            started = time.time()
            trainer_cls = SFTTrainer if stage.kind == "sft" else GRPOTrainer
            trainer = trainer_cls(
                stage,
                out,
                init_model=init,
                seed=recipe.stage_seed(stage),
                logging_config=recipe.logging,
                accelerator=accelerator,
            )
            model = trainer.train()
            del trainer
            seconds = round(time.time() - started, 1)
        results.append(StageResult(stage.name, stage.kind, out, model, seconds, _last_metrics(out)))
    return results
