"""The HTML report of a `parallel-r1 study`: the verdict against the sequential baseline, the study's table,
the plot over seeds, the SFT models' headroom and the strategies after RL, on the page template of the
run's report (`report.html_page`)."""

from __future__ import annotations

import html
import json
from pathlib import Path

from parallel_r1.analysis import analyze_records
from parallel_r1.files import read_jsonl
from parallel_r1.layout import EVAL_DIR, FIGURES_DIR, REPORT_FILE
from parallel_r1.report import html_page, img_tag, png_bytes, pyplot, timings_line


def plot_study(summary: dict) -> bytes:
    """Held-out accuracy per arm (mean and standard error over seeds), as trained and with the ablations."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(11, 4.2))
    arms = list(summary["arms"])
    evals = (("heldout", "as trained"), ("no_blocks", "blocks banned"), ("seen_attention", "Seen attention"))
    width = 0.8 / len(evals)
    for i, (key, label) in enumerate(evals):
        xs, ys, es = [], [], []
        for j, arm in enumerate(arms):
            stat = summary["arms"][arm]["stats"].get(key)
            if stat:
                xs.append(j + (i - 1) * width)
                ys.append(stat["mean"])
                es.append(stat["se"])
        if xs:
            bars = ax.bar(xs, ys, width, yerr=es, capsize=3, label=label, color=f"C{i}")
            ax.bar_label(bars, fmt="%.2f", fontsize=8, padding=2)
    ax.set_xticks(range(len(arms)), arms)
    ax.set_ylabel("held-out accuracy (mean@k)")
    ax.set_ylim(0, 1.05)
    ax.set_title(f"after RL, mean ± standard error over seeds {summary['seeds']}")
    ax.legend()
    fig.tight_layout()
    return png_bytes(fig)


def _study_verdict(summary: dict) -> str:
    arms = summary["arms"]
    compared = {a: e["vs_baseline"] for a, e in arms.items() if e.get("vs_baseline")}
    if not compared:
        return "<p>No comparison with the sequential baseline yet (it or the parallel arms have no result).</p>"
    best = max(compared, key=lambda a: compared[a]["diff"])
    vs = compared[best]
    if vs["significant"] and vs["diff"] > 0:
        verdict = "beats the sequential baseline by more than two standard errors"
    elif vs["significant"]:
        verdict = "is below the sequential baseline by more than two standard errors"
    else:
        verdict = "is within two standard errors of the sequential baseline: no difference is shown"
    stats = arms[best]["stats"]
    text = (
        f"The best parallel arm, <b>{html.escape(best)}</b>, {verdict}: held-out accuracy "
        f"{stats['heldout']['mean']:.3f} ± {stats['heldout']['se']:.3f} against "
        f"{arms['sequential']['stats']['heldout']['mean']:.3f} ± {arms['sequential']['stats']['heldout']['se']:.3f} "
        f"(difference {vs['diff']:+.3f} ± {vs['se']:.3f}, {len(summary['seeds'])} seeds)."
    )
    if "no_blocks" in stats:
        text += (
            f" With blocks banned the same models score {stats['no_blocks']['mean']:.3f} ± "
            f"{stats['no_blocks']['se']:.3f}: the blocks account for "
            f"{stats['heldout']['mean'] - stats['no_blocks']['mean']:+.3f}."
        )
    return f'<p class="verdict">{text}</p>'


def _oracle_table(summary: dict) -> str:
    rows = []
    for arm, entry in summary["arms"].items():
        o = entry["sft"].get("oracle")
        if o:
            rows.append(
                f"<tr><td>{html.escape(arm)}</td><td>{html.escape(entry['sft'].get('folder', ''))}</td>"
                f"<td>{o['single_path']:.3f}</td><td>{o['best_of_block']:.3f}</td><td>{o['blocks']}</td></tr>"
            )
    if not rows:
        return "<p>No parallel SFT model wrote a block.</p>"
    return (
        "<table><tr><th>arm</th><th>SFT model</th><th>one path reaches the answer</th>"
        "<th>best path of the block does</th><th>blocks</th></tr>" + "".join(dict.fromkeys(rows)) + "</table>"
    )


def _strategy_table(study_dir: Path, summary: dict) -> str:
    rows = []
    for arm in summary["arms"]:
        records = []
        for seed in summary["seeds"]:
            path = study_dir / arm / f"seed{seed}" / EVAL_DIR / "heldout.samples.jsonl"
            if path.is_file():
                records += [dict(r, model=arm) for r in read_jsonl(path)]
        if not records:
            continue
        s = analyze_records(records)[0]

        def fmt(v, digits=2):
            return "-" if v is None else f"{v:.{digits}f}"

        rows.append(
            f"<tr><td>{html.escape(arm)}</td><td>{fmt(s.parallel_ratio)}</td><td>{fmt(s.blocks_per_response)}</td>"
            f"<td>{fmt(s.mean_position)}</td><td>{fmt(s.exploration_share)}</td>"
            f"<td>{fmt(s.verification_share)}</td><td>{fmt(s.path_agreement)}</td></tr>"
        )
    return (
        "<table><tr><th>arm</th><th>block ratio</th><th>blocks / response</th><th>mean block position</th>"
        "<th>exploration</th><th>verification</th><th>paths agree</th></tr>" + "".join(rows) + "</table>"
    )


def write_study_report(study_dir: str | Path, summary: dict, table: str) -> Path:
    """`<study>/report.html`: the verdict, `table` (the study's markdown table), the plot, the oracle figure
    and the strategies."""
    study_dir = Path(study_dir)
    figure = plot_study(summary)
    (study_dir / FIGURES_DIR).mkdir(exist_ok=True)
    (study_dir / FIGURES_DIR / "study.png").write_bytes(figure)
    table_html = _markdown_table_html(table)
    timings = summary.get("timings", {})
    title = f"parallel-r1 study: {study_dir.name}"
    body = f"""<h1>{html.escape(title)}</h1>
{_study_verdict(summary)}
<p>Task <code>{html.escape(summary["task"])}</code>. Every arm's RL stage has the same problems, steps, prompts
and samples per step; tokens are reported beside accuracy because parallel responses are longer.
"Positions" counts what a response occupies: with Unseen decoding a block's paths run side by side (main
text plus the longest path of each block), with Seen decoding every token takes a position; it bounds
latency and context.</p>
{table_html}
{img_tag(figure, "held-out accuracy per arm, with ablations")}
<h2>Headroom before RL</h2>
<p>On the SFT models' held-out responses: how often one path reaches the answer, and how often the best
path of a block does. The gap is what a summary that chooses well can win.</p>
{_oracle_table(summary)}
<h2>Strategies after RL</h2>
<p>Held-out responses of every seed: where blocks appear (relative position) and their role.</p>
{_strategy_table(study_dir, summary)}
{timings_line(timings)}"""
    page = html_page(title, body, json.dumps(summary, indent=1).replace("</", "<\\/"))
    out = study_dir / REPORT_FILE
    out.write_text(page, encoding="utf-8")
    return out


def _markdown_table_html(markdown: str) -> str:
    """The study's markdown table as HTML (its first paragraph and footnote as text)."""
    parts = []
    rows = [line for line in markdown.splitlines() if line.startswith("|")]
    header, body = rows[0], rows[2:]

    def cells(line):
        return [html.escape(c.strip()) for c in line.strip("|").split("|")]

    parts.append("<table><tr>" + "".join(f"<th>{c}</th>" for c in cells(header)) + "</tr>")
    parts += ["<tr>" + "".join(f"<td>{c}</td>" for c in cells(line)) + "</tr>" for line in body]
    parts.append("</table>")
    notes = [line for line in markdown.splitlines() if line and not line.startswith("|")]
    return (
        "".join(f"<p>{html.escape(n)}</p>" for n in notes[:1])
        + "".join(parts)
        + "".join(f"<p>{html.escape(n)}</p>" for n in notes[1:])
    )
