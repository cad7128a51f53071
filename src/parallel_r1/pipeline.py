"""`parallel-r1 run`: the whole method, from nothing, with the evidence that it learns.

The default run trains two recipes on the built-in arithmetic task with the same budget:

* ``parallel`` (configs/tiny.yaml): SFT on the programmatic teacher's parallel solutions, then GRPO on
  easy problems and on harder ones with the parallel reward;
* ``sequential`` (configs/tiny_sequential.yaml): the same stages, SFT on the teacher's plain solutions
  and the accuracy reward alone: the baseline without blocks.

Each recipe goes through data generation, its stages (`recipe.run_recipe`) and an evaluation on held-out
problems after every stage; the report (`report.write_report`) then sets them side by side. Run folder::

    <run>/run.json                 recipes, evaluation settings, timings
    <run>/data/                    held-out problems and the SFT data of each recipe, as JSONL
    <run>/<label>/                 a run_recipe folder (recipe.yaml, NN-<stage>/...) and eval/NN-<stage>.json
    <run>/report.html, summary.json, figures/

Running again on the same folder resumes: finished stages and evaluations are kept.

`run_pretrained` is the small demonstration on a real model (SmolLM2-135M from PyPI): tags added,
embeddings resized, a few SFT steps on real cold-start data, one parallel generation shown.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from pathlib import Path

from parallel_r1.config import BASELINE_RECIPE, DEFAULT_RECIPE, ConfigError, Recipe, StageConfig, load_recipe, override

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
COLD_START_FILE = "parallel_gsm8k_sample.jsonl"
HELDOUT = "heldout"

@dataclass
class RecipeSpec:
    """One recipe of a run: its folder name and its YAML."""

    label: str
    path: Path


@dataclass
class EvalSettings:
    """The held-out evaluation run after every stage (sampling caps come from the recipe's GRPO stage)."""

    problems_per_level: int = 64
    levels: tuple[int, ...] = (1, 2)
    k: int = 4
    temperature: float = 1.0
    seed: int = 0
    batch_size: int = 128


@dataclass
class RunResult:
    run_dir: Path
    report: Path
    summary: dict = field(default_factory=dict)


def default_specs(config: str | Path | None = None, baseline: str | Path | None = None, with_baseline: bool = True) -> list[RecipeSpec]:
    specs = [RecipeSpec("parallel", Path(config or DEFAULT_RECIPE))]
    if with_baseline:
        specs.append(RecipeSpec("sequential", Path(baseline or BASELINE_RECIPE)))
    return specs


def default_run_dir() -> Path:
    return Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")


def load_spec(spec: RecipeSpec, overrides: list[str]) -> Recipe:
    """The recipe of `spec` with the overrides applied."""
    if not spec.path.is_file():
        raise ConfigError(f"{spec.path}: no such recipe file (see configs/ for recipes, or leave --config out)")
    return override(load_recipe(spec.path), list(overrides))


# ---------------------------------------------------------------------------------------------------
# Data generation.


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(path)
    return path


def write_sft_data(stage: StageConfig, seed: int, path: Path) -> Path:
    """The teacher's solutions for a task SFT stage, in its `data.task_style`, as {id, question, response,
    answer} rows: the same records the trainer would generate itself, written where one can read them."""
    from parallel_r1 import task

    levels = tuple(stage.data.task_levels or task.COLD_START_LEVELS)
    examples = task.teacher_examples(stage.data.limit or stage.data.task_size, levels, seed, stage.data.task_style)
    rows = [{"id": p.id, "question": p.question, "response": r, "answer": str(p.answer)} for p, r in examples]
    return _write_jsonl(path, rows)


def write_heldout(settings: EvalSettings, path: Path) -> Path:
    """Problems of the task's held-out split, `problems_per_level` of each evaluated level."""
    from parallel_r1 import task

    rows = [
        {"id": p.id, "question": p.question, "answer": p.answer}
        for level in settings.levels
        for p in task.make_eval_problems(settings.problems_per_level, (level,), settings.seed)
    ]
    return _write_jsonl(path, rows)


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


def eval_sampling(recipe: Recipe, stage: StageConfig, settings: EvalSettings):
    """`evaluate.EvalConfig` for the held-out evaluation: the caps of the recipe's last GRPO stage, the
    stage's variant, and the prompt the recipe trained with."""
    from parallel_r1.config import RolloutConfig
    from parallel_r1.evaluate import EvalConfig
    from parallel_r1.sft import prompt_template

    grpo = [s for s in recipe.stages if s.kind == "grpo"]
    rollout = grpo[-1].grpo.rollout if grpo else RolloutConfig()
    return EvalConfig(
        k=settings.k,
        temperature=settings.temperature,
        seed=settings.seed,
        max_response_tokens=rollout.max_response_tokens,
        max_path_tokens=rollout.max_path_tokens,
        max_blocks=rollout.max_blocks,
        num_paths=rollout.num_paths,
        variant=stage.variant,
        max_batch_size=settings.batch_size,
        template=prompt_template(recipe.stages[-1].data.prompt),
    )


def evaluate_stage(model_dir: Path, recipe: Recipe, stage: StageConfig, problems: list, settings: EvalSettings,
                   name: str, out: Path) -> dict:
    """Sample k responses per held-out problem with the stage's final model; write `evaluate` results."""
    from parallel_r1.engine import ParallelEngine
    from parallel_r1.evaluate import evaluate_benchmark, write_results
    from parallel_r1.models import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(model_dir)
    engine = ParallelEngine(model, tokenizer, max_batch_size=settings.batch_size)
    config = eval_sampling(recipe, stage, settings)
    result, records = evaluate_benchmark(engine, problems, config, name, HELDOUT)
    write_results(out, [result], records, config)
    return asdict(result)


# ---------------------------------------------------------------------------------------------------
# The run.


def _stage_timings(recipe_dir: Path, recipe: Recipe, label: str, started: float, done_before: set[int]) -> dict[str, float]:
    """Seconds each stage took in this invocation, from the times their DONE files were written."""
    from parallel_r1.recipe import stage_dir

    out, previous = {}, started
    for i, stage in enumerate(recipe.stages):
        done = stage_dir(recipe_dir, i, stage) / "DONE"
        if not done.is_file():
            break
        finished = done.stat().st_mtime
        if i not in done_before:
            out[f"{label}/{stage.name}"] = round(finished - previous, 1)
        previous = finished
    return out


def _save_run_info(run_dir: Path, info: dict) -> None:
    tmp = run_dir / "run.json.tmp"
    tmp.write_text(json.dumps(info, indent=2) + "\n")
    tmp.replace(run_dir / "run.json")


def run_pipeline(
    run_dir: str | Path | None = None,
    specs: list[RecipeSpec] | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    settings: EvalSettings | None = None,
    max_stages: int | None = None,
) -> RunResult:
    """Data, training, held-out evaluation after every stage, for each recipe; then the report.
    `max_stages`: run the first stages of each recipe only (a shorter run that keeps the same steps)."""
    from parallel_r1.data import load_problems
    from parallel_r1.recipe import run_recipe, stage_dir
    from parallel_r1.report import write_report
    from parallel_r1.sft import final_model, stage_is_done

    run_dir = Path(run_dir or default_run_dir())
    specs = specs or default_specs()
    settings = settings or EvalSettings()
    recipes = [load_spec(spec, list(overrides)) for spec in specs]
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
        "threads": _threads(),
        "timings": {},
    }
    timings = info["timings"]
    log.info("run folder %s", run_dir)

    t0 = time.time()
    data_dir = run_dir / "data"
    heldout = load_problems(str(write_heldout(settings, data_dir / f"{HELDOUT}.jsonl")))
    recipes = [materialize_data(recipe, spec, data_dir) for recipe, spec in zip(recipes, specs)]
    timings["data"] = round(time.time() - t0, 1)
    _save_run_info(run_dir, info)

    for spec, recipe in zip(specs, recipes):
        recipe_dir = run_dir / spec.label
        done_before = {i for i, s in enumerate(recipe.stages) if stage_is_done(stage_dir(recipe_dir, i, s))}
        t0 = time.time()
        log.info("recipe %s (%s): %s", spec.label, spec.path, ", ".join(s.name for s in recipe.stages))
        run_recipe(recipe, recipe_dir)
        timings.update(_stage_timings(recipe_dir, recipe, spec.label, t0, done_before))
        t0 = time.time()
        for i, stage in enumerate(recipe.stages):
            folder = stage_dir(recipe_dir, i, stage)
            out = recipe_dir / "eval" / f"{folder.name}.json"
            if out.is_file():
                continue
            result = evaluate_stage(final_model(folder), recipe, stage, heldout, settings, f"{spec.label}/{stage.name}", out)
            log.info(
                "%s after %s: held-out accuracy %.3f, parallel ratio %.2f",
                spec.label, stage.name, result["mean_at_k"], result["parallel_ratio"],
            )
        timings[f"{spec.label}/eval"] = round(time.time() - t0, 1)
        _save_run_info(run_dir, info)

    timings["total"] = round(time.time() - started, 1)
    _save_run_info(run_dir, info)
    report = write_report(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    log.info("report: %s", report)
    return RunResult(run_dir, report, summary)


def _task_styles(recipe: Recipe) -> dict[str, str]:
    return {s.name: s.data.task_style for s in recipe.stages if s.kind == "sft" and s.data.source == "task"}


def _threads() -> int:
    import torch

    return torch.get_num_threads()


# ---------------------------------------------------------------------------------------------------
# A real pretrained model.


def find_cold_start(path: str | Path | None = None) -> Path:
    """The cold-start JSONL: `path`, else ../shared/data's sample when present, else a clear error."""
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such cold-start file")
        return path
    candidates = [Path("..") / "shared" / "data" / COLD_START_FILE, REPO_ROOT.parent / "shared" / "data" / COLD_START_FILE]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"no cold-start data: pass --data <file.jsonl> (rows with question, response, answer in the parallel "
        f"format), e.g. {COLD_START_FILE} from the project's shared data folder"
    )


def pretrained_recipe(model: str, data: Path, steps: int, max_length: int) -> Recipe:
    """A single SFT stage on real cold-start data with the project's parallel prompt."""
    from parallel_r1.config import recipe_from_dict

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
) -> Path:
    """A few SFT steps of a pretrained preset on cold-start data, then `samples` generations for a
    problem it did not train on; the first one with a well-formed block is shown on the console.

    A few steps rarely teach a model to open a block by itself. When no sample does, the samples are
    drawn again with an inserted `<Parallel>` (`SamplingParams.open_block`) and the Unseen engine, so
    that the page shows the paths the model writes; the console says which of the two it shows.
    Returns the viewer page of the generations (`<run>/generation.html`; records in generation.jsonl).
    """
    from rich.console import Console

    from parallel_r1.data import build_prompt, load_problems
    from parallel_r1.engine import ParallelEngine, SamplingParams
    from parallel_r1.evaluate import sample_record
    from parallel_r1.models import load_model_and_tokenizer
    from parallel_r1.recipe import run_recipe
    from parallel_r1.viewer import render_html

    data_path = find_cold_start(data)
    run_dir = Path(run_dir or default_run_dir())
    recipe = pretrained_recipe(model, data_path, steps, max_length)
    final = run_recipe(recipe, run_dir)
    # The file's last row: the few SFT steps (batches from the start of a shuffled epoch) rarely see it.
    problem = load_problems(str(data_path))[-1]
    model_obj, tokenizer = load_model_and_tokenizer(final)
    engine = ParallelEngine(model_obj, tokenizer, max_batch_size=samples)
    params = SamplingParams(
        temperature=0.7, seed=0, max_response_tokens=max_new_tokens, max_path_tokens=max_new_tokens // 3, variant="seen"
    )
    prompt = [build_prompt(problem.question)]
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
