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

Sampling is counter-based: a token's uniform is a hash of (seed, the sample's key, sample index, its
stream, its index in the stream), so a sample does not depend on which other samples share its batch.

`make_engine(backend, ...)` is the one way to get an engine: this one ("hf") or the vLLM one
(`vllm_backend.VLLMEngine`); the settings and the `Rollout` both return live in `rollout.py`.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import time
from collections import deque
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from rich.console import Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

from parallel_r1.format import TagIds
from parallel_r1.rollout import Rollout, SamplingParams, make_rollout
from parallel_r1.vllm_backend import VLLMEngine

logger = logging.getLogger(__name__)

MAIN_STREAM = -1  # the stream id of the main thread / summary; paths are streams 0..N-1

# Ban-table rows: which tags each decoding state may not sample.
BAN_NONE, BAN_MAIN, BAN_MAIN_CAPPED, BAN_PATH, BAN_SUMMARY, BAN_PARALLEL = range(6)


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
    block: int = -1
    path: int = -1  # row-unique path id, -1 outside a path
    stream: int | None = None  # which stream samples from this slot's logits (None: nobody)


@dataclass
class _Row:
    """One sample's decoding state (the state machine MAIN -> PATHS -> SUMMARY -> MAIN)."""

    prompt_index: int
    sample_index: int
    prompt_ids: list[int]
    params: SamplingParams
    tags: TagIds
    eos_ids: frozenset[int]
    key: int = 0  # the sample's key in the counter-based sampler (the caller's problem index)
    state: str = "main"
    out: list[_Token] = field(default_factory=list)  # sequential layout of the main thread and closed blocks
    paths: list[list[_Token]] = field(default_factory=list)  # the open block's paths
    pending: list[_Slot] = field(default_factory=list)
    next_position: int = 0
    blocks: int = 0
    path_start: int = 0  # s: position of every path's <Path>
    path_uids: list[int] = field(default_factory=list)
    hide_paths: list[int] = field(default_factory=list)  # "threads": path ids whose cached slots to hide
    finish_reason: str | None = None
    finished_at: float = 0.0  # time.perf_counter() when the sample finished

    def __post_init__(self) -> None:
        self.pending = [_Slot(t, i) for i, t in enumerate(self.prompt_ids)]
        self.next_position = len(self.prompt_ids)
        if self.params.open_block:
            self._main_token(self.tags.parallel_open, 0.0, sampled=False)
        else:
            self.pending[-1].stream = MAIN_STREAM

    def length(self) -> int:
        return len(self.out) + sum(len(p) for p in self.paths)

    def ban_row(self, stream: int) -> int:
        capped = self.blocks >= self.params.max_blocks
        if self.params.variant == "seen":
            return BAN_PARALLEL if capped else BAN_NONE
        if stream != MAIN_STREAM:
            return BAN_PATH
        if self.state == "summary":
            return BAN_SUMMARY
        return BAN_MAIN_CAPPED if capped else BAN_MAIN

    def counter(self, stream: int) -> tuple[int, int, int]:
        """(block, stream, index): where the next token of `stream` sits, for the counter-based sampler."""
        if stream == MAIN_STREAM:
            return 0, 0, len(self.out)
        return self.blocks, stream + 1, len(self.paths[stream])

    def advance(self, samples: dict[int, tuple[int, float]]) -> None:
        """Take this step's sampled (token, logprob) per stream and queue what to feed next."""
        self.pending = []
        for stream, (token, logprob) in samples.items():
            if stream == MAIN_STREAM:
                self._main_token(token, logprob)
            else:
                self._path_token(stream, token, logprob)
        if self.state == "paths" and all(p[-1].id == self.tags.path_close for p in self.paths):
            self._close_block()
        if self.finish_reason is None and self.length() >= self.params.max_response_tokens:
            self.finish_reason = "length"

    def _feed_main(self, token: int, stream: int | None = MAIN_STREAM) -> None:
        self.pending.append(_Slot(token, self.next_position, stream=stream))
        self.next_position += 1

    def _main_token(self, token: int, logprob: float, sampled: bool = True) -> None:
        self.out.append(_Token(token, sampled, logprob))
        if token in self.eos_ids:
            self.finish_reason = "stop"
            return
        if token == self.tags.parallel_open:
            self.blocks += 1
            if self.params.variant != "seen":
                self._open_block()
                return
        if token == self.tags.summary_close and self.state == "summary":
            self.state = "main"
        self._feed_main(token)

    def _open_block(self) -> None:
        self._feed_main(self.tags.parallel_open, stream=None)
        self.state = "paths"
        self.path_start = self.next_position
        first_uid = max(self.path_uids, default=-1) + 1
        self.path_uids = list(range(first_uid, first_uid + self.params.num_paths))
        self.paths = [[_Token(self.tags.path_open, False, 0.0)] for _ in self.path_uids]
        for k, uid in enumerate(self.path_uids):
            self.pending.append(_Slot(self.tags.path_open, self.path_start, self.blocks, uid, stream=k))

    def _path_token(self, k: int, token: int, logprob: float) -> None:
        path = self.paths[k]
        first_new = len(path)
        if token in self.eos_ids:  # a path cannot end the response: close the path instead
            path.append(_Token(self.tags.path_close, False, 0.0))
        else:
            path.append(_Token(token, True, logprob))
        if path[-1].id != self.tags.path_close and len(path) == self.params.max_path_tokens - 1:
            path.append(_Token(self.tags.path_close, False, 0.0))
        for j in range(first_new, len(path)):
            self.pending.append(_Slot(path[j].id, self.path_start + j, self.blocks, self.path_uids[k]))
        if path[-1].id != self.tags.path_close:
            self.pending[-1].stream = k

    def _close_block(self) -> None:
        if self.params.variant == "threads":
            # Re-read the block causally: path 1's slots already are its causal encoding; paths 2..N are
            # fed again as plain text at sequential positions and their isolated slots are hidden.
            first = self.path_uids[0]
            self.pending = [s for s in self.pending if s.path == first]
            self.next_position = self.path_start + len(self.paths[0])
            for path in self.paths[1:]:
                for token in path:
                    self._feed_main(token.id, stream=None)
            self.hide_paths = self.path_uids[1:]
        else:
            self.next_position = self.path_start + max(len(p) for p in self.paths)
        for path in self.paths:
            self.out.extend(path)
        self.paths = []
        self.out.append(_Token(self.tags.parallel_close, False, 0.0))
        self.out.append(_Token(self.tags.summary_open, False, 0.0))
        self._feed_main(self.tags.parallel_close, stream=None)
        self._feed_main(self.tags.summary_open)
        self.state = "summary"

    def response(self) -> list[_Token]:
        tokens = self.out + [t for p in self.paths for t in p]
        return tokens[: self.params.max_response_tokens]


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
    [B, Q]) over keys described by key_valid/key_block/key_path [B, K].

    A query sees a key iff the key is valid, not after it, and not in another path of the same block;
    every query sees its own slot, so no row is all -inf (padding queries see only themselves).
    """
    k_index = torch.arange(key_valid.shape[1], device=key_valid.device)[None, None, :]
    q_index, q_block, q_path = q_index[:, :, None], q_block[:, :, None], q_path[:, :, None]
    k_block, k_path = key_block[:, None, :], key_path[:, None, :]
    other_path = (q_path >= 0) & (k_path >= 0) & (q_path != k_path) & (q_block == k_block)
    allowed = (k_index <= q_index) & key_valid[:, None, :] & ~other_path
    allowed |= k_index == q_index
    mask = torch.zeros(allowed.shape, dtype=dtype, device=key_valid.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]


def step_mask(
    key_valid: torch.Tensor, key_block: torch.Tensor, key_path: torch.Tensor, num_queries: int, dtype: torch.dtype
) -> torch.Tensor:
    """Additive attention mask [B, 1, Q, K] for the last Q of K slots (the keys include the queries)."""
    num_keys = key_valid.shape[1]
    q_index = torch.arange(num_keys - num_queries, num_keys, device=key_valid.device).expand(key_valid.shape[0], -1)
    q_block, q_path = key_block[:, -num_queries:], key_path[:, -num_queries:]
    return query_mask(key_valid, key_block, key_path, q_index, q_block, q_path, dtype)


def ban_table(tags: TagIds, vocab_size: int, device: torch.device) -> torch.Tensor:
    """[6, V] bool: row r holds the tokens banned in decoding state r (the BAN_* constants)."""
    all_tags = tags.as_tuple()
    banned = {
        BAN_NONE: [],
        BAN_MAIN: [t for t in all_tags if t != tags.parallel_open],
        BAN_MAIN_CAPPED: list(all_tags),
        BAN_PATH: [t for t in all_tags if t != tags.path_close],
        BAN_SUMMARY: [t for t in all_tags if t != tags.summary_close],
        BAN_PARALLEL: [tags.parallel_open],
    }
    table = torch.zeros(len(banned), vocab_size, dtype=torch.bool, device=device)
    for row, ids in banned.items():
        table[row, ids] = True
    return table


# --- counter-based uniforms: splitmix64 in int64 torch arithmetic (multiplication wraps modulo 2**64) ---


def _int64(value: int) -> int:
    """`value` modulo 2**64 as a signed 64-bit integer."""
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >= 1 << 63 else value


_GOLDEN, _MIX1, _MIX2 = _int64(0x9E3779B97F4A7C15), _int64(0xBF58476D1CE4E5B9), _int64(0x94D049BB133111EB)


def _shift_right(z: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 values (torch's >> is arithmetic)."""
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def _splitmix64(z: torch.Tensor) -> torch.Tensor:
    z = z + _GOLDEN
    z = (z ^ _shift_right(z, 30)) * _MIX1
    z = (z ^ _shift_right(z, 27)) * _MIX2
    return z ^ _shift_right(z, 31)


def counter_uniforms(counters: torch.Tensor) -> torch.Tensor:
    """Uniforms in [0, 1) (float64, 53 random bits) [M] from integer counters [M, F]: splitmix64 chained over
    the F fields, so each uniform is a pure function of its row of counters."""
    counters = counters.to(torch.int64)
    h = torch.zeros(counters.shape[0], dtype=torch.int64, device=counters.device)
    for f in range(counters.shape[1]):
        h = _splitmix64(h ^ counters[:, f])
    return _shift_right(h, 11).double() * 2.0**-53


_MASK64 = (1 << 64) - 1


def _splitmix64_int(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def uniforms_for(counters: list[tuple[int, ...]], device: torch.device) -> torch.Tensor:
    """`counter_uniforms` of a few rows of counters, computed with Python integers where that is faster
    (the two give the same numbers bit for bit)."""
    if len(counters) > 64:
        return counter_uniforms(torch.tensor([[_int64(c) for c in row] for row in counters], device=device))
    values = []
    for row in counters:
        h = 0
        for c in row:
            h = _splitmix64_int(h ^ (c & _MASK64))
        values.append((h >> 11) * 2.0**-53)
    return torch.tensor(values, dtype=torch.float64, device=device)


def inverse_cdf(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Per row of probs [M, V], the first token whose cumulative probability exceeds u * total (u [M] in
    [0, 1)); tokens of probability 0 are never drawn."""
    cdf = probs.double().cumsum(-1)
    target = uniforms.to(cdf)[:, None] * cdf[:, -1:]
    return torch.searchsorted(cdf, target, right=True)[:, 0].clamp_(max=probs.shape[-1] - 1)


def sample_tokens(
    logits: torch.Tensor,
    banned: torch.Tensor,
    params: SamplingParams,
    noise: torch.Tensor | torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row of logits [M, V] with tags `banned` [M, V] masked out.

    Inverse-CDF sampling from softmax(banned, top-k/top-p-warped logits / T) with the uniforms `noise`
    ([M] in [0, 1), e.g. `counter_uniforms`), or uniforms drawn from a `torch.Generator`, or fresh ones
    (None). Returns (tokens [M], logprobs [M]); the log-prob is under softmax(logits / T) of the full
    vocabulary, before banning, top-k and top-p (T = 1 for greedy decoding, temperature 0).
    """
    logits = logits.float()
    temperature = params.temperature if params.temperature > 0 else 1.0
    scaled = logits / temperature
    logprobs = torch.log_softmax(scaled, dim=-1)
    scores = scaled.masked_fill(banned, float("-inf"))
    if params.temperature == 0:
        tokens = scores.argmax(dim=-1)
    else:
        if params.top_k > 0:
            scores = TopKLogitsWarper(params.top_k)(None, scores)
        if params.top_p < 1.0:
            scores = TopPLogitsWarper(params.top_p)(None, scores)
        if not isinstance(noise, torch.Tensor):
            noise = torch.rand(scores.shape[0], generator=noise, dtype=torch.float64, device=scores.device)
        tokens = inverse_cdf(torch.softmax(scores, dim=-1), noise)
    return tokens, logprobs.gather(1, tokens[:, None])[:, 0]


# --- the preallocated KV cache ---


class _SlotLayer(CacheLayerMixin):
    """One layer of a `SlotCache`: keys/values [rows, kv heads, capacity, head dim], written in place."""

    is_sliding = False

    def __init__(self, owner: SlotCache):
        super().__init__()
        self.owner = owner

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        rows, capacity = self.owner.batch_capacity, self.owner.capacity
        self.keys = key_states.new_zeros((rows, key_states.shape[1], capacity, key_states.shape[-1]))
        self.values = value_states.new_zeros((rows, value_states.shape[1], capacity, value_states.shape[-1]))
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        return self.owner.write(self, key_states, value_states)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.owner.kv_length, 0

    def get_seq_length(self) -> int:
        return self.owner.kv_length

    def get_max_length(self) -> int:
        return self.owner.capacity


class SlotCache(Cache):
    """A preallocated KV cache of `batch_capacity` rows x `capacity` slots per layer, written in place.

    Before each forward the engine sets the step's plan: `rows` (the cache rows of the step's batch rows:
    a slice, read as a view, or an index tensor, gathered), `row_index` [b, 1] and `slots` [b, Q] (where
    each query's key/value goes) and `kv_length` (how many slots the step attends over). `grow` enlarges
    the capacity, `move_row` copies a row (compaction), `swap_rows` exchanges two.
    """

    def __init__(self, num_layers: int, batch_capacity: int, capacity: int):
        self.batch_capacity, self.capacity = batch_capacity, capacity
        super().__init__(layers=[_SlotLayer(self) for _ in range(num_layers)])
        self.rows: torch.Tensor | slice = slice(0)
        self.row_index: torch.Tensor | None = None
        self.slots: torch.Tensor | None = None
        self.kv_length = 0

    def plan(self, rows: torch.Tensor | slice, row_index: torch.Tensor, slots: torch.Tensor, kv_length: int) -> None:
        self.rows, self.row_index, self.slots, self.kv_length = rows, row_index, slots, kv_length

    def write(self, layer: _SlotLayer, key_states: torch.Tensor, value_states: torch.Tensor):
        layer.keys[self.row_index, :, self.slots] = key_states.transpose(1, 2)
        layer.values[self.row_index, :, self.slots] = value_states.transpose(1, 2)
        return layer.keys[self.rows, :, : self.kv_length], layer.values[self.rows, :, : self.kv_length]

    def grow(self, capacity: int) -> None:
        for layer in self.layers:
            if layer.is_initialized:
                for name in ("keys", "values"):
                    old = getattr(layer, name)
                    new = old.new_zeros((*old.shape[:2], capacity, old.shape[-1]))
                    new[:, :, : old.shape[2]] = old
                    setattr(layer, name, new)
        self.capacity = capacity

    def swap_rows(self, a: int, b: int, length: int) -> None:
        for layer in self.layers:
            if layer.is_initialized:
                for tensor in (layer.keys, layer.values):
                    kept = tensor[a, :, :length].clone()
                    tensor[a, :, :length] = tensor[b, :, :length]
                    tensor[b, :, :length] = kept

    def move_row(self, source: int, target: int, length: int) -> None:
        for layer in self.layers:
            if layer.is_initialized:
                layer.keys[target, :, :length] = layer.keys[source, :, :length]
                layer.values[target, :, :length] = layer.values[source, :, :length]


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
    computed (rows x width per forward), useful ones (real tokens fed), sampled tokens, and the wall
    seconds per phase of the decode loop (on a GPU `forward` also absorbs queued kernels)."""

    forwards: int = 0
    query_slots: int = 0
    useful_slots: int = 0
    sampled_tokens: int = 0
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
        self, model, tokenizer, *, max_batch_size: int = 64, prefill_tokens: int = 8192, split_waste: float = 0.25
    ):
        self.model, self.tokenizer = model, tokenizer
        self.max_batch_size = max_batch_size
        self.prefill_tokens = prefill_tokens
        self.split_waste = split_waste
        self.tags = TagIds.from_tokenizer(tokenizer)
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
        rows = [
            _Row(i, j, ids, params, self.tags, self.eos_ids, key=keys[i])
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
        bans = ban_table(self.tags, vocab, device)
        batch = min(self.max_batch_size, len(rows))
        capacity = max(len(r.prompt_ids) for r in rows) + 2 * params.num_paths + 64
        cache = SlotCache(self.model.config.num_hidden_layers, batch, capacity)
        meta = _SlotMeta(batch, capacity, device)
        waiting = deque(rows)
        live: list[_Row] = []
        light = params.num_paths + 2  # the most tokens a decoding row feeds in one step
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

    def _split(self, live: list[_Row], cache: SlotCache, meta: _SlotMeta) -> list[list[int]]:
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

    def _step(self, live, group, cache: SlotCache, meta: _SlotMeta, bans, params, seed) -> None:
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
        # One int tensor for the step's query grid [5, b, Q] (ids, positions, block, path, slot) and one for
        # the metadata writes [4, n] (cache row, slot, block, path) of the real tokens.
        ids, pos, q_block, q_path, q_slot = [], [], [], [], []
        written: list[list[int]] = [[], [], [], []]
        targets = []  # (row in step, column, stream, ban row, block, stream id, index)
        for i, (b, r, start) in enumerate(zip(group, rows, lengths)):
            pending = r.pending
            pad = width - len(pending)
            ids.append([s.token for s in pending] + [self.pad_id] * pad)
            pos.append([s.position for s in pending] + [0] * pad)
            blocks = [s.block for s in pending]
            paths = [s.path for s in pending]
            q_block.append(blocks + [-1] * pad)
            q_path.append(paths + [-1] * pad)
            q_slot.append(list(range(start, start + width)))
            written[0].extend([b] * len(pending))
            written[1].extend(range(start, start + len(pending)))
            written[2].extend(blocks)
            written[3].extend(paths)
            for col, s in enumerate(pending):
                if s.stream is not None:
                    targets.append((i, col, s.stream, r.ban_row(s.stream), *r.counter(s.stream)))
            if r.hide_paths:
                meta.hide(b, r.hide_paths)
                r.hide_paths = []
        meta.write(torch.tensor(written, device=device))
        grid = torch.tensor([ids, pos, q_block, q_path, q_slot], device=device)
        row_index = torch.tensor(group, device=device)[:, None]
        # group is sorted: a range of rows is read as a view of the cache, other groups are gathered.
        row_t = slice(group[0], group[-1] + 1) if group[-1] - group[0] == len(group) - 1 else row_index[:, 0]
        cache.plan(row_t, row_index, grid[4], kv_length)
        seconds["inputs"] += time.perf_counter() - started
        started = time.perf_counter()
        key_valid, key_block, key_path = meta.view(row_t, kv_length)
        mask = query_mask(key_valid, key_block, key_path, grid[4], grid[2], grid[3], dtype)
        seconds["mask"] += time.perf_counter() - started
        started = time.perf_counter()
        target_t = torch.tensor([t[:4] for t in targets], device=device)
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
            counters = [(seed, rows[t[0]].key, rows[t[0]].sample_index, t[4], t[5], t[6]) for t in targets]
            noise = uniforms_for(counters, device)
        tokens, logprobs = sample_tokens(logits, bans[target_t[:, 3]], params, noise)
        tokens, logprobs = tokens.tolist(), logprobs.tolist()
        seconds["sample"] += time.perf_counter() - started
        started = time.perf_counter()
        per_row: list[dict[int, tuple[int, float]]] = [{} for _ in rows]
        for t, tok, lp in zip(targets, tokens, logprobs):
            per_row[t[0]][t[2]] = (tok, lp)
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
        seconds["advance"] += time.perf_counter() - started

    def _to_rollout(self, row: _Row) -> Rollout:
        tokens = row.response()
        ids = [t.id for t in tokens]
        return make_rollout(
            self.tokenizer, row.prompt_index, row.sample_index, row.prompt_ids, ids,
            [t.sampled for t in tokens], [t.logprob for t in tokens], row.finish_reason,
            ends_with_eos=bool(ids) and ids[-1] in self.eos_ids,
        )  # fmt: skip


class _SlotMeta:
    """Per cache row: how many slots are used, and per slot valid / block id / path id ([rows, capacity])."""

    def __init__(self, rows: int, capacity: int, device: torch.device):
        self.valid = torch.zeros(rows, capacity, dtype=torch.bool, device=device)
        self.block = torch.full((rows, capacity), -1, dtype=torch.long, device=device)
        self.path = torch.full((rows, capacity), -1, dtype=torch.long, device=device)
        self.lengths: list[int] = []

    def reset(self, row: int) -> None:
        """Row `row` starts a new sample (appended when row == len(lengths))."""
        self.valid[row] = False
        if row == len(self.lengths):
            self.lengths.append(0)
        else:
            self.lengths[row] = 0

    def grow(self, capacity: int) -> None:
        for name, fill in (("valid", False), ("block", -1), ("path", -1)):
            old = getattr(self, name)
            new = torch.full((old.shape[0], capacity), fill, dtype=old.dtype, device=old.device)
            new[:, : old.shape[1]] = old
            setattr(self, name, new)

    def write(self, written: torch.Tensor) -> None:
        """Mark slots used: `written` [4, n] holds per slot its cache row, slot index, block id, path id."""
        index = (written[0], written[1])
        self.valid[index] = True
        self.block[index] = written[2]
        self.path[index] = written[3]

    def hide(self, row: int, path_ids: list[int]) -> None:
        self.valid[row] &= ~torch.isin(self.path[row], torch.tensor(path_ids, device=self.path.device))

    def move_row(self, source: int, target: int) -> None:
        for tensor in (self.valid, self.block, self.path):
            tensor[target] = tensor[source]
        self.lengths[target] = self.lengths[source]

    def swap_rows(self, a: int, b: int) -> None:
        for tensor in (self.valid, self.block, self.path):
            tensor[[a, b]] = tensor[[b, a]]
        self.lengths[a], self.lengths[b] = self.lengths[b], self.lengths[a]

    def view(self, rows: torch.Tensor | slice, kv_length: int):
        return self.valid[rows, :kv_length], self.block[rows, :kv_length], self.path[rows, :kv_length]


BACKENDS = ("hf", "vllm")


def make_engine(
    backend: str, model, tokenizer=None, *, max_batch_size: int = 64, colocate: bool = False, **vllm_kwargs
):
    """The rollout engine of `backend`; both have `generate(prompts, n, params) -> list[Rollout]`.

    "hf": `ParallelEngine` on an in-memory model (`max_batch_size` rows decoded together). "vllm":
    `vllm_backend.VLLMEngine` on a model directory, Hub id or `vllm.LLM` (vLLM loads its own copy of the
    weights; the tokenizer defaults to the model's own; `vllm_kwargs` go to `vllm.LLM`). `colocate`: a
    vLLM engine in this process next to a model being trained (`VLLMEngine.colocated`; `load_weights`
    then copies the trained weights into it).
    """
    if backend == "hf":
        return ParallelEngine(model, tokenizer, max_batch_size=max_batch_size)
    if backend == "vllm":
        if colocate:
            return VLLMEngine.colocated(model, tokenizer, **vllm_kwargs)
        return VLLMEngine(model, tokenizer, **vllm_kwargs)
    raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")


def render_rollout(rollout: Rollout):
    """A rich renderable of one rollout: main text, each block's paths side by side, then its summary."""
    structure = rollout.structure
    text = structure.text
    parts, cursor = [], 0
    for number, block in enumerate(structure.blocks, start=1):
        if text[cursor : block.span.start].strip():
            parts.append(Text(text[cursor : block.span.start]))
        row = Table.grid(expand=True, padding=(0, 1))
        for _ in block.paths:
            row.add_column(ratio=1)
        row.add_row(
            *(
                Panel(
                    Text(text[p.content.start : p.content.end]), title=f"block {number} path {k}", border_style="cyan"
                )
                for k, p in enumerate(block.paths, start=1)
            )
        )
        parts.append(row)
        if block.summary is not None:
            parts.append(
                Panel(Text(text[block.summary.start : block.summary.end]), title="summary", border_style="green")
            )
        cursor = block.span.end
    if text[cursor:].strip():
        parts.append(Text(text[cursor:]))
    subtitle = f"{rollout.finish_reason}, {len(rollout.response_ids)} tokens, {structure.num_blocks} blocks"
    return Panel(Group(*parts), title=f"prompt {rollout.prompt_index} sample {rollout.sample_index}", subtitle=subtitle)
