"""Rollouts as training tensors: `collate_rollouts` stacks a step's rollouts into a left-padded
`RolloutBatch` (ids, masks, the engine's log-probs, advantages, importance weights, ban rows), which splits
into mini- and micro-batches; `batch_logprobs` scores a micro-batch as padded rows or packed
(`parallel_r1.packing`: no padding, a group's prompt once), `recompute_logprobs` without gradients.

Shapes are in the names: B rows (responses), T tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from parallel_r1.attention import response_logprobs
from parallel_r1.bans import Behaviour
from parallel_r1.format import TagIds
from parallel_r1.packing import packed_logprobs, prompt_groups

# How the update lays out a micro-batch (GRPOConfig.update_rows): padded rows of prompt + response;
# packed, one row without padding; grouped, packed with each group's prompt once.
UPDATE_ROWS = ("padded", "packed", "grouped")


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
    prompt_len_B: torch.Tensor | None = None  # long: prompt tokens of each row (needed by packed rows)

    def _map(self, fn) -> RolloutBatch:
        return RolloutBatch(*(None if t is None else fn(t) for t in vars(self).values()))

    def to(self, device) -> RolloutBatch:
        return self._map(lambda t: t.to(device))

    def rows(self, index: list[int]) -> RolloutBatch:
        idx = torch.tensor(index, dtype=torch.long)
        return self._map(lambda t: t[idx.to(t.device)])

    def micro_batch(self, index: list[int]) -> RolloutBatch:
        """The given rows without the columns that are padding in all of them (rows are left-padded), so
        a micro-batch of short rows is not computed at the width of the step's longest."""
        part = self.rows(index)
        first = int(part.attention_mask_BT.any(0).nonzero()[0]) if part.attention_mask_BT.any() else 0
        return part._map(lambda t: t[:, first:] if t.dim() == 2 else t)

    def by_length(self) -> list[int]:
        """Row indices, longest first: micro-batches of neighbours in this order carry little padding."""
        lengths = self.attention_mask_BT.sum(1).tolist()
        return sorted(range(len(lengths)), key=lambda i: -lengths[i])

    def micro_batches(self, rows: str, size: int, tokens: int = 0) -> list[list[int]]:
        """Row indices of each micro-batch under `rows` (`UPDATE_ROWS`). padded: `size` rows, longest
        first. packed / grouped: rows (grouped: whole groups of rows sharing a prompt, longest first) while
        the micro-batch holds at most `size` rows, or with `tokens` > 0 at most `tokens` packed tokens;
        never empty."""
        if rows not in UPDATE_ROWS:
            raise ValueError(f"unknown update_rows {rows!r}; expected one of {UPDATE_ROWS}")
        order = self.by_length()
        if rows == "padded":
            return [order[start : start + size] for start in range(0, len(order), size)]
        lengths = self.attention_mask_BT.sum(1).tolist()
        units = [[b] for b in order]
        if rows == "grouped":
            units = prompt_groups(self.input_ids_BT, self.attention_mask_BT, self.prompt_lengths())
            units.sort(key=lambda g: -max(lengths[b] for b in g))
        prompt = self.prompt_lengths()
        out: list[list[int]] = []
        used = 0
        for unit in units:
            cost = sum(lengths[b] for b in unit)
            if rows == "grouped":
                cost -= prompt[unit[0]] * (len(unit) - 1)
            if not out or (used + cost > tokens if tokens > 0 else len(out[-1]) + len(unit) > size):
                out.append([])
                used = 0
            out[-1] += unit
            used += cost
        return out

    def prompt_lengths(self) -> list[int]:
        """Per row, its prompt's length (from `collate_rollouts`): what a group's rows share."""
        if self.prompt_len_B is None:
            raise ValueError("packed rows need the rows' prompt lengths (RolloutBatch.prompt_len_B)")
        return self.prompt_len_B.tolist()

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
        torch.tensor([len(r.prompt_ids) for r in rollouts], dtype=torch.long),
    )


def batch_logprobs(
    model,
    part: RolloutBatch,
    tags: TagIds,
    rows: str,
    variant: str,
    temperature: float,
    with_entropy: bool = False,
    behaviour: Behaviour | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(logprobs [B, T], entropy [B, T] or None) of the micro-batch `part` laid out as `rows`
    (`UPDATE_ROWS`); on response tokens every layout gives the same values (packed rows give 0 on prompts)."""
    scoring = {"variant": variant, "temperature": temperature, "with_entropy": with_entropy, "behaviour": behaviour}
    inputs = (part.input_ids_BT, part.attention_mask_BT)
    if rows == "padded":
        return response_logprobs(model, *inputs, tags, **scoring)
    return packed_logprobs(model, *inputs, part.prompt_lengths(), tags, **scoring, share_prompts=rows == "grouped")


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
    rows: str = "padded",
    micro_batch_tokens: int = 0,
) -> torch.Tensor:
    """Log-probs [B, T] of the batch under `model` (no grad), micro-batch by micro-batch laid out as
    `rows` (`RolloutBatch.micro_batches`); with the engine's `ban_table`, of the distribution it sampled
    from (`RolloutBatch.behaviour`)."""
    was_training = model.training
    model.eval()
    B, T = batch.input_ids_BT.shape
    out_BT = torch.zeros(B, T, device=batch.input_ids_BT.device)
    for index in batch.micro_batches(rows, micro_batch_size, micro_batch_tokens):
        part = batch.micro_batch(index)
        behaviour = part.behaviour(ban_table, top_k, top_p)
        logp, _ = batch_logprobs(model, part, tags, rows, variant, temperature, behaviour=behaviour)
        # where, not a product: under behaviour log-probs an untrained token may be -inf (see policy_update)
        logp = torch.where(part.loss_mask_BT > 0, logp, 0.0)
        out_BT[torch.tensor(index, device=out_BT.device), T - logp.shape[1] :] = logp
    model.train(was_training)
    return out_BT
