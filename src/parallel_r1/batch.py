"""Rollouts as training tensors: `collate_rollouts` stacks a step's rollouts into a left-padded
`RolloutBatch` (ids, masks, the engine's log-probs, advantages, importance weights, ban rows), which splits
into mini- and micro-batches; `recompute_logprobs` scores one under a model without gradients.

Shapes are in the names: B rows (responses), T tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from parallel_r1.attention import response_logprobs
from parallel_r1.bans import Behaviour
from parallel_r1.format import TagIds
from parallel_r1.packing import packed_logprobs


@dataclass
class RolloutBatch:
    """Left-padded training tensors for B rollouts of varying length."""

    input_ids_BT: torch.Tensor
    attention_mask_BT: torch.Tensor
    loss_mask_BT: torch.Tensor  # 1.0 on response tokens the model sampled
    old_logp_BT: torch.Tensor  # the policy's log-probs before the update: the engine's, or recomputed
    adv_B: torch.Tensor
    sampler_logp_BT: torch.Tensor  # the engine's sampling log-probs on response tokens, 0 elsewhere
    weight_BT: torch.Tensor  # per-token weight of the surrogate (1, or the TIS weight)
    ban_rows_BT: torch.Tensor  # long: the engine's ban-table row each token was sampled under (0 elsewhere)

    def to(self, device) -> RolloutBatch:
        return RolloutBatch(*(t.to(device) for t in vars(self).values()))

    def rows(self, index: list[int]) -> RolloutBatch:
        idx = torch.tensor(index, dtype=torch.long)
        return RolloutBatch(*(t[idx.to(t.device)] for t in vars(self).values()))

    def micro_batch(self, index: list[int]) -> RolloutBatch:
        """The given rows without the columns that are padding in all of them (rows are left-padded), so
        a micro-batch of short rows is not computed at the width of the step's longest."""
        part = self.rows(index)
        first = int(part.attention_mask_BT.any(0).nonzero()[0]) if part.attention_mask_BT.any() else 0
        return RolloutBatch(*(t[:, first:] if t.dim() == 2 else t for t in vars(part).values()))

    def by_length(self) -> list[int]:
        """Row indices, longest first: micro-batches of neighbours in this order carry little padding."""
        lengths = self.attention_mask_BT.sum(1).tolist()
        return sorted(range(len(lengths)), key=lambda i: -lengths[i])

    def prompt_lengths(self) -> list[int]:
        """Per row, the real tokens before its first trained one: its prompt, and any token the engine put
        in front of the response (`packing.packed_logprobs` shares and skips these; they are never trained)."""
        lengths = []
        for real, trained in zip(self.attention_mask_BT.bool(), self.loss_mask_BT > 0):
            first = int(trained.nonzero()[0]) if trained.any() else real.numel()
            lengths.append(int(real[:first].sum()))
        return lengths

    def logprobs(
        self, model, tags: TagIds, packed: bool = False, **scoring
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(log-probs [B, T], entropy [B, T] or None) of these rows under `model`: `response_logprobs` of
        the padded rows, or (`packed`) `packing.packed_logprobs` of one packed row, which gives the same
        values on every trained token (untrained ones may differ: they are masked out)."""
        if packed:
            return packed_logprobs(
                model, self.input_ids_BT, self.attention_mask_BT, self.prompt_lengths(), tags, **scoring
            )
        return response_logprobs(model, self.input_ids_BT, self.attention_mask_BT, tags, **scoring)

    def behaviour(self, table: torch.Tensor | None, top_k: int, top_p: float) -> Behaviour | None:
        """What the engine sampled these tokens from, given its ban `table` (None: score the unwarped
        softmax)."""
        return None if table is None else Behaviour(self.ban_rows_BT, table, top_k, top_p)


def collate_rollouts(
    rollouts: list, advantages: list[float], pad_id: int, response_ban_rows: list[list[int]] | None = None
) -> RolloutBatch:
    """Stack `prompt_ids + response_ids` of each rollout, left-padded to the longest; `response_ban_rows`
    (`bans.ban_rows` of each rollout's response) fill `ban_rows_BT`, zeros without them."""
    width = max(len(r.prompt_ids) + len(r.response_ids) for r in rollouts)
    ids, attn, loss, old, rows = [], [], [], [], []
    for k, r in enumerate(rollouts):
        pad = width - len(r.prompt_ids) - len(r.response_ids)
        head = pad + len(r.prompt_ids)
        ids.append([pad_id] * pad + list(r.prompt_ids) + list(r.response_ids))
        attn.append([0] * pad + [1] * (len(r.prompt_ids) + len(r.response_ids)))
        loss.append([0.0] * head + [1.0 if s else 0.0 for s in r.sampled_mask])
        old.append([0.0] * head + [float(lp) for lp in r.logprobs])
        rows.append([0] * head + (response_ban_rows[k] if response_ban_rows else [0] * len(r.response_ids)))
    sampler = torch.tensor(old, dtype=torch.float32)
    loss_mask = torch.tensor(loss)
    return RolloutBatch(
        torch.tensor(ids),
        torch.tensor(attn),
        loss_mask,
        sampler.clone(),
        torch.tensor(advantages, dtype=torch.float32),
        sampler,
        torch.ones_like(loss_mask),
        torch.tensor(rows, dtype=torch.long),
    )


@torch.no_grad()
def recompute_logprobs(
    model,
    batch: RolloutBatch,
    tags: TagIds,
    variant: str,
    temperature: float,
    micro_batch_size: int,
    ban_table: torch.Tensor | None = None,
    top_k: int = 0,
    top_p: float = 1.0,
    packed: bool = False,
) -> torch.Tensor:
    """Log-probs [B, T] of the batch under `model` (no grad), micro-batch by micro-batch (`packed`: each one
    packed row, `RolloutBatch.logprobs`); with the engine's `ban_table`, of the distribution it sampled from
    (`RolloutBatch.behaviour`)."""
    was_training = model.training
    model.eval()
    B, T = batch.input_ids_BT.shape
    out_BT = torch.zeros(B, T, device=batch.input_ids_BT.device)
    order = batch.by_length()
    for start in range(0, B, micro_batch_size):
        index = order[start : start + micro_batch_size]
        part = batch.micro_batch(index)
        logp, _ = part.logprobs(
            model,
            tags,
            packed,
            variant=variant,
            temperature=temperature,
            behaviour=part.behaviour(ban_table, top_k, top_p),
        )
        # where, not a product: under behaviour log-probs an untrained token may be -inf (see policy_update)
        logp = torch.where(part.loss_mask_BT > 0, logp, 0.0)
        out_BT[torch.tensor(index, device=out_BT.device), T - logp.shape[1] :] = logp
    model.train(was_training)
    return out_BT
