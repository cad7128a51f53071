"""Run a recipe: its stages in order, each from the previous stage's final model, resumable.

Layout of a run directory::

    <run dir>/recipe.yaml            the recipe as run (after --set overrides)
    <run dir>/00-<stage>/            one folder per stage: checkpoints, metrics.jsonl, rollouts.jsonl
    <run dir>/00-<stage>/DONE        written when the stage finished; names its final checkpoint

Running the same recipe on the same run directory again resumes: finished stages are skipped, an
unfinished one continues from its latest checkpoint.
"""

from __future__ import annotations

import logging
from pathlib import Path

from parallel_r1.config import Recipe, dump_recipe, parse_recipe
from parallel_r1.files import atomic_write_text
from parallel_r1.grpo import GRPOTrainer
from parallel_r1.layout import RECIPE_FILE, stage_dir
from parallel_r1.sft import SFTTrainer
from parallel_r1.trainer import final_model, make_accelerator, stage_is_done

log = logging.getLogger(__name__)


def _record_recipe(recipe: Recipe, run_dir: Path) -> None:
    path = run_dir / RECIPE_FILE
    text = dump_recipe(recipe)
    if path.is_file() and parse_recipe(path.read_text(), str(path)) != recipe:
        log.warning("%s holds a different recipe than this run's; resuming with the new one", path)
    atomic_write_text(path, text)


def run_recipe(recipe: Recipe, run_dir: str | Path) -> Path:
    """Run (or resume) every stage of `recipe` in `run_dir`; return the last stage's final model folder."""
    run_dir = Path(run_dir)
    accelerator = make_accelerator()
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        _record_recipe(recipe, run_dir)
    accelerator.wait_for_everyone()
    previous: Path | None = None
    for i, stage in enumerate(recipe.stages):
        out = stage_dir(run_dir, i, stage.name)
        if stage_is_done(out):
            previous = final_model(out)
            log.info("stage %s already finished (%s)", stage.name, previous.name)
            continue
        init = stage.model.name_or_path or previous
        log.info(
            "stage %d/%d: %s (%s, %s) from %s", i + 1, len(recipe.stages), stage.name, stage.kind, stage.variant, init
        )
        trainer_cls = SFTTrainer if stage.kind == "sft" else GRPOTrainer
        trainer = trainer_cls(
            stage,
            out,
            init_model=init,
            seed=recipe.stage_seed(stage),
            logging_config=recipe.logging,
            accelerator=accelerator,
        )
        previous = trainer.train()
        del trainer
    return previous
