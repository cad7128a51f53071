"""The parallel-thinking format: the six tags, their token ids, and the tokenizer/model surgery.

A response is plain reasoning text that may open blocks::

    <Parallel><Path>...</Path><Path>...</Path></Parallel><Summary>...</Summary>

A path may open a block of its own when nesting is allowed (`max_depth` > 1, docs/design.md "Nested
blocks"): `<Path>try 3<Parallel><Path>3+1</Path><Path>3+2</Path></Parallel><Summary>..</Summary></Path>`.

In the planned format (`plans=True`, docs/design.md "Planned blocks") a block opens with a plan, one line
per path, and path j starts with plan line j::

    <Parallel>5*3
    7*3
    <Path>5*3=15 ...</Path><Path>7*3=21 ...</Path></Parallel><Summary>...</Summary>

Parsing, strict validation and rendering of responses live further down in this module.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

PARALLEL_OPEN = "<Parallel>"
PARALLEL_CLOSE = "</Parallel>"
PATH_OPEN = "<Path>"
PATH_CLOSE = "</Path>"
SUMMARY_OPEN = "<Summary>"
SUMMARY_CLOSE = "</Summary>"
TAGS = (PARALLEL_OPEN, PARALLEL_CLOSE, PATH_OPEN, PATH_CLOSE, SUMMARY_OPEN, SUMMARY_CLOSE)


@dataclass(frozen=True)
class TagIds:
    """Token ids of the six tags in one tokenizer."""

    parallel_open: int
    parallel_close: int
    path_open: int
    path_close: int
    summary_open: int
    summary_close: int

    @classmethod
    def from_tokenizer(cls, tokenizer) -> TagIds:
        ids = []
        for tag in TAGS:
            encoded = tokenizer.encode(tag, add_special_tokens=False)
            if len(encoded) != 1:
                raise ValueError(
                    f"tag {tag!r} is not a single token in this tokenizer (got {len(encoded)} ids); "
                    "call parallel_r1.format.add_parallel_tokens(tokenizer, model) first"
                )
            ids.append(encoded[0])
        return cls(*ids)

    def as_tuple(self) -> tuple[int, ...]:
        return (
            self.parallel_open,
            self.parallel_close,
            self.path_open,
            self.path_close,
            self.summary_open,
            self.summary_close,
        )


def add_parallel_tokens(tokenizer, model=None) -> TagIds:
    """Add the six tags to `tokenizer` as special tokens and grow `model`'s embeddings to match.

    Idempotent: tags already present are left alone and the embeddings are only resized when the
    vocabulary grew. A new tag's embedding rows (input and, if untied, output) start at the mean of the
    rows of the pieces its text was split into before it was added (``<``, ``Path``, ``>``): the six tags
    start apart from one another, `</Path>` near `<Path>`, and their initial logits stay in the range
    of ordinary tokens. (A mean of the whole vocabulary, transformers' `mean_resizing`, gives the six
    nearly the same vector, and SmolLM2 after 100 SFT steps still mixed them up: 3 % of its responses
    were well formed.)
    """
    vocab = tokenizer.get_vocab()
    special = set(tokenizer.all_special_tokens)
    to_add = [t for t in TAGS if t not in vocab or t not in special]
    pieces = {t: tokenizer.encode(t, add_special_tokens=False) for t in to_add}
    if to_add:
        tokenizer.add_tokens(to_add, special_tokens=True)
    if model is not None:
        old = model.get_input_embeddings().weight.shape[0]
        new = len(tokenizer)
        if new > old:
            model.resize_token_embeddings(new, mean_resizing=True)
            _embed_as_pieces(model, tokenizer, {t: ids for t, ids in pieces.items() if ids and max(ids) < old})
    return TagIds.from_tokenizer(tokenizer)


def _embed_as_pieces(model, tokenizer, pieces: dict[str, list[int]]) -> None:
    """Set each added tag's input (and untied output) embedding row to the mean of its pieces' rows."""
    import torch  # here, not at the top: `parallel-r1 check` imports this module and starts without torch

    weights = [model.get_input_embeddings().weight]
    output = model.get_output_embeddings()
    if output is not None and output.weight is not weights[0]:
        weights.append(output.weight)
    with torch.no_grad():
        for tag, ids in pieces.items():
            row = tokenizer.convert_tokens_to_ids(tag)
            for weight in weights:
                weight[row] = weight[ids].mean(dim=0)


# --------------------------------------------------------------------------------------------------
# Parsing, strict validation, rendering
# --------------------------------------------------------------------------------------------------

# What the strict check (docs/design.md, "The format") can find wrong. Each error carries the character offset
# where the problem is: the offending tag or the first character of the offending text.
ERROR_KINDS = (
    "stray_close",  # a closing tag with nothing open to close: </Path> in main text, </Summary> with no <Summary>
    "path_outside_block",  # <Path> in main text or inside a summary
    "nested_block",  # <Parallel> where no block may open: in a summary, between paths, or in a path at max_depth
    "summary_out_of_place",  # <Summary> anywhere but right after </Parallel>
    "unclosed_path",  # a <Path> ended by the next <Path>, by </Parallel> or by the end of text (offset: its <Path>)
    "unclosed_block",  # a <Parallel> with no </Parallel> before the end of text (offset: its <Parallel>)
    "unclosed_summary",  # a <Summary> with no </Summary> (offset: its <Summary>)
    "too_few_paths",  # a closed block with fewer than two paths (offset: its <Parallel>)
    "missing_summary",  # </Parallel> followed by something other than <Summary> (offset: that thing, or end of text)
    "text_before_summary",  # text between </Parallel> and its <Summary> (offset: the text)
    "text_between_paths",  # text between a </Path> and the next <Path> (offset: the text)
    "text_in_block",  # text between <Parallel> and its first <Path>, or after the last </Path> (offset: the text)
    "empty_path",  # a closed path holding only white space (offset: its <Path>)
    "empty_summary",  # a closed summary holding only white space (offset: its <Summary>)
    # The planned format only (`plans=True`):
    "missing_plan",  # a block whose first <Path> (or </Parallel>) follows <Parallel> with no plan (offset: that tag)
    "plan_mismatch",  # a closed block whose plan names more or fewer lines than it has paths (offset: the
    # first plan line without a path, or the first <Path> without a plan line)
    "path_off_plan",  # a path whose text does not start with its plan line (offset: its <Path>)
)


@dataclass(frozen=True)
class FormatError:
    kind: str  # one of ERROR_KINDS
    offset: int  # character offset in the text where the problem is
    message: str


@dataclass
class Span:
    """A half-open range [start, end) of characters (or of token indices for `token_span`)."""

    start: int
    end: int


@dataclass
class PathSpan:
    span: Span  # from <Path> to after </Path> (or to where the path was cut off)
    content: Span  # between the tags
    closed: bool  # ended by its own </Path>
    token_span: Span | None = None  # token indices, filled by parse_ids
    blocks: list[Block] = field(default_factory=list)  # the blocks this path opens (nesting), in order


@dataclass
class Block:
    span: Span  # from <Parallel> through </Summary> (or to where the block was cut off)
    paths: list[PathSpan]
    summary: Span | None  # content of the summary; None when there is no <Summary>
    closed: bool  # its </Parallel> was found
    token_span: Span | None = None  # token indices, filled by parse_ids
    summary_closed: bool = False  # its </Summary> was found
    plan: Span | None = None  # text between <Parallel> and its first <Path> (or </Parallel>), if not only space
    plan_lines: list[Span] = field(default_factory=list)  # the plan's lines that are not blank, stripped
    depth: int = 1  # 1 for a block in main text, d + 1 for a block inside a path of a depth-d block


@dataclass
class ParsedResponse:
    text: str
    blocks: list[Block]  # the blocks of the main text; nested ones are in their paths' `blocks`
    main_segments: list[Span]  # the text outside every block, in order
    errors: list[FormatError]

    @property
    def well_formed(self) -> bool:
        return not self.errors

    @property
    def all_blocks(self) -> list[Block]:
        """Every block, nested ones included, in the order their <Parallel> appears."""
        found: list[Block] = []

        def walk(blocks: list[Block]) -> None:
            for block in blocks:
                found.append(block)
                for path in block.paths:
                    walk(path.blocks)

        walk(self.blocks)
        return found

    @property
    def num_blocks(self) -> int:
        return len(self.all_blocks)

    @property
    def paths_per_block(self) -> list[int]:
        return [len(b.paths) for b in self.all_blocks]

    @property
    def depth(self) -> int:
        """The deepest nesting of the response: 0 without blocks, 1 when no block nests."""
        return max((b.depth for b in self.all_blocks), default=0)

    @property
    def has_parallel(self) -> bool:
        return bool(self.blocks)


@dataclass(frozen=True)
class _Tag:
    """One tag occurrence: its characters in the text and, when parsing ids, its token index."""

    name: str
    start: int
    end: int
    index: int | None = None


_TAG_RE = re.compile("|".join(re.escape(t) for t in TAGS))
_MAIN, _BLOCK, _PATH, _AFTER, _SUMMARY = "main", "block", "path", "after_block", "summary"


def _first_non_space(text: str, start: int, end: int) -> int | None:
    for i in range(start, end):
        if not text[i].isspace():
            return i
    return None


def plan_line_spans(text: str, start: int, end: int) -> list[Span]:
    """The lines of text[start:end] that are not blank, each stripped of its surrounding white space."""
    spans, pos = [], start
    for line in text[start:end].split("\n"):
        stripped = line.strip()
        if stripped:
            first = pos + len(line) - len(line.lstrip())
            spans.append(Span(first, first + len(stripped)))
        pos += len(line) + 1
    return spans


class PlanLines:
    """A plan's token ids split into its lines, by the decoded text of each token (cached per id): a token
    whose text holds a newline ends a line and belongs to none, and a line of white-space tokens is blank
    and does not count. With tokenizers that keep newlines apart from other characters (byte-level BPEs
    do), these are the lines `plan_line_spans` finds in the decoded text."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._text: dict[int, str] = {}

    def text(self, token: int) -> str:
        if token not in self._text:
            self._text[token] = self.tokenizer.decode([token], skip_special_tokens=False)
        return self._text[token]

    def ends_line(self, token: int) -> bool:
        return "\n" in self.text(token)

    def lines(self, ids: list[int]) -> list[list[int]]:
        """The token ids of each line of the plan `ids` that is not blank, newline tokens left out."""
        lines, line = [], []
        for token in [*ids, None]:
            if token is None or self.ends_line(token):
                if any(self.text(t).strip() for t in line):
                    lines.append(line)
                line = []
            else:
                line.append(token)
        return lines


def _snippet(text: str, offset: int) -> str:
    """Up to 30 characters of text starting at `offset`, cut before the next tag."""
    end = min(len(text), offset + 30)
    tag = _TAG_RE.search(text, offset, end)
    return repr(text[offset : tag.start() if tag else end])


class _Scanner:
    """One left-to-right pass over the tags: a small state machine that keeps the blocks it finds and
    reports every error at the offset where it happens. A misplaced tag is reported and then treated
    as plain text of the region it sits in, so one mistake does not hide the rest of the structure."""

    # The fields that belong to the innermost open block; opening a nested block pushes them on `outer`.
    _FRAME = ("state", "block", "block_tag", "path_tag", "summary_tag", "num_paths", "path_offsets", "gap",
              "close_end", "inner")  # fmt: skip

    def __init__(self, text: str, n_tokens: int | None, lenient: bool, plans: bool = False, max_depth: int = 1):
        if max_depth < 1:
            raise ValueError(f"max_depth must be at least 1, got {max_depth}")
        self.text = text
        self.n_tokens = n_tokens
        self.lenient = lenient
        self.plans = plans
        self.max_depth = max_depth
        self.outer: list[dict] = []  # the frames of the blocks that enclose the open one
        self.inner: list[Block] = []  # blocks the open path has opened and ended so far
        self.state = _MAIN
        self.blocks: list[Block] = []
        self.errors: list[FormatError] = []
        self.block: Block | None = None
        self.block_tag: _Tag | None = None
        self.path_tag: _Tag | None = None
        self.summary_tag: _Tag | None = None
        self.num_paths = 0  # paths of the open block, unclosed ones included
        self.path_offsets: list[int] = []  # where each <Path> of the open block starts, unclosed ones included
        self.gap: int | None = None  # first non-space character since the last structural tag of a block
        self.close_end: tuple[int, int | None] = (0, None)  # where a block without summary ends: after </Parallel>
        self.handlers = {
            _MAIN: self._in_main,
            _BLOCK: self._in_block,
            _PATH: self._in_path,
            _AFTER: self._after_block,
            _SUMMARY: self._in_summary,
        }

    def run(self, tags: list[_Tag]) -> ParsedResponse:
        pos = 0
        for tag in tags:
            self._text(pos, tag.start)
            self.handlers[self.state](tag)
            pos = tag.end
        self._text(pos, len(self.text))
        self._finish()
        self.errors.sort(key=lambda e: e.offset)
        return ParsedResponse(self.text, self.blocks, self._main_segments(), self.errors)

    def _error(self, kind: str, offset: int, message: str) -> None:
        self.errors.append(FormatError(kind, offset, message))

    def _text(self, start: int, end: int) -> None:
        if self.state in (_BLOCK, _AFTER) and self.gap is None:
            self.gap = _first_non_space(self.text, start, end)

    def _misplaced(self, tag: _Tag, where: str) -> None:
        if tag.name == PARALLEL_OPEN:
            if self.max_depth == 1:
                rule = "blocks do not nest"
            elif where == "inside a path":
                rule = f"blocks nest at most {self.max_depth} deep"
            else:
                rule = "a block opens only in main text or inside a path"
            self._error("nested_block", tag.start, f"{tag.name} {where}: {rule}")
        elif tag.name == PATH_OPEN:
            self._error("path_outside_block", tag.start, f"{tag.name} {where}: a path must sit inside a block")
        elif tag.name == SUMMARY_OPEN:
            message = f"{tag.name} {where}: a summary must follow {PARALLEL_CLOSE}"
            self._error("summary_out_of_place", tag.start, message)
        else:
            self._error("stray_close", tag.start, f"{tag.name} {where} closes nothing")

    def _in_main(self, tag: _Tag) -> None:
        if tag.name != PARALLEL_OPEN:
            self._misplaced(tag, "in main text")
            return
        self._open_block(tag)

    def _open_block(self, tag: _Tag) -> None:
        self.block = Block(Span(tag.start, tag.end), [], None, False, depth=len(self.outer) + 1)
        self.block_tag, self.num_paths, self.gap, self.path_offsets = tag, 0, None, []
        self.state = _BLOCK

    def _nest(self, tag: _Tag) -> None:
        """A <Parallel> inside the open path: the path's block waits on `outer` until the new block ends."""
        self.outer.append({name: getattr(self, name) for name in self._FRAME})
        self.inner, self.summary_tag = [], None
        self._open_block(tag)

    def _in_block(self, tag: _Tag) -> None:
        if tag.name == PATH_OPEN:
            self._end_gap(tag.start, between_paths=True)
            self._open_path(tag)
        elif tag.name == PARALLEL_CLOSE:
            self._end_gap(tag.start, between_paths=False)
            self._close_block(tag)
        else:
            self._misplaced(tag, "inside a block, between paths")

    def _in_path(self, tag: _Tag) -> None:
        if tag.name == PATH_CLOSE:
            self._end_path(tag.end, _after(tag), tag.start, closed=True)
            self.state, self.gap = _BLOCK, None
        elif tag.name == PATH_OPEN:
            self._end_path(tag.start, tag.index, tag.start, closed=False)
            self._open_path(tag)
        elif tag.name == PARALLEL_CLOSE:
            self._end_path(tag.start, tag.index, tag.start, closed=False)
            self._close_block(tag)
        elif tag.name == PARALLEL_OPEN and len(self.outer) + 1 < self.max_depth:
            self._nest(tag)
        else:
            self._misplaced(tag, "inside a path")

    def _after_block(self, tag: _Tag) -> None:
        if tag.name == SUMMARY_OPEN:
            if self.gap is not None:
                self._error(
                    "text_before_summary",
                    self.gap,
                    f"text between {PARALLEL_CLOSE} and {SUMMARY_OPEN}: {_snippet(self.text, self.gap)}",
                )
            self.summary_tag = tag
            self.state = _SUMMARY
            return
        self._missing_summary(tag.start if self.gap is None else self.gap)
        self.handlers[self.state](tag)

    def _in_summary(self, tag: _Tag) -> None:
        if tag.name != SUMMARY_CLOSE:
            self._misplaced(tag, "inside a summary")
            return
        assert self.block is not None and self.summary_tag is not None
        self.block.summary = Span(self.summary_tag.end, tag.start)
        self.block.summary_closed = True
        if not self.text[self.summary_tag.end : tag.start].strip():
            self._error("empty_summary", self.summary_tag.start, f"{SUMMARY_OPEN} holds only white space")
        self._end_block(tag.end, _after(tag))

    def _finish(self) -> None:
        """End what the text leaves open, the innermost block first (each `_end_block` of a nested one goes back
        to the path that opened it)."""
        while self.state != _MAIN:
            self._finish_block()

    def _finish_block(self) -> None:
        end, end_tok = len(self.text), self.n_tokens
        if self.state == _PATH:
            self._end_path(end, end_tok, end, closed=False)
            self.state = _BLOCK
        if self.state == _BLOCK:
            self._end_gap(end, between_paths=False)
            assert self.block_tag is not None
            message = f"{PARALLEL_OPEN} is never closed by {PARALLEL_CLOSE}"
            self._error("unclosed_block", self.block_tag.start, message)
            self._end_block(end, end_tok)
        elif self.state == _AFTER:
            self._missing_summary(end if self.gap is None else self.gap)
        elif self.state == _SUMMARY:
            assert self.block is not None and self.summary_tag is not None
            message = f"{SUMMARY_OPEN} is never closed by {SUMMARY_CLOSE}"
            self._error("unclosed_summary", self.summary_tag.start, message)
            self.block.summary = Span(self.summary_tag.end, end)
            self._end_block(end, end_tok)

    def _check_gap(self, between_paths: bool) -> None:
        if self.gap is None:
            return
        text = _snippet(self.text, self.gap)
        if between_paths:
            self._error("text_between_paths", self.gap, f"text between {PATH_CLOSE} and {PATH_OPEN}: {text}")
        else:
            self._error("text_in_block", self.gap, f"text inside {PARALLEL_OPEN} outside any {PATH_OPEN}: {text}")
        self.gap = None

    def _end_gap(self, end: int, between_paths: bool) -> None:
        """Text since the block's last structural tag, now ended at `end`: the plan before the first path,
        an error elsewhere."""
        if self.num_paths == 0:
            self._end_plan(end)
        else:
            self._check_gap(between_paths)

    def _end_plan(self, end: int) -> None:
        """The text between the open block's <Parallel> and `end` (its first <Path>, its </Parallel> or the end
        of the text) is the block's plan: an error in the unplanned format, required in the planned one."""
        assert self.block is not None and self.block_tag is not None
        if self.gap is None:
            if self.plans:
                message = f"{PARALLEL_OPEN} is not followed by a plan (one line per path) before its first path"
                self._error("missing_plan", end, message)
            return
        start = self.block_tag.end
        self.block.plan = Span(start, end)
        self.block.plan_lines = plan_line_spans(self.text, start, end)
        if self.plans:
            self.gap = None
        else:
            self._check_gap(between_paths=False)

    def _open_path(self, tag: _Tag) -> None:
        self.path_tag = tag
        self.num_paths += 1
        self.path_offsets.append(tag.start)
        self.state = _PATH

    def _end_path(self, end: int, end_tok: int | None, content_end: int, closed: bool) -> None:
        tag, block = self.path_tag, self.block
        assert tag is not None and block is not None
        if closed and not self.text[tag.end : content_end].strip():
            self._error("empty_path", tag.start, f"{PATH_OPEN} holds only white space")
        if not closed:
            self._error("unclosed_path", tag.start, f"{PATH_OPEN} is never closed by {PATH_CLOSE}")
        lines = block.plan_lines
        if closed and self.plans and self.num_paths <= len(lines):
            line = lines[self.num_paths - 1]
            wanted = self.text[line.start : line.end]
            if not self.text[tag.end : content_end].lstrip().startswith(wanted):
                message = f"path {self.num_paths} does not start with its plan line {wanted!r}"
                self._error("path_off_plan", tag.start, message)
        if closed or self.lenient:
            span, content = Span(tag.start, end), Span(tag.end, content_end)
            block.paths.append(PathSpan(span, content, closed, self._tokens(tag, end_tok), self.inner))
        self.path_tag, self.inner = None, []

    def _close_block(self, tag: _Tag) -> None:
        assert self.block is not None and self.block_tag is not None
        self.block.closed = True
        self.block.span.end = tag.end
        fewest = 1 if self.plans else 2
        if self.num_paths < fewest:
            need = "a planned block needs at least one" if self.plans else "a block needs at least two"
            self._error(
                "too_few_paths", self.block_tag.start, f"{PARALLEL_OPEN} holds {self.num_paths} path(s); {need}"
            )
        lines = self.block.plan_lines
        if self.plans and self.block.plan is not None and len(lines) != self.num_paths:
            extra = lines[self.num_paths].start if len(lines) > self.num_paths else self.path_offsets[len(lines)]
            message = f"the plan names {len(lines)} path(s) but the block holds {self.num_paths}"
            self._error("plan_mismatch", extra, message)
        self.state, self.gap = _AFTER, None
        self.close_end = (tag.end, _after(tag))

    def _missing_summary(self, offset: int) -> None:
        self._error("missing_summary", offset, f"{PARALLEL_CLOSE} is not followed by {SUMMARY_OPEN}")
        self._end_block(*self.close_end)

    def _end_block(self, end: int, end_tok: int | None) -> None:
        block = self.block
        assert block is not None and self.block_tag is not None
        block.span.end = end
        block.token_span = self._tokens(self.block_tag, end_tok)
        if self.outer:
            for name, value in self.outer.pop().items():
                setattr(self, name, value)
            if block.closed or self.lenient:
                self.inner.append(block)
            return
        if block.closed or self.lenient:
            self.blocks.append(block)
        self.block, self.block_tag, self.summary_tag = None, None, None
        self.state = _MAIN

    def _tokens(self, opening: _Tag, end_tok: int | None) -> Span | None:
        if opening.index is None or end_tok is None:
            return None
        return Span(opening.index, end_tok)

    def _main_segments(self) -> list[Span]:
        segments, pos = [], 0
        for block in self.blocks:
            if block.span.start > pos:
                segments.append(Span(pos, block.span.start))
            pos = block.span.end
        if len(self.text) > pos:
            segments.append(Span(pos, len(self.text)))
        return segments


def _after(tag: _Tag) -> int | None:
    return None if tag.index is None else tag.index + 1


def parse(text: str, lenient: bool = False, plans: bool = False, max_depth: int = 1) -> ParsedResponse:
    """Find the blocks of `text` and every format error, each with its character offset.

    Strict (the default) keeps only blocks whose `</Parallel>` was found and, in them, only paths
    closed by their own `</Path>`. `lenient=True` recovers the structure of truncated or messy output:
    a block left open at the end still yields its paths, and a path cut off (by the next `<Path>`, by
    `</Parallel>` or by the end of the text) yields a path with `closed=False`. The errors are the
    same in both modes.

    `plans`: the planned format (docs/design.md, "Planned blocks"): a block opens with a plan, one line per
    path, path j starts with plan line j, and one path is enough. Either way a block's plan text (what comes
    between `<Parallel>` and its first `<Path>`) is kept in `Block.plan`; unplanned, it is an error.

    `max_depth`: how deep blocks may nest (1: a `<Parallel>` inside a path is a `nested_block` error); a path's
    own blocks are in its `PathSpan.blocks`, with `Block.depth` counting from 1.
    """
    return _Scanner(text, None, lenient, plans, max_depth).run(
        [_Tag(m.group(), m.start(), m.end()) for m in _TAG_RE.finditer(text)]
    )


def validate(text: str, plans: bool = False, max_depth: int = 1) -> list[FormatError]:
    """The strict format check (docs/design.md, "The format"); an empty list means the response is well formed.
    `plans`, `max_depth`: as in `parse`."""
    return parse(text, plans=plans, max_depth=max_depth).errors


def render(parsed: ParsedResponse) -> str:
    """Rebuild the text from the structure: main segments, and each block from its paths and the text
    around them. Raises ValueError when the spans do not tile the text, so `render(parse(t)) == t`
    checks that the parser accounted for every character."""
    text = parsed.text
    pieces = [(s, None) for s in parsed.main_segments] + [(b.span, b) for b in parsed.blocks]
    pieces.sort(key=lambda piece: piece[0].start)
    out, pos = [], 0
    for span, block in pieces:
        bounds = [span.start, span.end]
        if block is not None:
            bounds[1:1] = [x for p in block.paths for x in (p.span.start, p.span.end)]
        if span.start != pos or bounds != sorted(bounds):
            raise ValueError(f"spans do not tile the text at offset {pos}")
        out.extend(text[a:b] for a, b in zip(bounds, bounds[1:]))
        pos = span.end
    if pos != len(text):
        raise ValueError(f"spans stop at offset {pos} of {len(text)}")
    return "".join(out)


_JOINS = (
    (PARALLEL_OPEN, PATH_OPEN),
    (PATH_CLOSE, PATH_OPEN),
    (PATH_CLOSE, PARALLEL_CLOSE),
    (PARALLEL_CLOSE, SUMMARY_OPEN),
)
_JOIN_SPACE_RE = re.compile("|".join(rf"(?<={re.escape(a)})\s+(?={re.escape(b)})" for a, b in _JOINS))


def canonicalize(text: str) -> str:
    """Remove the white space between structural tags that follow each other inside a block
    (`<Parallel> <Path>`, `</Path> <Path>`, `</Path> </Parallel>`, `</Parallel> <Summary>`), so
    that training data tokenizes like the engine's output (docs/design.md, "Token layout")."""
    return _JOIN_SPACE_RE.sub("", text)


def parse_ids(
    ids, tokenizer, lenient: bool = True, tags: TagIds | None = None, plans: bool = False, max_depth: int = 1
) -> ParsedResponse:
    """Parse token ids: tags are found by their token ids, never by re-tokenizing decoded text. `tags`
    (`TagIds.from_tokenizer(tokenizer)`) spares encoding the six tags again for every response.

    The text of the result is built by decoding each run of non-tag tokens on its own and joining the
    runs with the tags; character offsets refer to that text, and blocks and paths get `token_span`s
    (indices into `ids`).
    """
    ids = [int(i) for i in ids]
    tag_names = dict(zip((tags or TagIds.from_tokenizer(tokenizer)).as_tuple(), TAGS))
    pieces: list[str] = []
    found: list[_Tag] = []
    pos, run_start = 0, 0
    for i, tok in enumerate([*ids, None]):
        if tok is not None and tok not in tag_names:
            continue
        run = tokenizer.decode(ids[run_start:i], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        pieces.append(run)
        pos += len(run)
        if tok is not None:
            name = tag_names[tok]
            found.append(_Tag(name, pos, pos + len(name), i))
            pieces.append(name)
            pos += len(name)
        run_start = i + 1
    return _Scanner("".join(pieces), len(ids), lenient, plans, max_depth).run(found)
