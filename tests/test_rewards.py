import pytest

from parallel_r1.rewards import (
    RewardBreakdown,
    RewardSchedule,
    accuracy_reward,
    parallel_bonus,
    score_batch,
    score_response,
)

BLOCK = "<Parallel><Path>3 + 4 = 7</Path><Path>4 + 3 = 7</Path></Parallel><Summary>Both give 7.</Summary>"
WELL_FORMED = f"Tom has 3 apples and buys 4.{BLOCK}So he has 7.\nFinal Answer: 7"
TWO_BLOCKS = f"Start.{BLOCK}Check again.{BLOCK}Final Answer: 7"
ONE_PATH = "Tom has 3 + 4.<Parallel><Path>3 + 4 = 7</Path></Parallel><Summary>7.</Summary>Final Answer: 7"
NO_SUMMARY = "Tom.<Parallel><Path>3 + 4 = 7</Path><Path>4 + 3 = 7</Path></Parallel>So 7.\nFinal Answer: 7"
UNCLOSED = "Tom.<Parallel><Path>3 + 4 = 7</Path><Path>4 + 3 = 7</Path>\nFinal Answer: 7"
GOOD_BLOCK_THEN_BROKEN = f"Tom.{BLOCK}<Parallel><Path>only one</Path></Parallel><Summary>s</Summary>Final Answer: 7"
PLAIN = "3 + 4 = 7.\nFinal Answer: 7"
STRAY_TAG = "3 + 4 = 7 </Path>\nFinal Answer: 7"


def test_accuracy_reward():
    assert accuracy_reward(True) == 1.0
    assert accuracy_reward(False) == -1.0
    assert accuracy_reward(True, correct_value=2.0, wrong_value=0.0) == 2.0
    assert accuracy_reward(False, correct_value=2.0, wrong_value=0.0) == 0.0


@pytest.mark.parametrize(
    "correct, num_blocks, well_formed, expected",
    [
        (True, 1, True, 0.2),
        (True, 3, True, 0.2),
        (True, 0, True, 0.0),
        (True, 1, False, 0.0),
        (False, 1, True, 0.0),
        (False, 0, False, 0.0),
    ],
)
def test_parallel_bonus(correct, num_blocks, well_formed, expected):
    assert parallel_bonus(correct, num_blocks, well_formed) == expected


# (response, gold, parallel active) -> (reward, correct, well_formed, num_blocks)
# While the parallel reward is on, a response failing the strict format check scores -1 even when its
# answer is right (the reference's format gate, `format_error_value`).
CASES = [
    (WELL_FORMED, "7", True, 1.2, True, True, 1),
    (WELL_FORMED, "7", False, 1.0, True, True, 1),
    (TWO_BLOCKS, "7", True, 1.2, True, True, 2),
    (ONE_PATH, "7", True, -1.0, True, False, 1),
    (ONE_PATH, "7", False, 1.0, True, False, 1),
    (NO_SUMMARY, "7", True, -1.0, True, False, 1),
    (NO_SUMMARY, "7", False, 1.0, True, False, 1),
    (UNCLOSED, "7", True, -1.0, True, False, 0),
    (GOOD_BLOCK_THEN_BROKEN, "7", True, -1.0, True, False, 2),
    (PLAIN, "7", True, 1.0, True, True, 0),
    (PLAIN, "7", False, 1.0, True, True, 0),
    (STRAY_TAG, "7", True, -1.0, True, False, 0),
    (STRAY_TAG, "7", False, 1.0, True, False, 0),
    (WELL_FORMED, "8", True, -1.0, False, True, 1),
    (WELL_FORMED, "8", False, -1.0, False, True, 1),
    (ONE_PATH, "8", True, -1.0, False, False, 1),
    (PLAIN, "8", True, -1.0, False, True, 0),
    (STRAY_TAG, "8", False, -1.0, False, False, 0),
    ("I give up.", "7", True, -1.0, False, True, 0),
]


@pytest.mark.parametrize("response, gold, active, reward, correct, well_formed, num_blocks", CASES)
def test_score_response(response, gold, active, reward, correct, well_formed, num_blocks):
    b = score_response(response, gold, parallel_active=active)
    assert b.reward == pytest.approx(reward)
    assert b.correct is correct
    assert b.well_formed is well_formed
    assert b.num_blocks == num_blocks
    assert b.parallel_active is active
    assert b.accuracy == (1.0 if correct else -1.0)
    assert b.reward == pytest.approx(b.accuracy + b.parallel_bonus + b.format_penalty)
    assert b.format_penalty <= 0.0
    assert (b.format_penalty < 0) == (active and not well_formed and correct)


def test_score_response_reports_the_answer():
    assert score_response(WELL_FORMED, "7", True).answer == "7"
    assert score_response("nothing", "7", True).answer is None


def test_reward_values_are_settings():
    values = dict(correct_value=2.0, wrong_value=-0.5, parallel_value=3.0)
    assert score_response(WELL_FORMED, "7", True, **values).reward == 3.0
    assert score_response(WELL_FORMED, "7", True, **values).parallel_bonus == 1.0
    assert score_response(WELL_FORMED, "7", False, **values).reward == 2.0
    assert score_response(ONE_PATH, "7", True, **values).reward == -1.0
    assert score_response(ONE_PATH, "7", False, **values).reward == 2.0
    assert score_response(WELL_FORMED, "8", True, **values).reward == -0.5


@pytest.mark.parametrize("response", [ONE_PATH, NO_SUMMARY, UNCLOSED, GOOD_BLOCK_THEN_BROKEN, STRAY_TAG])
def test_format_error_value_is_a_setting(response):
    # the default reproduces the reference: -1 while the parallel reward is on, correct answer or not
    assert score_response(response, "7", True).reward == -1.0
    assert score_response(response, "8", True).reward == -1.0
    # a milder penalty caps the reward; a wrong answer keeps its own, lower value
    assert score_response(response, "7", True, format_error_value=0.0).reward == 0.0
    assert score_response(response, "7", True, format_error_value=0.0).format_penalty == -1.0
    assert score_response(response, "8", True, format_error_value=0.0).reward == -1.0
    assert score_response(response, "8", True, format_error_value=0.0).format_penalty == 0.0
    # None: no penalty, the bonus is only withheld
    off = score_response(response, "7", True, format_error_value=None)
    assert (off.reward, off.format_penalty, off.parallel_bonus) == (1.0, 0.0, 0.0)
    # steps without the parallel reward never penalise the format
    assert score_response(response, "7", False).reward == 1.0


def test_format_error_value_reaches_score_batch():
    schedule = RewardSchedule("parallel")
    assert score_batch([ONE_PATH], ["7"], 0, schedule)[0].reward == -1.0
    assert score_batch([ONE_PATH], ["7"], 0, schedule, format_error_value=None)[0].reward == 1.0
    assert score_batch([ONE_PATH], ["7"], 0, schedule, format_error_value=-0.5)[0].reward == -0.5


def test_hedged_answers_score_as_wrong():
    for answer in ("7 or 8", "8 or 7", "7, 8", "\\boxed{7} \\boxed{8}", "either 7 or 8"):
        b = score_response(f"3 + 4 = 7.\nFinal Answer: {answer}", "7", parallel_active=False)
        assert (b.correct, b.reward) == (False, -1.0), answer


def _active_steps(schedule: RewardSchedule, n: int) -> list[int]:
    return [step for step in range(n) if schedule.parallel_active(step)]


def test_fixed_schedules():
    assert _active_steps(RewardSchedule("accuracy"), 50) == []
    assert _active_steps(RewardSchedule("parallel"), 50) == list(range(50))


def test_alternating_uses_the_last_steps_of_each_window():
    assert _active_steps(RewardSchedule("alternating"), 30) == [8, 9, 18, 19, 28, 29]
    assert _active_steps(RewardSchedule("alternating", window=5, parallel_steps=1), 15) == [4, 9, 14]
    assert _active_steps(RewardSchedule("alternating", window=4, parallel_steps=3), 8) == [1, 2, 3, 5, 6, 7]
    assert _active_steps(RewardSchedule("alternating", window=3, parallel_steps=0), 9) == []
    assert _active_steps(RewardSchedule("alternating", window=3, parallel_steps=3), 9) == list(range(9))


def test_alternating_share_per_window():
    schedule = RewardSchedule("alternating", window=10, parallel_steps=2)
    for start in range(0, 100, 10):
        assert sum(schedule.parallel_active(s) for s in range(start, start + 10)) == 2


def test_mid_training_switches_at_switch_step():
    schedule = RewardSchedule("mid_training", switch_step=3)
    assert _active_steps(schedule, 10) == [0, 1, 2]
    assert schedule.parallel_active(2) and not schedule.parallel_active(3)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(kind="sometimes"),
        dict(kind="alternating", window=0),
        dict(kind="alternating", window=-10),
        dict(kind="alternating", window=2.5),
        dict(kind="alternating", window=10, parallel_steps=11),
        dict(kind="alternating", parallel_steps=-1),
        dict(kind="alternating", parallel_steps=True),
        dict(kind="mid_training", switch_step=-1),
        dict(kind="mid_training", switch_step=0),
        dict(kind="mid_training"),
        dict(kind="parallel", switch_step=-5),
    ],
)
def test_bad_schedules_raise(kwargs):
    with pytest.raises(ValueError):
        RewardSchedule(**kwargs)


@pytest.mark.parametrize("step", [-1, 1.5, None])
def test_bad_step_raises(step):
    with pytest.raises(ValueError):
        RewardSchedule("parallel").parallel_active(step)


def test_score_batch_follows_the_schedule():
    schedule = RewardSchedule("alternating", window=10, parallel_steps=2)
    responses = [WELL_FORMED, ONE_PATH, PLAIN, WELL_FORMED]
    golds = ["7", "7", "7", "8"]
    on = score_batch(responses, golds, step=9, schedule=schedule)
    off = score_batch(responses, golds, step=10, schedule=schedule)
    assert [b.reward for b in on] == pytest.approx([1.2, -1.0, 1.0, -1.0])
    assert [b.reward for b in off] == pytest.approx([1.0, 1.0, 1.0, -1.0])
    assert all(b.parallel_active for b in on) and not any(b.parallel_active for b in off)
    assert all(isinstance(b, RewardBreakdown) for b in on)


def test_score_batch_passes_values_and_checks_lengths():
    schedule = RewardSchedule("parallel")
    out = score_batch([WELL_FORMED], ["7"], 0, schedule, correct_value=1.0, parallel_value=1.5)
    assert out[0].reward == pytest.approx(1.5)
    with pytest.raises(ValueError, match="2 responses but 1"):
        score_batch([PLAIN, PLAIN], ["7"], 0, schedule)


def test_score_batch_follows_the_mid_training_switch():
    schedule = RewardSchedule("mid_training", switch_step=1)
    assert score_batch([WELL_FORMED], ["7"], 0, schedule)[0].reward == pytest.approx(1.2)
    assert score_batch([WELL_FORMED], ["7"], 1, schedule)[0].reward == 1.0


def test_planned_responses_pass_the_format_gate_only_when_checked_as_planned():
    planned = "<Parallel>5*3\n<Path>5*3=15 yes</Path></Parallel><Summary>5 works</Summary>Final Answer: 5"
    assert score_response(planned, "5", parallel_active=True, plans=True).reward == pytest.approx(1.2)
    assert score_response(planned, "5", parallel_active=True).reward == -1.0  # one path, text in the block
    schedule = RewardSchedule("parallel")
    [score] = score_batch([planned], ["5"], 0, schedule, plans=True, format_error_value=-1.0)
    assert score.well_formed and score.parallel_bonus == pytest.approx(0.2)


def test_speedup_bonus_rewards_a_shorter_critical_path_at_equal_correctness():
    schedule = RewardSchedule("accuracy")
    out = score_batch([WELL_FORMED, WELL_FORMED, WELL_FORMED], ["7", "7", "8"], 0, schedule,
                      speedups=[0.5, 0.25, 0.5], speedup_value=0.4)  # fmt: skip
    assert [b.speedup_bonus for b in out] == pytest.approx([0.2, 0.1, 0.0])  # a wrong answer gains nothing
    assert [b.reward for b in out] == pytest.approx([1.2, 1.1, -1.0])
    assert score_batch([WELL_FORMED], ["7"], 0, schedule, speedups=[0.5])[0].reward == 1.0  # off by default
    gated = score_response(ONE_PATH, "7", parallel_active=True, speedup=0.5, speedup_value=0.4)
    assert gated.reward == -1.0 and gated.format_penalty == pytest.approx(-1.0 - 1.2)  # the format gate still caps it
    with pytest.raises(ValueError):
        score_batch([PLAIN], ["7"], 0, schedule, speedups=[0.1, 0.2])
