"""`parallel-r1 run`: the whole method, from nothing, with the evidence of what it does.

The default run trains two recipes on the built-in search task with the same budget, the study's best
parallel arm against its sequential arm (docs/study.md):

* ``parallel`` (configs/tiny.yaml): SFT on the programmatic teacher's parallel solutions, then GRPO on
  easier problems with the parallel reward and on harder ones with the accuracy reward;
* ``sequential`` (configs/tiny_sequential.yaml): the same stages and budget, SFT on the teacher's plain
  solutions, the accuracy reward alone and blocks banned.

Each recipe goes through data generation, its stages (`recipe.run_recipe`) and an evaluation on held-out
problems after every stage; the report (`report.write_report`) then sets them side by side, with the
difference's standard error. Run folder (names in `layout`)::

    <run>/run.json                 recipes, evaluation settings, timings
    <run>/data/                    held-out problems and the SFT data of each recipe, as JSONL
    <run>/<label>/                 a run_recipe folder (recipe.yaml, NN-<stage>/...) and eval/NN-<stage>.json
    <run>/report.html, summary.json, figures/

Running again on the same folder resumes: finished stages and evaluations are kept.

`run_pretrained` is the small demonstration on a real model (SmolLM2-135M from PyPI): tags added,
embeddings resized, a few SFT steps on cold-start data (the built-in task's teacher solutions, or a file
of real teacher outputs), one parallel generation shown.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from pathlib import Path

import torch
from rich.console import Console

from parallel_r1 import tasks as builtin_task
from parallel_r1.backends import make_engine
from parallel_r1.config import (
    BASELINE_RECIPE,
    CONTROL_RECIPE,
    DEFAULT_RECIPE,
    ConfigError,
    Recipe,
    RolloutConfig,
    StageConfig,
    load_recipe,
    override,
    recipe_from_dict,
)
from parallel_r1.data import Problem, load_problems
from parallel_r1.evaluate import evaluate_benchmark, sample_record, write_results
from parallel_r1.files import atomic_write_text
from parallel_r1.layout import RUN_FILE, SUMMARY_FILE, eval_file
from parallel_r1.models import load_model_and_tokenizer
from parallel_r1.prompts import prompt_template, stage_prompt_format
from parallel_r1.recipe import StageResult, run_recipe
from parallel_r1.report import write_report
from parallel_r1.settings import SAMPLING_FIELDS, EvalConfig, EvalSettings, SamplingParams
from parallel_r1.viewer import render_html

log = logging.getLogger(__name__)

HELDOUT = "heldout"


@dataclass
class RecipeSpec:
    """One recipe of a run: its folder name and its YAML."""

    label: str
    path: Path


@dataclass
class RunResult:
    run_dir: Path
    report: Path
    summary: dict = field(default_factory=dict)


def default_specs(
    config: str | Path | None = None, baseline: str | Path | None = None, with_baseline: bool = True
) -> list[RecipeSpec]:
    """The parallel recipe, then (with the baseline) the same-script control and the sequential baseline: the
    control only when the parallel recipe is the default one, whose script it holds."""
    specs = [RecipeSpec("parallel", Path(config or DEFAULT_RECIPE))]
    if with_baseline:
        if config is None:
            specs.append(RecipeSpec("plain", CONTROL_RECIPE))
        specs.append(RecipeSpec("sequential", Path(baseline or BASELINE_RECIPE)))
    return specs


def default_run_dir() -> Path:
    return Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")


def load_spec(spec: RecipeSpec, overrides: list[str]) -> Recipe:
    """The recipe of `spec` with the overrides applied."""
    if not spec.path.is_file():
        raise ConfigError(f"{spec.path}: no such recipe file (see configs/ for recipes, or leave --config out)")
    return override(load_recipe(spec.path), list(overrides))


def recipe_task(recipe: Recipe) -> str:
    """The built-in task a recipe trains on (the first stage that uses one), "arith" when none does."""
    return next((s.data.task for s in recipe.stages if s.data.source == "task"), "arith")


def resolve_settings(settings: EvalSettings, recipe: Recipe) -> EvalSettings:
    """`settings` with its empty task and levels filled in from the recipe's built-in task."""
    name = settings.task or recipe_task(recipe)
    return replace(settings, task=name, levels=tuple(settings.levels or builtin_task.task_module(name).EVAL_LEVELS))


# ---------------------------------------------------------------------------------------------------
# Data generation.


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def write_sft_data(stage: StageConfig, seed: int, path: Path) -> Path:
    """The teacher's solutions for a task SFT stage, in its `data.task_style`, as {id, question, response,
    answer} rows: the same records the trainer would generate itself, written where one can read them."""
    cfg = stage.data
    examples = builtin_task.teacher_examples(
        cfg.limit or cfg.task_size, cfg.task_levels, seed, cfg.task_style, cfg.task
    )
    rows = [{"id": p.id, "question": p.question, "response": r, "answer": str(p.answer)} for p, r in examples]
    return _write_jsonl(path, rows)


def write_problems(settings: EvalSettings, path: Path, problems: list[Problem] | None = None) -> list[Problem]:
    """Write `problems` (default: `problems_per_level` held-out problems of each evaluated level of the
    settings' task) to `path` as JSONL and return them as read back."""
    if problems is None:
        problems = [
            p
            for level in settings.levels
            for p in builtin_task.make_eval_problems(
                settings.problems_per_level, (level,), settings.seed, settings.task
            )
        ]
    _write_jsonl(path, [{"id": p.id, "question": p.question, "answer": p.answer} for p in problems])
    return load_problems(str(path))


def materialize_data(recipe: Recipe, spec: RecipeSpec, data_dir: Path) -> Recipe:
    """Write the SFT data of every task SFT stage into the run folder; the stages then read those files.

    The trainers would generate the same records, but on disk the data of each run is something one
    can read, check with `parallel-r1 check` and reuse.
    """
    stages = []
    for stage in recipe.stages:
        if stage.kind == "sft" and stage.data.source == "task":
            path = data_dir / f"{spec.label}-{stage.name}.jsonl"
            write_sft_data(stage, recipe.stage_seed(stage), path)
            stage = replace(stage, data=replace(stage.data, source=str(path.resolve()), limit=None))
        stages.append(stage)
    return replace(recipe, stages=stages)


# ---------------------------------------------------------------------------------------------------
# Evaluation.


def eval_config(recipe: Recipe, variant: str, settings: EvalSettings, **changes) -> EvalConfig:
    """`settings.EvalConfig` for a held-out evaluation: the caps of the recipe's last GRPO stage, `variant`,
    the prompt the recipe trained with, and `changes` (e.g. max_blocks=0) on top."""
    grpo = [s for s in recipe.stages if s.kind == "grpo"]
    rollout = grpo[-1].grpo.rollout if grpo else RolloutConfig()
    knobs = {name: getattr(rollout, name) for name in SAMPLING_FIELDS}
    values = {
        **knobs,
        "temperature": settings.temperature,
        "k": settings.k,
        "seed": settings.seed,
        "variant": variant,
        "max_batch_size": settings.batch_size,
        "template": prompt_template(recipe.stages[-1].data.prompt),
        "chat_template": recipe.stages[-1].data.chat_template,
        "system_prompt": recipe.stages[-1].data.system_prompt,
    }
    return EvalConfig(**{**values, **changes})


def evaluate_model(
    model_dir: Path,
    recipe: Recipe,
    problems: list[Problem],
    settings: EvalSettings,
    name: str,
    out: Path,
    benchmark: str = HELDOUT,
    variant: str | None = None,
    **changes,
) -> dict:
    """Sample k responses per problem with the model in `model_dir`; write `evaluate` results to `out`.
    `variant` defaults to the recipe's last stage's; `changes` go to `eval_config`."""
    model, tokenizer = load_model_and_tokenizer(model_dir)
    engine = make_engine("hf", model, tokenizer, max_batch_size=settings.batch_size)
    config = eval_config(recipe, variant or recipe.stages[-1].variant, settings, **changes)
    result, records = evaluate_benchmark(engine, problems, config, name, benchmark)
    write_results(out, [result], records, config)
    return asdict(result)


# ---------------------------------------------------------------------------------------------------
# The run.


def _save_run_info(run_dir: Path, info: dict) -> None:
    atomic_write_text(run_dir / RUN_FILE, json.dumps(info, indent=2) + "\n")


def run_pipeline(
    run_dir: str | Path | None = None,
    specs: list[RecipeSpec] | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    settings: EvalSettings | None = None,
    max_stages: int | None = None,
) -> RunResult:
    """Data, training, held-out evaluation after every stage, for each recipe; then the report.
    `max_stages`: run the first stages of each recipe only (a shorter run that keeps the same steps)."""
    run_dir = Path(run_dir or default_run_dir())
    specs = specs or default_specs()
    recipes = [load_spec(spec, list(overrides)) for spec in specs]
    settings = resolve_settings(settings or EvalSettings(), recipes[0])
    if max_stages is not None:
        if max_stages < 1:
            raise ConfigError(f"--stages must be >= 1, got {max_stages}")
        recipes = [replace(r, stages=r.stages[:max_stages]) for r in recipes]
    run_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    info = {
        "created": datetime.now().isoformat(timespec="seconds"),
        "recipes": [
            {"label": s.label, "config": str(s.path), "styles": _task_styles(r)} for s, r in zip(specs, recipes)
        ],
        "overrides": list(overrides),
        "max_stages": max_stages,
        "eval": asdict(settings),
        "threads": torch.get_num_threads(),
        "timings": {},
    }
    timings = info["timings"]
    log.info("run folder %s", run_dir)

    t0 = time.time()
    data_dir = run_dir / "data"
    heldout = write_problems(settings, data_dir / f"{HELDOUT}.jsonl")
    recipes = [materialize_data(recipe, spec, data_dir) for recipe, spec in zip(recipes, specs)]
    timings["data"] = round(time.time() - t0, 1)
    _save_run_info(run_dir, info)

    for spec, recipe in zip(specs, recipes):
        recipe_dir = run_dir / spec.label
        log.info("recipe %s (%s): %s", spec.label, spec.path, ", ".join(s.name for s in recipe.stages))
        stages = run_recipe(recipe, recipe_dir)
        timings.update({f"{spec.label}/{s.name}": s.seconds for s in stages if not s.skipped})
        t0 = time.time()
        for stage, done in zip(recipe.stages, stages):
            _evaluate_stage(recipe, stage, done, heldout, settings, spec.label, eval_file(recipe_dir, done.folder))
        timings[f"{spec.label}/eval"] = round(time.time() - t0, 1)
        _save_run_info(run_dir, info)

    timings["total"] = round(time.time() - started, 1)
    _save_run_info(run_dir, info)
    report = write_report(run_dir)
    summary = json.loads((run_dir / SUMMARY_FILE).read_text())
    log.info("report: %s", report)
    return RunResult(run_dir, report, summary)


def _evaluate_stage(
    recipe: Recipe,
    stage: StageConfig,
    done: StageResult,
    problems: list[Problem],
    settings: EvalSettings,
    label: str,
    out: Path,
) -> None:
    """The held-out evaluation of one stage's model, unless an earlier call wrote it."""
    if out.is_file():
        return
    result = evaluate_model(done.model, recipe, problems, settings, f"{label}/{done.name}", out, variant=stage.variant)
    log.info(
        "%s after %s: held-out accuracy %.3f, parallel ratio %.2f",
        label,
        done.name,
        result["mean_at_k"],
        result["parallel_ratio"],
    )


def _task_styles(recipe: Recipe) -> dict[str, str]:
    return {s.name: s.data.task_style for s in recipe.stages if s.kind == "sft" and s.data.source == "task"}


# ---------------------------------------------------------------------------------------------------
# A real pretrained model.


def pretrained_recipe(model: str, data: Path, steps: int, max_length: int) -> Recipe:
    """A single SFT stage on cold-start data with the project's parallel prompt."""
    return recipe_from_dict(
        {
            "name": f"{model}-coldstart",
            "stages": [
                {
                    "name": "sft",
                    "kind": "sft",
                    "variant": "seen",
                    "model": {"name_or_path": model},
                    "data": {"source": str(data.resolve()), "prompt": "parallel"},
                    "lr": 3.0e-4,
                    "lr_schedule": "constant",
                    "max_steps": steps,
                    "log_every": 1,
                    "sft": {"batch_size": 2, "max_length": max_length, "bucket_batches": 1},
                }
            ],
        },
        source=f"<{model} cold-start recipe>",
    )


def run_pretrained(
    model: str,
    run_dir: str | Path | None = None,
    data: str | Path | None = None,
    steps: int = 4,
    max_length: int = 640,
    max_new_tokens: int = 320,
    samples: int = 4,
    task_name: str = "search",
) -> Path:
    """A few SFT steps of a pretrained preset on cold-start data, then `samples` generations for a
    problem it did not train on; the first one with a well-formed block is shown on the console.

    The cold-start data is `data` (a JSONL of question/response/answer rows in the parallel format, e.g.
    real teacher outputs from `parallel-r1 data generate`), by default the built-in `task_name`'s teacher
    solutions, written to `<run>/data/coldstart.jsonl`; the problem shown is then one of its held-out ones.
    A few steps rarely teach a model to open a block by itself. When no sample does, the samples are
    drawn again with an inserted `<Parallel>` (`SamplingParams.open_block`) and the Unseen engine, so
    that the page shows the paths the model writes; the console says which of the two it shows.
    Returns the viewer page of the generations (`<run>/generation.html`; records in generation.jsonl).
    """
    run_dir = Path(run_dir or default_run_dir())
    if data is None:
        data_path = run_dir / "data" / "coldstart.jsonl"
        examples = builtin_task.teacher_examples(64, None, 0, "parallel", task_name)
        _write_jsonl(data_path, [{"question": p.question, "response": r, "answer": str(p.answer)} for p, r in examples])
        problem = builtin_task.make_eval_problems(
            1, builtin_task.task_module(task_name).EVAL_LEVELS[-1:], 0, task_name
        )[0]
    else:
        data_path = Path(data)
        if not data_path.is_file():
            raise FileNotFoundError(f"{data_path}: no such cold-start file")
        # The file's last row: the few SFT steps (batches from the start of a shuffled epoch) rarely see it.
        problem = load_problems(str(data_path))[-1]
    recipe = pretrained_recipe(model, data_path, steps, max_length)
    final = run_recipe(recipe, run_dir)[-1].model
    model_obj, tokenizer = load_model_and_tokenizer(final)
    engine = make_engine("hf", model_obj, tokenizer, max_batch_size=samples)
    params = SamplingParams(
        temperature=0.7, seed=0, max_response_tokens=max_new_tokens, max_path_tokens=max_new_tokens // 3, variant="seen"
    )
    # The prompt the SFT stage trained with: through the chat template of a model that has one.
    prompt = [stage_prompt_format(recipe.stages[0], tokenizer).render(problem.question)]
    rollouts = engine.generate(prompt, n=samples, params=params)
    opened = sum(r.structure.num_blocks > 0 for r in rollouts)
    how = f"{opened} of {samples} samples opened a block by themselves"
    if not opened:
        log.info("no sample opened a block after %d SFT steps: drawing them again with an inserted <Parallel>", steps)
        rollouts = engine.generate(prompt, n=samples, params=replace(params, variant="unseen", open_block=True))
        how = "no sample opened a block by itself; these start with an inserted <Parallel> (open_block)"
    name = f"{model} after {steps} SFT steps"
    records = [sample_record(r, problem, name, "cold-start") for r in rollouts]
    _write_jsonl(run_dir / "generation.jsonl", records)
    page = run_dir / "generation.html"
    page.write_text(render_html(records, title=f"parallel-r1: {name} ({how})"), encoding="utf-8")
    shown = next((r for r in records if r["num_blocks"] and r["well_formed"]), None)
    shown = shown or next((r for r in records if r["num_blocks"]), records[0])
    console = Console()
    console.rule(f"{model}: {problem.question[:80]}")
    console.print(shown["response"], markup=False, highlight=False)
    console.rule(
        f"sample {shown['sample_index'] + 1} of {samples}: blocks {shown['num_blocks']}, "
        f"answer {shown['pred']} (gold {problem.answer})"
    )
    console.print(f"({how})")
    return page
