"""The HTML report of a `parallel-r1 study`: the verdict about the primary parallel arm against its controls,
the study's tables (`study_summary.markdown`) and four plots (accuracy per arm; majority vote against
test-time tokens; accuracy under a position cap; block use of the reward-schedule arms step by step), on the
page template of the run's report (`report.html_page`)."""

from __future__ import annotations

import html
import json
from pathlib import Path

from parallel_r1.layout import FIGURES_DIR, REPORT_FILE
from parallel_r1.report import html_page, img_tag, png_bytes, pyplot, timings_line


def plot_accuracy(summary: dict) -> bytes:
    """Held-out accuracy per arm after SFT and after RL (mean and standard error over seeds and problems)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(11, 4.2))
    arms = list(summary["arms"])
    for i, (key, label) in enumerate((("sft", "after SFT"), ("rl", "after RL"))):
        xs = [j + (i - 0.5) * 0.4 for j, arm in enumerate(arms) if summary["arms"][arm].get(key)]
        stats = [summary["arms"][arm][key] for arm in arms if summary["arms"][arm].get(key)]
        if xs:
            bars = ax.bar(xs, [s["mean"] for s in stats], 0.4, yerr=[s["se"] for s in stats], capsize=3, label=label)
            ax.bar_label(bars, fmt="%.2f", fontsize=7, padding=2)
    ax.set_xticks(range(len(arms)), arms, rotation=20)
    ax.set_ylabel("held-out accuracy")
    ax.set_ylim(0, 1.05)
    ax.legend()
    fig.tight_layout()
    return png_bytes(fig)


def plot_budgets(summary: dict) -> bytes:
    """Left: maj@m accuracy against mean test-time tokens; right: accuracy under a position cap."""
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2))
    for arm, row in summary["arms"].items():
        curve = row.get("rl_majority") or []
        if curve:
            left.plot([r["tokens"] for r in curve], [r["accuracy"] for r in curve], marker="o", ms=3, label=arm)
        caps = row.get("rl_caps") or {}
        if caps:
            xs = sorted(int(c) for c in caps)
            right.plot(xs, [caps[str(c)]["mean"] for c in xs], marker="o", ms=3, label=arm)
    left.set_xlabel("test-time tokens (m samples)")
    left.set_ylabel("maj@m accuracy")
    left.set_xscale("log")
    right.set_xlabel("position cap")
    right.set_ylabel("accuracy within the cap")
    right.set_xscale("log")
    left.legend(fontsize=7)
    fig.tight_layout()
    return png_bytes(fig)


def plot_schedules(summary: dict) -> bytes | None:
    """Parallel ratio of the rollouts per GRPO step (mean over seeds) of the reward-schedule arms."""
    rows = {arm: summary["arms"][arm]["trajectory"] for arm in summary.get("schedules", {})}
    if not rows:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(11, 3.6))
    for arm, by_seed in rows.items():
        series = [[r["parallel_ratio"] for r in t] for t in by_seed.values() if t]
        if series:
            n = min(len(s) for s in series)
            ax.plot(range(1, n + 1), [sum(s[i] for s in series) / len(series) for i in range(n)], label=arm)
    ax.set_xlabel("GRPO step (both stages)")
    ax.set_ylabel("parallel ratio")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return png_bytes(fig)


def verdict(summary: dict) -> str:
    """One paragraph: the primary arm against each control at equal training budget and at equal tokens."""
    primary = summary.get("primary")
    comp = summary["comparisons"]
    if not primary or not comp["primary"]:
        return "<p>No comparison yet: the primary parallel arm or its controls have no result.</p>"
    parts = []
    for arm, d in comp["primary"].items():
        if d["t_significant"] or d["significant"]:
            word = "above" if d["diff"] > 0 else "below"
            how = "beyond Student's t threshold" if d["t_significant"] else "beyond two standard errors only"
            parts.append(f"{word} <b>{html.escape(arm)}</b> ({d['diff']:+.3f} ± {d['se']:.3f}, {how})")
        else:
            parts.append(f"level with <b>{html.escape(arm)}</b> ({d['diff']:+.3f} ± {d['se']:.3f})")
    text = f"After RL, <b>{html.escape(primary)}</b> is " + "; ".join(parts) + "."
    tokens = comp["equal_tokens"]
    if tokens:
        text += " At equal test-time tokens (the other arm's majority vote): " + "; ".join(
            f"{html.escape(arm)} maj@{e['m']} {e['diff']:+.3f} ± {e['se']:.3f}" for arm, e in tokens.items()
        )
        text += "."
    return f'<p class="verdict">{text}</p>'


def markdown_html(markdown: str) -> str:
    """The study's markdown (headings, paragraphs, tables) as HTML."""
    out, table = [], []

    def cells(line: str) -> list[str]:
        return [html.escape(c.strip()) for c in line.strip().strip("|").split("|")]

    def flush() -> None:
        if table:
            rows = [r for r in table if not set(r.replace("|", "").strip()) <= {"-", " "}]
            out.append("<table><tr>" + "".join(f"<th>{c}</th>" for c in cells(rows[0])) + "</tr>")
            out.extend("<tr>" + "".join(f"<td>{c}</td>" for c in cells(r)) + "</tr>" for r in rows[1:])
            out.append("</table>")
            table.clear()

    for line in markdown.splitlines():
        if line.startswith("|"):
            table.append(line)
            continue
        flush()
        if line.startswith("## "):
            out.append(f"<h2>{html.escape(line[3:])}</h2>")
        elif line.strip():
            out.append(f"<p>{html.escape(line)}</p>")
    flush()
    return "\n".join(out)


def write_study_report(study_dir: str | Path, summary: dict, markdown: str) -> Path:
    """`<study>/report.html`: the verdict, the tables of `markdown` and the plots (also in figures/)."""
    study_dir = Path(study_dir)
    figures = {"study": plot_accuracy(summary), "budgets": plot_budgets(summary)}
    schedules = plot_schedules(summary)
    if schedules:
        figures["schedules"] = schedules
    (study_dir / FIGURES_DIR).mkdir(exist_ok=True)
    for name, png in figures.items():
        (study_dir / FIGURES_DIR / f"{name}.png").write_bytes(png)
    title = f"parallel-r1 study: {study_dir.name}"
    images = "\n".join(img_tag(png, name) for name, png in figures.items())
    body = f"""<h1>{html.escape(title)}</h1>
{verdict(summary)}
{images}
{markdown_html(markdown)}
{timings_line(summary.get("timings", {}))}"""
    page = html_page(title, body, json.dumps(summary, indent=1).replace("</", "<\\/"))
    out = study_dir / REPORT_FILE
    out.write_text(page, encoding="utf-8")
    return out
