"""The long-sequence path: `chunked_attention` (exact attention in query pieces) and its use by
`attention.response_logprobs`, against the dense mask, for seen / unseen / threads."""

import random

import pytest
import torch
import torch.nn.functional as F
from test_attention import make_model

from parallel_r1 import attention, chunked_attention
from parallel_r1.attention import allowed, attention_kernel, build_layout, chunk_plan, response_logprobs
from parallel_r1.chunked_attention import Piece, planned_attention
from parallel_r1.format import TagIds

TAGS = TagIds(parallel_open=1, parallel_close=2, path_open=3, path_close=4, summary_open=5, summary_close=6)
VARIANTS = ("seen", "unseen", "threads")


def plan_from_rows(rows, length: int, chunk: int) -> list[Piece]:
    """Fixed-size pieces from `rows(q0, q1) -> Bool[B, q1 - q0, q1]` with full per-query masks: exact for
    any rule causal in index order (the cheap structured plan is `attention.chunk_plan`)."""
    pieces = []
    for q0 in range(0, length, chunk):
        q1 = min(q0 + chunk, length)
        rule = rows(q0, q1)
        before = rule[:, :, :q0]
        pieces.append(Piece(q0, q1, None if before.all() else before, rule[:, :, q0:]))
    return pieces


def random_row(rng: random.Random, tags: TagIds, lo: int = 10, hi: int = 20) -> list[int]:
    """Text, 1-3 blocks of 2-3 paths (some with stray tokens after `</Path>`), maybe a truncated block."""
    word = lambda n: [rng.randint(lo, hi) for _ in range(n)]  # noqa: E731
    row = word(rng.randint(1, 4))
    for _ in range(rng.randint(1, 3)):
        row += [tags.parallel_open] + word(rng.randint(0, 1))
        for _ in range(rng.randint(2, 3)):
            row += [tags.path_open] + word(rng.randint(1, 6)) + [tags.path_close] + word(rng.randint(0, 1))
        row += [tags.parallel_close, tags.summary_open] + word(2) + [tags.summary_close] + word(rng.randint(0, 3))
    if rng.random() < 0.3:
        row += [tags.parallel_open, tags.path_open] + word(2) + [tags.path_close, tags.path_open] + word(3)
    return row


def batch(rows: list[list[int]], left: list[bool]) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(r) for r in rows)
    ids, mask = torch.zeros(len(rows), T, dtype=torch.long), torch.zeros(len(rows), T, dtype=torch.long)
    for i, (r, lft) in enumerate(zip(rows, left)):
        sl = slice(T - len(r), T) if lft else slice(0, len(r))
        ids[i, sl], mask[i, sl] = torch.tensor(r), 1
    return ids, mask


def plan_to_dense(plan, B: int, S: int) -> torch.Tensor:
    """Bool[B, S, S] that a plan means."""
    out = torch.zeros(B, S, S, dtype=torch.bool)
    for p in plan:
        Q = p.q1 - p.q0
        if p.q0:
            before = torch.ones(B, 1, p.q0, dtype=torch.bool) if p.before is None else p.before
            out[:, p.q0 : p.q1, : p.q0] = before.expand(B, Q, p.q0)
        diag = torch.ones(Q, Q, dtype=torch.bool).tril().expand(B, Q, Q) if p.diag is None else p.diag
        out[:, p.q0 : p.q1, p.q0 : p.q1] = diag
    return out


# ----------------------------------------------------------------------------- the kernel


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_planned_attention_equals_masked_sdpa_with_gradients(monkeypatch, fused, chunk):
    monkeypatch.setattr(chunked_attention, "FUSED_ON_CPU", fused)
    torch.manual_seed(0)
    B, H, T, D = 2, 3, 45, 8
    rule = (torch.rand(B, T, T) < 0.4).tril() | torch.eye(T, dtype=torch.bool)
    rule[1, 20:, :10] = False  # a piece whose keys before it are all hidden in one row
    q, k, v = (torch.randn(B, H, T, D, requires_grad=True) for _ in range(3))
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=rule[:, None])
    grad = torch.randn_like(want)
    want_grads = torch.autograd.grad(want, (q, k, v), grad)
    plan = plan_from_rows(lambda q0, q1: rule[:, q0:q1, :q1], T, chunk)
    assert torch.equal(plan_to_dense(plan, B, T), rule)
    got = planned_attention(q, k, v, plan)
    assert torch.allclose(got, want, atol=1e-5)
    for g, w in zip(torch.autograd.grad(got, (q, k, v), grad), want_grads):
        assert torch.allclose(g, w, atol=1e-5)


def test_planned_attention_broadcast_rows_and_causal_squares():
    torch.manual_seed(1)
    B, H, T, D = 2, 2, 12, 4
    keep = torch.tensor([[True] * 12, [False] * 3 + [True] * 9])
    plan = [
        Piece(0, 5, None, None),
        Piece(5, 9, keep[:, None, :5], None),
        Piece(9, 12, None, torch.eye(3, dtype=torch.bool).expand(B, 3, 3).clone()),
    ]
    rule = plan_to_dense(plan, B, T)
    q, k, v = (torch.randn(B, H, T, D, dtype=torch.float64) for _ in range(3))
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=rule[:, None])
    assert torch.allclose(planned_attention(q, k, v, plan), want, atol=1e-10)


# ----------------------------------------------------------------------------- the plan of a layout


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("chunk", [1, 3, 1000])
def test_chunk_plan_is_the_layout_rule(variant, chunk):
    rng = random.Random(chunk)
    for _ in range(8):
        rows = [random_row(rng, TAGS) for _ in range(3)]
        ids, mask = batch(rows, [rng.random() < 0.5 for _ in rows])
        layout = build_layout(ids, mask, TAGS, variant)
        plan = chunk_plan(layout, chunk)
        B, S = layout.input_ids.shape
        assert [p.q0 for p in plan[1:]] == [p.q1 for p in plan[:-1]] and plan[-1].q1 == S
        assert all(p.before is None or p.before.shape[1] == 1 for p in plan)  # one row per piece
        assert torch.equal(plan_to_dense(plan, B, S), allowed(layout)), (variant, ids.tolist())


# ----------------------------------------------------------------------------- response_logprobs


@pytest.mark.parametrize("arch,backend", [("llama", "sdpa"), ("qwen3", "sdpa"), ("llama", "eager")])
def test_chunked_logprobs_and_gradients_equal_dense(monkeypatch, arch, backend):
    monkeypatch.setattr(attention, "CHUNK_TOKENS", 5)
    calls = []
    original = chunked_attention.attention_forward
    monkeypatch.setattr(chunked_attention, "attention_forward", lambda *a, **kw: calls.append(1) or original(*a, **kw))
    rng = random.Random(7)
    rows = [random_row(rng, TAGS, 10, 40) for _ in range(3)]
    ids, mask = batch(rows, [True, True, False])
    model = make_model(48, arch, backend)
    for variant in VARIANTS:
        results = {}
        for kernel in ("dense", "chunked"):
            model.zero_grad()
            logp, entropy = response_logprobs(model, ids, mask, TAGS, variant, with_entropy=True, kernel=kernel)
            (logp * mask).sum().backward()
            grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
            results[kernel] = (logp * mask, entropy * mask, grads)
            assert model.config._attn_implementation == backend
        for got, want in zip(results["chunked"], results["dense"]):
            assert torch.allclose(got, want, atol=1e-5), (variant, (got - want).abs().max())
    assert len(calls) == 3 * model.config.num_hidden_layers


def test_kernel_choice(monkeypatch, tiny_model):
    assert attention_kernel(tiny_model, attention.LONG_SEQUENCE_TOKENS - 1) == "dense"
    assert attention_kernel(tiny_model, attention.LONG_SEQUENCE_TOKENS) == "chunked"
    assert attention_kernel(tiny_model, 10, "chunked") == "chunked"
    assert attention_kernel(tiny_model, 10**6, "dense") == "dense"
    with pytest.raises(ValueError, match="kernel"):
        attention_kernel(tiny_model, 10, "sparse")
    tiny_model.activation_checkpointing_enable()
    assert attention_kernel(tiny_model, 10**6) == "dense"
    with pytest.raises(ValueError, match="checkpointing"):
        attention_kernel(tiny_model, 10, "chunked")
    tiny_model.activation_checkpointing_disable()
    monkeypatch.setattr(tiny_model.config, "_attn_implementation", "flex_attention")
    assert attention_kernel(tiny_model, 10**6) == "dense"
    with pytest.raises(ValueError, match="flex_attention"):
        attention_kernel(tiny_model, 10, "chunked")


def test_auto_kernel_switches_at_the_threshold_and_restores_the_backend(monkeypatch, tiny_model):
    monkeypatch.setattr(attention, "LONG_SEQUENCE_TOKENS", 12)
    monkeypatch.setattr(attention, "CHUNK_TOKENS", 4)
    rng = random.Random(3)
    ids, mask = batch([random_row(rng, TAGS)], [True])
    assert ids.shape[1] >= 12
    want, _ = response_logprobs(tiny_model, ids, mask, TAGS, "unseen", kernel="dense")
    got, _ = response_logprobs(tiny_model, ids, mask, TAGS, "unseen")
    assert torch.allclose(got * mask, want * mask, atol=1e-5)

    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(chunked_attention, "planned_attention", boom)
    with pytest.raises(RuntimeError, match="boom"):
        response_logprobs(tiny_model, ids, mask, TAGS, "unseen")
    assert tiny_model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("chunk", [1, 3, 1000])
def test_chunk_plan_of_nested_blocks_is_the_layout_rule(chunk):
    from test_attention import random_nested_row

    rng = random.Random(chunk)
    for _ in range(8):
        rows = [random_nested_row(rng) or [10] for _ in range(3)]
        ids, mask = batch(rows, [rng.random() < 0.5 for _ in rows])
        layout = build_layout(ids, mask, TAGS, "unseen")
        B, S = layout.input_ids.shape
        assert torch.equal(plan_to_dense(chunk_plan(layout, chunk), B, S), allowed(layout)), ids.tolist()
