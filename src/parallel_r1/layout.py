"""Where a run's files go, in one place: the trainers, the recipe runner, `parallel-r1 run`, the study and the
reports all take these names from here.

    <recipe run>/recipe.yaml                 the recipe as run (`recipe.run_recipe`)
    <recipe run>/NN-<stage>/                 one folder per stage: checkpoints, metrics.jsonl, rollouts.jsonl
    <recipe run>/NN-<stage>/DONE             written when the stage finished; names its final checkpoint
    <recipe run>/eval/NN-<stage>.json        held-out evaluation after the stage (`evaluate.write_results`)
    <run>/run.json, report.html, summary.json, figures/      `parallel-r1 run` (`pipeline`, `report`)
    <study>/study.json, report.html, summary.json, figures/  `parallel-r1 study` (`study`, `report`)
"""

from __future__ import annotations

import re
from pathlib import Path

RECIPE_FILE = "recipe.yaml"
DONE_FILE = "DONE"
METRICS_FILE = "metrics.jsonl"  # a stage's metrics, one row a step (`metrics.MetricsLogger`)
EVAL_DIR = "eval"
RUN_FILE = "run.json"
STUDY_FILE = "study.json"
REPORT_FILE = "report.html"
SUMMARY_FILE = "summary.json"
FIGURES_DIR = "figures"
STAGE_DIR = re.compile(r"^(\d+)-(.+)$")


def stage_dir(run_dir: str | Path, index: int, name: str) -> Path:
    """The folder of stage number `index` (from 0) called `name`."""
    return Path(run_dir) / f"{index:02d}-{name}"


def eval_file(recipe_dir: str | Path, stage_folder: str | Path) -> Path:
    """Where the held-out evaluation after a stage goes."""
    return Path(recipe_dir) / EVAL_DIR / f"{Path(stage_folder).name}.json"
