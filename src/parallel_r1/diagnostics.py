"""What a model's blocks do on the built-in search task, read from its sampled responses: whether the paths
of a block try different candidates, whether the right candidate is tried at all, whether the summary says
what its paths found, and how varied the first try of a prompt's samples is.

Pure functions of `rollout.RolloutRecord`s (`response`, `gold`, and for grouping `problem_index` or
`problem_id` and `step`); the study applies them to every GRPO step's rollouts of an arm to follow them over
training.

* duplicate rate: the share of blocks whose paths try a candidate twice;
* coverage: the share of responses that try the right candidate somewhere (in a path or a single try);
* summary consistency: the share of closed summaries that name the candidate whose path found that it works
  (or say ``none works`` when no path did);
* first-try entropy: per prompt, the entropy (bits) of the candidate its samples try first, averaged over
  prompts; 0 when every sample of a prompt starts with the same candidate;
* paths per block: the share of blocks with k paths, for each k (planned blocks choose k).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable

from parallel_r1.format import parse
from parallel_r1.rollout import record_depth
from parallel_r1.tasks.search import path_candidate

_TRY_RE = re.compile(r"(?:^|\n|>)\s*(\d+)\*\d+=")
_WORKS_RE = re.compile(r"(\d+) works")


def tried_candidates(text: str) -> list[int]:
    """Every candidate a response tries, in order (paths and single tries alike)."""
    return [int(m.group(1)) for m in _TRY_RE.finditer(text)]


def block_facts(text: str, max_depth: int = 1) -> list[dict]:
    """Per block of a response (nested ones too, to `max_depth`): the candidates of its paths, the candidates
    a path found to work, and what its summary names (a candidate, "none", or None when it names nothing or
    is missing)."""
    out = []
    for block in parse(text, max_depth=max_depth).all_blocks:
        tried, works = [], []
        for path in block.paths:
            content = text[path.content.start : path.content.end]
            candidate = path_candidate(content)
            tried.append(candidate)
            if candidate is not None and content.rstrip().endswith(f"{candidate} works"):
                works.append(candidate)
        named = None
        if block.summary is not None:
            summary = text[block.summary.start : block.summary.end]
            found = _WORKS_RE.search(summary)
            named = int(found.group(1)) if found else "none" if "none works" in summary else None
        out.append({"tried": tried, "works": works, "named": named, "closed": block.summary_closed})
    return out


def first_try_entropy(groups: Iterable[list[int | None]]) -> float | None:
    """Mean over groups of the entropy (bits) of their first tries (None entries skipped)."""
    values = []
    for firsts in groups:
        counts = Counter(c for c in firsts if c is not None)
        n = sum(counts.values())
        if n:
            values.append(-sum(c / n * math.log2(c / n) for c in counts.values()))
    return sum(values) / len(values) if values else None


def block_diagnostics(records: Iterable[dict]) -> dict:
    """The four figures of the module docstring over `records`, with the counts they are shares of."""
    responses = covered = blocks = duplicates = summaries = consistent = 0
    widths: Counter[int] = Counter()
    firsts: dict[str, list[int | None]] = {}
    for r in records:
        text, gold = r["response"], int(str(r["gold"]).strip())
        responses += 1
        tries = tried_candidates(text)
        covered += gold in tries
        group = f"{r.get('step', '')}/{r.get('problem_index', r.get('problem_id', ''))}"
        firsts.setdefault(group, []).append(tries[0] if tries else None)
        for facts in block_facts(text, record_depth(r)):
            blocks += 1
            widths[len(facts["tried"])] += 1
            known = [c for c in facts["tried"] if c is not None]
            duplicates += len(set(known)) < len(known)
            if facts["closed"] and facts["named"] is not None:
                summaries += 1
                expected = facts["works"][0] if facts["works"] else "none"
                consistent += facts["named"] == expected
    return {
        "responses": responses,
        "blocks": blocks,
        "duplicate_rate": duplicates / blocks if blocks else None,
        "coverage": covered / responses if responses else None,
        "summary_consistency": consistent / summaries if summaries else None,
        "first_try_entropy": first_try_entropy(firsts.values()),
        "paths_per_block": {k: widths[k] / blocks for k in sorted(widths)},
    }
