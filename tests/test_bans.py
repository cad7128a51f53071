import pytest
import torch

from parallel_r1.bans import (
    BAN_MAIN,
    BAN_MAIN_CAPPED,
    BAN_NONE,
    BAN_PARALLEL,
    BAN_PATH,
    BAN_PATH_NEST,
    BAN_SUMMARY,
    ban_rows,
    ban_table,
)
from parallel_r1.format import TagIds


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
