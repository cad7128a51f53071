"""`parallel-r1 study`: the controlled comparison on the embedded task, at equal budget, over seeds.

Arms, one recipe each in `parallel_r1/recipes/study/` (an SFT stage, then two GRPO stages):

    sequential   SFT on the teacher's plain tries (stops at the first that works), accuracy reward, no blocks
    thorough     SFT on sequential text with exactly the parallel script's tries: as broad, no blocks (control)
    plain        SFT on the parallel script with plain delimiters instead of tags, causal (control)
    seen         SFT and GRPO on the parallel script with the causal mask, parallel reward first
    unseen       the same with the structured (Unseen) mask
    unseen_kl    Unseen with a KL penalty to its SFT model (the intervention on Unseen's RL)
    mixed_*      Unseen from a mixed cold start (blocks only while three candidates remain), four reward
                 schedules: s1 (parallel, then accuracy), s2 (alternating), mid (parallel for the first steps
                 of the harder stage), acc (accuracy alone)
    choice_*     (optional) the same four schedules from the choice cold start (a block on a coin's toss
                 wherever three candidates remain), so that the policy starts unsure whether to open one

`PRIMARY` is the parallel arm the verdict is about, declared before the study ran (the first study's best).

Equal budget: every arm's GRPO stages take the same problems, steps, prompts and samples per step (checked at
load time); test-time tokens and positions are reported, and compared at equal value (`study_summary`).
Every seed trains its own SFT model (shared by the arms whose SFT is the same), so the spread covers SFT and
RL; RL problems come from the training pool no SFT draws from. Every model, after SFT and after RL, is
sampled k times on the task's held-out split. Jobs (an SFT with its evaluation, or an arm's GRPO stages with
theirs) run `workers` at a time in processes of their own; everything is resumable: finished stages and
evaluations are kept.

`run_sweep` is the tuning run that precedes it: each arm's RL learning rate, chosen on the task's validation
split (never the held-out one), "no RL" included.

Layout::

    <study>/study.json                   settings, arms, seeds, timings
    <study>/data/heldout.jsonl           (sweep: validation.jsonl)
    <study>/sft/<key>/seed<k>/           an SFT stage (a run_recipe folder) and eval/heldout.json
    <study>/<arm>/seed<k>/               the arm's GRPO stages for one seed and eval/heldout.json
    <study>/logs/<job>.log               what a job printed
    <study>/summary.json, study.md, report.html
"""

from __future__ import annotations

import concurrent.futures as futures
import hashlib
import json
import logging
import multiprocessing
import os
import time
from dataclasses import asdict, dataclass, replace
from datetime import datetime
from pathlib import Path

from parallel_r1 import tasks
from parallel_r1.config import ConfigError, Recipe, StageConfig, dump_recipe, load_recipe, override, parse_recipe
from parallel_r1.data import Problem
from parallel_r1.files import atomic_write_text
from parallel_r1.layout import EVAL_DIR, RECIPE_FILE, STUDY_FILE
from parallel_r1.pipeline import evaluate_model, recipe_task, write_problems
from parallel_r1.recipe import run_recipe
from parallel_r1.settings import ARMS, SWEEP_LRS, EvalSettings, StudySettings
from parallel_r1.trainer import final_model

log = logging.getLogger(__name__)

BASELINE = "sequential"
PRIMARY = "seen"
CONTROLS = ("plain", "thorough", "sequential")
# The reward-schedule arms, one family per cold start: the arms of a family share a seed's SFT model.
SCHEDULE_FAMILIES = (
    ("mixed_s1", "mixed_s2", "mixed_mid", "mixed_acc"),
    ("choice_s1", "choice_s2", "choice_mid", "choice_acc"),
)
SCHEDULES = tuple(arm for family in SCHEDULE_FAMILIES for arm in family)
VALIDATION_SEED = 10_007
HELDOUT = "heldout"
_BUDGET_FIELDS = ("max_steps", "data.task", "data.task_size", "data.task_levels", "grpo.prompts_per_step", "grpo.n")


# ---------------------------------------------------------------------------------------------------
# Recipes.


def load_arms(settings: StudySettings, overrides: list[str]) -> dict[str, Recipe]:
    """Every arm's recipe with the overrides applied; refuses arms whose RL budgets differ."""
    recipes = {}
    for arm in settings.arms:
        path = settings.recipes_dir / f"{arm}.yaml"
        if not path.is_file():
            raise ConfigError(f"{path}: no recipe for study arm {arm!r} (arms: {', '.join(ARMS)})")
        recipe = override(load_recipe(path), list(overrides))
        sft, rl = split_stages(recipe)
        if not sft or not rl:
            raise ConfigError(f"{path}: a study arm needs SFT stage(s) followed by GRPO stage(s)")
        recipes[arm] = recipe
    budgets = {arm: rl_budget(recipe) for arm, recipe in recipes.items()}
    first = next(iter(budgets))
    for arm, budget in budgets.items():
        if budget != budgets[first]:
            raise ConfigError(
                f"study arms {first!r} and {arm!r} have different RL budgets ({budgets[first]} vs {budget}): "
                "equal budget means the same problems, steps, prompts and samples per step"
            )
    return recipes


def split_stages(recipe: Recipe) -> tuple[list[StageConfig], list[StageConfig]]:
    """(the leading SFT stages, the GRPO stages after them)."""
    n = next((i for i, s in enumerate(recipe.stages) if s.kind != "sft"), len(recipe.stages))
    return list(recipe.stages[:n]), list(recipe.stages[n:])


def _get(obj, dotted: str):
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def rl_budget(recipe: Recipe) -> list[tuple]:
    """Per GRPO stage, the values of the fields that make up its budget (what equal budget compares)."""
    return [tuple(_get(s, f) for f in _BUDGET_FIELDS) for s in split_stages(recipe)[1]]


def sft_key(recipe: Recipe) -> str:
    """A folder name for the SFT stages: equal for arms whose SFT is the same, whatever their names and seeds."""
    sft, _ = split_stages(recipe)
    text = dump_recipe(Recipe(name="sft", seed=0, stages=sft))
    style = sft[-1].data.task_style if sft[-1].data.source == "task" else "data"
    return f"{sft[-1].variant}-{style}-{hashlib.sha1(text.encode()).hexdigest()[:8]}"


def sft_recipe(recipe: Recipe, seed: int) -> Recipe:
    """The arm's SFT stages with `seed` (initialisation, data and order)."""
    sft, _ = split_stages(recipe)
    return replace(recipe, seed=seed, stages=sft)


def rl_recipe(recipe: Recipe, sft_model: Path, seed: int, lr: float | None = None) -> Recipe:
    """The arm's GRPO stages, starting from its SFT model, with `seed` (and `lr` when given)."""
    _, rl = split_stages(recipe)
    rl[0] = replace(rl[0], model=replace(rl[0].model, name_or_path=str(sft_model)))
    if lr is not None:
        rl = [replace(s, lr=lr) for s in rl]
    return replace(recipe, seed=seed, stages=rl)


def is_parallel(recipe: Recipe) -> bool:
    return split_stages(recipe)[1][-1].grpo.rollout.max_blocks > 0


def sft_dir(study_dir: Path, recipe: Recipe, seed: int) -> Path:
    return study_dir / "sft" / sft_key(recipe) / f"seed{seed}"


def sft_final(folder: Path, recipe: Recipe) -> Path:
    sft, _ = split_stages(recipe)
    return final_model(folder / f"{len(sft) - 1:02d}-{sft[-1].name}")


def resolve_eval(settings: StudySettings, recipes: dict[str, Recipe]) -> EvalSettings:
    ev, name = settings.eval, recipe_task(next(iter(recipes.values())))
    return replace(ev, task=ev.task or name, levels=tuple(ev.levels or tasks.task_module(ev.task or name).EVAL_LEVELS))


# ---------------------------------------------------------------------------------------------------
# Jobs: what one worker process does.


@dataclass
class Job:
    """One unit of work: train into `run_dir` (resuming), then evaluate the final model on `problems` into
    `eval_out` unless that file exists. Without `init_from`, the arm's SFT stages; with it, the arm's GRPO
    stages from the SFT model in `init_from` (at `lr` when given). `after`: the job this one waits for."""

    name: str
    arm_recipe: Recipe  # the arm's whole recipe: the evaluation takes its caps and prompt from it
    seed: int
    run_dir: Path
    problems: list[Problem]
    settings: EvalSettings
    eval_out: Path
    benchmark: str = HELDOUT
    init_from: Path | None = None
    lr: float | None = None
    after: str | None = None
    log_file: Path | None = None
    threads: int = 1
    study_dir: Path | None = None  # where a sweep run of the same GRPO stages may be reused from
    arm: str = ""


def run_job(job: Job) -> dict:
    """Run `job` in this process; returns its name and seconds."""
    started = time.time()
    if job.init_from is None:
        recipe = sft_recipe(job.arm_recipe, job.seed)
    else:
        recipe = rl_recipe(job.arm_recipe, sft_final(job.init_from, job.arm_recipe), job.seed, job.lr)
        if job.study_dir is not None:
            _reuse_sweep_run(job.study_dir, job.arm, recipe, job.run_dir)
    final = run_recipe(recipe, job.run_dir)[-1].model
    if not job.eval_out.is_file():
        ev = job.settings
        variant = recipe.stages[-1].variant
        evaluate_model(final, job.arm_recipe, job.problems, ev, job.name, job.eval_out, job.benchmark, variant)
    return {"name": job.name, "seconds": round(time.time() - started, 1)}


def _run_job_in_worker(job: Job) -> dict:
    """`run_job` in a pool process: its output goes to the job's log file, torch uses `job.threads`."""
    import torch

    torch.set_num_threads(job.threads)
    if job.log_file is not None:
        job.log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(job.log_file, "a") as out:
            os.dup2(out.fileno(), 1)
            os.dup2(out.fileno(), 2)
    logging.basicConfig(level=logging.INFO, force=True)
    return run_job(job)


def run_jobs(jobs: list[Job], workers: int, on_done=None) -> None:
    """Run `jobs`, each after the job it names in `after`; `workers` > 1 runs them side by side in spawned
    processes (a worker's failure stops the study with its error once running jobs end)."""
    names = {job.name for job in jobs}
    missing = sorted({job.after for job in jobs if job.after and job.after not in names})
    if missing:
        raise ValueError(f"jobs wait for jobs that are not there: {missing}")
    if workers <= 1:
        for job in _order(jobs):
            result = run_job(job)
            if on_done:
                on_done(result)
        return
    pending, done = list(jobs), set()
    context = multiprocessing.get_context("spawn")
    with futures.ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        running: dict[futures.Future, Job] = {}
        while pending or running:
            ready = [j for j in pending if j.after is None or j.after in done]
            while ready and len(running) < workers:
                job = ready.pop(0)
                pending.remove(job)
                log.info("start %s", job.name)
                running[pool.submit(_run_job_in_worker, job)] = job
            finished, _ = futures.wait(running, return_when=futures.FIRST_COMPLETED)
            for future in finished:
                job = running.pop(future)
                result = future.result()
                done.add(job.name)
                log.info("done %s (%.0f s)", job.name, result["seconds"])
                if on_done:
                    on_done(result)


def _order(jobs: list[Job]) -> list[Job]:
    """Jobs in an order where each comes after the one it waits for."""
    out, placed = [], set()
    while len(out) < len(jobs):
        for job in jobs:
            if job.name not in placed and (job.after is None or job.after in placed):
                out.append(job)
                placed.add(job.name)
    return out


def study_jobs(
    recipes: dict[str, Recipe],
    seeds: tuple[int, ...],
    study_dir: Path,
    problems: list[Problem],
    ev: EvalSettings,
    threads: int = 1,
) -> list[Job]:
    """Per seed, each distinct SFT (with its evaluation) and each arm's GRPO stages (with theirs)."""
    jobs: dict[str, Job] = {}
    logs = study_dir / "logs"
    for seed in seeds:
        for recipe in recipes.values():
            folder = sft_dir(study_dir, recipe, seed)
            name = f"sft/{folder.parent.name}/seed{seed}"
            log_file = logs / f"sft-{folder.parent.name}-seed{seed}.log"
            eval_out = folder / EVAL_DIR / f"{HELDOUT}.json"
            job = Job(name, recipe, seed, folder, problems, ev, eval_out, log_file=log_file, threads=threads)
            jobs.setdefault(name, job)
        for arm, recipe in recipes.items():
            folder = sft_dir(study_dir, recipe, seed)
            run_dir = study_dir / arm / f"seed{seed}"
            jobs[f"{arm}/seed{seed}"] = Job(
                f"{arm}/seed{seed}", recipe, seed, run_dir, problems, ev, run_dir / EVAL_DIR / f"{HELDOUT}.json",
                init_from=folder, after=f"sft/{folder.parent.name}/seed{seed}", log_file=logs / f"{arm}-seed{seed}.log",
                threads=threads, study_dir=study_dir, arm=arm,
            )  # fmt: skip
    return list(jobs.values())


def _reuse_sweep_run(study_dir: Path, arm: str, rl: Recipe, run_dir: Path) -> None:
    """Link `run_dir` to the sweep's run of the same arm when that run is this one (same SFT model, GRPO
    stages, seed and learning rate): retraining it would give the same model."""
    source = study_dir / "sweep" / arm / f"seed{rl.seed}-lr{rl.stages[0].lr:g}"
    recorded = source / RECIPE_FILE
    if run_dir.exists() or not recorded.is_file():
        return
    if parse_recipe(recorded.read_text(), str(recorded)) == rl:
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        run_dir.symlink_to(source.resolve(), target_is_directory=True)
        log.info("%s: the sweep's run %s is this run; reusing it", run_dir, source)


# ---------------------------------------------------------------------------------------------------
# The study.


def _save(path: Path, info: dict) -> None:
    atomic_write_text(path, json.dumps(info, indent=2, default=str) + "\n")


def run_study(
    study_dir: str | Path | None = None,
    settings: StudySettings | None = None,
    overrides: list[str] | tuple[str, ...] = (),
) -> Path:
    """Every SFT and GRPO job of every arm and seed, the evaluations, then the summary and the report."""
    from parallel_r1.study_summary import summarize_study, write_study_outputs

    settings = settings or StudySettings()
    study_dir = Path(study_dir or Path("runs") / f"study-{datetime.now():%Y%m%d-%H%M%S}")
    recipes = load_arms(settings, list(overrides))
    ev = resolve_eval(settings, recipes)
    study_dir.mkdir(parents=True, exist_ok=True)
    info_path = study_dir / STUDY_FILE
    info = json.loads(info_path.read_text()) if info_path.is_file() else {"timings": {}}
    info.update(
        arms=list(recipes),
        seeds=list(settings.seeds),
        task=ev.task,
        eval=asdict(ev),
        overrides=list(overrides),
        recipes_dir=str(settings.recipes_dir),
        workers=settings.workers,
        threads=settings.threads,
        primary=PRIMARY if PRIMARY in recipes else None,
        parallel_arms=[a for a, r in recipes.items() if is_parallel(r)],
    )
    _save(info_path, info)
    heldout = write_problems(ev, study_dir / "data" / f"{HELDOUT}.jsonl")
    started = time.time()

    def record(result: dict) -> None:
        info["timings"][result["name"]] = result["seconds"]
        _save(info_path, info)

    run_jobs(study_jobs(recipes, settings.seeds, study_dir, heldout, ev, settings.threads), settings.workers, record)
    info["timings"]["total"] = round(time.time() - started, 1)
    _save(info_path, info)
    return write_study_outputs(study_dir, summarize_study(study_dir))


# ---------------------------------------------------------------------------------------------------
# The sweep: each arm's RL learning rate, chosen on validation problems.


def validation_problems(ev: EvalSettings) -> list[Problem]:
    """`ev.problems_per_level` problems of each evaluated level from the task's validation split: solving
    computations that no training problem tries and that are not held out."""
    return [
        p
        for level in ev.levels
        for p in tasks.make_problems(ev.problems_per_level, (level,), "valid", VALIDATION_SEED, ev.task)
    ]


def run_sweep(
    study_dir: str | Path,
    settings: StudySettings | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    lrs: tuple[float, ...] = SWEEP_LRS,
) -> dict:
    """For every arm and learning rate: the arm's GRPO stages (first study seed) from its SFT model of that
    seed, scored on validation problems; "no RL" is the SFT model itself. Writes <study>/sweep/sweep.json and
    sweep.md; returns the table."""
    settings = settings or StudySettings()
    study_dir = Path(study_dir)
    recipes = load_arms(settings, list(overrides))
    ev = resolve_eval(settings, recipes)
    sweep_dir = study_dir / "sweep"
    problems = write_problems(ev, sweep_dir / "validation.jsonl", validation_problems(ev))
    seed = settings.seeds[0]
    jobs: dict[str, Job] = {}
    logs = study_dir / "logs"
    for arm, recipe in recipes.items():
        folder = sft_dir(study_dir, recipe, seed)
        sft_name = f"sft/{folder.parent.name}/seed{seed}"
        eval_out = folder / EVAL_DIR / "validation.json"
        log_file = logs / f"sweep-sft-{folder.parent.name}.log"
        jobs.setdefault(
            sft_name, Job(sft_name, recipe, seed, folder, problems, ev, eval_out, "validation", log_file=log_file,
                          threads=settings.threads)
        )  # fmt: skip
        for lr in lrs:
            run_dir = sweep_dir / arm / f"seed{seed}-lr{lr:g}"
            jobs[f"{arm}/lr{lr:g}"] = Job(
                f"{arm}/lr{lr:g}", recipe, seed, run_dir, problems, ev, run_dir / EVAL_DIR / "validation.json",
                "validation", init_from=folder, lr=lr, after=sft_name, log_file=logs / f"sweep-{arm}-lr{lr:g}.log",
                threads=settings.threads,
            )  # fmt: skip
    run_jobs(list(jobs.values()), settings.workers)
    table: dict[str, dict[str, float]] = {}
    for arm, recipe in recipes.items():
        row = {"no RL": _accuracy(sft_dir(study_dir, recipe, seed) / EVAL_DIR / "validation.json")}
        for lr in lrs:
            row[f"{lr:g}"] = _accuracy(sweep_dir / arm / f"seed{seed}-lr{lr:g}" / EVAL_DIR / "validation.json")
        table[arm] = row
    best = {arm: max((k for k in row if k != "no RL"), key=row.get) for arm, row in table.items()}
    result = {"seed": seed, "lrs": [f"{lr:g}" for lr in lrs], "validation": table, "best_lr": best}
    result.update(problems=len(problems), k=ev.k)
    atomic_write_text(sweep_dir / "sweep.json", json.dumps(result, indent=2) + "\n")
    atomic_write_text(sweep_dir / "sweep.md", sweep_markdown(result))
    return result


def _accuracy(path: Path) -> float:
    return json.loads(path.read_text())["results"][0]["mean_at_k"]


def sweep_markdown(result: dict) -> str:
    columns = ["no RL", *result["lrs"]]
    lines = [
        f"Validation accuracy (mean@{result['k']} on {result['problems']} problems of the validation split), "
        f"seed {result['seed']}, by RL learning rate; the best of each arm in bold.",
        "",
        "| arm | " + " | ".join(c if c == "no RL" else f"lr {c}" for c in columns) + " |",
        "| --- |" + " --- |" * len(columns),
    ]
    for arm, row in result["validation"].items():
        cells = [f"**{row[c]:.3f}**" if c == result["best_lr"][arm] else f"{row[c]:.3f}" for c in columns]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
