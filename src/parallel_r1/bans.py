"""The sampler's state-dependent tag bans, and what the trainer needs to replay them.

The engine keeps the format well formed by banning tags by decoding state: only `</Path>` may close a
path, only `</Summary>` a summary, only `<Path>` ends a plan, `<Parallel>` is banned past the block cap and,
inside a path, at the nesting cap, and so on. Each state is a row of a [8, V] ban table; `ban_rows` replays
from a response's tokens alone which row each token was sampled under, and `Behaviour` carries rows, table
and top-k/top-p to the trainer so that its log-probs are those of the distribution the engine actually
sampled from.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from parallel_r1.format import PlanLines, TagIds

# Ban-table rows: which tags each decoding state may not sample.
BAN_NONE, BAN_MAIN, BAN_MAIN_CAPPED, BAN_PATH, BAN_SUMMARY, BAN_PARALLEL, BAN_PLAN, BAN_PATH_NEST = range(8)


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
    """[8, V] bool: row r holds the tokens banned in decoding state r (the BAN_* constants)."""
    all_tags = tags.as_tuple()
    banned = {
        BAN_NONE: [],
        BAN_MAIN: [t for t in all_tags if t != tags.parallel_open],
        BAN_MAIN_CAPPED: list(all_tags),
        BAN_PATH: [t for t in all_tags if t != tags.path_close],
        BAN_SUMMARY: [t for t in all_tags if t != tags.summary_close],
        BAN_PARALLEL: [tags.parallel_open],
        BAN_PLAN: [t for t in all_tags if t != tags.path_open],
        BAN_PATH_NEST: [t for t in all_tags if t not in (tags.path_close, tags.parallel_open)],
    }
    table = torch.zeros(len(banned), vocab_size, dtype=torch.bool, device=device)
    for row, ids in banned.items():
        table[row, ids] = True
    return table


class BanTable:
    """A ban table that grows: the 8 state rows of `ban_table`, then one row per (state row, extra banned
    tokens) met so far, for the bans that depend on what a response wrote (`plan_heads`). The engine and the
    trainer each keep one; a row number is only meaningful with the table that gave it."""

    def __init__(self, tags: TagIds, vocab_size: int, device: torch.device):
        self.table = ban_table(tags, vocab_size, device)  # [R, V] bool
        self._rows: dict[tuple[int, tuple[int, ...]], int] = {}

    def row(self, base: int, extra: tuple[int, ...] = ()) -> int:
        """The row that bans what `base` bans and the tokens `extra`."""
        if not extra:
            return base
        key = (base, extra)
        if key not in self._rows:
            banned = self.table[base].clone()
            banned[list(extra)] = True
            self.table = torch.cat([self.table, banned[None]])
            self._rows[key] = len(self.table) - 1
        return self._rows[key]


def plan_heads(plan: list[int], lines: PlanLines) -> tuple[int, ...]:
    """`distinct_plans`: the tokens banned as the next token of a plan whose ids so far are `plan`. At the
    start of a line, the first token of each earlier line (so that no two paths of the block start with the
    same thing: the built-in task's plan lines begin with their candidate); inside a line, none."""
    if plan and not lines.ends_line(plan[-1]):
        return ()
    return tuple(sorted({line[0] for line in lines.lines(plan)}))


class SeenDepth:
    """How deep the Seen text read so far sits in open paths, from its tags alone (the Seen engine enforces no
    structure, so tags that close nothing are skipped): with nesting on (`max_depth` > 1), `<Parallel>` may
    not open inside a path of a block at depth `max_depth`. Without it Seen bans nothing inside a path, as
    before nesting existed (a nested block is a format error the reward sees), so its samples and the
    figures made with them do not change. The engine and `ban_rows` both feed it, so they agree on every
    token's ban row."""

    def __init__(self, tags: TagIds, max_depth: int):
        self.tags, self.max_depth = tags, max_depth
        self.open: list[str] = []  # "block" / "path", innermost last

    def at_cap(self) -> bool:
        if self.max_depth == 1 or not self.open or self.open[-1] != "path":
            return False
        return self.open.count("block") >= self.max_depth

    def feed(self, token: int) -> None:
        tags, top = self.tags, self.open[-1] if self.open else None
        if token == tags.parallel_open:
            self.open.append("block")
        elif token == tags.path_open and top == "block":
            self.open.append("path")
        elif (token == tags.path_close and top == "path") or (token == tags.parallel_close and top == "block"):
            self.open.pop()


def ban_rows(
    response_ids: list[int],
    tags: TagIds,
    variant: str,
    max_blocks: int,
    plans: bool = False,
    max_depth: int = 1,
    distinct_plans: tuple[PlanLines, BanTable] | None = None,
) -> list[int]:
    """The ban-table row (BAN_*) each response token was sampled under, replayed from the tokens alone:
    the decoding state `_Row.ban_row` reads when the engine samples it (`plans`: a block's plan, from its
    `<Parallel>` to its first `<Path>`, is sampled under BAN_PLAN; a path may open a block while the blocks
    it sits in are fewer than `max_depth`). With `distinct_plans` (the tokenizer's `PlanLines` and the
    caller's `BanTable`) a plan token also bans its `plan_heads`, in a row of that table. Rows of
    engine-inserted tokens are meaningless (they are not trained on)."""
    rows, blocks, plan = [], 0, []
    if variant == "seen":
        depth = SeenDepth(tags, max_depth)
        for token in response_ids:
            rows.append(BAN_PARALLEL if blocks >= max_blocks or depth.at_cap() else BAN_NONE)
            blocks += token == tags.parallel_open
            depth.feed(token)
        return rows
    # The engine's states, innermost last: "main" (the main text), "path" (a path's own text), "plan", "block"
    # (between paths), "closed" (after </Parallel>), "summary". A block pushes the state it opens from; its
    # summary's end returns to it, and so does any other tag after </Parallel> (a row cut short ends its open
    # nested blocks with an inserted </Parallel> before a sibling path, `engine._Thread.flat`).
    stack = ["main"]
    for token in response_ids:
        if stack[-1] == "closed" and token != tags.summary_open:
            stack.pop()
        state, capped = stack[-1], blocks >= max_blocks
        if state == "path":
            nest = not capped and stack.count("path") < max_depth
            rows.append(BAN_PATH_NEST if nest else BAN_PATH)
        elif state == "plan":
            if distinct_plans is None:
                rows.append(BAN_PLAN)
            else:
                lines, table = distinct_plans
                rows.append(table.row(BAN_PLAN, plan_heads(plan, lines)))
                plan.append(token)
        else:
            rows.append(BAN_SUMMARY if state == "summary" else BAN_MAIN_CAPPED if capped else BAN_MAIN)
        if token == tags.parallel_open:
            blocks += 1
            stack.append("plan" if plans else "block")
            plan = []
        elif token == tags.path_open:
            stack[-1] = "path"
        elif token == tags.path_close:
            stack[-1] = "block"
        elif token == tags.parallel_close and len(stack) > 1:
            stack[-1] = "closed"
        elif token == tags.summary_open:
            stack[-1] = "summary"
        elif token == tags.summary_close and len(stack) > 1:
            stack.pop()
    return rows
