"""The task registry and the shared generator: dispatch by name, and the same problems as before the tasks
shared one generator."""

import hashlib

import pytest

from parallel_r1 import tasks
from parallel_r1.tasks import search


def _hash(texts) -> str:
    return hashlib.sha1("\n".join(texts).encode()).hexdigest()[:16]


# Computed with the two tasks' own `generate` loops before they shared `generator.generate`: a change here
# changes every recipe's data, so it must be deliberate.
PINNED = {
    ("arith", "train"): "bed6e5c1d793be33",
    ("arith", "eval"): "47ad98a575471ff5",
    ("arith", "sft"): "bc99cebd8d28b673",
    ("search", "train"): "6821323cd44b5441",
    ("search", "eval"): "829fbda93cbd1edb",
    ("search", "sft"): "1172f435880d2726",
}


@pytest.mark.parametrize("name", tasks.TASKS)
def test_the_same_arguments_draw_the_same_problems_as_before(name):
    module = tasks.task_module(name)
    levels = tuple(module.LEVELS)
    assert _hash(p.id for p in module.generate(300, levels, "train", 4)) == PINNED[name, "train"]
    assert _hash(p.id for p in module.generate(100, levels, "eval", 4)) == PINNED[name, "eval"]
    examples = tasks.teacher_examples(40, None, 2, "parallel", name)
    assert _hash(p.question + response for p, response in examples) == PINNED[name, "sft"]


def test_task_registry_dispatches_both_tasks():
    assert tasks.task_module("search") is search
    problems = tasks.make_problems(12, None, "train", 0, "search")
    assert all(p.source == "search" and p.id.startswith("search-L") for p in problems)
    records = tasks.make_sft_records(6, None, 0, "sequential", task="search")
    assert all("<Parallel>" not in r.response for r in records)
    with pytest.raises(ValueError, match="unknown built-in task"):
        tasks.task_module("sudoku")


def test_a_task_that_runs_out_of_distinct_problems_says_so():
    with pytest.raises(ValueError, match="distinct train search problems"):
        search.generate(10**6, (1,))
