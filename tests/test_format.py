import dataclasses
import json
import random
import re

import pytest
import torch

from parallel_r1.format import (
    ERROR_KINDS,
    TAGS,
    Block,
    ParsedResponse,
    PlanLines,
    Span,
    TagIds,
    add_parallel_tokens,
    canonicalize,
    parse,
    parse_ids,
    render,
    validate,
)

BLOCK = "<Parallel><Path>3 + 4 = 7</Path><Path>4 + 3 = 7</Path></Parallel><Summary>Both give 7.</Summary>"
SPEC_EXAMPLE = (
    "Tom has 3 apples and buys 4.\n"
    "<Parallel>\n<Path>3 + 4 = 7</Path>\n<Path>4 + 3 = 7</Path>\n</Parallel>\n"
    "<Summary>Both give 7.</Summary>\nFinal Answer: 7"
)


JOIN_SPACE = re.compile(r"(<Parallel>|</Path>)\s+<Path>|</Path>\s+</Parallel>|</Parallel>\s+<Summary>")


def _at(text: str, marker: str, nth: int = 0) -> int:
    """Offset of the nth occurrence of marker in text."""
    offset = -1
    for _ in range(nth + 1):
        offset = text.index(marker, offset + 1)
    return offset


def _kinds_offsets(text: str) -> list[tuple[str, int]]:
    return [(e.kind, e.offset) for e in validate(text)]


# (text, kind, marker, nth occurrence of marker): the strict check must report exactly this one error.
P2 = "<Path>a</Path><Path>b</Path>"
SINGLE_ERRORS = [
    ("ab</Path>cd", "stray_close", "</Path>", 0),
    ("x</Summary>", "stray_close", "</Summary>", 0),
    (BLOCK + " then </Parallel>", "stray_close", "</Parallel>", 1),
    (f"<Parallel>{P2}</Path></Parallel><Summary>s</Summary>", "stray_close", "</Path>", 2),
    (f"<Parallel>{P2}</Parallel><Summary>s</Path></Summary>", "stray_close", "</Path>", 2),
    ("ab<Path>x", "path_outside_block", "<Path>", 0),
    (f"<Parallel>{P2}</Parallel><Summary>s<Path>t</Summary>", "path_outside_block", "<Path>", 2),
    (
        "<Parallel><Path>a<Parallel>b</Path><Path>c</Path></Parallel><Summary>s</Summary>",
        "nested_block",
        "<Parallel>",
        1,
    ),
    (f"<Parallel>{P2}<Parallel></Parallel><Summary>s</Summary>", "nested_block", "<Parallel>", 1),
    (f"<Parallel>{P2}</Parallel><Summary>s<Parallel></Summary>", "nested_block", "<Parallel>", 1),
    ("a<Summary>b", "summary_out_of_place", "<Summary>", 0),
    (
        "<Parallel><Path>a<Summary>b</Path><Path>c</Path></Parallel><Summary>s</Summary>",
        "summary_out_of_place",
        "<Summary>",
        0,
    ),
    (f"<Parallel>{P2}</Parallel><Summary>s<Summary>t</Summary>", "summary_out_of_place", "<Summary>", 1),
    ("<Parallel><Path>a<Path>b</Path><Path>c</Path></Parallel><Summary>s</Summary>", "unclosed_path", "<Path>", 0),
    ("<Parallel><Path>a</Path><Path>b</Parallel><Summary>s</Summary>", "unclosed_path", "<Path>", 1),
    ("x <Parallel><Path>a</Path><Path>b</Path>", "unclosed_block", "<Parallel>", 0),
    (f"<Parallel>{P2}</Parallel><Summary>the sum is", "unclosed_summary", "<Summary>", 0),
    ("<Parallel><Path>a</Path></Parallel><Summary>s</Summary>", "too_few_paths", "<Parallel>", 0),
    ("q<Parallel></Parallel><Summary>s</Summary>", "too_few_paths", "<Parallel>", 0),
    (f"<Parallel>{P2}</Parallel>\nDone.", "missing_summary", "Done.", 0),
    (f"<Parallel>{P2}</Parallel>  <Parallel>{P2}</Parallel><Summary>s</Summary>", "missing_summary", "<Parallel>", 1),
    (f"<Parallel>{P2}</Parallel>\nSo x = 2.\n<Summary>s</Summary>", "text_before_summary", "So x", 0),
    (
        "<Parallel><Path>a</Path>\nSecond, <Path>b</Path></Parallel><Summary>s</Summary>",
        "text_between_paths",
        "Second,",
        0,
    ),
    ("<Parallel>\nFirst, <Path>a</Path><Path>b</Path></Parallel><Summary>s</Summary>", "text_in_block", "First", 0),
    (f"<Parallel>{P2} both agree\n</Parallel><Summary>s</Summary>", "text_in_block", "both", 0),
    ("<Parallel><Path>a</Path><Path> \n </Path></Parallel><Summary>s</Summary>", "empty_path", "<Path>", 1),
    (f"<Parallel>{P2}</Parallel><Summary>\n</Summary>", "empty_summary", "<Summary>", 0),
]


@pytest.mark.parametrize("text,kind,marker,nth", SINGLE_ERRORS)
def test_each_error_kind_is_reported_once_at_its_offset(text, kind, marker, nth):
    assert _kinds_offsets(text) == [(kind, _at(text, marker, nth))]


def test_error_cases_cover_every_kind():
    assert {case[1] for case in SINGLE_ERRORS + PLANNED_ERRORS} == set(ERROR_KINDS)


def test_messages_name_the_tag_and_the_text():
    [error] = validate("<Parallel><Path>a</Path>\nSecond, <Path>b</Path></Parallel><Summary>s</Summary>")
    assert "</Path>" in error.message and "Second, " in error.message
    [error] = validate("x <Parallel><Path>a</Path><Path>b</Path>")
    assert "<Parallel>" in error.message and "never closed" in error.message


def test_missing_summary_at_end_of_text_points_at_the_end():
    text = f"<Parallel>{P2}</Parallel>\n"
    assert _kinds_offsets(text) == [("missing_summary", len(text))]


def test_all_errors_are_reported_in_order_of_offset():
    text = "</Summary> a <Parallel>\nFirst <Path>x</Path><Path>\n</Path></Parallel> b <Path>c"
    assert _kinds_offsets(text) == [
        ("stray_close", 0),
        ("text_in_block", _at(text, "First")),
        ("empty_path", _at(text, "<Path>", 1)),
        ("missing_summary", _at(text, "b <Path>")),
        ("path_outside_block", _at(text, "<Path>", 2)),
    ]


@pytest.mark.parametrize(
    "text",
    [
        "",
        "No parallel thinking here. Final Answer: 3",
        BLOCK,
        SPEC_EXAMPLE,
        "a" + BLOCK + "\nb\n" + BLOCK.replace("</Parallel>", "<Path>third</Path></Parallel>") + "c",
        "<Parallel>\n\n<Path>\n x \n</Path>\n\n<Path>y</Path>\n</Parallel>\n\n<Summary>\n z \n</Summary>",
    ],
)
def test_well_formed_responses_have_no_errors(text):
    parsed = parse(text)
    assert validate(text) == [] and parsed.well_formed
    assert parsed.num_blocks == text.count("<Parallel>")
    assert parsed.has_parallel == ("<Parallel>" in text)


def _slice(text: str, span: Span | None) -> str | None:
    return None if span is None else text[span.start : span.end]


def test_structure_of_a_two_block_response():
    second = "<Parallel><Path>p</Path><Path>q</Path><Path>r</Path></Parallel>\n<Summary>all r</Summary>"
    text = "intro " + BLOCK + " middle " + second + " end"
    parsed = parse(text)
    assert parsed.paths_per_block == [2, 3]
    assert [_slice(text, b.span) for b in parsed.blocks] == [BLOCK, second]
    assert [_slice(text, s) for s in parsed.main_segments] == ["intro ", " middle ", " end"]
    first = parsed.blocks[0]
    assert [_slice(text, p.content) for p in first.paths] == ["3 + 4 = 7", "4 + 3 = 7"]
    assert [_slice(text, p.span) for p in first.paths] == ["<Path>3 + 4 = 7</Path>", "<Path>4 + 3 = 7</Path>"]
    assert _slice(text, first.summary) == "Both give 7."
    assert all(b.closed and b.summary_closed and b.token_span is None for b in parsed.blocks)
    assert all(p.closed for b in parsed.blocks for p in b.paths)


def test_strict_drops_what_is_cut_off_and_lenient_recovers_it():
    text = "Let us think.<Parallel><Path>way one</Path>\n<Path>way tw"
    strict, lenient = parse(text), parse(text, lenient=True)
    assert strict.errors == lenient.errors
    assert [e.kind for e in strict.errors] == ["unclosed_block", "unclosed_path"]
    assert strict.blocks == [] and [_slice(text, s) for s in strict.main_segments] == [text]
    [block] = lenient.blocks
    assert not block.closed and block.summary is None and _slice(text, block.span) == text[13:]
    assert [(p.closed, _slice(text, p.content)) for p in block.paths] == [(True, "way one"), (False, "way tw")]
    assert [_slice(text, s) for s in lenient.main_segments] == ["Let us think."]


def test_lenient_keeps_a_path_cut_by_the_next_path():
    text = "<Parallel><Path>a<Path>b</Path><Path>c</Path></Parallel><Summary>s</Summary>"
    assert [_slice(text, p.content) for p in parse(text).blocks[0].paths] == ["b", "c"]
    paths = parse(text, lenient=True).blocks[0].paths
    assert [(p.closed, _slice(text, p.content), _slice(text, p.span)) for p in paths] == [
        (False, "a", "<Path>a"),
        (True, "b", "<Path>b</Path>"),
        (True, "c", "<Path>c</Path>"),
    ]


def test_summary_cut_off_by_the_end_of_text():
    text = f"<Parallel>{P2}</Parallel><Summary>so far"
    for parsed in (parse(text), parse(text, lenient=True)):
        [block] = parsed.blocks
        assert block.closed and not block.summary_closed and _slice(text, block.summary) == "so far"
        assert block.span == Span(0, len(text))


def test_text_before_summary_keeps_the_summary_in_the_block():
    text = f"<Parallel>{P2}</Parallel> note <Summary>s</Summary> after"
    [block] = parse(text).blocks
    assert _slice(text, block.summary) == "s" and _slice(text, block.span) == text[: -len(" after")]


def _random_response(rng: random.Random) -> str:
    words = ["x", " ", "\n", "1 + 2 = 3", "<", "Path", "</", ">", "<Parallel", "Final Answer: 3"]
    return "".join(rng.choice(TAGS) if rng.random() < 0.5 else rng.choice(words) for _ in range(rng.randint(0, 25)))


def _round_trip_cases() -> list[str]:
    rng = random.Random(0)
    malformed = [case[0] for case in SINGLE_ERRORS]
    truncated = [SPEC_EXAMPLE[:i] for i in range(len(SPEC_EXAMPLE) + 1)]
    return [BLOCK, SPEC_EXAMPLE, *malformed, *truncated, *(_random_response(rng) for _ in range(400))]


def _check_invariants(parsed: ParsedResponse) -> None:
    text = parsed.text
    for block in parsed.blocks:
        assert text.startswith("<Parallel>", block.span.start)
        for path in block.paths:
            assert block.span.start < path.span.start <= path.content.start <= path.content.end <= path.span.end
            assert path.span.end <= block.span.end
            assert text.startswith("<Path>", path.span.start)
            assert path.closed == text.startswith("</Path>", path.content.end)
        if block.summary is not None:
            assert text[: block.summary.start].endswith("<Summary>") and block.summary.end <= block.span.end


def test_render_round_trips_valid_malformed_truncated_and_random_text():
    for text in _round_trip_cases():
        for lenient in (False, True):
            parsed = parse(text, lenient=lenient)
            assert render(parsed) == text
            _check_invariants(parsed)


def test_render_refuses_spans_that_do_not_tile_the_text():
    parsed = parse("a" + BLOCK + "b")
    parsed.main_segments.pop()
    with pytest.raises(ValueError, match="stop at offset"):
        render(parsed)
    overlapping = ParsedResponse("abc", [Block(Span(0, 2), [], None, True)], [Span(1, 3)], [])
    with pytest.raises(ValueError, match="do not tile"):
        render(overlapping)


def test_canonicalize_removes_space_between_adjacent_structural_tags_only():
    assert canonicalize(SPEC_EXAMPLE) == (
        "Tom has 3 apples and buys 4.\n"
        "<Parallel><Path>3 + 4 = 7</Path><Path>4 + 3 = 7</Path></Parallel>"
        "<Summary>Both give 7.</Summary>\nFinal Answer: 7"
    )
    untouched = [
        "<Path>\n x \n</Path>",  # path content
        "<Summary>\n s \n</Summary>\n\nNext",  # summary content and main text
        "</Path> and <Path>",  # text between tags is not white space
        "</Summary>\n<Parallel>",  # main text between blocks
        "a \n b",
    ]
    for text in untouched:
        assert canonicalize(text) == text
    text = "<Parallel> \t\n<Path>a</Path>\n\n<Path>b</Path>\r\n</Parallel>\n<Summary>s</Summary>"
    assert canonicalize(text) == "<Parallel><Path>a</Path><Path>b</Path></Parallel><Summary>s</Summary>"
    assert canonicalize(canonicalize(text)) == canonicalize(text)


def _contents(parsed: ParsedResponse) -> list[str]:
    paths = [_slice(parsed.text, p.content) for b in parsed.blocks for p in b.paths]
    return paths + [_slice(parsed.text, b.summary) for b in parsed.blocks]


def test_canonicalize_keeps_path_and_summary_contents():
    text = "<Parallel>\n<Path>\n a \n</Path>\n<Path>b</Path>\n</Parallel>\n<Summary> s </Summary>"
    before, after = parse(text), parse(canonicalize(text))
    assert after.well_formed
    assert _contents(before) == _contents(after) == ["\n a \n", "b", " s "]


# ----------------------------------------------------------------------------------------------
# Token ids
# ----------------------------------------------------------------------------------------------


def test_parse_ids_gives_token_spans_of_blocks_and_paths(tiny_tokenizer):
    tag = TagIds.from_tokenizer(tiny_tokenizer)
    text = "Tom has 3 apples. " + BLOCK + " Final Answer: 7"
    ids = tiny_tokenizer.encode(text, add_special_tokens=False)
    parsed = parse_ids(ids, tiny_tokenizer)
    assert parsed.text == text and parsed.well_formed
    [block] = parsed.blocks
    start, end = block.token_span.start, block.token_span.end
    assert ids[start] == tag.parallel_open and ids[end - 1] == tag.summary_close
    assert ids.count(tag.parallel_open) == 1 and start == ids.index(tag.parallel_open)
    for path, content in zip(block.paths, ["3 + 4 = 7", "4 + 3 = 7"]):
        a, b = path.token_span.start, path.token_span.end
        assert ids[a] == tag.path_open and ids[b - 1] == tag.path_close
        assert tiny_tokenizer.decode(ids[a + 1 : b - 1]) == content
        assert _slice(text, path.content) == content
    assert [_slice(text, s) for s in parsed.main_segments] == ["Tom has 3 apples. ", " Final Answer: 7"]


def test_parse_ids_finds_tags_by_the_ids_it_is_given(tiny_tokenizer):
    tag = TagIds.from_tokenizer(tiny_tokenizer)
    ids = tiny_tokenizer.encode("So " + BLOCK + " Final Answer: 7", add_special_tokens=False)
    assert parse_ids(ids, tiny_tokenizer, tags=tag) == parse_ids(ids, tiny_tokenizer)
    # The given ids are the ones used: with the path tags swapped, the paths close before they open.
    swapped = dataclasses.replace(tag, path_open=tag.path_close, path_close=tag.path_open)
    assert not parse_ids(ids, tiny_tokenizer, tags=swapped).well_formed


def test_parse_ids_on_truncated_ids_accepts_tensors(tiny_tokenizer):
    tag = TagIds.from_tokenizer(tiny_tokenizer)
    ids = tiny_tokenizer.encode("So <Parallel><Path>a</Path><Path>b", add_special_tokens=False)
    parsed = parse_ids(torch.tensor(ids), tiny_tokenizer)
    [block] = parsed.blocks
    assert block.token_span == Span(ids.index(tag.parallel_open), len(ids))
    first, second = block.paths
    assert first.closed and ids[first.token_span.end - 1] == tag.path_close
    assert not second.closed and second.token_span == Span(len(ids) - 2, len(ids))
    assert [e.kind for e in parsed.errors] == ["unclosed_block", "unclosed_path"]
    assert parse_ids(ids, tiny_tokenizer, lenient=False).blocks == []


def test_parse_ids_finds_tags_by_id_not_by_decoded_text(tiny_tokenizer):
    # "<Path>" spelled with ordinary tokens decodes to the tag's text but is not a tag.
    encode = lambda s: tiny_tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
    spelled = encode("<Pa") + encode("th>")
    assert TagIds.from_tokenizer(tiny_tokenizer).path_open not in spelled
    ids = spelled + encode(BLOCK)
    parsed = parse_ids(ids, tiny_tokenizer)
    assert parsed.text == "<Path>" + BLOCK
    assert parsed.well_formed and parse(parsed.text).errors[0].kind == "path_outside_block"
    assert parsed.blocks[0].token_span == Span(len(spelled), len(ids))


def test_parse_ids_needs_the_tags_in_the_tokenizer():
    with pytest.raises(ValueError, match="add_parallel_tokens"):
        parse_ids([1, 2], _tokenizer_without_tags())


# ----------------------------------------------------------------------------------------------
# Tokenizer and model surgery
# ----------------------------------------------------------------------------------------------


def _tokenizer_without_tags():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=280,
        special_tokens=["<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(["Tom has 3 apples and buys 4 more."] * 10, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>")


def _untied_model(vocab_size: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def test_add_parallel_tokens_makes_single_tokens_embedded_as_their_pieces():
    """Each new tag starts at the mean of the rows of the pieces its text split into (input and untied
    output), so the six start apart: a regression test for tags that all started at the vocabulary mean."""
    tokenizer = _tokenizer_without_tags()
    assert len(tokenizer.encode("<Parallel>", add_special_tokens=False)) > 1
    pieces = {tag: tokenizer.encode(tag, add_special_tokens=False) for tag in TAGS}
    old = len(tokenizer)
    model = _untied_model(old)
    old_in = model.get_input_embeddings().weight.detach().clone()
    old_out = model.get_output_embeddings().weight.detach().clone()

    tag_ids = add_parallel_tokens(tokenizer, model)
    assert len(tokenizer) == old + 6
    assert sorted(tag_ids.as_tuple()) == list(range(old, old + 6))
    for tag, tag_id in zip(TAGS, tag_ids.as_tuple()):
        assert tokenizer.encode(tag, add_special_tokens=False) == [tag_id]
    assert tag_ids.path_open in tokenizer.encode("apples<Path>4 more</Path>", add_special_tokens=False)
    new_in = model.get_input_embeddings().weight.detach()
    new_out = model.get_output_embeddings().weight.detach()
    assert new_in.shape == new_out.shape == (old + 6, 64)
    assert torch.equal(new_in[:old], old_in) and torch.equal(new_out[:old], old_out)
    for new, before in ((new_in, old_in), (new_out, old_out)):
        for tag, tag_id in zip(TAGS, tag_ids.as_tuple()):
            assert torch.allclose(new[tag_id], before[pieces[tag]].mean(dim=0), atol=1e-6)
        assert torch.cdist(new[old:], new[old:]).add(torch.eye(6)).min() > 1e-3  # no two tags alike


def test_add_parallel_tokens_twice_changes_nothing():
    tokenizer = _tokenizer_without_tags()
    model = _untied_model(len(tokenizer))
    first = add_parallel_tokens(tokenizer, model)
    size, weights = len(tokenizer), model.get_input_embeddings().weight.detach().clone()
    assert add_parallel_tokens(tokenizer, model) == first
    assert len(tokenizer) == size and torch.equal(model.get_input_embeddings().weight, weights)


def test_add_parallel_tokens_on_the_tiny_tokenizer_keeps_its_ids(tiny_tokenizer, tiny_model):
    before = TagIds.from_tokenizer(tiny_tokenizer)
    rows = tiny_model.get_input_embeddings().weight.shape[0]
    assert add_parallel_tokens(tiny_tokenizer, tiny_model) == before
    assert tiny_model.get_input_embeddings().weight.shape[0] == rows == len(tiny_tokenizer)


# ----------------------------------------------------------------------------------------------
# Conformance with the real teacher outputs
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def teacher_responses(shared_data) -> list[str]:
    with open(shared_data / "parallel_gsm8k_sample.jsonl", encoding="utf-8") as f:
        return [json.loads(line)["response"] for line in f]


def test_teacher_outputs_parse_and_counts_match_the_tags(teacher_responses):
    assert len(teacher_responses) == 341
    parsed = [parse(text, lenient=True) for text in teacher_responses]
    assert sum(p.has_parallel for p in parsed) == 338
    for text, p in zip(teacher_responses, parsed):
        assert render(p) == text
        assert p.num_blocks == text.count("<Parallel>") == text.count("</Parallel>")
        assert sum(p.paths_per_block) == text.count("<Path>") == text.count("</Path>")
        if p.has_parallel:
            assert 1 <= p.num_blocks <= 4 and all(2 <= n <= 4 for n in p.paths_per_block)


def test_exactly_one_teacher_output_has_text_between_paths(teacher_responses):
    hits = [i for i, text in enumerate(teacher_responses) if "text_between_paths" in {e.kind for e in validate(text)}]
    assert hits == [88]
    text = teacher_responses[88]
    assert _kinds_offsets(text) == [
        ("text_in_block", _at(text, "First, <Path>")),
        ("text_between_paths", _at(text, "Second, <Path>")),
    ]


def test_teacher_outputs_stay_valid_after_canonicalize(teacher_responses):
    valid = [text for text in teacher_responses if not validate(text)]
    assert len(valid) == 338
    for text in valid:
        canonical = canonicalize(text)
        assert not validate(canonical)
        assert JOIN_SPACE.search(canonical) is None
        assert parse(canonical).paths_per_block == parse(text).paths_per_block


# ------------------------------------------------------------------------------------------------
# The planned format: a plan, one line per path, and each path starts with its line.

PLANNED = "Find n.<Parallel>5*3\n7*3\n<Path>5*3=15 no</Path><Path>7*3=21 yes</Path></Parallel><Summary>7</Summary>"

# (text, kind, marker, nth): each text holds exactly one error of the planned check, at the nth marker.
PLANNED_ERRORS = [
    ("<Parallel><Path>a</Path><Path>b</Path></Parallel><Summary>s</Summary>", "missing_plan", "<Path>", 0),
    ("<Parallel>a\nb\nc\n<Path>a</Path><Path>b</Path></Parallel><Summary>s</Summary>", "plan_mismatch", "c\n", 0),
    ("<Parallel>a\n<Path>a</Path><Path>b</Path></Parallel><Summary>s</Summary>", "plan_mismatch", "<Path>", 1),
    ("<Parallel>a\nb\n<Path>a</Path><Path>c b</Path></Parallel><Summary>s</Summary>", "path_off_plan", "<Path>", 1),
]


@pytest.mark.parametrize("text,kind,marker,nth", PLANNED_ERRORS)
def test_each_planned_error_is_reported_once_at_its_offset(text, kind, marker, nth):
    assert [(e.kind, e.offset) for e in validate(text, plans=True)] == [(kind, _at(text, marker, nth))]


def test_planned_block_structure_and_one_path_is_enough():
    parsed = parse(PLANNED, plans=True)
    assert parsed.well_formed and parsed.paths_per_block == [2]
    [block] = parsed.blocks
    assert PLANNED[block.plan.start : block.plan.end] == "5*3\n7*3\n"
    assert [PLANNED[s.start : s.end] for s in block.plan_lines] == ["5*3", "7*3"]
    one = "<Parallel>  try 5\n\n<Path> try 5: no</Path></Parallel><Summary>none</Summary>"
    assert validate(one, plans=True) == []
    assert [one[s.start : s.end] for s in parse(one, plans=True).blocks[0].plan_lines] == ["try 5"]
    [error] = validate("<Parallel>a\n</Parallel><Summary>s</Summary>", plans=True)[:1]
    assert error.kind == "too_few_paths" and "at least one" in error.message


def test_unplanned_check_is_unchanged_and_still_records_the_plan():
    # The unplanned format keeps refusing text before the first path (and one path), but the plan is kept.
    kinds = [e.kind for e in validate(PLANNED)]
    assert kinds == ["text_in_block"]
    assert parse(PLANNED).blocks[0].plan_lines and parse(BLOCK).blocks[0].plan is None
    assert [e.kind for e in validate(BLOCK, plans=True)] == ["missing_plan"]


def test_planned_errors_name_the_counts_and_the_line():
    [error] = validate("<Parallel>a\nb\nc\n<Path>a</Path><Path>b</Path></Parallel><Summary>s</Summary>", plans=True)
    assert "3 path(s)" in error.message and "holds 2" in error.message
    [error] = validate("<Parallel>a\nb\n<Path>a</Path><Path>c</Path></Parallel><Summary>s</Summary>", plans=True)
    assert "path 2" in error.message and "'b'" in error.message


def test_planned_text_renders_and_parses_from_ids(tiny_tokenizer):
    assert render(parse(PLANNED, plans=True)) == PLANNED
    ids = tiny_tokenizer(PLANNED, add_special_tokens=False)["input_ids"]
    parsed = parse_ids(ids, tiny_tokenizer, lenient=False, plans=True)
    assert parsed.well_formed and parsed.paths_per_block == [2]


def test_plan_lines_split_token_ids_like_the_text(tiny_tokenizer):
    plan = "5*3\n\n 7*3 \n  \n9*3"
    ids = tiny_tokenizer(plan, add_special_tokens=False)["input_ids"]
    lines = PlanLines(tiny_tokenizer).lines(ids)
    assert [tiny_tokenizer.decode(line).strip() for line in lines] == ["5*3", "7*3", "9*3"]
    assert PlanLines(tiny_tokenizer).lines([]) == []


# ----------------------------------------------------------------------------- nested blocks

INNER = "<Parallel><Path>5 + 1 = 6</Path><Path>5 + 2 = 7</Path></Parallel><Summary>7 works.</Summary>"
NESTED = (
    "Try both.<Parallel><Path>try 5:" + INNER + " so 5.</Path><Path>try 4: no</Path></Parallel>"
    "<Summary>5.</Summary>Final Answer: 5"
)


def test_a_path_may_open_a_block_up_to_max_depth():
    parsed = parse(NESTED, max_depth=2)
    assert parsed.errors == []
    outer = parsed.blocks[0]
    assert len(parsed.blocks) == 1 and outer.depth == 1
    first, second = outer.paths
    assert [b.depth for b in first.blocks] == [2] and second.blocks == []
    inner = first.blocks[0]
    assert NESTED[inner.span.start : inner.span.end] == INNER
    assert first.content.start < inner.span.start < inner.span.end < first.content.end
    assert [NESTED[p.content.start : p.content.end] for p in inner.paths] == ["5 + 1 = 6", "5 + 2 = 7"]
    assert parsed.depth == 2 and parsed.num_blocks == 2 and parsed.paths_per_block == [2, 2]
    assert [b.depth for b in parsed.all_blocks] == [1, 2]
    assert render(parsed) == NESTED


def test_nesting_past_max_depth_is_an_error_at_the_inner_parallel():
    inner_at = [m.start() for m in re.finditer("<Parallel>", NESTED)][1]
    errors = validate(NESTED)  # max_depth 1: blocks do not nest
    assert errors[0].kind == "unclosed_path" and any(e.kind == "nested_block" and e.offset == inner_at for e in errors)
    deeper = NESTED.replace("5 + 1 = 6", "6?" + INNER)
    deepest_at = [m.start() for m in re.finditer("<Parallel>", deeper)][2]
    nested = [e for e in validate(deeper, max_depth=2) if e.kind == "nested_block"]
    assert [e.offset for e in nested] == [deepest_at] and "at most 2 deep" in nested[0].message
    assert validate(deeper, max_depth=3) == []


def test_malformed_nesting_is_reported_at_its_offset():
    no_summary = NESTED.replace("<Summary>7 works.</Summary>", "")
    errors = validate(no_summary, max_depth=2)
    assert [(e.kind, e.offset) for e in errors] == [("missing_summary", no_summary.index("so 5."))]
    # the inner block still ends at its </Parallel>, and the outer path goes on after it
    parsed = parse(no_summary, max_depth=2)
    assert parsed.blocks[0].paths[0].blocks[0].summary is None and len(parsed.blocks[0].paths) == 2
    in_summary = NESTED.replace("<Summary>5.</Summary>", "<Summary>" + INNER + "</Summary>")
    kinds = {e.kind for e in validate(in_summary, max_depth=2)}
    assert "nested_block" in kinds
    cut = NESTED[: NESTED.index("5 + 2")]
    kinds = [(e.kind, e.offset) for e in validate(cut, max_depth=2)]
    assert ("unclosed_block", 9) in kinds and ("unclosed_block", NESTED.index("<Parallel>", 10)) in kinds
    lenient = parse(cut, lenient=True, max_depth=2)
    assert lenient.depth == 2 and render(lenient) == cut


def test_nested_render_round_trips_truncated_and_random_text():
    rng = random.Random(1)
    cases = [NESTED[:i] for i in range(len(NESTED) + 1)] + [_random_response(rng) for _ in range(400)]
    for text in cases:
        for lenient in (False, True):
            parsed = parse(text, lenient=lenient, max_depth=3)
            assert render(parsed) == text
            _check_invariants(parsed)
            for block in parsed.all_blocks:
                for path in block.paths:
                    for inner in path.blocks:
                        assert inner.depth == block.depth + 1
                        assert path.content.start <= inner.span.start <= inner.span.end <= path.span.end


def test_max_depth_must_be_positive():
    with pytest.raises(ValueError, match="max_depth"):
        parse(BLOCK, max_depth=0)


def test_parse_ids_gives_token_spans_of_nested_blocks(tiny_tokenizer):
    add_parallel_tokens(tiny_tokenizer)
    ids = tiny_tokenizer(NESTED, add_special_tokens=False)["input_ids"]
    parsed = parse_ids(ids, tiny_tokenizer, lenient=False, max_depth=2)
    assert parsed.errors == []
    inner = parsed.blocks[0].paths[0].blocks[0]
    span = inner.token_span
    assert tiny_tokenizer.decode(ids[span.start : span.end]) == INNER
