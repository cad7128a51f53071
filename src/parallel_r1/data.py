"""Problems and cold-start records, from the Hugging Face Hub or from local files.

Local files (.jsonl, .json, .parquet, or a directory of them) use one flat schema, one object per
problem: ``{"question": ..., "answer": ...}`` (the schema of the project's shared data folder); other
field names can be given. Known benchmark names load their Hub copy with `datasets.load_dataset` and
map its fields onto that schema (see `BENCHMARKS`).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

from parallel_r1.files import iter_jsonl
from parallel_r1.prompts import PROMPT_TEMPLATE, build_prompt
from parallel_r1.settings import InputError

log = logging.getLogger(__name__)

LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")


@dataclass(frozen=True)
class Problem:
    question: str
    answer: str  # the ground truth, as text ("18", "\\frac{9}{7}")
    source: str  # the benchmark name or the file it came from
    id: str  # unique within its source
    solution: str | None = None  # a worked solution, when the data has one (the few-shot examples)


@dataclass(frozen=True)
class SFTRecord:
    prompt: str
    response: str  # the target text, in the parallel-thinking format
    answer: str | None  # the ground truth when the data has it


def gsm8k_final_answer(solution: str) -> str:
    """The final answer of a GSM8K solution: the text after its last "####", thousands commas removed."""
    if "####" not in solution:
        raise InputError(f"GSM8K answer has no '####' marker: {solution[-80:]!r}")
    return solution.rsplit("####", 1)[1].strip().replace(",", "")


_CALCULATOR = re.compile(r"<<[^<>]*>>")


def gsm8k_worked_solution(solution: str) -> str:
    """The reasoning of a GSM8K solution, before its "####" line, without the ``<<48/2=24>>`` calculator
    annotations (they are not text a model should learn to write)."""
    return _CALCULATOR.sub("", solution.rsplit("####", 1)[0]).strip()


_DAPO_LEAD = re.compile(r"^\s*Solve the following math problem[^\n]*\n+")
_DAPO_TAIL = re.compile(r"\n+\s*Remember to put your answer[^\n]*\s*$")


def dapo_question(prompt_text: str) -> str:
    """The bare problem inside a DAPO-Math-17k prompt, without the answer-format instructions around it.

    DAPO wraps each problem in a first paragraph asking for an "Answer:" line and a last paragraph
    reminding of it; our own prompt template asks for the answer its own way.
    """
    return _DAPO_TAIL.sub("", _DAPO_LEAD.sub("", prompt_text)).strip()


@dataclass(frozen=True)
class HubDataset:
    """Where a benchmark lives on the Hub and how its rows map onto (question, answer, id).

    Field names are paths into a row: "problem", or "prompt.0.content" for nested lists and dicts.
    """

    path: str
    config: str | None
    split: str
    question: str
    answer: str
    id: str | None = None  # a field holding a stable id; rows without it use their row number
    solution: str | None = None  # a field holding a worked solution
    clean_question: Callable[[str], str] | None = None
    clean_answer: Callable[[str], str] | None = None
    clean_solution: Callable[[str], str] | None = None
    dedupe: bool = False  # drop repeated questions (keeping the first)


BENCHMARKS: dict[str, HubDataset] = {
    # GSM8K: grade-school word problems; the answer field is a worked solution ending in "#### 72".
    "gsm8k": HubDataset(
        "openai/gsm8k",
        "main",
        "train",
        "question",
        "answer",
        solution="answer",
        clean_answer=gsm8k_final_answer,
        clean_solution=gsm8k_worked_solution,
    ),
    # DAPO-Math-17k: the RL set of the DAPO paper, chat-format prompts with integer ground truths.
    # The Hub copy repeats each of its ~17.9k problems many times (1.79M rows), hence dedupe.
    "dapo": HubDataset(
        "BytedTsinghua-SIA/DAPO-Math-17k",
        None,
        "train",
        "prompt.0.content",
        "reward_model.ground_truth",
        id="extra_info.index",
        clean_question=dapo_question,
        dedupe=True,
    ),
    # MATH-500: the 500-problem MATH test subset of "Let's Verify Step by Step"; answers are LaTeX.
    "math500": HubDataset(
        "HuggingFaceH4/MATH-500", None, "test", "problem", "answer", id="unique_id", solution="solution"
    ),
    # AIME 2024 I and II (30 problems), integer answers.
    "aime24": HubDataset("HuggingFaceH4/aime_2024", None, "train", "problem", "answer", id="id"),
    # AIME 2025 I and II (30 problems), integer answers; a widely used community copy.
    "aime25": HubDataset("yentinglin/aime_2025", None, "train", "problem", "answer", id="id"),
    # AMC 2023 (40 problems); answers are stored as numbers.
    "amc23": HubDataset("math-ai/amc23", None, "test", "question", "answer", id="id"),
}
BENCHMARKS["dapo_math_17k"] = BENCHMARKS["dapo"]


def _field(row: dict[str, Any], path: str) -> Any:
    """The value at a dotted `path` ("prompt.0.content") in a row; KeyError when any step is missing."""
    value: Any = row
    for key in path.split("."):
        if isinstance(value, dict) and key in value:
            value = value[key]
        elif isinstance(value, (list, tuple)) and key.isdigit() and int(key) < len(value):
            value = value[int(key)]
        else:
            raise KeyError(key)
    return value


def _as_text(value: Any) -> str:
    # Numeric answers (AMC stores 27.0) become the text a model would write.
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _text_field(row: dict[str, Any], path: str, where: str) -> str:
    """The text at `path` in `row`, as stored; ValueError naming `where` and the field when absent or blank."""
    try:
        value = _field(row, path)
    except KeyError:
        raise InputError(f"{where}: no field {path!r} (fields there: {', '.join(sorted(row)) or 'none'})") from None
    text = "" if value is None else _as_text(value)
    if not text.strip():
        raise InputError(f"{where}: field {path!r} is empty")
    return text


def _optional_text(row: dict[str, Any], path: str) -> str | None:
    try:
        value = _field(row, path)
    except KeyError:
        return None
    return None if value is None else _as_text(value).strip()


def _row_id(row: dict[str, Any], path: str, default: int) -> str:
    try:
        value = _field(row, path)
    except KeyError:
        value = None
    return str(default) if value is None else _as_text(value)


def _local_files(path: Path, split: str | None) -> list[Path]:
    if path.is_file():
        if path.suffix not in LOCAL_SUFFIXES:
            raise InputError(f"{path}: unsupported file type {path.suffix!r} (use {', '.join(LOCAL_SUFFIXES)})")
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(
            f"{path}: no such file or directory, and not a known dataset name ({', '.join(sorted(BENCHMARKS))})"
        )
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in LOCAL_SUFFIXES)
    if split is not None:
        # A split picks the files named after it: test.jsonl, gsm8k_test.jsonl, test-00000-of-00001.parquet.
        word = re.compile(rf"(^|[_\-.]){re.escape(split)}([_\-.]|$)")
        files = [p for p in files if word.search(p.stem)]
    if not files:
        wanted = f" for split {split!r}" if split else ""
        raise FileNotFoundError(f"{path}: no {', '.join(LOCAL_SUFFIXES)} files{wanted}")
    return files


def _read_rows(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """(location for error messages, row) for every row of one local file."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq  # here, not at the top: reading a JSONL or the CLI's help needs neither

        for i, row in enumerate(pq.read_table(path).to_pylist(), start=1):
            yield f"{path}, row {i}", row
        return
    text = path.read_text(encoding="utf-8") if path.suffix == ".json" else ""
    if text.lstrip().startswith("["):  # a .json file holding one array of rows
        for i, row in enumerate(json.loads(text), start=1):
            if not isinstance(row, dict):
                raise InputError(f"{path}, row {i}: expected a JSON object, got {type(row).__name__}")
            yield f"{path}, row {i}", row
        return
    for n, row in iter_jsonl(path):
        if not isinstance(row, dict):
            raise InputError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
        yield f"{path}:{n}", row


def _local_rows(source: str, split: str | None) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """(file stem, location, row) over every local file that `source` names."""
    for path in _local_files(Path(source), split):
        for where, row in _read_rows(path):
            yield path.stem, where, row


def _hub_problems(
    name: str, split: str | None, question_field: str | None, answer_field: str | None
) -> Iterator[Problem]:
    spec = BENCHMARKS[name]
    split = split or spec.split
    question_path, answer_path = question_field or spec.question, answer_field or spec.answer
    log.info("loading %s from the Hub (%s, config %s, split %s)", name, spec.path, spec.config, split)
    import datasets

    rows = datasets.load_dataset(spec.path, spec.config, split=split)
    seen: set[str] = set()
    for i, row in enumerate(rows):
        where = f"{spec.path} ({split}), row {i + 1}"
        question = _text_field(row, question_path, where).strip()
        answer = _text_field(row, answer_path, where).strip()
        try:
            question = spec.clean_question(question) if spec.clean_question else question
            answer = spec.clean_answer(answer) if spec.clean_answer else answer
        except ValueError as e:
            raise InputError(f"{where}: {e}") from None
        if spec.dedupe:
            if question in seen:
                continue
            seen.add(question)
        row_id = _row_id(row, spec.id, i) if spec.id else str(i)
        solution = _optional_text(row, spec.solution) if spec.solution else None
        if solution is not None and spec.clean_solution:
            solution = spec.clean_solution(solution)
        yield Problem(question, answer, name, f"{name}/{row_id}", solution or None)


def _local_problems(
    source: str, split: str | None, question_field: str | None, answer_field: str | None
) -> Iterator[Problem]:
    question_path, answer_path = question_field or "question", answer_field or "answer"
    for n, (stem, where, row) in enumerate(_local_rows(source, split)):
        question = _text_field(row, question_path, where).strip()
        answer = _text_field(row, answer_path, where).strip()
        solution = _optional_text(row, "solution")
        if "####" in answer:
            solution = solution or gsm8k_worked_solution(answer)
            answer = gsm8k_final_answer(answer)
        yield Problem(question, answer, stem, f"{stem}/{_row_id(row, 'id', n)}", solution or None)


def load_problems(
    source: str,
    split: str | None = None,
    limit: int | None = None,
    question_field: str | None = None,
    answer_field: str | None = None,
) -> list[Problem]:
    """Load problems from a known benchmark name (see `BENCHMARKS`) or a local file or directory.

    `split` picks the Hub split (default: the benchmark's own) or, in a local directory, the files
    named after it. `limit` keeps the first problems. `question_field` / `answer_field` override the
    field names ("question" / "answer" for local files). A GSM8K-style answer ("... #### 72") keeps
    only its final answer, its reasoning becoming the problem's solution (a "solution" field is one too).
    A missing or empty field raises ValueError naming the file, row and field.
    """
    if limit is not None and limit < 1:
        raise InputError(f"limit must be >= 1, got {limit}")
    if source in BENCHMARKS and not Path(source).exists():
        problems = _hub_problems(source, split, question_field, answer_field)
    else:
        problems = _local_problems(source, split, question_field, answer_field)
    # islice stops before reading the row after the last one kept.
    return list(islice(problems, limit))


def load_sft_records(
    path: str,
    prompt_field: str | None = None,
    response_field: str = "response",
    question_field: str = "question",
    template: str = PROMPT_TEMPLATE,
) -> list[SFTRecord]:
    """Cold-start records from a local file or directory (e.g. teacher outputs in the parallel format).

    The prompt is the row's `prompt_field` when given; otherwise `build_prompt(question, template)`,
    so that training uses the project's prompt and not whatever the teacher was shown. The answer is
    the row's "answer" field when there is one.
    """
    records: list[SFTRecord] = []
    for _, where, row in _local_rows(path, None):
        if prompt_field is None:
            prompt = build_prompt(_text_field(row, question_field, where), template)
        else:
            prompt = _text_field(row, prompt_field, where)
        response = _text_field(row, response_field, where)
        answer = row.get("answer")
        records.append(SFTRecord(prompt, response, None if answer is None else _as_text(answer).strip()))
    return records
