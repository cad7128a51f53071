"""Cold-start data: ask a teacher model (any OpenAI-compatible /v1/chat/completions endpoint) to solve
easy problems in the parallel-thinking format, and keep only what passes the strict format check and
the answer check (SPEC section 4).

A bounded pool of threads sends the requests; timeouts, connection errors, 429 and 5xx replies are
retried with exponential backoff. The main thread checks each reply and appends one JSON line per kept
output with a single O_APPEND write, so a run that is killed loses at most the replies in flight. A rerun
skips every id already in the output file or in its ``.rejected.jsonl`` side file (delete that file to
give rejected problems another try); problems whose request failed are tried again.
"""

from __future__ import annotations

import json
import logging
import os
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

from parallel_r1.answers import extract_answer, verify
from parallel_r1.format import parse

logger = logging.getLogger(__name__)

API_KEY_ENV = "PARALLEL_R1_TEACHER_API_KEY"


@dataclass
class TeacherConfig:
    url: str  # the server's base URL ("http://host:8000" or ".../v1") or the full chat-completions URL
    model: str
    temperature: float = 0.7
    max_tokens: int = 4096
    timeout_s: float = 60.0
    retries: int = 3  # extra attempts after the first, on timeouts, connection errors, 429 and 5xx
    backoff_s: float = 1.0  # wait before retry i (0-based): backoff_s * 2**i
    concurrency: int = 8
    require_block: bool = True  # an output without any <Parallel> block teaches nothing about the format

    def __post_init__(self) -> None:
        if self.concurrency < 1 or self.retries < 0 or self.timeout_s <= 0:
            raise ValueError("TeacherConfig: need concurrency >= 1, retries >= 0 and timeout_s > 0")


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


class TeacherError(RuntimeError):
    """A request that failed; `transient` ones are worth retrying."""

    def __init__(self, message: str, transient: bool):
        super().__init__(message)
        self.transient = transient


def chat_url(url: str) -> str:
    url = url.rstrip("/")
    if url.endswith("/chat/completions"):
        return url
    return url + ("/chat/completions" if url.endswith("/v1") else "/v1/chat/completions")


def _post(cfg: TeacherConfig, prompt: str) -> str:
    body = {
        "model": cfg.model,
        "messages": [{"role": "user", "content": prompt}],
        "temperature": cfg.temperature,
        "max_tokens": cfg.max_tokens,
    }
    headers = {"Content-Type": "application/json"}
    if os.environ.get(API_KEY_ENV):
        headers["Authorization"] = f"Bearer {os.environ[API_KEY_ENV]}"
    request = urllib.request.Request(chat_url(cfg.url), json.dumps(body).encode(), headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=cfg.timeout_s) as reply:
            payload = json.loads(reply.read())
    except urllib.error.HTTPError as e:
        transient = e.code == 429 or e.code >= 500
        raise TeacherError(f"HTTP {e.code} from {request.full_url}", transient) from e
    except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
        raise TeacherError(f"{request.full_url}: {getattr(e, 'reason', e)}", transient=True) from e
    except json.JSONDecodeError as e:
        raise TeacherError(f"{request.full_url}: the reply is not JSON: {e}", transient=True) from e
    try:
        content = payload["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError) as e:
        raise TeacherError(f"{request.full_url}: no choices[0].message.content in the reply", False) from e
    if not isinstance(content, str):
        raise TeacherError(f"{request.full_url}: choices[0].message.content is not a string", False)
    return content


def ask_teacher(cfg: TeacherConfig, prompt: str) -> str:
    """The teacher's reply to `prompt`, after up to cfg.retries retries of transient failures."""
    attempt = 0
    while True:
        try:
            return _post(cfg, prompt)
        except TeacherError as e:
            if not e.transient or attempt >= cfg.retries:
                raise
            wait = cfg.backoff_s * 2**attempt
            attempt += 1
            logger.debug("%s; retry %d/%d in %.2f s", e, attempt, cfg.retries, wait)
            time.sleep(wait)


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
        logger.warning("%s: dropping a half-written last line (%d bytes)", path, len(data) - keep)
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
    """Ask the teacher about every problem not done yet, append kept outputs to `out`, report the yield."""
    from rich.progress import Progress

    from parallel_r1.data import build_prompt

    out, rejects = Path(out), rejected_path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for path in (out, rejects):
        _repair_tail(path)
    done = done_ids(out) | done_ids(rejects)
    todo = [p for p in problems if p.id not in done]
    report = YieldReport(skipped=len(problems) - len(todo))
    with ThreadPoolExecutor(max_workers=cfg.concurrency) as pool, Progress(transient=True) as progress:
        task = progress.add_task("teacher", total=len(todo))
        futures = {pool.submit(ask_teacher, cfg, build_prompt(p.question)): p for p in todo}
        try:
            for future in as_completed(futures):
                problem = futures[future]
                report.tried += 1
                progress.advance(task)
                try:
                    response = future.result()
                except TeacherError as e:
                    logger.warning("problem %s: %s", problem.id, e)
                    report.rejected["request_failed"] += 1
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
    return report


def run_generate(
    cfg: TeacherConfig, dataset: str, out: str | Path, limit: int | None = None, split: str | None = None
) -> YieldReport:
    """`generate` over `data.load_problems(dataset, split, limit)`."""
    from parallel_r1.data import load_problems

    return generate(load_problems(dataset, split=split, limit=limit), cfg, out)
