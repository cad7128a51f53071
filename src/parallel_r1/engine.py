"""The rollout engine: decode the main thread, fork N paths at `<Parallel>`, decode them together, summarise.

HF backend. Every sample is one row of a single batch that shares ONE KV cache. Each step every row feeds
the tokens it has pending (one for the main thread or a summary, one per path inside a block), so the
cache holds a row's paths interleaved. Per-row slot metadata (valid, block id, path id) turns into the
step's 4-D additive mask with the Unseen rule of docs/design.md:

    a query sees a key iff the key is valid, not after it (slot order), and not in another path of the
    same block.

Slot order inside the cache is not the sequential layout (paths interleave), but the two orders agree on
everything that rule lets a token see, and positions are explicit, so the logits are exactly those that
`attention.response_logprobs` computes on the sequential layout: what is sampled is what is trained on.

The prefix's keys/values are shared by the paths with no copy and no recompute, the N paths of a block
decode in one forward pass, and the summary attends to the paths' own cached keys/values.

`make_engine(backend, ...)` is the one way to get an engine: this one ("hf") or the vLLM one
(`vllm_backend.VLLMEngine`); the settings and the `Rollout` both return live in `rollout.py`.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass, field

import torch
from rich.console import Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text
from transformers import DynamicCache
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
    state: str = "main"
    out: list[_Token] = field(default_factory=list)  # sequential layout of the main thread and closed blocks
    paths: list[list[_Token]] = field(default_factory=list)  # the open block's paths
    pending: list[_Slot] = field(default_factory=list)
    next_position: int = 0
    blocks: int = 0
    path_start: int = 0  # s: position of every path's <Path>
    path_uids: list[int] = field(default_factory=list)
    finish_reason: str | None = None

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
            if self.params.variant == "unseen":
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


def step_mask(
    key_valid: torch.Tensor, key_block: torch.Tensor, key_path: torch.Tensor, num_queries: int, dtype: torch.dtype
) -> torch.Tensor:
    """Additive attention mask [B, 1, Q, K] for the last Q of K slots (the keys include the queries).

    key_valid/key_block/key_path: [B, K]. A query sees a key iff the key is valid, not after it, and not in
    another path of the same block; every query sees itself, so no row is all -inf (padding slots too).
    """
    num_keys = key_valid.shape[1]
    device = key_valid.device
    q_index = torch.arange(num_keys - num_queries, num_keys, device=device)[:, None]
    k_index = torch.arange(num_keys, device=device)[None, :]
    q_block, q_path = key_block[:, -num_queries:, None], key_path[:, -num_queries:, None]
    k_block, k_path = key_block[:, None, :], key_path[:, None, :]
    other_path = (q_path >= 0) & (k_path >= 0) & (q_path != k_path) & (q_block == k_block)
    allowed = (k_index <= q_index)[None] & key_valid[:, None, :] & ~other_path
    allowed |= (k_index == q_index)[None]
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


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


def sample_tokens(
    logits: torch.Tensor, banned: torch.Tensor, params: SamplingParams, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row of logits [M, V] with tags `banned` [M, V] masked out.

    Returns (tokens [M], logprobs [M]); the log-prob is under softmax(logits / T) of the full vocabulary,
    before banning, top-k and top-p (T = 1 for greedy decoding, temperature 0).
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
        tokens = torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=generator)[:, 0]
    return tokens, logprobs.gather(1, tokens[:, None])[:, 0]


class ParallelEngine:
    """Generate rollouts in the parallel-thinking format (see the module docstring)."""

    def __init__(self, model, tokenizer, *, max_batch_size: int = 64):
        self.model, self.tokenizer = model, tokenizer
        self.max_batch_size = max_batch_size
        self.tags = TagIds.from_tokenizer(tokenizer)
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        if tokenizer.eos_token_id is not None:
            eos.append(tokenizer.eos_token_id)
        self.eos_ids = frozenset(eos)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self._cache_kwarg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def encode_prompts(self, prompts: list[str] | list[list[int]]) -> list[list[int]]:
        encoded = [p if isinstance(p, list) else self.tokenizer(p)["input_ids"] for p in prompts]
        for i, ids in enumerate(encoded):
            if not ids:
                raise ValueError(f"ParallelEngine.generate: prompt {i} is empty")
        return encoded

    def generate(self, prompts, n: int = 1, params: SamplingParams | None = None) -> list[Rollout]:
        """len(prompts) * n rollouts, grouped by prompt (prompt 0's n samples first)."""
        params = params or SamplingParams()
        prompt_ids = self.encode_prompts(prompts)
        generator = None
        if params.temperature > 0:
            generator = torch.Generator(device=self.model.device)
            if params.seed is None:
                generator.seed()
            else:
                generator.manual_seed(params.seed)
        rows = [_Row(i, j, ids, params, self.tags, self.eos_ids) for i, ids in enumerate(prompt_ids) for j in range(n)]
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode():
                for start in range(0, len(rows), self.max_batch_size):
                    logger.debug("decoding rollouts %d-%d of %d", start, start + self.max_batch_size, len(rows))
                    self._decode(rows[start : start + self.max_batch_size], params, generator)
        finally:
            self.model.train(was_training)
        return [self._to_rollout(row) for row in rows]

    def _decode(self, rows: list[_Row], params: SamplingParams, generator: torch.Generator | None) -> None:
        """Run rows to completion, sharing one cache; finished rows leave the batch."""
        device, dtype = self.model.device, self.model.dtype
        vocab = self.model.get_output_embeddings().weight.shape[0]
        bans = ban_table(self.tags, vocab, device)
        cache = DynamicCache(config=self.model.config)
        key_valid = torch.zeros(len(rows), 0, dtype=torch.bool, device=device)
        key_block = torch.zeros(len(rows), 0, dtype=torch.long, device=device)
        key_path = torch.zeros(len(rows), 0, dtype=torch.long, device=device)
        active = list(rows)
        while active:
            width = max(len(r.pending) for r in active)
            # Right-align each row's slots so the sampled ones sit at the end and logits_to_keep stays small.
            ids = [[self.pad_id] * (width - len(r.pending)) + [s.token for s in r.pending] for r in active]
            pos = [[0] * (width - len(r.pending)) + [s.position for s in r.pending] for r in active]
            valid = [[False] * (width - len(r.pending)) + [True] * len(r.pending) for r in active]
            block = [[-1] * (width - len(r.pending)) + [s.block for s in r.pending] for r in active]
            path = [[-1] * (width - len(r.pending)) + [s.path for s in r.pending] for r in active]
            key_valid = torch.cat([key_valid, torch.tensor(valid, device=device)], dim=1)
            key_block = torch.cat([key_block, torch.tensor(block, device=device)], dim=1)
            key_path = torch.cat([key_path, torch.tensor(path, device=device)], dim=1)
            targets = [
                (b, width - len(r.pending) + i, s.stream, r.ban_row(s.stream))
                for b, r in enumerate(active)
                for i, s in enumerate(r.pending)
                if s.stream is not None
            ]
            keep = width - min(col for _, col, _, _ in targets)
            logits = self.model(
                input_ids=torch.tensor(ids, device=device),
                attention_mask=step_mask(key_valid, key_block, key_path, width, dtype),
                position_ids=torch.tensor(pos, device=device),
                use_cache=True,
                logits_to_keep=keep,
                **{self._cache_kwarg: cache},
            ).logits
            b_index = torch.tensor([t[0] for t in targets], device=device)
            c_index = torch.tensor([t[1] - (width - keep) for t in targets], device=device)
            ban_rows = torch.tensor([t[3] for t in targets], device=device)
            tokens, logprobs = sample_tokens(logits[b_index, c_index], bans[ban_rows], params, generator)
            per_row: dict[int, dict[int, tuple[int, float]]] = {}
            for (b, _, stream, _), tok, lp in zip(targets, tokens.tolist(), logprobs.tolist()):
                per_row.setdefault(b, {})[stream] = (tok, lp)
            for b, row in enumerate(active):
                row.advance(per_row[b])
            still = [b for b, r in enumerate(active) if r.finish_reason is None]
            if len(still) < len(active):
                if still:
                    index = torch.tensor(still, device=device)
                    cache.batch_select_indices(index)
                    key_valid, key_block, key_path = key_valid[index], key_block[index], key_path[index]
                active = [active[b] for b in still]

    def _to_rollout(self, row: _Row) -> Rollout:
        tokens = row.response()
        ids = [t.id for t in tokens]
        return make_rollout(
            self.tokenizer, row.prompt_index, row.sample_index, row.prompt_ids, ids,
            [t.sampled for t in tokens], [t.logprob for t in tokens], row.finish_reason,
            ends_with_eos=bool(ids) and ids[-1] in self.eos_ids,
        )  # fmt: skip


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
