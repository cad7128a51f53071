"""The built-in search task: find the candidate that checks out (Countdown-style, no downloads).

A problem lists a few candidate numbers and a target; exactly one candidate n reaches the target::

    Find n in 4, 9, 2, 7 with n*3+10=31.

No line of working leads straight to the answer (the teacher never divides): a solution tries
candidates, and each try is checked locally against the target. This is the kind of problem where
several independent attempts, reconciled by a summary, can beat one line of reasoning: a path tries
one candidate and says ``yes`` or ``no``, the summary keeps the one that checked out.

The programmatic teacher writes both styles with the same information, the candidates tried in the
same (shuffled) order:

* ``parallel``: blocks of `num_paths` paths, one candidate a path; the summary names the candidate that
  checked out (``7 works``) or says ``none works`` and the next block tries the next candidates;
* ``sequential``: one try after another (a blank line between tries), stopping at the one that works.

Levels grade the difficulty (more candidates, bigger multipliers, subtraction). Train and held-out
problems are told apart by a hash of the computation that solves them (multiplier, offset, answer):
no training problem tries the computation that solves a held-out one.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from parallel_r1.data import Problem
from parallel_r1.format import PARALLEL_CLOSE, PARALLEL_OPEN, PATH_CLOSE, PATH_OPEN, SUMMARY_CLOSE, SUMMARY_OPEN
from parallel_r1.tasks import generator

SOURCE = "search"
CANDIDATES = tuple(range(2, 10))


@dataclass(frozen=True)
class Level:
    """How hard one level is."""

    num_candidates: int
    max_factor: int
    max_offset: int
    subtract: bool  # whether the offset may be subtracted


LEVELS: dict[int, Level] = {
    1: Level(num_candidates=2, max_factor=3, max_offset=9, subtract=False),
    2: Level(num_candidates=3, max_factor=4, max_offset=9, subtract=True),
    3: Level(num_candidates=4, max_factor=5, max_offset=19, subtract=True),
    4: Level(num_candidates=5, max_factor=7, max_offset=29, subtract=True),
    5: Level(num_candidates=6, max_factor=9, max_offset=49, subtract=True),
}
COLD_START_LEVELS = (1, 2, 3)
RL_EASY_LEVELS = (1, 2, 3)
RL_HARD_LEVELS = (2, 3, 4)
EVAL_LEVELS = (2, 3, 4)


@dataclass(frozen=True)
class SearchProblem:
    """Candidates (in the order the question lists them), `answer` among them, and n*factor +- offset."""

    level: int
    candidates: tuple[int, ...]
    answer: int
    factor: int
    offset: int  # negative: subtracted

    @property
    def key(self) -> str:
        """The computation that solves the problem: what the split hash and dedup use."""
        return computation_key(self.factor, self.offset, self.answer)

    @property
    def target(self) -> int:
        return value(self.answer, self.factor, self.offset)

    @property
    def question(self) -> str:
        listed = ", ".join(str(c) for c in self.candidates)
        sign = "+" if self.offset >= 0 else "-"
        return f"Find n in {listed} with n*{self.factor}{sign}{abs(self.offset)}={self.target}."

    @property
    def id(self) -> str:
        listed = "".join(str(c) for c in self.candidates)
        return f"search-L{self.level}-{generator.digest(self.key + '/' + listed)[:12]}"

    def to_problem(self) -> Problem:
        return Problem(question=self.question, answer=str(self.answer), source=SOURCE, id=self.id)


def value(n: int, factor: int, offset: int) -> int:
    return n * factor + offset


def computation_key(factor: int, offset: int, n: int) -> str:
    return f"{n}*{factor}{offset:+d}"


def split_of(key: str) -> str:
    """`eval` for about `generator.EVAL_PERCENT`% of all computations, `train` for the rest, fixed forever;
    a new salt would redraw the held-out split."""
    return generator.split_of("search/" + key)


def sample_problem(level: int, rng: random.Random) -> SearchProblem:
    """Draw one problem of `level`; the target is positive and every candidate's value distinct."""
    if level not in LEVELS:
        raise ValueError(f"unknown level {level}; levels are {sorted(LEVELS)}")
    cfg = LEVELS[level]
    while True:
        candidates = tuple(rng.sample(CANDIDATES, cfg.num_candidates))
        answer = rng.choice(candidates)
        factor = rng.randint(2, cfg.max_factor)
        offset = rng.randint(1, cfg.max_offset)
        if cfg.subtract and rng.random() < 0.5:
            offset = -offset
        if all(value(c, factor, offset) > 0 for c in candidates):
            return SearchProblem(level, candidates, answer, factor, offset)


def _in_split(problem: SearchProblem, split: str) -> bool:
    # A training problem may not even try (as a wrong candidate) a computation that solves a held-out one.
    if split == "eval":
        return split_of(problem.key) == "eval"
    return all(split_of(computation_key(problem.factor, problem.offset, c)) == "train" for c in problem.candidates)


def generate(
    n: int, levels: Sequence[int] = COLD_START_LEVELS, split: str = "train", seed: int = 0
) -> list[SearchProblem]:
    """`n` distinct problems of `split`, levels taken in turn; the same arguments give the same list. Two
    problems are the same when they list the same candidates for the same computation."""
    return generator.generate(SOURCE, n, levels, split, seed, sample_problem, lambda p: p.id, _in_split)


def try_lines(n: int, factor: int, offset: int, target: int) -> str:
    """One try: the candidate's value in two equations, the value set beside the target, and the verdict
    with the candidate restated (``5 works`` / ``5 fails``). Written out so that a small model compares two
    numbers side by side, and so that a summary finds the candidate next to the word that says it works:
    in the Unseen layout every path starts at the same position, so position cannot tell paths apart."""
    product = n * factor
    sign = "+" if offset >= 0 else "-"
    reached = product + offset
    verdict = "works" if reached == target else "fails"
    return f"{n}*{factor}={product}\n{product}{sign}{abs(offset)}={reached}\n{reached} vs {target}: {n} {verdict}"


def teacher_solution(
    problem: SearchProblem, style: str = "parallel", rng: random.Random | None = None, num_paths: int = 2
) -> str:
    """A worked solution ending with `Final Answer: <n>`: the candidates tried in a shuffled order."""
    if style not in ("parallel", "sequential"):
        raise ValueError(f"style must be 'parallel' or 'sequential', got {style!r}")
    rng = rng or random.Random(problem.id)
    order = list(problem.candidates)
    rng.shuffle(order)
    hit = order.index(problem.answer)
    final = f"Final Answer: {problem.answer}"
    tries = [try_lines(c, problem.factor, problem.offset, problem.target) for c in order]
    if style == "sequential":
        # A blank line between tries: the sequential trace gets a separator of its own, as paths get tags.
        return "\n\n".join(tries[: hit + 1]) + "\n" + final
    blocks = []
    for start in range(0, hit + 1, num_paths):
        group = order[start : start + num_paths]
        if len(group) < 2:  # a block needs two paths: the last one re-tries a candidate already ruled out
            group = [order[start - 1], *group] if start else group + group
        paths = "".join(
            PATH_OPEN + try_lines(c, problem.factor, problem.offset, problem.target) + PATH_CLOSE for c in group
        )
        summary = f"{problem.answer} works" if problem.answer in group else "none works"
        blocks.append(PARALLEL_OPEN + paths + PARALLEL_CLOSE + SUMMARY_OPEN + summary + SUMMARY_CLOSE)
    return "".join(blocks) + final


def path_hits(path: str, gold: str) -> bool:
    """Whether a path of a solution tried the right candidate and found that it works."""
    return path.rstrip().endswith(f": {str(gold).strip()} works")
