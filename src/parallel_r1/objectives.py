"""The GRPO objective as pure functions: advantages, ratios, the clipped surrogate, importance weights,
reward shaping, loss aggregation and entropy by region (docs/training.md, "Objectives").

Tensor shapes are in the names: B rows (responses), T tokens, P prompts, G group size, R regions. A
`mask_BT` is 1.0 on the tokens trained on (the response tokens the model sampled) and 0.0 elsewhere.
Nothing here knows about models, processes or configs; `grpo.py` calls these with its settings.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from parallel_r1.attention import tag_spans
from parallel_r1.format import TagIds

# ---------------------------------------------------------------------------------------------------
# Advantages and the groups that carry a signal.


def group_advantages(rewards_PG: torch.Tensor, scale: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """Advantages [P, G]: reward minus its group's mean, divided by the group's std when `scale`
    (GRPO); `scale=False` is Dr. GRPO's unscaled form. A group of equal rewards gets zeros."""
    centred_PG = rewards_PG - rewards_PG.mean(dim=1, keepdim=True)
    if not scale:
        return centred_PG
    return centred_PG / (rewards_PG.std(dim=1, keepdim=True) + eps)


def informative_groups(rewards_PG: torch.Tensor) -> torch.Tensor:
    """Bool [P]: True where the group's rewards are not all equal (zero-variance groups give no gradient)."""
    return (rewards_PG != rewards_PG[:, :1]).any(dim=1)


def refill_size(missing: int, sampled: int, kept: int, cap: int) -> int:
    """Prompts to sample in the next round of dynamic sampling (DAPO) so that `missing` more groups are
    informative, at the rate seen so far in the step (`kept` informative of `sampled`); at most `cap`, and
    `cap` when nothing was kept yet (the rate is unknown)."""
    if kept == 0:
        return cap
    return min(cap, math.ceil(missing * sampled / kept))


def overlong_penalty(lengths_B: torch.Tensor, max_tokens: int, buffer: int, factor: float) -> torch.Tensor:
    """DAPO's soft overlong punishment [B], added to the reward: 0 up to `max_tokens - buffer` tokens, then
    falling linearly to `-factor` at `max_tokens`:

        penalty = -factor * clamp((len - (max_tokens - buffer)) / buffer, 0, 1)
    """
    over_B = (lengths_B.float() - (max_tokens - buffer)).clamp(min=0.0)
    return -factor * (over_B / buffer).clamp(max=1.0)


# ---------------------------------------------------------------------------------------------------
# Ratios and the clipped surrogate.


def policy_log_ratio(
    logp_BT: torch.Tensor, old_logp_BT: torch.Tensor, mask_BT: torch.Tensor, level: str = "token"
) -> torch.Tensor:
    """log r: [B, T] per token (PPO, GRPO) or [B, 1] per sequence (GSPO, arXiv 2507.18071).

    token: logp - old_logp. sequence: the mean over a row's trained tokens of logp - old_logp, i.e.
    log s_i with s_i = (pi(y_i) / pi_old(y_i)) ** (1 / |y_i|), one ratio (and one clip decision) per response.
    """
    log_ratio_BT = logp_BT - old_logp_BT
    if level == "token":
        return log_ratio_BT
    total_B1 = (log_ratio_BT * mask_BT).sum(dim=1, keepdim=True)
    return total_B1 / mask_BT.sum(dim=1, keepdim=True).clamp(min=1.0)


def clipped_policy_loss(
    log_ratio_BT: torch.Tensor, adv_B: torch.Tensor, clip_low: float, clip_high: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-token loss, clipped bool) of the PPO surrogate with separate clip bounds, both shaped like
    `log_ratio_BT` ([B, T], or [B, 1] for sequence ratios, which broadcast over the row's tokens).

    loss = max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high)) with r = exp(log_ratio); `clipped`
    marks where the clipped term is the larger one (its gradient is zero there).
    """
    ratio_BT = torch.exp(log_ratio_BT)
    adv_B1 = adv_B[:, None]
    unclipped_BT = -adv_B1 * ratio_BT
    clipped_BT = -adv_B1 * ratio_BT.clamp(1.0 - clip_low, 1.0 + clip_high)
    return torch.maximum(unclipped_BT, clipped_BT), clipped_BT > unclipped_BT


def kl_k3(logp_BT: torch.Tensor, ref_logp_BT: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate [B, T] of KL(policy || reference): exp(d) - d - 1 with d = ref - logp (>= 0)."""
    d_BT = ref_logp_BT - logp_BT
    return torch.exp(d_BT) - d_BT - 1.0


# ---------------------------------------------------------------------------------------------------
# Sampler against trainer.


def tis_weights(
    old_logp_BT: torch.Tensor,
    sampler_logp_BT: torch.Tensor,
    cap: float,
    mode: str = "token_truncate",
    mask_BT: torch.Tensor | None = None,
) -> torch.Tensor:
    """Importance weights [B, T] of the trainer's distribution against the sampler's, capped.

    The rollouts came from the sampler's distribution, while the surrogate is an expectation under the
    trainer's: weighting by the ratio of the two corrects the gradient, and the cap bounds the variance that
    a large ratio would add. w = exp(old_logp - sampler_logp) per token (token_*), or per sequence
    exp(sum over its trained tokens (`mask_BT`) of old_logp - sampler_logp) on every token of the row
    (sequence_*); *_truncate: min(w, cap) (verl's TIS); *_mask: w, but 0 where w > cap (the sequence is
    dropped from the loss: TRL's default, sequence_mask).
    """
    log_w_BT = old_logp_BT - sampler_logp_BT
    if mode.startswith("sequence"):
        log_w_BT = (log_w_BT * mask_BT).sum(dim=1, keepdim=True).expand_as(log_w_BT)
    w_BT = torch.exp(log_w_BT)
    if mode.endswith("truncate"):
        return w_BT.clamp(max=cap)
    return w_BT.masked_fill(w_BT > cap, 0.0)


def tis_cut(weight_BT: torch.Tensor, cap: float, mode: str) -> torch.Tensor:
    """Bool [B, T]: where `tis_weights` cut the weight (truncated at the cap, or masked to 0)."""
    return weight_BT >= cap if mode.endswith("truncate") else weight_BT == 0


def logprob_gap(logp_BT: torch.Tensor, sampler_logp_BT: torch.Tensor, mask_BT: torch.Tensor, threshold: float) -> dict:
    """Sums over masked tokens of |logp - sampler_logp|: {gap_sum, gap_max, gap_over (count above
    `threshold`), gap_tokens}, as floats to add up over micro-batches and processes."""
    gap_BT = (logp_BT.detach() - sampler_logp_BT).abs() * mask_BT
    return {
        "gap_sum": gap_BT.sum().item(),
        "gap_max": gap_BT.max().item() if gap_BT.numel() else 0.0,
        "gap_over": ((gap_BT > threshold) & (mask_BT > 0)).sum().item(),
        "gap_tokens": mask_BT.sum().item(),
    }


def add_gap(sums: dict[str, float], gap: dict[str, float]) -> None:
    """Fold one `logprob_gap` into running sums (the maximum stays a maximum)."""
    for key, value in gap.items():
        sums[key] = max(sums.get(key, 0.0), value) if key == "gap_max" else sums.get(key, 0.0) + value


# ---------------------------------------------------------------------------------------------------
# Aggregation.

LOSS_AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean")


def token_mean(values_BT: torch.Tensor, mask_BT: torch.Tensor, num_tokens: float | None = None) -> torch.Tensor:
    """Token-level aggregation: sum of values over masked tokens / num_tokens (default: mask.sum()).
    Passing the whole mini-batch's token count lets micro-batches add up to the mini-batch mean."""
    total = (values_BT * mask_BT).sum()
    if num_tokens is None:
        return total / mask_BT.sum().clamp(min=1.0)
    return total * (1.0 / max(float(num_tokens), 1.0))


def aggregate_loss(
    values_BT: torch.Tensor, mask_BT: torch.Tensor, mode: str, num_tokens: float, num_sequences: float
) -> torch.Tensor:
    """A micro-batch's share of the mini-batch loss, in verl's `loss_agg_mode` names (N: the mini-batch's
    trained tokens, S: its rows with a trained token, both over every process):

        token-mean           sum_i sum_t l_it / N            (DAPO; this project's default)
        seq-mean-token-sum   sum_i sum_t l_it / S
        seq-mean-token-mean  sum_i (sum_t l_it / |y_i|) / S  (the GRPO paper's; GSPO's)
    """
    if mode not in LOSS_AGG_MODES:
        raise ValueError(f"unknown loss aggregation {mode!r}; expected one of {LOSS_AGG_MODES}")
    if mode == "token-mean":
        return token_mean(values_BT, mask_BT, num_tokens)
    per_row_B = (values_BT * mask_BT).sum(dim=1)
    if mode == "seq-mean-token-mean":
        per_row_B = per_row_B / mask_BT.sum(dim=1).clamp(min=1.0)
    return per_row_B.sum() * (1.0 / max(float(num_sequences), 1.0))


# ---------------------------------------------------------------------------------------------------
# Where a token sits in a parallel response.

REGIONS = ("main", "path", "summary")  # region ids 0, 1, 2


def token_regions(input_ids_BT: torch.Tensor, tags: TagIds) -> torch.Tensor:
    """Long [B, T]: the region of each token, by the tags' ids (an index into `REGIONS`): 1 from a `<Path>`
    through its `</Path>` (or to the end of a path cut off), 2 from `<Summary>` through `</Summary>`, 0
    (the main thread) elsewhere, `<Parallel>` and `</Parallel>` included."""
    regions_BT = torch.zeros_like(input_ids_BT)
    regions_BT[tag_spans(input_ids_BT == tags.path_open, input_ids_BT == tags.path_close)[1]] = 1
    regions_BT[tag_spans(input_ids_BT == tags.summary_open, input_ids_BT == tags.summary_close)[1]] = 2
    return regions_BT


def region_sums(values_BT: torch.Tensor, mask_BT: torch.Tensor, regions_BT: torch.Tensor) -> torch.Tensor:
    """[2, R]: per region, the sum of `values` over masked tokens (row 0) and their count (row 1)."""
    onehot_BTR = F.one_hot(regions_BT, len(REGIONS)).to(values_BT.dtype) * mask_BT[..., None]
    return torch.stack([(values_BT[..., None] * onehot_BTR).sum(dim=(0, 1)), onehot_BTR.sum(dim=(0, 1))])
