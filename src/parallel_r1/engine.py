"""The rollout engine: decode the main thread, fork N paths at `<Parallel>`, decode them together, summarise.

HF backend. Up to `max_batch_size` samples are rows of one preallocated KV cache (`SlotCache`); each step
every row of the step feeds the tokens it has pending (one for the main thread or a summary, one per path
inside a block), so the cache holds a row's paths interleaved. Each row fills its own slots one after
another (no padding slots); per-row slot metadata (valid, block id, path id) turns into the step's 4-D
additive mask with the Unseen rule of docs/design.md:

    a query sees a key iff the key is valid, not after it (slot order), and not in another path of the
    same block.

Slot order inside the cache is not the sequential layout (paths interleave), but the two orders agree on
everything that rule lets a token see, and positions are explicit, so the logits are exactly those that
`attention.response_logprobs` computes on the sequential layout: what is sampled is what is trained on.
The "threads" variant decodes its paths the same way and, when a block closes, re-feeds paths 2..N as
causal text (their isolated slots are hidden), so what follows the block sees the sequential text.

The prefix's keys/values are shared by the paths with no copy and no recompute, the N paths of a block
decode in one forward pass, and the summary attends to the paths' own cached keys/values. A finished row
is replaced by a waiting sample (continuous batching); rows with many pending tokens (a prompt, a
"threads" re-feed) run in a forward of their own so that decoding rows are not padded to their width.

Sampling is counter-based (`sampler.py`): a token's uniform is a hash of (seed, the sample's key, sample
index, its stream, its index in the stream), so a sample does not depend on which other samples share its
batch. The cache and its slot metadata are `kv_cache.py`; `backends.make_engine` is the one way to get an
engine, this one ("hf") or the vLLM one.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import time
from collections import deque
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F

from parallel_r1.bans import (
    BAN_MAIN,
    BAN_MAIN_CAPPED,
    BAN_NONE,
    BAN_PARALLEL,
    BAN_PATH,
    BAN_PATH_NEST,
    BAN_PLAN,
    BAN_SUMMARY,
    BanTable,
    SeenDepth,
    plan_heads,
)
from parallel_r1.format import PlanLines, TagIds
from parallel_r1.kv_cache import SlotCache, SlotMeta
from parallel_r1.rollout import Rollout, SamplingParams, make_rollout
from parallel_r1.sampler import sample_tokens, uniforms_for

logger = logging.getLogger(__name__)

MAIN_STREAM = -1  # the stream id of the main thread / summary; paths are streams 0..N-1


@dataclass
class _Token:
    id: int
    sampled: bool
    logprob: float


@dataclass
class _Slot:
    """One query token fed to the model in one step."""

    token: int
    position: int
    where: tuple[int, ...]  # its thread's block ids at each nesting level, then its path ids (`_Thread.where`)
    stream: int | None = None  # which stream samples from this slot's logits (None: nobody)


class _Target(NamedTuple):
    """A query of a step whose logits a stream samples from: its place in the step's grid (row, column),
    the stream, its ban-table row, and its counter (block, stream, index) for the sampler."""

    row: int
    column: int
    stream: int
    ban_row: int
    counter: tuple[int, int, int]


@dataclass
class _Thread:
    """One stream of a row: the main thread, or one path of a block. A path may open a block of its own
    (nesting), so threads form a tree; `levels` holds the (block id, path id) of every path the thread sits
    in, outermost first (empty for the main thread), and goes with each of its slots into the mask."""

    stream: int  # row-unique; MAIN_STREAM for the main thread
    levels: tuple[tuple[int, int], ...] = ()
    where: tuple[int, ...] = ()  # `levels` as its slots' metadata: the D block ids, then the D path ids (-1 pads)
    counter: tuple[int, int] = (0, 0)  # (block, stream) of its tokens in the counter-based sampler
    tokens: list[_Token] = field(default_factory=list)  # its sequential layout, closed inner blocks included
    state: str = "main"  # main (its own text) -> [plan ->] paths -> summary -> main
    next_position: int = 0
    block: int = 0  # id of the block it has open
    path_start: int = 0  # s: position of every path's <Path> in its open block
    children: list[_Thread] = field(default_factory=list)  # the open block's paths
    plan: list[int] = field(default_factory=list)  # params.plans: the open block's plan, token ids
    closed: bool = False  # a path that has its </Path>

    def size(self) -> int:
        """len(self.flat(...)) without building it: what the response cap counts, checked every step."""
        return len(self.tokens) + sum(child.size() for child in self.children)

    def flat(self, tags: TagIds, seal: bool = False) -> list[_Token]:
        """Its tokens followed by those of its open block's paths, in the sequential layout. `seal` (a path
        that a sibling follows in the layout of a row cut short): every block it holds open ends with an
        inserted `</Parallel>`, an open summary with `</Summary>`, so that the sibling's `<Path>` is read at
        its own level."""
        out = list(self.tokens)
        for k, child in enumerate(self.children):
            out += child.flat(tags, seal or k < len(self.children) - 1)
        if seal and (self.children or self.state == "summary"):
            out.append(_Token(tags.parallel_close if self.children else tags.summary_close, False, 0.0))
        return out


@dataclass
class _Row:
    """One sample's decoding state: a tree of `_Thread`s, each a state machine MAIN -> [PLAN ->] PATHS ->
    SUMMARY -> MAIN (a path's MAIN is its own text, where it may open a nested block)."""

    prompt_index: int
    sample_index: int
    prompt_ids: list[int]
    params: SamplingParams
    tags: TagIds
    eos_ids: frozenset[int]
    key: int = 0  # the sample's key in the counter-based sampler (the caller's problem index)
    plan_lines: PlanLines | None = None  # params.plans: how the plan's token ids split into lines
    pending: list[_Slot] = field(default_factory=list)
    blocks: int = 0  # blocks opened so far (ids 1, 2, ... in opening order)
    next_path: int = 0  # row-unique path ids, in forking order
    hide_paths: list[int] = field(default_factory=list)  # "threads": path ids whose cached slots to hide
    finish_reason: str | None = None
    finished_at: float = 0.0  # time.perf_counter() when the sample finished

    def __post_init__(self) -> None:
        self.main = _Thread(MAIN_STREAM, where=(-1,) * (2 * self.params.max_depth), next_position=len(self.prompt_ids))
        self.streams = {MAIN_STREAM: self.main}
        self.seen_depth = SeenDepth(self.tags, self.params.max_depth)
        self.pending = [_Slot(t, i, self.main.where) for i, t in enumerate(self.prompt_ids)]
        if self.params.open_block:
            self._write(self.main, self.tags.parallel_open, 0.0, sampled=False)
        else:
            self.pending[-1].stream = MAIN_STREAM

    def length(self) -> int:
        return self.main.size()

    def ban_row(self, stream: int, bans: BanTable) -> int:
        """The row of `bans` that `stream`'s next token is sampled under (`bans.ban_rows` replays it)."""
        capped = self.blocks >= self.params.max_blocks
        if self.params.variant == "seen":
            return BAN_PARALLEL if capped or self.seen_depth.at_cap() else BAN_NONE
        thread = self.streams[stream]
        if thread.state == "plan":
            heads = plan_heads(thread.plan, self.plan_lines) if self.params.distinct_plans else ()
            return bans.row(BAN_PLAN, heads)
        if thread.state == "summary":
            return BAN_SUMMARY
        if thread is self.main:
            return BAN_MAIN_CAPPED if capped else BAN_MAIN
        return BAN_PATH_NEST if not capped and len(thread.levels) < self.params.max_depth else BAN_PATH

    def counter(self, stream: int) -> tuple[int, int, int]:
        """(block, stream, index): where the next token of `stream` sits, for the counter-based sampler."""
        thread = self.streams[stream]
        return (*thread.counter, len(thread.tokens))

    def advance(self, samples: dict[int, tuple[int, float]]) -> None:
        """Take this step's sampled (token, logprob) per stream and queue what to feed next."""
        self.pending = []
        for stream, (token, logprob) in samples.items():
            self._write(self.streams[stream], token, logprob)
        done = [t for t in self.streams.values() if t.state == "paths" and all(c.closed for c in t.children)]
        for thread in done:
            self._close_block(thread)
        if self.finish_reason is None and self.length() >= self.params.max_response_tokens:
            self.finish_reason = "length"

    def _feed(self, thread: _Thread, token: int, stream: int | None) -> None:
        self.pending.append(_Slot(token, thread.next_position, thread.where, stream))
        thread.next_position += 1

    def _write(self, thread: _Thread, token: int, logprob: float, sampled: bool = True) -> None:
        """`thread`'s next token (sampled, or inserted by the engine): record it and queue its slot."""
        tags, is_path = self.tags, thread is not self.main
        if thread.state == "plan" and token == tags.path_open:
            self._fork(thread, _Token(token, sampled, logprob))
            return
        if token in self.eos_ids and is_path:
            # A path cannot end the response: close what it holds open, then the path.
            ends = [tags.summary_close] if thread.state == "summary" else []
            for closing in [*ends, tags.path_close]:
                thread.tokens.append(_Token(closing, False, 0.0))
                self._feed(thread, closing, None)
            thread.closed = True
            return
        thread.tokens.append(_Token(token, sampled, logprob))
        if self.params.variant == "seen":
            self.seen_depth.feed(token)
        if token in self.eos_ids:
            self.finish_reason = "stop"
            return
        if token == tags.parallel_open:
            self.blocks += 1
            if self.params.variant != "seen":
                self._open_block(thread)
                return
        if token == tags.summary_close and thread.state == "summary":
            thread.state = "main"
        if thread.state == "plan":
            thread.plan.append(token)
            lines = self.plan_lines
            if lines.ends_line(token) and len(lines.lines(thread.plan)) >= self.params.max_paths:
                # The plan names max_paths paths: the engine closes it with an inserted <Path>.
                self._feed(thread, token, None)
                self._fork(thread, _Token(tags.path_open, False, 0.0))
                return
        if is_path and token == tags.path_close:
            self._feed(thread, token, None)
            thread.closed = True
            return
        if is_path and thread.state == "main" and len(thread.tokens) >= self.params.max_path_tokens - 1:
            thread.tokens.append(_Token(tags.path_close, False, 0.0))
            self._feed(thread, token, None)
            self._feed(thread, tags.path_close, None)
            thread.closed = True
            return
        self._feed(thread, token, thread.stream)

    def _open_block(self, thread: _Thread) -> None:
        thread.block = self.blocks
        if self.params.plans:
            # The model writes the plan in the shared prefix; its first <Path> (sampled) ends it.
            self._feed(thread, self.tags.parallel_open, thread.stream)
            thread.state, thread.plan = "plan", []
            return
        self._feed(thread, self.tags.parallel_open, None)
        self._fork(thread, _Token(self.tags.path_open, False, 0.0), self.params.num_paths)

    def _fork(self, thread: _Thread, first: _Token, num_paths: int | None = None) -> None:
        """Open the block's paths, each at position s = the thread's next position: `num_paths` of them, or with
        a plan one per plan line (at least one), path j starting with its line's tokens (inserted, not sampled;
        cut to leave room for a sampled token within max_path_tokens). `first` is path 1's `<Path>`."""
        thread.state = "paths"
        thread.path_start = thread.next_position
        if num_paths is None:
            room = max(0, self.params.max_path_tokens - 3)
            heads = [line[:room] for line in self.plan_lines.lines(thread.plan)] or [[]]
        else:
            heads = [[] for _ in range(num_paths)]
        opener = _Token(self.tags.path_open, False, 0.0)
        stream = max(self.streams) + 1
        for k, head in enumerate(heads):
            levels = thread.levels + ((thread.block, self.next_path),)
            pad = [-1] * (self.params.max_depth - len(levels))
            where = tuple([b for b, _ in levels] + pad + [p for _, p in levels] + pad)
            child = _Thread(
                stream + k, levels, where, (thread.block, k + 1),
                [first if k == 0 else opener] + [_Token(t, False, 0.0) for t in head],
                next_position=thread.path_start,
            )  # fmt: skip
            self.next_path += 1
            self.streams[child.stream] = child
            thread.children.append(child)
            for j, token in enumerate(child.tokens):
                self._feed(child, token.id, child.stream if j == len(child.tokens) - 1 else None)

    def _close_block(self, thread: _Thread) -> None:
        children = thread.children
        if self.params.variant == "threads":
            # Re-read the block causally: path 1's slots already are its causal encoding; paths 2..N are
            # fed again as plain text at sequential positions and their isolated slots are hidden.
            first = children[0].levels[-1][1]
            self.pending = [s for s in self.pending if s.where[-1] == first]  # one level: where = (block, path)
            thread.next_position = children[0].next_position
            for child in children[1:]:
                for token in child.tokens:
                    self._feed(thread, token.id, None)
            self.hide_paths = [child.levels[-1][1] for child in children[1:]]
        else:
            thread.next_position = max(child.next_position for child in children)
        for child in children:
            thread.tokens.extend(child.tokens)
            del self.streams[child.stream]
        thread.children = []
        thread.tokens.append(_Token(self.tags.parallel_close, False, 0.0))
        thread.tokens.append(_Token(self.tags.summary_open, False, 0.0))
        self._feed(thread, self.tags.parallel_close, None)
        self._feed(thread, self.tags.summary_open, thread.stream)
        thread.state = "summary"

    def response(self) -> list[_Token]:
        return self.main.flat(self.tags)[: self.params.max_response_tokens]


def query_mask(
    key_valid: torch.Tensor,
    key_block: torch.Tensor,
    key_path: torch.Tensor,
    q_index: torch.Tensor,
    q_block: torch.Tensor,
    q_path: torch.Tensor,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Additive attention mask [B, 1, Q, K] of queries at slots `q_index` [B, Q] (with their block/path ids
    [B, Q, D], one pair per nesting level, -1 past a slot's depth) over keys described by key_valid [B, K]
    and key_block/key_path [B, K, D].

    A query sees a key iff the key is valid, not after it, and at no level in another path of the same block;
    every query sees its own slot, so no row is all -inf (padding queries see only themselves).
    """
    k_index = torch.arange(key_valid.shape[1], device=key_valid.device)[None, None, :]
    q_index, q_block, q_path = q_index[:, :, None], q_block[:, :, None], q_path[:, :, None]
    k_block, k_path = key_block[:, None], key_path[:, None]
    other_path = ((q_path >= 0) & (k_path >= 0) & (q_path != k_path) & (q_block == k_block)).any(-1)
    allowed = (k_index <= q_index) & key_valid[:, None, :] & ~other_path
    allowed |= k_index == q_index
    mask = torch.zeros(allowed.shape, dtype=dtype, device=key_valid.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]


def step_mask(
    key_valid: torch.Tensor, key_block: torch.Tensor, key_path: torch.Tensor, num_queries: int, dtype: torch.dtype
) -> torch.Tensor:
    """Additive attention mask [B, 1, Q, K] for the last Q of K slots (the keys include the queries); the
    block and path ids are [B, K, D] (`query_mask`)."""
    num_keys = key_valid.shape[1]
    q_index = torch.arange(num_keys - num_queries, num_keys, device=key_valid.device).expand(key_valid.shape[0], -1)
    q_block, q_path = key_block[:, -num_queries:], key_path[:, -num_queries:]
    return query_mask(key_valid, key_block, key_path, q_index, q_block, q_path, dtype)


def output_layer(head: torch.nn.Module, hidden: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
    """`head(hidden)` for hidden [M, d]; on CPU a large vocabulary goes in `chunk`-row slices of the weight,
    which keeps each output block in cache (1.2-1.4x faster than one matmul for M > 1 on a 49k vocabulary)."""
    weight = getattr(head, "weight", None)
    if (
        type(head) is not torch.nn.Linear
        or hidden.device.type != "cpu"
        or hidden.shape[0] < 2
        or weight.shape[0] <= 4 * chunk
    ):
        return head(hidden)
    biases = head.bias.split(chunk) if head.bias is not None else [None] * -(-weight.shape[0] // chunk)
    return torch.cat([F.linear(hidden, w, b) for w, b in zip(weight.split(chunk), biases)], dim=-1)


PHASES = ("schedule", "inputs", "mask", "forward", "sample", "advance")


@dataclass
class EngineStats:
    """Counters of a `ParallelEngine` since it was built (or `reset_stats`): forwards, query slots
    computed (rows x width per forward), useful ones (real tokens fed), sampled tokens, the probability
    mass the bans and top-k/top-p removed from the distribution of each sampled token (sum and max;
    `sampler.sample_tokens`), and the wall seconds per phase of the decode loop (on a GPU `forward` also
    absorbs queued kernels)."""

    forwards: int = 0
    query_slots: int = 0
    useful_slots: int = 0
    sampled_tokens: int = 0
    ban_mass: float = 0.0
    ban_mass_max: float = 0.0
    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))

    @property
    def utilisation(self) -> float:
        """The share of computed query slots that fed a real token (1.0 when nothing ran)."""
        return self.useful_slots / self.query_slots if self.query_slots else 1.0


@contextlib.contextmanager
def _sdpa_gqa(enabled: bool):
    """Let transformers' sdpa attention pass grouped-query keys to torch with enable_gqa instead of
    copying them per head (repeat_kv), also with our custom mask: 3-6x faster attention on CPU. (On CUDA
    torch's masked kernels do not take enable_gqa, so there transformers' own choice stays.)"""
    name = "TRANSFORMERS_SDPA_FORCE_GQA"
    if not enabled:
        yield
        return
    old = os.environ.get(name)
    os.environ[name] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def _new_seed() -> int:
    return int.from_bytes(os.urandom(8), "little") >> 1


class ParallelEngine:
    """Generate rollouts in the parallel-thinking format (see the module docstring).

    `max_batch_size`: rows decoded together (finished rows are replaced by waiting samples).
    `prefill_tokens`: the most query slots (rows x width) of one forward of rows with many pending tokens
    (prompts, "threads" re-feeds), which run apart from the decoding rows. `split_waste`: when padding
    the one-token rows to the width of the rows inside blocks would waste more than this share of a
    step's query slots, the two kinds run as two forwards (rows kept ordered so both are cache views).
    `stats` counts what ran.
    """

    def __init__(
        self,
        model,
        tokenizer,
        *,
        max_batch_size: int = 64,
        prefill_tokens: int = 8192,
        split_waste: float = 0.25,
        behaviour_logprobs: bool = False,
    ):
        self.model, self.tokenizer = model, tokenizer
        # Record log-probs of the distribution sampled from (bans, top-k/top-p), which `ban_rows` and
        # `bans.Behaviour` let the trainer replay; otherwise those of the unwarped softmax.
        self.behaviour_logprobs = behaviour_logprobs
        self.max_batch_size = max_batch_size
        self.prefill_tokens = prefill_tokens
        self.split_waste = split_waste
        self.tags = TagIds.from_tokenizer(tokenizer)
        self.plan_lines = PlanLines(tokenizer)
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        if tokenizer.eos_token_id is not None:
            eos.append(tokenizer.eos_token_id)
        self.eos_ids = frozenset(eos)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        decoder = getattr(model, getattr(model, "base_model_prefix", ""), None)
        # The decoder's hidden states go through the output layer only where a token is sampled.
        self._decoder = decoder if isinstance(decoder, torch.nn.Module) and decoder is not model else None
        forward = (self._decoder or model).forward
        self._cache_kwarg = "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"
        self.stats = EngineStats()
        # Per rollout of the last `generate` call: seconds from its start until that sample finished.
        self.last_finish_seconds: list[float] = []

    def reset_stats(self) -> None:
        self.stats = EngineStats()

    def encode_prompts(self, prompts: list[str] | list[list[int]]) -> list[list[int]]:
        encoded = [p if isinstance(p, list) else self.tokenizer(p)["input_ids"] for p in prompts]
        for i, ids in enumerate(encoded):
            if not ids:
                raise ValueError(f"ParallelEngine.generate: prompt {i} is empty")
        return encoded

    def generate(
        self, prompts, n: int = 1, params: SamplingParams | None = None, keys: list[int] | None = None
    ) -> list[Rollout]:
        """len(prompts) * n rollouts, grouped by prompt (prompt 0's n samples first).

        Every sampled token is a pure function of (params.seed, keys[i], the sample index j < n, its stream
        and its index in that stream) and the logits: the same (seed, key, j) gives the same rollout in any
        batch, at any `max_batch_size`, in any process. `keys` default to the prompt indices; pass global
        problem indices to split a run over processes. seed None draws a fresh seed per call.
        """
        params = params or SamplingParams()
        prompt_ids = self.encode_prompts(prompts)
        keys = list(range(len(prompt_ids))) if keys is None else [int(k) for k in keys]
        if len(keys) != len(prompt_ids):
            raise ValueError(f"ParallelEngine.generate: {len(keys)} keys for {len(prompt_ids)} prompts")
        seed = _new_seed() if params.seed is None else int(params.seed)
        lines = self.plan_lines if params.plans else None
        rows = [
            _Row(i, j, ids, params, self.tags, self.eos_ids, key=keys[i], plan_lines=lines)
            for i, ids in enumerate(prompt_ids)
            for j in range(n)
        ]
        was_training = self.model.training
        self.model.eval()
        started = time.perf_counter()
        try:
            with torch.inference_mode(), _sdpa_gqa(self.model.device.type == "cpu"):
                self._decode(rows, params, seed)
        finally:
            self.model.train(was_training)
        self.last_finish_seconds = [row.finished_at - started for row in rows]
        return [self._to_rollout(row) for row in rows]

    def _decode(self, rows: list[_Row], params: SamplingParams, seed: int) -> None:
        """Run rows to completion in at most `max_batch_size` cache rows; finished rows make room for
        waiting ones."""
        device = self.model.device
        vocab = self.model.get_output_embeddings().weight.shape[0]
        bans = BanTable(self.tags, vocab, device)
        batch = min(self.max_batch_size, len(rows))
        widest = max(params.num_paths, params.max_paths if params.plans else 0)
        capacity = max(len(r.prompt_ids) for r in rows) + 2 * widest + 64
        cache = SlotCache(self.model.config.num_hidden_layers, batch, capacity)
        meta = SlotMeta(batch, capacity, device, params.max_depth)
        waiting = deque(rows)
        live: list[_Row] = []
        # The most tokens a decoding row feeds in one step (but forks of planned paths): every open path at
        # the deepest level forking a block.
        light = widest**params.max_depth + 2
        while waiting or live:
            started = time.perf_counter()
            while waiting and len(live) < batch:
                meta.reset(len(live))
                live.append(waiting.popleft())
            heavy = [b for b, r in enumerate(live) if len(r.pending) > light]
            if heavy:
                group, width = [], 0
                for b in heavy:
                    wider = max(width, len(live[b].pending))
                    if group and wider * (len(group) + 1) > self.prefill_tokens:
                        break
                    group.append(b)
                    width = wider
                groups = [group]
            else:
                groups = self._split(live, cache, meta)
            self.stats.seconds["schedule"] += time.perf_counter() - started
            for group in groups:
                self._step(live, group, cache, meta, bans, params, seed)
            started = time.perf_counter()
            for b in sorted((b for b, r in enumerate(live) if r.finish_reason is not None), reverse=True):
                if waiting:
                    meta.reset(b)
                    live[b] = waiting.popleft()
                    continue
                last = len(live) - 1
                if b != last:
                    cache.move_row(last, b, meta.lengths[last])
                    meta.move_row(last, b)
                    live[b] = live[last]
                live.pop()
                meta.lengths.pop()
            self.stats.seconds["schedule"] += time.perf_counter() - started

    def _split(self, live: list[_Row], cache: SlotCache, meta: SlotMeta) -> list[list[int]]:
        """The decoding rows as one group, or as two (one-token rows, then rows inside blocks) when padding
        the first to the width of the second would waste more than `split_waste` of the step's slots. For
        two groups the rows are first ordered (by swapping cache rows) so that each group is a range."""
        everyone = list(range(len(live)))
        narrow = sum(len(r.pending) == 1 for r in live)
        if narrow in (0, len(live)):
            return [everyone]
        width = max(len(r.pending) for r in live)
        if narrow * (width - 1) <= self.split_waste * len(live) * width:
            return [everyone]
        i, j = 0, len(live) - 1
        while True:
            while i <= j and len(live[i].pending) == 1:
                i += 1
            while j >= i and len(live[j].pending) > 1:
                j -= 1
            if i > j:
                break
            cache.swap_rows(i, j, max(meta.lengths[i], meta.lengths[j]))
            meta.swap_rows(i, j)
            live[i], live[j] = live[j], live[i]
        return [everyone[:i], everyone[i:]]

    def _step(self, live, group, cache: SlotCache, meta: SlotMeta, bans: BanTable, params, seed) -> None:
        """One forward over the rows `group` of `live`: feed their pending tokens, sample, advance."""
        seconds = self.stats.seconds
        started = time.perf_counter()
        device, dtype = self.model.device, self.model.dtype
        rows = [live[b] for b in group]
        width = max(len(r.pending) for r in rows)
        lengths = [meta.lengths[b] for b in group]
        kv_length = max(lengths) + width
        if kv_length > cache.capacity:
            capacity = max(kv_length, cache.capacity * 3 // 2)
            cache.grow(capacity)
            meta.grow(capacity)
        # One int tensor for the step's query grid [3, b, Q] (ids, positions, slot), one for its block and path
        # ids [b, Q, 2 D] (`_Slot.where`), and the metadata writes of the real tokens: [2, n] (cache row, slot)
        # and [n, 2 D].
        depth = params.max_depth
        ids, pos, q_slot, q_where = [], [], [], []
        written: list[list[int]] = [[], []]
        written_where: list[tuple[int, ...]] = []
        targets: list[_Target] = []
        outside = (-1,) * (2 * depth)
        for i, (b, r, start) in enumerate(zip(group, rows, lengths)):
            pending = r.pending
            pad = width - len(pending)
            ids.append([s.token for s in pending] + [self.pad_id] * pad)
            pos.append([s.position for s in pending] + [0] * pad)
            where = [s.where for s in pending]
            q_where.append(where + [outside] * pad)
            q_slot.append(list(range(start, start + width)))
            written[0].extend([b] * len(pending))
            written[1].extend(range(start, start + len(pending)))
            written_where.extend(where)
            for col, s in enumerate(pending):
                if s.stream is not None:
                    targets.append(_Target(i, col, s.stream, r.ban_row(s.stream, bans), r.counter(s.stream)))
            if r.hide_paths:
                meta.hide(b, r.hide_paths)
                r.hide_paths = []
        meta.write(torch.tensor(written, device=device), torch.tensor(written_where, device=device))
        grid = torch.tensor([ids, pos, q_slot], device=device)
        q_block_path = torch.tensor(q_where, device=device).view(len(group), width, 2, depth).movedim(2, 0)
        row_index = torch.tensor(group, device=device)[:, None]
        # group is sorted: a range of rows is read as a view of the cache, other groups are gathered.
        row_t = slice(group[0], group[-1] + 1) if group[-1] - group[0] == len(group) - 1 else row_index[:, 0]
        cache.plan(row_t, row_index, grid[2], kv_length)
        seconds["inputs"] += time.perf_counter() - started
        started = time.perf_counter()
        key_valid, key_block, key_path = meta.view(row_t, kv_length)
        mask = query_mask(key_valid, key_block, key_path, grid[2], q_block_path[0], q_block_path[1], dtype)
        seconds["mask"] += time.perf_counter() - started
        started = time.perf_counter()
        target_t = torch.tensor([(t.row, t.column, t.ban_row) for t in targets], device=device)
        inputs = {"input_ids": grid[0], "position_ids": grid[1], "attention_mask": mask, "use_cache": True}
        inputs[self._cache_kwarg] = cache
        if self._decoder is not None:
            hidden = self._decoder(**inputs).last_hidden_state[target_t[:, 0], target_t[:, 1]]
            logits = output_layer(self.model.get_output_embeddings(), hidden)
            softcap = getattr(self.model.config, "final_logit_softcapping", None)
            if softcap:
                logits = torch.tanh(logits / softcap) * softcap
        else:
            logits = self.model(**inputs).logits[target_t[:, 0], target_t[:, 1]]
        seconds["forward"] += time.perf_counter() - started
        started = time.perf_counter()
        noise = None
        if params.temperature > 0:
            counters = [(seed, rows[t.row].key, rows[t.row].sample_index, *t.counter) for t in targets]
            noise = uniforms_for(counters, device)
        banned = bans.table[target_t[:, 2]]
        tokens, logprobs, removed = sample_tokens(logits, banned, params, noise, self.behaviour_logprobs)
        tokens, logprobs = tokens.tolist(), logprobs.tolist()
        removed_sum, removed_max = torch.stack([removed.sum(), removed.max()]).tolist()
        seconds["sample"] += time.perf_counter() - started
        started = time.perf_counter()
        per_row: list[dict[int, tuple[int, float]]] = [{} for _ in rows]
        for t, tok, lp in zip(targets, tokens, logprobs):
            per_row[t.row][t.stream] = (tok, lp)
        useful = 0
        now = time.perf_counter()
        for b, r, samples in zip(group, rows, per_row):
            meta.lengths[b] += len(r.pending)
            useful += len(r.pending)
            r.advance(samples)
            if r.finish_reason is not None:
                r.finished_at = now
        stats = self.stats
        stats.forwards += 1
        stats.query_slots += len(group) * width
        stats.useful_slots += useful
        stats.sampled_tokens += len(targets)
        stats.ban_mass += removed_sum
        stats.ban_mass_max = max(stats.ban_mass_max, removed_max)
        seconds["advance"] += time.perf_counter() - started

    def _to_rollout(self, row: _Row) -> Rollout:
        tokens = row.response()
        ids = [t.id for t in tokens]
        return make_rollout(
            self.tokenizer, row.prompt_index, row.sample_index, row.prompt_ids, ids,
            [t.sampled for t in tokens], [t.logprob for t in tokens], row.finish_reason,
            ends_with_eos=bool(ids) and ids[-1] in self.eos_ids, tags=self.tags, plans=row.params.plans,
            max_depth=row.params.max_depth,
        )  # fmt: skip
