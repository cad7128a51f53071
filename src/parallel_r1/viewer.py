"""Reading rollouts: a self-contained HTML page (each block's paths side by side, tags highlighted, the
summary below them, reward and answers per sample, and filters: correct / incorrect, with / without
blocks, step or checkpoint, free text), and the same layout on the console for `parallel-r1 generate`
(`render_rollout`).

All text goes through `html.escape` and the page's script only toggles `hidden` and writes counts, so
model output cannot inject markup. The filter state lives in the URL fragment (``page.html#correct=no&
blocks=yes``), so a filtered view can be shared or opened directly.
"""

from __future__ import annotations

import html
import re
from collections.abc import Sequence
from pathlib import Path

from rich.console import Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from parallel_r1.analysis import group_key, read_rollouts
from parallel_r1.files import atomic_write_text
from parallel_r1.format import TAGS, parse
from parallel_r1.rollout import Rollout, record_depth, upgrade_record

DEFAULT_LIMIT = 2000
# The page loads nothing and runs only its own inline script.
CSP = "default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'"
_TAG_HTML = re.compile("|".join(re.escape(html.escape(t)) for t in TAGS))

CSS = """
body{font-family:system-ui,sans-serif;margin:0;background:#f4f5f7;color:#1d1f23}
header.top{position:sticky;top:0;background:#22262e;color:#fff;padding:8px 16px;display:flex;gap:14px;
 align-items:center;flex-wrap:wrap;z-index:1}
header.top h1{font-size:16px;margin:0 12px 0 0}
header.top label{font-size:13px}
main{padding:12px 16px}
article.sample{background:#fff;border:1px solid #d8dbe0;border-left:5px solid #999;border-radius:4px;
 margin:0 0 14px;padding:8px 12px}
article.sample[data-correct="1"]{border-left-color:#2e9e4f}
article.sample[data-correct="0"]{border-left-color:#d0463b}
.meta{font-size:13px;display:flex;gap:12px;flex-wrap:wrap;color:#444}
.meta b{color:#111}
.badge{border-radius:3px;padding:0 6px;font-size:12px;background:#e6e8eb}
.ok{background:#d5f0dc}.bad{background:#f7d9d6}
.text{white-space:pre-wrap;font-family:ui-monospace,monospace;font-size:12.5px;margin:4px 0}
.block{border:1px solid #7a8cc2;border-radius:4px;margin:6px 0;padding:4px;background:#f3f5fc}
.paths{display:grid;gap:6px}
.path{border:1px solid #b8c2e0;border-radius:3px;background:#fff;padding:4px;min-width:0}
.summary{border:1px dashed #a07ac2;background:#f8f3fc;border-radius:3px;padding:4px;margin-top:6px}
.plan{border:1px dashed #c2a04a;background:#fcf8ec;border-radius:3px;padding:4px;margin:4px 0}
.tag{color:#3450a8;background:#e3e8f8;border-radius:3px;font-weight:600;font-family:ui-monospace,monospace;
 font-size:12px;padding:0 3px}
.cut{color:#d0463b;font-size:12px}
.errors{color:#a33;font-size:12px}
details{font-size:13px}
"""

JS = """
(function(){
  var cards = Array.prototype.slice.call(document.querySelectorAll('article.sample'));
  var controls = {correct: document.getElementById('f-correct'), blocks: document.getElementById('f-blocks'),
                  group: document.getElementById('f-group'), q: document.getElementById('f-text')};
  function readHash(){
    location.hash.replace(/^#/, '').split('&').forEach(function(pair){
      var kv = pair.split('=');
      if (kv.length === 2 && controls[kv[0]]) controls[kv[0]].value = decodeURIComponent(kv[1]);
    });
  }
  function apply(){
    var c = controls.correct.value, b = controls.blocks.value, g = controls.group.value;
    var q = controls.q.value.toLowerCase(), shown = 0;
    cards.forEach(function(card){
      var ok = (c === 'all' || (c === 'yes' && card.dataset.correct === '1')
                || (c === 'no' && card.dataset.correct === '0'))
        && (b === 'all' || (b === 'yes') === (card.dataset.blocks !== '0'))
        && (g === 'all' || card.dataset.group === g)
        && (!q || card.textContent.toLowerCase().indexOf(q) >= 0);
      card.hidden = !ok;
      if (ok) shown++;
    });
    document.getElementById('shown').textContent = String(shown);
    document.body.dataset.shown = String(shown);
  }
  function save(){
    var parts = [];
    Object.keys(controls).forEach(function(k){
      var v = controls[k].value;
      if (v && v !== 'all') parts.push(k + '=' + encodeURIComponent(v));
    });
    history.replaceState(null, '', parts.length ? '#' + parts.join('&') : location.pathname);
    apply();
  }
  Object.keys(controls).forEach(function(k){ controls[k].addEventListener('input', save); });
  readHash();
  apply();
})();
"""


def _text(s: str) -> str:
    """Escaped text with any tag in it highlighted (stray tags in main text stay visible)."""
    return _TAG_HTML.sub(lambda m: f'<span class="tag">{m.group()}</span>', html.escape(s))


def _tag(name: str) -> str:
    return f'<span class="tag">{html.escape(name)}</span>'


def _main_text(piece: str) -> str:
    piece = piece.strip("\n")
    return f'<div class="text main">{_text(piece)}</div>' if piece else ""


def render_response(text: str, max_depth: int = 1) -> str:
    """The response as HTML: main text, and each block as its plan (if it has one) over a grid with one
    column per path, a path's own blocks (nesting to `max_depth`) drawn inside its column. A response with
    a plan in any block is checked in the planned format."""
    parsed = parse(text, lenient=True, max_depth=max_depth)
    if any(b.plan is not None for b in parsed.blocks):
        parsed = parse(text, lenient=True, plans=True, max_depth=max_depth)
    out = [_render_region(text, 0, len(text), parsed.blocks)]
    if parsed.errors:
        kinds = ", ".join(sorted({e.kind for e in parsed.errors}))
        out.append(f'<div class="errors">format errors: {html.escape(kinds)}</div>')
    return "".join(out)


def _render_region(text: str, start: int, end: int, blocks: list, main: bool = True) -> str:
    """text[start:end] as HTML, `blocks` (the blocks that open in it) drawn as blocks."""
    piece = _main_text if main else (lambda s: _text(s.strip("\n")))
    out, pos = [], start
    for block in blocks:
        out.append(piece(text[pos : block.span.start]))
        plan = ""
        if block.plan is not None:
            items = "".join(f"<li>{_text(text[s.start : s.end])}</li>" for s in block.plan_lines)
            plan = f'<div class="plan">plan<ol>{items}</ol></div>'
        columns = []
        for i, p in enumerate(block.paths, 1):
            closing = _tag("</Path>") if p.closed else '<span class="cut">(path cut off)</span>'
            body = _render_region(text, p.content.start, p.content.end, p.blocks, main=False)
            columns.append(
                f'<div class="path">{_tag("<Path>")} <small>{i}</small><div class="text">{body}</div>{closing}</div>'
            )
        summary = ""
        if block.summary is not None:
            body = _text(text[block.summary.start : block.summary.end].strip("\n"))
            close = _tag("</Summary>") if block.summary_closed else '<span class="cut">(summary cut off)</span>'
            summary = f'<div class="summary">{_tag("<Summary>")}<div class="text">{body}</div>{close}</div>'
        close_block = _tag("</Parallel>") if block.closed else '<span class="cut">(block cut off)</span>'
        out.append(
            f'<div class="block">{_tag("<Parallel>")}{plan}'
            f'<div class="paths" style="grid-template-columns:repeat({max(1, len(block.paths))},minmax(0,1fr))">'
            f"{''.join(columns)}</div>{close_block}{summary}</div>"
        )
        pos = block.span.end
    out.append(piece(text[pos:end]))
    return "".join(out)


def _group_label(record: dict) -> str:
    kind, value = group_key(record)
    return f"step {value}" if kind == 0 else str(value)


def render_card(record: dict) -> str:
    """One sample (a `rollout.RolloutRecord`) as an HTML card."""
    record = upgrade_record(record)
    response = record["response"]
    num_blocks = record.get("num_blocks")
    if num_blocks is None:
        num_blocks = parse(response, lenient=True).num_blocks
    correct = record.get("correct")
    flag = "" if correct is None else ("1" if correct else "0")
    group = _group_label(record)
    meta = [f"<b>{html.escape(group)}</b>"]
    for key in ("benchmark", "problem_id", "sample_index"):
        if record.get(key) is not None:
            meta.append(f"{key.replace('_', ' ')} {html.escape(str(record[key]))}")
    if correct is not None:
        meta.append(f'<span class="badge {"ok" if correct else "bad"}">{"correct" if correct else "incorrect"}</span>')
    if record.get("reward") is not None:
        meta.append(f"reward <b>{html.escape(str(record['reward']))}</b>")
    if "pred" in record or "gold" in record:  # records of `generate` have neither
        meta.append(f"pred <b>{html.escape(str(record.get('pred')))}</b>")
        meta.append(f"gold <b>{html.escape(str(record.get('gold')))}</b>")
    meta.append(f'<span class="badge">{int(num_blocks)} block(s)</span>')
    question = record.get("question") or record.get("prompt")
    question_html = ""
    if question:
        question_html = f'<details><summary>question</summary><div class="text">{_text(question)}</div></details>'
    return (
        f'<article class="sample" data-correct="{flag}" data-blocks="{int(num_blocks)}" '
        f'data-group="{html.escape(group, quote=True)}">'
        f'<div class="meta">{"".join(f"<span>{m}</span>" for m in meta)}</div>'
        f"{question_html}{render_response(response, record_depth(record))}</article>"
    )


def render_html(records: Sequence[dict], title: str = "parallel-r1 rollouts", total: int | None = None) -> str:
    """The whole page for `records`; `total` (when larger) says how many there were before a limit."""
    groups = list(dict.fromkeys(_group_label(r) for r in records))
    options = "".join(f'<option value="{html.escape(g, quote=True)}">{html.escape(g)}</option>' for g in groups)
    note = f" of {total}" if total is not None and total > len(records) else ""
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<meta http-equiv="Content-Security-Policy" content="{CSP}">
<style>{CSS}</style></head>
<body><header class="top"><h1>{html.escape(title)}</h1>
<label>answer <select id="f-correct"><option value="all">all</option><option value="yes">correct</option>
<option value="no">incorrect</option></select></label>
<label>blocks <select id="f-blocks"><option value="all">all</option><option value="yes">with blocks</option>
<option value="no">without blocks</option></select></label>
<label>group <select id="f-group"><option value="all">all</option>{options}</select></label>
<label>search <input id="f-text" type="search"></label>
<span><span id="shown">{len(records)}</span> of {len(records)}{note} shown</span></header>
<main>{"".join(render_card(r) for r in records)}</main>
<script>{JS}</script></body></html>
"""


def write_viewer(inputs: Sequence[str | Path], out: str | Path, limit: int | None = DEFAULT_LIMIT) -> Path:
    """Read rollout files (see `analysis.read_rollouts`) and write the page to `out`."""
    records = read_rollouts(inputs)
    shown = records if limit is None else records[:limit]
    title = "parallel-r1: " + ", ".join(Path(p).name for p in inputs)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, render_html(shown, title, total=len(records)))
    return out


def render_rollout(rollout: Rollout):
    """A rich renderable of one rollout: main text, each block's paths side by side, then its summary."""
    structure = rollout.structure
    text = structure.text
    parts, cursor = [], 0
    for number, block in enumerate(structure.blocks, start=1):
        if text[cursor : block.span.start].strip():
            parts.append(Text(text[cursor : block.span.start]))
        if block.plan is not None:
            parts.append(
                Panel(Text(text[block.plan.start : block.plan.end].strip()), title="plan", border_style="yellow")
            )
        row = Table.grid(expand=True, padding=(0, 1))
        for _ in block.paths:
            row.add_column(ratio=1)
        row.add_row(
            *(
                Panel(
                    Text(text[p.content.start : p.content.end]), title=f"block {number} path {k}", border_style="cyan"
                )
                for k, p in enumerate(block.paths, start=1)
            )
        )
        parts.append(row)
        if block.summary is not None:
            parts.append(
                Panel(Text(text[block.summary.start : block.summary.end]), title="summary", border_style="green")
            )
        cursor = block.span.end
    if text[cursor:].strip():
        parts.append(Text(text[cursor:]))
    subtitle = f"{rollout.finish_reason}, {len(rollout.response_ids)} tokens, {structure.num_blocks} blocks"
    return Panel(Group(*parts), title=f"prompt {rollout.prompt_index} sample {rollout.sample_index}", subtitle=subtitle)
