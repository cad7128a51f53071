"""The Unseen (structured) attention mask and positions, and log-probabilities for training.

The rule is the one in docs/design.md ("The Unseen (structured) attention rule"); the rollout engine
reproduces it with a KV cache, so the two must agree token for token:

* a query sees keys at or before it that are not padding, except keys of another path of the same
  `<Parallel>` block when the query itself is in a path;
* every path of a block starts at the same position `s` (that of the block's first `<Path>`), and
  `</Parallel>` continues from `s + L`, L being the longest path's length.

Everything here is vectorised over the batch and the sequence (cumsum / cummax over tag masks, one
scatter for the longest path); there is no loop over tokens or blocks.

Backends: Hugging Face `sdpa` and `eager` take the dense additive float mask from `build_attention`
(eager mis-reads a boolean 4-D mask, so only the float form is produced); `flex_attention` takes the
`BlockMask` from `build_block_mask`. Any other `config._attn_implementation` (flash attention,
paged kernels) cannot take a custom mask, and `response_logprobs` refuses it with a clear error.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask

from parallel_r1.format import TagIds

VARIANTS = ("unseen", "seen")
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


def _structure(input_ids: torch.Tensor, tags: TagIds, real: torch.Tensor):
    """(block_id, path_id, offset in path, closes) for every token, each [B, T].

    The first three are LongTensor with -1 outside; `closes` is Bool, True on a `</Parallel>` that ends a block.
    """
    is_open = (input_ids == tags.parallel_open) & real
    is_close = (input_ids == tags.parallel_close) & real
    last_open = _last_index(is_open)
    # The `</Parallel>` token is still inside its block, so only closes strictly before t count.
    last_close_before = F.pad(_last_index(is_close)[:, :-1], (1, 0), value=-1)
    in_block = (last_open >= 0) & (last_open > last_close_before) & real
    block_id = torch.where(in_block, is_open.long().cumsum(1) - 1, -1)

    is_path_open = (input_ids == tags.path_open) & in_block
    last_path_open = _last_index(is_path_open)
    # A path runs from its `<Path>` to the next `<Path>` or `</Parallel>` of the same block.
    in_path = in_block & (last_path_open > last_open) & ~is_close
    path_id = torch.where(in_path, is_path_open.long().cumsum(1) - 1, -1)
    idx = torch.arange(input_ids.shape[1], device=input_ids.device)
    offset = torch.where(in_path, idx - last_path_open, -1)
    return block_id, path_id, offset, is_close & in_block


def structure_ids(
    input_ids: torch.Tensor, tags: TagIds, attention_mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(block_id, path_id), both LongTensor[B, T] with -1 outside a block / path.

    Ids are unique within a row (the k-th block of a row has block_id k, the k-th path path_id k).
    A path spans from its `<Path>` up to, not including, the next `<Path>` or `</Parallel>`; tokens
    between `<Parallel>` and the first `<Path>` are in the block but in no path. Padding is -1.
    """
    block_id, path_id, _, _ = _structure(input_ids, tags, _real_mask(input_ids, attention_mask))
    return block_id, path_id


def build_positions(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None, tags: TagIds, variant: str = "unseen"
) -> torch.Tensor:
    """position_ids LongTensor[B, T]: real tokens count from 0, padding gets 0.

    Unseen: a path's j-th token sits at `s + j` (s: position of the block's first `<Path>`), and the
    `</Parallel>` closing the block at `s + L` (L: longest path of the block, in tokens).
    """
    _check_variant(variant)
    real = _real_mask(input_ids, attention_mask)
    if variant == "seen":
        return torch.where(real, real.long().cumsum(1) - 1, 0)
    block_id, path_id, offset, closes = _structure(input_ids, tags, real)
    in_path = path_id >= 0
    # Longest path of each block: the largest offset + 1 among its tokens (slot 0 collects non-path tokens).
    slots = torch.zeros(input_ids.shape[0], input_ids.shape[1] + 1, dtype=torch.long, device=input_ids.device)
    longest = slots.scatter_reduce(1, torch.where(in_path, block_id + 1, 0), offset + 1, reduce="amax")
    jump = torch.where(closes, longest.gather(1, block_id + 1), 0).cumsum(1)
    # Non-path tokens count up by one, plus the length L of every block closed so far; paths restart
    # at the position the first `<Path>` would have had.
    outside = (real & ~in_path).long().cumsum(1)
    positions = torch.where(in_path, outside + jump + offset, outside - 1 + jump)
    return torch.where(real, positions, 0)


def _allowed(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, tags: TagIds, variant: str) -> torch.Tensor:
    """Bool[B, T, T]: allowed[b, q, k] is True when query q may attend to key k."""
    _check_variant(variant)
    real = _real_mask(input_ids, attention_mask)
    T = input_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=input_ids.device).tril()
    allowed = causal & real[:, None, :]
    if variant == "unseen":
        block_id, path_id, _, _ = _structure(input_ids, tags, real)
        # Isolated iff both are in paths of the same block and the paths differ. The sentinels for
        # tokens outside paths differ between the query and key sides, so they never match.
        group_q = torch.where(path_id >= 0, block_id, -1)[:, :, None]
        group_k = torch.where(path_id >= 0, block_id, -2)[:, None, :]
        allowed &= (group_q != group_k) | (path_id[:, :, None] == path_id[:, None, :])
    # Padding queries see themselves so that no row is fully masked (a fully masked row gives NaN
    # gradients in some kernels); their outputs are never used.
    eye = torch.eye(T, dtype=torch.bool, device=input_ids.device)
    return allowed | (eye & ~real[:, :, None])


def build_attention(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    tags: TagIds,
    variant: str = "unseen",
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask Tensor[B, 1, T, T] in `dtype`, position_ids LongTensor[B, T]) for sdpa / eager attention.

    The mask is additive: 0 where attention is allowed, `torch.finfo(dtype).min` where it is not
    (finite, as Hugging Face's own masks, so a score plus the mask never turns into NaN).
    Costs B * T * T * dtype-size bytes: see docs/attention.md.
    """
    allowed = _allowed(input_ids, attention_mask, tags, variant)
    mask = torch.full(allowed.shape, torch.finfo(dtype).min, dtype=dtype, device=input_ids.device)
    mask.masked_fill_(allowed, 0.0)
    return mask[:, None], build_positions(input_ids, attention_mask, tags, variant)


def build_block_mask(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None, tags: TagIds, variant: str = "unseen"
):
    """(BlockMask, position_ids LongTensor[B, T]) for `flex_attention`; same rule as `build_attention`.

    The BlockMask stores 128 x 128 tiles, skipping fully masked ones, so memory grows with the number
    of tiles rather than with T * T.
    """
    _check_variant(variant)
    real = _real_mask(input_ids, attention_mask)
    block_id, path_id, _, _ = _structure(input_ids, tags, real)
    isolate = variant == "unseen"

    def mask_mod(b, h, q, k):
        pq, pk = path_id[b, q], path_id[b, k]
        other_path = (pq >= 0) & (pk >= 0) & (pq != pk) & (block_id[b, q] == block_id[b, k])
        visible = (k <= q) & real[b, k] & ~(other_path & isolate)
        return visible | ((q == k) & ~real[b, q])

    B, T = input_ids.shape
    block_mask = create_block_mask(mask_mod, B, None, T, T, device=input_ids.device)
    return block_mask, build_positions(input_ids, attention_mask, tags, variant)


def model_attention(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, tags: TagIds, variant: str):
    """(mask in the form `model`'s attention backend takes, position_ids) or a ValueError naming the backend."""
    backend = getattr(model.config, "_attn_implementation", None)
    if backend in DENSE_BACKENDS:
        return build_attention(input_ids, attention_mask, tags, variant, dtype=model.dtype)
    if backend == FLEX_BACKEND:
        return build_block_mask(input_ids, attention_mask, tags, variant)
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
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs Tensor[B, T] of input_ids[:, t] under logits[:, t-1] / temperature; column 0 is 0.

    Works chunk by chunk along T with gather + logsumexp, so no [B, T, V] log-softmax is built.
    Entropy (if asked) is that of the distribution that predicted token t; column 0 is 0.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    B, T = input_ids.shape
    logps, entropies = [], []
    for start in range(0, T - 1, chunk):
        z = logits[:, start : min(start + chunk, T - 1)].float()
        if temperature != 1.0:
            z = z / temperature
        lse = z.logsumexp(-1)
        target = input_ids[:, start + 1 : start + 1 + z.shape[1]]
        logps.append(z.gather(-1, target.unsqueeze(-1)).squeeze(-1) - lse)
        if with_entropy:
            entropies.append(lse - (z.softmax(-1) * z).sum(-1))
    zero = logits.new_zeros(B, 1, dtype=torch.float32)
    logp = torch.cat([zero, *logps], dim=1)
    entropy = torch.cat([zero, *entropies], dim=1) if with_entropy else None
    return logp, entropy


def response_logprobs(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    tags: TagIds,
    variant: str = "unseen",
    temperature: float = 1.0,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(logprobs Tensor[B, T], entropy Tensor[B, T] or None) of a Hugging Face causal LM, differentiable.

    logprobs[:, t] = log softmax(logits[:, t-1] / temperature)[input_ids[:, t]], under the `variant`
    mask and positions; column 0 (and padding's neighbours) are meaningless and must be loss-masked.
    Note that the prediction of a later path's `<Path>` and of `</Parallel>` comes from the previous
    token in sequence order (the end of the path before), not from the context the engine had when it
    inserted them; those tokens are engine-inserted and not trained on in RL.
    """
    mask, position_ids = model_attention(model, input_ids, attention_mask, tags, variant)
    logits = model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, use_cache=False).logits
    return token_logprobs(logits, input_ids, temperature, with_entropy)
