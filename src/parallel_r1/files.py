"""The project's file helpers: `atomic_write_text` (every small file that must never be seen half-written),
`read_jsonl` / `iter_jsonl` (every JSON Lines reader) and `JsonlWriter` (every JSON Lines log).

A log's records carry the step they belong to. A resumed run rewinds its logs to the checkpoint's step
first, so steps that were logged after the last checkpoint and are now run again appear once, and the
file reads as if the run had never stopped.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from parallel_r1.settings import InputError

log = logging.getLogger(__name__)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write `text` to `path` through a temporary file and a rename: a kill leaves the old file or the new one."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def iter_jsonl(path: str | Path, allow_cut_last_line: bool = False) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) for every non-blank line of a JSON Lines file.

    A line that is not valid JSON raises ValueError naming the file and line, except, with
    `allow_cut_last_line`, the file's last line, which a run killed mid-write may have cut short: it is
    skipped with a warning.
    """
    path = Path(path)
    lines = path.read_text(encoding="utf-8").splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            if allow_cut_last_line and n == len(lines):
                log.warning("%s:%d: skipping a line cut short (%s)", path, n, e)
                continue
            raise InputError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        yield n, value


def read_jsonl(path: str | Path, allow_cut_last_line: bool = False) -> list[Any]:
    """Every record of a JSON Lines file (see `iter_jsonl`)."""
    return [value for _, value in iter_jsonl(path, allow_cut_last_line)]


def rewind_jsonl(path: str | Path, step: int) -> None:
    """Drop the records of `path` whose "step" is greater than `step` (atomic rewrite)."""
    path = Path(path)
    if not path.is_file():
        return
    # A last line cut short by a kill mid-write is dropped; every complete record before it is kept.
    kept = [r for r in read_jsonl(path, allow_cut_last_line=True) if r.get("step", 0) <= step]
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))


class JsonlWriter:
    """Append records to a JSON Lines file, flushed after each write (a kill loses at most one line)."""

    def __init__(self, path: str | Path, resume_step: int = 0, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled
        self._file = None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            rewind_jsonl(self.path, resume_step)
            self._file = self.path.open("a")

    def write(self, record: dict[str, Any]) -> None:
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
