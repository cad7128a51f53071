"""What a finished `parallel-r1 study` shows: every evaluation read back, aggregated over seeds, and the
comparisons the study was built for, as `summary.json` and the markdown of `study.md` (the HTML page is
`study_report`).

* **Accuracy** per arm after SFT and after RL, mean over seeds, with standard errors that combine the seeds'
  spread (SFT and RL) and the problems', clustered by solving computation (`stats.arm_summary`).
* **The primary parallel arm against the controls and the baseline** at equal training budget, the same
  difference at equal test-time tokens (the sequential arm's majority vote over m samples, m the smallest
  whose tokens reach the primary arm's) and at equal positions (accuracy under position caps).
* **RL gains**, per seed (after RL minus the same seed's SFT model), and the difference of gains.
* **Reward schedules**: the parallel ratio of the schedule arms' rollouts, step by step, and its differences
  between schedules paired by seed.
* **Blocks examined** (`diagnostics`): duplicates, coverage, summary consistency and first-try entropy of the
  parallel arms' rollouts at the start and end of RL, and on held-out problems after SFT and after RL.
"""

from __future__ import annotations

import json
from pathlib import Path

from parallel_r1 import scaling, stats, study, tasks
from parallel_r1.data import load_problems
from parallel_r1.diagnostics import block_diagnostics
from parallel_r1.files import atomic_write_text, read_jsonl
from parallel_r1.layout import EVAL_DIR, STUDY_FILE, SUMMARY_FILE
from parallel_r1.settings import STUDY_RECIPES

CAPS = (24, 32, 48, 64, 96, 128, 192)
WINDOW = 5  # steps at the start and the end of a GRPO stage that the trajectories compare


def _samples(eval_json: Path) -> list[dict] | None:
    if not eval_json.is_file():
        return None
    payload = json.loads(eval_json.read_text())
    samples = eval_json.with_name(payload.get("samples", ""))
    return read_jsonl(samples) if samples.is_file() else None


def _variant(recipe) -> str:
    return recipe.stages[-1].variant


def load_results(study_dir: Path, info: dict) -> dict:
    """arm -> {"recipe", "sft": {seed: records}, "rl": {seed: records}} for what has been evaluated."""
    settings = study.StudySettings(arms=tuple(info["arms"]), seeds=tuple(info["seeds"]))
    recipes = study.load_arms(replace_dir(settings, info), list(info.get("overrides", [])))
    out = {}
    for arm, recipe in recipes.items():
        entry = {"recipe": recipe, "sft": {}, "rl": {}}
        for seed in info["seeds"]:
            sft = _samples(study.sft_dir(study_dir, recipe, seed) / EVAL_DIR / f"{study.HELDOUT}.json")
            rl = _samples(study_dir / arm / f"seed{seed}" / EVAL_DIR / f"{study.HELDOUT}.json")
            if sft:
                entry["sft"][str(seed)] = sft
            if rl:
                entry["rl"][str(seed)] = rl
        out[arm] = entry
    return out


def replace_dir(settings, info: dict):
    from dataclasses import replace

    return replace(settings, recipes_dir=Path(info.get("recipes_dir", STUDY_RECIPES)))


def _scores(by_seed: dict[str, list[dict]]) -> dict[str, dict[str, float]]:
    return {seed: scaling.per_problem(records) for seed, records in by_seed.items()}


def _mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _majority_over_seeds(by_seed: dict[str, list[dict]], variant: str) -> list[dict]:
    """`scaling.majority_curve` of each seed's model (a vote is among one model's samples), averaged."""
    curves = [scaling.majority_curve(records, variant) for records in by_seed.values()]
    n = min(len(c) for c in curves)
    return [
        {
            "m": curves[0][i]["m"],
            **{key: stats.mean([c[i][key] for c in curves]) for key in ("accuracy", "tokens", "positions")},
        }
        for i in range(n)
    ]


def _trajectory(run_dir: Path) -> list[dict]:
    """Per GRPO step of a run (stages in order): the step's parallel ratio, accuracy and generated tokens."""
    rows = []
    for metrics in sorted(run_dir.glob("*/metrics.jsonl")):
        for row in read_jsonl(metrics, allow_cut_last_line=True):
            if "parallel_ratio" in row:
                rows.append(
                    {
                        "stage": metrics.parent.name,
                        "step": row.get("step"),
                        "parallel_ratio": row["parallel_ratio"],
                        "accuracy": row.get("accuracy"),
                        "generated_tokens": row.get("generated_tokens", 0),
                    }
                )
    return rows


def _rollout_windows(run_dir: Path) -> dict[str, dict]:
    """`diagnostics.block_diagnostics` of the first and last WINDOW steps of every GRPO stage of a run."""
    out = {}
    for rollouts in sorted(run_dir.glob("*/rollouts.jsonl")):
        records = read_jsonl(rollouts, allow_cut_last_line=True)
        steps = sorted({r["step"] for r in records})
        if not steps:
            continue
        first, last = set(steps[:WINDOW]), set(steps[-WINDOW:])
        out[f"{rollouts.parent.name}/start"] = block_diagnostics([r for r in records if r["step"] in first])
        out[f"{rollouts.parent.name}/end"] = block_diagnostics([r for r in records if r["step"] in last])
    return out


def summarize_study(study_dir: str | Path) -> dict:
    """Read every evaluation and training log back and compute the study's comparisons; writes summary.json."""
    study_dir = Path(study_dir)
    info = json.loads((study_dir / STUDY_FILE).read_text())
    results = load_results(study_dir, info)
    problems = load_problems(str(study_dir / "data" / f"{study.HELDOUT}.jsonl"))
    cluster_of = {p.id: tasks.cluster_key(p, info["task"]) for p in problems}
    arms: dict[str, dict] = {}
    for arm, entry in results.items():
        variant = _variant(entry["recipe"])
        row: dict = {"variant": variant, "parallel": study.is_parallel(entry["recipe"]), "seeds": sorted(entry["rl"])}
        for when in ("sft", "rl"):
            by_seed = entry[when]
            if not by_seed:
                continue
            records = [r for rs in by_seed.values() for r in rs]
            row[when] = stats.arm_summary(_scores(by_seed), cluster_of)
            row[f"{when}_tokens"] = _mean([r["response_tokens"] for r in records])
            row[f"{when}_positions"] = _mean([scaling.response_positions(r, variant) for r in records])
            row[f"{when}_parallel_ratio"] = _mean([r["num_blocks"] > 0 for r in records])
            row[f"{when}_majority"] = _majority_over_seeds(by_seed, variant)
            row[f"{when}_caps"] = {
                str(cap): stats.arm_summary(
                    {s: scaling.per_problem_at_cap(rs, variant, cap) for s, rs in by_seed.items()}, cluster_of
                )
                for cap in CAPS
            }
            if row["parallel"]:
                row[f"{when}_blocks"] = block_diagnostics(records)
        shared = sorted(set(entry["sft"]) & set(entry["rl"]))
        if shared:
            before = [stats.mean(list(scaling.per_problem(entry["sft"][s]).values())) for s in shared]
            after = [stats.mean(list(scaling.per_problem(entry["rl"][s]).values())) for s in shared]
            gain, se = stats.mean_se([b - a for a, b in zip(before, after)])
            row["rl_gain"] = {"mean": gain, "se": se, "before": before, "after": after, "seeds": shared}
        runs = {seed: study_dir / arm / f"seed{seed}" for seed in entry["rl"]}
        row["trajectory"] = {seed: _trajectory(path) for seed, path in runs.items()}
        row["train_generated_tokens"] = _mean(
            [sum(r["generated_tokens"] for r in t) for t in row["trajectory"].values() if t]
        )
        if row["parallel"]:
            row["rollout_blocks"] = {seed: _rollout_windows(path) for seed, path in runs.items()}
        arms[arm] = row
    summary = {
        "task": info["task"],
        "seeds": info["seeds"],
        "primary": info.get("primary"),
        "arms": arms,
        "comparisons": compare_arms(results, arms, cluster_of, info.get("primary")),
        "schedules": (schedules := schedule_table(arms)),
        "schedule_differences": schedule_differences(schedules),
        "timings": info.get("timings", {}),
        "clusters": len(set(cluster_of.values())),
        "problems": len(cluster_of),
    }
    atomic_write_text(study_dir / SUMMARY_FILE, json.dumps(summary, indent=1) + "\n")
    return summary


def compare_arms(results: dict, arms: dict, cluster_of: dict[str, str], primary: str | None) -> dict:
    """The primary arm against every other arm at equal training budget, at equal test-time tokens (the other
    arm's maj@m) and under each position cap; every parallel arm against the baseline; RL gains against the
    baseline's."""
    out: dict = {
        "vs_baseline": {},
        "primary": {},
        "equal_tokens": {},
        "caps": {},
        "caps_vs_baseline": {},
        "rl_gain_vs_baseline": {},
    }
    rl = {arm: _scores(e["rl"]) for arm, e in results.items() if e["rl"]}
    base = study.BASELINE
    for arm in rl:
        if arm != base and base in rl:
            out["vs_baseline"][arm] = stats.arm_difference(rl[arm], rl[base], cluster_of)
            out["caps_vs_baseline"][arm] = _caps_difference(results, arms, arm, base, cluster_of)
            a, b = arms[arm].get("rl_gain"), arms[base].get("rl_gain")
            if a and b:
                out["rl_gain_vs_baseline"][arm] = stats.gain_difference(
                    a["before"], a["after"], b["before"], b["after"]
                )
    if not primary or primary not in rl:
        return out
    for arm in rl:
        if arm == primary:
            continue
        out["primary"][arm] = stats.arm_difference(rl[primary], rl[arm], cluster_of)
        tokens = arms[primary]["rl_tokens"]
        curve = arms[arm]["rl_majority"]
        m = next((row["m"] for row in curve if row["tokens"] >= tokens), curve[-1]["m"] if curve else None)
        if m is not None and m > 1:
            voted = {s: scaling.per_problem_majority(rs, m) for s, rs in results[arm]["rl"].items()}
            row = next(r for r in curve if r["m"] == m)
            out["equal_tokens"][arm] = {
                "m": m,
                "tokens": row["tokens"],
                "primary_tokens": tokens,
                **stats.arm_difference(rl[primary], voted, cluster_of),
            }
        out["caps"][arm] = _caps_difference(results, arms, primary, arm, cluster_of)
    return out


def _caps_difference(results: dict, arms: dict, a: str, b: str, cluster_of: dict[str, str]) -> dict:
    """Cap -> arm a minus arm b when a response must fit in the cap."""
    va, vb = arms[a]["variant"], arms[b]["variant"]
    return {
        str(cap): stats.arm_difference(
            {s: scaling.per_problem_at_cap(rs, va, cap) for s, rs in results[a]["rl"].items()},
            {s: scaling.per_problem_at_cap(rs, vb, cap) for s, rs in results[b]["rl"].items()},
            cluster_of,
        )
        for cap in CAPS
    }


def schedule_table(arms: dict) -> dict:
    """For the reward-schedule arms: the parallel ratio of their rollouts at the start and the end of each
    GRPO stage (the mean over its first and last `WINDOW` steps), mean and standard error over seeds, and
    each window's value per seed (`by_seed`)."""
    out = {}
    for arm in study.SCHEDULES:
        if arm not in arms:
            continue
        windows: dict[str, dict[str, float]] = {}
        for seed, rows in arms[arm]["trajectory"].items():
            for stage in dict.fromkeys(r["stage"] for r in rows):
                ratios = [r["parallel_ratio"] for r in rows if r["stage"] == stage]
                windows.setdefault(f"{stage}/start", {})[seed] = stats.mean(ratios[:WINDOW])
                windows.setdefault(f"{stage}/end", {})[seed] = stats.mean(ratios[-WINDOW:])
        out[arm] = {
            k: dict(zip(("mean", "se"), stats.mean_se(list(v.values()))), values=list(v.values()), by_seed=v)
            for k, v in windows.items()
        }
    return out


def schedule_differences(schedules: dict) -> dict:
    """Every pair of reward-schedule arms of one family (a before b in `study.SCHEDULE_FAMILIES` order): a's
    parallel ratio minus b's in each window of `schedule_table`, paired by seed (the arms of one seed share
    its SFT model, and those that share a stage's reward share that stage's draws), so the cold start's own
    spread cancels."""
    out = {}
    for family in study.SCHEDULE_FAMILIES:
        names = [a for a in family if a in schedules]
        for i, a in enumerate(names):
            for b in names[i + 1 :]:
                keys = [k for k in schedules[a] if k in schedules[b]]
                out[f"{a} - {b}"] = {
                    k: stats.paired_difference(schedules[a][k]["by_seed"], schedules[b][k]["by_seed"]) for k in keys
                }
    return out


# ---------------------------------------------------------------------------------------------------
# The markdown of study.md.


def _pm(stat: dict | None, digits: int = 3) -> str:
    return "-" if not stat else f"{stat['mean']:.{digits}f} ± {stat['se']:.{digits}f}"


def _diff(d: dict | None) -> str:
    if not d:
        return "-"
    mark = " **" if d.get("t_significant") else " *" if d.get("significant") else ""
    return f"{d['diff']:+.3f} ± {d['se']:.3f}{mark}"


def _num(value, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A markdown table's lines."""
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def markdown(summary: dict) -> str:
    """study.md: the tables of every comparison, with how to read them."""
    arms, comp = summary["arms"], summary["comparisons"]
    primary = summary.get("primary")
    lines = [
        f"Task `{summary['task']}`, seeds {summary['seeds']} (each seed trains its own SFT model), "
        f"{summary['problems']} held-out problems in {summary['clusters']} solving computations. "
        "Mean over seeds ± a standard error that adds the seeds' spread and the problems' (clustered by "
        "computation). `*`: beyond two standard errors; `**`: also beyond Student's t threshold for the "
        "seeds' degrees of freedom.",
        "",
        "## Accuracy at equal training budget",
        "",
    ]
    # With `--arms` the primary arm (or the baseline) may not have run: its comparisons are then left out.
    compared = bool(comp["primary"])
    rows = []
    for arm, row in arms.items():
        vs_primary = comp["primary"].get(arm)
        cells = [arm, _pm(row.get("sft")), _pm(row.get("rl")), _pm(row.get("rl_gain"))]
        cells.append(_diff(comp["vs_baseline"].get(arm)))
        if compared:
            cells.append(_diff({**vs_primary, "diff": -vs_primary["diff"]}) if vs_primary else "-")
        cells += [_num(row.get("rl_parallel_ratio"), 2), _num(row.get("rl_tokens")), _num(row.get("rl_positions"))]
        rows.append([*cells, _num(row.get("train_generated_tokens"), 0)])
    header = ["arm", "after SFT", "after RL", "RL gain (per seed)", "vs sequential", *([f"vs {primary}"] * compared)]
    header += ["block ratio", "tokens / response", "positions / response", "RL tokens"]
    lines += _table(header, rows)
    vs_note = f"`vs {primary}`: the arm minus {primary}. " if compared else ""
    lines += ["", vs_note + "RL gain: after RL minus the same seed's SFT model, mean ± standard error over seeds."]
    if comp["rl_gain_vs_baseline"]:
        lines += ["", "## RL gains against the baseline's", ""]
        lines += _table(
            ["arm", "its RL gain", "the baseline's", "difference"],
            [
                [arm, f"{g['gain_a']:+.3f} ± {g['se_a']:.3f}", f"{g['gain_b']:+.3f} ± {g['se_b']:.3f}", _diff(g)]
                for arm, g in comp["rl_gain_vs_baseline"].items()
            ],
        )
    lines += ["", "## At equal test-time tokens: majority vote over m samples"]
    if comp["equal_tokens"]:
        lines += [
            "",
            f"{primary}'s single response against the other arm's majority vote over the fewest samples whose "
            f"tokens reach {primary}'s (ties split the credit).",
            "",
        ]
        lines += _table(
            ["arm", "m", "its tokens", f"{primary}'s tokens", f"{primary} minus the arm's maj@m"],
            [
                [arm, str(e["m"]), f"{e['tokens']:.1f}", f"{e['primary_tokens']:.1f}", _diff(e)]
                for arm, e in comp["equal_tokens"].items()
            ],
        )
    ms = sorted({r["m"] for row in arms.values() for r in row.get("rl_majority", [])})
    lines += [
        "",
        "maj@m after RL (accuracy / tokens / positions of the m samples decoded side by side), mean over seeds:",
        "",
    ]
    rows = []
    for arm, row in arms.items():
        by_m = {r["m"]: r for r in row.get("rl_majority", [])}
        cells = [
            f"{by_m[m]['accuracy']:.3f} / {by_m[m]['tokens']:.0f} / {by_m[m]['positions']:.0f}" if m in by_m else "-"
            for m in ms
        ]
        rows.append([arm, *cells])
    lines += _table(["arm", *(f"m={m}" for m in ms)], rows)
    cap_header = ["arm", *(f"cap {c}" for c in CAPS)]
    lines += [
        "",
        "## At equal positions: accuracy under a position cap",
        "",
        "A response must fit in the cap (Unseen: main text plus each block's longest path).",
        "",
    ]
    lines += _table(
        cap_header, [[arm, *(_pm(row.get("rl_caps", {}).get(str(c))) for c in CAPS)] for arm, row in arms.items()]
    )
    for title, key in (
        (f"{primary} minus each arm under the same cap:", "caps"),
        ("Each arm minus sequential under the same cap:", "caps_vs_baseline"),
    ):
        if comp.get(key):
            lines += ["", title, ""]
            lines += _table(
                cap_header, [[arm, *(_diff(by_cap.get(str(c))) for c in CAPS)] for arm, by_cap in comp[key].items()]
            )
    if summary["schedules"]:
        keys = list(dict.fromkeys(k for row in summary["schedules"].values() for k in row))
        lines += [
            "",
            "## Reward schedules: block use of the rollouts",
            "",
            f"Parallel ratio of the GRPO rollouts, first and last {WINDOW} steps of each stage, mean ± standard "
            "error over seeds (the schedule arms' cold start leaves opening a block to the policy).",
            "",
        ]
        lines += _table(
            ["arm", *keys, "held-out after RL"],
            [
                [arm, *(_pm(row.get(k), 2) for k in keys), _num(arms[arm].get("rl_parallel_ratio"), 2)]
                for arm, row in summary["schedules"].items()
            ],
        )
        if summary.get("schedule_differences"):
            lines += [
                "",
                "Differences of the parallel ratio between schedules in the same windows, paired by seed (the arms "
                "of a seed share its SFT model); `*` beyond two standard errors, `**` also beyond Student's t "
                "threshold for seeds - 1 degrees of freedom.",
                "",
            ]
            lines += _table(
                ["pair", *keys],
                [[pair, *(_diff(row.get(k)) for k in keys)] for pair, row in summary["schedule_differences"].items()],
            )
    parallel = [a for a, row in arms.items() if row.get("rl_blocks")]
    if parallel:
        lines += [
            "",
            "## Blocks examined",
            "",
            "Held-out responses after SFT and after RL, and GRPO rollouts at the start and end of the harder stage. "
            "dup: blocks whose paths try a candidate twice; cov: responses that try the right candidate; "
            "sum: summaries that name what their paths found; H: entropy (bits) of a prompt's first tries.",
            "",
        ]
        header = ["arm", "after SFT dup / cov / sum", "after RL dup / cov / sum", "rollouts start H / dup"]
        rows = []
        for arm in parallel:
            row, stage = arms[arm], _last_stage(arms[arm])
            rows.append(
                [
                    arm,
                    _triple(row.get("sft_blocks")),
                    _triple(row.get("rl_blocks")),
                    _window(row, f"{stage}/start"),
                    _window(row, f"{stage}/end"),
                ]
            )
        lines += _table([*header, "rollouts end H / dup"], rows)
    timings = summary.get("timings", {})
    if "total" in timings:
        lines += ["", f"The study took {timings['total'] / 60:.1f} minutes."]
    return "\n".join(lines) + "\n"


def _triple(d: dict | None) -> str:
    if not d:
        return "-"
    return f"{_num(d['duplicate_rate'], 2)} / {_num(d['coverage'], 2)} / {_num(d['summary_consistency'], 2)}"


def _window(row: dict, which: str) -> str:
    """First-try entropy / duplicate rate of one window of the rollouts, mean over seeds."""
    values = [w[which] for w in row.get("rollout_blocks", {}).values() if w.get(which)]
    if not values:
        return "-"
    entropy = _mean([v["first_try_entropy"] for v in values])
    return f"{_num(entropy, 2)} / {_num(_mean([v['duplicate_rate'] for v in values]), 2)}"


def _last_stage(row: dict) -> str:
    for trajectory in row.get("trajectory", {}).values():
        if trajectory:
            return trajectory[-1]["stage"]
    return ""


def write_study_outputs(study_dir: str | Path, summary: dict) -> Path:
    """study.md and report.html of a summary; returns the report's path."""
    from parallel_r1.study_report import write_study_report

    study_dir = Path(study_dir)
    text = markdown(summary)
    atomic_write_text(study_dir / "study.md", text)
    return write_study_report(study_dir, summary, text)
