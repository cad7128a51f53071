import pytest
import torch

from parallel_r1.bans import (
    BAN_MAIN,
    BAN_MAIN_CAPPED,
    BAN_NONE,
    BAN_PARALLEL,
    BAN_PATH,
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
