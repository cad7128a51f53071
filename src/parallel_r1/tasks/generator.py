"""What the built-in tasks share: the train/held-out split by hash, and the loop that draws distinct problems.

A task supplies how to draw one problem of a level, what makes two problems the same, and which problems a
split may hold; `generate` draws until it has enough, so both tasks split and deduplicate the same way.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Sequence
from typing import TypeVar

SPLITS = ("train", "eval")
EVAL_PERCENT = 10
MAX_MISSES = 20_000

P = TypeVar("P")


def digest(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()


def split_of(text: str) -> str:
    """`eval` for about EVAL_PERCENT% of all texts, `train` for the rest, fixed forever."""
    return "eval" if int(digest(text)[:8], 16) % 100 < EVAL_PERCENT else "train"


def generate(
    task: str,
    n: int,
    levels: Sequence[int],
    split: str,
    seed: int,
    sample: Callable[[int, random.Random], P],
    identity: Callable[[P], str],
    in_split: Callable[[P, str], bool],
) -> list[P]:
    """`n` distinct problems of `split`, levels taken in turn: `sample(level, rng)` draws one, `identity`
    says which count as the same, `in_split` which ones `split` may hold. The draws are seeded by `task`,
    `split` and `seed` alone, so the same arguments give the same list."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    rng = random.Random(f"{task}-{split}-{seed}")
    seen: set[str] = set()
    out: list[P] = []
    misses = 0
    while len(out) < n:
        problem = sample(levels[len(out) % len(levels)], rng)
        key = identity(problem)
        if key in seen or not in_split(problem, split):
            misses += 1
            # Only small levels run out; tens of thousands of misses in a row mean they did.
            if misses > MAX_MISSES:
                raise ValueError(
                    f"cannot draw {n} distinct {split} {task} problems from levels {list(levels)} "
                    f"(found {len(out)}): ask for fewer, or add higher levels, which have many more distinct problems"
                )
            continue
        misses = 0
        seen.add(key)
        out.append(problem)
    return out
