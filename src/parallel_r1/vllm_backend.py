"""The optional vLLM backend of the rollout engine (`pip install parallel-r1[vllm]`; vLLM is imported lazily).

Seen: plain generation; it only stops at `<Parallel>` to count blocks, so that `<Parallel>` can be banned
once the block cap is reached.

Unseen and threads, as the reference implementation does it: decode the main thread until `<Parallel>`;
send one request per path, each `prompt + response so far + <Path>` (vLLM's automatic prefix caching finds
the shared prefix's KV blocks, so the prefix is computed once); append the paths one after another with
`</Parallel>` `<Summary>` and send that sequential text for the summary and the rest of the main thread.
With planned blocks (`SamplingParams.plans`) the plan is one more request after `<Parallel>`, stopped at
`<Path>`; a plan past `max_paths` lines is cut after its last allowed line (the tokens sampled after it are
dropped, which is the HF engine's inserted `<Path>` at that line), and path j's request is
`prompt + response so far + <Path> + plan line j`.

That request pattern IS the threads variant (`attention.build_layout`): a threads trainer scores exactly
these contexts, so sampling is on-policy up to kernel numerics, which every GRPO step measures
(`mismatch_*` metrics). Under unseen the summary's context differs from the one the trainer scores (here
path 2 attends to path 1 and positions run on sequentially), so unseen with this backend is off-policy:
the trainer recomputes old log-probs with `attention.response_logprobs`, and `grpo.tis_cap` corrects the
rest (docs/engine.md). The HF backend (`engine.ParallelEngine`) samples all three variants exactly.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field

import torch

from parallel_r1.format import PlanLines, TagIds
from parallel_r1.rollout import Rollout, SamplingParams, make_rollout

BAN_BIAS = -100.0  # vLLM's logit_bias is additive; -100 removes a token in practice


def logprobs_mode(temperature: float) -> str:
    """The vLLM `logprobs_mode` whose log-probs come closest to `Rollout.logprobs`' log softmax(logits / T)
    of the full vocabulary. vLLM's default, "raw_logprobs", is log softmax(logits) before temperature: exact
    at T = 1 (and for greedy decoding, which records T = 1), wrong otherwise (measured: max gap 0.53 at
    T = 0.7). "processed_logprobs" divides by T but is also of the banned, top-k/top-p-cut distribution
    vLLM sampled from, so it is low by the log of the mass those removed (the hf engine's `ban_mass`)."""
    return "raw_logprobs" if temperature in (0.0, 1.0) else "processed_logprobs"


@dataclass
class Request:
    """One vLLM completion request, independent of the vLLM version."""

    prompt_ids: list[int]
    max_tokens: int
    stop_token_ids: list[int]
    banned: list[int]
    seed: int | None


@dataclass
class Completion:
    token_ids: list[int]
    logprobs: list[float]  # of each sampled token, as vLLM reports it
    finish_reason: str  # "stop" (EOS or a stop token) | "length"


@dataclass
class _Sample:
    prompt_index: int
    sample_index: int
    prompt_ids: list[int]
    state: str = "main"  # main | plan | paths | summary
    response: list[int] = field(default_factory=list)
    sampled: list[bool] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    blocks: int = 0
    finish_reason: str | None = None
    plan: list[int] = field(default_factory=list)  # the open block's plan (planned blocks)
    first_open: tuple[bool, float] = (False, 0.0)  # whether the model sampled its first <Path>, and its log-prob

    def add(self, token: int, sampled: bool, logprob: float = 0.0) -> None:
        self.response.append(token)
        self.sampled.append(sampled)
        self.logprobs.append(logprob if sampled else 0.0)


class VLLMEngine:
    """`generate` with the signature of `ParallelEngine.generate`, on a vLLM `LLM`.

    `model`: a model directory / Hub id (an `LLM` with prefix caching is created from it with
    `llm_kwargs`), or a ready `vllm.LLM`. The tokenizer must already hold the six tags
    (`format.add_parallel_tokens`, then save the model).
    """

    def __init__(self, model, tokenizer=None, **llm_kwargs):
        if isinstance(model, torch.nn.Module):
            raise TypeError(
                "VLLMEngine needs a model directory, a Hub id or a vllm.LLM, not an in-memory torch model: "
                "vLLM loads its own copy of the weights (save the model and pass its directory)"
            )
        if isinstance(model, (str, os.PathLike)):
            from vllm import LLM

            model = LLM(model=str(model), enable_prefix_caching=True, **llm_kwargs)
        self.llm = model
        self.logprobs_mode = getattr(getattr(model, "model_config", None), "logprobs_mode", "raw_logprobs")
        self.tokenizer = tokenizer if tokenizer is not None else self.llm.get_tokenizer()
        self.tags = TagIds.from_tokenizer(self.tokenizer)
        self.plan_lines = PlanLines(self.tokenizer)

    @classmethod
    def colocated(cls, model_dir: str | os.PathLike, tokenizer, *, num_processes: int = 1, **llm_kwargs):
        """An engine in this process, next to a model being trained, whose weights `load_weights` replaces.

        vLLM's engine core runs in-process (not in a worker process), so its model object can be reached;
        with several processes each one holds its own engine (vLLM's "external_launcher").
        """
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        if num_processes > 1:
            llm_kwargs.setdefault("distributed_executor_backend", "external_launcher")
        return cls(str(model_dir), tokenizer, **llm_kwargs)

    def load_weights(self, named_tensors) -> None:
        """Replace the engine's weights by `named_tensors` ((name, tensor) pairs in the checkpoint's names,
        e.g. a state dict's items) and drop the prefix cache computed with the old ones.

        Through vLLM's `reload_weights`, not the model's `load_weights`: after loading, vLLM turns layers
        into kernel formats (on CPU each linear layer keeps only a oneDNN-packed copy, its weight emptied),
        so loading into the parameters alone changes nothing there; `reload_weights` restores the
        parameters, loads, and packs them again. Needs a `colocated` engine (the tensors are handed over
        in process)."""
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": list(named_tensors)})
        self.llm.reset_prefix_cache()

    def run(self, requests: list[Request], params: SamplingParams) -> list[Completion]:
        """Send one batch of requests to vLLM (the only vLLM-specific step)."""
        from vllm import SamplingParams as VLLMSamplingParams
        from vllm.inputs import TokensPrompt

        sampling = [
            VLLMSamplingParams(
                n=1,
                temperature=params.temperature,
                top_p=params.top_p,
                top_k=params.top_k if params.top_k > 0 else -1,
                seed=r.seed,
                max_tokens=r.max_tokens,
                stop_token_ids=r.stop_token_ids,
                logit_bias={t: BAN_BIAS for t in r.banned} or None,
                logprobs=0,
                skip_special_tokens=False,
            )
            for r in requests
        ]
        prompts = [TokensPrompt(prompt_token_ids=r.prompt_ids) for r in requests]
        # Raw log-probs ignore the temperature: rather NaN than a plausible wrong number (`logprobs_mode`).
        temperature_applied = self.logprobs_mode != "raw_logprobs" or params.temperature in (0.0, 1.0)
        completions = []
        for output in self.llm.generate(prompts, sampling, use_tqdm=False):
            choice = output.outputs[0]
            ids = list(choice.token_ids)
            logprobs = [step[t].logprob for t, step in zip(ids, choice.logprobs or [])]
            if not temperature_applied:
                logprobs = [float("nan")] * len(logprobs)
            completions.append(Completion(ids, logprobs + [0.0] * (len(ids) - len(logprobs)), choice.finish_reason))
        return completions

    def generate(self, prompts, n: int = 1, params: SamplingParams | None = None) -> list[Rollout]:
        """len(prompts) * n rollouts, grouped by prompt (prompt 0's n samples first)."""
        params = params or SamplingParams()
        if params.max_depth > 1:
            raise ValueError("the vllm backend does not nest blocks yet: use max_depth 1 or the hf backend")
        if params.distinct_plans:
            raise ValueError("the vllm backend does not ban repeated plan heads: use distinct_plans false or hf")
        encoded = [p if isinstance(p, list) else self.tokenizer(p)["input_ids"] for p in prompts]
        samples = [_Sample(i, j, ids) for i, ids in enumerate(encoded) for j in range(n)]
        if params.open_block:
            for s in samples:
                s.add(self.tags.parallel_open, False)
                s.blocks = 1
                s.state = self._block_state(params)
        # One seed per request, drawn in a fixed order: the same params.seed gives the same rollouts.
        rng = random.Random(params.seed)
        active = list(samples)
        while active:
            plan = [(s, self._requests(s, params, rng)) for s in active]
            completions = iter(self.run([r for _, requests in plan for r in requests], params))
            for sample, requests in plan:
                self._advance(sample, requests, [next(completions) for _ in requests], params)
            active = [s for s in active if s.finish_reason is None]
        return [self._to_rollout(s, params) for s in samples]

    @staticmethod
    def _block_state(params: SamplingParams) -> str:
        """The state after `<Parallel>`: Seen decodes on, Unseen and threads fork paths, after a plan if planned."""
        return "main" if params.variant == "seen" else "plan" if params.plans else "paths"

    def _heads(self, s: _Sample, params: SamplingParams) -> list[list[int]]:
        """The inserted first tokens of each path after its `<Path>`: its plan line (planned blocks)."""
        if not params.plans:
            return [[] for _ in range(params.num_paths)]
        room = max(0, params.max_path_tokens - 3)
        return [line[:room] for line in self.plan_lines.lines(s.plan)] or [[]]

    def _requests(self, s: _Sample, params: SamplingParams, rng: random.Random) -> list[Request]:
        tags, context = self.tags, s.prompt_ids + s.response
        budget = params.max_response_tokens - len(s.response)
        capped = s.blocks >= params.max_blocks

        def seed() -> int | None:
            return None if params.seed is None else rng.randrange(2**31)

        if params.variant == "seen":
            stop = [] if capped else [tags.parallel_open]
            return [Request(context, budget, stop, [tags.parallel_open] if capped else [], seed())]
        if s.state == "paths":
            banned = [t for t in tags.as_tuple() if t != tags.path_close]
            # <Path>, its plan line and </Path> count towards the path cap.
            return [
                Request(
                    context + [tags.path_open] + head,
                    max(1, min(params.max_path_tokens - 2 - len(head), budget - 1 - len(head))),
                    [tags.path_close],
                    banned,
                    seed(),
                )
                for head in self._heads(s, params)
            ]
        if s.state == "plan":
            keep = tags.path_open
        else:
            keep = tags.summary_close if s.state == "summary" else None if capped else tags.parallel_open
        banned = [t for t in tags.as_tuple() if t != keep]
        return [Request(context, budget, [] if keep is None else [keep], banned, seed())]

    def _advance(self, s: _Sample, requests: list[Request], completions: list[Completion], params) -> None:
        tags = self.tags
        if s.state == "plan":
            self._plan(s, completions[0], params)
        elif s.state == "paths":
            for j, (c, head) in enumerate(zip(completions, self._heads(s, params))):
                ids, logprobs = c.token_ids, c.logprobs
                if c.finish_reason == "stop" and ids and ids[-1] != tags.path_close:
                    ids, logprobs = ids[:-1], logprobs[:-1]  # EOS cannot end a path's response: drop it
                sampled, logprob = s.first_open if j == 0 else (False, 0.0)
                s.add(tags.path_open, sampled, logprob)
                for token in head:
                    s.add(token, False)
                for token, logprob in zip(ids, logprobs):
                    s.add(token, True, logprob)
                if s.response[-1] != tags.path_close:
                    s.add(tags.path_close, False)
            s.add(tags.parallel_close, False)
            s.add(tags.summary_open, False)
            s.state, s.plan, s.first_open = "summary", [], (False, 0.0)
        else:
            ((request, c),) = zip(requests, completions)
            for token, logprob in zip(c.token_ids, c.logprobs):
                s.add(token, True, logprob)
            last = c.token_ids[-1] if c.token_ids else None
            if c.finish_reason == "stop" and last not in request.stop_token_ids:
                s.finish_reason = "stop"  # EOS (any of the model's end-of-sequence ids)
            elif last == tags.parallel_open:
                s.blocks += 1
                s.state = self._block_state(params)
            elif last == tags.summary_close:
                s.state = "main"
        if s.finish_reason is None and len(s.response) >= params.max_response_tokens:
            s.finish_reason = "length"

    def _plan(self, s: _Sample, c: Completion, params: SamplingParams) -> None:
        """Take a plan completion: its tokens up to `<Path>` (sampled: the first path's opener), or up to the
        line break that completes `max_paths` lines (what follows is dropped, the opener is inserted)."""
        for token, logprob in zip(c.token_ids, c.logprobs):
            if token == self.tags.path_open:
                s.state, s.first_open = "paths", (True, logprob)
                return
            s.add(token, True, logprob)
            s.plan.append(token)
            if self.plan_lines.ends_line(token) and len(self.plan_lines.lines(s.plan)) >= params.max_paths:
                s.state = "paths"
                return
        if c.finish_reason == "stop":
            s.finish_reason = "stop"  # EOS inside the plan ends the response

    def _to_rollout(self, s: _Sample, params: SamplingParams) -> Rollout:
        cut = params.max_response_tokens
        ids = s.response[:cut]
        return make_rollout(
            self.tokenizer, s.prompt_index, s.sample_index, s.prompt_ids, ids, s.sampled[:cut], s.logprobs[:cut],
            s.finish_reason, ends_with_eos=s.finish_reason == "stop" and len(ids) == len(s.response), tags=self.tags,
            plans=params.plans,
        )  # fmt: skip
