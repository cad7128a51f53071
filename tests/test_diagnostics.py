"""Block diagnostics on the search task, on constructed responses."""

import pytest

from parallel_r1.diagnostics import block_diagnostics, block_facts, first_try_entropy, tried_candidates
from parallel_r1.tasks import search

P = search.SearchProblem(3, (4, 9, 2, 7), answer=7, factor=3, offset=10)


def path(n):
    return "<Path>" + search.try_lines(n, P.factor, P.offset, P.target) + "</Path>"


def block(a, b, summary):
    return f"<Parallel>{path(a)}{path(b)}</Parallel><Summary>{summary}</Summary>"


def record(text, index=0):
    return {"response": text, "gold": "7", "problem_index": 0, "step": 1, "sample_index": index}


def test_block_facts_read_tries_verdicts_and_summaries():
    text = block(4, 9, "none works") + block(2, 7, "7 works") + "Final Answer: 7"
    facts = block_facts(text)
    assert [f["tried"] for f in facts] == [[4, 9], [2, 7]]
    assert [f["works"] for f in facts] == [[], [7]]
    assert [f["named"] for f in facts] == ["none", 7]
    assert tried_candidates(text) == [4, 9, 2, 7]
    mixed = block(4, 9, "none works") + search.try_lines(7, 3, 10, 31) + "\nFinal Answer: 7"
    assert tried_candidates(mixed) == [4, 9, 7]


def test_diagnostics_by_hand():
    records = [
        record(block(4, 4, "none works") + "Final Answer: 4", 0),  # duplicate, misses the gold
        record(block(7, 2, "2 works") + "Final Answer: 2", 1),  # covers the gold, inconsistent summary
        record(block(9, 7, "7 works") + "Final Answer: 7", 2),  # consistent
    ]
    d = block_diagnostics(records)
    assert d["blocks"] == 3 and d["responses"] == 3
    assert d["duplicate_rate"] == pytest.approx(1 / 3)
    assert d["coverage"] == pytest.approx(2 / 3)
    assert d["summary_consistency"] == pytest.approx(2 / 3)
    # First tries 4, 7, 9 of one prompt: log2(3) bits.
    assert d["first_try_entropy"] == pytest.approx(1.584962500721156)


def test_first_try_entropy_is_zero_when_every_sample_starts_alike():
    assert first_try_entropy([[3, 3, 3], [5, 5]]) == 0.0
    assert first_try_entropy([[3, 5]]) == pytest.approx(1.0)
    assert first_try_entropy([[None]]) is None


def planned(*candidates, summary="none works"):
    plan = "".join(f"{n}*{P.factor}\n" for n in candidates)
    return f"<Parallel>{plan}{''.join(path(n) for n in candidates)}</Parallel><Summary>{summary}</Summary>"


def test_planned_blocks_count_their_paths_and_duplicates():
    records = [
        record(planned(4, 9, 2) + planned(7, summary="7 works") + "Final Answer: 7", 0),
        record(planned(9, 9) + "Final Answer: 9", 1),  # a plan that names one candidate twice
    ]
    d = block_diagnostics(records)
    assert d["blocks"] == 3 and d["paths_per_block"] == {
        1: pytest.approx(1 / 3),
        2: pytest.approx(1 / 3),
        3: pytest.approx(1 / 3),
    }
    assert d["duplicate_rate"] == pytest.approx(1 / 3)
    assert [f["tried"] for f in block_facts(records[0]["response"])] == [[4, 9, 2], [7]]
