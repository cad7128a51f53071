"""The sampler's state-dependent tag bans, and what the trainer needs to replay them.

The engine keeps the format well formed by banning tags by decoding state: only `</Path>` may close a
path, only `</Summary>` a summary, only `<Path>` ends a plan, `<Parallel>` is banned past the block cap,
and so on. Each state is a row of a [7, V] ban table; `ban_rows` replays from a response's tokens alone
which row each token was sampled under, and `Behaviour` carries rows, table and top-k/top-p to the
trainer so that its log-probs are those of the distribution the engine actually sampled from.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from parallel_r1.format import TagIds

# Ban-table rows: which tags each decoding state may not sample.
BAN_NONE, BAN_MAIN, BAN_MAIN_CAPPED, BAN_PATH, BAN_SUMMARY, BAN_PARALLEL, BAN_PLAN = range(7)


@dataclass
class Behaviour:
    """What the engine's sampler drew each token from, for the trainer to replay (`sampler.warp_scores`):
    `ban_rows` [B, T] the ban-table row of each token (`bans.ban_rows`), `table` [R, V] the engine's
    `ban_table`, and the top-k / top-p the rollout sampled with."""

    ban_rows: torch.Tensor
    table: torch.Tensor
    top_k: int = 0
    top_p: float = 1.0


def ban_table(tags: TagIds, vocab_size: int, device: torch.device) -> torch.Tensor:
    """[7, V] bool: row r holds the tokens banned in decoding state r (the BAN_* constants)."""
    all_tags = tags.as_tuple()
    banned = {
        BAN_NONE: [],
        BAN_MAIN: [t for t in all_tags if t != tags.parallel_open],
        BAN_MAIN_CAPPED: list(all_tags),
        BAN_PATH: [t for t in all_tags if t != tags.path_close],
        BAN_SUMMARY: [t for t in all_tags if t != tags.summary_close],
        BAN_PARALLEL: [tags.parallel_open],
        BAN_PLAN: [t for t in all_tags if t != tags.path_open],
    }
    table = torch.zeros(len(banned), vocab_size, dtype=torch.bool, device=device)
    for row, ids in banned.items():
        table[row, ids] = True
    return table


def ban_rows(response_ids: list[int], tags: TagIds, variant: str, max_blocks: int, plans: bool = False) -> list[int]:
    """The ban-table row (BAN_*) each response token was sampled under, replayed from the tokens alone:
    the decoding state `_Row.ban_row` reads when the engine samples it (`plans`: a block's plan, from its
    `<Parallel>` to its first `<Path>`, is sampled under BAN_PLAN). Rows of engine-inserted tokens are
    meaningless (they are not trained on)."""
    rows, blocks, state = [], 0, "main"
    for token in response_ids:
        capped = blocks >= max_blocks
        if variant == "seen":
            rows.append(BAN_PARALLEL if capped else BAN_NONE)
        elif state == "path":
            rows.append(BAN_PATH)
        elif state == "plan":
            rows.append(BAN_PLAN)
        else:
            rows.append(BAN_SUMMARY if state == "summary" else BAN_MAIN_CAPPED if capped else BAN_MAIN)
        if token == tags.parallel_open:
            blocks += 1
            state = "plan" if plans else state
        elif token == tags.path_open:
            state = "path"
        elif token == tags.path_close:
            state = "block"
        elif token == tags.summary_open:
            state = "summary"
        elif token == tags.summary_close:
            state = "main"
    return rows
