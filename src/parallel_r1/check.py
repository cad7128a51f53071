"""The `parallel-r1 check` command's work: the strict format check of every response in a JSONL file, and
its plain-text report."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict
from pathlib import Path

from parallel_r1.format import parse
from parallel_r1.settings import InputError as _BaseInputError


class InputError(_BaseInputError):
    """A response file that cannot be read; the message names the file and, where known, the line."""


def check_file(path: str | Path, field: str = "response", plans: bool = False, max_depth: int = 1) -> list[dict]:
    """Strictly validate the `field` of every record of a JSONL file (blank lines are skipped).

    Returns one dict per record: {"line", "valid", "blocks", "paths", "errors"}, where blocks and
    paths count what is there (lenient parse) and errors are those of the strict check. Raises
    InputError for a missing or unreadable file, a line that is not a JSON object, or a missing field.
    `plans`: the planned format's check; `max_depth`: how deep blocks may nest (`format.parse`).
    """
    results = []
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    results.append(_check_line(path, n, line, field, plans, max_depth))
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read: {e}") from e
    return results


def _check_line(path: str | Path, n: int, line: str, field: str, plans: bool = False, max_depth: int = 1) -> dict:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise InputError(f"{path}:{n}: not valid JSON: {e}") from e
    if not isinstance(record, dict) or field not in record:
        raise InputError(f"{path}:{n}: no field {field!r} in this record")
    if not isinstance(record[field], str):
        raise InputError(f"{path}:{n}: field {field!r} must be a string, not {type(record[field]).__name__}")
    parsed = parse(record[field], lenient=True, plans=plans, max_depth=max_depth)
    return {
        "line": n,
        "valid": parsed.well_formed,
        "blocks": parsed.num_blocks,
        "paths": parsed.paths_per_block,
        "errors": [asdict(e) for e in parsed.errors],
    }


def check_report(path: str | Path, results: list[dict]) -> str:
    """Plain-text report of `check_file` results: one line per error, then the totals."""
    lines = [
        f"{path}:{r['line']}: {e['kind']} at offset {e['offset']}: {e['message']}" for r in results for e in r["errors"]
    ]
    kinds = Counter(e["kind"] for r in results for e in r["errors"])
    invalid = sum(not r["valid"] for r in results)
    lines.append(
        f"{len(results)} responses: {len(results) - invalid} valid, {invalid} invalid; "
        f"{sum(r['blocks'] for r in results)} blocks, {sum(sum(r['paths']) for r in results)} paths"
    )
    if kinds:
        lines.append("errors: " + ", ".join(f"{kind} {count}" for kind, count in kinds.most_common()))
    return "\n".join(lines)
