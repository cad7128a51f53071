"""What both rollout backends share: how their sampling parameters are built, the `Rollout` they return,
and the JSON record of a sampled response that GRPO, `parallel-r1 eval` and `parallel-r1 generate` write.

* `sampling_params(settings, ...)` is the one way to build the `settings.SamplingParams` of one engine call
  from any holder of the sampling knobs (`settings.SamplingSettings`: a recipe's `grpo.rollout`, an
  `EvalConfig`).
* `Rollout` is one sampled response at token level (`make_rollout` builds it for both backends).
* `RolloutRecord` is one sampled response as a JSON object (`rollout_record` builds it): a line of a GRPO
  stage's `rollouts.jsonl`, of an eval's `.samples.jsonl` and of `generate --jsonl`; the viewer, the
  analysis and the report read it. The model's answer is `pred`, the ground truth `gold`, the problem
  text `question`, in every file.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypedDict

from parallel_r1.format import ParsedResponse, TagIds, parse_ids
from parallel_r1.settings import SAMPLING_FIELDS, SamplingParams, SamplingSettings


def sampling_params(settings: SamplingSettings, **kwargs: Any) -> SamplingParams:
    """The `SamplingParams` of `settings` (a `RolloutConfig`, an `EvalConfig`, ...), with `kwargs` (variant,
    seed, open_block, or any knob to change) on top."""
    values = {name: getattr(settings, name) for name in SAMPLING_FIELDS}
    return SamplingParams(**{**values, **kwargs})


@dataclass
class Rollout:
    prompt_index: int
    sample_index: int
    prompt_ids: list[int]
    response_ids: list[int]  # canonical sequential layout (paths one after another)
    text: str  # decoded response, tags kept
    sampled_mask: list[bool]  # per response token: sampled by the model (True) or inserted (False)
    # per response token: log p under softmax(logits / T), full vocab, or with behaviour log-probs
    # (`ParallelEngine(behaviour_logprobs=True)`) under the banned, top-k/top-p-warped one; 0.0 if inserted
    logprobs: list[float]
    finish_reason: str  # "stop" (EOS) | "length" (response cap)
    structure: ParsedResponse  # format.parse_ids(response_ids, tokenizer), token spans filled


def make_rollout(
    tokenizer, prompt_index: int, sample_index: int, prompt_ids: list[int], response_ids: list[int],
    sampled_mask: list[bool], logprobs: list[float], finish_reason: str | None, ends_with_eos: bool,
    tags: TagIds | None = None, plans: bool = False, max_depth: int = 1,
) -> Rollout:  # fmt: skip
    """The `Rollout` of a finished sample (both backends): its text leaves a final EOS out, its structure
    comes from the token ids (a tag is a tag by id, not by its spelling), checked in the planned format when
    the sample was drawn with `plans`, and with blocks nesting to the `max_depth` it was drawn with."""
    text_ids = response_ids[:-1] if ends_with_eos else response_ids
    return Rollout(
        prompt_index=prompt_index,
        sample_index=sample_index,
        prompt_ids=list(prompt_ids),
        response_ids=response_ids,
        text=tokenizer.decode(text_ids, skip_special_tokens=False, clean_up_tokenization_spaces=False),
        sampled_mask=sampled_mask,
        logprobs=logprobs,
        finish_reason=finish_reason or "length",
        structure=parse_ids(response_ids, tokenizer, tags=tags, plans=plans, max_depth=max_depth),
    )


def path_lengths(rollout: Rollout) -> list[int]:
    """Token lengths of every path of a rollout (nested blocks' too, in the order the blocks open), its <Path>
    and </Path> included."""
    return [
        p.token_span.end - p.token_span.start
        for b in rollout.structure.all_blocks
        for p in b.paths
        if p.token_span is not None
    ]


def unseen_positions(rollout: Rollout) -> int:
    """Positions the response occupies under Unseen decoding (its critical path): its tokens, less, in every
    block, the tokens of its paths beyond the positions of its longest one, a path's positions being its
    tokens less what its own nested blocks save."""

    def saved(blocks) -> int:
        total = 0
        for block in blocks:
            spans = [(p.token_span.end - p.token_span.start, p) for p in block.paths if p.token_span is not None]
            total += sum(n for n, _ in spans) - max((n - saved(p.blocks) for n, p in spans), default=0)
        return total

    return len(rollout.response_ids) - saved(rollout.structure.blocks)


class RolloutRecord(TypedDict, total=False):
    """One sampled response as a JSON object. Which keys a file has depends on who wrote it."""

    # Where it comes from: GRPO writes step, problem_index, advantage; eval writes model, benchmark;
    # generate writes prompt_index and the token-level keys at the end.
    step: int  # GRPO: the training step, from 1
    model: str  # eval: the model (checkpoint) evaluated
    benchmark: str  # eval: the benchmark name
    problem_index: int  # GRPO: index into the stage's problems
    problem_id: str
    prompt_index: int
    sample_index: int  # which of the n samples of its prompt
    question: str  # the problem text (GRPO, eval)
    prompt: str  # the whole prompt (generate)
    response: str  # the decoded response, tags kept
    # Scoring, where there is a ground truth (GRPO, eval).
    gold: str  # the ground-truth answer
    pred: str | None  # the model's final answer (`answers.extract_answer`), None when it gave none
    correct: bool
    reward: float
    accuracy: float  # GRPO: the accuracy part of the reward
    parallel_bonus: float  # GRPO: the parallel part of the reward
    speedup_bonus: float  # GRPO: the critical-path part of the reward (`reward.speedup_value`)
    advantage: float  # GRPO
    # Structure and length.
    well_formed: bool  # the strict format check found no error
    num_blocks: int  # nested blocks included
    paths_per_block: list[int]  # per block, nested ones included, in the order they open
    depth: int  # the deepest block: 0 without blocks, 1 when none nests
    response_tokens: int
    path_tokens: list[int]  # per path, its <Path> and </Path> included
    unseen_positions: int  # positions under Unseen decoding (`unseen_positions`)
    finish_reason: str  # "stop" | "length"
    # Token level (generate --jsonl).
    prompt_ids: list[int]
    response_ids: list[int]
    sampled_mask: list[bool]
    logprobs: list[float]


def rollout_record(
    rollout: Rollout,
    *,
    question: str | None = None,
    prompt: str | None = None,
    gold: str | None = None,
    score=None,
    token_ids: bool = False,
    **context: Any,
) -> RolloutRecord:
    """The record of `rollout`. `context` (step, model, problem_id, ...) comes first; `score` (a
    `rewards.RewardBreakdown`) adds pred, correct and the reward; `token_ids` adds the token-level keys."""
    structure = rollout.structure
    record: dict[str, Any] = dict(context)
    record["sample_index"] = rollout.sample_index
    if question is not None:
        record["question"] = question
    if prompt is not None:
        record["prompt"] = prompt
    record["response"] = rollout.text
    if gold is not None:
        record["gold"] = gold
    if score is not None:
        record.update(pred=score.answer, correct=bool(score.correct), reward=score.reward)
    record.update(
        well_formed=bool(score.well_formed if score is not None else structure.well_formed),
        num_blocks=score.num_blocks if score is not None else structure.num_blocks,
        paths_per_block=structure.paths_per_block,
        depth=structure.depth,
        response_tokens=len(rollout.response_ids),
        path_tokens=path_lengths(rollout),
        unseen_positions=unseen_positions(rollout),
        finish_reason=rollout.finish_reason,
    )
    if token_ids:
        record.update(
            prompt_ids=rollout.prompt_ids,
            response_ids=rollout.response_ids,
            sampled_mask=rollout.sampled_mask,
            logprobs=rollout.logprobs,
        )
    return record  # type: ignore[return-value]


def record_depth(record: dict) -> int:
    """How deep to parse a record's response: its `depth`, at least 1 (records written before nesting have none)."""
    return max(1, record.get("depth") or 1)


def upgrade_record(record: dict) -> dict:
    """A record from before `pred` and `gold` were named the same everywhere, in today's names: GRPO logs
    held the gold in "gold" and the prediction in "answer", eval samples the gold in "answer" and the
    prediction in "pred". Today's records come back unchanged."""
    if "answer" not in record:
        return record
    record = dict(record)
    answer = record.pop("answer")
    if "pred" in record:
        record.setdefault("gold", answer)
    else:
        record["pred"] = answer
    return record
