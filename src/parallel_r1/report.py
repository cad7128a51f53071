"""The HTML report of a `parallel-r1 run`: one self-contained page that shows the method working.

It reads a run folder as the pipeline writes it::

    <run>/run.json                       labels of the recipes in order, timings, eval settings (optional)
    <run>/<label>/recipe.yaml            one folder per recipe (a `recipe.run_recipe` directory)
    <run>/<label>/NN-<stage>/metrics.jsonl      per-step training metrics of each stage
    <run>/<label>/NN-<stage>/rollouts.jsonl     GRPO stages: every sampled response with its reward
    <run>/<label>/eval/NN-<stage>.json          held-out evaluation after the stage (`evaluate.write_results`)

and writes `report.html` (plots as base64 PNGs, nothing fetched), the same figures under `figures/`, and
`summary.json`: the evidence the page states (held-out accuracy after SFT and after RL per recipe, the
parallel ratio at every stage, the baseline beside the parallel recipe). The evidence is embedded in the
page too, as JSON in `<script type="application/json" id="evidence">`. The page template and the figure
helpers serve the study's report too (`study_report.py`).
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from parallel_r1 import stats
from parallel_r1.analysis import analyze_records
from parallel_r1.files import read_jsonl
from parallel_r1.layout import FIGURES_DIR, REPORT_FILE, RUN_FILE, STAGE_DIR, SUMMARY_FILE, eval_file
from parallel_r1.viewer import CSS as VIEWER_CSS

log = logging.getLogger(__name__)

_LEVEL = re.compile(r"(?:^|/)(?:arith|search)-L(\d+)-")
STRATEGY_BUCKETS = 12


@dataclass
class StageRun:
    """What one stage of one recipe left behind."""

    index: int
    name: str
    kind: str  # "sft" | "grpo"
    metrics: list[dict]
    rollouts: Path | None  # GRPO: rollouts.jsonl
    eval: dict | None  # `evaluate.BenchmarkResult` as a dict, held-out evaluation after the stage
    eval_samples: Path | None


@dataclass
class RecipeRun:
    label: str
    directory: Path
    stages: list[StageRun]


@dataclass
class RecipeEvidence:
    """The numbers one recipe contributes to the report's claims."""

    label: str
    heldout_accuracy: dict[str, float]  # stage -> held-out mean@k after it, in stage order
    heldout_parallel_ratio: dict[str, float]  # stage -> share of held-out responses with a block
    train_parallel_ratio: dict[str, float]  # GRPO stage -> share of sampled responses with a block
    sft_accuracy: float | None  # after the last SFT stage
    rl_accuracy: float | None  # after the last stage, when it is a GRPO stage
    rl_gain: float | None  # rl_accuracy - sft_accuracy
    final_se: float | None = None  # standard error of the last stage's held-out accuracy, over problems
    vs_baseline: dict | None = None  # last stage against the baseline's on the same problems: diff, se, significant
    vs_others: dict[str, dict] = field(default_factory=dict)  # label -> the same against every other recipe


@dataclass
class Evidence:
    recipes: list[RecipeEvidence]
    rl_beats_sft: dict[str, bool] = field(default_factory=dict)  # label -> held-out accuracy rose with RL
    timings: dict[str, float] = field(default_factory=dict)  # seconds per phase, from run.json


# ---------------------------------------------------------------------------------------------------
# Reading a run folder.


def _read_run_file(run_dir: Path) -> dict:
    path = run_dir / RUN_FILE
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON: {exc}") from None


def _load_eval(recipe_dir: Path, stage_dir: Path) -> tuple[dict | None, Path | None]:
    path = eval_file(recipe_dir, stage_dir)
    if not path.is_file():
        return None, None
    try:
        payload = json.loads(path.read_text())
        result = payload["results"][0]
    except (json.JSONDecodeError, KeyError, IndexError, TypeError) as exc:
        raise ValueError(f"{path}: not an evaluation result written by evaluate.write_results ({exc})") from None
    samples = path.with_name(payload.get("samples", ""))
    return result, samples if samples.is_file() else None


def load_recipe_run(directory: str | Path, label: str | None = None) -> RecipeRun:
    """The stages of one recipe folder, in order, with their metrics and evaluations."""
    directory = Path(directory)
    stages = []
    for sub in sorted(p for p in directory.iterdir() if p.is_dir()):
        match = STAGE_DIR.match(sub.name)
        if not match or not (sub / "metrics.jsonl").is_file():
            continue
        metrics = read_jsonl(sub / "metrics.jsonl")
        rollouts = sub / "rollouts.jsonl"
        kind = "grpo" if rollouts.is_file() or any("reward" in m for m in metrics) else "sft"
        result, samples = _load_eval(directory, sub)
        stages.append(
            StageRun(
                index=int(match.group(1)),
                name=match.group(2),
                kind=kind,
                metrics=metrics,
                rollouts=rollouts if rollouts.is_file() else None,
                eval=result,
                eval_samples=samples,
            )
        )
    if not stages:
        raise ValueError(f"{directory}: no stage folders (NN-<stage>/metrics.jsonl) in this recipe folder")
    return RecipeRun(label or directory.name, directory, sorted(stages, key=lambda s: s.index))


def load_run(run_dir: str | Path) -> list[RecipeRun]:
    """Every recipe of a run folder: in run.json's order when it lists them, else by folder name."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: no such run folder")
    listed = [r["label"] for r in _read_run_file(run_dir).get("recipes", [])]
    found = sorted(p.name for p in run_dir.iterdir() if (p / "recipe.yaml").is_file())
    labels = [x for x in listed if x in found] + [x for x in found if x not in listed]
    if not labels:
        raise ValueError(f"{run_dir}: no recipe folder (a sub-folder with recipe.yaml) in this run folder")
    return [load_recipe_run(run_dir / label, label) for label in labels]


# ---------------------------------------------------------------------------------------------------
# The evidence.


def _tail_mean(values: list[float], share: float = 0.25) -> float:
    """Mean of the last `share` of `values` (at least one): where a stage ended, less noisy than one step."""
    tail = values[-max(1, round(len(values) * share)) :]
    return sum(tail) / len(tail)


def per_problem_accuracy(samples: Path | None) -> dict[str, float]:
    """Problem id -> share of its samples that are correct, from an eval's samples file."""
    if samples is None:
        return {}
    groups: dict[str, list[bool]] = {}
    for r in read_jsonl(samples):
        groups.setdefault(str(r["problem_id"]), []).append(bool(r["correct"]))
    return {pid: sum(v) / len(v) for pid, v in groups.items()}


def paired_difference(
    a: dict[str, float], b: dict[str, float], cluster_of: dict[str, str] | None = None
) -> dict | None:
    """Mean of a - b over the problems both were evaluated on, its standard error (clustered by solving
    computation when `cluster_of` maps problems to it: problems that share one are not independent), and
    whether it exceeds two standard errors. Problems are the unit: the same problems, so the difference is
    paired; one training seed, so the seeds' spread is not in it."""
    shared = sorted(set(a) & set(b))
    if len(shared) < 2:
        return None
    diffs = {p: a[p] - b[p] for p in shared}
    diff = stats.mean(list(diffs.values()))
    se = stats.clustered_se(diffs, cluster_of) if cluster_of else stats.standard_error(list(diffs.values()))
    return {"diff": diff, "se": se, "problems": len(shared), "significant": bool(se > 0 and abs(diff) > 2 * se)}


def heldout_clusters(run_dir: Path, task: str | None) -> dict[str, str] | None:
    """Problem id -> solving computation, for the held-out problems of a run on a built-in task."""
    path = run_dir / "data" / "heldout.jsonl"
    if not task or not path.is_file():
        return None
    from parallel_r1 import tasks
    from parallel_r1.data import load_problems

    return {p.id: tasks.cluster_key(p, task) for p in load_problems(str(path))}


def recipe_evidence(run: RecipeRun) -> RecipeEvidence:
    evaluated = [s for s in run.stages if s.eval is not None]
    acc = {s.name: float(s.eval["mean_at_k"]) for s in evaluated}
    par = {s.name: float(s.eval["parallel_ratio"]) for s in evaluated}
    train_par = {
        s.name: _tail_mean([float(m["parallel_ratio"]) for m in s.metrics])
        for s in run.stages
        if s.kind == "grpo" and s.metrics and "parallel_ratio" in s.metrics[0]
    }
    sft = [s for s in run.stages if s.kind == "sft"]
    last = run.stages[-1]
    sft_acc = acc.get(sft[-1].name) if sft else None
    rl_acc = acc.get(last.name) if last.kind == "grpo" else None
    gain = rl_acc - sft_acc if rl_acc is not None and sft_acc is not None else None
    final = per_problem_accuracy(last.eval_samples)
    final_se = stats.standard_error(list(final.values())) if final else None
    return RecipeEvidence(run.label, acc, par, train_par, sft_acc, rl_acc, gain, final_se)


def build_evidence(
    runs: list[RecipeRun], timings: dict[str, float] | None = None, cluster_of: dict[str, str] | None = None
) -> Evidence:
    recipes = [recipe_evidence(r) for r in runs]
    # The first recipe is the parallel one, the others (its controls, the baseline last) are set against it on
    # the same held-out problems.
    first = per_problem_accuracy(runs[0].stages[-1].eval_samples)
    for run in runs[1:]:
        other = per_problem_accuracy(run.stages[-1].eval_samples)
        recipes[0].vs_others[run.label] = paired_difference(first, other, cluster_of)
    if len(runs) > 1:
        recipes[0].vs_baseline = recipes[0].vs_others[runs[-1].label]
    beats = {r.label: r.rl_gain > 0 for r in recipes if r.rl_gain is not None}
    return Evidence(recipes, beats, dict(timings or {}))


# ---------------------------------------------------------------------------------------------------
# Figures.


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def png_bytes(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    pyplot().close(fig)
    return buffer.getvalue()


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average over `window` values (fewer at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def _grpo_series(run: RecipeRun, key: str) -> tuple[list[int], list[float], list[int]]:
    """(global step, value, stage boundaries) of a GRPO metric across the recipe's GRPO stages."""
    xs, ys, bounds, offset = [], [], [], 0
    for stage in (s for s in run.stages if s.kind == "grpo"):
        if offset:
            bounds.append(offset)
        for m in stage.metrics:
            if key in m:
                xs.append(offset + int(m["step"]))
                ys.append(float(m[key]))
        offset += max((int(m["step"]) for m in stage.metrics), default=0)
    return xs, ys, bounds


def plot_training(runs: list[RecipeRun]) -> bytes:
    """Reward, training accuracy and parallel ratio over the RL steps of every recipe, and the SFT loss."""
    plt = pyplot()
    fig, axes = plt.subplots(3, 2, figsize=(12, 11))
    panels = [
        ("reward", "reward (GRPO)", axes[0][0]),
        ("accuracy", "training accuracy (sampled responses)", axes[0][1]),
        ("parallel_ratio", "parallel ratio (responses with a block)", axes[1][0]),
        ("paths_per_block", "paths per block (rollouts)", axes[2][0]),
        ("block_depth", "depth of the deepest block (rollouts with a block)", axes[2][1]),
    ]
    for key, title, ax in panels:
        for i, run in enumerate(runs):
            xs, ys, bounds = _grpo_series(run, key)
            if not xs:
                continue
            color = f"C{i}"
            ax.plot(xs, ys, color=color, alpha=0.25, linewidth=1)
            ax.plot(xs, smooth(ys, max(1, len(ys) // 10)), color=color, linewidth=2, label=run.label)
            for b in bounds:
                ax.axvline(b + 0.5, color="grey", linestyle=":", linewidth=1)
        ax.set_title(title)
        ax.set_xlabel("RL step (stages one after another)")
        if ax.lines:
            ax.legend()
    ax = axes[1][1]
    for i, run in enumerate(runs):
        for stage in (s for s in run.stages if s.kind == "sft"):
            steps = [int(m["step"]) for m in stage.metrics if "loss" in m]
            losses = [float(m["loss"]) for m in stage.metrics if "loss" in m]
            ax.plot(steps, losses, color=f"C{i}", label=f"{run.label} / {stage.name}")
    ax.set_title("SFT loss (response tokens)")
    ax.set_xlabel("SFT step")
    ax.set_yscale("log")
    if ax.lines:
        ax.legend()
    fig.tight_layout()
    return png_bytes(fig)


def plot_heldout(evidence: Evidence) -> bytes:
    """Held-out accuracy and parallel ratio after each stage, recipes side by side."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    stages = list(dict.fromkeys(name for r in evidence.recipes for name in r.heldout_accuracy))
    width = 0.8 / max(1, len(evidence.recipes))
    for ax, attr, title in (
        (axes[0], "heldout_accuracy", "held-out accuracy (mean@k) after each stage"),
        (axes[1], "heldout_parallel_ratio", "held-out parallel ratio after each stage"),
    ):
        for i, r in enumerate(evidence.recipes):
            values = getattr(r, attr)
            xs = [j + (i - (len(evidence.recipes) - 1) / 2) * width for j, s in enumerate(stages) if s in values]
            ys = [values[s] for s in stages if s in values]
            bars = ax.bar(xs, ys, width, label=r.label, color=f"C{i}")
            ax.bar_label(bars, fmt="%.2f", fontsize=8)
        ax.set_xticks(range(len(stages)), stages)
        ax.set_ylim(0, 1.05)
        ax.set_title(title)
        ax.legend()
    fig.tight_layout()
    return png_bytes(fig)


def _training_rollouts(run: RecipeRun, buckets: int = STRATEGY_BUCKETS) -> list[dict]:
    """The recipe's GRPO rollouts with "response" set and "step" coarsened to a global step bucket."""
    stages = [s for s in run.stages if s.kind == "grpo" and s.rollouts is not None]
    records, offset = [], 0
    for stage in stages:
        last = 0
        for r in read_jsonl(stage.rollouts):
            response = r.get("response")
            if not isinstance(response, str):
                raise ValueError(f"{stage.rollouts}: a rollout record needs a string 'response'")
            records.append({"step": offset + int(r["step"]), "response": response, "correct": r.get("correct")})
            last = max(last, int(r["step"]))
        offset += last
    width = max(1, -(-offset // buckets))
    for r in records:
        r["step"] = (r["step"] - 1) // width * width + 1
    return records


def plot_strategy(run: RecipeRun, directory: Path) -> Path | None:
    """Where blocks sit over training and their role (`analysis.plot_summaries`); None without blocks."""
    from parallel_r1.analysis import plot_summaries

    records = _training_rollouts(run)
    summaries = analyze_records(records) if records else []
    if not any(s.num_blocks for s in summaries):
        return None
    directory.mkdir(parents=True, exist_ok=True)
    return plot_summaries(summaries, directory / f"strategy-{run.label}.png", "RL step (bucket start)")


# ---------------------------------------------------------------------------------------------------
# The page.

CSS = """
body.report{font-family:system-ui,sans-serif;max-width:1200px;margin:0 auto;padding:16px;background:#f4f5f7}
h1{font-size:22px}h2{font-size:18px;margin-top:28px;border-bottom:1px solid #ccd}
table.results{border-collapse:collapse;background:#fff;font-size:13px}
table.results th,table.results td{border:1px solid #d8dbe0;padding:4px 8px;text-align:right}
table.results th:first-child,table.results td:first-child,table.results td:nth-child(2){text-align:left}
.verdict{font-size:15px;padding:8px 12px;border-radius:4px;background:#fff;border-left:5px solid #999}
.verdict.yes{border-left-color:#2e9e4f}.verdict.no{border-left-color:#d0463b}
img.plot{max-width:100%;background:#fff;border:1px solid #d8dbe0}
"""


def img_tag(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img class="plot" alt="{html.escape(alt, quote=True)}" src="data:image/png;base64,{data}">'


def _level_accuracy(samples: Path | None) -> dict[int, float]:
    """Held-out accuracy per task level, from the problem ids of the evaluation samples."""
    if samples is None:
        return {}
    by_level: dict[int, list[bool]] = {}
    for r in read_jsonl(samples):
        match = _LEVEL.search(str(r.get("problem_id", "")))
        if match:
            by_level.setdefault(int(match.group(1)), []).append(bool(r["correct"]))
    return {lv: sum(v) / len(v) for lv, v in sorted(by_level.items())}


def results_table(runs: list[RecipeRun]) -> str:
    """One row per recipe and evaluated stage: the held-out metrics of `evaluate`, and accuracy per level."""
    rows = [(run, s, _level_accuracy(s.eval_samples)) for run in runs for s in run.stages if s.eval is not None]
    levels = sorted({lv for _, _, acc in rows for lv in acc})
    head = ["recipe", "stage", "problems", "k", "mean@k", "pass@k", "maj@k", "parallel ratio", "well-formed"]
    head += ["blocks/resp", "resp tokens", "path tokens", *[f"L{lv}" for lv in levels]]
    lines = ["<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"]
    for run, stage, by_level in rows:
        e = stage.eval
        cells = [run.label, stage.name, str(e["num_problems"]), str(e["k"]), f"{e['mean_at_k']:.3f}"]
        cells += [f"{e['pass_at'].get(str(e['k']), float('nan')):.3f}", f"{e['maj_at_k']:.3f}"]
        cells += [f"{e['parallel_ratio']:.2f}", f"{e['well_formed_ratio']:.2f}", f"{e['blocks_per_response']:.2f}"]
        cells += [f"{e['mean_response_tokens']:.0f}", f"{e['mean_path_tokens']:.0f}"]
        cells += [f"{by_level[lv]:.2f}" if lv in by_level else "-" for lv in levels]
        lines.append(
            f'<tr data-recipe="{html.escape(run.label, quote=True)}">'
            + "".join(f"<td>{html.escape(c)}</td>" for c in cells)
            + "</tr>"
        )
    return '<table class="results">' + "".join(lines) + "</table>"


def _stage_table(runs: list[RecipeRun], evidence: Evidence) -> str:
    """Parallel ratio at every stage: held-out after the stage, and while training for GRPO stages."""
    lines = [
        "<tr><th>recipe</th><th>stage</th><th>kind</th><th>steps</th><th>held-out parallel ratio</th>"
        "<th>training parallel ratio (last quarter)</th><th>seconds</th></tr>"
    ]
    for run, ev in zip(runs, evidence.recipes):
        for s in run.stages:
            held = ev.heldout_parallel_ratio.get(s.name)
            train = ev.train_parallel_ratio.get(s.name)
            seconds = evidence.timings.get(f"{run.label}/{s.name}")
            cells = [run.label, s.name, s.kind, str(max((int(m["step"]) for m in s.metrics), default=0))]
            cells += ["-" if held is None else f"{held:.2f}", "-" if train is None else f"{train:.2f}"]
            cells.append("-" if seconds is None else f"{seconds:.0f}")
            lines.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
    return '<table class="results">' + "".join(lines) + "</table>"


def _verdicts(evidence: Evidence) -> str:
    out = []
    for r in evidence.recipes:
        if r.rl_gain is None:
            continue
        ok = r.rl_gain > 0
        out.append(
            f'<p class="verdict {"yes" if ok else "no"}"><b>{html.escape(r.label)}</b>: held-out accuracy '
            f"{r.sft_accuracy:.3f} after SFT, {r.rl_accuracy:.3f} after RL "
            f"({r.rl_gain:+.3f}: RL {'improved' if ok else 'did not improve'} on SFT).</p>"
        )
    finals = [r for r in evidence.recipes if r.rl_accuracy is not None]
    if len(finals) > 1:
        text = ", ".join(f"{html.escape(r.label)} {r.rl_accuracy:.3f} ± {r.final_se or 0:.3f}" for r in finals)
        out.append(
            f'<p class="verdict">Final held-out accuracy, same budget (± standard error over problems): {text}.</p>'
        )
        for label, vs in finals[0].vs_others.items():
            if not vs:
                continue
            if not vs["significant"]:
                how = "within two standard errors: this run shows no difference"
            else:
                how = "more than two standard errors " + ("above" if vs["diff"] > 0 else "below")
            out.append(
                f'<p class="verdict">{html.escape(finals[0].label)} minus {html.escape(label)}, paired over '
                f"{vs['problems']} held-out problems (standard error clustered by solving computation): "
                f"{vs['diff']:+.3f} ± {vs['se']:.3f} ({how}).</p>"
            )
        if finals[0].vs_others:
            out.append(
                '<p class="verdict">One training seed: the figures move from seed to seed (SFT included), and '
                "<code>parallel-r1 study</code> repeats the comparison over seeds with their spread.</p>"
            )
    return "".join(out)


def pick_rollouts(samples: list[dict], limit: int = 4) -> list[dict]:
    """A few evaluation samples worth reading: correct ones with blocks first, then a wrong one, then the rest."""
    has_block = lambda r: r.get("num_blocks", 0) > 0  # noqa: E731
    tiers = [
        [r for r in samples if r.get("correct") and has_block(r)][: max(1, limit - 2)],
        [r for r in samples if not r.get("correct") and has_block(r)][:1],
        [r for r in samples if not r.get("correct")][:1],
        samples,
    ]
    chosen: list[dict] = []
    for tier in tiers:
        for r in tier:
            if len(chosen) < limit and all(r is not c for c in chosen):
                chosen.append(r)
    return chosen


def _rollouts_section(runs: list[RecipeRun]) -> str:
    from parallel_r1.viewer import render_card

    parts = []
    for run in runs:
        final = next((s for s in reversed(run.stages) if s.eval_samples is not None), None)
        if final is None:
            continue
        chosen = pick_rollouts(read_jsonl(final.eval_samples), limit=4 if len(parts) == 0 else 2)
        parts.append(f"<h3>{html.escape(run.label)}, after {html.escape(final.name)}</h3>")
        parts.extend(render_card(r) for r in chosen)
    return "".join(parts)


def timings_line(timings: dict[str, float]) -> str:
    if not timings:
        return ""
    total = timings.get("total")
    phases = ", ".join(f"{html.escape(k)} {v:.0f} s" for k, v in timings.items() if k != "total")
    head = f"Total {total / 60:.1f} min. " if total is not None else ""
    return f"<p>{head}{phases}.</p>"


def html_page(title: str, body: str, evidence_json: str) -> str:
    """A self-contained report page: `body`, the styles, and the evidence embedded as JSON (`read_evidence`)."""
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; style-src 'unsafe-inline'; img-src data:">
<style>{VIEWER_CSS}{CSS}</style></head>
<body class="report">{body}
<script type="application/json" id="evidence">{evidence_json}</script>
</body></html>
"""


def render_report(run_dir: str | Path, title: str | None = None) -> tuple[str, Evidence]:
    """(HTML page, evidence) for a run folder; writes the figures under `<run>/figures/`."""
    run_dir = Path(run_dir)
    info = _read_run_file(run_dir)
    runs = load_run(run_dir)
    evidence = build_evidence(runs, info.get("timings"), heldout_clusters(run_dir, info.get("eval", {}).get("task")))
    figures = run_dir / FIGURES_DIR
    figures.mkdir(parents=True, exist_ok=True)
    training, heldout = plot_training(runs), plot_heldout(evidence)
    (figures / "training.png").write_bytes(training)
    (figures / "heldout.png").write_bytes(heldout)
    strategy = [(run.label, plot_strategy(run, figures)) for run in runs]
    strategy_html = (
        "".join(
            f"<h3>{html.escape(label)}</h3>{img_tag(path.read_bytes(), f'block positions, {label}')}"
            for label, path in strategy
            if path is not None
        )
        or "<p>No response opened a parallel block during RL.</p>"
    )
    evidence_json = json.dumps(asdict(evidence), indent=1).replace("</", "<\\/")
    settings = info.get("eval", {})
    settings_line = ", ".join(f"{html.escape(str(k))}={html.escape(str(v))}" for k, v in settings.items())
    title = title or f"parallel-r1 run: {run_dir.name}"
    body = f"""<h1>{html.escape(title)}</h1>
{_verdicts(evidence)}
{timings_line(evidence.timings)}
<h2>Held-out evaluation</h2>
<p>Problems the training never saw (the task's held-out split). {settings_line}</p>
{results_table(runs)}
{img_tag(heldout, "held-out accuracy and parallel ratio per stage")}
<h2>Parallel ratio at every stage</h2>
{_stage_table(runs, evidence)}
<h2>Training</h2>
{img_tag(training, "reward, accuracy, parallel ratio and SFT loss over training")}
<h2>Where blocks appear over training</h2>
<p>Relative position of each block in its response, and its role: exploration (no candidate answer
in the main thread yet) or verification (the main thread already stated one).</p>
{strategy_html}
<h2>Rollouts</h2>
<p>Held-out responses after the last stage; each block's paths side by side.</p>
{_rollouts_section(runs)}"""
    return html_page(title, body, evidence_json), evidence


def write_report(run_dir: str | Path, title: str | None = None) -> Path:
    """Write `<run>/report.html` and `<run>/summary.json`; return the page's path."""
    run_dir = Path(run_dir)
    page, evidence = render_report(run_dir, title)
    (run_dir / SUMMARY_FILE).write_text(json.dumps(asdict(evidence), indent=2) + "\n")
    out = run_dir / REPORT_FILE
    out.write_text(page, encoding="utf-8")
    return out


def read_evidence(report: str | Path) -> dict:
    """The evidence JSON embedded in a report page."""
    text = Path(report).read_text(encoding="utf-8")
    match = re.search(r'<script type="application/json" id="evidence">(.*?)</script>', text, re.DOTALL)
    if match is None:
        raise ValueError(f"{report}: no embedded evidence (not a parallel-r1 report?)")
    return json.loads(match.group(1).replace("<\\/", "</"))
