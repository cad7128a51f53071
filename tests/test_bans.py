import pytest
import torch

from parallel_r1.bans import (
    BAN_MAIN,
    BAN_MAIN_CAPPED,
    BAN_NONE,
    BAN_PARALLEL,
    BAN_PATH,
    BAN_PATH_NEST,
    BAN_PLAN,
    BAN_SUMMARY,
    BanTable,
    ban_rows,
    ban_table,
    plan_heads,
)
from parallel_r1.format import PlanLines, TagIds


@pytest.fixture()
def tags(tiny_tokenizer) -> TagIds:
    return TagIds.from_tokenizer(tiny_tokenizer)


def response(tags, word=50):
    """main, one block of two one-word paths, a one-word summary, main again."""
    t = tags
    return [word, t.parallel_open, t.path_open, word, t.path_close, t.path_open, word, t.path_close]


def test_ban_rows_follow_the_decoding_state_token_by_token(tags):
    ids = response(tags) + [tags.parallel_close, tags.summary_open, 50, tags.summary_close, 50]
    rows = ban_rows(ids, tags, "unseen", max_blocks=1)
    # The token after `<Parallel>` is sampled with the block already counted, so the cap applies there.
    assert rows == [
        BAN_MAIN,
        BAN_MAIN,
        BAN_MAIN_CAPPED,
        BAN_PATH,
        BAN_PATH,
        BAN_MAIN_CAPPED,
        BAN_PATH,
        BAN_PATH,
        BAN_MAIN_CAPPED,
        BAN_MAIN_CAPPED,
        BAN_SUMMARY,
        BAN_SUMMARY,
        BAN_MAIN_CAPPED,
    ]
    seen = ban_rows(ids, tags, "seen", max_blocks=1)
    assert seen == [BAN_NONE, BAN_NONE] + [BAN_PARALLEL] * (len(ids) - 2)


def test_ban_table_bans_every_tag_but_the_one_a_state_may_write(tags):
    table = ban_table(tags, 64, torch.device("cpu"))
    all_tags = set(tags.as_tuple())
    allowed = {BAN_MAIN: {tags.parallel_open}, BAN_PATH: {tags.path_close}, BAN_SUMMARY: {tags.summary_close}}
    for row, keep in allowed.items():
        assert set(table[row].nonzero().flatten().tolist()) == all_tags - keep
    assert set(table[BAN_MAIN_CAPPED].nonzero().flatten().tolist()) == all_tags
    assert table[BAN_PARALLEL].nonzero().flatten().tolist() == [tags.parallel_open]
    assert not table[BAN_NONE].any()


def test_ban_rows_of_nested_blocks(tags):
    """A path may open a block while it sits in fewer than max_depth blocks; the inner summary's end returns to
    the path, whose </Path> is then allowed again."""
    t, w = tags, 50
    inner = [t.parallel_open, t.path_open, w, t.path_close, t.path_open, w, t.path_close, t.parallel_close]
    inner += [t.summary_open, w, t.summary_close]
    ids = [w, t.parallel_open, t.path_open, w, *inner, w, t.path_close, t.path_open, w, t.path_close]
    rows = ban_rows(ids, tags, "unseen", max_blocks=4, max_depth=2)
    # Rows of inserted tokens (<Path>, </Parallel>, <Summary>) are those of the state before them, unused.
    M, N, S = BAN_MAIN, BAN_PATH_NEST, BAN_SUMMARY
    assert rows == [M, M, M, N, N, M, BAN_PATH, BAN_PATH, M, BAN_PATH, BAN_PATH, M, M, S, S, N, N, M, N, N]
    assert ban_rows(ids, tags, "unseen", max_blocks=4)[3] == BAN_PATH  # max_depth 1: no nesting
    assert ban_rows(ids, tags, "unseen", max_blocks=1, max_depth=2)[3] == BAN_PATH  # the block cap applies too
    # A row cut short seals an open inner block with </Parallel>; the sibling path after it is at the outer level.
    sealed = [w, t.parallel_open, t.path_open, w, t.parallel_open, t.path_open, w, t.parallel_close, t.path_open, w]
    assert ban_rows(sealed, tags, "unseen", max_blocks=4, max_depth=2)[-1] == BAN_PATH_NEST


def test_seen_bans_parallel_in_a_path_only_at_the_nesting_cap(tags):
    t, w = tags, 50
    ids = [t.parallel_open, t.path_open, w, t.parallel_open, t.path_open, w, t.path_close, t.path_open, w]
    N, P = BAN_NONE, BAN_PARALLEL  # at the cap from the word in the inner path on, until its </Path>
    assert ban_rows(ids, tags, "seen", max_blocks=4, max_depth=2) == [N, N, N, N, N, P, P, N, P]
    assert ban_rows(ids, tags, "seen", max_blocks=4) == [BAN_NONE] * len(ids)  # no nesting: Seen bans nothing


def test_distinct_plans_ban_the_heads_of_earlier_lines_at_each_line_start(tiny_tokenizer, tags):
    """A plan "6*3 / 9*3 / <Path>": the first token of each line bans the first tokens of the lines before it,
    a token inside a line bans only what BAN_PLAN bans, and the replay's rows are rows of the caller's table
    (one new row per set of heads, reused)."""
    lines = PlanLines(tiny_tokenizer)
    enc = tiny_tokenizer.encode
    six, nine, star, three, newline = enc("6")[0], enc("9")[0], enc("*")[0], enc("3")[0], enc("\n")[0]
    plan = [six, star, three, newline, nine, star, three, newline]
    assert plan_heads([], lines) == ()
    assert plan_heads(plan[:2], lines) == ()
    assert plan_heads(plan[:4], lines) == (six,)
    assert plan_heads(plan, lines) == tuple(sorted({six, nine}))
    table = BanTable(tags, 64, torch.device("cpu"))
    ids = [tags.parallel_open, *plan, tags.path_open]
    rows = ban_rows(ids, tags, "unseen", max_blocks=2, plans=True, distinct_plans=(lines, table))
    assert rows[1:5] == [BAN_PLAN] * 4 and rows[6:9] == [BAN_PLAN] * 3
    after_six, after_both = rows[5], rows[9]
    assert after_six == table.row(BAN_PLAN, (six,)) and after_six >= 8
    assert table.table[after_six, six] and not table.table[after_six, nine]
    assert table.table[after_both, [six, nine]].all() and table.table[after_both, tags.path_open].item() is False
    assert (table.table[after_both] >= table.table[BAN_PLAN]).all()  # BAN_PLAN's tags stay banned
    assert len(table.table) == 10  # the 8 state rows and one per set of heads
    assert ban_rows(ids, tags, "unseen", max_blocks=2, plans=True) == [BAN_MAIN] + [BAN_PLAN] * 9
