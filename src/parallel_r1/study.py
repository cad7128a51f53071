"""`parallel-r1 study`: the paper's comparison on the embedded task, at equal budget, over seeds.

Six arms, one recipe each in `parallel_r1/recipes/study/`, extending `base.yaml` (an SFT stage, then GRPO):

    sequential     SFT on the teacher's plain solutions, GRPO with the accuracy reward, blocks banned
    seen           SFT and GRPO with the causal mask, parallel reward
    unseen_s1      SFT and GRPO with the structured (Unseen) mask, parallel reward
    unseen_s2      Unseen, the alternating reward (accuracy alone on most steps, + parallel on some)
    mid_training   Unseen, the parallel reward for the first steps, then accuracy alone
    threads        paths isolated, the summary reading them as sequential text (re-prefill), parallel reward

Equal budget: every arm's GRPO stages take the same problems, steps, prompts and samples per step
(checked at load time); the generated tokens are reported beside the accuracy. SFT stages that are the
same (data, variant, settings) are trained once and shared. The GRPO stages run once per seed, and every
model is evaluated on the task's held-out split three ways: as trained, with blocks banned
(`max_blocks: 0`), and, for Unseen arms, with Seen attention, so that the report can say how much the
blocks themselves contribute. Everything is resumable: finished stages and evaluations are kept.

`run_sweep` is the tuning run that precedes it: the RL learning rate of every arm, chosen on a
validation split of training problems (never the held-out split); its table goes in docs/study.md and
its choice in the recipe files.

Layout::

    <study>/study.json                 settings, arms, seeds, timings
    <study>/data/heldout.jsonl          (sweep: validation.jsonl)
    <study>/sft/<key>/                 a shared SFT stage (a run_recipe folder) and eval/<name>.json
    <study>/<arm>/seed<k>/             the arm's GRPO stages for one seed and eval/<name>.json
    <study>/summary.json, study.md, report.html
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, replace
from datetime import datetime
from pathlib import Path

from parallel_r1 import task as builtin_task
from parallel_r1.config import ConfigError, Recipe, StageConfig, dump_recipe, load_recipe, override, parse_recipe
from parallel_r1.data import Problem
from parallel_r1.format import parse
from parallel_r1.layout import EVAL_DIR, RECIPE_FILE, STUDY_FILE, SUMMARY_FILE
from parallel_r1.metrics import atomic_write_text, read_jsonl
from parallel_r1.pipeline import evaluate_model, recipe_task, resolve_settings, write_problems
from parallel_r1.recipe import run_recipe
from parallel_r1.report import standard_error, write_study_report
from parallel_r1.settings import ARMS, SWEEP_LRS, EvalSettings, StudySettings

log = logging.getLogger(__name__)

BASELINE = "sequential"
VALIDATION_SEED = 10_007  # validation problems: the task's train split, drawn apart from every training set
ARMS_FILE = "arms.json"  # in a shared SFT folder: the arms that start from it
EVALS = ("heldout", "no_blocks", "seen_attention")
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
    """A folder name for the SFT stages: equal for arms whose SFT is the same, whatever their names."""
    sft, _ = split_stages(recipe)
    text = dump_recipe(Recipe(name="sft", seed=recipe.seed, stages=sft))
    style = sft[-1].data.task_style if sft[-1].data.source == "task" else "data"
    return f"{sft[-1].variant}-{style}-{hashlib.sha1(text.encode()).hexdigest()[:8]}"


def rl_recipe(recipe: Recipe, sft_model: Path, seed: int, lr: float | None = None) -> Recipe:
    """The arm's GRPO stages, starting from the shared SFT model, with `seed` (and `lr` when given)."""
    _, rl = split_stages(recipe)
    rl[0] = replace(rl[0], model=replace(rl[0].model, name_or_path=str(sft_model)))
    if lr is not None:
        rl = [replace(s, lr=lr) for s in rl]
    return replace(recipe, seed=seed, stages=rl)


def is_parallel(recipe: Recipe) -> bool:
    return split_stages(recipe)[1][-1].grpo.rollout.max_blocks > 0


# ---------------------------------------------------------------------------------------------------
# Evaluations of one model.


def eval_variants(recipe: Recipe) -> dict[str, dict]:
    """Name -> sampling overrides of the evaluations a model of this arm gets."""
    last = recipe.stages[-1]
    out = {"heldout": {}}
    if is_parallel(recipe):
        out["no_blocks"] = {"max_blocks": 0}
        if last.variant != "seen":
            out["seen_attention"] = {"variant": "seen"}
    return out


def evaluate_all(
    model_dir: Path,
    recipe: Recipe,
    problems: list[Problem],
    settings: EvalSettings,
    name: str,
    eval_dir: Path,
    benchmark: str = "heldout",
) -> dict[str, dict]:
    """Every evaluation of `eval_variants` for one model; finished ones are read back."""
    results = {}
    for ev, changes in eval_variants(recipe).items():
        out = eval_dir / f"{ev}.json"
        if out.is_file():
            results[ev] = json.loads(out.read_text())["results"][0]
            continue
        results[ev] = evaluate_model(model_dir, recipe, problems, settings, f"{name}/{ev}", out, benchmark, **changes)
        log.info(
            "%s %s: accuracy %.3f, parallel ratio %.2f",
            name,
            ev,
            results[ev]["mean_at_k"],
            results[ev]["parallel_ratio"],
        )
    return results


def oracle(samples: list[dict], task_name: str) -> dict[str, float] | None:
    """Headroom of the blocks: the share of paths that reach the answer (one attempt) against the share of
    blocks with at least one such path (the best of the block), over every block of every response."""
    hits = builtin_task.task_module(task_name).path_hits
    paths = blocks = path_hits = block_hits = 0
    for record in samples:
        text = record["response"]
        for block in parse(text).blocks:
            found = [hits(text[p.content.start : p.content.end], record["gold"]) for p in block.paths]
            paths += len(found)
            path_hits += sum(found)
            blocks += 1
            block_hits += any(found)
    if not blocks:
        return None
    return {"single_path": path_hits / paths, "best_of_block": block_hits / blocks, "blocks": blocks}


# ---------------------------------------------------------------------------------------------------
# Statistics.


def mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (sample standard deviation / sqrt(n); 0 for one value)."""
    return sum(values) / len(values), standard_error(values)


def compare(arm: list[float], baseline: list[float]) -> dict[str, float | bool]:
    """Difference of means with its standard error; `significant`: larger than two standard errors."""
    (m1, s1), (m0, s0) = mean_se(arm), mean_se(baseline)
    diff, se = m1 - m0, math.sqrt(s1**2 + s0**2)
    return {"diff": diff, "se": se, "significant": bool(se > 0 and abs(diff) > 2 * se)}


# ---------------------------------------------------------------------------------------------------
# The study.


def _save(path: Path, info: dict) -> None:
    atomic_write_text(path, json.dumps(info, indent=2) + "\n")


@dataclass(frozen=True)
class SharedSFT:
    """The SFT stages an arm starts from, trained once for every arm with the same ones."""

    folder: Path  # a run_recipe folder under <study>/sft/
    model: Path  # the final model of its last stage


def _train_sft(recipes: dict[str, Recipe], study_dir: Path) -> dict[str, SharedSFT]:
    """Train each distinct SFT once; arm -> its SFT."""
    trained: dict[Path, SharedSFT] = {}
    arms = {}
    for arm, recipe in recipes.items():
        folder = study_dir / "sft" / sft_key(recipe)
        if folder not in trained:
            sft, _ = split_stages(recipe)
            log.info("SFT %s (for %s)", folder.name, arm)
            trained[folder] = SharedSFT(folder, run_recipe(replace(recipe, stages=sft), folder)[-1].model)
        arms[arm] = trained[folder]
    for folder in trained:
        atomic_write_text(
            folder / ARMS_FILE, json.dumps(sorted(a for a, s in arms.items() if s.folder == folder)) + "\n"
        )
    return arms


def _generated_tokens(run_dir: Path) -> int:
    """Response tokens sampled during the GRPO stages of one run (from their metrics)."""
    total = 0
    for metrics in sorted(run_dir.glob("*/metrics.jsonl")):
        for row in read_jsonl(metrics, allow_cut_last_line=True):
            total += int(row.get("generated_tokens", 0))
    return total


def run_study(
    study_dir: str | Path | None = None,
    settings: StudySettings | None = None,
    overrides: list[str] | tuple[str, ...] = (),
) -> Path:
    """SFT (shared), GRPO per arm and seed, the three evaluations of every model, then the report."""
    settings = settings or StudySettings()
    study_dir = Path(study_dir or Path("runs") / f"study-{datetime.now():%Y%m%d-%H%M%S}")
    recipes = load_arms(settings, list(overrides))
    first = next(iter(recipes.values()))
    task_name = recipe_task(first)
    ev = resolve_settings(settings.eval, first)
    study_dir.mkdir(parents=True, exist_ok=True)
    info_path = study_dir / STUDY_FILE
    info = json.loads(info_path.read_text()) if info_path.is_file() else {"timings": {}}
    info.update(
        {
            "arms": list(recipes),
            "seeds": list(settings.seeds),
            "task": task_name,
            "eval": asdict(ev),
            "overrides": list(overrides),
            "recipes_dir": str(settings.recipes_dir),
        }
    )
    _save(info_path, info)
    heldout = write_problems(ev, study_dir / "data" / "heldout.jsonl")

    t0 = time.time()
    sft = _train_sft(recipes, study_dir)
    for arm, recipe in recipes.items():
        folder = sft[arm].folder
        evaluate_all(sft[arm].model, recipe, heldout, ev, f"sft/{folder.name}", folder / EVAL_DIR)
    info["timings"]["sft"] = info["timings"].get("sft", 0) + round(time.time() - t0, 1)
    _save(info_path, info)

    for seed in settings.seeds:
        for arm, recipe in recipes.items():
            t0 = time.time()
            run_dir = study_dir / arm / f"seed{seed}"
            rl = rl_recipe(recipe, sft[arm].model, seed)
            _reuse_sweep_run(study_dir, arm, rl, run_dir)
            final = run_recipe(rl, run_dir)[-1].model
            evaluate_all(final, recipe, heldout, ev, f"{arm}/seed{seed}", run_dir / EVAL_DIR)
            info["timings"][f"{arm}/seed{seed}"] = info["timings"].get(f"{arm}/seed{seed}", 0) + round(
                time.time() - t0, 1
            )
            _save(info_path, info)

    summary = summarize_study(study_dir)
    return write_study_report(study_dir, summary, markdown_table(summary))


def _reuse_sweep_run(study_dir: Path, arm: str, rl: Recipe, run_dir: Path) -> None:
    """Link `run_dir` to the sweep's run of the same arm when that run is this one (same GRPO stages, seed and
    learning rate): retraining it would give the same model."""
    source = study_dir / "sweep" / arm / f"lr{rl.stages[0].lr:g}"
    recorded = source / RECIPE_FILE
    if run_dir.exists() or not recorded.is_file():
        return
    if parse_recipe(recorded.read_text(), str(recorded)) == rl:
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        run_dir.symlink_to(source.resolve(), target_is_directory=True)
        log.info("%s: the sweep's run %s is this run; reusing it", run_dir, source)


# ---------------------------------------------------------------------------------------------------
# The sweep: each arm's RL learning rate, chosen on validation problems.


def validation_problems(recipes: dict[str, Recipe], seeds: tuple[int, ...], ev: EvalSettings) -> list[Problem]:
    """Train-split problems drawn apart (VALIDATION_SEED), minus every problem an SFT or RL stage of any arm
    trains on with any of `seeds`; `ev.problems_per_level` of each evaluated level. Never the held-out split."""
    from parallel_r1.grpo import load_stage_problems

    module = builtin_task.task_module(ev.task)
    used: set[str] = set()
    for recipe in recipes.values():
        sft, rl = split_stages(recipe)
        for stage in sft:
            if stage.data.source == "task":
                cfg = stage.data
                used |= {
                    p.id
                    for p in builtin_task.make_problems(
                        cfg.limit or cfg.task_size, cfg.task_levels, "train", recipe.stage_seed(stage), cfg.task
                    )
                }
        for seed in seeds:
            for stage in rl:
                used |= {p.id for p in load_stage_problems(stage, replace(recipe, seed=seed).stage_seed(stage))}
    out = []
    for level in ev.levels or module.EVAL_LEVELS:
        pool = builtin_task.make_problems(ev.problems_per_level * 4, (level,), "train", VALIDATION_SEED, ev.task)
        fresh = [p for p in pool if p.id not in used][: ev.problems_per_level]
        if len(fresh) < ev.problems_per_level:
            raise ConfigError(f"only {len(fresh)} validation problems of level {level} are unused by training")
        out += fresh
    return out


def run_sweep(
    study_dir: str | Path,
    settings: StudySettings | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    lrs: tuple[float, ...] = SWEEP_LRS,
) -> dict:
    """For every arm and learning rate: the arm's GRPO stages (first study seed) from its shared SFT model,
    scored on validation problems. Writes <study>/sweep/sweep.json and sweep.md; returns the table."""
    settings = settings or StudySettings()
    study_dir = Path(study_dir)
    recipes = load_arms(settings, list(overrides))
    ev = resolve_settings(settings.eval, next(iter(recipes.values())))
    sweep_dir = study_dir / "sweep"
    problems = validation_problems(recipes, settings.seeds, ev)
    write_problems(ev, sweep_dir / "validation.jsonl", problems)
    sft = _train_sft(recipes, study_dir)
    seed = settings.seeds[0]
    table: dict[str, dict[str, float]] = {}
    for arm, recipe in recipes.items():
        for lr in lrs:
            run_dir = sweep_dir / arm / f"lr{lr:g}"
            final = run_recipe(rl_recipe(recipe, sft[arm].model, seed, lr), run_dir)[-1].model
            out = run_dir / EVAL_DIR / "validation.json"
            if out.is_file():
                result = json.loads(out.read_text())["results"][0]
            else:
                result = evaluate_model(final, recipe, problems, ev, f"{arm}/lr{lr:g}", out, "validation")
            table.setdefault(arm, {})[f"{lr:g}"] = result["mean_at_k"]
            log.info("sweep %s lr %g: validation accuracy %.3f", arm, lr, result["mean_at_k"])
    best = {arm: max(row, key=row.get) for arm, row in table.items()}
    result = {
        "seed": seed,
        "lrs": [f"{lr:g}" for lr in lrs],
        "validation": table,
        "best_lr": best,
        "problems": len(problems),
        "k": ev.k,
    }
    atomic_write_text(sweep_dir / "sweep.json", json.dumps(result, indent=2) + "\n")
    atomic_write_text(sweep_dir / "sweep.md", sweep_markdown(result))
    return result


def sweep_markdown(result: dict) -> str:
    lines = [
        f"Validation accuracy (mean@{result['k']} on {result['problems']} training-split problems no stage trains on), "
        f"seed {result['seed']}, by RL learning rate; the best of each arm in bold.",
        "",
        "| arm | " + " | ".join(f"lr {lr}" for lr in result["lrs"]) + " |",
        "| --- |" + " --- |" * len(result["lrs"]),
    ]
    for arm, row in result["validation"].items():
        cells = [f"**{row[lr]:.3f}**" if lr == result["best_lr"][arm] else f"{row[lr]:.3f}" for lr in result["lrs"]]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------
# Summary.


def _read_eval(path: Path) -> tuple[dict, list[dict], str] | None:
    """(result, samples, the variant it sampled with) of an evaluation written by `evaluate.write_results`."""
    if not path.is_file():
        return None
    payload = json.loads(path.read_text())
    samples = path.with_name(payload.get("samples", ""))
    variant = payload.get("config", {}).get("variant", "unseen")
    return payload["results"][0], (read_jsonl(samples) if samples.is_file() else []), variant


def summarize_study(study_dir: str | Path) -> dict:
    """Read every evaluation back and aggregate over seeds; writes summary.json and study.md."""
    study_dir = Path(study_dir)
    info = json.loads((study_dir / STUDY_FILE).read_text())
    arms: dict[str, dict] = {}
    for arm in info["arms"]:
        seeds: dict[str, dict] = {}
        for seed in info["seeds"]:
            run_dir = study_dir / arm / f"seed{seed}"
            row = {}
            for ev in EVALS:
                found = _read_eval(run_dir / EVAL_DIR / f"{ev}.json")
                if found:
                    row[ev] = found[0]["mean_at_k"]
                    if ev == "heldout":
                        result = found[0]
                        row.update(
                            parallel_ratio=result["parallel_ratio"],
                            response_tokens=result["mean_response_tokens"],
                            longest_path_tokens=_positions(found[1], found[2]),
                        )
            if row:
                row["train_generated_tokens"] = _generated_tokens(run_dir)
                seeds[str(seed)] = row
        stats = {}
        for key in (*EVALS, "parallel_ratio", "response_tokens", "longest_path_tokens", "train_generated_tokens"):
            values = [row[key] for row in seeds.values() if row.get(key) is not None]
            if values:
                mean, se = mean_se(values)
                stats[key] = {"mean": mean, "se": se, "n": len(values), "values": values}
        sft = _sft_summary(study_dir, arm, info["task"])
        arms[arm] = {"seeds": seeds, "stats": stats, "sft": sft}
    baseline = arms.get(BASELINE, {}).get("stats", {}).get("heldout")
    for arm, entry in arms.items():
        held = entry["stats"].get("heldout")
        if arm != BASELINE and held and baseline:
            entry["vs_baseline"] = compare(held["values"], baseline["values"])
    summary = {"task": info["task"], "seeds": info["seeds"], "arms": arms, "timings": info.get("timings", {})}
    atomic_write_text(study_dir / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")
    atomic_write_text(study_dir / "study.md", markdown_table(summary))
    return summary


def _positions(samples: list[dict], variant: str) -> float | None:
    """Mean over responses of the positions a response occupies: with Unseen decoding a block's paths run
    side by side, so main-text tokens plus, per block, its longest path (what bounds latency and context);
    with Seen decoding every token takes a position of its own, and so with threads, whose summary re-reads
    the paths one after another."""
    if not samples or "path_tokens" not in samples[0]:
        return None
    if variant != "unseen":
        return sum(r["response_tokens"] for r in samples) / len(samples)
    total = 0.0
    for r in samples:
        paths = r.get("path_tokens") or []
        flat = [t for block in paths for t in block] if paths and isinstance(paths[0], list) else paths
        longest = sum(max(block) for block in paths) if paths and isinstance(paths[0], list) else max(paths, default=0)
        total += r["response_tokens"] - sum(flat) + longest
    return total / len(samples)


def _sft_summary(study_dir: Path, arm: str, task_name: str) -> dict:
    """The arm's shared SFT model: its evaluations and, for parallel models, the oracle figure."""
    for folder in sorted((study_dir / "sft").glob("*")):
        marker = folder / ARMS_FILE
        if not marker.is_file() or arm not in json.loads(marker.read_text()):
            continue
        out: dict = {"folder": folder.name}
        for ev in EVALS:
            found = _read_eval(folder / EVAL_DIR / f"{ev}.json")
            if found:
                out[ev] = found[0]["mean_at_k"]
                if ev == "heldout":
                    out["oracle"] = oracle(found[1], task_name)
        return out
    return {}


def _fmt(stat: dict | None, digits: int = 3) -> str:
    if not stat:
        return "-"
    return f"{stat['mean']:.{digits}f} ± {stat['se']:.{digits}f}"


def markdown_table(summary: dict) -> str:
    """The study's table: held-out accuracy (mean ± standard error over seeds) and its ablations."""
    lines = [
        f"Task `{summary['task']}`, seeds {summary['seeds']}; mean ± standard error over seeds.",
        "",
        "| arm | after SFT | after RL | vs sequential | blocks banned | Seen attention | block ratio "
        "| tokens / response | positions / response | RL tokens generated |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for arm, entry in summary["arms"].items():
        s, sft = entry["stats"], entry["sft"]
        vs = entry.get("vs_baseline")
        vs_text = f"{vs['diff']:+.3f} ± {vs['se']:.3f}{' *' if vs['significant'] else ''}" if vs else "-"
        tokens = s.get("train_generated_tokens")
        sft_acc = f"{sft['heldout']:.3f}" if "heldout" in sft else "-"
        tokens_text = f"{tokens['mean']:.0f}" if tokens else "-"
        lines.append(
            f"| {arm} | {sft_acc} | {_fmt(s.get('heldout'))} | {vs_text} "
            f"| {_fmt(s.get('no_blocks'))} | {_fmt(s.get('seen_attention'))} | {_fmt(s.get('parallel_ratio'), 2)} "
            f"| {_fmt(s.get('response_tokens'), 1)} | {_fmt(s.get('longest_path_tokens'), 1)} "
            f"| {tokens_text} |"
        )
    lines += ["", "`*`: the difference is larger than two standard errors."]
    return "\n".join(lines) + "\n"
