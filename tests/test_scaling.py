"""Test-time budgets: positions of a response, majority vote over m samples, position caps."""

import pytest

from parallel_r1 import scaling


def rec(pid, index, pred, correct, tokens, paths=(), per_block=()):
    return {
        "problem_id": pid,
        "sample_index": index,
        "pred": pred,
        "correct": correct,
        "response_tokens": tokens,
        "path_tokens": list(paths),
        "paths_per_block": list(per_block),
    }


def test_positions_count_each_blocks_longest_path_under_unseen_only():
    # Two blocks (paths 10+6 and 8+9): Unseen keeps 10 and 9 of the 33 path tokens.
    r = rec("p", 0, "1", True, 50, paths=(10, 6, 8, 9), per_block=(2, 2))
    assert scaling.response_positions(r, "unseen") == 50 - 33 + 10 + 9
    assert scaling.response_positions(r, "seen") == 50
    assert scaling.response_positions(r, "threads") == 50
    with pytest.raises(ValueError, match="path lengths"):
        scaling.response_positions(rec("p", 0, "1", True, 50, paths=(10, 6), per_block=(3,)), "unseen")


def test_positions_of_a_block_without_paths():
    # A planned block can close before its first path (a plan cut by the response cap): it saves nothing.
    r = rec("p", 0, "1", True, 40, paths=(7, 5), per_block=(0, 2))
    assert scaling.response_positions(r, "unseen") == 40 - 5


def test_vote_credit_splits_ties_and_ignores_missing_answers():
    group = [rec("p", 0, "3", True, 5), rec("p", 1, "4", False, 5)]
    assert scaling.vote_credit(group) == 0.5
    assert scaling.vote_credit([*group, rec("p", 2, "4", False, 5)]) == 0.0
    assert scaling.vote_credit([*group, rec("p", 2, " 3", True, 5)]) == 1.0
    assert scaling.vote_credit([rec("p", 0, None, False, 5)]) == 0.0


def test_majority_curve_by_hand():
    # Problem a: samples right, wrong, right; problem b: all wrong with the same answer.
    records = [
        rec("a", 0, "3", True, 10),
        rec("a", 1, "5", False, 20),
        rec("a", 2, "3", True, 30),
        *[rec("b", i, "7", False, 10) for i in range(3)],
    ]
    curve = scaling.majority_curve(records, "seen")
    assert [row["m"] for row in curve] == [1, 2, 3]
    assert curve[0]["accuracy"] == pytest.approx((2 / 3 + 0) / 2)
    # m=2 on a: {r,w}: 0.5, {r,r}: 1, {w,r}: 0.5 -> 2/3.
    assert curve[1]["accuracy"] == pytest.approx((2 / 3) / 2)
    assert curve[2]["accuracy"] == pytest.approx(0.5)
    assert curve[0]["tokens"] == pytest.approx((20 + 10) / 2)
    assert curve[2]["tokens"] == pytest.approx((60 + 30) / 2)
    # m samples side by side cost the longest: on a, pairs (10,20), (10,30), (20,30) -> 80/3.
    assert curve[1]["positions"] == pytest.approx((80 / 3 + 10) / 2)
    assert scaling.per_problem_majority(records, 2) == pytest.approx({"a": 2 / 3, "b": 0.0})


def test_capped_accuracy_counts_an_answer_beyond_the_cap_as_wrong():
    records = [
        rec("a", 0, "3", True, 40, paths=(20, 20), per_block=(2,)),  # 20 positions under Unseen
        rec("a", 1, "3", True, 30),
        rec("b", 0, "4", False, 10),
    ]
    assert scaling.capped_accuracy(records, "unseen", [19, 20, 30]) == {19: 0.0, 20: 1 / 3, 30: 2 / 3}
    assert scaling.capped_accuracy(records, "seen", [30, 40]) == {30: 1 / 3, 40: 2 / 3}
    assert scaling.per_problem_at_cap(records, "unseen", 20) == {"a": 0.5, "b": 0.0}


def test_at_budget_interpolates_between_points():
    curve = [{"m": 1, "accuracy": 0.2, "tokens": 10}, {"m": 2, "accuracy": 0.4, "tokens": 20}]
    assert scaling.at_budget(curve, 15) == pytest.approx(0.3)
    assert scaling.at_budget(curve, 5) is None
    assert scaling.at_budget(curve, 50) == 0.4
