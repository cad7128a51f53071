"""Exact attention under a structured mask, in query pieces: memory grows with T, not T * T.

The queries are cut into pieces [q0, q1). Each piece attends to two key ranges, merged exactly by
their log-sum-exps (as in flash / ring attention):

* the keys before the piece, [0, q0) or only the columns `keys` of it, under `before`: Bool[B, 1, K]
  when every query of the piece sees the same keys there (a structured piece: plain causal text, or one
  path of a block), so the mask is one row broadcast over the queries; Bool[B, Q, K] otherwise; None
  when all are visible (K: q0, or the number of `keys`; a packed row's piece skips the other sequences);
* the piece's own keys, [q0, q1), under `diag`: Bool[B, Q, Q], or None for plain causal.

A `Plan` is the list of pieces; it is built once per forward (`parallel_r1.attention.chunk_plan` cuts
at every change of the structure, so all its pieces broadcast one row) and shared by all layers and
the backward pass. Autograd keeps q, k, v, the output and one log-sum-exp per query and head, as a
flash-attention kernel does; the backward runs the kernels' backward piece by piece with the merged
output and log-sum-exp. Nothing of size T * T is ever built.

On CPU the pieces run PyTorch's fused flash-attention kernel (`_scaled_dot_product_flash_attention_for_cpu`
and its backward: additive or causal masks, log-sum-exp returned), so a broadcast row costs no more
than sdpa's `is_causal`. Elsewhere a plain-PyTorch version of the same piece forward / backward runs
(`[B, H, Q, K]` scores per piece); on GPU `flex_attention` with a `BlockMask` is the faster route.

`attention_forward` is this computation as a Hugging Face attention function (registered with
`transformers.AttentionInterface` as `STRUCTURED_ATTENTION` by `register`); it reads the plan from the
`structured_plan` keyword argument, which `parallel_r1.attention.response_logprobs` passes through
the model's forward.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

STRUCTURED_ATTENTION = "parallel_r1_structured"
FUSED_ON_CPU = True  # False forces the plain-PyTorch piece kernels (the tests compare the two)


@dataclass(frozen=True)
class Piece:
    """Queries [q0, q1) and what they see: keys [0, q0) (or its columns `keys`) under `before`, keys
    [q0, q1) under `diag`."""

    q0: int
    q1: int
    before: torch.Tensor | None  # Bool[B, 1 or Q, K]; None: all visible
    diag: torch.Tensor | None  # Bool[B, Q, Q]; None: causal
    keys: torch.Tensor | None = None  # LongTensor[K]: the key columns of [0, q0) the piece reads; None: all

    def before_keys(self) -> torch.Tensor | slice | None:
        """What indexes the piece's keys before it: a slice of [0, q0), `keys`, or None when there are none."""
        if self.keys is None:
            return slice(0, self.q0) if self.q0 > 0 else None
        return self.keys if self.keys.numel() else None


Plan = Sequence[Piece]


def _additive(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """Bool[B, Q, K] -> additive [B, 1, Q, K] in `dtype` (0 allowed, finite minimum otherwise)."""
    if mask is None:
        return None
    out = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
    return out.masked_fill_(~mask, torch.finfo(dtype).min)[:, None]


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _fused(q: torch.Tensor) -> bool:
    return FUSED_ON_CPU and q.device.type == "cpu"


def _math_scores(q, k, mask, causal, scale, acc):
    scores = torch.matmul(q, k.transpose(-1, -2)).to(acc) * scale
    if mask is not None:
        scores = scores + mask.to(acc)
    if causal:
        Q, K = scores.shape[-2:]
        scores = scores.masked_fill(torch.ones(Q, K, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    return scores


def _forward(q, k, v, mask, causal, scale):
    """(out [B, H, Q, D], log-sum-exp [B, H, Q] in the accumulation dtype) of queries q against keys k."""
    if _fused(q):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, causal, attn_mask=mask, scale=scale
        )
        return out, lse
    scores = _math_scores(q, k, mask, causal, scale, _accumulation_dtype(q.dtype))
    lse = scores.logsumexp(-1)
    return torch.matmul((scores - lse[..., None]).exp().to(v.dtype), v), lse


def _backward(grad_out, q, k, v, out, lse, mask, causal, scale):
    """(dq, dk, dv) of this query / key range's share, given the merged output and log-sum-exp."""
    if _fused(q):
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad_out, q, k, v, out, lse, 0.0, causal, attn_mask=mask, scale=scale
        )
    acc = lse.dtype
    probs = (_math_scores(q, k, mask, causal, scale, acc) - lse[..., None]).exp()
    grad_v = torch.matmul(probs.to(v.dtype).transpose(-1, -2), grad_out)
    grad_probs = torch.matmul(grad_out, v.transpose(-1, -2)).to(acc)
    delta = (grad_out.to(acc) * out.to(acc)).sum(-1, keepdim=True)
    grad_scores = (probs * (grad_probs - delta) * scale).to(q.dtype)
    return torch.matmul(grad_scores, k), torch.matmul(grad_scores.transpose(-1, -2), q), grad_v


class _PlannedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan: Plan, scale: float):
        B, H, T, _ = q.shape
        out = q.new_empty(B, H, T, v.shape[-1])
        lse = q.new_empty(B, H, T, dtype=_accumulation_dtype(q.dtype))
        for p in plan:
            qc = q[:, :, p.q0 : p.q1]
            o, lo = _forward(
                qc, k[:, :, p.q0 : p.q1], v[:, :, p.q0 : p.q1], _additive(p.diag, q.dtype), p.diag is None, scale
            )
            keys = p.before_keys()
            if keys is not None:
                ob, lb = _forward(qc, k[:, :, keys], v[:, :, keys], _additive(p.before, q.dtype), False, scale)
                merged = torch.logaddexp(lo, lb)
                acc = merged.dtype
                o = o.to(acc) * (lo - merged).exp()[..., None] + ob.to(acc) * (lb - merged).exp()[..., None]
                lo = merged
            out[:, :, p.q0 : p.q1], lse[:, :, p.q0 : p.q1] = o, lo
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan, ctx.scale = plan, scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grad_q, grad_k, grad_v = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        for p in ctx.plan:
            s = slice(p.q0, p.q1)
            go, qc, oc, lc = grad_out[:, :, s], q[:, :, s], out[:, :, s], lse[:, :, s]
            diag = _additive(p.diag, q.dtype)
            gq, gk, gv = _backward(go, qc, k[:, :, s], v[:, :, s], oc, lc, diag, p.diag is None, ctx.scale)
            grad_q[:, :, s] += gq
            grad_k[:, :, s] += gk
            grad_v[:, :, s] += gv
            keys = p.before_keys()
            if keys is not None:
                before = _additive(p.before, q.dtype)
                gq, gk, gv = _backward(go, qc, k[:, :, keys], v[:, :, keys], oc, lc, before, False, ctx.scale)
                grad_q[:, :, s] += gq
                grad_k[:, :, keys] += gk  # keys are distinct columns, so indexed += adds each once
                grad_v[:, :, keys] += gv
        return grad_q, grad_k, grad_v, None, None


def planned_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: Plan, scale: float | None = None
) -> torch.Tensor:
    """Attention output [B, H, T, D] of q, k, v [B, H, T, D] under `plan`, differentiable in q, k, v.

    The pieces must cover [0, T) in order, and every query must see at least one key (itself).
    """
    if scale is None:
        scale = q.shape[-1] ** -0.5
    return _PlannedAttention.apply(q.contiguous(), k.contiguous(), v.contiguous(), plan, float(scale))


def attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    structured_plan: Plan | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """A `transformers` attention function: (output [B, T, H, D], None) under `structured_plan`."""
    if structured_plan is None:
        raise ValueError(
            f"attention implementation {STRUCTURED_ATTENTION!r} needs the `structured_plan` keyword; "
            "use parallel_r1.attention.response_logprobs"
        )
    if dropout:
        raise ValueError("structured chunked attention does not implement attention dropout")
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    out = planned_attention(query, key, value, structured_plan, scaling)
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Register `attention_forward` with transformers under `STRUCTURED_ATTENTION` (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(STRUCTURED_ATTENTION, attention_forward)
