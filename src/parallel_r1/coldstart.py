"""Cold-start data: ask a teacher model (any OpenAI-compatible chat-completions server) to solve easy
problems in the parallel-thinking format, and keep only what passes the strict format check and the answer
check (docs/evaluation.md, `parallel-r1 data generate`).

The instruction is the user turn of a chat-completions request, which the server renders through the
teacher's chat template, after an optional system turn; with the chat template off it is the whole prompt of
a plain completions request (a base model served without a template).

The requests go through the `openai` client (`pip install parallel-r1[teacher]`), which handles timeouts,
retries with backoff (timeouts, connection errors, 429 and 5xx) and the API key header. A bounded pool of
threads sends them. The main thread checks each reply and appends one JSON line per kept output with a
single O_APPEND write, so a run that is killed loses at most the replies in flight. A rerun skips every
id already in the output file or in its ``.rejected.jsonl`` side file (delete that file to give rejected
problems another try); problems whose request failed are tried again.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

from rich.progress import Progress

from parallel_r1.answers import extract_answer, verify
from parallel_r1.data import load_problems
from parallel_r1.format import parse
from parallel_r1.prompts import build_prompt
from parallel_r1.settings import CHAT_TEMPLATE_MODES, InputError

log = logging.getLogger(__name__)

API_KEY_ENV = "PARALLEL_R1_TEACHER_API_KEY"


@dataclass
class TeacherConfig:
    url: str  # the server's base URL ("http://host:8000" or ".../v1") or the full chat-completions URL
    model: str
    temperature: float = 0.7
    max_tokens: int = 4096
    timeout_s: float = 60.0
    retries: int = 3  # extra attempts after the first (the client's backoff), on timeouts, connection errors, 429, 5xx
    concurrency: int = 8
    require_block: bool = True  # an output without any <Parallel> block teaches nothing about the format
    # auto and on: a chat-completions request (the server applies the teacher's template); off: plain completions
    chat_template: str = "auto"
    system_prompt: str | None = None  # a system turn before the instruction (chat) or a first paragraph (off)

    def __post_init__(self) -> None:
        if self.concurrency < 1 or self.retries < 0 or self.timeout_s <= 0:
            raise ValueError("TeacherConfig: need concurrency >= 1, retries >= 0 and timeout_s > 0")
        if self.chat_template not in CHAT_TEMPLATE_MODES:
            raise InputError(
                f"chat_template must be one of {', '.join(CHAT_TEMPLATE_MODES)}, got {self.chat_template!r}"
            )


@dataclass
class YieldReport:
    tried: int = 0  # problems sent to the teacher in this run
    kept: int = 0
    skipped: int = 0  # already in the output or rejected file from an earlier run
    rejected: Counter = field(default_factory=Counter)  # reason -> count; "request_failed" included

    @property
    def yield_rate(self) -> float:
        return self.kept / self.tried if self.tried else 0.0

    def describe(self) -> str:
        reasons = ", ".join(f"{k} {v}" for k, v in self.rejected.most_common()) or "none"
        return (
            f"kept {self.kept} / tried {self.tried} ({self.yield_rate:.1%}); skipped {self.skipped} done earlier; "
            f"rejected: {reasons}"
        )


class TeacherError(InputError):
    """A request that failed after the client's retries (a server that does not answer is bad input)."""


def api_base(url: str) -> str:
    """The client's base URL (ending in /v1) for a server URL, a .../v1 URL or a full chat-completions URL."""
    url = url.rstrip("/").removesuffix("/chat/completions")
    return url if url.endswith("/v1") else url + "/v1"


def teacher_client(cfg: TeacherConfig):
    """An `openai.OpenAI` client for the teacher's server; the key comes from $PARALLEL_R1_TEACHER_API_KEY
    (local servers usually need none)."""
    try:
        import openai
    except ImportError as e:
        raise ImportError("the teacher client needs the openai package: pip install 'parallel-r1[teacher]'") from e
    return openai.OpenAI(
        base_url=api_base(cfg.url),
        api_key=os.environ.get(API_KEY_ENV) or "none",
        timeout=cfg.timeout_s,
        max_retries=cfg.retries,
    )


def ask_teacher(client, cfg: TeacherConfig, prompt: str) -> str:
    """The teacher's reply to `prompt` (the client retries transient failures up to cfg.retries times)."""
    import openai

    where = api_base(cfg.url)
    chat = cfg.chat_template != "off"
    try:
        if chat:
            system = [{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else []
            reply = client.chat.completions.create(
                model=cfg.model,
                messages=[*system, {"role": "user", "content": prompt}],
                temperature=cfg.temperature,
                max_tokens=cfg.max_tokens,
            )
        else:
            text = f"{cfg.system_prompt.strip()}\n\n{prompt}" if cfg.system_prompt else prompt
            reply = client.completions.create(
                model=cfg.model, prompt=text, temperature=cfg.temperature, max_tokens=cfg.max_tokens
            )
    except openai.APIStatusError as e:
        raise TeacherError(f"HTTP {e.status_code} from {where}") from e
    except openai.APIConnectionError as e:  # timeouts included
        raise TeacherError(f"{where}: {e}") from e
    choice = reply.choices[0] if reply.choices else None
    content = (choice.message.content if chat else choice.text) if choice is not None else None
    if not isinstance(content, str):
        field_name = "message.content" if chat else "text"
        raise TeacherError(f"{where}: the reply has no choices[0].{field_name} text")
    return content


def rejection_reason(response: str, gold: str, require_block: bool = True) -> str | None:
    """Why a teacher output is not kept, or None when it is: "format:<first error kind>", "no_block",
    "no_answer" or "wrong_answer". Must run in the main thread for `verify`'s cheap timeout."""
    parsed = parse(response)
    if parsed.errors:
        return f"format:{parsed.errors[0].kind}"
    if require_block and not parsed.blocks:
        return "no_block"
    answer = extract_answer(response)
    if answer is None:
        return "no_answer"
    return None if verify(answer, gold) else "wrong_answer"


def _repair_tail(path: Path) -> None:
    """Cut a line left half-written by a killed run, so appends start on a fresh line."""
    if not path.exists() or path.stat().st_size == 0:
        return
    data = path.read_bytes()
    if not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
        log.warning("%s: dropping a half-written last line (%d bytes)", path, len(data) - keep)
        with path.open("r+b") as f:
            f.truncate(keep)


def done_ids(path: Path) -> set[str]:
    """Ids recorded in a JSONL file (complete lines only)."""
    if not path.exists():
        return set()
    ids = set()
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                ids.add(str(json.loads(line)["id"]))
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{n}: not a record with an 'id' ({e})") from e
    return ids


def rejected_path(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.stem + ".rejected.jsonl")


def _append(path: Path, record: dict) -> None:
    # One write() of the whole line to an O_APPEND descriptor: a kill leaves whole lines or a torn tail.
    data = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        while data:
            data = data[os.write(fd, data) :]
    finally:
        os.close(fd)


def generate(problems: Sequence, cfg: TeacherConfig, out: str | Path) -> YieldReport:
    """Ask the teacher about every problem not done yet, append kept outputs to `out`, report the yield.
    Raises TeacherError when every request failed (a server that is down or a wrong URL)."""
    out, rejects = Path(out), rejected_path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for path in (out, rejects):
        _repair_tail(path)
    done = done_ids(out) | done_ids(rejects)
    todo = [p for p in problems if p.id not in done]
    report = YieldReport(skipped=len(problems) - len(todo))
    failure = None
    with (
        teacher_client(cfg) as client,
        ThreadPoolExecutor(max_workers=cfg.concurrency) as pool,
        Progress(transient=True) as progress,
    ):
        task = progress.add_task("teacher", total=len(todo))
        futures = {pool.submit(ask_teacher, client, cfg, build_prompt(p.question)): p for p in todo}
        try:
            for future in as_completed(futures):
                problem = futures[future]
                report.tried += 1
                progress.advance(task)
                try:
                    response = future.result()
                except TeacherError as e:
                    log.warning("problem %s: %s", problem.id, e)
                    report.rejected["request_failed"] += 1
                    failure = e
                    continue
                reason = rejection_reason(response, problem.answer, cfg.require_block)
                if reason is not None:
                    report.rejected[reason] += 1
                    _append(rejects, {"id": problem.id, "reason": reason})
                    continue
                report.kept += 1
                record = {
                    "id": problem.id,
                    "question": problem.question,
                    "answer": problem.answer,
                    "prompt": build_prompt(problem.question),
                    "response": response,
                    "source": problem.source,
                    "teacher": cfg.model,
                }
                _append(out, record)
        except KeyboardInterrupt:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    if report.tried and report.rejected["request_failed"] == report.tried:
        raise TeacherError(f"every request to the teacher failed, the last one with: {failure}")
    return report


def run_generate(
    cfg: TeacherConfig, dataset: str, out: str | Path, limit: int | None = None, split: str | None = None
) -> YieldReport:
    """`generate` over `data.load_problems(dataset, split, limit)`."""
    return generate(load_problems(dataset, split=split, limit=limit), cfg, out)
