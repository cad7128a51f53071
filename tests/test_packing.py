"""Packed rows (`parallel_r1.packing`): a group's prompt once, no padding, against the padded rows of
`attention.response_logprobs`, for seen / unseen / threads, with behaviour bans and every kernel."""

import random

import pytest
import torch
from test_attention import make_model
from test_chunked_attention import TAGS, VARIANTS, batch, plan_to_dense, random_row

from parallel_r1 import attention, packing
from parallel_r1.attention import allowed, build_layout, chunk_plan, response_logprobs
from parallel_r1.bans import Behaviour, ban_table
from parallel_r1.packing import pack, packed_logprobs, prompt_groups


def grouped_rows(seed: int, sizes=(3, 2, 1)):
    """Rows of groups that share a prompt (one prompt holds a whole block), shuffled, mixed padding:
    (ids [B, T], mask [B, T], prompt lengths, responses)."""
    rng = random.Random(seed)
    prompts = [random_row(rng, TAGS, 10, 40)[:12] for _ in sizes]
    prompts[0] = [11, TAGS.parallel_open, TAGS.path_open, 12, TAGS.path_close, TAGS.path_open, 13]
    prompts[0] += [TAGS.path_close, TAGS.parallel_close, TAGS.summary_open, 14, TAGS.summary_close, 15]
    rows = [(p, random_row(rng, TAGS, 10, 40)) for p, size in zip(prompts, sizes) for _ in range(size)]
    rng.shuffle(rows)
    ids, mask = batch([p + r for p, r in rows], [rng.random() < 0.7 for _ in rows])
    return ids, mask, [len(p) for p, _ in rows]


def response_mask(mask: torch.Tensor, prompt_len: list[int]) -> torch.Tensor:
    first = mask.long().argmax(1)
    cols = torch.arange(mask.shape[1])
    return mask.bool() & (cols[None] >= (first + torch.tensor(prompt_len))[:, None])


def test_prompt_groups_are_rows_with_the_same_prompt_tokens():
    ids, mask, prompt_len = grouped_rows(0)
    groups = prompt_groups(ids, mask, prompt_len)
    assert sorted(len(g) for g in groups) == [1, 2, 3]
    assert sorted(b for g in groups for b in g) == list(range(len(prompt_len)))


@pytest.mark.parametrize("variant", VARIANTS)
def test_packed_row_rule_is_each_rows_rule(variant):
    """Packed column i sees packed column j iff, in the row both came from, the first sees the second."""
    ids, mask, prompt_len = grouped_rows(1)
    layout = build_layout(ids, mask, TAGS, variant)
    groups = prompt_groups(ids, mask, prompt_len)
    packed = pack(layout, ids.shape[1], prompt_len, groups)
    got = allowed(packed.layout)[0]
    # Where each packed column comes from: {row: its column there} (a shared prompt column, every row's).
    origin = []
    for rows in groups:
        cols = [layout.real[b].nonzero().flatten().tolist() for b in rows]
        P = prompt_len[rows[0]]
        origin += [{b: row_cols[k] for b, row_cols in zip(rows, cols)} for k in range(P)]
        origin += [{b: c} for b, row_cols in zip(rows, cols) for c in row_cols[P:]]
    rule = allowed(layout)
    for i, at_i in enumerate(origin):
        for j, at_j in enumerate(origin):
            common = [b for b in at_i if b in at_j]
            want = bool(common) and bool(rule[common[0], at_i[common[0]], at_j[common[0]]])
            assert bool(got[i, j]) == want, (variant, i, j)
    plan = chunk_plan(packed.layout, 4)
    assert torch.equal(plan_to_dense_keys(plan, packed.layout.input_ids.shape[1]), got)
    # A response's pieces read its prompt and itself, not the whole row before them.
    assert any(p.keys is not None and 0 < len(p.keys) < p.q0 for p in plan)


def plan_to_dense_keys(plan, S: int) -> torch.Tensor:
    """Bool[S, S] that a one-row plan with key selections means."""
    out = torch.zeros(S, S, dtype=torch.bool)
    for p in plan:
        square = plan_to_dense([attention.chunked_attention.Piece(0, p.q1 - p.q0, None, p.diag)], 1, p.q1 - p.q0)[0]
        out[p.q0 : p.q1, p.q0 : p.q1] = square
        keys = p.before_keys()
        if keys is not None:
            count = len(range(S)[keys]) if isinstance(keys, slice) else len(keys)
            before = torch.ones(1, 1, count, dtype=torch.bool) if p.before is None else p.before
            out[p.q0 : p.q1, keys] = before[0].expand(p.q1 - p.q0, -1)
    return out


def scored(model, ids, mask, prompt_len, variant, packed: bool, share: bool, behaviour, keep=None):
    """(log-probs, entropies, gradient of a weighted sum of the log-probs) on response tokens; tokens the bans
    rule out (-inf) are left out of the sum, as the loss mask leaves them out in training."""
    model.zero_grad()
    if packed:
        logp, entropy = packed_logprobs(
            model, ids, mask, prompt_len, TAGS, variant, 0.9, True, behaviour, share_prompts=share
        )
    else:
        logp, entropy = response_logprobs(model, ids, mask, TAGS, variant, 0.9, True, behaviour=behaviour)
    keep = response_mask(mask, prompt_len) & logp.isfinite() if keep is None else keep
    weights = torch.linspace(-1, 1, keep.numel()).view_as(keep)
    logp, entropy = torch.where(keep, logp, 0.0), torch.where(keep, entropy, 0.0)
    (logp * weights).sum().backward()  # entropy is logged, not trained on
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    return (logp.detach(), entropy.detach(), grads), keep


KERNELS = [("llama", "sdpa", True), ("qwen3", "eager", True), ("llama", "sdpa", False)]


@pytest.mark.parametrize("arch,backend,chunkable", KERNELS)
def test_packed_logprobs_and_gradients_equal_the_padded_rows(monkeypatch, arch, backend, chunkable):
    monkeypatch.setattr(attention, "CHUNK_TOKENS", 7)  # several pieces per response
    monkeypatch.setattr(packing, "SCORE_CHUNK", 5)
    if not chunkable:  # the backend's dense mask of the packed row
        monkeypatch.setattr(packing, "can_chunk", lambda model: False)
    model = make_model(48, arch, backend)
    for seed, variant in enumerate(VARIANTS):
        ids, mask, prompt_len = grouped_rows(seed + 2)
        rows = torch.randint(0, 6, ids.shape, generator=torch.Generator().manual_seed(seed))
        behaviour = Behaviour(rows, ban_table(TAGS, 48, torch.device("cpu")), top_k=40, top_p=0.99)
        want, keep = scored(model, ids, mask, prompt_len, variant, False, False, behaviour)
        assert keep.sum() > 0.5 * response_mask(mask, prompt_len).sum()
        for share in (True, False):
            got, _ = scored(model, ids, mask, prompt_len, variant, True, share, behaviour, keep)
            for g, w in zip(got, want):
                assert torch.allclose(g, w, atol=1e-5), (variant, share, (g - w).abs().max())


def test_flex_attention_on_cpu_is_refused_with_a_message():
    """torch's CPU flex kernel aborts the process on a packed row: the scoring refuses it up front."""
    model = make_model(48, "llama", "flex_attention")
    ids, mask, prompt_len = grouped_rows(2)
    with pytest.raises(ValueError, match="update_rows: padded"):
        packed_logprobs(model, ids, mask, prompt_len, TAGS, "unseen")


def test_packed_nested_blocks_equal_the_padded_rows(monkeypatch):
    """Unseen responses with nested blocks, a group's prompt once: log-probs and gradients of the padded rows."""
    from test_attention import random_nested_row

    monkeypatch.setattr(attention, "CHUNK_TOKENS", 7)
    monkeypatch.setattr(packing, "SCORE_CHUNK", 5)
    model = make_model(48, "llama", "sdpa")
    rng = random.Random(5)
    prompts = [[11, 12, 13], [14, 15]]
    rows = [(p, random_nested_row(rng) or [16]) for p in prompts for _ in range(3)]
    ids, mask = batch([p + r for p, r in rows], [rng.random() < 0.5 for _ in rows])
    prompt_len = [len(p) for p, _ in rows]
    assert (ids == TAGS.parallel_open).sum() >= 4
    want, keep = scored(model, ids, mask, prompt_len, "unseen", False, False, None)
    got, _ = scored(model, ids, mask, prompt_len, "unseen", True, True, None, keep)
    for g, w in zip(got, want):
        assert torch.allclose(g, w, atol=1e-5), (g - w).abs().max()
