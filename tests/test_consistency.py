"""The engine's sampling log-probs against the trainer's on a trained model, in float64 and in float32.

A random tiny model has flat logits, on which rounding differences hardly show; a model trained on the
built-in task's parallel teacher data has peaky ones, as real models do. In float64 the engine (KV cache,
paths interleaved in its slots, one query per step) and the trainer (the sequential row, every query at
once) agree to 1e-9 for every variant, bans replayed or not: they compute the same function, and what
float32 shows is the rounding of two summation orders of it (docs/engine.md, "Exactness").
"""

import pytest
import torch

from parallel_r1 import tasks
from parallel_r1.attention import response_logprobs
from parallel_r1.bans import BanTable, Behaviour, ban_rows
from parallel_r1.engine import ParallelEngine
from parallel_r1.format import TagIds
from parallel_r1.rollout import SamplingParams
from parallel_r1.sft import encode_record
from parallel_r1.tiny import build_model

FLOAT64_BOUND = 1e-9
FLOAT32_BOUND = 1e-4  # docs/engine.md, "Exactness"
VARIANTS = ("seen", "unseen", "threads")


def _sft(tiny_tokenizer, style: str):
    """(model, tokenizer, prompts): the tiny model after 40 SFT steps (lr 1e-2, Unseen) on the search task's
    teacher solutions of `style`, the SFT loss of `response_logprobs`."""
    tags = TagIds.from_tokenizer(tiny_tokenizer)
    records = tasks.make_sft_records(48, task="search", template="{question}", style=style)
    examples = [encode_record(tiny_tokenizer, r.prompt, r.response, 256) for r in records]
    model = build_model(tiny_tokenizer, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128, seed=0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    pad = tiny_tokenizer.pad_token_id
    losses = []
    for step in range(40):
        batch = [examples[(step * 8 + i) % len(examples)] for i in range(8)]
        width = max(len(e.input_ids) for e in batch)
        ids = torch.tensor([[pad] * (width - len(e.input_ids)) + e.input_ids for e in batch])
        real = torch.tensor([[0] * (width - len(e.input_ids)) + [1] * len(e.input_ids) for e in batch])
        trained_on = real.clone()
        for row, e in enumerate(batch):
            trained_on[row, : width - len(e.input_ids) + e.prompt_len] = 0
        logprobs, _ = response_logprobs(model, ids, real, tags, "unseen")
        loss = -(logprobs * trained_on).sum() / trained_on.sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 2  # it learnt something: the logits are no longer flat
    return model.eval(), tiny_tokenizer, [r.prompt for r in records[:4]]


@pytest.fixture(scope="module")
def trained(tiny_tokenizer):
    """The tiny model trained on the parallel teacher (blocks of 2 paths, `_sft`)."""
    return _sft(tiny_tokenizer, "parallel")


@pytest.fixture(scope="module")
def planned(tiny_tokenizer):
    """The tiny model trained on the planned teacher (plans, blocks of 1 to 3 paths, `_sft`)."""
    return _sft(tiny_tokenizer, "planned")


def _largest_gap(
    model, tokenizer, prompts, variant, behaviour: bool, plans: bool = False, distinct: bool = False
) -> tuple[float, int, set]:
    """(largest |engine - trainer| over the sampled tokens, closed blocks, their numbers of paths) of 16
    samples, 3 paths a block (`plans`: planned blocks of at most 3 paths; `distinct`: distinct_plans)."""
    tags = TagIds.from_tokenizer(tokenizer)
    top_k, top_p = (8, 0.9) if behaviour else (0, 1.0)
    params = SamplingParams(
        seed=3, variant=variant, max_response_tokens=160, max_path_tokens=40, num_paths=3, max_blocks=3,
        top_k=top_k, top_p=top_p, plans=plans, max_paths=3, distinct_plans=distinct,
    )  # fmt: skip
    engine = ParallelEngine(model, tokenizer, behaviour_logprobs=behaviour)
    rollouts = engine.generate(prompts, n=4, params=params)
    table = BanTable(tags, model.config.vocab_size, torch.device("cpu"))
    replay_distinct = (engine.plan_lines, table) if distinct else None
    gap, blocks, widths = 0.0, 0, set()
    for r in rollouts:
        blocks += sum(b.closed for b in r.structure.blocks)
        widths |= {len(b.paths) for b in r.structure.blocks if b.closed}
        ids = torch.tensor([r.prompt_ids + r.response_ids])
        replay = None
        if behaviour:
            caps = (params.max_blocks, plans, 1, replay_distinct)
            rows = [0] * len(r.prompt_ids) + ban_rows(r.response_ids, tags, variant, *caps)
            replay = Behaviour(torch.tensor([rows]), table.table, top_k, top_p)
        with torch.no_grad():
            logprobs, _ = response_logprobs(model, ids, torch.ones_like(ids), tags, variant, behaviour=replay)
        assert logprobs.dtype == model.dtype
        sampled = torch.tensor(r.sampled_mask)
        recorded = torch.tensor(r.logprobs, dtype=torch.float64)
        gap = max(gap, (recorded - logprobs[0, len(r.prompt_ids) :].double())[sampled].abs().max().item())
    return gap, blocks, widths


@pytest.mark.parametrize("behaviour", [False, True], ids=["softmax", "behaviour"])
def test_engine_and_trainer_compute_the_same_logprobs_in_float64(trained, behaviour):
    model, tokenizer, prompts = trained
    model64 = model.double()
    try:
        for variant in VARIANTS:
            gap, blocks, _ = _largest_gap(model64, tokenizer, prompts, variant, behaviour)
            assert blocks >= 3 or variant == "seen", "the trained model should open blocks of its own"
            assert gap <= FLOAT64_BOUND, (variant, gap)
    finally:
        model.float()


def test_float32_gap_on_a_trained_model_is_within_the_stated_bound(trained):
    model, tokenizer, prompts = trained
    for variant in VARIANTS:
        gap, _, _ = _largest_gap(model, tokenizer, prompts, variant, behaviour=False)
        assert gap <= FLOAT32_BOUND, (variant, gap)


def test_planned_blocks_of_a_variable_number_of_paths_are_exact(planned):
    """A model that plans its blocks (1 to 3 paths, chosen in its plan): float64 agrees to 1e-9 with the
    bans (BAN_PLAN included) replayed, float32 within the stated bound, for every variant."""
    model, tokenizer, prompts = planned
    widths = set()
    for variant in VARIANTS:
        gap, blocks, seen = _largest_gap(model, tokenizer, prompts, variant, behaviour=False, plans=True)
        assert gap <= FLOAT32_BOUND, (variant, gap)
        widths |= seen if variant != "seen" else set()
    assert len(widths) >= 2, widths  # the model chose different numbers of paths
    model64 = model.double()
    try:
        for variant in VARIANTS:
            gap, blocks, _ = _largest_gap(model64, tokenizer, prompts, variant, behaviour=True, plans=True)
            assert blocks >= 3 or variant == "seen", "the planned model should open blocks of its own"
            assert gap <= FLOAT64_BOUND, (variant, gap)
    finally:
        model.float()


def test_distinct_plans_are_exact(planned):
    """distinct_plans (a plan line may not start like an earlier one): the plan-dependent bans replayed, the
    engine's behaviour log-probs agree with the trainer's to 1e-9 in float64, and within the stated bound
    in float32 under the full softmax, for the variants that fork by plans."""
    model, tokenizer, prompts = planned
    for variant in ("unseen", "threads"):
        gap, blocks, _ = _largest_gap(model, tokenizer, prompts, variant, behaviour=False, plans=True, distinct=True)
        assert blocks >= 3 and gap <= FLOAT32_BOUND, (variant, blocks, gap)
    model64 = model.double()
    try:
        for variant in ("unseen", "threads"):
            gap, _, _ = _largest_gap(model64, tokenizer, prompts, variant, behaviour=True, plans=True, distinct=True)
            assert gap <= FLOAT64_BOUND, (variant, gap)
    finally:
        model.float()
