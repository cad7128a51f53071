"""The parallel-thinking format: the six tags, their token ids, and the tokenizer/model surgery.

A response is plain reasoning text that may open blocks::

    <Parallel><Path>...</Path><Path>...</Path></Parallel><Summary>...</Summary>

Parsing, strict validation and rendering of responses live further down in this module.
"""

from __future__ import annotations

from dataclasses import dataclass

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
    def from_tokenizer(cls, tokenizer) -> "TagIds":
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
    vocabulary grew. New embedding rows (input and, if untied, output) start at the mean of the
    existing rows, which keeps the initial logits of the new tokens in the range of ordinary tokens.
    """
    vocab = tokenizer.get_vocab()
    special = set(tokenizer.all_special_tokens)
    to_add = [t for t in TAGS if t not in vocab or t not in special]
    if to_add:
        tokenizer.add_tokens(to_add, special_tokens=True)
    if model is not None:
        old = model.get_input_embeddings().weight.shape[0]
        new = len(tokenizer)
        if new > old:
            model.resize_token_embeddings(new, mean_resizing=True)
    return TagIds.from_tokenizer(tokenizer)
