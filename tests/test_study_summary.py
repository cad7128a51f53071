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
