import copy
import dataclasses
from collections import Counter

import pytest
import torch

from parallel_r1.attention import build_attention, build_positions, response_logprobs, structure_ids
from parallel_r1.bans import BAN_MAIN, BAN_NONE, BAN_PATH, BanTable, Behaviour, ban_rows, ban_table
from parallel_r1.engine import ParallelEngine, SamplingParams, output_layer, step_mask
from parallel_r1.format import TagIds
from parallel_r1.rollout import unseen_positions
from parallel_r1.sampler import sample_tokens

PROMPTS = ["Question: Tom has 3 apples and buys 4 more.", "Amy reads 12 pages", "The answer is"]


def with_bias(model, bias: dict[int, float]):
    """Untie the output layer and give it a bias, so the random model opens/closes blocks often."""
    old = model.get_output_embeddings().weight
    head = torch.nn.Linear(old.shape[1], old.shape[0], bias=True)
    with torch.no_grad():
        head.weight.copy_(old)
        head.bias.zero_()
        for token, value in bias.items():
            head.bias[token] = value
    model.lm_head = head
    return model


@pytest.fixture()
def tags(tiny_tokenizer) -> TagIds:
    return TagIds.from_tokenizer(tiny_tokenizer)


@pytest.fixture()
def block_model(tiny_model, tiny_tokenizer, tags):
    eos = tiny_tokenizer.eos_token_id
    return with_bias(tiny_model, {tags.parallel_open: 4.0, tags.path_close: 2.5, tags.summary_close: 3.0, eos: 1.0})


def closed_blocks(rollouts):
    return [b for r in rollouts for b in r.structure.blocks if b.closed]


def scored(model, tags, rollout, variant):
    ids = torch.tensor([rollout.prompt_ids + rollout.response_ids])
    with torch.no_grad():
        logprobs, _ = response_logprobs(model, ids, torch.ones_like(ids), tags, variant, temperature=1.0)
    return logprobs[0, len(rollout.prompt_ids) :]


@pytest.mark.parametrize("num_paths", [2, 3])
def test_unseen_logprobs_match_structured_forward(block_model, tiny_tokenizer, tags, num_paths):
    engine = ParallelEngine(block_model, tiny_tokenizer)
    params = SamplingParams(seed=1, max_response_tokens=96, max_path_tokens=24, num_paths=num_paths)
    rollouts = engine.generate(PROMPTS, n=3, params=params)
    assert [(r.prompt_index, r.sample_index) for r in rollouts] == [(i, j) for i in range(3) for j in range(3)]
    assert len(closed_blocks(rollouts)) >= 3, "the biased model should open and close blocks"
    for r in rollouts:
        sampled = torch.tensor(r.sampled_mask)
        expected = scored(block_model, tags, r, "unseen")
        assert torch.allclose(torch.tensor(r.logprobs)[sampled], expected[sampled], atol=1e-4)
        # The record's critical path is the last position the Unseen layout gives the response, plus one.
        positions = build_positions(torch.tensor([r.prompt_ids + r.response_ids]), None, tags)[0]
        assert unseen_positions(r) == positions[len(r.prompt_ids) :].max().item() + 1 - len(r.prompt_ids)
        assert all(lp == 0.0 for lp, s in zip(r.logprobs, r.sampled_mask) if not s)


def test_each_path_sees_only_the_prefix_and_itself(block_model, tiny_tokenizer, tags):
    """A path of a response's first block: its log-probs equal a plain causal forward over prompt +
    prefix + that path alone (later blocks have earlier paths in their prefix, so no plain forward)."""
    engine = ParallelEngine(block_model, tiny_tokenizer)
    rollouts = engine.generate(PROMPTS, n=2, params=SamplingParams(seed=3, max_response_tokens=80, max_path_tokens=16))
    checked = 0
    for r in rollouts:
        for block in r.structure.blocks[:1]:
            start = block.paths[0].token_span.start  # the first <Path>
            prefix = r.prompt_ids + r.response_ids[:start]
            for path in block.paths:
                span = range(path.token_span.start, path.token_span.end)
                alone = torch.tensor([prefix + [r.response_ids[i] for i in span]])
                with torch.no_grad():
                    logits = block_model(alone).logits[0, len(prefix) - 1 : -1]
                want = torch.log_softmax(logits, -1).gather(1, alone[0, len(prefix) :, None])[:, 0]
                for k, i in enumerate(span):
                    if r.sampled_mask[i]:
                        assert abs(r.logprobs[i] - want[k].item()) < 1e-4
                        checked += 1
    assert checked > 20


def test_fed_positions_follow_the_design(tiny_model, tiny_tokenizer, tags):
    """Every (token, position) the engine feeds is the one attention.build_positions gives."""
    eos = tiny_tokenizer.eos_token_id
    block_model = with_bias(
        tiny_model, {tags.parallel_open: 4.0, tags.path_close: 3.0, tags.summary_close: 3.0, eos: 2.5}
    )
    fed = []

    def record(module, args, kwargs):
        fed.extend(zip(kwargs["input_ids"][0].tolist(), kwargs["position_ids"][0].tolist()))

    handle = block_model.model.register_forward_pre_hook(record, with_kwargs=True)
    engine = ParallelEngine(block_model, tiny_tokenizer)
    for seed in range(30):
        fed.clear()
        (r,) = engine.generate([PROMPTS[0]], params=SamplingParams(seed=seed, max_response_tokens=120))
        if r.finish_reason == "stop" and closed_blocks([r]):
            break
    handle.remove()
    assert r.finish_reason == "stop" and closed_blocks([r])
    ids = torch.tensor([r.prompt_ids + r.response_ids])
    positions = build_positions(ids, None, tags, "unseen")[0].tolist()
    # The final EOS is sampled but never fed; everything else is fed once at its designed position.
    last = (ids[0, -1].item(), positions[-1])
    assert last[0] == eos
    assert Counter(fed) + Counter([last]) == Counter(zip(ids[0].tolist(), positions))


@pytest.mark.parametrize("variant", ["seen", "unseen"])
def test_greedy_matches_generate(tiny_model, tiny_tokenizer, tags, variant):
    engine = ParallelEngine(tiny_model, tiny_tokenizer, max_batch_size=2)
    params = SamplingParams(temperature=0.0, max_response_tokens=24, max_blocks=100, variant=variant)
    rollouts = engine.generate(PROMPTS, params=params)
    for prompt, r in zip(PROMPTS, rollouts):
        ids = torch.tensor([tiny_tokenizer(prompt)["input_ids"]])
        out = tiny_model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=24)
        reference = out[0, ids.shape[1] :].tolist()
        assert not set(reference) & set(tags.as_tuple()), "precondition: greedy text holds no tags"
        assert r.response_ids == reference
        assert all(r.sampled_mask)


def test_greedy_with_blocks_does_not_depend_on_batching(block_model, tiny_tokenizer):
    params = SamplingParams(temperature=0.0, max_response_tokens=64, max_path_tokens=10, num_paths=3)
    one = ParallelEngine(block_model, tiny_tokenizer, max_batch_size=1).generate(PROMPTS, params=params)
    all_ = ParallelEngine(block_model, tiny_tokenizer, max_batch_size=8).generate(PROMPTS, params=params)
    assert closed_blocks(all_)
    assert [r.response_ids for r in one] == [r.response_ids for r in all_]
    for a, b in zip(one, all_):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)


def test_seed_reproduces(block_model, tiny_tokenizer):
    engine = ParallelEngine(block_model, tiny_tokenizer)
    params = SamplingParams(seed=7, max_response_tokens=48, max_path_tokens=12)
    first = engine.generate(PROMPTS, n=2, params=params)
    again = engine.generate(PROMPTS, n=2, params=params)
    other = engine.generate(PROMPTS, n=2, params=SamplingParams(seed=8, max_response_tokens=48, max_path_tokens=12))
    assert [r.response_ids for r in first] == [r.response_ids for r in again]
    assert [r.logprobs for r in first] == [r.logprobs for r in again]
    assert [r.response_ids for r in first] != [r.response_ids for r in other]


def test_seeded_rollouts_do_not_depend_on_the_batch(block_model, tiny_tokenizer, tags):
    """A sample is a function of (seed, key, sample index): alone, in a batch with other prompts, in
    another order, or with another max_batch_size (continuous batching) it comes out the same."""
    params = SamplingParams(seed=11, max_response_tokens=64, max_path_tokens=12, num_paths=3)
    together = ParallelEngine(block_model, tiny_tokenizer, max_batch_size=8).generate(PROMPTS, n=2, params=params)
    assert closed_blocks(together)
    small = ParallelEngine(block_model, tiny_tokenizer, max_batch_size=2)
    refilled = small.generate(PROMPTS, n=2, params=params)
    assert small.stats.forwards > 0 and 0 < small.stats.utilisation <= 1
    reversed_ = small.generate(PROMPTS[::-1], n=2, params=params, keys=[2, 1, 0])
    for i, prompt in enumerate(PROMPTS):
        alone = ParallelEngine(block_model, tiny_tokenizer, max_batch_size=1).generate(
            [prompt], n=2, params=params, keys=[i]
        )
        for j in range(2):
            want = together[2 * i + j]
            for got in (alone[j], refilled[2 * i + j], reversed_[2 * (2 - i) + j]):
                assert got.response_ids == want.response_ids
                assert got.logprobs == pytest.approx(want.logprobs, abs=1e-5)
    other_keys = ParallelEngine(block_model, tiny_tokenizer).generate(PROMPTS, n=2, params=params, keys=[5, 6, 7])
    assert [r.response_ids for r in other_keys] != [r.response_ids for r in together]
    # The two samples of one prompt differ, and so does the same prompt under another key.
    assert together[0].response_ids != together[1].response_ids
    (k0,), (k1,) = (
        ParallelEngine(block_model, tiny_tokenizer).generate([PROMPTS[0]], params=params, keys=[k]) for k in (0, 1)
    )
    assert k0.response_ids != k1.response_ids
    with pytest.raises(ValueError, match="keys"):
        small.generate(PROMPTS, params=params, keys=[0])


def test_unseeded_sampling_is_fresh(block_model, tiny_tokenizer):
    engine = ParallelEngine(block_model, tiny_tokenizer)
    params = SamplingParams(max_response_tokens=40, max_path_tokens=10)
    first, again = (engine.generate(PROMPTS, n=2, params=params) for _ in range(2))
    assert [r.response_ids for r in first] != [r.response_ids for r in again]


def test_threads_summary_sees_the_sequential_text(block_model, tiny_tokenizer, tags):
    """Variant threads: each path's log-probs are a causal forward over prefix + that path alone; every
    other sampled token's log-prob is a plain causal forward over the sequential text (re-prefill at join)."""
    engine = ParallelEngine(block_model, tiny_tokenizer, max_batch_size=4)
    params = SamplingParams(seed=2, max_response_tokens=110, max_path_tokens=14, num_paths=3, variant="threads")
    rollouts = engine.generate(PROMPTS, n=3, params=params)
    assert len(closed_blocks(rollouts)) >= 3
    unseen = engine.generate(PROMPTS, n=3, params=SamplingParams(**{**params.__dict__, "variant": "unseen"}))
    checked_paths = checked_main = 0
    for r, u in zip(rollouts, unseen):
        in_path = [False] * len(r.response_ids)
        for block in r.structure.blocks:
            start = block.paths[0].token_span.start
            prefix = r.prompt_ids + r.response_ids[:start]
            for path in block.paths:
                span = range(path.token_span.start, path.token_span.end)
                alone = torch.tensor([prefix + [r.response_ids[i] for i in span]])
                with torch.no_grad():
                    logits = block_model(alone).logits[0, len(prefix) - 1 : -1]
                want = torch.log_softmax(logits, -1).gather(1, alone[0, len(prefix) :, None])[:, 0]
                for k, i in enumerate(span):
                    in_path[i] = True
                    if r.sampled_mask[i]:
                        assert abs(r.logprobs[i] - want[k].item()) < 1e-4
                        checked_paths += 1
        causal = scored(block_model, tags, r, "seen")
        # ... and the training side scores the whole response alike (attention's threads layout).
        sampled = torch.tensor(r.sampled_mask)
        trained = scored(block_model, tags, r, "threads")
        assert torch.allclose(torch.tensor(r.logprobs)[sampled], trained[sampled], atol=1e-4)
        for i, (lp, sampled) in enumerate(zip(r.logprobs, r.sampled_mask)):
            if sampled and not in_path[i]:
                assert abs(lp - causal[i].item()) < 1e-4
                checked_main += 1
        # Up to the end of the first block's paths, threads samples exactly what unseen samples.
        if r.structure.blocks and u.structure.blocks:
            end = r.structure.blocks[0].paths[-1].token_span.end
            assert r.response_ids[:end] == u.response_ids[:end]
    summaries = [b.summary for r in rollouts for b in r.structure.blocks if b.summary is not None]
    assert checked_paths > 20 and checked_main > 20 and summaries


def search_seeds(generate, found, seeds=range(20)):
    """Rollouts of seed after seed until `found(rollouts)` holds, and whether it did: the invariants are
    checked on every draw and the case under test is searched for, not assumed of one seed's draw."""
    draws = []
    for seed in seeds:
        draws.append(generate(seed))
        if found(draws[-1]):
            return [r for d in draws for r in d], True
    return [r for d in draws for r in d], False


def closed_paths(rollout):
    return [p for b in rollout.structure.blocks for p in b.paths if p.closed]


def test_path_cap_inserts_unsampled_close(tiny_model, tiny_tokenizer, tags):
    model = with_bias(tiny_model, {tags.parallel_open: 5.0, tags.path_close: -5.0})
    engine = ParallelEngine(model, tiny_tokenizer)

    def generate(seed):
        params = SamplingParams(seed=seed, max_response_tokens=60, max_path_tokens=5, num_paths=2)
        return engine.generate(PROMPTS, n=2, params=params)

    def capped(rollouts):
        return any(p.token_span.end - p.token_span.start == 5 for r in rollouts for p in closed_paths(r))

    rollouts, found = search_seeds(generate, capped)
    assert found, "no seed drew a path that ran to the path cap"
    for r in rollouts:
        for p in closed_paths(r):
            span = p.token_span
            assert span.end - span.start <= 5
            if span.end - span.start == 5:
                assert r.response_ids[span.end - 1] == tags.path_close
                assert r.sampled_mask[span.end - 1] is False


def test_eos_inside_a_path_becomes_an_inserted_close(tiny_model, tiny_tokenizer, tags):
    eos = tiny_tokenizer.eos_token_id
    model = with_bias(tiny_model, {tags.parallel_open: 8.0, eos: 3.0})
    engine = ParallelEngine(model, tiny_tokenizer)

    def generate(seed):
        params = SamplingParams(seed=seed, max_response_tokens=64, max_path_tokens=30, num_paths=2)
        return engine.generate(PROMPTS, n=3, params=params)

    def replaced(rollouts):
        # A path closed before its cap by an inserted `</Path>`: the sampler drew EOS there.
        return any(
            p.token_span.end - p.token_span.start < 29 and not r.sampled_mask[p.token_span.end - 1]
            for r in rollouts
            for p in closed_paths(r)
        )

    rollouts, found = search_seeds(generate, replaced)
    assert found, "no seed drew an EOS inside a path"
    for r in rollouts:
        for p in (p for b in r.structure.blocks for p in b.paths):
            assert eos not in r.response_ids[p.token_span.start : p.token_span.end]


@pytest.mark.parametrize("max_blocks", [0, 1])
def test_block_cap_and_response_cap(block_model, tiny_tokenizer, tags, max_blocks):
    engine = ParallelEngine(block_model, tiny_tokenizer)

    def generate(seed):
        params = SamplingParams(seed=seed, max_response_tokens=70, max_path_tokens=8, max_blocks=max_blocks)
        return engine.generate(PROMPTS, n=4, params=params)

    def both_caps(rollouts):
        cut = any(r.finish_reason == "length" for r in rollouts)
        return cut and any(r.response_ids.count(tags.parallel_open) == max_blocks for r in rollouts)

    rollouts, found = search_seeds(generate, both_caps)
    assert found, f"no seed drew a response cut at the length cap with {max_blocks} block(s)"
    for r in rollouts:
        assert r.response_ids.count(tags.parallel_open) <= max_blocks
        assert len(r.response_ids) <= 70
        assert (len(r.response_ids) == 70) == (r.finish_reason == "length")
        if r.finish_reason == "stop":
            assert r.response_ids[-1] == tiny_tokenizer.eos_token_id


def test_output_parses_with_n_paths_and_only_tags_inserted(block_model, tiny_tokenizer, tags):
    params = SamplingParams(seed=5, max_response_tokens=100, max_path_tokens=14, num_paths=3)
    rollouts = ParallelEngine(block_model, tiny_tokenizer).generate(PROMPTS, n=3, params=params)
    assert closed_blocks(rollouts)
    insertable = {tags.path_open, tags.path_close, tags.parallel_close, tags.summary_open}
    for r in rollouts:
        assert len(r.sampled_mask) == len(r.logprobs) == len(r.response_ids)
        assert {t for t, s in zip(r.response_ids, r.sampled_mask) if not s} <= insertable
        assert r.response_ids.count(tags.path_open) == 3 * r.response_ids.count(tags.parallel_open) or (
            r.finish_reason == "length"
        )
        for block in r.structure.blocks:
            if block.closed:
                assert len(block.paths) == 3
                assert all(p.closed for p in block.paths)
        # Only what a cut-off or a model's own choice explains; never a misplaced or missing tag.
        kinds = {e.kind for e in r.structure.errors}
        assert kinds <= {"unclosed_path", "unclosed_block", "unclosed_summary", "empty_path", "empty_summary"}
        if r.finish_reason == "stop":
            assert not kinds & {"unclosed_path", "unclosed_block"}


@pytest.mark.parametrize("variant", ["unseen", "seen"])
def test_open_block_inserts_the_first_parallel_tag_and_keeps_logprobs_exact(tiny_model, tiny_tokenizer, tags, variant):
    # An untrained model essentially never samples <Parallel>; the option opens the block for it.
    params = SamplingParams(seed=4, max_response_tokens=48, max_path_tokens=10, variant=variant, open_block=True)
    rollouts = ParallelEngine(tiny_model, tiny_tokenizer).generate(PROMPTS, n=2, params=params)
    for r in rollouts:
        assert r.response_ids[0] == tags.parallel_open and not r.sampled_mask[0] and r.logprobs[0] == 0.0
        assert r.structure.num_blocks >= 1
        if variant == "unseen":  # the engine forks the paths itself
            assert r.response_ids[1] == tags.path_open and not r.sampled_mask[1]
            assert r.structure.blocks[0].closed or r.finish_reason == "length"
        sampled = torch.tensor(r.sampled_mask)
        expected = scored(tiny_model, tags, r, variant)
        assert torch.allclose(torch.tensor(r.logprobs)[sampled], expected[sampled], atol=1e-4)
    with pytest.raises(ValueError, match="open_block needs max_blocks >= 1"):
        SamplingParams(open_block=True, max_blocks=0)


def test_seen_logprobs_match_causal_forward(block_model, tiny_tokenizer, tags):
    params = SamplingParams(seed=2, max_response_tokens=64, variant="seen", max_blocks=2)
    rollouts = ParallelEngine(block_model, tiny_tokenizer).generate(PROMPTS, n=2, params=params)
    assert any(tags.parallel_open in r.response_ids for r in rollouts)
    for r in rollouts:
        assert all(r.sampled_mask)
        assert r.response_ids.count(tags.parallel_open) <= 2
        expected = scored(block_model, tags, r, "seen")
        assert torch.allclose(torch.tensor(r.logprobs), expected, atol=1e-4)


def test_step_mask_equals_build_attention(tiny_tokenizer, tags):
    text = "a b<Parallel><Path>x y</Path><Path>z</Path></Parallel><Summary>s</Summary>c<Parallel><Path>u"
    ids = torch.tensor([[tiny_tokenizer.pad_token_id] * 3 + tiny_tokenizer(text)["input_ids"]])
    real = ids != tiny_tokenizer.pad_token_id
    block, path = (ids_BT[..., None] for ids_BT in structure_ids(ids, tags, real.long()))
    expected, _ = build_attention(ids, real.long(), tags, "unseen")
    assert torch.equal(step_mask(real, block, path, ids.shape[1], torch.float32), expected)
    # The last 4 queries against the full key set are the last 4 rows of the full mask.
    assert torch.equal(step_mask(real, block, path, 4, torch.float32), expected[:, :, -4:])


def test_sampling_bans_tags_but_records_unbanned_logprob(tags):
    vocab = 20
    logits = torch.zeros(3, vocab)
    logits[:, tags.parallel_open] = 10.0
    logits[:, tags.path_close] = 9.0
    logits[:, 11] = 8.0
    table = ban_table(tags, vocab, torch.device("cpu"))
    banned = table[torch.tensor([BAN_NONE, BAN_MAIN, BAN_PATH])]
    tokens, logprobs, _ = sample_tokens(logits, banned, SamplingParams(temperature=0.5, top_k=1), torch.Generator())
    assert tokens.tolist() == [tags.parallel_open, tags.parallel_open, tags.path_close]
    expected = torch.log_softmax(logits / 0.5, -1)[torch.arange(3), tokens]
    assert torch.allclose(logprobs, expected)
    path_tokens = sample_tokens(
        logits[:1].expand(200, -1), table[BAN_PATH].expand(200, -1), SamplingParams(top_p=0.9), torch.Generator()
    )[0]
    assert set(path_tokens.tolist()) <= {tags.path_close, 11}


def test_bad_params_are_rejected():
    with pytest.raises(ValueError, match="num_paths"):
        SamplingParams(num_paths=1)
    with pytest.raises(ValueError, match="variant"):
        SamplingParams(variant="tree")


def test_generate_command_writes_jsonl_and_shows_paths(tiny_model, tiny_tokenizer, tmp_path, capsys):
    import json

    from parallel_r1.cli import main

    tiny_model.save_pretrained(tmp_path / "model")
    tiny_tokenizer.save_pretrained(tmp_path / "model")
    out = tmp_path / "rollouts.jsonl"
    argv = ["generate", "--model", str(tmp_path / "model"), "--prompt", "3 + 4 =", "--prompt", "5 + 6 =", "--n", "2"]
    assert main([*argv, "--max-response-tokens", "24", "--num-paths", "3", "--jsonl", str(out)]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["prompt_index"], r["sample_index"]) for r in records] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert records[2]["prompt"] == "5 + 6 ="
    for r in records:
        assert len(r["response_ids"]) == len(r["sampled_mask"]) == len(r["logprobs"]) <= 24
    assert "prompt 1 sample 1" in capsys.readouterr().out
    # --open-block: the untrained model's responses each begin with a forked block of three paths
    assert main([*argv, "--max-response-tokens", "40", "--num-paths", "3", "--open-block", "--jsonl", str(out)]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert all(r["response"].startswith("<Parallel><Path>") and r["paths_per_block"][0] == 3 for r in records)
    assert "block 1 path 3" in capsys.readouterr().out


@pytest.mark.parametrize("bias", [True, False])
def test_chunked_output_layer_equals_the_layer(bias):
    head = torch.nn.Linear(16, 10_000, bias=bias)
    hidden = torch.randn(5, 16)
    with torch.no_grad():
        assert torch.allclose(output_layer(head, hidden, chunk=1024), head(hidden), atol=1e-5)
        assert torch.equal(output_layer(head, hidden[:1], chunk=1024), head(hidden[:1]))


@pytest.mark.parametrize("variant", ["seen", "unseen", "threads"])
@pytest.mark.parametrize("top_k, top_p", [(0, 1.0), (8, 0.9)])
def test_replayed_logprobs_are_those_of_the_distribution_sampled_from(
    block_model, tiny_tokenizer, tags, variant, top_k, top_p
):
    engine = ParallelEngine(block_model, tiny_tokenizer, behaviour_logprobs=True)
    params = SamplingParams(
        seed=5, variant=variant, max_response_tokens=96, max_path_tokens=20, max_blocks=1, top_k=top_k, top_p=top_p
    )
    rollouts = engine.generate(PROMPTS, n=2, params=params)
    assert closed_blocks(rollouts) or variant == "seen"
    table = ban_table(tags, block_model.config.vocab_size, torch.device("cpu"))
    removed = []
    for r in rollouts:
        ids = torch.tensor([r.prompt_ids + r.response_ids])
        rows = [0] * len(r.prompt_ids) + ban_rows(r.response_ids, tags, variant, params.max_blocks)
        behaviour = Behaviour(torch.tensor([rows]), table, top_k, top_p)
        with torch.no_grad():
            replayed, _ = response_logprobs(block_model, ids, torch.ones_like(ids), tags, variant, behaviour=behaviour)
            unwarped = scored(block_model, tags, r, variant)
        replayed = replayed[0, len(r.prompt_ids) :]
        sampled = torch.tensor(r.sampled_mask)
        assert torch.allclose(torch.tensor(r.logprobs)[sampled], replayed[sampled], atol=1e-4)
        removed.append((replayed - unwarped)[sampled].abs().max())
    # the bans (and top-k/top-p) move real probability mass on this model: the check has teeth
    assert max(removed) > 1e-3


# ------------------------------------------------------------------------------------------------
# Planned blocks: the model writes a plan after <Parallel>, one line per path; the engine forks one path
# per line, each starting with its line (inserted).

PLAN_PARAMS = dict(seed=1, max_response_tokens=120, max_path_tokens=24, plans=True, max_paths=3)


@pytest.fixture()
def plan_model(tiny_model, tiny_tokenizer, tags):
    """A biased model that opens blocks and writes plans of a few lines (newlines, and <Path> to end them)."""
    newline = tiny_tokenizer.encode("\n")[0]
    bias = {tags.parallel_open: 4.0, tags.path_close: 2.5, tags.summary_close: 3.0, tiny_tokenizer.eos_token_id: 1.0}
    return with_bias(tiny_model, {**bias, newline: 3.0, tags.path_open: 2.0})


def planned_blocks(rollout, lines):
    """(plan token ids, [path token ids]) of each closed block of a planned rollout."""
    out = []
    for block in rollout.structure.blocks:
        if not block.closed:
            continue
        open_index = block.token_span.start
        first = block.paths[0].token_span.start
        paths = [rollout.response_ids[p.token_span.start : p.token_span.end] for p in block.paths]
        out.append((rollout.response_ids[open_index + 1 : first], paths, first))
    return out


@pytest.mark.parametrize("variant", ["unseen", "threads", "seen"])
def test_planned_logprobs_equal_the_training_forward(plan_model, tiny_tokenizer, tags, variant):
    """A variable number of paths per block (the plan's lines), sampled log-probs equal to the trainer's."""
    engine = ParallelEngine(plan_model, tiny_tokenizer, max_batch_size=4)
    rollouts = engine.generate(PROMPTS, n=4, params=SamplingParams(**PLAN_PARAMS, variant=variant))
    for r in rollouts:
        sampled = torch.tensor(r.sampled_mask)
        expected = scored(plan_model, tags, r, variant)
        assert torch.allclose(torch.tensor(r.logprobs)[sampled], expected[sampled], atol=1e-4)
    if variant == "seen":
        return
    counts = Counter(k for r in rollouts for b in r.structure.blocks if b.closed for k in [len(b.paths)])
    assert len(counts) >= 2 and set(counts) <= {1, 2, 3}, counts


def test_planned_paths_start_with_their_plan_line(plan_model, tiny_tokenizer, tags):
    engine = ParallelEngine(plan_model, tiny_tokenizer)
    rollouts = engine.generate(PROMPTS, n=4, params=SamplingParams(**PLAN_PARAMS))
    lines = engine.plan_lines
    seen_cap = seen_sampled_open = 0
    for r in rollouts:
        for plan, paths, first in planned_blocks(r, lines):
            heads = lines.lines(plan) or [[]]
            assert len(paths) == len(heads) <= 3
            for path, head in zip(paths, heads):
                assert path[0] == tags.path_open and path[1 : 1 + len(head)] == head
            # plan tokens are sampled, copies and later <Path>s inserted, all at the path's positions
            assert all(r.sampled_mask[first - len(plan) : first])
            starts = [first + sum(len(p) for p in paths[:j]) for j in range(len(paths))]
            for start, head in zip(starts, heads):
                assert not any(r.sampled_mask[start + 1 : start + 1 + len(head)])
            assert not any(r.sampled_mask[s] for s in starts[1:])
            # the first <Path> is the model's unless the plan reached max_paths lines (then it is inserted)
            capped = lines.ends_line(plan[-1]) and len(heads) == 3
            assert r.sampled_mask[first] == (not capped)
            seen_cap += capped
            seen_sampled_open += not capped
    assert seen_cap and seen_sampled_open


def test_planned_paths_are_told_apart_by_their_lines(plan_model, tiny_tokenizer, tags):
    """Unseen paths of one block each see the plan (shared prefix) and their own line: paths whose lines
    differ get different next-token distributions (they were exchangeable without plans)."""
    engine = ParallelEngine(plan_model, tiny_tokenizer)
    rollouts = engine.generate(PROMPTS, n=4, params=SamplingParams(**PLAN_PARAMS))
    lines, compared = engine.plan_lines, 0
    for r in rollouts:
        for plan, paths, first in planned_blocks(r, lines):
            heads = lines.lines(plan)
            if len(paths) < 2 or heads[0] == heads[1] or not heads[0] or not heads[1]:
                continue
            prefix = r.prompt_ids + r.response_ids[:first]
            after = []
            for path, head in zip(paths[:2], heads[:2]):
                ids = torch.tensor([prefix + path[: 1 + len(head)]])
                with torch.no_grad():
                    after.append(plan_model(ids).logits[0, -1])
            assert not torch.allclose(after[0], after[1])
            compared += 1
    assert compared


def test_planned_cap_and_behaviour_logprobs(plan_model, tiny_tokenizer, tags):
    """max_paths=1: every plan is closed after its first line; behaviour log-probs replay BAN_PLAN."""
    engine = ParallelEngine(plan_model, tiny_tokenizer, behaviour_logprobs=True)
    params = SamplingParams(**{**PLAN_PARAMS, "max_paths": 1, "top_k": 8})
    rollouts = engine.generate(PROMPTS, n=3, params=params)
    table = ban_table(tags, plan_model.config.vocab_size, torch.device("cpu"))
    blocks = 0
    for r in rollouts:
        blocks += sum(len(b.paths) == 1 for b in r.structure.blocks if b.closed)
        assert all(len(b.paths) <= 1 for b in r.structure.blocks)
        ids = torch.tensor([r.prompt_ids + r.response_ids])
        rows = [0] * len(r.prompt_ids) + ban_rows(r.response_ids, tags, "unseen", params.max_blocks, plans=True)
        behaviour = Behaviour(torch.tensor([rows]), table, params.top_k, 1.0)
        with torch.no_grad():
            replayed, _ = response_logprobs(plan_model, ids, torch.ones_like(ids), tags, "unseen", behaviour=behaviour)
        sampled = torch.tensor(r.sampled_mask)
        assert torch.allclose(torch.tensor(r.logprobs)[sampled], replayed[0, len(r.prompt_ids) :][sampled], atol=1e-4)
    assert blocks >= 2


def _repeated_heads(rollouts, lines) -> tuple[int, int]:
    """(plans with two lines that start with the same token, plans of two lines or more)."""
    repeated = plans = 0
    for r in rollouts:
        for plan, _, _ in planned_blocks(r, lines):
            heads = [line[0] for line in lines.lines(plan)]
            plans += len(heads) >= 2
            repeated += len(set(heads)) < len(heads)
    return repeated, plans


def test_distinct_plans_never_start_two_lines_alike_and_replay_exactly(plan_model, tiny_tokenizer, tags):
    """distinct_plans: no plan has two lines with the same first token (the same model repeats them without
    it), and behaviour log-probs, the plan-dependent bans included, are what the trainer replays."""
    plan_model = copy.deepcopy(plan_model)
    with torch.no_grad():
        plan_model.lm_head.bias[tiny_tokenizer.encode("6")[0]] = 3.0  # lines that start with 6, often
    params = SamplingParams(**{**PLAN_PARAMS, "top_k": 8, "distinct_plans": True})
    engine = ParallelEngine(plan_model, tiny_tokenizer)
    free = engine.generate(PROMPTS, n=8, params=dataclasses.replace(params, distinct_plans=False))
    assert _repeated_heads(free, engine.plan_lines)[0] >= 2
    engine = ParallelEngine(plan_model, tiny_tokenizer, behaviour_logprobs=True)
    rollouts = engine.generate(PROMPTS, n=8, params=params)
    repeated, plans = _repeated_heads(rollouts, engine.plan_lines)
    assert repeated == 0 and plans >= 3
    table = BanTable(tags, plan_model.config.vocab_size, torch.device("cpu"))
    for r in rollouts:
        ids = torch.tensor([r.prompt_ids + r.response_ids])
        distinct = (engine.plan_lines, table)
        rows = ban_rows(r.response_ids, tags, "unseen", params.max_blocks, plans=True, distinct_plans=distinct)
        behaviour = Behaviour(torch.tensor([[0] * len(r.prompt_ids) + rows]), table.table, params.top_k, 1.0)
        with torch.no_grad():
            replayed, _ = response_logprobs(plan_model, ids, torch.ones_like(ids), tags, "unseen", behaviour=behaviour)
        sampled = torch.tensor(r.sampled_mask)
        assert torch.allclose(torch.tensor(r.logprobs)[sampled], replayed[0, len(r.prompt_ids) :][sampled], atol=1e-4)


# ----------------------------------------------------------------------------- nested blocks


ENGINE_PREVENTS = {
    "nested_block", "stray_close", "path_outside_block", "summary_out_of_place", "text_before_summary",
    "text_between_paths", "text_in_block", "too_few_paths",
}  # fmt: skip


def _nested_rollouts(model, tokenizer, variant, max_depth, behaviour=False):
    params = SamplingParams(
        seed=2, variant=variant, max_response_tokens=140, max_path_tokens=30, num_paths=2, max_blocks=6,
        max_depth=max_depth,
    )  # fmt: skip
    return ParallelEngine(model, tokenizer, behaviour_logprobs=behaviour).generate(PROMPTS, n=3, params=params), params


@pytest.mark.parametrize("max_depth", [2, 3])
def test_nested_unseen_blocks_are_sampled_as_they_are_trained(block_model, tiny_tokenizer, tags, max_depth):
    """A path opens blocks of its own up to max_depth; what the engine records is what the Unseen trainer
    computes on the sequential row (float32, the stated bound), every response well formed at its depth."""
    rollouts, _ = _nested_rollouts(block_model, tiny_tokenizer, "unseen", max_depth)
    depths = [r.structure.depth for r in rollouts]
    assert max(depths) == max_depth, depths
    for r in rollouts:
        # The engine never misplaces a tag; what is left is the model's (an empty path, an answer in a summary)
        # or the cut of a row at max_response_tokens.
        assert not {e.kind for e in r.structure.errors} & ENGINE_PREVENTS, r.structure.errors
        sampled = torch.tensor(r.sampled_mask)
        expected = scored(block_model, tags, r, "unseen")
        assert torch.allclose(torch.tensor(r.logprobs)[sampled], expected[sampled], atol=1e-4)
        # The record's critical path is the last position the Unseen layout gives the response, plus one.
        positions = build_positions(torch.tensor([r.prompt_ids + r.response_ids]), None, tags)[0]
        assert unseen_positions(r) == positions[len(r.prompt_ids) :].max().item() + 1 - len(r.prompt_ids)


def test_nested_blocks_replay_their_bans_exactly_in_float64(block_model, tiny_model, tiny_tokenizer, tags):
    """In float64, with the bans replayed (`ban_rows`, BAN_PATH_NEST included), engine and trainer agree to
    1e-9 on nested Unseen blocks and on nested Seen text (a model that also favours <Path>, which Seen
    decodes itself)."""
    seen_bias = {tags.parallel_open: 3.0, tags.path_open: 3.0, tags.path_close: 2.0, tags.parallel_close: 1.5}
    seen_model = with_bias(copy.deepcopy(tiny_model), {**seen_bias, tags.summary_open: 3.0, tags.summary_close: 2.0})
    try:
        for variant, model in (("unseen", block_model), ("seen", seen_model)):
            model64 = model.double()
            rollouts, params = _nested_rollouts(model64, tiny_tokenizer, variant, 2, behaviour=True)
            assert max(r.structure.depth for r in rollouts) == 2, variant
            table = ban_table(tags, model64.config.vocab_size, torch.device("cpu"))
            for r in rollouts:
                rows = ban_rows(r.response_ids, tags, variant, params.max_blocks, max_depth=params.max_depth)
                replay = Behaviour(torch.tensor([[0] * len(r.prompt_ids) + rows]), table)
                ids = torch.tensor([r.prompt_ids + r.response_ids])
                with torch.no_grad():
                    logprobs, _ = response_logprobs(model64, ids, torch.ones_like(ids), tags, variant, behaviour=replay)
                sampled = torch.tensor(r.sampled_mask)
                gap = (torch.tensor(r.logprobs, dtype=torch.float64) - logprobs[0, len(r.prompt_ids) :])[sampled]
                assert gap.abs().max() <= 1e-9, (variant, gap.abs().max())
    finally:
        block_model.float()
        seen_model.float()


def test_past_max_depth_a_path_cannot_open_a_block(block_model, tiny_tokenizer, tags):
    """At the cap <Parallel> is banned inside a path (Seen bans nothing else: a <Parallel> between paths or in
    a summary stays the model's mistake)."""
    for variant in ("unseen", "seen"):
        for max_depth in (1, 2):
            rollouts, _ = _nested_rollouts(block_model, tiny_tokenizer, variant, max_depth)
            errors = [e for r in rollouts for e in r.structure.errors if e.kind == "nested_block"]
            in_a_path = [e for e in errors if e.message.startswith("<Parallel> inside a path")]
            if variant == "unseen" or max_depth > 1:
                assert all(r.structure.depth <= max_depth for r in rollouts) and not in_a_path
            else:  # Seen without nesting leaves <Parallel> in a path to the model, as before nesting existed
                assert in_a_path


def test_nesting_is_refused_where_it_is_not_supported():
    with pytest.raises(ValueError, match="threads variant does not nest"):
        SamplingParams(variant="threads", max_depth=2)
    with pytest.raises(ValueError, match="do not take plans"):
        SamplingParams(max_depth=2, plans=True)
    with pytest.raises(ValueError, match="max_depth must be >= 1"):
        SamplingParams(max_depth=0)
