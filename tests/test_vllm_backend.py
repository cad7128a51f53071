import importlib.util

import pytest
import torch

from parallel_r1.format import TagIds
from parallel_r1.rollout import SamplingParams
from parallel_r1.vllm_backend import Completion, Request, VLLMEngine


class Scripted(VLLMEngine):
    """The backend's control logic with vLLM replaced by scripted completions."""

    def __init__(self, tokenizer, script):
        super().__init__(object(), tokenizer)
        self.script, self.requests = list(script), []

    def run(self, requests: list[Request], params) -> list[Completion]:
        self.requests.append(requests)
        return [self.script.pop(0) for _ in requests]


def done(ids, reason="stop"):
    return Completion(list(ids), [-0.5] * len(ids), reason)


def test_unseen_block_is_laid_out_sequentially_with_inserted_tags(tiny_tokenizer):
    t = TagIds.from_tokenizer(tiny_tokenizer)
    eos = tiny_tokenizer.eos_token_id
    a, b, c, d = tiny_tokenizer.convert_tokens_to_ids(["a", "b", "c", "d"])
    engine = Scripted(
        tiny_tokenizer,
        [
            done([a, t.parallel_open]),  # main thread opens a block
            done([b, t.path_close]),  # path 1 closes itself
            done([c, eos]),  # path 2 ends with EOS: dropped, </Path> inserted
            done([d, t.summary_close]),  # summary
            done([a, eos]),  # main thread ends
        ],
    )
    params = SamplingParams(seed=0, max_path_tokens=10, num_paths=2)
    (r,) = engine.generate([[a, b]], params=params)
    assert r.response_ids == [
        a, t.parallel_open,
        t.path_open, b, t.path_close,
        t.path_open, c, t.path_close,
        t.parallel_close, t.summary_open, d, t.summary_close, a, eos,
    ]  # fmt: skip
    assert r.sampled_mask == [True, True, False, True, True, False, True, False, False, False, True, True, True, True]
    assert all(lp == (-0.5 if s else 0.0) for lp, s in zip(r.logprobs, r.sampled_mask))
    assert r.finish_reason == "stop" and r.structure.well_formed
    paths = engine.requests[1]
    assert [p.prompt_ids for p in paths] == [[a, b, a, t.parallel_open, t.path_open]] * 2
    assert all(p.stop_token_ids == [t.path_close] and p.max_tokens == 8 for p in paths)
    assert t.path_close not in paths[0].banned and t.parallel_open in paths[0].banned
    summary = engine.requests[2][0]
    assert summary.prompt_ids == [a, b] + r.response_ids[:10] and summary.stop_token_ids == [t.summary_close]


def test_path_cap_block_cap_and_response_cap(tiny_tokenizer):
    t = TagIds.from_tokenizer(tiny_tokenizer)
    a = tiny_tokenizer.convert_tokens_to_ids("a")
    engine = Scripted(
        tiny_tokenizer,
        [
            done([t.parallel_open]),
            done([a, a, a], "length"),  # hits the path cap: </Path> appended, not sampled
            done([a, t.path_close]),
            done([t.summary_close]),
            done([a] * 8, "length"),  # block cap reached: no stop at <Parallel>, runs into the response cap
        ],
    )
    params = SamplingParams(seed=0, max_path_tokens=5, max_blocks=1, max_response_tokens=20)
    (r,) = engine.generate([[a]], params=params)
    first_path = r.structure.blocks[0].paths[0].token_span
    assert r.response_ids[first_path.start : first_path.end] == [t.path_open, a, a, a, t.path_close]
    assert r.sampled_mask[first_path.end - 1] is False
    last = engine.requests[-1][0]
    assert last.stop_token_ids == [] and t.parallel_open in last.banned and last.max_tokens == 8
    assert r.finish_reason == "length" and len(r.response_ids) == 20


def test_seen_counts_blocks_and_bans_parallel_at_the_cap(tiny_tokenizer):
    t = TagIds.from_tokenizer(tiny_tokenizer)
    eos = tiny_tokenizer.eos_token_id
    a = tiny_tokenizer.convert_tokens_to_ids("a")
    engine = Scripted(tiny_tokenizer, [done([a, t.parallel_open]), done([t.path_open, a, eos])])
    (r,) = engine.generate([[a]], params=SamplingParams(variant="seen", max_blocks=1))
    assert r.response_ids == [a, t.parallel_open, t.path_open, a, eos] and all(r.sampled_mask)
    assert engine.requests[0][0].stop_token_ids == [t.parallel_open] and engine.requests[0][0].banned == []
    assert engine.requests[1][0].banned == [t.parallel_open]


def test_open_block_starts_every_response_in_its_paths(tiny_tokenizer):
    t = TagIds.from_tokenizer(tiny_tokenizer)
    eos = tiny_tokenizer.eos_token_id
    a, b = tiny_tokenizer.convert_tokens_to_ids(["a", "b"])
    script = [done([a, t.path_close]), done([b, t.path_close]), done([a, t.summary_close]), done([eos])]
    engine = Scripted(tiny_tokenizer, script)
    (r,) = engine.generate([[a]], params=SamplingParams(open_block=True, max_blocks=1))
    assert [p.prompt_ids for p in engine.requests[0]] == [[a, t.parallel_open, t.path_open]] * 2
    assert r.response_ids[:3] == [t.parallel_open, t.path_open, a] and r.sampled_mask[:3] == [False, False, True]
    assert r.structure.well_formed and r.structure.num_blocks == 1
    # the forced block counts towards the cap: the main thread after it may not open another
    assert t.parallel_open in engine.requests[2][0].banned


class StockEngine(VLLMEngine):
    """The backend's control logic on a stand-in for vLLM that, like any stock engine, sees each request as
    plain token ids: it decodes them with a causal forward of `model` and reports raw full-vocabulary
    log-probs of what it samples."""

    def __init__(self, model, tokenizer):
        super().__init__(object(), tokenizer)
        self.model = model

    @torch.no_grad()
    def run(self, requests: list[Request], params) -> list[Completion]:
        completions = []
        for r in requests:
            generator = torch.Generator().manual_seed(r.seed)
            ids, out, logprobs, reason = list(r.prompt_ids), [], [], "length"
            while len(out) < r.max_tokens:
                logits = self.model(torch.tensor([ids])).logits[0, -1].float()
                scores = logits.clone()
                scores[r.banned] = float("-inf")
                token = torch.multinomial(torch.softmax(scores, -1), 1, generator=generator).item()
                ids.append(token), out.append(token), logprobs.append(torch.log_softmax(logits, -1)[token].item())
                if token in r.stop_token_ids or token == self.tokenizer.eos_token_id:
                    reason = "stop"
                    break
            completions.append(Completion(out, logprobs, reason))
        return completions


@pytest.mark.parametrize("variant", ["threads", "unseen"])
def test_threads_training_scores_exactly_what_a_stock_engine_sampled(tiny_model, tiny_tokenizer, variant):
    from parallel_r1.attention import response_logprobs

    t = TagIds.from_tokenizer(tiny_tokenizer)
    engine = StockEngine(tiny_model, tiny_tokenizer)
    params = SamplingParams(
        variant=variant, seed=3, open_block=True, num_paths=3, max_path_tokens=8, max_response_tokens=40
    )
    gaps = []
    for r in engine.generate(["Question: Tom has 3 apples", "Amy reads"], n=2, params=params):
        assert r.structure.num_blocks >= 1 and len(r.structure.blocks[0].paths) == 3
        ids = torch.tensor([r.prompt_ids + r.response_ids])
        with torch.no_grad():
            lp, _ = response_logprobs(tiny_model, ids, torch.ones_like(ids), t, variant=variant)
        sampled = torch.tensor(r.sampled_mask)
        gaps.append((lp[0, len(r.prompt_ids) :][sampled] - torch.tensor(r.logprobs)[sampled]).abs().max().item())
    if variant == "threads":
        assert max(gaps) <= 1e-4, gaps  # on-policy by construction
    else:
        assert max(gaps) > 1e-2, gaps  # the reference's flaw: the summary was sampled from another context


def test_planned_block_forks_one_path_per_plan_line(tiny_tokenizer):
    t = TagIds.from_tokenizer(tiny_tokenizer)
    eos = tiny_tokenizer.eos_token_id
    a, b, c = tiny_tokenizer.convert_tokens_to_ids(["a", "b", "c"])
    nl = tiny_tokenizer.encode("\n")[0]
    engine = Scripted(
        tiny_tokenizer,
        [
            done([a, t.parallel_open]),  # main thread opens a block
            done([b, nl, c, t.path_open]),  # the plan: two lines, then the model's own <Path>
            done([a, t.path_close]),
            done([a, t.path_close]),
            done([a, t.summary_close]),
            done([t.parallel_open]),  # a second block, whose plan runs past max_paths = 2 lines
            done([a, nl, b, nl, c, nl, t.path_open]),  # cut after "b\n": c and the <Path> are dropped
            done([c, t.path_close]),
            done([c, t.path_close]),
            done([b, t.summary_close]),
            done([eos]),
        ],
    )
    params = SamplingParams(seed=0, max_path_tokens=10, plans=True, max_paths=2)
    (r,) = engine.generate([[a]], params=params)
    plan = engine.requests[1][0]
    assert plan.stop_token_ids == [t.path_open] and t.path_open not in plan.banned and t.path_close in plan.banned
    paths = engine.requests[2]
    prefix = [a, a, t.parallel_open, b, nl, c, t.path_open]
    assert [p.prompt_ids for p in paths] == [prefix + [b], prefix + [c]]
    assert all(p.max_tokens == 7 for p in paths)
    first = [a, t.parallel_open, b, nl, c, t.path_open, b, a, t.path_close, t.path_open, c, a, t.path_close]
    assert r.response_ids[: len(first)] == first
    assert r.sampled_mask[: len(first)] == [True] * 6 + [False, True, True, False, False, True, True]
    assert r.logprobs[5] == -0.5  # the sampled <Path> keeps its log-prob
    second = r.structure.blocks[1]
    assert r.response_ids[second.token_span.start : second.paths[0].token_span.start + 2] == [
        t.parallel_open, a, nl, b, nl, t.path_open, a,
    ]  # fmt: skip
    assert r.sampled_mask[second.paths[0].token_span.start] is False  # the engine closed that plan
    assert r.structure.paths_per_block == [2, 2] and r.structure.well_formed


def test_planned_threads_are_on_policy_under_a_stock_engine(tiny_model, tiny_tokenizer):
    from parallel_r1.attention import response_logprobs

    t = TagIds.from_tokenizer(tiny_tokenizer)
    engine = StockEngine(tiny_model, tiny_tokenizer)
    params = SamplingParams(
        variant="threads", seed=3, open_block=True, plans=True, max_paths=3, max_path_tokens=8, max_response_tokens=40
    )
    gaps, counts = [], set()
    for r in engine.generate(["Question: Tom has 3 apples", "Amy reads"], n=2, params=params):
        counts |= {len(b.paths) for b in r.structure.blocks if b.closed}
        ids = torch.tensor([r.prompt_ids + r.response_ids])
        with torch.no_grad():
            lp, _ = response_logprobs(tiny_model, ids, torch.ones_like(ids), t, variant="threads")
        sampled = torch.tensor(r.sampled_mask)
        gaps.append((lp[0, len(r.prompt_ids) :][sampled] - torch.tensor(r.logprobs)[sampled]).abs().max().item())
    assert counts and counts <= {1, 2, 3}
    assert max(gaps) <= 1e-4, gaps  # the plan, each path with its line, the summary: all on-policy


def test_an_in_memory_torch_model_is_refused(tiny_model, tiny_tokenizer):
    with pytest.raises(TypeError, match="directory"):
        VLLMEngine(tiny_model, tiny_tokenizer)


needs_vllm = pytest.mark.skipif(
    importlib.util.find_spec("vllm") is None or not torch.cuda.is_available(), reason="needs vllm and a CUDA device"
)


@pytest.mark.gpu
@needs_vllm
def test_vllm_generates_parsable_blocks(tiny_model, tiny_tokenizer, tmp_path):
    from parallel_r1.backends import make_engine

    tiny_model.save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)
    engine = make_engine("vllm", str(tmp_path), tiny_tokenizer)
    params = SamplingParams(seed=0, max_response_tokens=96, max_path_tokens=16, num_paths=3)
    rollouts = engine.generate(["Question: Tom has 3 apples", "Amy reads"], n=4, params=params)
    assert len(rollouts) == 8
    for r in rollouts:
        assert len(r.response_ids) <= 96
        for block in r.structure.blocks:
            if block.closed:
                assert len(block.paths) == 3
                assert all(p.token_span.end - p.token_span.start <= 16 for p in block.paths)


def test_load_weights_reaches_the_engines_model_and_drops_the_prefix_cache(tiny_tokenizer):
    from types import SimpleNamespace

    loaded, resets = [], []
    model = SimpleNamespace(load_weights=lambda named: loaded.extend(named))
    worker = SimpleNamespace(worker=SimpleNamespace(model_runner=SimpleNamespace(model=model)))
    llm = SimpleNamespace(
        llm_engine=SimpleNamespace(model_executor=SimpleNamespace(driver_worker=worker)),
        reset_prefix_cache=lambda: resets.append(True),
    )
    engine = VLLMEngine(llm, tiny_tokenizer)
    weight = torch.ones(2)
    engine.load_weights({"lm_head.weight": weight}.items())
    assert loaded == [("lm_head.weight", weight)] and resets == [True]


def test_make_engine_knows_two_backends(tiny_model, tiny_tokenizer):
    from parallel_r1.backends import make_engine
    from parallel_r1.engine import ParallelEngine

    assert isinstance(make_engine("hf", tiny_model, tiny_tokenizer, max_batch_size=4), ParallelEngine)
    with pytest.raises(ValueError, match="backend must be one of hf, vllm"):
        make_engine("tpu", tiny_model, tiny_tokenizer)
