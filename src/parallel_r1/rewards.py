"""Rewards for GRPO (docs/training.md, "Rewards"): accuracy, the parallel bonus behind a format gate, and schedules.

With the default values a response scores:

                                                     parallel reward off    parallel reward on
    wrong answer                                            -1.0                  -1.0
    correct, strictly well formed, no block                  1.0                   1.0
    correct, strictly well formed, >= 1 block                1.0                   1.2
    correct, fails the strict format check                   1.0                  -1.0  (format_error_value)

The last row is the reference implementation's format gate: on the steps where the parallel reward is on,
a response whose structure fails the strict check of `parallel_r1.format` scores `format_error_value`
(at most; a wrong answer keeps its own lower value), even with a correct answer. `format_error_value=None`
turns the penalty off (an ill-formed response then only loses the bonus).

An optional cost term lets RL learn when more paths pay (ThreadWeaver's acceleration reward): with
`speedup_value` > 0 a correct answer also gains `speedup_value * (1 - positions / tokens)`, the share of its
tokens that Unseen decoding runs side by side (positions: its critical path, `rollout.unseen_positions`), so
at equal correctness a shorter longest path scores more. It is 0 for Seen and Threads, whose every token
takes a position, and off by default.

Every function is pure; `score_response` returns the components so that trainers can log them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from parallel_r1.answers import extract_answer, verify
from parallel_r1.format import parse
from parallel_r1.settings import RewardSchedule


@dataclass(frozen=True)
class RewardBreakdown:
    reward: float  # the total used for advantages
    accuracy: float  # the correct / wrong part
    parallel_bonus: float  # extra for a correct, well-formed parallel response; 0 when it does not apply
    correct: bool
    well_formed: bool  # the strict format check found no error
    num_blocks: int  # closed <Parallel> blocks
    answer: str | None  # the extracted final answer
    parallel_active: bool  # whether the schedule enabled the parallel reward on this step
    format_penalty: float = 0.0  # <= 0: what the format gate took away; reward = accuracy + bonuses + penalty
    speedup_bonus: float = 0.0  # extra for a correct answer decoded on a shorter critical path (`speedup_value`)


def accuracy_reward(correct: bool, correct_value: float = 1.0, wrong_value: float = -1.0) -> float:
    return correct_value if correct else wrong_value


def parallel_bonus(correct: bool, num_blocks: int, well_formed: bool, bonus: float = 0.2) -> float:
    """`bonus` for a correct answer reached with at least one block, when the whole response is well formed.

    The format gate: any strict-format error (an unclosed tag, a one-path block, a missing summary, ...)
    forfeits the bonus, so the policy cannot earn it with broken structure.
    """
    return bonus if correct and num_blocks >= 1 and well_formed else 0.0


def score_response(
    response: str,
    gold: str,
    parallel_active: bool,
    correct_value: float = 1.0,
    wrong_value: float = -1.0,
    parallel_value: float = 1.2,
    timeout_s: float = 5.0,
    format_error_value: float | None = -1.0,
    plans: bool = False,
    max_depth: int = 1,
    speedup: float = 0.0,
    speedup_value: float = 0.0,
) -> RewardBreakdown:
    """Score one response against the ground truth `gold`.

    `parallel_value` is the total for a correct, well-formed parallel response; the bonus is its excess
    over `correct_value`. While `parallel_active`, a response failing the strict format check scores at
    most `format_error_value` (None: no penalty, the bonus is only withheld). The format check runs
    whether or not the parallel reward is active, for logging; `plans`: the planned format's check;
    `max_depth`: how deep blocks may nest (`format.parse`). `speedup` (1 - positions / tokens of the response)
    earns a correct answer `speedup_value * speedup` (the module docstring).
    """
    answer = extract_answer(response)
    correct = answer is not None and verify(answer, gold, timeout_s)
    parsed = parse(response, plans=plans, max_depth=max_depth)
    accuracy = accuracy_reward(correct, correct_value, wrong_value)
    bonus = 0.0
    if parallel_active:
        bonus = parallel_bonus(correct, parsed.num_blocks, parsed.well_formed, parallel_value - correct_value)
    faster = speedup_value * speedup if correct else 0.0
    reward = accuracy + bonus + faster
    if parallel_active and not parsed.well_formed and format_error_value is not None:
        reward = min(reward, format_error_value)  # the format gate
    return RewardBreakdown(
        reward=reward,
        accuracy=accuracy,
        parallel_bonus=bonus,
        correct=correct,
        well_formed=parsed.well_formed,
        num_blocks=parsed.num_blocks,
        answer=answer,
        parallel_active=parallel_active,
        format_penalty=reward - (accuracy + bonus + faster),
        speedup_bonus=faster,
    )


def score_batch(
    responses: Sequence[str],
    golds: Sequence[str],
    step: int,
    schedule: RewardSchedule,
    plans: bool = False,
    max_depth: int = 1,
    speedups: Sequence[float] | None = None,
    **values: float | None,
) -> list[RewardBreakdown]:
    """Score responses[i] against golds[i] at training step `step`; `plans`, `max_depth`, `speedups[i]` and
    `values` go to `score_response`."""
    if len(responses) != len(golds):
        raise ValueError(f"got {len(responses)} responses but {len(golds)} gold answers")
    active = schedule.parallel_active(step)
    speedups = [0.0] * len(responses) if speedups is None else speedups
    return [
        score_response(r, g, active, plans=plans, max_depth=max_depth, speedup=s, **values)
        for r, g, s in zip(responses, golds, speedups, strict=True)
    ]
