"""Strategy analysis: how a model uses its parallel blocks, per training step or per checkpoint.

For every block of every response it measures where the block starts (relative to the response length,
0..1), how long its paths are, whether the paths reach the same answer, and its role:

* exploration: no candidate answer has appeared in the main thread before the block, so the paths
  look for one;
* verification: the main thread (main text and earlier summaries) already stated a candidate answer
  (the response's final answer, or an answer marker such as "Final Answer:" / \\boxed), so the paths check it.

The paper reports that blocks move from exploration early in training to verification late. Records come
from the GRPO trainer's rollout logs (one JSON object a line with "step" and "response") or from
`parallel-r1 eval` (its .samples.jsonl, one "model" per checkpoint).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from parallel_r1.answers import extract_answer, verify
from parallel_r1.files import atomic_write_text, iter_jsonl
from parallel_r1.format import parse
from parallel_r1.rollout import record_depth, upgrade_record
from parallel_r1.settings import InputError

POSITION_BINS = 10
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
_ANSWER_MARKER = re.compile(r"final\s+answer\s*:|\\boxed\s*\{|the\s+answer\s+is", re.IGNORECASE)


# ------------------------------------------------------------------------------------------------
# Reading rollout files
# ------------------------------------------------------------------------------------------------


def read_rollouts(paths: Iterable[str | Path]) -> list[dict]:
    """Rollout records (`rollout.RolloutRecord`) from JSONL files, run directories (every *.jsonl below them
    whose records have a "response") and `eval` result JSON files (their samples file). Each record gets
    "_source", the file it came from; records of older files get today's names (`rollout.upgrade_record`).
    A line cut short at the very end of a file (a run killed mid-write) is skipped; any other bad line is
    an error naming file and line."""
    records: list[dict] = []
    for path in map(Path, paths):
        if path.is_dir():
            files = [f for f in sorted(path.rglob("*.jsonl")) if _is_rollout_file(f)]
            if not files:
                raise FileNotFoundError(f"{path}: no JSONL file with a 'response' field below this directory")
        elif path.suffix == ".json":
            files = [_eval_samples(path)]
        elif path.is_file():
            files = [path]
        else:
            raise FileNotFoundError(f"{path}: no such file or directory")
        for f in files:
            records.extend(_read_records(f))
    return records


def _eval_samples(path: Path) -> Path:
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: not valid JSON: {e}") from e
    if not isinstance(payload, dict) or "samples" not in payload:
        raise InputError(f"{path}: not a `parallel-r1 eval` result (no 'samples' field)")
    return path.with_name(payload["samples"])


def _is_rollout_file(path: Path) -> bool:
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                try:
                    return "response" in json.loads(line)
                except (json.JSONDecodeError, TypeError):
                    return False
    return False


def _read_records(path: Path) -> list[dict]:
    records = []
    for n, record in iter_jsonl(path, allow_cut_last_line=True):
        if not isinstance(record, dict) or not isinstance(record.get("response"), str):
            raise InputError(f"{path}:{n}: a record needs a string field 'response'")
        records.append({**upgrade_record(record), "_source": str(path)})
    return records


# ------------------------------------------------------------------------------------------------
# One response
# ------------------------------------------------------------------------------------------------


@dataclass
class BlockAnalysis:
    position: float  # block start / response length, 0..1
    num_paths: int
    path_chars: list[int]  # characters of each path's content
    path_answers: list[str | None]  # the answer each path reaches, if any
    agree: bool | None  # all path answers equal; None when fewer than two paths reached one
    role: str  # "exploration" | "verification"
    depth: int = 1  # 1 for a block of the main text, d + 1 inside a path of a depth-d block


def path_answer(content: str) -> str | None:
    """The answer a path reaches: its own Final Answer / \\boxed, else the last number it writes."""
    answer = extract_answer(content)
    if answer is not None:
        return answer
    numbers = _NUMBER.findall(content)
    return numbers[-1].replace(",", "") if numbers else None


def answers_agree(answers: Sequence[str | None]) -> bool | None:
    """Whether every extracted answer equals the first (`answers.verify`); None with fewer than two."""
    found = [a for a in answers if a is not None]
    if len(found) < 2:
        return None
    return all(a == found[0] or verify(a, found[0]) for a in found[1:])


def _mentions(text: str, answer: str) -> int | None:
    """Offset of the first mention of `answer` in `text` as a whole number/word, or None."""
    pattern = rf"(?<![\w.]){re.escape(answer)}(?![\w]|\.\d)"
    match = re.search(pattern, text)
    return match.start() if match else None


def first_candidate(text: str, main_spans: Sequence[tuple[int, int]], answer: str | None, start: int = 0) -> int | None:
    """Character offset where the main thread first states a candidate answer, or None.

    A candidate is an answer marker ("Final Answer:", "\\boxed{", "the answer is") or a mention of the
    response's own final `answer`, found inside `main_spans` (main text and summaries) at or after `start`.
    """
    for lo, hi in main_spans:
        lo = max(lo, start)
        if lo >= hi:
            continue
        piece = text[lo:hi]
        marker = _ANSWER_MARKER.search(piece)
        hits = [marker.start() if marker else None, _mentions(piece, answer) if answer else None]
        hits = [h for h in hits if h is not None]
        if hits:
            return lo + min(hits)
    return None


def analyze_response(text: str, question: str | None = None, max_depth: int = 1) -> list[BlockAnalysis]:
    """Analyse each block of `text` (lenient parse, so truncated blocks count too; blocks nested to `max_depth`
    count as blocks of their own, after the block that holds them).

    When the response restates `question`, the restatement is skipped before looking for a candidate
    answer: numbers from the problem statement are not candidates.
    """
    parsed = parse(text, lenient=True, max_depth=max_depth)
    if not parsed.blocks:
        return []
    final = extract_answer(text)
    start = 0
    if question and question.strip() and question.strip() in text:
        start = text.index(question.strip()) + len(question.strip())
    main_spans = [(s.start, s.end) for s in parsed.main_segments]
    main_spans += [(b.summary.start, b.summary.end) for b in parsed.blocks if b.summary is not None]
    main_spans.sort()
    candidate = first_candidate(text, main_spans, final, start)
    out = []
    for block in parsed.all_blocks:
        contents = [text[p.content.start : p.content.end] for p in block.paths]
        answers = [path_answer(c) for c in contents]
        role = "verification" if candidate is not None and candidate < block.span.start else "exploration"
        out.append(
            BlockAnalysis(
                position=block.span.start / max(1, len(text)),
                num_paths=len(block.paths),
                path_chars=[len(c.strip()) for c in contents],
                path_answers=answers,
                agree=answers_agree(answers),
                role=role,
                depth=block.depth,
            )
        )
    return out


# ------------------------------------------------------------------------------------------------
# Groups (training steps or checkpoints)
# ------------------------------------------------------------------------------------------------


@dataclass
class GroupSummary:
    group: str  # the step number or the checkpoint / model name
    num_responses: int
    accuracy: float | None  # share of records with correct=True; None when records do not say
    parallel_ratio: float
    blocks_per_response: float
    num_blocks: int
    mean_position: float | None
    position_histogram: list[float]  # share of blocks per tenth of the response
    exploration_share: float | None
    verification_share: float | None
    mean_path_chars: float | None
    path_agreement: float | None  # share of blocks (with >= 2 path answers) whose paths agree
    paths_per_block: dict[int, float] = field(default_factory=dict)  # share of blocks with k paths, per k
    mean_paths: float | None = None  # paths per block
    depth_share: dict[int, float] = field(default_factory=dict)  # share of responses whose deepest block is at d


def group_key(record: dict) -> tuple[int, int | str]:
    """Sort key and label: training records group by step, eval records by model, else by file."""
    if record.get("step") is not None:
        return (0, int(record["step"]))
    return (1, str(record.get("model") or record.get("checkpoint") or Path(record.get("_source", "?")).stem))


def summarize_group(label: str, records: Sequence[dict], blocks: Sequence[Sequence[BlockAnalysis]]) -> GroupSummary:
    """Aggregate the block analyses of one group; `blocks[i]` belongs to `records[i]`."""
    flat = [b for bs in blocks for b in bs]
    n = max(1, len(records))
    hist = [0] * POSITION_BINS
    for b in flat:
        hist[min(POSITION_BINS - 1, int(b.position * POSITION_BINS))] += 1
    judged = [b.agree for b in flat if b.agree is not None]
    paths = [c for b in flat for c in b.path_chars]
    scored = [bool(r["correct"]) for r in records if "correct" in r]
    depths = Counter(max((b.depth for b in bs), default=0) for bs in blocks)
    return GroupSummary(
        group=label,
        num_responses=len(records),
        accuracy=sum(scored) / len(scored) if scored else None,
        parallel_ratio=sum(bool(bs) for bs in blocks) / n,
        blocks_per_response=len(flat) / n,
        num_blocks=len(flat),
        mean_position=sum(b.position for b in flat) / len(flat) if flat else None,
        position_histogram=[h / len(flat) for h in hist] if flat else [0.0] * POSITION_BINS,
        exploration_share=sum(b.role == "exploration" for b in flat) / len(flat) if flat else None,
        verification_share=sum(b.role == "verification" for b in flat) / len(flat) if flat else None,
        mean_path_chars=sum(paths) / len(paths) if paths else None,
        path_agreement=sum(judged) / len(judged) if judged else None,
        paths_per_block={k: n / len(flat) for k, n in sorted(Counter(b.num_paths for b in flat).items())},
        mean_paths=sum(b.num_paths for b in flat) / len(flat) if flat else None,
        depth_share={d: c / n for d, c in sorted(depths.items())},
    )


def analyze_records(records: Sequence[dict]) -> list[GroupSummary]:
    """One summary per step (training logs) or per checkpoint, in step / input order."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault(group_key(r), []).append(r)
    keys = sorted(groups, key=lambda k: (k[0], k[1] if k[0] == 0 else 0))  # stable: checkpoints keep input order
    out = []
    for key in keys:
        members = groups[key]
        blocks = [analyze_response(r["response"], r.get("question"), record_depth(r)) for r in members]
        out.append(summarize_group(str(key[1]), members, blocks))
    return out


def plot_summaries(summaries: Sequence[GroupSummary], path: str | Path, xlabel: str) -> Path:
    """Four panels: mean block position, the position distribution, exploration vs verification, paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [s.group for s in summaries]
    x = list(range(len(summaries)))
    nan = float("nan")
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    ax = axes[0][0]
    ax.plot(x, [s.mean_position if s.mean_position is not None else nan for s in summaries], marker="o")
    ax.plot(x, [s.parallel_ratio for s in summaries], marker="s", linestyle="--")
    ax.set_ylim(0, 1)
    ax.legend(["mean block position", "parallel ratio"])
    ax.set_title("Where blocks start (0 = response start, 1 = end)")
    ax = axes[0][1]
    grid = [[s.position_histogram[b] for s in summaries] for b in range(POSITION_BINS)]
    image = ax.imshow(grid, aspect="auto", origin="lower", extent=(-0.5, len(x) - 0.5, 0, 1), cmap="viridis")
    fig.colorbar(image, ax=ax, label="share of blocks")
    ax.set_ylabel("relative position")
    ax.set_title("Block position distribution")
    ax = axes[1][0]
    explore = [s.exploration_share or 0.0 for s in summaries]
    verify_ = [s.verification_share or 0.0 for s in summaries]
    ax.bar(x, explore, label="exploration")
    ax.bar(x, verify_, bottom=explore, label="verification")
    ax.set_ylim(0, 1)
    ax.legend()
    ax.set_title("Block roles")
    ax = axes[1][1]
    ax.plot(x, [s.mean_path_chars if s.mean_path_chars is not None else nan for s in summaries], marker="o")
    ax.set_ylabel("mean path length (characters)")
    twin = ax.twinx()
    twin.plot(x, [s.path_agreement if s.path_agreement is not None else nan for s in summaries], "r--", marker="s")
    twin.set_ylim(0, 1)
    twin.set_ylabel("paths reaching the same answer", color="r")
    ax.set_title("Paths")
    every = max(1, len(x) // 12)  # at most about 12 tick labels
    rotation = 30 if any(len(label) > 6 for label in labels) else 0
    for ax in axes.flat:
        ax.set_xticks(x[::every], labels[::every], rotation=rotation)
        ax.set_xlabel(xlabel)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def run_analysis(inputs: Sequence[str | Path], out_dir: str | Path) -> list[GroupSummary]:
    """Read rollouts, analyse them, write summary.json and strategy.png to `out_dir`."""
    records = read_rollouts(inputs)
    if not records:
        raise InputError(f"no rollout records in {', '.join(map(str, inputs))}")
    summaries = analyze_records(records)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    by_step = any(r.get("step") is not None for r in records)
    payload = {"grouped_by": "step" if by_step else "checkpoint", "groups": [asdict(s) for s in summaries]}
    atomic_write_text(out_dir / "summary.json", json.dumps(payload, indent=2) + "\n")
    plot_summaries(summaries, out_dir / "strategy.png", "training step" if by_step else "checkpoint")
    return summaries
