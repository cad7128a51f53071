"""The built-in tasks (no downloads, no API keys) and their registry: the functions that take a task name.

Each task is a module of its own (`arith`, `search`, the study's default) with the same names: its
`generate`, `teacher_solution`, `path_hits` and its levels (`LEVELS`, `COLD_START_LEVELS`, `RL_EASY_LEVELS`,
`RL_HARD_LEVELS`, `EVAL_LEVELS`). Both draw their problems with `generator.generate`.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from parallel_r1.data import Problem, SFTRecord
from parallel_r1.prompts import PROMPT_TEMPLATE, SEQUENTIAL_TEMPLATE, build_prompt
from parallel_r1.tasks import arith, search

TASKS = ("arith", "search")
STYLES = ("parallel", "sequential")  # the teacher styles every task writes (search has more: search.STYLES)


def task_module(name: str):
    """The module of the built-in task `name`: its `generate`, `teacher_solution`, `path_hits`, levels."""
    if name == "arith":
        return arith
    if name == "search":
        return search
    raise ValueError(f"unknown built-in task {name!r}; tasks are {list(TASKS)}")


def make_problems(
    n: int,
    levels: Sequence[int] | None = None,
    split: str = "train",
    seed: int = 0,
    task: str = "arith",
    pool: str | None = None,
) -> list[Problem]:
    """`n` distinct `Problem`s of the built-in `task` (answer the integer as a string); empty `levels`:
    the task's cold-start levels; `pool`: "rl" for an RL stage's problems, which no SFT stage trains on."""
    module = task_module(task)
    levels = tuple(levels or module.COLD_START_LEVELS)
    return [p.to_problem() for p in module.generate(n, levels, split, seed, pool=pool)]


def make_eval_problems(
    n: int, levels: Sequence[int] = tuple(arith.LEVELS), seed: int = 0, task: str = "arith"
) -> list[Problem]:
    """Held-out problems: never the same computation as any training problem."""
    return make_problems(n, levels, "eval", seed, task)


def teacher_examples(
    n: int, levels: Sequence[int] | None = None, seed: int = 0, style: str = "parallel", task: str = "arith"
) -> list:
    """`n` problems of the training split's SFT pool, each with a teacher solution of `style`; the same
    arguments give the same list, so recipes of different styles with one seed train on the same problems,
    with the candidates tried in the same order."""
    module = task_module(task)
    rng = random.Random(f"sft-teacher-{seed}")
    problems = module.generate(n, tuple(levels or module.COLD_START_LEVELS), "train", seed, pool="sft")
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


def cluster_key(problem: Problem, task: str) -> str:
    """The computation that solves `problem` (a built-in task's): held-out problems that share one are not
    independent, so standard errors are clustered by it. The arithmetic task's id is already its computation."""
    if task == "search":
        return search.cluster_of(problem.question, problem.answer)
    task_module(task)
    return problem.id


def tokenizer_corpus(n: int = 2000, seed: int = 0) -> list[str]:
    """Texts for `tiny.build_tokenizer`: questions and solutions of every level of every built-in task in
    every style, and the project's prompt templates (repeated, so their words become single tokens)."""
    rng = random.Random(f"corpus-{seed}")
    texts = [build_prompt("", template) for template in (PROMPT_TEMPLATE, SEQUENTIAL_TEMPLATE)] * max(1, n // 20)
    for name in TASKS:
        module = task_module(name)
        for p in module.generate(n, tuple(module.LEVELS), "train", seed):
            texts.append(p.question)
            texts.append(module.teacher_solution(p, rng.choice(getattr(module, "STYLES", STYLES)), rng))
    return texts
