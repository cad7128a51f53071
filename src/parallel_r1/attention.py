"""The Unseen (structured) attention mask and positions, and log-probabilities for training.

The rule is the one in docs/design.md ("The Unseen (structured) attention rule"); the rollout engine
reproduces it with a KV cache, so the two must agree token for token:

* a query sees keys at or before it that are not padding, except keys of another path of the same
  `<Parallel>` block when the query itself is in a path;
* every path of a block starts at the same position `s` (that of the block's first `<Path>`), and
  `</Parallel>` continues from `s + L`, L being the longest path's length.

Nested blocks (a path opening a block of its own, `max_depth` > 1) apply the rule at every level: a query
does not see another path of any block it sits in, and a path's length L counts positions, so an inner
block inside a path takes its own longest path's room.

Everything here is vectorised over the batch and the sequence (cumsum / cummax over tag masks, one
scatter for the longest path); the only loop is over nesting levels, none over tokens or blocks.

Backends: Hugging Face `sdpa` and `eager` take the dense additive float mask from `build_attention`
(eager mis-reads a boolean 4-D mask, so only the float form is produced); `flex_attention` takes the
`BlockMask` from `build_block_mask`. Any other `config._attn_implementation` (flash attention,
paged kernels) cannot take a custom mask, and `response_logprobs` refuses it with a clear error.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask

from parallel_r1 import chunked_attention
from parallel_r1.bans import Behaviour
from parallel_r1.format import TagIds
from parallel_r1.settings import VARIANTS

DENSE_BACKENDS = ("sdpa", "eager")
FLEX_BACKEND = "flex_attention"


def _check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"unknown attention variant {variant!r}; expected one of {VARIANTS}")


def _real_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Bool[B, T]: True on real (non-padding) tokens."""
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [B, T], got shape {tuple(input_ids.shape)}")
    if attention_mask is None:
        return torch.ones_like(input_ids, dtype=torch.bool)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask shape {tuple(attention_mask.shape)} differs from input_ids shape {tuple(input_ids.shape)}"
        )
    return attention_mask.bool()


def _last_index(flags: torch.Tensor) -> torch.Tensor:
    """LongTensor[B, T]: index of the last True at or before each t, -1 if none."""
    idx = torch.arange(flags.shape[1], device=flags.device).expand_as(flags)
    return torch.where(flags, idx, torch.full_like(idx, -1)).cummax(dim=1).values


@dataclass
class _Structure:
    """Where every token sits in the blocks of one nesting level, each field [B, T]; -1 (or False) outside.
    Ids are unique within a row and a level."""

    block_id: torch.Tensor
    path_id: torch.Tensor
    offset: torch.Tensor  # index within its path (0 on the path's `<Path>`)
    closes: torch.Tensor  # Bool: a `</Parallel>` that ends a block
    first_path: torch.Tensor  # index of the block's first `<Path>`, for path tokens


def tag_spans(is_open: torch.Tensor, is_close: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(last_open LongTensor[B, T], inside Bool[B, T]) for opening and closing tag flags [B, T]: the index of
    the last opening tag at or before t (-1 if none), and whether t lies from an opening tag through its
    closing tag, both included (a span cut off runs to the end)."""
    last_open = _last_index(is_open)
    # The closing tag is still inside its span, so only closes strictly before t count.
    last_close_before = F.pad(_last_index(is_close)[:, :-1], (1, 0), value=-1)
    return last_open, (last_open >= 0) & (last_open > last_close_before)


def _levels(input_ids: torch.Tensor, tags: TagIds, real: torch.Tensor, nest: bool = True) -> list[_Structure]:
    """The `_Structure` of every nesting level, outermost first (always at least one). A token's level is the
    number of blocks around it, its block's own `<Parallel>` and `</Parallel>` included, so the tags of a
    level-d block, and its paths' `<Path>`s, are the tags at level d. `nest=False` reads every block at one
    level, a `<Parallel>` inside an open block starting a new block (how rows were read before nesting)."""
    is_open = (input_ids == tags.parallel_open) & real
    is_close = (input_ids == tags.parallel_close) & real
    is_path_open = (input_ids == tags.path_open) & real
    if not nest:
        return [_structure(is_open, is_close, is_path_open, real)]
    level = is_open.long().cumsum(1) - F.pad(is_close.long().cumsum(1)[:, :-1], (1, 0))
    depth = max(1, int(level.max())) if level.numel() else 1
    return [
        _structure(is_open & (level == d), is_close & (level == d), is_path_open & (level == d), real)
        for d in range(1, depth + 1)
    ]


def _structure(is_open: torch.Tensor, is_close: torch.Tensor, is_path_open: torch.Tensor, real: torch.Tensor):
    """The `_Structure` of the blocks opened by `is_open`, closed by `is_close`, with paths opened by
    `is_path_open` (all Bool[B, T], real tokens only)."""
    last_open, in_block = tag_spans(is_open, is_close)
    in_block &= real
    block_id = torch.where(in_block, is_open.long().cumsum(1) - 1, -1)

    is_path_open = is_path_open & in_block
    last_path_open = _last_index(is_path_open)
    # A path runs from its `<Path>` to the next `<Path>` or `</Parallel>` of the same block.
    in_path = in_block & (last_path_open > last_open) & ~is_close
    path_id = torch.where(in_path, is_path_open.long().cumsum(1) - 1, -1)
    idx = torch.arange(is_open.shape[1], device=is_open.device)
    offset = torch.where(in_path, idx - last_path_open, -1)
    # A block's first `<Path>` is one with no other `<Path>` between it and the block's `<Parallel>`.
    path_open_before = F.pad(last_path_open[:, :-1], (1, 0), value=-1)
    first_path = torch.where(in_path, _last_index(is_path_open & (path_open_before < last_open)), -1)
    return _Structure(block_id, path_id, offset, is_close & in_block, first_path)


def structure_ids(
    input_ids: torch.Tensor, tags: TagIds, attention_mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(block_id, path_id), both LongTensor[B, T] with -1 outside a block / path, of the outermost blocks.

    Ids are unique within a row (the k-th block of a row has block_id k, the k-th path path_id k).
    A path spans from its `<Path>` up to, not including, the next `<Path>` or `</Parallel>`; tokens
    between `<Parallel>` and the first `<Path>` are in the block but in no path. Padding is -1.
    """
    structure = _levels(input_ids, tags, _real_mask(input_ids, attention_mask))[0]
    return structure.block_id, structure.path_id


def build_positions(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None, tags: TagIds, variant: str = "unseen"
) -> torch.Tensor:
    """position_ids LongTensor[B, T] of the sequential text: real tokens count from 0, padding gets 0.

    Seen and threads (whose row is the text read causally): one more per token. Unseen: a path's j-th
    position is `s + j` (s: position of the block's first `<Path>`), and the `</Parallel>` closing the
    block sits at `s + L` (L: longest path of the block, in positions; a block nested in a path counts
    only its own longest path).
    """
    _check_variant(variant)
    real = _real_mask(input_ids, attention_mask)
    if variant != "unseen":
        return torch.where(real, real.long().cumsum(1) - 1, 0)
    return _unseen_positions(_levels(input_ids, tags, real), real)


def _unseen_positions(levels: list[_Structure], real: torch.Tensor) -> torch.Tensor:
    """`build_positions` of the unseen variant from the row's structure at every level.

    Positions are the running sum of per-token steps, 1 for every real token to begin with. Each level,
    innermost first, then resets its later `<Path>`s to the block's `s` and moves its `</Parallel>` to `s + L`
    by changing the step of those tokens alone: a path's positions relative to its `<Path>` are already
    final, since the levels inside it were done before and nothing at this level sits inside a path."""
    B, T = real.shape
    step = real.long()
    idx = torch.arange(T, device=real.device)
    for st in reversed(levels):
        position = step.cumsum(1) - 1
        in_path = st.path_id >= 0
        path_open = torch.where(in_path, idx - st.offset, 0)
        relative = torch.where(in_path, position - position.gather(1, path_open), -1)
        # Per path (slot path_id + 1) and per block (slot block_id + 1), the length in positions; slot 0
        # collects the tokens outside paths.
        slots = torch.zeros(B, T + 1, dtype=torch.long, device=real.device)
        path_len = slots.scatter_reduce(1, torch.where(in_path, st.path_id + 1, 0), relative + 1, reduce="amax")
        block_len = slots.scatter_reduce(1, torch.where(in_path, st.block_id + 1, 0), relative + 1, reduce="amax")
        # A later path's <Path> steps back over the path before it (path ids of a block are consecutive).
        later = in_path & (st.offset == 0) & (idx != st.first_path)
        step = torch.where(later, 1 - path_len.gather(1, st.path_id.clamp(min=0)), step)
        # </Parallel> steps over its block's longest path instead of its last one.
        last_path = F.pad(st.path_id[:, :-1], (1, 0), value=-1)
        last_len = path_len.gather(1, last_path + 1)
        longest = block_len.gather(1, st.block_id + 1)
        step = torch.where(st.closes, longest - last_len + 1, step)
    return torch.where(real, step.cumsum(1) - 1, 0)


@dataclass
class Layout:
    """The training row of each sample under a variant, and who may see whom in it.

    Rows have S >= T columns: the T tokens of the sequential text, then (threads only) copies of paths.
    The one visibility rule, for every variant, with `seg` and `horizon` per query q:

        q sees key k  iff  k <= q, k is real, and (seg[q] == 0 or seg[k] == seg[q] or k <= horizon[q])

    i.e. a token of segment 0 reads causally, and a token of an isolated segment (an Unseen path, a
    threads path copy) reads its own segment and the columns up to its horizon (the last token before
    its block's first `<Path>`). Padding queries also see themselves, so no row of the mask is empty.
    Nested Unseen blocks add one (seg, horizon) pair per level below the outermost (`inner`), and a
    query must pass the rule at every level.
    """

    input_ids: torch.Tensor  # LongTensor[B, S]
    real: torch.Tensor  # Bool[B, S]: not padding
    positions: torch.Tensor  # LongTensor[B, S]
    seg: torch.Tensor  # LongTensor[B, S]: 0 = reads causally; > 0 = an isolated segment, unique in its row
    horizon: torch.Tensor  # LongTensor[B, S]: last shared column an isolated token sees (-1 for segment 0)
    source: torch.Tensor | None = None  # LongTensor[B, T]: the column whose log-prob is token t's (None: t)
    # Packed rows only (`parallel_r1.packing`): several sequences side by side in one row. A query also
    # needs group[k] == group[q] and (doc[k] == 0 or doc[k] == doc[q]): doc 0 is a group's shared prompt.
    group: torch.Tensor | None = None  # LongTensor[B, S]
    doc: torch.Tensor | None = None  # LongTensor[B, S]
    inner: tuple[tuple[torch.Tensor, torch.Tensor], ...] = ()  # (seg, horizon) [B, S] of levels 2, 3, ...

    def levels(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(seg, horizon) of every level, outermost first."""
        return [(self.seg, self.horizon), *self.inner]

    def to_sequence(self, values_BS: torch.Tensor | None) -> torch.Tensor | None:
        """Per-token values [B, S] of the layout back to the T tokens of the sequential text."""
        if values_BS is None or self.source is None:
            return values_BS
        return values_BS.gather(1, self.source)


def build_layout(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None, tags: TagIds, variant: str = "unseen"
) -> Layout:
    """The `Layout` of `variant` for the sequential rows input_ids [B, T] (attention_mask [B, T] or None).

    seen: the text, causal. unseen: the text, each path an isolated segment seeing the text before its
    block's first `<Path>`, positions of `build_positions`. threads (re-prefill at join, what a stock
    engine such as vLLM computes when each path is its own request and the summary a request over the
    concatenated text): the text read causally with sequential positions, plus a copy of every path but
    the first of each block, appended after column T; a copy is an isolated segment with the positions
    its path had when sampled (s + j, s the position of the block's first `<Path>`), and its tokens'
    log-probs come from the copy. The first path needs no copy: in the causal text it already sees
    exactly the prefix and itself. Extra columns: the tokens of the later paths, not a prefix per path.
    """
    _check_variant(variant)
    real = _real_mask(input_ids, attention_mask)
    zeros = torch.zeros_like(input_ids)
    sequential = torch.where(real, real.long().cumsum(1) - 1, 0)
    if variant == "seen":
        return Layout(input_ids, real, sequential, zeros, zeros - 1)
    levels = _levels(input_ids, tags, real, nest=variant == "unseen")
    st = levels[0]
    in_path = st.path_id >= 0
    if variant == "unseen":
        pairs = [(torch.where(s.path_id >= 0, s.path_id + 1, 0), s.first_path - 1) for s in levels]
        positions = _unseen_positions(levels, real)
        return Layout(input_ids, real, positions, *pairs[0], inner=tuple(pairs[1:]))

    B, T = input_ids.shape
    first_path = st.first_path.clamp(min=0)
    later = in_path & (st.path_id != st.path_id.gather(1, first_path))
    rank = later.long().cumsum(1) - 1
    extra = int(later.sum(1).max().item()) if later.any() else 0
    rows, cols = later.nonzero(as_tuple=True)
    dest = T + rank[rows, cols]

    def extend(main: torch.Tensor, fill, copies: torch.Tensor) -> torch.Tensor:
        out = torch.cat([main, torch.full((B, extra), fill, dtype=main.dtype, device=main.device)], dim=1)
        out[rows, dest] = copies
        return out

    path_start = sequential.gather(1, first_path)
    source = torch.arange(T, device=input_ids.device).repeat(B, 1)
    source[rows, cols] = dest
    return Layout(
        input_ids=extend(input_ids, tags.path_open, input_ids[rows, cols]),
        real=extend(real, False, torch.ones_like(rows, dtype=torch.bool)),
        positions=extend(sequential, 0, (path_start + st.offset)[rows, cols]),
        seg=extend(zeros, 0, st.path_id[rows, cols] + 1),
        horizon=extend(zeros - 1, -1, st.first_path[rows, cols] - 1),
        source=source,
    )


def allowed(layout: Layout, q_start: int = 0, q_end: int | None = None) -> torch.Tensor:
    """Bool[B, Q, S]: allowed[b, i, k] is True when query q_start + i may attend to key k (`Layout`'s rule)."""
    S = layout.input_ids.shape[1]
    q_end = S if q_end is None else q_end
    device = layout.input_ids.device
    q = torch.arange(q_start, q_end, device=device)[:, None]
    k = torch.arange(S, device=device)[None, :]
    visible = (k <= q) & layout.real[:, None, :] & _packed_rule(layout, q_start, q_end)
    for seg, horizon in layout.levels():
        seg_q, horizon_q = seg[:, q_start:q_end, None], horizon[:, q_start:q_end, None]
        visible = visible & ((seg_q == 0) | (seg[:, None, :] == seg_q) | (k <= horizon_q))
    return visible | ((k == q) & ~layout.real[:, q_start:q_end, None])


def dense_mask(layout: Layout, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Additive mask Tensor[B, 1, S, S] in `dtype` for sdpa / eager attention: 0 where attention is allowed,
    `torch.finfo(dtype).min` where not (finite, as Hugging Face's own masks, so a score plus the mask never
    turns into NaN). Costs B * S * S * dtype-size bytes: see docs/attention.md."""
    ok = allowed(layout)
    mask = torch.full(ok.shape, torch.finfo(dtype).min, dtype=dtype, device=ok.device)
    return mask.masked_fill_(ok, 0.0)[:, None]


def block_mask(layout: Layout):
    """A flex-attention `BlockMask` of the `Layout`'s rule. It stores 128 x 128 tiles, skipping fully
    masked ones, so memory grows with the number of tiles rather than with S * S."""
    levels, real = layout.levels(), layout.real
    group, doc = _group_doc(layout)

    def mask_mod(b, h, q, k):
        rule = (group[b, k] == group[b, q]) & ((doc[b, k] == 0) | (doc[b, k] == doc[b, q]))
        for seg, horizon in levels:
            rule = rule & ((seg[b, q] == 0) | (seg[b, k] == seg[b, q]) | (k <= horizon[b, q]))
        return ((k <= q) & real[b, k] & rule) | ((q == k) & ~real[b, q])

    B, S = layout.input_ids.shape
    return create_block_mask(mask_mod, B, None, S, S, device=layout.input_ids.device)


def build_attention(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    tags: TagIds,
    variant: str = "unseen",
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask Tensor[B, 1, T, T] in `dtype`, position_ids LongTensor[B, T]) of the seen or unseen variant
    for sdpa / eager attention (threads adds columns: use `build_layout` and `dense_mask`)."""
    if variant == "threads":
        raise ValueError("the threads variant adds columns to the row: use build_layout and dense_mask")
    layout = build_layout(input_ids, attention_mask, tags, variant)
    return dense_mask(layout, dtype), layout.positions


def hf_config(model):
    """`model`'s Hugging Face config, also through a DeepSpeed engine (whose own `config` is DeepSpeed's)."""
    return getattr(model, "module", model).config


def model_attention(model, layout: Layout):
    """The `layout`'s mask in the form `model`'s attention backend takes, or a ValueError naming the backend."""
    backend = getattr(hf_config(model), "_attn_implementation", None)
    if backend in DENSE_BACKENDS:
        return dense_mask(layout, dtype=model.dtype)
    if backend == FLEX_BACKEND:
        return block_mask(layout)
    raise ValueError(
        f"attention implementation {backend!r} cannot take a custom 4-D attention mask, which the "
        f"structured (Unseen/Seen) scoring needs; load the model with attn_implementation set to one of "
        f"{DENSE_BACKENDS + (FLEX_BACKEND,)}"
    )


def token_logprobs(
    logits: torch.Tensor,
    input_ids: torch.Tensor,
    temperature: float = 1.0,
    with_entropy: bool = False,
    chunk: int = 512,
    behaviour: Behaviour | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs Tensor[B, T] of input_ids[:, t] under logits[:, t-1] / temperature; column 0 is 0.

    Works chunk by chunk along T with gather + logsumexp, so no [B, T, V] log-softmax is built.
    Entropy (if asked) is that of the distribution that predicted token t; column 0 is 0.
    With `behaviour` (its ban rows in these columns) both are of the distribution the sampler drew from.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    B, T = input_ids.shape
    dtype = torch.promote_types(logits.dtype, torch.float32)
    logps, entropies = [], []
    for start in range(0, T - 1, chunk):
        targets = slice(start + 1, min(start + 1 + chunk, T))
        rows = None if behaviour is None else behaviour.ban_rows[:, targets]
        logp, entropy = scored_targets(
            logits[:, start : targets.stop - 1], input_ids[:, targets], temperature, with_entropy, behaviour, rows
        )
        logps.append(logp)
        if with_entropy:
            entropies.append(entropy)
    zero = logits.new_zeros(B, 1, dtype=dtype)
    logp = torch.cat([zero, *logps], dim=1)
    entropy = torch.cat([zero, *entropies], dim=1) if with_entropy else None
    return logp, entropy


def scored_targets(
    logits: torch.Tensor,
    target: torch.Tensor,
    temperature: float,
    with_entropy: bool,
    behaviour: Behaviour | None,
    ban_rows: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(log-prob, entropy or None), each [...], of tokens target [...] under logits [..., V] / temperature
    (with `behaviour` and its `ban_rows` [...] of these targets: of the distribution the sampler drew from)."""
    # sampler imports rollout, which imports this module
    from parallel_r1.sampler import warp_scores

    # at least float32 (bf16 logits are upcast); float64 stays float64, as in `sampler.sample_tokens`
    z = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if temperature != 1.0:
        z = z / temperature
    if behaviour is not None:
        banned = behaviour.table[ban_rows]
        V = z.shape[-1]
        z = warp_scores(z.reshape(-1, V), banned.reshape(-1, V), behaviour.top_k, behaviour.top_p).view_as(z)
    lse = z.logsumexp(-1)
    logp = z.gather(-1, target.unsqueeze(-1)).squeeze(-1) - lse
    if not with_entropy:
        return logp, None
    p = z.softmax(-1)
    return logp, lse - torch.where(p > 0, p * z, 0.0).sum(-1)


def response_logprobs(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    tags: TagIds,
    variant: str = "unseen",
    temperature: float = 1.0,
    with_entropy: bool = False,
    kernel: str = "auto",
    behaviour: Behaviour | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(logprobs Tensor[B, T], entropy Tensor[B, T] or None) of a Hugging Face causal LM, differentiable.

    With `behaviour` (ban rows [B, T] of these tokens) the log-probs are of the distribution the engine
    sampled from: its state-dependent tag bans and top-k/top-p replayed, renormalised.

    `kernel`: "dense" (the backend's own mask: `model_attention`), "chunked" (`chunked_attention`, no
    S x S tensor, sdpa / eager models only) or "auto" (chunked from `LONG_SEQUENCE_TOKENS` columns on,
    see `attention_kernel`); all give the same log-probs up to float rounding.

    logprobs[:, t] = log softmax(logits[:, t-1] / temperature)[input_ids[:, t]], under the `variant`'s
    `Layout` (threads: a later path's tokens are scored in its copy, after the copy's previous token);
    column 0 (and padding's neighbours) are meaningless and must be loss-masked.
    Note that the prediction of a later path's `<Path>` and of `</Parallel>` comes from the previous
    token in sequence order (the end of the path before), not from the context the engine had when it
    inserted them; those tokens are engine-inserted and not trained on in RL.
    """
    layout = build_layout(input_ids, attention_mask, tags, variant)
    logits = layout_logits(model, layout, attention_kernel(model, layout.input_ids.shape[1], kernel))
    if behaviour is not None and layout.source is not None:
        # a token's ban row goes to the column whose log-prob is its own (a threads path's copy)
        rows = torch.zeros_like(layout.input_ids).scatter_(1, layout.source, behaviour.ban_rows)
        behaviour = dataclasses.replace(behaviour, ban_rows=rows)
    logp, entropy = token_logprobs(logits, layout.input_ids, temperature, with_entropy, behaviour=behaviour)
    return layout.to_sequence(logp), layout.to_sequence(entropy)


# ----------------------------------------------------------------------------- long sequences
# The dense mask costs B * S * S elements. From LONG_SEQUENCE_TOKENS columns on, sdpa / eager models
# instead run `chunked_attention` (exact, in query pieces; `chunk_plan` derives the pieces' masks from
# the `Layout` once per forward), through a transformers attention function selected for the duration
# of the forward. docs/attention.md ("Long sequences") has the design and the measurements.

LONG_SEQUENCE_TOKENS = 4096
CHUNK_TOKENS = 1024
KERNELS = ("auto", "dense", "chunked")


def layout_logits(model, layout: Layout, kernel: str, logits_to_keep: torch.Tensor | None = None) -> torch.Tensor:
    """Logits [B, S or K, V] of `model` over the layout's rows with `kernel` ("dense": the backend's own
    mask, or "chunked"); with `logits_to_keep` (LongTensor[K] of columns) only those columns' logits."""
    keep = {} if logits_to_keep is None else {"logits_to_keep": logits_to_keep}
    if kernel == "chunked":
        with _chunked_backend(model):
            return model(
                input_ids=layout.input_ids,
                position_ids=layout.positions,
                use_cache=False,
                structured_plan=chunk_plan(layout),
                **keep,
            ).logits
    mask = model_attention(model, layout)
    return model(
        input_ids=layout.input_ids, attention_mask=mask, position_ids=layout.positions, use_cache=False, **keep
    ).logits


def can_chunk(model) -> bool:
    """Whether `model` can run the chunked kernel: an sdpa or eager model without gradient checkpointing."""
    backend = getattr(hf_config(model), "_attn_implementation", None)
    # Gradient checkpointing recomputes the forward during backward, after the backend is restored.
    checkpointing = getattr(model, "is_activation_checkpointing", None)
    if checkpointing is None:
        checkpointing = getattr(model, "is_gradient_checkpointing", False)
    return backend in DENSE_BACKENDS and not checkpointing


def attention_kernel(model, columns: int, kernel: str = "auto") -> str:
    """The kernel `response_logprobs` uses for rows of `columns` columns: "dense" or "chunked"."""
    if kernel not in KERNELS:
        raise ValueError(f"unknown attention kernel {kernel!r}; expected one of {KERNELS}")
    backend = getattr(hf_config(model), "_attn_implementation", None)
    chunkable = can_chunk(model)
    if kernel == "chunked" and not chunkable:
        raise ValueError(
            f"the chunked kernel needs an sdpa or eager model without gradient checkpointing, got {backend!r}"
        )
    if kernel == "auto":
        return "chunked" if chunkable and columns >= LONG_SEQUENCE_TOKENS else "dense"
    return kernel


def chunk_plan(layout: Layout, chunk: int | None = None) -> list[chunked_attention.Piece]:
    """The `chunked_attention` plan of `layout`: pieces of at most `chunk` queries, cut wherever a
    query's (seg, horizon) changes in any row, so that all queries of a piece see the same keys before
    it (`Layout`'s rule depends on the query only through seg and horizon there) and one row of
    `allowed` per piece is enough. Costs O(S * chunk + S * S / chunk) booleans, built once per forward."""
    chunk = CHUNK_TOKENS if chunk is None else chunk
    S = layout.seg.shape[1]
    change = torch.zeros(S - 1, dtype=torch.bool, device=layout.seg.device)
    for ids in (*(ids for level in layout.levels() for ids in level), *_group_doc(layout)):
        change |= (ids[:, 1:] != ids[:, :-1]).any(0)
    cuts = sorted(set(range(0, S, chunk)) | set((change.nonzero().flatten() + 1).tolist()) | {S})
    pieces = []
    for q0, q1 in zip(cuts[:-1], cuts[1:]):
        before, keys = None, None
        if q0 > 0:
            head = _columns(layout, 0, q0 + 1)
            before = allowed(head, q0, q0 + 1)[:, :, :q0]
            before, keys = _visible_keys(before, layout.group is not None)
        # The piece's own square: the rule only compares columns with each other and with the
        # (absolute) horizon, so shifting both by q0 gives the same answer on columns [q0, q1).
        diag = allowed(_columns(layout, q0, q1), 0, q1 - q0)
        causal = torch.ones(q1 - q0, q1 - q0, dtype=torch.bool, device=diag.device).tril().expand_as(diag)
        diag = None if torch.equal(diag, causal) else diag
        pieces.append(chunked_attention.Piece(q0, q1, before, diag, keys))
    return pieces


def _columns(layout: Layout, start: int, end: int) -> Layout:
    """The layout restricted to columns [start, end), renumbered from 0 (horizons shifted with them)."""
    return dataclasses.replace(
        layout,
        input_ids=layout.input_ids[:, start:end],
        real=layout.real[:, start:end],
        positions=layout.positions[:, start:end],
        seg=layout.seg[:, start:end],
        horizon=layout.horizon[:, start:end] - start,
        source=None,
        group=None if layout.group is None else layout.group[:, start:end],
        doc=None if layout.doc is None else layout.doc[:, start:end],
        inner=tuple((seg[:, start:end], horizon[:, start:end] - start) for seg, horizon in layout.inner),
    )


# ----------------------------------------------------------------------------- packed rows
# `parallel_r1.packing` lays several sequences (a group's prompt once and its responses, or rows side by
# side) in one row; `Layout.group` / `Layout.doc` say which columns belong together. The variant's rule
# above is unchanged: these add one condition to it.


def _group_doc(layout: Layout) -> tuple[torch.Tensor, torch.Tensor]:
    """(group, doc) LongTensor[B, S] of the layout; all zeros for an unpacked one (one sequence per row)."""
    if layout.group is None or layout.doc is None:
        zeros = torch.zeros_like(layout.seg)
        return zeros, zeros
    return layout.group, layout.doc


def _packed_rule(layout: Layout, q_start: int, q_end: int) -> torch.Tensor | bool:
    """Bool[B, Q, S]: key k is in query q's group, and is its group's shared prompt or of q's own doc."""
    if layout.group is None or layout.doc is None:
        return True
    group, doc = layout.group, layout.doc
    same_group = group[:, None, :] == group[:, q_start:q_end, None]
    return same_group & ((doc[:, None, :] == 0) | (doc[:, None, :] == doc[:, q_start:q_end, None]))


def _visible_keys(before: torch.Tensor, packed: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(mask, keys) of a piece's keys before it, from its one-row mask Bool[B, 1, q0]: in a packed layout
    only the columns some row's query sees (`keys`, LongTensor[K]) go to the kernel, so a response's piece
    skips the other sequences of its row; the mask is None when every remaining key is visible."""
    keys = None
    if packed:
        keys = before.any(1).any(0).nonzero().flatten()
        before = before[:, :, keys]
    return (None if before.all() else before), keys


@contextlib.contextmanager
def _chunked_backend(model):
    """Run `model`'s attention through `chunked_attention.attention_forward` inside the block."""
    chunked_attention.register()
    config = hf_config(model)
    saved = config._attn_implementation
    config._attn_implementation = chunked_attention.STRUCTURED_ATTENTION
    try:
        yield
    finally:
        config._attn_implementation = saved
