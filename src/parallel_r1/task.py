"""The built-in tasks (no downloads, no API keys): their registry (`task_module`, and the functions that take a
task name: `make_problems`, `make_eval_problems`, `teacher_examples`, `make_sft_records`), and the arithmetic
task with its programmatic teacher. The search task, the study's default, is `search_task.py`.

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

import hashlib
import random
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from parallel_r1 import search_task
from parallel_r1.data import PROMPT_TEMPLATE, SEQUENTIAL_TEMPLATE, Problem, SFTRecord, build_prompt
from parallel_r1.format import PARALLEL_CLOSE, PARALLEL_OPEN, PATH_CLOSE, PATH_OPEN, SUMMARY_CLOSE, SUMMARY_OPEN

SOURCE = "arith"
SPLITS = ("train", "eval")
EVAL_PERCENT = 10
MAX_MISSES = 20_000
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
# bench/learnability.py: after ~1000 SFT steps the tiny default (3.3 M) solves some level 1-2 problems
# and none above; GRPO only learns where some samples of a group are right, hence these RL levels.
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
        return f"arith-L{self.level}-{_digest(self.key)[:12]}"

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


def _digest(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()


def split_of(key: str) -> str:
    """`eval` for about EVAL_PERCENT% of all computations, `train` for the rest, fixed forever."""
    return "eval" if int(_digest(key)[:8], 16) % 100 < EVAL_PERCENT else "train"


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
    n: int, levels: Sequence[int] = COLD_START_LEVELS, split: str = "train", seed: int = 0
) -> list[ArithProblem]:
    """`n` distinct problems of `split`, levels taken in turn; the same arguments give the same list."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    rng = random.Random(f"arith-{split}-{seed}")
    seen: set[str] = set()
    out: list[ArithProblem] = []
    misses = 0
    while len(out) < n:
        problem = sample_problem(levels[len(out) % len(levels)], rng)
        if problem.key in seen or split_of(problem.key) != split:
            misses += 1
            # Only small levels run out; tens of thousands of misses in a row mean they did.
            if misses > MAX_MISSES:
                raise ValueError(
                    f"cannot draw {n} distinct {split} problems from levels {list(levels)} (found {len(out)}): "
                    "ask for fewer, or add higher levels, which have many more distinct problems"
                )
            continue
        misses = 0
        seen.add(problem.key)
        out.append(problem)
    return out


def make_problems(
    n: int, levels: Sequence[int] | None = None, split: str = "train", seed: int = 0, task: str = "arith"
) -> list[Problem]:
    """`n` distinct `Problem`s of the built-in `task` (answer the integer as a string); empty `levels`:
    the task's cold-start levels."""
    module = task_module(task)
    return [p.to_problem() for p in module.generate(n, tuple(levels or module.COLD_START_LEVELS), split, seed)]


def make_eval_problems(
    n: int, levels: Sequence[int] = tuple(LEVELS), seed: int = 0, task: str = "arith"
) -> list[Problem]:
    """Held-out problems: never the same computation as any training problem."""
    return make_problems(n, levels, "eval", seed, task)


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


def teacher_examples(
    n: int, levels: Sequence[int] | None = None, seed: int = 0, style: str = "parallel", task: str = "arith"
) -> list:
    """`n` train-split problems of `task`, each with a teacher solution of `style`; the same arguments
    give the same list, so a parallel and a sequential recipe with one seed train on the same problems."""
    module = task_module(task)
    rng = random.Random(f"sft-teacher-{seed}")
    problems = module.generate(n, tuple(levels or module.COLD_START_LEVELS), "train", seed)
    return [(p, module.teacher_solution(p, style, rng)) for p in problems]


def make_sft_records(
    n: int,
    levels: Sequence[int] | None = None,
    seed: int = 0,
    style: str = "parallel",
    template: str = PROMPT_TEMPLATE,
    task: str = "arith",
) -> list[SFTRecord]:
    """Cold-start records of `teacher_examples`, prompted with `template`."""
    return [
        SFTRecord(prompt=build_prompt(p.question, template), response=response, answer=str(p.answer))
        for p, response in teacher_examples(n, levels, seed, style, task)
    ]


def path_hits(path: str, gold: str) -> bool:
    """Whether a path of a solution reaches the right answer (its last number is the gold)."""
    numbers = _NUMBER_RE.findall(path)
    return bool(numbers) and numbers[-1] == str(gold).strip()


TASKS = ("arith", "search")


def task_module(name: str):
    """The module of the built-in task `name`: its `generate`, `teacher_solution`, `path_hits`, levels."""
    if name == "arith":
        return sys.modules[__name__]
    if name == "search":
        return search_task
    raise ValueError(f"unknown built-in task {name!r}; tasks are {list(TASKS)}")


def tokenizer_corpus(n: int = 2000, seed: int = 0) -> list[str]:
    """Texts for `tiny.build_tokenizer`: questions and solutions of every level of every built-in task in
    both styles, and the project's prompt templates (repeated, so their words become single tokens)."""
    rng = random.Random(f"corpus-{seed}")
    texts = [build_prompt("", template) for template in (PROMPT_TEMPLATE, SEQUENTIAL_TEMPLATE)] * max(1, n // 20)
    for name in TASKS:
        module = task_module(name)
        for p in module.generate(n, tuple(module.LEVELS), "train", seed):
            texts.append(p.question)
            texts.append(module.teacher_solution(p, rng.choice(("parallel", "sequential")), rng))
    return texts
