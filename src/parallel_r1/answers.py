"""Final-answer extraction and verification.

`extract_answer` finds the answer a response commits to (the last ``Final Answer:`` line, else the last
``\\boxed{}``); `verify` decides whether it equals the ground truth with math-verify, after a cheap
numeric fast path that settles most GSM8K-style integer answers without parsing.

math-verify bounds its own work with ``signal.alarm``, which only works in the main thread. `verify`
uses that where it can and otherwise runs math-verify in a helper process that is killed when it
overruns, so a pathological expression costs at most about `timeout_s` in any thread and never raises.
"""

from __future__ import annotations

import json
import logging
import math
import os
import queue
import re
import signal
import subprocess
import sys
import threading
from fractions import Fraction

logger = logging.getLogger(__name__)

_FINAL_ANSWER = re.compile(r"final\s+answer\s*:", re.IGNORECASE)
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_NUMBER = re.compile(r"-?(?:\d+(?:\.\d*)?|\.\d+)")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_WORKER_START_S = 120.0  # a fresh helper imports sympy; on a busy machine that can take many seconds


def _boxed_contents(text: str) -> list[str]:
    """Contents of every ``\\boxed{...}`` / ``\\fbox{...}`` with balanced braces, in order of appearance."""
    found = []
    for match in _BOXED.finditer(text):
        depth, start = 1, match.end()
        for i in range(start, len(text)):
            if text[i] == "{":
                depth += 1
            elif text[i] == "}":
                depth -= 1
                if depth == 0:
                    found.append(text[start:i].strip())
                    break
    return found


def _clean(answer: str) -> str:
    # Markdown emphasis ("**Final Answer:** 42") and a sentence-ending period are not part of the answer.
    answer = answer.strip().strip("*").strip()
    if answer.endswith(".") and not answer.endswith(".."):
        answer = answer[:-1].rstrip()
    boxed = _boxed_contents(answer)
    return boxed[-1] if boxed else answer


def extract_answer(text: str) -> str | None:
    """The answer a response ends on, or None.

    The text after the last ``Final Answer:`` (case-insensitive) up to the end of that line, trimmed, a
    trailing period removed (when the line is empty, the next non-empty line); failing that, the contents
    of the last ``\\boxed{...}`` or ``\\fbox{...}``. The whole response is searched and the last
    occurrence wins, because the main thread's conclusion comes after any path's.
    """
    matches = list(_FINAL_ANSWER.finditer(text))
    if matches:
        rest = text[matches[-1].end() :].lstrip(" \t*")
        for line in rest.splitlines():
            answer = _clean(line)
            if answer:
                return answer
    boxed = [b for b in _boxed_contents(text) if b]
    return boxed[-1] if boxed else None


def _as_number(answer: str) -> Fraction | None:
    """`answer` as an exact number when it is a plain (possibly currency, comma-grouped) decimal."""
    answer = answer.strip().replace("\u2212", "-").removeprefix("\\$").removeprefix("$").strip()
    answer = _THOUSANDS.sub("", answer.rstrip("."))
    return Fraction(answer) if _NUMBER.fullmatch(answer) else None


def _math_verify(pred: str, gold: str, timeout_s: int) -> bool:
    """math-verify's own check; `timeout_s` (whole seconds) bounds each parse and each comparison."""
    from math_verify import parse
    from math_verify import verify as mv_verify

    # Gold answers are bare LaTeX ("\\dfrac{9}{7}"); math-verify finds LaTeX inside math delimiters.
    gold_parsed = parse(gold if "$" in gold else f"${gold}$", parsing_timeout=timeout_s)
    # Predictions are often plain text ("18 dollars", "12 cm") that the expression extractor reads best;
    # LaTeX without math delimiters is only found once it has them. Try the likelier reading first.
    pred = pred.replace("\u2212", "-")
    candidates = [pred, f"${pred}$"]
    if "\\" in pred and "$" not in pred:
        candidates.reverse()
    pred_parsed = []
    for candidate in candidates:
        pred_parsed = parse(candidate, parsing_timeout=timeout_s)
        if pred_parsed:
            break
    if not gold_parsed or not pred_parsed:
        return False
    return bool(mv_verify(gold_parsed, pred_parsed, timeout_seconds=timeout_s))


def _serve() -> None:
    """Helper process: read JSON requests [pred, gold, timeout] from stdin, write "1"/"0" lines to stdout."""
    import math_verify  # noqa: F401  (imported before "ready", so the first request is not slowed)

    # Anything a library prints must not corrupt the reply stream.
    replies, sys.stdout = sys.stdout, sys.stderr
    replies.write("ready\n")
    replies.flush()
    for line in sys.stdin:
        pred, gold, timeout_s = json.loads(line)
        try:
            verdict = _math_verify(pred, gold, timeout_s)
        except Exception:
            verdict = False
        replies.write("1\n" if verdict else "0\n")
        replies.flush()


class _Worker:
    """One helper process; a hung check is ended by killing the process, which works from any thread.

    A plain subprocess rather than multiprocessing: spawn re-runs the user's main script in the child.
    """

    def __init__(self) -> None:
        package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        code = f"import sys; sys.path.insert(0, {package_root!r}); from parallel_r1.answers import _serve; _serve()"
        self.process = subprocess.Popen(
            [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1
        )
        self.replies: queue.Queue[str] = queue.Queue()
        # A reader thread turns the blocking pipe into a queue that can be waited on with a timeout.
        threading.Thread(target=self._read, daemon=True).start()
        if self._reply(_WORKER_START_S) != "ready":
            self.close()
            raise RuntimeError("the math-verify helper process did not start")

    def _read(self) -> None:
        for line in self.process.stdout:
            self.replies.put(line.strip())
        self.replies.put("")  # the process is gone: fail the pending request now, not at its timeout

    def _reply(self, timeout_s: float) -> str | None:
        try:
            return self.replies.get(timeout=timeout_s)
        except queue.Empty:
            return None

    def ask(self, pred: str, gold: str, timeout_s: float) -> bool | None:
        """The verdict, or None when it took longer than `timeout_s` or the process died."""
        self.process.stdin.write(json.dumps([pred, gold, max(1, math.ceil(timeout_s))]) + "\n")
        self.process.stdin.flush()
        reply = self._reply(timeout_s)
        return reply == "1" if reply in ("0", "1") else None

    def close(self) -> None:
        self.process.kill()
        self.process.wait()


_idle_workers: list[_Worker] = []
_workers_lock = threading.Lock()


def _verify_in_worker(pred: str, gold: str, timeout_s: float) -> bool:
    with _workers_lock:
        worker = _idle_workers.pop() if _idle_workers else None
    worker = worker or _Worker()
    try:
        verdict = worker.ask(pred, gold, timeout_s)
    except OSError:
        verdict = None
    if verdict is None:
        logger.warning("answer check timed out (%.1f s) or failed; counted as wrong: %.80r", timeout_s, pred)
        worker.close()
        return False
    with _workers_lock:
        _idle_workers.append(worker)
    return verdict


def verify(pred: str, gold: str, timeout_s: float = 5.0) -> bool:
    """Whether the predicted answer `pred` equals the ground truth `gold`.

    Plain numbers ("1,000", "$18.00", "-3") are compared exactly first; everything else goes through
    math-verify (fractions, LaTeX, percentages, units, sets, ...). In the main thread math-verify's own
    timeouts bound each parse and comparison by `timeout_s` (rounded up to whole seconds); in any other
    thread the whole check runs in a helper process that is killed after `timeout_s`. A timeout or any
    error counts as wrong: this never raises.
    """
    if not pred or not gold or not pred.strip() or not gold.strip():
        return False
    try:
        pred_number, gold_number = _as_number(pred), _as_number(gold)
        if pred_number is not None and gold_number is not None:
            if pred_number == gold_number:
                return True
            if pred_number.denominator == 1 and gold_number.denominator == 1:
                return False
        # Decimals that differ exactly may still agree at math-verify's rounding precision.
        if threading.current_thread() is threading.main_thread() and hasattr(signal, "SIGALRM"):
            return _math_verify(pred, gold, max(1, math.ceil(timeout_s)))
        return _verify_in_worker(pred, gold, timeout_s)
    except Exception:
        logger.debug("answer check failed for %.80r vs %.80r", pred, gold, exc_info=True)
        return False


def is_correct(response: str, gold: str, timeout_s: float = 5.0) -> bool:
    """Whether the answer extracted from `response` verifies against `gold`."""
    answer = extract_answer(response)
    return answer is not None and verify(answer, gold, timeout_s)
