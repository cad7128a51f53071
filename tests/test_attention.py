import copy
import random
from types import SimpleNamespace

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

from parallel_r1.attention import (
    allowed,
    build_attention,
    build_layout,
    build_positions,
    response_logprobs,
    structure_ids,
    token_logprobs,
)
from parallel_r1.format import TagIds

# Hand-written ids for the pure-function tests: 0 is padding, tags 1..6, content from 10 on.
TAGS = TagIds(parallel_open=1, parallel_close=2, path_open=3, path_close=4, summary_open=5, summary_close=6)
P, EP, PA, EPA, S, ES = 1, 2, 3, 4, 5, 6
ATOL = 1e-5


# ----------------------------------------------------------------------------- reference rule


def reference(ids: list[int], real: list[bool], tags: TagIds = TAGS):
    """The design.md rule token by token, with plain Python state: (block, path, positions, allowed)."""
    T = len(ids)
    block, path, pos = [-1] * T, [-1] * T, [0] * T
    n_blocks, n_paths, cur_block, cur_path = 0, 0, -1, -1
    nxt, start, longest, offset = 0, None, 0, 0
    for t, (tok, r) in enumerate(zip(ids, real)):
        if not r:
            continue
        if tok == tags.parallel_open:
            cur_block, cur_path, start, longest = n_blocks, -1, None, 0
            n_blocks += 1
        block[t] = cur_block
        if cur_block >= 0 and tok == tags.path_open:
            cur_path, offset = n_paths, 0
            n_paths += 1
            start = nxt if start is None else start
        if cur_block >= 0 and tok == tags.parallel_close:
            cur_path, cur_block = -1, -1
            if start is not None:
                nxt = start + longest
        path[t] = cur_path
        if cur_path >= 0:
            pos[t] = start + offset
            offset += 1
            longest = max(longest, offset)
        else:
            pos[t] = nxt
            nxt += 1
    allowed = [[False] * T for _ in range(T)]
    for q in range(T):
        for k in range(q + 1):
            isolated = path[q] >= 0 and path[k] >= 0 and path[q] != path[k] and block[q] == block[k]
            allowed[q][k] = real[k] and not isolated
        allowed[q][q] |= not real[q]
    return block, path, pos, allowed


def random_row(rng: random.Random) -> list[int]:
    """A response with 0-3 blocks, stray tokens, empty prefixes and maybe a truncated last block."""
    row = [rng.randint(10, 20) for _ in range(rng.randint(0, 3))]
    for _ in range(rng.randint(0, 3)):
        row.append(P)
        row += [rng.randint(10, 20) for _ in range(rng.randint(0, 1))]
        for _ in range(rng.randint(0, 3)):
            row += [PA] + [rng.randint(10, 20) for _ in range(rng.randint(0, 4))] + [EPA]
            row += [rng.randint(10, 20) for _ in range(rng.randint(0, 1))]
        row += [EP, S, rng.randint(10, 20), ES] + [rng.randint(10, 20) for _ in range(rng.randint(0, 2))]
    if rng.random() < 0.3:
        row += [P, PA, 11, EPA, PA, 12, 13]
    return row or [10]


def pad_batch(rows: list[list[int]], left: list[bool]) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(r) for r in rows)
    ids, mask = torch.zeros(len(rows), T, dtype=torch.long), torch.zeros(len(rows), T, dtype=torch.long)
    for i, (r, lft) in enumerate(zip(rows, left)):
        sl = slice(T - len(r), T) if lft else slice(0, len(r))
        ids[i, sl], mask[i, sl] = torch.tensor(r), 1
    return ids, mask


# ----------------------------------------------------------------------------- pure functions


def test_hand_written_block_with_prefix_and_stray_tokens():
    #       0   1  2  3   4   5   6    7   8   9   10   11  12  13  14  15  16
    row = [10, 11, P, 12, PA, 13, EPA, PA, 14, 15, EPA, 16, EP, S, 17, ES, 18]
    ids = torch.tensor([row])
    block_id, path_id = structure_ids(ids, TAGS)
    assert block_id.tolist() == [[-1, -1] + [0] * 11 + [-1] * 4]
    assert path_id.tolist() == [[-1, -1, -1, -1, 0, 0, 0, 1, 1, 1, 1, 1, -1, -1, -1, -1, -1]]
    # s = 4; path 0 is 3 tokens, path 1 (with the stray 16) is 5, so </Parallel> sits at 4 + 5.
    assert build_positions(ids, None, TAGS).tolist() == [[0, 1, 2, 3, 4, 5, 6, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13]]
    assert build_positions(ids, None, TAGS, "seen").tolist() == [list(range(17))]
    mask, _ = build_attention(ids, None, TAGS)
    allowed = mask[0, 0] == 0
    assert not allowed[8, 5] and not allowed[11, 6] and not allowed[11, 4]  # path 1 never sees path 0
    assert allowed[8, 3] and allowed[8, 2] and allowed[11, 7]  # but sees the prefix and itself
    assert allowed[12, 5] and allowed[14, 11] and allowed[16, 4]  # </Parallel>, summary and after see all
    assert not allowed[4, 5]  # causal
    assert mask.dtype == torch.float32 and mask[0, 0, 8, 5] == torch.finfo(torch.float32).min
    seen, _ = build_attention(ids, None, TAGS, "seen")
    assert torch.equal(seen[0, 0] == 0, torch.ones(17, 17, dtype=torch.bool).tril())


def test_two_blocks_and_truncated_block_positions():
    row = [10, P, PA, 11, EPA, PA, 12, EPA, EP, S, 13, ES, P, PA, 14, 15, 16, EPA, PA, 17]
    pos = build_positions(torch.tensor([row]), None, TAGS)[0].tolist()
    # block 1: s=2, L=3 -> </Parallel> at 5; block 2 opens at 9, s=10, truncated (never closed).
    assert pos == [0, 1, 2, 3, 4, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 10, 11]
    block_id, path_id = structure_ids(torch.tensor([row]), TAGS)
    assert block_id[0, 12:].tolist() == [1] * 8
    assert path_id[0, 13:].tolist() == [2] * 5 + [3] * 2
    mask, _ = build_attention(torch.tensor([row]), None, TAGS)
    assert mask[0, 0, 19, 15] < 0 and mask[0, 0, 19, 12] == 0  # truncated block still isolates its paths
    assert mask[0, 0, 14, 3] == 0  # paths of a later block see paths of an earlier one


def test_tags_outside_a_block_are_ordinary_tokens():
    row = [PA, 10, EPA, EP, PA, 11]
    block_id, path_id = structure_ids(torch.tensor([row]), TAGS)
    assert block_id.tolist() == [[-1] * 6] and path_id.tolist() == [[-1] * 6]
    assert build_positions(torch.tensor([row]), None, TAGS).tolist() == [list(range(6))]


def test_padding_left_and_right():
    row = [10, P, PA, 11, EPA, PA, 12, 13, EPA, EP, 14]
    ids, mask = pad_batch([row, row, [10, 11]], left=[True, False, True])
    pos = build_positions(ids, mask, TAGS)
    expected = [0, 1, 2, 3, 4, 2, 3, 4, 5, 6, 7]
    assert pos[0].tolist() == expected and pos[1].tolist() == expected
    assert pos[2].tolist() == [0] * 9 + [0, 1]
    block_id, path_id = structure_ids(ids, TAGS, mask)
    assert torch.equal(block_id[0], block_id[1]) and torch.equal(path_id[0], path_id[1])
    add, _ = build_attention(ids, mask, TAGS)
    allowed = add[:, 0] == 0
    assert not allowed[2, 10, :9].any()  # nobody sees left padding
    assert allowed[2, :9].equal(torch.eye(11, dtype=torch.bool)[:9])  # padding queries see only themselves


def test_threads_layout_appends_copies_of_later_paths():
    #       0   1  2   3   4    5   6   7   8    9  10  11  12
    row = [10, P, PA, 11, EPA, PA, 12, 13, EPA, EP, S, 14, ES]
    ids, mask = pad_batch([row, [10, 11]], left=[True, True])
    layout = build_layout(ids, mask, TAGS, "threads")
    # Row 0: the text, then a copy of path 2 (4 tokens, positions as sampled: s = 2); row 1 pads its copy area.
    assert layout.input_ids[0].tolist() == row + [PA, 12, 13, EPA]
    assert layout.positions[0].tolist() == list(range(13)) + [2, 3, 4, 5]
    assert layout.seg[0].tolist() == [0] * 13 + [2] * 4 and layout.horizon[0, 13:].tolist() == [1] * 4
    assert layout.source[0].tolist() == [0, 1, 2, 3, 4, 13, 14, 15, 16, 9, 10, 11, 12]
    assert layout.source[1].tolist() == list(range(13)) and not layout.real[1, 13:].any()
    ok = allowed(layout)[0]
    assert torch.equal(ok[:13, :13], torch.ones(13, 13, dtype=torch.bool).tril())  # the text reads causally
    assert ok[:13, 13:].sum() == 0  # and never the copies
    assert ok[15].nonzero().flatten().tolist() == [0, 1, 13, 14, 15]  # a copy: prefix to <Parallel>, itself
    assert torch.equal(
        build_layout(ids, mask, TAGS, "threads").positions[:, :13], build_positions(ids, mask, TAGS, "seen")
    )


@pytest.mark.parametrize("variant", ["unseen", "seen"])
def test_random_structures_match_the_reference_rule(variant):
    rng = random.Random(0)
    for _ in range(20):
        rows = [random_row(rng) for _ in range(4)]
        left = [rng.random() < 0.5 for _ in rows]
        ids, mask = pad_batch(rows, left)
        add, pos = build_attention(ids, mask, TAGS, variant)
        block_id, path_id = structure_ids(ids, TAGS, mask)
        for b in range(len(rows)):
            real = mask[b].bool().tolist()
            blk, pth, ref_pos, ref_allowed = reference(ids[b].tolist(), real)
            if variant == "seen":
                ref_pos = [max(0, sum(real[: t + 1]) - 1) if real[t] else 0 for t in range(len(real))]
                n = len(real)
                ref_allowed = [[(k <= q and real[k]) or (k == q and not real[q]) for k in range(n)] for q in range(n)]
            else:
                assert block_id[b].tolist() == blk and path_id[b].tolist() == pth
            assert pos[b].tolist() == ref_pos, (ids[b].tolist(), real)
            assert (add[b, 0] == 0).tolist() == ref_allowed, (ids[b].tolist(), real)


def test_token_logprobs_chunks_temperature_and_entropy():
    torch.manual_seed(0)
    logits, ids = torch.randn(3, 11, 17), torch.randint(0, 17, (3, 11))
    lp, ent = token_logprobs(logits, ids, temperature=0.7, with_entropy=True, chunk=3)
    full = torch.log_softmax(logits / 0.7, -1)
    assert lp[:, 0].eq(0).all() and ent[:, 0].eq(0).all()
    assert torch.allclose(lp[:, 1:], full[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1), atol=1e-6)
    want = torch.distributions.Categorical(logits=logits[:, :-1] / 0.7).entropy()
    assert torch.allclose(ent[:, 1:], want, atol=1e-5)
    assert token_logprobs(logits, ids)[1] is None


def test_unknown_variant_and_unsupported_backend_raise():
    ids = torch.tensor([[10, P, PA, 11]])
    with pytest.raises(ValueError, match="variant"):
        build_attention(ids, None, TAGS, "sideways")
    fake = SimpleNamespace(config=SimpleNamespace(_attn_implementation="flash_attention_2"), dtype=torch.float32)
    with pytest.raises(ValueError, match="flash_attention_2"):
        response_logprobs(fake, ids, torch.ones_like(ids), TAGS)


# ----------------------------------------------------------------------------- tiny models


def make_model(vocab: int, arch: str, backend: str):
    common = dict(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        attn_implementation=backend,
    )
    torch.manual_seed(0)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    else:
        model = Qwen3ForCausalLM(Qwen3Config(head_dim=16, **common))
    return model.float().eval()


MODELS = [(a, b) for a in ("llama", "qwen3") for b in ("sdpa", "eager")]


@pytest.fixture(scope="module")
def tag_ids(tiny_tokenizer):
    return TagIds.from_tokenizer(tiny_tokenizer)


def content(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(20, 290, (n,), generator=g).tolist()


def one_block(t: TagIds):
    """(prefix ending in <Parallel>, [path ids], tail from </Parallel> on) of one response."""
    prefix = content(6, 1) + [t.parallel_open]
    paths = [[t.path_open, *content(4, 2), t.path_close], [t.path_open, *content(7, 3), t.path_close, *content(1, 4)]]
    tail = [t.parallel_close, t.summary_open, *content(3, 5), t.summary_close, *content(4, 6)]
    return prefix, paths, tail


def plain_logprobs(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """[n-1] log-probs of ids[1:] from logits[:-1], the textbook way."""
    return torch.log_softmax(logits[:-1], -1).gather(-1, ids[1:, None]).squeeze(-1)


@pytest.mark.parametrize("arch,backend", MODELS)
def test_unseen_path_equals_prefix_plus_path_alone(tiny_tokenizer, tag_ids, arch, backend):
    model = make_model(len(tiny_tokenizer), arch, backend)
    prefix, paths, tail = one_block(tag_ids)
    ids = torch.tensor([prefix + paths[0] + paths[1] + tail])
    with torch.no_grad():
        lp, _ = response_logprobs(model, ids, torch.ones_like(ids), tag_ids)
        start = len(prefix)
        for i, path in enumerate(paths):
            alone = torch.tensor(prefix + path)
            pos = torch.tensor(list(range(start)) + [start + j for j in range(len(path))])
            want = plain_logprobs(model(alone[None], position_ids=pos[None]).logits[0], alone)[start - 1 :]
            first = start + sum(len(p) for p in paths[:i])
            # The first token of a later path is predicted from the previous path's end (see docstring).
            skip = 0 if i == 0 else 1
            got, want = lp[0, first + skip : first + len(path)], want[skip:]
            assert torch.allclose(got, want, atol=ATOL), (got - want).abs().max()
        # Seen lets path 2 see path 1, so it must differ there: guards against a test that always passes.
        seen, _ = response_logprobs(model, ids, torch.ones_like(ids), tag_ids, variant="seen")
        p2 = slice(start + len(paths[0]) + 1, start + len(paths[0]) + len(paths[1]))
        assert (seen[0, p2] - lp[0, p2]).abs().max() > 1e-3


@pytest.mark.parametrize("arch,backend", MODELS)
def test_summary_equals_kv_cache_assembled_from_separate_paths(tiny_tokenizer, tag_ids, arch, backend):
    model = make_model(len(tiny_tokenizer), arch, backend)
    prefix, paths, tail = one_block(tag_ids)
    full = prefix + paths[0] + paths[1] + tail
    ids = torch.tensor([full])
    start, longest = len(prefix), max(len(p) for p in paths)
    with torch.no_grad():
        lp, ent = response_logprobs(model, ids, torch.ones_like(ids), tag_ids, with_entropy=True)
        cache = DynamicCache(config=model.config)
        model(torch.tensor([prefix]), position_ids=torch.arange(start)[None], cache=cache, use_cache=True)
        keys = [[layer.keys] for layer in cache.layers]
        values = [[layer.values] for layer in cache.layers]
        for path in paths:
            fork = copy.deepcopy(cache)
            pos = (start + torch.arange(len(path)))[None]
            model(torch.tensor([path]), position_ids=pos, cache=fork, use_cache=True)
            for layer, k, v in zip(fork.layers, keys, values):
                k.append(layer.keys[:, :, start:])
                v.append(layer.values[:, :, start:])
        joined = DynamicCache(ddp_cache_data=[(torch.cat(k, 2), torch.cat(v, 2)) for k, v in zip(keys, values)])
        pos = (start + longest + torch.arange(len(tail)))[None]
        logits = model(torch.tensor([tail]), position_ids=pos, cache=joined, use_cache=True).logits[0]
    want = plain_logprobs(logits, torch.tensor(tail))
    want_ent = torch.distributions.Categorical(logits=logits[:-1]).entropy()
    first = len(full) - len(tail)
    assert torch.allclose(lp[0, first + 1 :], want, atol=ATOL), (lp[0, first + 1 :] - want).abs().max()
    assert torch.allclose(ent[0, first + 1 :], want_ent, atol=ATOL)


@pytest.mark.parametrize("arch,backend", MODELS)
def test_no_block_equals_plain_causal_forward(tiny_tokenizer, tag_ids, arch, backend):
    model = make_model(len(tiny_tokenizer), arch, backend)
    ids = torch.tensor([content(20, 7), content(20, 8)])
    with torch.no_grad():
        logits = model(ids).logits
        want = torch.stack([plain_logprobs(logits[b], ids[b]) for b in range(2)])
        for variant in ("unseen", "seen"):
            lp, _ = response_logprobs(model, ids, torch.ones_like(ids), tag_ids, variant=variant)
            assert torch.allclose(lp[:, 1:], want, atol=ATOL) and lp[:, 0].eq(0).all()


@pytest.mark.parametrize("variant", ["unseen", "seen"])
@pytest.mark.parametrize("arch,backend", [("llama", "sdpa"), ("qwen3", "eager")])
def test_batch_of_different_structures_equals_each_row_alone(tiny_tokenizer, tag_ids, arch, backend, variant):
    model = make_model(len(tiny_tokenizer), arch, backend)
    t = tag_ids
    prefix, paths, tail = one_block(t)
    rows = [
        prefix + paths[0] + paths[1] + tail,
        content(5, 9),
        prefix + paths[1] + paths[0] + paths[1] + tail + [t.parallel_open, t.path_open, *content(3, 10)],
        content(3, 11) + [t.parallel_open, *content(2, 12), t.path_open, *content(2, 13), t.path_close],
    ]
    for left in (True, False):
        ids, mask = pad_batch(rows, [left] * len(rows))
        with torch.no_grad():
            lp, ent = response_logprobs(model, ids, mask, t, variant=variant, with_entropy=True)
            for b, row in enumerate(rows):
                alone = torch.tensor([row])
                one, one_ent = response_logprobs(model, alone, torch.ones_like(alone), t, variant, with_entropy=True)
                real = mask[b].bool()
                assert torch.allclose(lp[b, real][1:], one[0, 1:], atol=ATOL), (b, left)
                assert torch.allclose(ent[b, real][1:], one_ent[0, 1:], atol=ATOL), (b, left)


def threads_requests_logprobs(model, row: list[int], tags: TagIds) -> list[float]:
    """Token t's log-prob from the request a stock engine sends for it, each a plain causal forward:
    a path other than its block's first is `text before the block's first <Path>` + the path alone;
    every other token is read in the whole text."""
    block, path, _, _ = reference(row, [True] * len(row), tags)
    ids = torch.tensor([row])
    want = [0.0] + plain_logprobs(model(ids).logits[0], ids[0]).tolist()
    for p in sorted(set(path) - {-1}):
        span = [t for t in range(len(row)) if path[t] == p]
        first = min(t for t in range(len(row)) if block[t] == block[span[0]] and path[t] >= 0)
        if span[0] == first:
            continue
        request = torch.tensor(row[:first] + [row[t] for t in span])
        lp = plain_logprobs(model(request[None]).logits[0], request)
        for j, t in enumerate(span[1:], start=first + 1):
            want[t] = lp[j - 1].item()
    return want


@pytest.mark.parametrize("arch,backend", MODELS)
def test_threads_equals_the_requests_a_stock_engine_sends(tiny_tokenizer, tag_ids, arch, backend):
    model = make_model(len(tiny_tokenizer), arch, backend)
    t = tag_ids
    prefix, paths, tail = one_block(t)
    rows = [
        prefix + paths[0] + paths[1] + tail,
        content(5, 9),
        prefix + paths[1] + paths[0] + paths[1] + tail + [t.parallel_open, t.path_open, *content(3, 10)],
        prefix + paths[0] + tail + [t.parallel_open] + paths[1] + paths[0] + [t.path_open, *content(2, 11)],
    ]
    for left in (True, False):
        ids, mask = pad_batch(rows, [left] * len(rows))
        with torch.no_grad():
            lp, ent = response_logprobs(model, ids, mask, t, variant="threads", with_entropy=True)
            for b, row in enumerate(rows):
                want = torch.tensor(threads_requests_logprobs(model, row, t))
                got = lp[b, mask[b].bool()]
                # The <Path> opening a later path is scored after the copy area's previous token: untrained.
                trained = torch.tensor([k > 0 and row[k] != t.path_open for k in range(len(row))])
                assert torch.allclose(got[trained], want[trained], atol=ATOL), (b, left, (got - want).abs().max())
                assert torch.isfinite(ent[b, mask[b].bool()]).all()


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_gradients_flow_and_stay_finite_with_padding(tiny_tokenizer, tag_ids, backend):
    model = make_model(len(tiny_tokenizer), "llama", backend).train()
    prefix, paths, tail = one_block(tag_ids)
    ids, mask = pad_batch([prefix + paths[0] + paths[1] + tail, content(4, 14)], left=[True, True])
    lp, ent = response_logprobs(model, ids, mask, tag_ids, temperature=0.8, with_entropy=True)
    loss_mask = mask.clone()
    loss_mask[:, 0] = 0
    (-(lp * loss_mask).sum() - 0.01 * (ent * loss_mask).sum()).backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert all(g.abs().sum() > 0 for g in grads)


def test_flex_attention_matches_sdpa(tiny_tokenizer, tag_ids):
    pytest.importorskip("torch.nn.attention.flex_attention")
    vocab = len(tiny_tokenizer)
    sdpa, flex = make_model(vocab, "llama", "sdpa"), make_model(vocab, "llama", "flex_attention")
    prefix, paths, tail = one_block(tag_ids)
    ids, mask = pad_batch([prefix + paths[0] + paths[1] + tail, content(9, 15)], left=[True, True])
    with torch.no_grad():
        want, _ = response_logprobs(sdpa, ids, mask, tag_ids)
        got, _ = response_logprobs(flex, ids, mask, tag_ids)
    real = mask.bool()
    assert torch.allclose(got[real], want[real], atol=ATOL)


# ----------------------------------------------------------------------------- nested blocks


def nested_reference(ids: list[int], real: list[bool], tags: TagIds = TAGS):
    """The nested rule token by token with a stack of open blocks: (positions, allowed). A token's chain is
    the (block, path) of every path it sits in; a query does not see a key that, at some level, is in
    another path of the same block. Every path of a block starts at the block's `s`; `</Parallel>` sits
    at `s + L`, L the longest path in positions."""
    T = len(ids)
    pos, chain = [0] * T, [()] * T
    frames: list[dict] = []
    nxt, n_blocks, n_paths = 0, 0, 0

    def current() -> tuple:
        return tuple((f["block"], f["path"]) for f in frames if f["path"] is not None)

    def end_path(f: dict) -> None:
        if f["path"] is not None:
            f["longest"] = max(f["longest"], nxt - f["start"])

    for t, (tok, r) in enumerate(zip(ids, real)):
        if not r:
            continue
        if tok == tags.parallel_open:
            chain[t], pos[t] = current(), nxt
            nxt += 1
            frames.append({"block": n_blocks, "path": None, "start": None, "longest": 0})
            n_blocks += 1
            continue
        if frames and tok == tags.path_open:
            f = frames[-1]
            end_path(f)
            f["path"], n_paths = n_paths, n_paths + 1
            f["start"] = nxt if f["start"] is None else f["start"]
            nxt = f["start"]
        elif frames and tok == tags.parallel_close:
            f = frames.pop()
            end_path(f)
            nxt = f["start"] + f["longest"] if f["start"] is not None else nxt
        chain[t], pos[t] = current(), nxt
        nxt += 1
    allowed = [[False] * T for _ in range(T)]
    for q in range(T):
        for k in range(q + 1):
            isolated = any(a[0] == b[0] and a[1] != b[1] for a, b in zip(chain[q], chain[k]))
            allowed[q][k] = real[k] and not isolated
        allowed[q][q] |= not real[q]
    return pos, allowed


def random_nested_row(rng: random.Random, depth: int = 1, max_depth: int = 3) -> list[int]:
    """Text with 0-2 blocks whose paths may hold blocks of their own, down to `max_depth`."""
    row = [rng.randint(10, 20) for _ in range(rng.randint(0, 2))]
    for _ in range(rng.randint(0, 2)):
        row.append(P)
        for _ in range(rng.randint(1, 3)):
            row += [PA] + [rng.randint(10, 20) for _ in range(rng.randint(0, 3))]
            if depth < max_depth and rng.random() < 0.6:
                row += random_nested_row(rng, depth + 1, max_depth)
            row += [rng.randint(10, 20) for _ in range(rng.randint(0, 2))] + [EPA]
        row += [EP, S, rng.randint(10, 20), ES] + [rng.randint(10, 20) for _ in range(rng.randint(0, 2))]
    return row


def test_hand_written_nested_block_positions_and_mask():
    #       0  1   2   3  4   5   6    7   8   9    10  11 12  13   14  15  16  17   18  19  20  21
    row = [10, P, PA, 11, P, PA, 12, EPA, PA, 13, 14, EPA, EP, S, 15, ES, EPA, PA, 16, EPA, EP, 17]
    ids = torch.tensor([row])
    # outer s = 2; inner s = 5, its longest path 4 -> its </Parallel> at 9; outer path 1 ends at 13
    # (12 positions from 2), path 2 restarts at 2, so the outer </Parallel> sits at 2 + 12.
    assert build_positions(ids, None, TAGS).tolist() == [
        [0, 1, 2, 3, 4, 5, 6, 7, 5, 6, 7, 8, 9, 10, 11, 12, 13, 2, 3, 4, 14, 15]
    ]
    ok = allowed(build_layout(ids, None, TAGS, "unseen"))[0]
    assert not ok[9, 6] and ok[9, 4] and ok[9, 3]  # inner path 2 sees its outer path, not its sibling
    assert ok[13, 9] and ok[13, 6]  # the inner summary sees both inner paths
    assert not ok[18, 3] and not ok[18, 9] and not ok[18, 14] and ok[18, 1]  # outer path 2 sees none of path 1
    assert ok[21, 18] and ok[21, 9]  # after the block, everything


@pytest.mark.parametrize("left", [False, True])
def test_random_nested_structures_match_the_reference_rule(left):
    rng = random.Random(1)
    nested = 0
    for _ in range(25):
        rows = [random_nested_row(rng) for _ in range(4)]
        rows = [r[: rng.randint(1, len(r))] if r and rng.random() < 0.3 else (r or [10]) for r in rows]
        ids, mask = pad_batch(rows, [left] * len(rows))
        add, pos = build_attention(ids, mask, TAGS, "unseen")
        for b in range(len(rows)):
            real = mask[b].bool().tolist()
            ref_pos, ref_allowed = nested_reference(ids[b].tolist(), real)
            assert pos[b].tolist() == ref_pos, ids[b].tolist()
            assert (add[b, 0] == 0).tolist() == ref_allowed, ids[b].tolist()
        nested += sum(ids.eq(P).cumsum(1).gt(1).any(1).tolist())
    assert nested >= 20  # most batches hold nested blocks


def test_threads_reads_a_nested_row_as_flat_blocks_as_before_nesting():
    """Threads does not nest (its engine refuses max_depth > 1): a <Parallel> inside an open block starts a
    new block of the same level, as every variant read it before nesting existed."""
    row = [10, P, PA, 11, P, PA, 12, EPA, PA, 13, EPA, EP, S, 15, ES, EPA, PA, 16, EPA, EP, 17]
    layout = build_layout(torch.tensor([row]), None, TAGS, "threads")
    assert layout.inner == () and layout.seg.max().item() > 0
    # Read flat, the inner <Parallel> starts block 1, whose second path (3 tokens) is the only copy; nested,
    # the inner block's second path and the outer block's would both be copied.
    assert layout.input_ids.shape[1] == len(row) + 3
