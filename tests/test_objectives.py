"""The objectives of `parallel_r1.objectives`, each against its formula written out by hand (to 1e-6), and
their wiring in `grpo.policy_update`: the gradient of one optimiser step over several micro-batches equals
the gradient of the hand-written mini-batch loss."""

import math

import pytest
import torch
from accelerate import Accelerator

from parallel_r1.attention import response_logprobs
from parallel_r1.batch import RolloutBatch
from parallel_r1.config import GRPOConfig
from parallel_r1.format import TagIds
from parallel_r1.grpo import policy_update
from parallel_r1.objectives import (
    LOSS_AGG_MODES,
    aggregate_loss,
    clipped_policy_loss,
    overlong_penalty,
    policy_log_ratio,
    refill_size,
    region_sums,
    tis_cut,
    tis_weights,
    token_regions,
)

ATOL = 1e-6

# Two rows of four tokens; the second row trains on its first two only.
MASK_BT = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 0.0, 0.0]])
OLD_BT = torch.tensor([[-1.0, -2.0, -0.5, -1.5], [-0.7, -1.1, 0.0, 0.0]])
DELTA_BT = torch.tensor([[0.1, -0.05, 0.2, 0.03], [0.3, 0.1, 0.0, 0.0]])  # logp - old on trained tokens


def test_sequence_ratio_is_the_geometric_mean_of_the_token_ratios():
    log_s_B1 = policy_log_ratio(OLD_BT + DELTA_BT, OLD_BT, MASK_BT, "sequence")
    s0 = math.exp((0.1 - 0.05 + 0.2 + 0.03) / 4)  # (prod_t r_t) ** (1 / |y|)
    s1 = math.exp((0.3 + 0.1) / 2)
    assert log_s_B1.shape == (2, 1)
    assert torch.allclose(log_s_B1.exp(), torch.tensor([[s0], [s1]]), atol=ATOL, rtol=0)
    token = policy_log_ratio(OLD_BT + DELTA_BT, OLD_BT, MASK_BT, "token")
    assert torch.allclose(token, DELTA_BT, atol=ATOL, rtol=0)


@pytest.mark.parametrize("adv", [1.0, -1.0])
def test_gspo_loss_and_gradient_by_hand(adv):
    """GSPO with seq-mean-token-mean: L = (1/S) sum_i max(-A s_i, -A clip(s_i)), s_i = exp(mean_t delta_it).
    Unclipped, dL/dlogp_it = -A s_i / (S |y_i|) on trained tokens; a clipped row gets no gradient."""
    logp_BT = (OLD_BT + DELTA_BT).requires_grad_()
    adv_B = torch.tensor([adv, adv])
    clip_low, clip_high = 0.05, 0.1  # s0 = 1.072 is inside [0.95, 1.1], s1 = 1.221 above it
    log_s_B1 = policy_log_ratio(logp_BT, OLD_BT, MASK_BT, "sequence")
    per_token_B1, clipped_B1 = clipped_policy_loss(log_s_B1, adv_B, clip_low, clip_high)
    loss = aggregate_loss(per_token_B1.expand(2, 4), MASK_BT, "seq-mean-token-mean", 6.0, 2.0)
    loss.backward()

    s0, s1 = math.exp(0.28 / 4), math.exp(0.4 / 2)
    # A > 0: -min(s, clip(s)) -> s1 is capped at 1.1 (clipped); A < 0: max(s, clip(s)) -> s1 is not clipped.
    row1 = -adv * (1.1 if adv > 0 else s1)
    assert loss.item() == pytest.approx((-adv * s0 + row1) / 2, abs=ATOL)
    assert clipped_B1.flatten().tolist() == [False, adv > 0]
    want_BT = torch.zeros(2, 4)
    want_BT[0] = -adv * s0 / (2 * 4)
    if adv < 0:
        want_BT[1, :2] = -adv * s1 / (2 * 2)
    assert torch.allclose(logp_BT.grad, want_BT, atol=ATOL, rtol=0)


def test_token_mean_of_a_sequence_ratio_weights_each_token_by_its_rows_ratio():
    """With token-mean, L = (1/N) sum_i |y_i| (-A_i s_i): dL/dlogp_it = -A_i s_i / N (GSPO's ratio, DAPO's
    aggregation)."""
    logp_BT = (OLD_BT + DELTA_BT).requires_grad_()
    adv_B = torch.tensor([0.5, -2.0])
    per_token_B1, _ = clipped_policy_loss(policy_log_ratio(logp_BT, OLD_BT, MASK_BT, "sequence"), adv_B, 0.2, 0.28)
    aggregate_loss(per_token_B1 * torch.ones(2, 4), MASK_BT, "token-mean", 6.0, 2.0).backward()
    s_B1 = torch.tensor([[math.exp(0.28 / 4)], [math.exp(0.4 / 2)]])
    assert torch.allclose(logp_BT.grad, -adv_B[:, None] * s_B1 * MASK_BT / 6, atol=ATOL, rtol=0)


def test_loss_aggregations_by_hand_and_over_micro_batches():
    values_BT = torch.tensor([[1.0, 2.0, 3.0, 5.0], [4.0, 6.0, 7.0, 9.0]], requires_grad=True)
    mask_BT = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    want = {"token-mean": 10 / 4, "seq-mean-token-sum": (6 + 4) / 2, "seq-mean-token-mean": (2 + 4) / 2}
    grads = {
        "token-mean": mask_BT / 4,
        "seq-mean-token-sum": mask_BT / 2,
        "seq-mean-token-mean": mask_BT / torch.tensor([[3.0], [1.0]]) / 2,
    }
    assert set(want) == set(LOSS_AGG_MODES)
    for mode in LOSS_AGG_MODES:
        loss = aggregate_loss(values_BT, mask_BT, mode, num_tokens=4, num_sequences=2)
        (grad,) = torch.autograd.grad(loss, values_BT)
        assert loss.item() == pytest.approx(want[mode], abs=ATOL), mode
        assert torch.allclose(grad, grads[mode], atol=ATOL, rtol=0), mode
        # Micro-batches divided by the mini-batch's counts add up to the mini-batch's loss.
        parts = sum(aggregate_loss(values_BT[i : i + 1], mask_BT[i : i + 1], mode, 4, 2) for i in range(2))
        assert parts.item() == pytest.approx(want[mode], abs=ATOL), mode


def test_importance_weight_modes_by_hand():
    old_BT = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -1.0, -1.0]])
    sampler_BT = torch.tensor([[-1.0, -1.0, -2.0], [-1.2, -1.1, -1.0]])
    mask_BT = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    # Per token: exp(0), exp(-1), exp(1.5); per sequence: exp(0 - 1 + 1.5) = exp(0.5), exp(0.2 + 0.1) = exp(0.3).
    token = [[1.0, math.exp(-1.0), math.exp(1.5)], [math.exp(0.2), math.exp(0.1), 1.0]]
    cap = 1.5
    cases = {
        "token_truncate": [[1.0, math.exp(-1.0), cap], token[1]],
        "token_mask": [[1.0, math.exp(-1.0), 0.0], token[1]],
        "sequence_truncate": [[cap] * 3, [math.exp(0.3)] * 3],  # exp(0.5) = 1.65 > 1.5 is truncated
        "sequence_mask": [[0.0] * 3, [math.exp(0.3)] * 3],  # the first response is dropped
    }
    for mode, want in cases.items():
        w_BT = tis_weights(old_BT, sampler_BT, cap, mode, mask_BT)
        assert torch.allclose(w_BT, torch.tensor(want), atol=ATOL, rtol=0), mode
        cut = tis_cut(w_BT, cap, mode) & (mask_BT > 0)
        assert cut.sum().item() == {"token_truncate": 1, "token_mask": 1}.get(mode, 3), mode


def test_overlong_penalty_by_hand():
    lengths_B = torch.tensor([10, 20, 21, 25, 30])
    # Cap 30, buffer 10: no penalty up to 20 tokens, then -(len - 20) / 10 * factor, -factor at the cap.
    assert torch.allclose(overlong_penalty(lengths_B, 30, 10, 1.0), torch.tensor([0, 0, -0.1, -0.5, -1.0]), atol=ATOL)
    assert torch.allclose(overlong_penalty(lengths_B, 30, 10, 0.5), torch.tensor([0, 0, -0.05, -0.25, -0.5]), atol=ATOL)


def test_refill_size_scales_the_missing_groups_by_the_informative_share():
    assert refill_size(missing=3, sampled=8, kept=5, cap=8) == 5  # ceil(3 * 8 / 5)
    assert refill_size(missing=6, sampled=8, kept=2, cap=8) == 8  # 24 capped at a step's prompts
    assert refill_size(missing=8, sampled=8, kept=0, cap=8) == 8  # no rate yet
    assert refill_size(missing=1, sampled=8, kept=7, cap=8) == 2


def test_token_regions_follow_the_tags(tiny_tokenizer):
    tags = TagIds.from_tokenizer(tiny_tokenizer)
    P, p, q, S, s = tags.parallel_open, tags.path_open, tags.path_close, tags.summary_open, tags.summary_close
    Pc = tags.parallel_close
    ids = [70, 80, P, p, 90, q, p, 90, 90, q, Pc, S, 100, s, 110, P, p, 120]  # the last path cut off
    want = [0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 0, 2, 2, 2, 0, 0, 1, 1]
    regions = token_regions(torch.tensor([ids, [70] * len(ids)]), tags)
    assert regions.tolist() == [want, [0] * len(ids)]
    entropy = torch.arange(len(ids), dtype=torch.float32)[None].repeat(2, 1)
    mask = torch.ones(2, len(ids))
    mask[0, 0] = 0.0
    sums = region_sums(entropy, mask, regions)
    main = [t for t, r in enumerate(want) if r == 0 and t > 0]
    paths = [t for t, r in enumerate(want) if r == 1]
    summary = [t for t, r in enumerate(want) if r == 2]
    row1 = sum(range(len(ids)))
    assert sums.tolist() == [
        [sum(main) + row1, sum(paths), sum(summary)],
        [len(main) + len(ids), len(paths), len(summary)],
    ]


# ---------------------------------------------------------------------------------------------------
# The wiring: one policy_update over micro-batches against the hand-written mini-batch loss.


class _Recorder:
    """An optimiser that keeps the gradient it is asked to apply and changes nothing."""

    def __init__(self, model):
        self.model, self.grads = model, None

    def step(self):
        self.grads = [None if p.grad is None else p.grad.detach().clone() for p in self.model.parameters()]

    def zero_grad(self, set_to_none=True):
        self.model.zero_grad(set_to_none=set_to_none)


def _batch(model, tags) -> RolloutBatch:
    """Three left-padded rows of a 4-token prompt and responses of 5, 3 and 2 tokens, one of them inserted
    (not trained on); old log-probs a little off the policy's, so ratios are not 1."""
    g = torch.Generator().manual_seed(0)
    lengths, T = [9, 7, 6], 9
    ids = torch.randint(20, 290, (3, T), generator=g)
    attn = torch.tensor([[0] * (T - n) + [1] * n for n in lengths])
    loss_mask = torch.zeros(3, T)
    for b, n in enumerate(lengths):
        loss_mask[b, T - n + 4 :] = 1.0
    loss_mask[0, -2] = 0.0  # an engine-inserted tag
    ids = ids * attn
    with torch.no_grad():
        logp, _ = response_logprobs(model, ids, attn, tags, "seen")
    old = (logp + 0.2 * torch.randn(3, T, generator=g)) * loss_mask
    zeros = torch.zeros(3, T)
    # no prompt lengths: the policy_update tests below score these rows padded (update_rows="padded")
    return RolloutBatch(ids, attn, loss_mask, old, torch.tensor([1.0, -0.5, 2.0]), zeros, 1 + zeros, 0 * ids)


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_policy_update_gradient_is_that_of_the_written_out_loss(tiny_model, tiny_tokenizer, mode, level):
    tags = TagIds.from_tokenizer(tiny_tokenizer)
    batch = _batch(tiny_model, tags)
    cfg = GRPOConfig(
        micro_batch_size=1, update_rows="padded", loss_agg=mode, ratio_level=level, clip_low=0.2, clip_high=0.28
    )
    recorder = _Recorder(tiny_model)
    tokens, rows = batch.loss_mask_BT.sum().item(), 3.0
    out = policy_update(Accelerator(cpu=True), tiny_model, recorder, batch, cfg, tags, "seen", 0.0, tokens, rows)

    logp, entropy = response_logprobs(
        tiny_model, batch.input_ids_BT, batch.attention_mask_BT, tags, "seen", with_entropy=True
    )
    m = batch.loss_mask_BT
    logp = logp * m
    d = (logp - batch.old_logp_BT) * m
    A = batch.adv_B[:, None]
    if level == "token":
        r = d.exp()
    else:
        r = (d.sum(1, keepdim=True) / m.sum(1, keepdim=True)).exp().expand_as(d)
    per_token = torch.maximum(-A * r, -A * r.clamp(0.8, 1.28))
    if mode == "token-mean":
        loss = (per_token * m).sum() / m.sum()
    elif mode == "seq-mean-token-sum":
        loss = (per_token * m).sum(1).mean()
    else:
        loss = ((per_token * m).sum(1) / m.sum(1)).mean()
    want = torch.autograd.grad(loss, list(tiny_model.parameters()), allow_unused=True)
    for got, exp in zip(recorder.grads, want):
        if got is None or exp is None:
            assert (got is None or got.abs().max() == 0) and (exp is None or exp.abs().max() == 0)
        else:
            assert torch.allclose(got, exp, atol=ATOL, rtol=0), (got - exp).abs().max()
    assert out["tokens"] == tokens
    assert out["entropy"] == pytest.approx((entropy * m).sum().item(), rel=1e-6)
    by_region = sum(out[f"entropy_{r}"] for r in ("main", "path", "summary"))
    assert by_region == pytest.approx(out["entropy"], rel=1e-6)
    assert sum(out[f"tokens_{r}"] for r in ("main", "path", "summary")) == tokens


def test_sequence_mode_clips_a_whole_response(tiny_model, tiny_tokenizer):
    """A response whose geometric-mean ratio is above 1 + clip_high with A > 0 contributes no gradient in
    the sequence mode, though some of its tokens' own ratios are inside the clip range."""
    tags = TagIds.from_tokenizer(tiny_tokenizer)
    batch = _batch(tiny_model, tags)
    with torch.no_grad():
        logp, _ = response_logprobs(tiny_model, batch.input_ids_BT, batch.attention_mask_BT, tags, "seen")
    m = batch.loss_mask_BT
    assert m[0].sum().item() == 4  # positions 4, 5, 6 and 8
    shift = torch.zeros_like(m)
    shift[0] = torch.tensor([0.0] * 4 + [0.9, 0.0, 0.0, 0.0, 0.9])  # row 0: two tokens far off, two at 1
    batch.old_logp_BT = (logp - shift) * m
    cfg = GRPOConfig(micro_batch_size=3, update_rows="padded", ratio_level="sequence", loss_agg="seq-mean-token-mean")
    batch.adv_B = torch.tensor([1.0, 0.0, 0.0])
    recorder = _Recorder(tiny_model)
    out = policy_update(Accelerator(cpu=True), tiny_model, recorder, batch, cfg, tags, "seen", 0.0, m.sum().item(), 3)
    assert math.exp(1.8 / 4) > 1.28 and out["clipped"] == 4
    assert all(g is None or g.abs().max() == 0 for g in recorder.grads)
    token_cfg = GRPOConfig(micro_batch_size=3, update_rows="padded", loss_agg="seq-mean-token-mean")
    policy_update(Accelerator(cpu=True), tiny_model, recorder, batch, token_cfg, tags, "seen", 0.0, m.sum().item(), 3)
    assert any(
        g is not None and g.abs().max() > 0 for g in recorder.grads
    )  # per token, the tokens at ratio 1 still pull


def test_region_entropy_is_logged_per_region(tiny_model, tiny_tokenizer):
    """A response with a block: entropy_path and entropy_summary are the means of the forward's entropy over
    the trained tokens of each region."""
    tags = TagIds.from_tokenizer(tiny_tokenizer)
    prompt = [30, 31, 32]
    response = [40, tags.parallel_open, tags.path_open, 41, 42, tags.path_close, tags.path_open, 43]
    response += [tags.path_close, tags.parallel_close, tags.summary_open, 44, 45, tags.summary_close, 46]
    sampled = [t not in (tags.path_open, tags.parallel_close, tags.summary_open) for t in response]
    ids = torch.tensor([prompt + response])
    mask = torch.tensor([[0.0] * 3 + [float(s) for s in sampled]])
    zeros = torch.zeros_like(mask)
    batch = RolloutBatch(ids, torch.ones_like(ids), mask, zeros, torch.tensor([1.0]), zeros, 1 + zeros, 0 * ids)
    cfg = GRPOConfig(micro_batch_size=1, update_rows="padded")
    out = policy_update(
        Accelerator(cpu=True), tiny_model, _Recorder(tiny_model), batch, cfg, tags, "unseen", 0.0, mask.sum(), 1
    )
    with torch.no_grad():
        _, entropy = response_logprobs(tiny_model, ids, torch.ones_like(ids), tags, "unseen", with_entropy=True)
    regions = token_regions(ids, tags)
    for k, name in enumerate(("main", "path", "summary")):
        where = (regions == k) & (mask > 0)
        assert out[f"tokens_{name}"] == where.sum().item() > 0
        assert out[f"entropy_{name}"] == pytest.approx(entropy[where].sum().item(), rel=1e-6)
