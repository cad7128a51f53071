import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

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


# Against real vLLM (`-m vllm`; skipped where vLLM is not installed). On CPU that is vLLM's CPU backend,
# which bench/build_vllm_cpu.sh builds from source (docs/engine.md); vLLM's CPU attention needs a head
# size that is a multiple of 16 (32 for its fastest path), hence 2 heads of 32 in the tiny model here.
needs_vllm = pytest.mark.skipif(
    importlib.util.find_spec("vllm") is None, reason="needs vllm (bench/build_vllm_cpu.sh builds it for CPU)"
)
VLLM_DIMS = {"hidden_size": 64, "num_layers": 2, "num_heads": 2, "intermediate_size": 128}
# The CPU backend sizes its KV cache from VLLM_CPU_KVCACHE_SPACE (GiB), not from a share of the memory.
VLLM_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
VLLM_KWARGS = {"dtype": "float32", "enforce_eager": True, "max_model_len": 512, "seed": 0}
PROMPTS = ["Question: Tom has 3 apples", "Amy reads"]


def vllm_model(tokenizer, seed: int = 0):
    from parallel_r1.tiny import build_model

    return build_model(tokenizer, **VLLM_DIMS, seed=seed).eval()


@pytest.fixture(scope="module")
def real_vllm(tiny_tokenizer, tmp_path_factory):
    """(the tiny model, its folder, a colocated VLLMEngine on it): one engine for the module (it takes
    seconds to start); a test that loads other weights puts the model's own back."""
    from parallel_r1.models import save_model

    with pytest.MonkeyPatch.context() as patch:
        for key, value in VLLM_ENV.items():
            patch.setenv(key, value)
        model = vllm_model(tiny_tokenizer)
        folder = save_model(model, tiny_tokenizer, tmp_path_factory.mktemp("vllm") / "tiny")
        engine = VLLMEngine.colocated(folder, tiny_tokenizer, **VLLM_KWARGS)
        yield model, folder, engine


def logprob_gaps(model, tokenizer, rollouts, variant: str, temperature: float = 1.0) -> torch.Tensor:
    """sampler log-prob - trainer log-prob of every sampled token (signed), the trainer being
    `attention.response_logprobs` under `variant` at `temperature` on the rollout's canonical layout."""
    from parallel_r1.attention import response_logprobs

    tags, gaps = TagIds.from_tokenizer(tokenizer), []
    for r in rollouts:
        ids = torch.tensor([r.prompt_ids + r.response_ids])
        with torch.no_grad():
            lp, _ = response_logprobs(model, ids, torch.ones_like(ids), tags, variant=variant, temperature=temperature)
        sampled = torch.tensor(r.sampled_mask)
        gaps.append(torch.tensor(r.logprobs)[sampled] - lp[0, len(r.prompt_ids) :][sampled])
    return torch.cat(gaps)


@pytest.mark.parametrize("variant", ["seen", "unseen", "threads"])
@pytest.mark.vllm
@needs_vllm
def test_real_vllm_samples_each_variant_within_the_caps(real_vllm, variant):
    _, _, engine = real_vllm
    params = SamplingParams(
        variant=variant, seed=0, open_block=variant != "seen", num_paths=3, max_path_tokens=8,
        max_response_tokens=48, max_blocks=2,
    )  # fmt: skip
    rollouts = engine.generate(PROMPTS, n=3, params=params)
    assert [(r.prompt_index, r.sample_index) for r in rollouts] == [(i, j) for i in range(2) for j in range(3)]
    for r in rollouts:
        assert 0 < len(r.response_ids) <= 48 and r.finish_reason in ("stop", "length")
        assert all(lp < 0 if s else lp == 0.0 for lp, s in zip(r.logprobs, r.sampled_mask))
        assert r.structure.num_blocks <= 2
        if variant == "seen":
            assert all(r.sampled_mask)
            continue
        assert len(r.structure.blocks[0].paths) == 3 and r.response_ids[0] == engine.tags.parallel_open
        for block in r.structure.blocks:
            assert all(p.token_span.end - p.token_span.start <= 8 for p in block.paths)
    again = engine.generate(PROMPTS, n=3, params=params)
    assert [r.response_ids for r in again] == [r.response_ids for r in rollouts]  # seeded: reproducible
    assert len({tuple(r.response_ids) for r in rollouts}) > 1


@pytest.mark.vllm
@needs_vllm
def test_real_vllm_threads_is_on_policy_and_unseen_is_not(real_vllm, tiny_tokenizer):
    """vLLM's request pattern is the threads layout: its log-probs equal the threads trainer's up to kernel
    numerics (vLLM's CPU attention and torch's sdpa sum in different orders); an unseen trainer scores the
    summaries in another context (the reference implementation's flaw)."""
    model, _, engine = real_vllm
    gaps = {}
    for variant in ("threads", "unseen"):
        params = SamplingParams(
            variant=variant, seed=3, open_block=True, num_paths=3, max_path_tokens=8, max_response_tokens=40
        )
        rollouts = engine.generate(PROMPTS, n=2, params=params)
        assert all(r.structure.num_blocks >= 1 and r.structure.blocks[0].closed for r in rollouts)
        gaps[variant] = logprob_gaps(model, tiny_tokenizer, rollouts, variant).abs()
    assert gaps["threads"].max() < 1e-4, gaps["threads"].max()
    assert gaps["unseen"].max() > 1e-2, gaps["unseen"].max()


@pytest.mark.vllm
@needs_vllm
def test_real_vllm_logprobs_at_another_temperature(real_vllm, tiny_tokenizer):
    """vLLM's default log-probs are taken before temperature: at T = 0.7 the rollouts carry NaN rather
    than those. An engine made with `logprobs_mode(0.7)` reports log-probs of the distribution it sampled
    from: the trainer's log softmax(logits / T) renormalised over what vLLM's bans left, so they are never
    below the trainer's and above it by the log of the removed mass only."""
    from parallel_r1.vllm_backend import logprobs_mode

    model, folder, engine = real_vllm
    params = SamplingParams(
        variant="threads", seed=3, temperature=0.7, open_block=True, num_paths=3, max_path_tokens=8,
        max_response_tokens=40,
    )  # fmt: skip
    raw = engine.generate(PROMPTS, n=2, params=params)
    assert all(all(lp != lp for lp, s in zip(r.logprobs, r.sampled_mask) if s) for r in raw)  # NaN
    with pytest.MonkeyPatch.context() as patch:
        for key, value in VLLM_ENV.items():
            patch.setenv(key, value)
        processed = VLLMEngine.colocated(folder, tiny_tokenizer, **VLLM_KWARGS, logprobs_mode=logprobs_mode(0.7))
    rollouts = processed.generate(PROMPTS, n=2, params=params)
    assert [r.response_ids for r in rollouts] == [r.response_ids for r in raw]  # the mode changes no sample
    gaps = logprob_gaps(model, tiny_tokenizer, rollouts, "threads", temperature=0.7)
    print(f"processed - trainer at T=0.7: min {gaps.min():.3g} max {gaps.max():.3g} mean {gaps.mean():.3g}")
    assert gaps.min() > -1e-4, gaps.min()
    assert gaps.max() < 0.05, gaps.max()


@pytest.mark.vllm
@needs_vllm
def test_real_vllm_load_weights_samples_from_the_new_weights(real_vllm, tiny_tokenizer):
    """After `load_weights` vLLM samples from the loaded model (its log-probs are that model's, under
    threads), and loading the first weights back gives the first samples again."""
    model, _, engine = real_vllm
    params = SamplingParams(
        variant="threads", seed=5, open_block=True, num_paths=2, max_path_tokens=8, max_response_tokens=32
    )
    before = engine.generate(PROMPTS, n=2, params=params)
    other = vllm_model(tiny_tokenizer, seed=1)
    try:
        engine.load_weights(other.state_dict().items())
        after = engine.generate(PROMPTS, n=2, params=params)
        assert [r.response_ids for r in after] != [r.response_ids for r in before]
        assert logprob_gaps(other, tiny_tokenizer, after, "threads").abs().max() < 1e-4
    finally:
        engine.load_weights(model.state_dict().items())
    restored = engine.generate(PROMPTS, n=2, params=params)
    assert [r.response_ids for r in restored] == [r.response_ids for r in before]


def _cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """`parallel-r1 ARGS` in a fresh process (vLLM starts once per process), on vLLM's CPU settings;
    VLLM_CPU_CI_ENV runs the model under dynamo without inductor (no C++ compile at start)."""
    env = {**os.environ, **VLLM_ENV, "VLLM_CPU_CI_ENV": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "parallel_r1.cli", *args]
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.mark.vllm
@needs_vllm
def test_real_vllm_eval_command(real_vllm, tmp_path):
    _, folder, _ = real_vllm
    data = tmp_path / "gsm8k_test.jsonl"
    data.write_text(
        "".join(json.dumps({"question": f"What is {a} + 2?", "answer": str(a + 2)}) + "\n" for a in range(3))
    )
    out = tmp_path / "results.json"
    _cli(
        ["eval", "--backend", "vllm", "--model", str(folder), "--benchmarks", f"t={data}", "--k", "2",
         "--max-response-tokens", "32", "--max-path-tokens", "8", "--variant", "threads", "--out", str(out)],
        tmp_path,
    )  # fmt: skip
    (result,) = json.loads(out.read_text())["results"]
    assert result["benchmark"] == "t" and result["num_problems"] == 3
    samples = [json.loads(line) for line in (tmp_path / "results.samples.jsonl").read_text().splitlines()]
    assert len(samples) == 6 and all(s["response"] for s in samples)


VLLM_GRPO = """
name: vllm-grpo
logging: {progress: false}
stages:
  # a short SFT on the easiest search problems: an untrained model answers nothing right, so its groups
  # would have no advantage and the update nothing to move
  - name: sft
    kind: sft
    variant: threads
    model: {name_or_path: tiny, tiny: {hidden_size: 64, num_layers: 2, num_heads: 2, intermediate_size: 128}}
    data: {source: task, task: search, task_size: 64, task_levels: [1], prompt: question}
    lr: 3.0e-3
    max_steps: 60
    save_every: 60
    sft: {batch_size: 16, max_length: 128}
  - name: rl
    kind: grpo
    variant: threads
    data: {source: task, task: search, task_size: 8, task_levels: [1], prompt: question}
    max_steps: 2
    save_every: 2
    grpo:
      prompts_per_step: 2
      n: 4
      mini_batch_size: 2
      filter_zero_variance: false
      rollout: {backend: vllm, max_response_tokens: 96, max_path_tokens: 40, temperature: TEMPERATURE}
"""


@pytest.mark.parametrize("temperature, gap", [(1.0, 1e-4), (0.7, 0.05)])
@pytest.mark.vllm
@needs_vllm
def test_real_vllm_grpo_stage_end_to_end(tmp_path, temperature, gap):
    """A short SFT, then two GRPO steps with vLLM rollouts (`load_weights` before each step's sampling):
    both on-policy (threads), so the logged sampler gap stays at kernel numerics at T = 1, and at T = 0.7
    (the engine then reports temperature-scaled log-probs of what its bans left) within the removed mass;
    the update moves the weights away from those the engine started from."""
    from safetensors.torch import load_file

    from parallel_r1.trainer import final_model

    (tmp_path / "recipe.yaml").write_text(VLLM_GRPO.replace("TEMPERATURE", str(temperature)))
    _cli(["train", "--config", str(tmp_path / "recipe.yaml"), "--run-dir", str(tmp_path / "run")], tmp_path)
    stage = tmp_path / "run" / "01-rl"
    rows = [json.loads(line) for line in (stage / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    print(f"T={temperature}: mismatch_max", [r["mismatch_max"] for r in rows])
    assert all(r["mismatch_max"] < gap for r in rows), [r["mismatch_max"] for r in rows]
    trained = load_file(final_model(stage) / "model.safetensors")
    start = load_file(final_model(tmp_path / "run" / "00-sft") / "model.safetensors")  # where RL started
    assert any(not torch.equal(trained[k], start[k]) for k in start)


def test_load_weights_goes_through_reload_weights_and_drops_the_prefix_cache(tiny_tokenizer):
    """`reload_weights` re-packs what vLLM's CPU layers hold (the real-vLLM test below shows the samples
    change); the model's own `load_weights` would leave the packed copies as they were."""
    from types import SimpleNamespace

    calls, resets = [], []
    llm = SimpleNamespace(
        collective_rpc=lambda method, kwargs: calls.append((method, kwargs)),
        reset_prefix_cache=lambda: resets.append(True),
    )
    engine = VLLMEngine(llm, tiny_tokenizer)
    weight = torch.ones(2)
    engine.load_weights({"lm_head.weight": weight}.items())
    assert calls == [("reload_weights", {"weights_iterator": [("lm_head.weight", weight)]})] and resets == [True]


def test_make_engine_knows_two_backends(tiny_model, tiny_tokenizer):
    from parallel_r1.backends import make_engine
    from parallel_r1.engine import ParallelEngine

    assert isinstance(make_engine("hf", tiny_model, tiny_tokenizer, max_batch_size=4), ParallelEngine)
    with pytest.raises(ValueError, match="backend must be one of hf, vllm"):
        make_engine("tpu", tiny_model, tiny_tokenizer)
