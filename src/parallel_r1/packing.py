"""Packed rows for the GRPO update: a group's prompt computed once, and no padding.

A GRPO step trains n responses per prompt. As B padded rows of prompt + response (`batch.RolloutBatch`)
the prompt's forward and backward run n times and every row is as wide as the longest. Packed, the
micro-batch becomes one row holding, for every group of rows that share a prompt, a tree

    [prompt | response_1 | ... | response_n]

with the trees side by side and no padding. Each response keeps the columns of its own `Layout` (the
variant's rule, positions, an Unseen path's segment, a threads path's copies), so a response token
sees exactly what it sees in its own row: `Layout.group` / `Layout.doc` add that a column sees only its
own tree, and there only the shared prompt (doc 0) and its own response. Logits are computed only for
the columns that predict a response token (`logits_to_keep`), and each response token's log-prob is
scattered back to its place in the [B, T] rows the loss reads, so the objective does not change.

Exact by construction: every response token attends to the same keys at the same positions as in its
own row, so log-probs, losses and gradients equal the padded rows' up to float summation order
(tests/test_packing.py). Prompt tokens get log-prob 0 (they are never trained on).

On sdpa / eager models the packed row runs `chunked_attention` (pieces cut at every response, each
reading only its prompt and its own keys); elsewhere the backend's own mask of the packed row (flex
attention's `BlockMask` skips the other trees' tiles; a dense mask costs S * S for the packed S).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from parallel_r1.attention import (
    FLEX_BACKEND,
    Layout,
    build_layout,
    can_chunk,
    hf_config,
    layout_logits,
    scored_targets,
)
from parallel_r1.bans import Behaviour
from parallel_r1.format import TagIds

SCORE_CHUNK = 512  # response tokens scored at once: bounds the [chunk, V] float temporaries


@dataclass
class Packed:
    """One packed row and where its scores go: token (rows_N[i], cols_N[i]) of the [B, T] rows is
    predicted by kept column pred_N[i] (an index into `kept`)."""

    layout: Layout  # [1, S]: the trees side by side, `group` / `doc` set
    kept: torch.Tensor  # LongTensor[K]: packed columns whose logits are computed
    rows_N: torch.Tensor  # LongTensor[N]
    cols_N: torch.Tensor  # LongTensor[N]: text columns of the scored (response) tokens
    pred_N: torch.Tensor  # LongTensor[N]


def prompt_groups(
    input_ids_BT: torch.Tensor, attention_mask_BT: torch.Tensor, prompt_len_B: list[int]
) -> list[list[int]]:
    """Rows that share their prompt (same tokens), in order of first appearance: each group is one tree."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for b, length in enumerate(prompt_len_B):
        first = int(attention_mask_BT[b].nonzero()[0]) if attention_mask_BT[b].any() else 0
        key = tuple(input_ids_BT[b, first : first + length].tolist())
        groups.setdefault(key, []).append(b)
    return list(groups.values())


def pack(layout: Layout, text_width: int, prompt_len_B: list[int], groups: list[list[int]]) -> Packed:
    """The packed row of `layout` ([B, S] rows of `build_layout`, left or right padded, T = `text_width`
    text columns): each group of `groups` (rows with the same first prompt_len_B[b] real tokens) one tree,
    its prompt from its first row; a response holds every other real column of its row, copies included."""
    B, S = layout.input_ids.shape
    device = layout.input_ids.device
    to_packed = torch.full((B, S), -1, dtype=torch.long, device=device)
    src_rows, src_cols, group_ids, doc_ids = [], [], [], []
    width = 0

    def place(b: int, cols: torch.Tensor, group: int, doc: int) -> torch.Tensor:
        nonlocal width
        where = torch.arange(width, width + len(cols), device=device)
        src_rows.append(torch.full_like(cols, b))
        src_cols.append(cols)
        group_ids.append(torch.full_like(cols, group))
        doc_ids.append(torch.full_like(cols, doc))
        width += len(cols)
        return where

    for g, rows in enumerate(groups):
        lead, prompt_len = rows[0], prompt_len_B[rows[0]]
        real_cols = [layout.real[b].nonzero().flatten() for b in rows]
        lead_prompt = real_cols[0][:prompt_len]
        shared = place(lead, lead_prompt, g, 0)
        for j, (b, cols) in enumerate(zip(rows, real_cols)):
            prompt = cols[:prompt_len]
            if prompt_len_B[b] != prompt_len or not torch.equal(
                layout.input_ids[b, prompt], layout.input_ids[lead, lead_prompt]
            ):
                raise ValueError(f"rows {lead} and {b} of a group do not share their prompt")
            to_packed[b, prompt] = shared
            to_packed[b, cols[prompt_len:]] = place(b, cols[prompt_len:], g, j + 1)

    rows_S, cols_S = torch.cat(src_rows), torch.cat(src_cols)

    def level(seg: torch.Tensor, horizon: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        horizon = horizon[rows_S, cols_S]
        horizon = torch.where(horizon >= 0, to_packed[rows_S, horizon.clamp(min=0)], -1)
        return seg[rows_S, cols_S][None], horizon[None]

    levels = [level(seg, horizon) for seg, horizon in layout.levels()]
    packed = Layout(
        input_ids=layout.input_ids[rows_S, cols_S][None],
        real=torch.ones(1, width, dtype=torch.bool, device=device),
        positions=layout.positions[rows_S, cols_S][None],
        seg=levels[0][0],
        horizon=levels[0][1],
        group=torch.cat(group_ids)[None],
        doc=torch.cat(doc_ids)[None],
        inner=tuple(levels[1:]),
    )

    # The response tokens of the text, each scored in its column of the layout (a threads copy's, via
    # `source`) after that column's predecessor in its own row.
    real_T = layout.real[:, :text_width]
    first_B = torch.where(real_T.any(1), real_T.long().argmax(1), 0)
    start_B = first_B + torch.tensor(prompt_len_B, device=device)
    cols_T = torch.arange(text_width, device=device)
    response_BT = real_T & (cols_T[None] >= start_B[:, None])
    rows_N, cols_N = response_BT.nonzero(as_tuple=True)
    column_N = cols_N if layout.source is None else layout.source[rows_N, cols_N]
    pred_packed = to_packed[rows_N, column_N - 1]
    keep = pred_packed >= 0
    rows_N, cols_N, pred_packed = rows_N[keep], cols_N[keep], pred_packed[keep]
    kept = pred_packed.unique(sorted=True)
    return Packed(packed, kept, rows_N, cols_N, torch.searchsorted(kept, pred_packed))


def packed_logprobs(
    model,
    input_ids_BT: torch.Tensor,
    attention_mask_BT: torch.Tensor,
    prompt_len_B: list[int],
    tags: TagIds,
    variant: str = "unseen",
    temperature: float = 1.0,
    with_entropy: bool = False,
    behaviour: Behaviour | None = None,
    share_prompts: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(logprobs [B, T], entropy [B, T] or None) of the response tokens (after each row's first
    prompt_len_B[b] real tokens) as `attention.response_logprobs` gives them, computed in one packed row:
    with `share_prompts` rows with the same prompt share one copy of it, else each row is its own tree.
    Prompt tokens (and padding) get 0."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if input_ids_BT.device.type == "cpu" and getattr(hf_config(model), "_attn_implementation", None) == FLEX_BACKEND:
        # Seen with torch 2.13: the process aborts ("malloc(): unaligned tcache chunk detected") on a packed row.
        raise ValueError(
            "flex attention on CPU cannot score packed rows (torch's CPU flex kernel aborts on them): "
            "load the model with attn_implementation 'sdpa', or set grpo.update_rows: padded"
        )
    B, T = input_ids_BT.shape
    layout = build_layout(input_ids_BT, attention_mask_BT, tags, variant)
    groups = prompt_groups(input_ids_BT, attention_mask_BT, prompt_len_B) if share_prompts else [[b] for b in range(B)]
    packed = pack(layout, T, prompt_len_B, groups)
    kernel = "chunked" if can_chunk(model) else "dense"
    logits_KV = layout_logits(model, packed.layout, kernel, logits_to_keep=packed.kept)[0]
    targets_N = input_ids_BT[packed.rows_N, packed.cols_N]
    logps, entropies = [], []
    for start in range(0, len(targets_N), SCORE_CHUNK):
        part = slice(start, start + SCORE_CHUNK)
        rows = None if behaviour is None else behaviour.ban_rows[packed.rows_N[part], packed.cols_N[part]]
        logp, entropy = scored_targets(
            logits_KV[packed.pred_N[part]], targets_N[part], temperature, with_entropy, behaviour, rows
        )
        logps.append(logp)
        entropies.append(entropy)
    dtype = torch.promote_types(logits_KV.dtype, torch.float32)

    def to_rows(values: list) -> torch.Tensor:
        flat = torch.cat(values) if values else logits_KV.new_zeros(0, dtype=dtype)
        return logits_KV.new_zeros(B, T, dtype=dtype).index_put((packed.rows_N, packed.cols_N), flat)

    return to_rows(logps), to_rows(entropies) if with_entropy else None
