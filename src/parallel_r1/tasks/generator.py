"""What the built-in tasks share: the splits by hash, the SFT and RL pools, and the loop that draws distinct
problems.

A task supplies how to draw one problem of a level, what makes two problems the same, and which problems a
split may hold; `generate` draws until it has enough, so both tasks split and deduplicate the same way.

Splits (`split_of`) are fixed by a hash of the computation that solves a problem: `eval` (held out, read once
per reported number), `valid` (for tuning, where a task has one) and `train`. Pools (`pool_of`) divide the
training problems by a hash of the problem itself: SFT stages draw from the `sft` pool and RL stages from the
`rl` pool, so RL never trains on its cold start's problems, whatever the seeds and sizes.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Sequence
from typing import TypeVar

SPLITS = ("train", "valid", "eval")
POOLS = ("sft", "rl")
EVAL_PERCENT = 10
MAX_MISSES = 20_000

P = TypeVar("P")


def digest(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()


def split_of(text: str, valid_percent: int = 0) -> str:
    """`eval` for about EVAL_PERCENT% of all texts, `valid` for the next `valid_percent`%, `train` for the
    rest, fixed forever."""
    bucket = int(digest(text)[:8], 16) % 100
    return "eval" if bucket < EVAL_PERCENT else "valid" if bucket < EVAL_PERCENT + valid_percent else "train"


def pool_of(identity: str) -> str:
    """`sft` or `rl`, about half each, by a hash of a training problem's identity."""
    return POOLS[int(digest("pool/" + identity)[:8], 16) % 2]


def generate(
    task: str,
    n: int,
    levels: Sequence[int],
    split: str,
    seed: int,
    sample: Callable[[int, random.Random], P],
    identity: Callable[[P], str],
    in_split: Callable[[P, str], bool],
    pool: str | None = None,
) -> list[P]:
    """`n` distinct problems of `split`, levels taken in turn: `sample(level, rng)` draws one, `identity`
    says which count as the same, `in_split` which ones `split` may hold, `pool` (train split only; None:
    both) which half of the training problems. The draws are seeded by `task`, `split` and `seed` alone, so
    the same arguments give the same list."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if pool is not None and (pool not in POOLS or split != "train"):
        raise ValueError(f"pool must be one of {POOLS} and only for the train split, got {pool!r} for {split!r}")
    rng = random.Random(f"{task}-{split}-{seed}")
    seen: set[str] = set()
    out: list[P] = []
    misses = 0
    while len(out) < n:
        problem = sample(levels[len(out) % len(levels)], rng)
        key = identity(problem)
        if key in seen or not in_split(problem, split) or (pool is not None and pool_of(key) != pool):
            misses += 1
            # Only small levels run out; tens of thousands of misses in a row mean they did.
            if misses > MAX_MISSES:
                raise ValueError(
                    f"cannot draw {n} distinct {split} {task} problems{f' of the {pool} pool' if pool else ''} "
                    f"from levels {list(levels)} "
                    f"(found {len(out)}): ask for fewer, or add higher levels, which have many more distinct problems"
                )
            continue
        misses = 0
        seen.add(key)
        out.append(problem)
    return out
