"""Test-time budgets: what a response costs in tokens and in positions, majority voting over m samples, and
accuracy under a position cap, so that arms meet at equal test-time tokens and at equal context or latency.

Pure functions of the sample records an evaluation writes (`rollout.RolloutRecord`: `problem_id`, `pred`,
`correct`, `response_tokens`, `path_tokens`, `paths_per_block`).

* **Tokens** are every token generated: the cost.
* **Positions** are the length of the critical path. With Unseen decoding a block's paths start at the same
  position and decode side by side, so a block costs its longest path; with Seen and Threads decoding every
  token takes a position of its own. m independent samples decoded side by side cost the positions of the
  longest of them (`majority_curve`). A context of P positions fits a response only if its positions are at
  most P (`capped_accuracy`, APR's comparison).

`capped_accuracy` is computed from uncapped samples: a response whose answer comes after the cap would have
been cut before it, and a response within the cap is decoded exactly as without it (the engine's draws do
not depend on the cap), so counting it as wrong beyond the cap is what a cap would give.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from itertools import combinations
from math import comb

MAX_SUBSETS = 200  # per problem and m; beyond it, seeded random subsets stand in for all of them


def response_positions(record: dict, variant: str) -> int:
    """Positions a response occupies: its tokens, less, under Unseen decoding, every path of each block but
    the longest (the record's `unseen_positions`, which also counts nested blocks; records written before it
    existed have no nesting and are counted from their path lengths)."""
    tokens = int(record["response_tokens"])
    if variant != "unseen":
        return tokens
    if record.get("unseen_positions") is not None:
        return int(record["unseen_positions"])
    paths, sizes = list(record.get("path_tokens") or []), list(record.get("paths_per_block") or [])
    if sum(sizes) != len(paths):
        raise ValueError(f"record has {len(paths)} path lengths for blocks of {sizes} paths")
    start = 0
    for size in sizes:
        block = paths[start : start + size]
        tokens -= sum(block) - max(block, default=0)  # a block cut before its first path saves nothing
        start += size
    return tokens


def by_problem(records: Iterable[dict]) -> dict[str, list[dict]]:
    """Records grouped by problem, each group in sample order."""
    groups: dict[str, list[dict]] = {}
    for r in records:
        groups.setdefault(str(r["problem_id"]), []).append(r)
    return {pid: sorted(g, key=lambda r: r.get("sample_index", 0)) for pid, g in groups.items()}


def vote_credit(group: Sequence[dict]) -> float:
    """Credit of a majority vote over `group`: 1 when the most frequent answer is right, the share of right
    answers among the tied ones on a tie, 0 when no sample gave an answer. Answers are compared as written
    (the built-in tasks' answers are integers); one is right when a sample giving it was scored correct."""
    counts: dict[str, int] = {}
    right: set[str] = set()
    for r in group:
        pred = r.get("pred")
        if pred is None:
            continue
        key = str(pred).strip()
        counts[key] = counts.get(key, 0) + 1
        if r["correct"]:
            right.add(key)
    if not counts:
        return 0.0
    top = max(counts.values())
    tied = [a for a, c in counts.items() if c == top]
    return sum(a in right for a in tied) / len(tied)


def _subsets(k: int, m: int) -> list[tuple[int, ...]]:
    """Every m-subset of range(k), or MAX_SUBSETS of them drawn with a fixed seed when there are more."""
    if comb(k, m) <= MAX_SUBSETS:
        return list(combinations(range(k), m))
    rng = random.Random(f"subsets-{k}-{m}")
    return [tuple(sorted(rng.sample(range(k), m))) for _ in range(MAX_SUBSETS)]


def majority_curve(records: Iterable[dict], variant: str, ms: Sequence[int] | None = None) -> list[dict]:
    """maj@m for m = 1..k (or `ms`): accuracy of a majority vote over m of a problem's k samples, averaged
    over the m-subsets of the k and over problems, with the mean tokens (sum over the m samples) and
    positions (the longest of the m, decoded side by side) that the vote costs. maj@1 is mean accuracy."""
    groups = by_problem(records)
    if not groups:
        return []
    k = min(len(g) for g in groups.values())
    out = []
    for m in ms or range(1, k + 1):
        if not 1 <= m <= k:
            raise ValueError(f"m must be in 1..{k}, got {m}")
        acc = tokens = positions = 0.0
        for group in groups.values():
            subsets = _subsets(k, m)
            for subset in subsets:
                chosen = [group[i] for i in subset]
                acc += vote_credit(chosen) / len(subsets)
                tokens += sum(int(r["response_tokens"]) for r in chosen) / len(subsets)
                positions += max(response_positions(r, variant) for r in chosen) / len(subsets)
        n = len(groups)
        out.append({"m": m, "accuracy": acc / n, "tokens": tokens / n, "positions": positions / n})
    return out


def capped_accuracy(records: Iterable[dict], variant: str, caps: Sequence[int]) -> dict[int, float]:
    """Cap -> mean accuracy when a response must fit in `cap` positions."""
    rows = [(bool(r["correct"]), response_positions(r, variant)) for r in records]
    if not rows:
        return {}
    return {cap: sum(ok and pos <= cap for ok, pos in rows) / len(rows) for cap in caps}


def at_budget(curve: Sequence[dict], budget: float, key: str = "tokens") -> float | None:
    """Accuracy of a `majority_curve` at `budget` of `key` (tokens or positions), interpolated linearly
    between the two points around it; None when the budget is below the curve's first point. Past the last
    point the last accuracy holds (more samples were not drawn)."""
    points = sorted((row[key], row["accuracy"]) for row in curve)
    if not points or budget < points[0][0]:
        return None
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 <= budget <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (budget - x0) / (x1 - x0)
    return points[-1][1]


def per_problem(records: Iterable[dict]) -> dict[str, float]:
    """Problem id -> share of its samples that are correct."""
    return {pid: sum(bool(r["correct"]) for r in g) / len(g) for pid, g in by_problem(records).items()}


def per_problem_at_cap(records: Iterable[dict], variant: str, cap: int) -> dict[str, float]:
    """Problem id -> share of its samples that are correct and fit in `cap` positions."""
    return {
        pid: sum(bool(r["correct"]) and response_positions(r, variant) <= cap for r in g) / len(g)
        for pid, g in by_problem(records).items()
    }


def per_problem_majority(records: Iterable[dict], m: int) -> dict[str, float]:
    """Problem id -> maj@m credit averaged over the m-subsets of its samples."""
    out = {}
    for pid, group in by_problem(records).items():
        subsets = _subsets(len(group), m)
        out[pid] = sum(vote_credit([group[i] for i in s]) for s in subsets) / len(subsets)
    return out
