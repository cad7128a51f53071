"""The study's statistics by hand: standard errors over seeds and clustered over problems, and differences."""

import math

import pytest

from parallel_r1 import stats


def test_mean_and_standard_error_by_hand():
    mean, se = stats.mean_se([0.2, 0.4, 0.6])
    assert mean == pytest.approx(0.4)
    assert se == pytest.approx(0.2 / math.sqrt(3))
    assert stats.mean_se([0.5]) == (0.5, 0.0)


def test_clustered_se_by_hand_and_against_the_plain_one():
    values = {"a": 1.0, "b": 1.0, "c": 0.0, "d": 0.0}
    # One unit per cluster: sqrt(C/(C-1) * sum r^2) / n with residuals +-0.5.
    alone = {u: u for u in values}
    assert stats.clustered_se(values, alone) == pytest.approx(math.sqrt(4 / 3 * 4 * 0.25) / 4)
    assert stats.clustered_se(values, alone) == pytest.approx(stats.standard_error(list(values.values())))
    # Problems that share a computation move together: two clusters of two identical values.
    paired = {"a": "x", "b": "x", "c": "y", "d": "y"}
    assert stats.clustered_se(values, paired) == pytest.approx(math.sqrt(2 * (1.0**2 + 1.0**2)) / 4)
    assert stats.clustered_se(values, paired) > stats.clustered_se(values, alone)


def test_t_thresholds():
    assert stats.t_critical(2) == pytest.approx(4.303)
    assert stats.t_critical(4) == pytest.approx(2.776)
    assert stats.t_critical(100) == 1.96
    assert stats.t_critical(0) == math.inf


def _scores(seed_means: list[float], problems: int = 20, spread: float = 0.0) -> dict:
    return {
        str(s): {f"p{i}": m + (spread if i % 2 else -spread) for i in range(problems)} for s, m in enumerate(seed_means)
    }


def test_arm_difference_counts_seed_and_problem_noise():
    clusters = {f"p{i}": f"c{i // 2}" for i in range(20)}
    clear = stats.arm_difference(_scores([0.60, 0.62, 0.61]), _scores([0.40, 0.41, 0.39]), clusters)
    assert clear["diff"] == pytest.approx(0.21)
    assert clear["significant"] and clear["t_significant"] and clear["df"] == 4
    assert clear["se_problems"] == pytest.approx(0.0, abs=1e-12)  # every problem moves by the same amount
    noisy = stats.arm_difference(_scores([0.5, 0.7, 0.3]), _scores([0.45, 0.55, 0.35]), clusters)
    assert not noisy["significant"]
    # With no seed noise, the spread over problems carries the standard error, clustered.
    a = {"0": {f"p{i}": float(i % 4 == 0) for i in range(20)}}
    b = {"0": {f"p{i}": 0.0 for i in range(20)}}
    d = stats.arm_difference(a, b, clusters)
    assert d["se_seeds"] == 0 and d["se_problems"] == pytest.approx(stats.clustered_se(a["0"], clusters))
    assert not d["t_significant"]  # one seed a side: no degrees of freedom for a t test


def test_gain_difference_pairs_each_seed_with_its_own_sft_model():
    g = stats.gain_difference([0.1, 0.2, 0.3], [0.2, 0.3, 0.4], [0.3, 0.3, 0.3], [0.3, 0.31, 0.29])
    assert g["gain_a"] == pytest.approx(0.1) and g["se_a"] == pytest.approx(0.0, abs=1e-12)
    assert g["gain_b"] == pytest.approx(0.0, abs=1e-12)
    assert g["diff"] == pytest.approx(0.1) and g["significant"]


def test_arm_summary_combines_both_standard_errors():
    clusters = {f"p{i}": f"c{i}" for i in range(20)}
    s = stats.arm_summary(_scores([0.4, 0.5], spread=0.1), clusters)
    assert s["mean"] == pytest.approx(0.45)
    assert s["se"] == pytest.approx(math.hypot(s["se_seeds"], s["se_problems"]))
    assert s["se_seeds"] == pytest.approx(0.05) and s["se_problems"] > 0


def test_paired_difference_pairs_by_seed_and_ignores_unpaired_seeds():
    a = {"0": 0.9, "1": 0.8, "2": 0.7, "3": 0.1}
    b = {"0": 0.5, "1": 0.5, "2": 0.5}
    d = stats.paired_difference(a, b)
    # per-seed differences 0.4, 0.3, 0.2: mean 0.3, sd 0.1, se 0.1 / sqrt(3); seed 3 has no partner
    assert d["values"] == pytest.approx([0.4, 0.3, 0.2])
    assert d["diff"] == pytest.approx(0.3) and d["se"] == pytest.approx(0.1 / math.sqrt(3))
    assert d["df"] == 2 and d["significant"] and d["t_significant"]  # t = 5.2 > 4.303
    # a common offset per seed (the shared SFT model) cancels: unpaired it would be pure noise
    shifted = stats.paired_difference({"0": 0.1, "1": 0.9}, {"0": 0.0, "1": 0.8})
    assert shifted["diff"] == pytest.approx(0.1) and shifted["se"] == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="at least one seed"):
        stats.paired_difference({"0": 1.0}, {"1": 1.0})
