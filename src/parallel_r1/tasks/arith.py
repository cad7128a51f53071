"""The built-in arithmetic task and its programmatic teacher.

A problem is a short word problem over one quantity that goes through a chain of operations::

    Ann has 12 coins. Ann gets 5 more. Ann gives away 3. Ann makes it 2 times as many.
    How many coins does Ann have now?

Levels grade the difficulty (more operations, bigger numbers, multiplications from level 3 on). The
easy levels play the role of GSM8K (cold start, first RL stage) and the hard ones the role of
DAPO-Math (second RL stage). Every problem has at least two adjacent additions/subtractions, so there
is always a second, genuinely different way to compute it: gather all gains and all losses first.

The teacher writes one equation a line. Its parallel solutions either explore (two paths compute the
answer in different orders, the summary says they agree) or verify (the main text computes, one path
undoes the operations back to the start, the other recomputes in the other order).

Train and eval problems are told apart by a hash of the arithmetic (start value and operations), so
the held-out split never shares a computation with training, whatever the seeds and sizes.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

from parallel_r1.data import Problem
from parallel_r1.format import PARALLEL_CLOSE, PARALLEL_OPEN, PATH_CLOSE, PATH_OPEN, SUMMARY_CLOSE, SUMMARY_OPEN
from parallel_r1.tasks import generator

SOURCE = "arith"
NAMES = ("Ann", "Ben", "Cal", "Dot", "Eve", "Fin", "Gus", "Ivy")
ITEMS = ("apples", "coins", "pens", "cards", "books", "eggs", "shells", "stamps")
ADD_TEMPLATES = ("{name} gets {n} more.", "{name} finds {n} more.")
SUB_TEMPLATES = ("{name} gives away {n}.", "{name} loses {n}.")
MUL_TEMPLATE = "{name} makes it {n} times as many."


@dataclass(frozen=True)
class Level:
    """How hard one level is: operation count and number ranges."""

    num_ops: int
    max_start: int
    max_operand: int
    num_mul: int
    max_factor: int
    max_value: int


LEVELS: dict[int, Level] = {
    1: Level(num_ops=2, max_start=20, max_operand=9, num_mul=0, max_factor=1, max_value=40),
    2: Level(num_ops=3, max_start=30, max_operand=9, num_mul=0, max_factor=1, max_value=60),
    3: Level(num_ops=3, max_start=20, max_operand=9, num_mul=1, max_factor=3, max_value=99),
    4: Level(num_ops=4, max_start=30, max_operand=20, num_mul=1, max_factor=4, max_value=199),
    5: Level(num_ops=5, max_start=40, max_operand=30, num_mul=2, max_factor=4, max_value=499),
    6: Level(num_ops=6, max_start=99, max_operand=50, num_mul=2, max_factor=9, max_value=999),
}
# Measured before the trainers existed, by a plain SFT loop (bench/learnability.py, in git history only):
# after ~1000 SFT steps the tiny default (3.3 M) solves some level 1-2 problems and none above; GRPO only
# learns where some samples of a group are right, hence these RL levels.
COLD_START_LEVELS = (1, 2)
RL_EASY_LEVELS = (1, 2)
RL_HARD_LEVELS = (2, 3)
EVAL_LEVELS = (1, 2)

Step = tuple[str, int]
_NUMBER_RE = re.compile(r"-?\d+")


@dataclass(frozen=True)
class ArithProblem:
    """One generated problem: a start value and a chain of `(op, n)` steps, op in `+ - *`."""

    level: int
    name: str
    item: str
    start: int
    steps: tuple[Step, ...]
    wording: tuple[int, ...]

    @property
    def key(self) -> str:
        """The arithmetic alone (no name, item or wording): what the split hash and dedup use."""
        return str(self.start) + "".join(f"{op}{n}" for op, n in self.steps)

    @property
    def answer(self) -> int:
        return _run(self.start, self.steps)[-1]

    @property
    def question(self) -> str:
        sentences = [f"{self.name} has {self.start} {self.item}."]
        for (op, n), w in zip(self.steps, self.wording):
            template = {"+": ADD_TEMPLATES[w], "-": SUB_TEMPLATES[w], "*": MUL_TEMPLATE}[op]
            sentences.append(template.format(name=self.name, n=n))
        sentences.append(f"How many {self.item} does {self.name} have now?")
        return " ".join(sentences)

    @property
    def id(self) -> str:
        return f"arith-L{self.level}-{generator.digest(self.key)[:12]}"

    def to_problem(self) -> Problem:
        return Problem(question=self.question, answer=str(self.answer), source=SOURCE, id=self.id)


def _apply(x: int, op: str, n: int) -> int:
    return x + n if op == "+" else x - n if op == "-" else x * n


def _run(start: int, steps: Sequence[Step]) -> list[int]:
    """All intermediate values, start included."""
    values = [start]
    for op, n in steps:
        values.append(_apply(values[-1], op, n))
    return values


def split_of(key: str) -> str:
    """`eval` for about `generator.EVAL_PERCENT`% of all computations, `train` for the rest, fixed forever."""
    return generator.split_of(key)


def _has_adjacent_addsub(mul_at: set[int], num_ops: int) -> bool:
    return any(i not in mul_at and i + 1 not in mul_at for i in range(num_ops - 1))


def sample_problem(level: int, rng: random.Random) -> ArithProblem:
    """Draw one problem of `level`; every intermediate value stays in [0, max_value]."""
    if level not in LEVELS:
        raise ValueError(f"unknown level {level}; levels are {sorted(LEVELS)}")
    cfg = LEVELS[level]
    while True:
        mul_at = set(rng.sample(range(cfg.num_ops), cfg.num_mul))
        if not _has_adjacent_addsub(mul_at, cfg.num_ops):
            continue
        x = start = rng.randint(2, cfg.max_start)
        steps: list[Step] = []
        for i in range(cfg.num_ops):
            if i in mul_at:
                step = ("*", rng.randint(2, cfg.max_factor))
            else:
                n = rng.randint(1, cfg.max_operand)
                step = ("-", n) if n < x and (rng.random() < 0.5 or x + n > cfg.max_value) else ("+", n)
            x = _apply(x, *step)
            steps.append(step)
            if x > cfg.max_value:
                break
        if len(steps) == cfg.num_ops and x <= cfg.max_value:
            break
    wording = tuple(rng.randrange(len(ADD_TEMPLATES)) for _ in steps)
    return ArithProblem(level, rng.choice(NAMES), rng.choice(ITEMS), start, tuple(steps), wording)


def generate(
    n: int, levels: Sequence[int] = COLD_START_LEVELS, split: str = "train", seed: int = 0, pool: str | None = None
) -> list[ArithProblem]:
    """`n` distinct problems of `split` (and of `pool`, see `generator`), levels taken in turn; the same
    arguments give the same list. The arithmetic task has no `valid` split."""
    return generator.generate(
        SOURCE, n, levels, split, seed, sample_problem, lambda p: p.key, lambda p, split: split_of(p.key) == split, pool
    )


def _equation(x: int, op: str, n: int) -> str:
    return f"{x}{op}{n}={_apply(x, op, n)}"


def forward_lines(start: int, steps: Sequence[Step]) -> list[str]:
    """One equation per operation, in the order of the question."""
    values = _run(start, steps)
    return [_equation(x, op, n) for x, (op, n) in zip(values, steps)]


def _fold(op: str, numbers: Sequence[int]) -> tuple[list[str], int]:
    lines, total = [], numbers[0]
    for n in numbers[1:]:
        lines.append(_equation(total, op, n))
        total = _apply(total, op, n)
    return lines, total


def grouped_lines(start: int, steps: Sequence[Step]) -> list[str]:
    """The other order: within each run of additions/subtractions, total the gains and the losses,
    then apply the net change once; within a run of multiplications, multiply the factors first.
    Uses as many equations as `forward_lines`, never a negative number, and reaches the same value."""
    lines: list[str] = []
    x, i = start, 0
    while i < len(steps):
        j = i
        is_mul = steps[i][0] == "*"
        while j < len(steps) and (steps[j][0] == "*") == is_mul:
            j += 1
        run = steps[i:j]
        if is_mul:
            fold_lines, factor = _fold("*", [n for _, n in run])
            lines += fold_lines + [_equation(x, "*", factor)]
            x *= factor
        else:
            gains, losses = [n for o, n in run if o == "+"], [n for o, n in run if o == "-"]
            gain_lines, gain = _fold("+", gains or [0])
            loss_lines, loss = _fold("+", losses or [0])
            lines += gain_lines + loss_lines
            if gains and losses:
                lines.append(_equation(max(gain, loss), "-", min(gain, loss)))
            op = "+" if gain >= loss else "-"
            lines.append(_equation(x, op, abs(gain - loss)))
            x = _apply(x, op, abs(gain - loss))
        i = j
    return lines


def inverse_lines(start: int, steps: Sequence[Step]) -> list[str]:
    """Undo the operations from the answer back to the start value (a check by the inverse)."""
    values = _run(start, steps)
    undo = {"+": "-", "-": "+", "*": "/"}
    return [f"{values[i + 1]}{undo[op]}{n}={values[i]}" for i, (op, n) in reversed(list(enumerate(steps)))]


def teacher_solution(
    problem: ArithProblem, style: str = "parallel", rng: random.Random | None = None, verify_share: float = 0.5
) -> str:
    """A short worked solution ending with `Final Answer: <n>`, in canonical layout.

    `style="parallel"` opens one block, either to explore (two paths compute the answer in different
    orders) or, with probability `verify_share`, to verify (main text computes, the paths
    check by the inverse and by the other order). The order of the two paths is drawn too.
    `style="sequential"` is the plain computation with no block.
    """
    rng = rng or random.Random(problem.key)
    answer = problem.answer
    forward = "\n".join(forward_lines(problem.start, problem.steps))
    final = f"Final Answer: {answer}"
    if style == "sequential":
        return f"{forward}\n{final}"
    if style != "parallel":
        raise ValueError(f"style must be 'parallel' or 'sequential', got {style!r}")
    grouped = "\n".join(grouped_lines(problem.start, problem.steps))
    verify = rng.random() < verify_share
    if verify:
        main = forward
        paths = ["\n".join(inverse_lines(problem.start, problem.steps)), grouped]
        summary = f"Both confirm {answer}."
    else:
        main = ""
        paths = [forward, grouped]
        summary = f"Both give {answer}."
    rng.shuffle(paths)
    block = PARALLEL_OPEN + "".join(PATH_OPEN + p + PATH_CLOSE for p in paths) + PARALLEL_CLOSE
    return main + block + SUMMARY_OPEN + summary + SUMMARY_CLOSE + final


def path_hits(path: str, gold: str) -> bool:
    """Whether a path of a solution reaches the right answer (its last number is the gold)."""
    numbers = _NUMBER_RE.findall(path)
    return bool(numbers) and numbers[-1] == str(gold).strip()
