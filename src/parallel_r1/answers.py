"""Final-answer extraction and verification: the one path every reward and score goes through.

The contract:

- `extract_answer` finds the answer a response commits to: the text after the last ``Final Answer:``
  (to the end of that line), else the last top-level ``\\boxed{}`` / ``\\fbox{}``. Boxes written next to
  each other ("\\boxed{20} or \\boxed{19}") and a candidate written next to the box with a separator
  ("20, \\boxed{19}") are kept together as one list of candidates, so that a hedge stays visible.
- `verify` reads an answer as LaTeX (math-verify's LaTeX extraction, as its authors intend: sets,
  intervals, tuples, equations, percentages, units, ``\\$``, ``{,}`` and ``\\!`` thousands separators) and
  as plain text only where that is what it is: a number followed (or preceded) by words ("18 dollars",
  "12 apples"). Plain numbers on both sides ("1,000", "$18.00", "19.0") are compared exactly without
  math-verify.
- A ``Final Answer:`` line that is a sentence states the math in it: Minerva's few-shot line
  ("The final answer is $X$. I hope it is correct.", lm-evaluation-harness's MATH tasks) states "$X$";
  "The total is 12 apples." is plain text around a number. Inequalities state the interval they describe
  (math-verify's ``allow_set_relation_comp``), and digit groups may be spaced ("12 000").
- A prediction that states more candidates than the gold has is wrong: "20 or 19", "1, 495",
  "\\boxed{19} \\boxed{20}", "\\pm 19" against the gold "19". A gold that is itself a tuple, interval,
  set or list ("(-6, 10)", "0,4") counts its elements, so the same tuple still matches.
- Every step is linear in the input: brace matching is one stack pass over the braces, answers longer
  than `MAX_ANSWER_CHARS` are judged wrong without parsing, and math-verify's work is bounded by a
  timeout.

math-verify bounds its own work with ``signal.alarm``, which only works in the main thread. `verify`
uses that where it can and otherwise runs math-verify in a helper process that is killed when it
overruns, so a pathological expression costs at most about `timeout_s` in any thread and never raises.
"""

from __future__ import annotations

import functools
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

log = logging.getLogger(__name__)

# Bump whenever a verdict can change, so that scores from different checkers are not compared unknowingly.
CHECKER_VERSION = "3"
# An answer (prediction or gold) longer than this is judged wrong without being parsed: no real answer
# is this long (the longest MATH gold has 81 characters), and parsing cost grows faster than linearly.
MAX_ANSWER_CHARS = 1000

_FINAL_ANSWER = re.compile(r"final\s+answer\s*:", re.IGNORECASE)
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
# Tokens that matter for brace matching: an escaped brace or backslash (skipped), or a brace.
_BRACE_TOKEN = re.compile(r"\\[\\{}]|[{}]")
_WRAPPER = re.compile(r"\\(?:boxed|fbox|text|textbf|textrm|textit|mbox|mathrm|mathbf|operatorname)\s*\{")
_TAG = re.compile(r"</?[A-Za-z]+>")
_LINE_BREAK = re.compile(r"[\r\n]")
_NON_SPACE = re.compile(r"\S")
_NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)")
# "1,000", "12,345,678" and "12 000": a group of 1-3 digits (not starting with 0) and groups of exactly 3,
# all behind the same separator (a comma or a space, as SI and many languages write it).
_GROUP_SEP = ", \u00a0\u2009\u202f"
_THOUSANDS = re.compile(rf"(?<![\d.,])-?[1-9]\d{{0,2}}(?P<sep>[{_GROUP_SEP}])\d{{3}}(?:(?P=sep)\d{{3}})*(?![\d,])")
_UNGROUP = re.compile(f"[{_GROUP_SEP}]")
# LaTeX thousands separators between digits: "3{,}500", "15,\\!000", "1\\,000".
_LATEX_THOUSANDS = re.compile(r"(?<=\d)(?:\{,\}|\s*,\s*\\!\s*|\\,|\\!)(?=\d{3}(?!\d))")
# "\text {x}" -> "\text{x}"; "\frac \pi4" or "\dfrac12" -> "\frac{\pi}{4}" (math-verify misreads unbraced arguments).
_SPACE_BEFORE_BRACE = re.compile(r"(\\[A-Za-z]+)\s+(?=\{)")
_FRAC_ARG = r"(\{[^{}]*\}|\\[A-Za-z]+|[0-9A-Za-z])"
_UNBRACED_FRAC = re.compile(rf"\\([dt]?frac)(?![A-Za-z])\s*{_FRAC_ARG}\s*{_FRAC_ARG}")
# Whitespace between two numbers ("19 20"), except a thousands group ("1 000") or a mixed number ("3 1/2").
_SPACED_NUMBERS = re.compile(r"(?<=\d)\s+(?!\d{3}(?![\d.])|\d+\s*/)(?=\d)")
_DELIMITER = re.compile(r"\\[()\[\]]")
_BARE_PERCENT = re.compile(r"(?<!\\)%")
_UNICODE = (
    ("\u2212", "-"), ("\u00d7", "\\times "), ("\u00f7", "\\div "), ("\u03c0", "\\pi "), ("\u221e", "\\infty "),
    ("\u2264", "\\le "), ("\u2265", "\\ge "), ("\u221a", "\\sqrt "),
)  # fmt: skip
_WORKER_START_S = 120.0  # a fresh helper imports sympy; on a busy machine that can take many seconds

# What may stand between two boxes that state candidates together ("\boxed{1}, \boxed{2}", "... or ...").
_SEP = r"(?:,|;|\bor\b|\band\b|\\lor\b|\\q?quad\b|\\text\{\s*(?:or|and)\s*\})"
_FILLER = re.compile(rf"(?:\s|\$|\.|\\[()\[\]]|{_SEP})*", re.IGNORECASE)
# A candidate written next to the answer's box, with a separator: "20 or \boxed{19}", "\boxed{19}, 20".
_CANDIDATE_BEFORE = re.compile(
    rf"(?P<cand>[-+]?\d+(?:\.\d+)?|\\[a-z]+\{{[^{{}}$]*\}}(?:\{{[^{{}}$]*\}})?)[\s$]*(?:\\[)\]])?\s*(?:{_SEP}\s*)+"
    rf"[\s$]*(?:\\[(\[])?\s*$",
    re.IGNORECASE,
)
_CANDIDATE_AFTER = re.compile(
    rf"^[\s$]*(?:\\[)\]])?\s*(?:{_SEP}\s*)+[\s$]*(?:\\[(\[])?\s*"
    rf"(?P<cand>[-+]?\d+(?:\.\d+)?|\\(?:frac|dfrac|tfrac|sqrt)\{{[^{{}}$]*\}}(?:\{{[^{{}}$]*\}})?)"
    # ... and the candidate ends there: "\boxed{1/2} and 3 more steps" states one answer.
    r"(?=[\s$]*(?:$|[.,;:!?)]|\\[)\]]|\bor\b|\band\b))",
    re.IGNORECASE,
)
_NEIGHBOUR_CHARS = 100

# Minerva's few-shot answer line, as lm-evaluation-harness's MATH tasks prompt for it:
# "Final Answer: The final answer is $X$. I hope it is correct."
_MINERVA_TRAILER = re.compile(r"\.?\s*I\s+hope\s+it\s+is\s+correct\s*\.?\s*$", re.IGNORECASE)
# Math written inside a sentence: "$...$", "$$...$$", "\(...\)", "\[...\]" (an escaped "\$" is currency).
_MATH_SPAN = re.compile(r"\$\$.+?\$\$|(?<!\\)\$.+?(?<!\\)\$|\\\(.+?\\\)|\\\[.+?\\\]")
_PROSE_WORD = re.compile(r"[A-Za-z]{2,}")

# Candidate counting: brackets that group (LaTeX braces only group tokens, they do not make a tuple).
_COUNT_TOKEN = re.compile(
    r"\\left\b|\\right\b|\\[{}]|\\langle\b|\\rangle\b|[()\[\]]|[,;]|\\\\|\\q?quad\b|\\pm\b|\\mp\b|\\lor\b"
    r"|\b(?:or|and)\b",
    re.IGNORECASE,
)
_OPENERS = {"(": ")", "[": "]", "\\{": "\\}", "\\langle": "\\rangle"}
_CLOSERS = {")", "]", "\\}", "\\rangle"}

# Plain-text answers: a number with words around it ("18 dollars", "The answer is 12 cm").
_MATH_WORDS = {
    "pi", "sqrt", "root", "ln", "log", "exp", "sin", "cos", "tan", "cot", "sec", "csc", "arcsin",
    "arccos", "arctan", "sinh", "cosh", "tanh", "inf", "infinity", "infty", "e", "i", "times", "cdot",
    "div", "frac", "over", "squared", "cubed", "power", "mod", "not", "no", "or", "and", "either",
}  # fmt: skip
# A word ends at whitespace or at the end, so a run of words splits one way only (no backtracking blow-up).
_WORDS = r"(?:[A-Za-z][A-Za-z'./-]*(?:\^\{?\d\}?)?(?:\s+|$))"
_PLAIN_TEXT = re.compile(
    rf"(?P<before>{_WORDS}*?)(?:(?:is|=|:)\s*)?"
    rf"(?P<number>\\?\$?\s*[-+]?(?:\d[\d,]*(?: \d{{3}}(?!\d))*(?:\.\d*)?|\.\d+))"
    rf"\s*(?P<percent>%|\\%)?\s*(?P<after>{_WORDS}*)"
)


def checker_info(timeout_s: float | None = None) -> dict:
    """What produced a verdict: this checker's version, math-verify's installed version, the settings."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        math_verify_version = version("math-verify")
    except PackageNotFoundError:  # pragma: no cover - a dependency, always installed
        math_verify_version = None
    info = {
        "checker_version": CHECKER_VERSION,
        "math_verify": math_verify_version,
        "max_answer_chars": MAX_ANSWER_CHARS,
    }
    if timeout_s is not None:
        info["timeout_s"] = timeout_s
    return info


# ------------------------------------------------------------------------------------------------
# Extraction
# ------------------------------------------------------------------------------------------------


def _match_braces(text: str) -> dict[int, int]:
    """{position of "{": position of its "}"} for every balanced pair; one pass, escaped braces skipped."""
    closes: dict[int, int] = {}
    stack: list[int] = []
    for token in _BRACE_TOKEN.finditer(text):
        brace = token.group()
        if brace == "{":
            stack.append(token.start())
        elif brace == "}" and stack:
            closes[stack.pop()] = token.start()
    return closes


def _top_level_boxes(text: str) -> list[tuple[int, int, int]]:
    """(start of ``\\boxed``, start of contents, end of contents) of each closed box not inside another."""
    closes = _match_braces(text)
    boxes: list[tuple[int, int, int]] = []
    for match in _BOXED.finditer(text):
        close = closes.get(match.end() - 1)
        if close is None or (boxes and match.start() < boxes[-1][2]):
            continue
        boxes.append((match.start(), match.end(), close))
    return boxes


def _strip_box(content: str) -> str:
    """Contents without redundant boxing ("\\boxed{\\boxed{3}}" states 3); one brace pass however deep."""
    closes = _match_braces(content)
    start, end = 0, len(content)
    while True:
        while start < end and content[start].isspace():
            start += 1
        while end > start and content[end - 1].isspace():
            end -= 1
        box = _BOXED.match(content, start, end)
        if box is None or closes.get(box.end() - 1) != end - 1:
            return content[start:end]
        start, end = box.end(), end - 1


def _boxed_answer(text: str, boxes: list[tuple[int, int, int]], lo: int, hi: int) -> str:
    """The answer stated by the last box in `text`, with the boxes and candidates stated together with it.

    `lo` .. `hi` bound where neighbouring candidates are looked for (the line of a ``Final Answer:``).
    """
    group = [boxes[-1]]
    for box in reversed(boxes[:-1]):
        gap = text[box[2] + 1 : group[0][0]]
        if len(gap) > _NEIGHBOUR_CHARS or not _FILLER.fullmatch(gap):
            break
        group.insert(0, box)
    candidates = [_strip_box(text[start:end]) for _, start, end in group]
    before = _CANDIDATE_BEFORE.search(text[max(lo, group[0][0] - _NEIGHBOUR_CHARS) : group[0][0]])
    if before:
        candidates.insert(0, before.group("cand"))
    after = _CANDIDATE_AFTER.search(text[group[-1][2] + 1 : min(hi, group[-1][2] + 1 + _NEIGHBOUR_CHARS)])
    if after:
        candidates.append(after.group("cand"))
    return ", ".join(c for c in candidates if c)


def _clean(line: str) -> str:
    """The answer a ``Final Answer:`` line states."""
    tag = _TAG.search(line)
    if tag:
        line = line[: tag.start()]
    # Markdown emphasis ("**Final Answer:** 42") and a sentence-ending period are not part of the answer.
    line = line.strip().strip("*").strip()
    # A longer line is judged wrong unless it boxes its answer; the bound keeps the sentence regexes linear.
    sentence = len(line) <= MAX_ANSWER_CHARS
    if sentence:
        line = _MINERVA_TRAILER.sub("", line)
    if line.endswith(".") and not line.endswith(".."):
        line = line[:-1].rstrip()
    boxes = _top_level_boxes(line)
    if boxes:
        return _boxed_answer(line, boxes, 0, len(line))
    return _math_of_sentence(line) if sentence else line


def _math_of_sentence(line: str) -> str:
    """The math a sentence states ("The final answer is $12$" states "$12$"): from its first math span to its
    last, so that candidates stated together ("$20$ or $19$") stay visible. A line that is not a sentence
    around math ("x = $5$", "$50$\\%") is kept whole."""
    spans = list(_MATH_SPAN.finditer(line))
    if not spans:
        return line
    start, end = spans[0].start(), spans[-1].end()
    if not _PROSE_WORD.search(line[:start] + " " + line[end:]):
        return line
    return line[start:end]


def extract_answer(text: str) -> str | None:
    """The answer a response ends on, or None.

    The text after the last ``Final Answer:`` (case-insensitive) up to the end of that line, trimmed, a
    trailing period removed (when the line is empty, the next non-empty line); a box in that line stands
    for its contents. Failing that, the contents of the last ``\\boxed{...}`` or ``\\fbox{...}``. The whole
    response is searched and the last occurrence wins, because the main thread's conclusion comes after
    any path's. Candidates stated together ("\\boxed{20} or \\boxed{19}") come back as one list
    ("20, 19"), which `verify` judges wrong for a single-valued gold. Linear in ``len(text)``.
    """
    last = None
    for last in _FINAL_ANSWER.finditer(text):  # noqa: B007  (the last match is the one kept)
        pass
    if last is not None:
        pos = last.end()
        while True:
            start = _NON_SPACE.search(text, pos)
            if start is None:
                break
            end_match = _LINE_BREAK.search(text, start.start())
            end = end_match.start() if end_match else len(text)
            answer = _clean(text[start.start() : end].lstrip(" \t*"))
            if answer:
                return answer
            pos = end
    boxes = [b for b in _top_level_boxes(text) if text[b[1] : b[2]].strip()]
    if not boxes:
        return None
    return _boxed_answer(text, boxes, 0, len(text)) or None


# ------------------------------------------------------------------------------------------------
# Verification
# ------------------------------------------------------------------------------------------------


def _unwrap(text: str, wrapper: re.Pattern[str] = _WRAPPER) -> str:
    """`text` with each ``\\boxed{x}``, ``\\text{x}``, ... (as `wrapper` matches) replaced by ``x``; linear."""
    closes = _match_braces(text)
    cuts: list[tuple[int, int, str]] = []
    for match in wrapper.finditer(text):
        close = closes.get(match.end() - 1)
        if close is None:
            continue
        # \text{ or } must not glue its words to the math around it.
        space = " " if match.group().startswith(("\\text", "\\mbox")) else ""
        cuts += [(match.start(), match.end(), space), (close, close + 1, space)]
    if not cuts:
        return text
    cuts.sort()
    pieces, pos = [], 0
    for start, end, replacement in cuts:
        pieces += [text[pos:start], replacement]
        pos = end
    pieces.append(text[pos:])
    return "".join(pieces)


def _plain_digits(text: str) -> str:
    """Everything unwrapped, LaTeX thousands separators ("{,}", ",\\!", "\\,") and currency signs removed."""
    text = _LATEX_THOUSANDS.sub("", _unwrap(text).replace("\u2212", "-"))
    text = text.replace("{,}", ",").replace("\\!", "")
    return text.replace("\\$", "").replace("$", "").strip()


def _as_number(answer: str) -> Fraction | None:
    """`answer` as an exact number when it is a plain (possibly currency, comma-grouped) decimal."""
    text = _plain_digits(answer)
    if text.endswith(".") and not text.endswith(".."):
        text = text[:-1].rstrip()
    if _THOUSANDS.fullmatch(text):
        text = _UNGROUP.sub("", text)
    return Fraction(text) if _NUMBER.fullmatch(text) else None


def _plain_text_number(answer: str) -> str | None:
    """The number of an answer that is plain text around one number ("18 dollars", "The answer is 12 cm")."""
    text = _plain_digits(answer)
    match = _PLAIN_TEXT.fullmatch(text)
    if match is None:
        return None
    words = re.findall(r"[A-Za-z]+", match.group("before") + " " + match.group("after"))
    if not words or any(len(w) < 2 or w.lower() in _MATH_WORDS for w in words):
        return None
    number = match.group("number").replace("\\", "").replace("$", "").strip()
    if _THOUSANDS.fullmatch(number):
        number = _UNGROUP.sub("", number)
    elif _UNGROUP.search(number):
        return None
    percent = match.group("percent") or any(w.lower() in ("percent", "pct", "percentage") for w in words)
    return number + "\\%" if percent else number


def _strip_emphasis(answer: str) -> str:
    """Without Markdown emphasis around the whole answer ("**19**")."""
    answer = answer.strip()
    if len(answer) > 2 and answer[0] == answer[-1] and answer[0] in "*_":
        answer = answer.strip(answer[0]).strip()
    return answer


def _count_candidates(answer: str) -> int:
    """How many values `answer` states: list items, alternatives ("or", "and", "\\pm"), or the elements of a
    single tuple / interval / set ("(-6, 10)" has 2). Linear in ``len(answer)``."""
    text = _plain_digits(answer)
    thousands = {m.start() + i for m in _THOUSANDS.finditer(text) for i, c in enumerate(m.group()) if c == ","}
    depth, top, inner, extra = 0, 1, 1, 0
    first_group_end = None  # where the first top-level bracket group closes
    first_token_start = None
    for token in _COUNT_TOKEN.finditer(text):
        t = token.group().lower()
        if t in ("\\left", "\\right"):
            continue
        if first_token_start is None:
            first_token_start = token.start()
        if t in _OPENERS:
            depth += 1
        elif t in _CLOSERS:
            depth = max(0, depth - 1)
            if depth == 0 and first_group_end is None:
                first_group_end = token.end()
        elif t in (",", ";", "\\\\", "\\quad", "\\qquad"):
            if depth == 0 and token.start() not in thousands:
                top += 1
            elif depth == 1:
                inner += 1
        else:  # or, and, \pm, \mp, \lor: an alternative wherever it stands
            extra += 1
    # Numbers separated by spaces alone ("19 20") are two values; math-verify would add them.
    extra += len(_SPACED_NUMBERS.findall(text))
    single_group = (
        first_token_start is not None
        and text[:first_token_start].strip() in ("", "\\left")
        and text[first_token_start:].lstrip().startswith(tuple(_OPENERS))
        and first_group_end is not None
        and text[first_group_end:].strip() in ("", "\\right")
    )
    return (inner if single_group else top) + extra


def _brace_frac(match: re.Match[str]) -> str:
    numerator, denominator = (arg if arg.startswith("{") else "{" + arg + "}" for arg in match.group(2, 3))
    return f"\\{match.group(1)}{numerator}{denominator}"


def _prepare(answer: str) -> str:
    """`answer` as one LaTeX math expression for math-verify: no math delimiters, boxes or currency signs."""
    text = _unwrap(answer, _BOXED)
    for old, new in _UNICODE:
        text = text.replace(old, new)
    text = text.replace("\\$", "").replace("$", "")
    text = _DELIMITER.sub(" ", text)
    text = _LATEX_THOUSANDS.sub("", text)
    text = _SPACE_BEFORE_BRACE.sub(r"\1", text)
    text = _UNBRACED_FRAC.sub(_brace_frac, text)
    text = _BARE_PERCENT.sub(r"\\%", text)
    text = " ".join(text.split())
    if text.endswith(".") and not text.endswith(".."):
        text = text[:-1].rstrip()
    while text.endswith("\\\\"):
        text = text[:-2].rstrip()
    return text


@functools.lru_cache(maxsize=4096)
def _parse(latex: str, timeout_s: int) -> tuple:
    from math_verify import LatexExtractionConfig, parse

    return tuple(parse(f"${latex}$", [LatexExtractionConfig()], parsing_timeout=timeout_s))


def _math_verify(pred: str, gold: str, timeout_s: int) -> bool:
    """math-verify's own check of two prepared answers (see `_prepare`), both read as LaTeX;
    `timeout_s` (whole seconds) bounds each parse and each comparison."""
    from math_verify import verify as mv_verify

    gold_parsed, pred_parsed = _parse(gold, timeout_s), _parse(pred, timeout_s)
    if not gold_parsed or not pred_parsed:
        return False
    # allow_set_relation_comp: an inequality states the interval it describes ("2<x<5" is "(2,5)").
    return bool(
        mv_verify(list(gold_parsed), list(pred_parsed), allow_set_relation_comp=True, timeout_seconds=timeout_s)
    )


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
        except Exception:  # noqa: BLE001  (any failure is a wrong answer, never a crash of the helper)
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
        log.warning("answer check timed out (%.1f s) or failed; counted as wrong: %.80r", timeout_s, pred)
        worker.close()
        return False
    with _workers_lock:
        _idle_workers.append(worker)
    return verdict


def verify(pred: str, gold: str, timeout_s: float = 5.0) -> bool:
    """Whether the predicted answer `pred` equals the ground truth `gold`.

    In order: an empty answer, or one longer than `MAX_ANSWER_CHARS`, is wrong; a prediction stating more
    candidates than the gold (`_count_candidates`: "20 or 19" against "19") is wrong; plain numbers
    ("1,000", "$18.00", "-3", also "18 dollars") are compared exactly; everything else goes through
    math-verify with both sides read as LaTeX (fractions, roots, percentages, units, sets, intervals,
    tuples, equations, ...). In the main thread math-verify's own timeouts bound each parse and comparison
    by `timeout_s` (rounded up to whole seconds); in any other thread the check runs in a helper process
    that is killed after `timeout_s`. A timeout or any error counts as wrong: this never raises.
    """
    # A number read from a data file (AMC stores 27.0) is its text.
    pred, gold = (str(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else x for x in (pred, gold))
    if not isinstance(pred, str) or not isinstance(gold, str) or not pred.strip() or not gold.strip():
        return False
    if len(pred) > MAX_ANSWER_CHARS or len(gold) > MAX_ANSWER_CHARS:
        return False
    try:
        pred, gold = _strip_emphasis(pred), _strip_emphasis(gold)
        if _count_candidates(pred) > _count_candidates(gold):
            return False
        pred_number, gold_number = _as_number(pred), _as_number(gold)
        if pred_number is None and (plain := _plain_text_number(pred)) is not None:
            pred, pred_number = plain, _as_number(plain)
        if gold_number is None and (plain := _plain_text_number(gold)) is not None:
            gold, gold_number = plain, _as_number(plain)
        if pred_number is not None and gold_number is not None:
            if pred_number == gold_number:
                return True
            if pred_number.denominator == 1 and gold_number.denominator == 1:
                return False
        # Decimals that differ exactly may still agree at math-verify's rounding precision.
        pred, gold = _prepare(pred), _prepare(gold)
        if not pred or not gold:
            return False
        if threading.current_thread() is threading.main_thread() and hasattr(signal, "SIGALRM"):
            return _math_verify(pred, gold, max(1, math.ceil(timeout_s)))
        return _verify_in_worker(pred, gold, timeout_s)
    except Exception:
        log.debug("answer check failed for %.80r vs %.80r", pred, gold, exc_info=True)
        return False


def is_correct(response: str, gold: str, timeout_s: float = 5.0) -> bool:
    """Whether the answer extracted from `response` verifies against `gold`."""
    answer = extract_answer(response)
    return answer is not None and verify(answer, gold, timeout_s)
