import pytest

from parallel_r1.study_summary import CAPS, markdown


def stat(mean, se=0.01):
    return {"mean": mean, "se": se, "seeds": 2}


def diff(value, se=0.02, significant=False, t_significant=False):
    return {"diff": value, "se": se, "significant": significant, "t_significant": t_significant}


def synthetic_summary():
    caps = {str(c): stat(0.1 + c / 1000) for c in CAPS}
    blocks = {"duplicate_rate": 0.25, "coverage": 0.5, "summary_consistency": 0.75}
    rollout = {"rl_hard/start": {"first_try_entropy": 1.5, "duplicate_rate": 0.3}}
    arms = {
        "sequential": {"sft": stat(0.10), "rl": stat(0.12), "rl_gain": stat(0.02), "rl_caps": caps},
        "seen": {
            "sft": stat(0.15),
            "rl": stat(0.20),
            "rl_gain": stat(0.05),
            "rl_parallel_ratio": 0.9,
            "rl_tokens": 80.0,
            "rl_positions": 70.0,
            "train_generated_tokens": 12345.0,
            "rl_majority": [{"m": 1, "accuracy": 0.2, "tokens": 80, "positions": 70}],
            "rl_caps": caps,
            "sft_blocks": blocks,
            "rl_blocks": blocks,
            "rollout_blocks": {"0": rollout},
            "trajectory": {"0": [{"stage": "rl_hard", "parallel_ratio": 1.0}]},
        },
    }
    comparisons = {
        "primary": {"sequential": diff(0.08, t_significant=True, significant=True)},
        "vs_baseline": {"seen": diff(0.08, significant=True)},
        "rl_gain_vs_baseline": {"seen": {**diff(0.03), "gain_a": 0.05, "se_a": 0.01, "gain_b": 0.02, "se_b": 0.01}},
        "equal_tokens": {"sequential": {**diff(0.05), "m": 3, "tokens": 90.0, "primary_tokens": 80.0}},
        "caps": {"sequential": {str(c): diff(0.01) for c in CAPS}},
        "caps_vs_baseline": {},
    }
    return {
        "task": "search",
        "seeds": [0, 1],
        "problems": 128,
        "clusters": 60,
        "primary": "seen",
        "arms": arms,
        "comparisons": comparisons,
        "schedules": {"seen": {"rl_hard/start": stat(0.7, 0.05), "rl_hard/end": stat(0.99, 0.01)}},
        "timings": {"total": 600.0},
    }


def test_markdown_of_arms_without_the_primary_or_the_baseline_leaves_their_comparisons_out():
    """`study --arms unseen,unseen_planned`: no primary arm ran, so no column or section compares with it."""
    summary = synthetic_summary()
    summary["arms"] = {"unseen": summary["arms"]["seen"]}
    summary["comparisons"] = {key: {} for key in summary["comparisons"]}
    summary["schedules"] = {"unseen": summary["schedules"]["seen"]}
    text = markdown(summary)
    assert "None" not in text and "vs seen" not in text and "seen's tokens" not in text
    assert "## RL gains against the baseline's" not in text and "## At equal test-time tokens" in text
    assert "| unseen | 0.150 ± 0.010 | 0.200 ± 0.010 | 0.050 ± 0.010 | - | 0.90 |" in text


def test_markdown_states_every_arm_and_every_comparison_with_its_marks():
    text = markdown(synthetic_summary())
    lines = text.splitlines()
    main = next(line for line in lines if line.startswith("| seen | 0.150"))
    assert main == (
        "| seen | 0.150 ± 0.010 | 0.200 ± 0.010 | 0.050 ± 0.010 | +0.080 ± 0.020 * | - | 0.90 | 80.0 | 70.0 | 12345 |"
    )
    # The primary's row against itself is empty; sequential's "vs seen" is sequential minus seen.
    assert "| sequential | 0.100 ± 0.010 | 0.120 ± 0.010 | 0.020 ± 0.010 | - | -0.080 ± 0.020 ** |" in text
    assert "| sequential | 3 | 90.0 | 80.0 | +0.050 ± 0.020 |" in text
    assert "| seen | 0.25 / 0.50 / 0.75 | 0.25 / 0.50 / 0.75 | 1.50 / 0.30 | - |" in text
    assert "| seen | 0.70 ± 0.05 | 0.99 ± 0.01 | 0.90 |" in text
    assert "Each arm minus sequential" not in text  # no rows, no table
    assert text.endswith("The study took 10.0 minutes.\n")
    # Every table's rows have as many cells as its header.
    tables = [line for line in lines if line.startswith("|")]
    for header, separator in zip(tables, tables[1:]):
        if set(separator) <= set("|- "):
            assert separator.count("|") == header.count("|")


def test_schedule_windows_and_their_paired_differences_from_trajectories():
    from parallel_r1 import study
    from parallel_r1.study_summary import WINDOW, schedule_differences, schedule_table

    a, b = study.SCHEDULE_FAMILIES[0][0], study.SCHEDULE_FAMILIES[0][-1]
    other = study.SCHEDULE_FAMILIES[1][0]  # another cold start: never paired with a or b

    def trajectory(easy: float, hard: float) -> list[dict]:
        return [{"stage": "rl_easy", "parallel_ratio": easy}] * WINDOW + [
            {"stage": "rl_hard", "parallel_ratio": hard}
        ] * WINDOW

    # seed 1 starts higher in both arms (its SFT model); arm a is 0.2 and 0.3 above b in the harder stage
    arms = {
        a: {"trajectory": {"0": trajectory(0.5, 0.7), "1": trajectory(0.6, 0.9)}},
        b: {"trajectory": {"0": trajectory(0.5, 0.5), "1": trajectory(0.6, 0.6)}},
        other: {"trajectory": {"0": trajectory(0.1, 0.1)}},
        "seen": {"trajectory": {"0": trajectory(1.0, 1.0)}},  # not a schedule arm: left out
    }
    table = schedule_table(arms)
    assert set(table) == {a, b, other}
    assert table[a]["rl_hard/end"]["by_seed"] == {"0": 0.7, "1": 0.9}
    assert table[a]["rl_hard/end"]["mean"] == pytest.approx(0.8)
    diffs = schedule_differences(table)
    assert list(diffs) == [f"{a} - {b}"]
    hard = diffs[f"{a} - {b}"]["rl_hard/end"]
    # paired: differences 0.2 and 0.3, se 0.05; two standard errors cleared, t's threshold for 1 df (12.7) not
    assert hard["diff"] == pytest.approx(0.25) and hard["se"] == pytest.approx(0.05)
    assert hard["significant"] and not hard["t_significant"]
    assert diffs[f"{a} - {b}"]["rl_easy/end"]["diff"] == pytest.approx(0.0)
    summary = synthetic_summary()
    summary["arms"].update({arm: {"rl_parallel_ratio": 0.5} for arm in (a, b, other)})
    text = markdown({**summary, "schedules": table, "schedule_differences": diffs})
    assert f"| {a} - {b} | +0.000 ± 0.000 | +0.000 ± 0.000 | +0.250 ± 0.050 * | +0.250 ± 0.050 * |" in text
