"""The built-in search task: find the candidate that checks out (Countdown-style, no downloads).

A problem lists a few candidate numbers and a target; exactly one candidate n reaches the target::

    Find n in 4, 9, 2, 7 with n*3+10=31.

No line of working leads straight to the answer (the teacher never divides): a solution tries
candidates, and each try is checked locally against the target. This is the kind of problem where
several independent attempts, reconciled by a summary, can beat one line of reasoning: a path tries
one candidate and says ``yes`` or ``no``, the summary keeps the one that checked out.

The programmatic teacher writes every style from the same candidates in the same (shuffled) order, so the
styles differ in one thing at a time (docs/study.md):

* ``parallel``: blocks of `num_paths` paths, one candidate a path; the summary names the candidate that
  checked out (``7 works``) or says ``none works`` and the next block tries the next candidates. It finishes
  the block that holds the hit, and fills a last block of one candidate with a re-try of one ruled out;
* ``plain``: the parallel text with its six tags replaced by plain-text delimiters (``Block:``, ``Try:``,
  ``So``): the same script and the same tries, no structure (a control, trained and decoded causally);
* ``sequential``: one try after another (a blank line between tries), stopping at the one that works;
* ``thorough``: sequential text with exactly the parallel script's tries (re-tries included): as broad as
  the parallel teacher, without blocks or summaries (a control);
* ``mixed``: a block of two paths only while three or more candidates remain untried, single tries
  otherwise, so that opening a block is a choice that depends on the problem;
* ``choice``: as ``mixed``, but wherever three or more candidates remain a block of two opens on a coin's
  toss (even odds, drawn from the solution's random stream), so the cold-started policy is unsure whether to
  open one and the rewards and their schedules can move that choice (with ``mixed`` it is fixed by the
  problem's state, and RL cannot change it); not in `STYLES`;
* ``planned`` (the planned format, docs/design.md "Planned blocks"; not in `STYLES` either: the tiny
  tokenizer's corpus draws from `STYLES`, and a new style there would change the tokenizer): blocks of up
  to `PLANNED_PATHS` paths, each opened by a plan that names
  the candidate of each path (``5*3``, one line a path) and each path starting with its line. Candidates are
  tried in the same order as in every style, a full block at a time up to the block that holds the hit;
  a block holds fewer paths only when fewer candidates are left (one path is a block, no re-try), so the
  number of paths depends on the problem, not on where its answer is.

Levels grade the difficulty (more candidates, bigger multipliers, subtraction). Splits are fixed by a hash
of the computation that solves a problem (multiplier, offset, answer): about 10 % held out (`eval`), 10 %
for validation (`valid`), the rest `train`; no training problem even tries a computation of another split.
The hash salt was changed once (`SPLIT_SALT`) to redraw the held-out split after the task's format had been
chosen with the old one in view.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

from parallel_r1.data import Problem
from parallel_r1.format import PARALLEL_CLOSE, PARALLEL_OPEN, PATH_CLOSE, PATH_OPEN, SUMMARY_CLOSE, SUMMARY_OPEN
from parallel_r1.tasks import generator

SOURCE = "search"
CANDIDATES = tuple(range(2, 10))
_QUESTION_RE = re.compile(r"with n\*(\d+)([+-])(\d+)=")
_CANDIDATE_RE = re.compile(r"\s*(\d+)\*")
STYLES = ("parallel", "plain", "sequential", "thorough", "mixed")
CHOICE = "choice"
PLANNED = "planned"
PLANNED_PATHS = 3  # the planned teacher's most paths a block (so blocks of 1, 2 and 3 paths occur)
SPLIT_SALT = "search-v2/"
VALID_PERCENT = 10
# The plain control's delimiters in place of the tags (the tags' order is that of format.TAGS).
PLAIN_DELIMITERS = {
    PARALLEL_OPEN: "Block:\n",
    PATH_OPEN: "Try:\n",
    PATH_CLOSE: "\n",
    PARALLEL_CLOSE: "",
    SUMMARY_OPEN: "So ",
    SUMMARY_CLOSE: "\n",
}


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
    """`eval` for about `generator.EVAL_PERCENT`% of all computations, `valid` for VALID_PERCENT%, `train` for
    the rest, fixed forever; a new SPLIT_SALT redraws them."""
    return generator.split_of(SPLIT_SALT + key, VALID_PERCENT)


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
    # A training problem may not even try (as a wrong candidate) a computation of another split, and a
    # validation problem none of the held-out split.
    if split == "eval":
        return split_of(problem.key) == "eval"
    tried = [split_of(computation_key(problem.factor, problem.offset, c)) for c in problem.candidates]
    if split == "valid":
        return split_of(problem.key) == "valid" and "eval" not in tried
    return all(s == "train" for s in tried)


def generate(
    n: int, levels: Sequence[int] = COLD_START_LEVELS, split: str = "train", seed: int = 0, pool: str | None = None
) -> list[SearchProblem]:
    """`n` distinct problems of `split` (and of `pool`, see `generator`), levels taken in turn; the same
    arguments give the same list. Two problems are the same when they list the same candidates for the same
    computation."""
    return generator.generate(SOURCE, n, levels, split, seed, sample_problem, lambda p: p.id, _in_split, pool)


def cluster_of(question: str, answer: str) -> str:
    """The computation that solves a problem, read back from its question and answer: what the study's standard
    errors cluster by (problems that share it are not independent)."""
    match = _QUESTION_RE.search(question)
    if not match:
        raise ValueError(f"not a search-task question: {question!r}")
    factor, sign, offset = int(match.group(1)), match.group(2), int(match.group(3))
    return computation_key(factor, offset if sign == "+" else -offset, int(answer))


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
    problem: SearchProblem, style: str = "parallel", rng: random.Random | None = None, num_paths: int | None = None
) -> str:
    """A worked solution in `style` (see the module docstring) ending with `Final Answer: <n>`: the candidates
    tried in a shuffled order. `num_paths`: paths a block (default 2), the most for ``planned`` (default
    `PLANNED_PATHS`)."""
    if style not in (*STYLES, CHOICE, PLANNED):
        raise ValueError(f"style must be one of {', '.join((*STYLES, CHOICE, PLANNED))}, got {style!r}")
    rng = rng or random.Random(problem.id)
    order = list(problem.candidates)
    rng.shuffle(order)
    final = f"Final Answer: {problem.answer}"
    if style == "sequential":
        # A blank line between tries: the sequential trace gets a separator of its own, as paths get tags.
        return "\n\n".join(_try(problem, c) for c in order[: order.index(problem.answer) + 1]) + "\n" + final
    if style in ("mixed", CHOICE):
        return _mixed(problem, order, rng if style == CHOICE else None) + final
    if style == PLANNED:
        most = num_paths or PLANNED_PATHS
        hit = order.index(problem.answer)
        groups = [order[start : start + most] for start in range(0, hit + 1, most)]
        return "".join(_block(problem, group, planned=True) for group in groups) + final
    groups = _parallel_groups(problem, order, num_paths or 2)
    if style == "thorough":
        return "\n\n".join(_try(problem, c) for group in groups for c in group) + "\n" + final
    text = "".join(_block(problem, group) for group in groups) + final
    if style == "plain":
        for tag, delimiter in PLAIN_DELIMITERS.items():
            text = text.replace(tag, delimiter)
    return text


def _try(problem: SearchProblem, n: int) -> str:
    return try_lines(n, problem.factor, problem.offset, problem.target)


def _parallel_groups(problem: SearchProblem, order: list[int], num_paths: int) -> list[list[int]]:
    """The candidates of each block of the parallel script, up to the block that holds the answer."""
    hit = order.index(problem.answer)
    groups = []
    for start in range(0, hit + 1, num_paths):
        group = order[start : start + num_paths]
        if len(group) < 2:  # a block needs two paths: the last one re-tries a candidate already ruled out
            group = [order[start - 1], *group] if start else group + group
        groups.append(group)
    return groups


def plan_line(n: int, factor: int) -> str:
    """A planned path's line: the product it computes first (``5*3``), which its try then starts with."""
    return f"{n}*{factor}"


def _block(problem: SearchProblem, group: list[int], planned: bool = False) -> str:
    paths = "".join(PATH_OPEN + _try(problem, c) + PATH_CLOSE for c in group)
    summary = f"{problem.answer} works" if problem.answer in group else "none works"
    plan = "".join(plan_line(c, problem.factor) + "\n" for c in group) if planned else ""
    return PARALLEL_OPEN + plan + paths + PARALLEL_CLOSE + SUMMARY_OPEN + summary + SUMMARY_CLOSE


def _mixed(problem: SearchProblem, order: list[int], coin: random.Random | None = None) -> str:
    """Blocks of two while three or more candidates remain untried (with `coin`: on its toss, one toss per
    such decision), single tries otherwise; stops at the hit."""
    text, i = "", 0
    while True:
        if len(order) - i >= 3 and (coin is None or coin.random() < 0.5):
            group = order[i : i + 2]
            text += _block(problem, group)
            if problem.answer in group:
                return text
            i += 2
            continue
        text += _try(problem, order[i])
        if order[i] == problem.answer:
            return text + "\n"
        text += "\n\n"
        i += 1


def path_candidate(path: str) -> int | None:
    """The candidate a path (or a try) tries: the number its first equation multiplies."""
    match = _CANDIDATE_RE.match(path)
    return int(match.group(1)) if match else None


def path_hits(path: str, gold: str) -> bool:
    """Whether a path of a solution tried the right candidate and found that it works."""
    return path.rstrip().endswith(f": {str(gold).strip()} works")
