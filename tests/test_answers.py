import json
import threading

import pytest

from parallel_r1 import answers
from parallel_r1.answers import extract_answer, is_correct, verify

PATHOLOGICAL = "$9^{9^{9^{9}}}$"  # unbounded, math-verify grinds on this far past any timeout used here


@pytest.mark.parametrize(
    "text, expected",
    [
        ("so 3 + 4 = 7.\nFinal Answer: 7", "7"),
        ("Final Answer: 1600.", "1600"),
        ("FINAL ANSWER:   $90,000  \nThanks", "$90,000"),
        ("final answer: 3.5", "3.5"),
        ("**Final Answer:** 42", "42"),
        ("Final Answer: \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("Final Answer:\n\n  12 apples\n", "12 apples"),
        ("<Path>Final Answer: 5</Path><Summary>...</Summary>Final Answer: 6", "6"),
        ("The result is \\boxed{\\frac{a}{b^{2}}} indeed.", "\\frac{a}{b^{2}}"),
        ("first \\boxed{3}, corrected: \\boxed{4}", "4"),
        ("\\fbox{-2}", "-2"),
        ("Final Answer: 8\n...and \\boxed{9}", "8"),
        ("no conclusion here", None),
        ("an unclosed \\boxed{12", None),
        ("Final Answer:", None),
        ("Final Answer: 6p^4 + 5p^2 - 4", "6p^4 + 5p^2 - 4"),
        ("Final Answer: $\\boxed{19}$.", "19"),
        ("**Final Answer:** \\boxed{19} dollars", "19"),
        ("Final Answer: the answer is \\boxed{(-6, 10)}", "(-6, 10)"),
        ("\\boxed{\\boxed{3}}", "3"),
        ("\\boxed{19}, as required.", "19"),
        ("Since x = 3 or x = 4 fail, the answer is \\boxed{5}", "5"),
        ("Final Answer: 7</Summary>", "7"),
        # candidates stated together stay together, so that verify sees the hedge
        ("\\boxed{20} or \\boxed{19}", "20, 19"),
        ("Final Answer: \\boxed{20} \\boxed{19}", "20, 19"),
        ("so it is 20, \\boxed{19}", "20, 19"),
        ("$20$ or $\\boxed{19}$", "20, 19"),
        ("\\boxed{19}, or 20", "19, 20"),
        ("\\boxed{0} and \\boxed{4}", "0, 4"),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize(
    "pred, gold",
    [
        ("72", "72"),
        ("36.00", "36"),
        ("1,000", "1000"),
        ("1000", "1,000"),
        ("$90,000", "90000"),
        ("\\$18", "18"),
        ("$18.50", "18.5"),
        ("-3", "-3"),
        ("\u22123", "-3"),
        ("0.5", "\\frac{1}{2}"),
        ("\\frac{1}{2}", "0.5"),
        ("1/2", "\\dfrac{1}{2}"),
        ("\\dfrac{9}{7}", "\\frac{9}{7}"),
        ("0.3333333", "\\frac{1}{3}"),
        ("\\boxed{7}", "7"),
        ("50%", "50"),
        ("10\\%", "0.1"),
        ("18 dollars", "18"),
        ("12 cm", "12"),
        ("12 \\text{ apples}", "12"),
        ("x = 5", "5"),
        ("2\\sqrt{2}", "\\sqrt{8}"),
        ("\\frac{\\sqrt{3}}{2}", "\\frac{\\sqrt3}2"),
        ("(1,2)", "(1, 2)"),
        ("i", "i"),
    ],
)
def test_verify_accepts_equal_answers(pred, gold):
    assert verify(pred, gold)


@pytest.mark.parametrize(
    "pred, gold",
    [
        ("8", "9"),
        ("-5", "5"),
        ("1,2", "12"),
        ("3.14", "\\pi"),
        ("0.5", "\\frac{1}{3}"),
        ("\\frac{1}{2}", "2"),
        ("18", "18.5"),
        ("", "5"),
        ("5", ""),
        ("   ", "5"),
        ("\\frac{", "5"),
        ("}}{{", "5"),
        ("banana", "5"),
    ],
)
def test_verify_rejects_wrong_or_broken_answers(pred, gold):
    assert not verify(pred, gold)


def test_plain_numbers_never_reach_math_verify(monkeypatch):
    def fail(*args):
        raise AssertionError("math-verify called for a plain number")

    monkeypatch.setattr(answers, "_math_verify", fail)
    monkeypatch.setattr(answers, "_verify_in_worker", fail)
    assert verify("1,000", "1000")
    assert verify("$18.00", "18")
    assert not verify("17", "18")


def test_errors_count_as_wrong(monkeypatch):
    def boom(*args):
        raise RuntimeError("parser crashed")

    monkeypatch.setattr(answers, "_math_verify", boom)
    assert verify("\\frac{1}{2}", "0.5") is False


def test_pathological_input_is_wrong_in_main_thread():
    assert verify(PATHOLOGICAL, "5", timeout_s=1) is False


def test_verify_in_another_thread_uses_a_killable_helper():
    results = {}

    def run():
        results["equal"] = verify("\\frac{1}{2}", "0.5", timeout_s=30)
        results["pathological"] = verify(PATHOLOGICAL, "5", timeout_s=1)
        # The helper that hung was killed; a fresh one must still answer.
        results["after"] = verify("\\dfrac{9}{7}", "\\frac{9}{7}", timeout_s=30)
        results["wrong"] = verify("\\frac{1}{3}", "0.5", timeout_s=30)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert results == {"equal": True, "pathological": False, "after": True, "wrong": False}


def test_is_correct():
    assert is_correct("3 + 4 = 7\nFinal Answer: 7", "7")
    assert not is_correct("3 + 4 = 8\nFinal Answer: 8", "7")
    assert not is_correct("I am not sure.", "7")
    assert is_correct("so the answer is \\boxed{\\frac{3}{4}}", "0.75")


def test_teacher_outputs_extract_their_answer(shared_data):
    rows = [json.loads(line) for line in (shared_data / "parallel_gsm8k_sample.jsonl").open()]
    assert len(rows) == 341
    extracted = [extract_answer(r["response"]) for r in rows]
    assert all(a is not None for a in extracted)
    wrong = [(a, r["answer"]) for a, r in zip(extracted, rows) if not verify(a, r["answer"])]
    assert wrong == []


# ------------------------------------------------------------------------------------------------
# Hedges: a prediction stating more candidates than the gold is wrong
# ------------------------------------------------------------------------------------------------

HEDGES = [
    "20 or 19",
    "19 or 20",
    "either 19 or 20",
    "either 20 or 19",
    "19 (or 20)",
    "19 \\text{ or } 20",
    "19 \\text{ or possibly } 20",
    "x = 20 \\text{ or } x = 19",
    "19 and 20",
    "19, 20",
    "20, 19",
    "1, 19",
    "19; 20",
    "19 \\lor 20",
    "19 \\quad 20",
    "19 \\\\ 20",
    "18 19 20",
    "\\{19, 20\\}",
    "[19, 20]",
    "(19, 20)",
    "\\pm 19",
    "-19, 19",
    "$20$ or $19$",
    "\\boxed{20} \\boxed{19}",
    "19, 19, 20",
    "1, 2, 3, 19",
    "x = 19, y = 20",
    "19 dollars or 20 dollars",
]


@pytest.mark.parametrize("pred", HEDGES)
def test_hedged_answers_are_wrong(pred):
    assert not verify(pred, "19")


HEDGED_RESPONSES = [
    "Final Answer: 20 or 19",
    "Final Answer: 19 or 20",
    "Final Answer: either 19 or 20",
    "Final Answer: 1, 19",
    "Final Answer: $20$ or $19$",
    "Final Answer: \\boxed{20} \\boxed{19}",
    "Final Answer: \\boxed{19}, \\boxed{20}",
    "Final Answer: 20 or \\boxed{19}",
    "The answer is \\boxed{20} or \\boxed{19}.",
    "The answer is \\boxed{19} or \\boxed{20}.",
    "So we get $\\boxed{20}$, $\\boxed{19}$",
    "It is 20, \\boxed{19}",
    "It is \\boxed{19}, or 20",
    "\\boxed{\\{19, 20\\}}",
    "\\boxed{19 \\text{ or } 20}",
]


@pytest.mark.parametrize("response", HEDGED_RESPONSES)
def test_hedged_responses_are_wrong(response):
    assert not is_correct(response, "19")


def test_issue_examples():
    assert not is_correct("Final Answer: 20 or 19", "19")
    assert not verify("3x^2 + 495", "495")
    assert not verify("1, 495", "495")
    assert verify("(-6, 10)", "(-6, 10)")
    assert verify("0,4", "0,4")
    assert verify("2^{2005}", "2^{2005}")
    assert verify("15000", "\\$15,\\!000")
    assert verify("\\$15,\\!000", "\\$15,\\!000")
    assert verify("3{,}500", "3500")
    assert verify("3500", "3{,}500")


@pytest.mark.parametrize(
    "pred, gold",
    [
        ("(-6, 10)", "(-6, 10)"),
        ("-6, 10", "(-6, 10)"),
        ("0, 4", "0,4"),
        ("4, 0", "0,4"),
        ("\\{0, 4\\}", "0,4"),
        ("1, 2, 3", "1, 2, 3"),
        ("3, 1, 2", "1, 2, 3"),
        ("[1, 4]", "[1, 4]"),
        ("[-36, 104]", "[-36,104]"),
        ("(-\\infty, 2) \\cup (3, \\infty)", "(-\\infty, 2) \\cup (3, \\infty)"),
        ("\\pm 4", "-4, 4"),
        ("12, 13", "12\\text{ and }13"),
        ("x = 2 \\text{ and } y = 3", "(2, 3)"),
        ("y = 2x + 3", "y = 2x + 3"),
        ("y=2x+3", "y = 2x + 3"),
        ("x^2 + y^2 = 13", "x^2 + y^2 = 13"),
        ("6p^4+5p^2-4", "6p^4 + 5p^2 - 4"),
        ("2^{2005}", "2^{2005}"),
        ("-\\$0.50", "-\\$0.50"),
        ("111,111,111", "111, \\! 111, \\! 111"),
        ("\\frac{\\pi}{4} + 2 - \\sqrt{2}", "\\frac \\pi4 + 2 - \\sqrt2"),
        ("8\\sqrt{3}", "8\\sqrt{3} \\text { square inches}"),
        ("\\text{Devon}", "\\text{Devon}"),
        ("1 - 12i", "1 - 12i"),
    ],
)
def test_lists_tuples_sets_and_equations_match_themselves(pred, gold):
    assert verify(pred, gold)


@pytest.mark.parametrize(
    "pred, gold",
    [
        ("(10, -6)", "(-6, 10)"),
        ("(-6, 10, 1)", "(-6, 10)"),
        ("0", "0,4"),
        ("0, 4, 5", "0,4"),
        ("[1, 4)", "[1, 4]"),
        ("y = 2x + 4", "y = 2x + 3"),
        ("1 + 12i", "1 - 12i"),
    ],
)
def test_different_lists_and_tuples_are_wrong(pred, gold):
    assert not verify(pred, gold)


# ------------------------------------------------------------------------------------------------
# Equivalent rewrites of integers, fractions
# ------------------------------------------------------------------------------------------------


def integer_rewrites(n: int) -> list[str]:
    """Ways a model writes the integer n that must all count as n."""
    plain = str(n)
    grouped = f"{n:,}"
    latex_grouped = grouped.replace(",", "{,}")
    return [
        plain,
        grouped,
        latex_grouped,
        f"{n}.0",
        f"{n}.00",
        f"\\boxed{{{n}}}",
        f"${n}$",
        f"$\\boxed{{{n}}}$",
        f"\\({n}\\)",
        f"{n} dollars",
        f"\\${grouped}",
        f"{grouped} apples",
        f"{n} \\text{{ cm}}",
        f"The answer is {n}",
        f"x = {n}",
        f"\\frac{{{2 * n}}}{{2}}",
        f"\\dfrac{{{3 * n}}}{{3}}",
        f"{n}.",
        f"**{n}**",
    ]


def test_integer_rewrites_are_accepted():
    for n in (0, 7, 19, 100, 1000, 4095, 12345, 1234567, -3, -1500):
        rejected = [r for r in integer_rewrites(n) if not verify(r, str(n))]
        assert rejected == [], n


def test_integer_rewrites_of_other_numbers_are_rejected():
    for n in (19, 1000):
        accepted = [r for r in integer_rewrites(n + 1) if verify(r, str(n))]
        assert accepted == [], n


@pytest.mark.parametrize(
    "pred, gold",
    [
        ("\\frac{4}{5}", "0.8"),
        ("0.8", "\\frac{4}{5}"),
        ("\\dfrac{4}{5}", "\\frac45"),
        ("4/5", "\\tfrac{4}{5}"),
        ("80\\%", "0.8"),
        ("\\frac{9}{7}", "\\dfrac{9}{7}"),
        ("30^\\circ", "30"),
        ("\\sqrt{8}", "2\\sqrt{2}"),
    ],
)
def test_fraction_and_decimal_rewrites_are_accepted(pred, gold):
    assert verify(pred, gold)


# ------------------------------------------------------------------------------------------------
# Gold answers of the shared benchmark files verify against themselves
# ------------------------------------------------------------------------------------------------

BENCHMARK_FILES = [
    "math_test.jsonl",
    "math300.jsonl",
    "aime24.jsonl",
    "aime25.jsonl",
    "amc23.jsonl",
    "gsm8k_test.jsonl",
    "gsm8k_train.jsonl",
    "dapo_math_17k.jsonl",
    "parallel_gsm8k_sample.jsonl",
]


@pytest.mark.parametrize("name", BENCHMARK_FILES)
def test_every_gold_verifies_against_itself(shared_data, name):
    path = shared_data / name
    if not path.is_file():
        pytest.skip(f"{name} is not in {shared_data}")
    golds = sorted({str(json.loads(line)["answer"]) for line in path.open(encoding="utf-8")})
    failed = [g for g in golds if not verify(g, g)]
    assert failed == []
    # Written as a response would state it, in a box or on a Final Answer line.
    failed = [g for g in golds if "\n" not in g and not is_correct(f"So.\nFinal Answer: \\boxed{{{g}}}", g)]
    assert failed == []


def test_integer_golds_of_the_shared_files_accept_their_rewrites(shared_data):
    golds = set()
    for name in ("aime24.jsonl", "aime25.jsonl", "amc23.jsonl", "gsm8k_test.jsonl"):
        path = shared_data / name
        if path.is_file():
            golds |= {str(json.loads(line)["answer"]) for line in path.open(encoding="utf-8")}
    integers = sorted(int(g) for g in golds if g.lstrip("-").isdigit())
    if not integers:
        pytest.skip("no integer golds in the shared files")
    rejected = [(r, n) for n in integers for r in integer_rewrites(n) if not verify(r, str(n))]
    assert rejected == []


# ------------------------------------------------------------------------------------------------
# Degenerate inputs: linear work, a clear verdict
# ------------------------------------------------------------------------------------------------


class _CountingPattern:
    """Stands in for a compiled pattern and counts the tokens its finditer yields."""

    def __init__(self, pattern):
        self.pattern, self.calls, self.tokens = pattern, 0, 0

    def finditer(self, text, *args):
        self.calls += 1
        for match in self.pattern.finditer(text, *args):
            self.tokens += 1
            yield match


DEGENERATE = [
    "\\boxed{" * 23000,  # 160 KB of unclosed boxes: the old scan was quadratic (about 100 s)
    "Final Answer: " + "\\boxed{" * 23000,
    "\\boxed{" * 23000 + "1" + "}" * 23000,  # deeply nested boxes
    "Final Answer: " + "\\boxed{" * 23000 + "1" + "}" * 23000,
    "\\boxed{1}" * 16000,
    "{" * 80000 + "}" * 80000,
    "Final Answer: a" + " " * 160000 + "b",  # a whitespace run before a sentence trailer would be quadratic
    "Final Answer: x " + "\\(" * 80000,  # so would unclosed math spans
    "Final Answer: x " + "$$ $" * 40000,
]


@pytest.mark.parametrize("text", DEGENERATE, ids=range(len(DEGENERATE)))
def test_brace_matching_is_one_pass(monkeypatch, text):
    counter = _CountingPattern(answers._BRACE_TOKEN)
    monkeypatch.setattr(answers, "_BRACE_TOKEN", counter)
    extract_answer(text)
    # every brace is visited a bounded number of times, whatever the nesting
    assert counter.tokens <= 3 * text.count("{") + 3 * text.count("}") + 10
    assert counter.calls <= 2 + text.count("\\boxed{1}")


@pytest.mark.parametrize("text", DEGENERATE, ids=range(len(DEGENERATE)))
def test_degenerate_responses_get_a_verdict_without_math_verify(monkeypatch, text):
    def fail(*args):
        raise AssertionError("math-verify reached for an over-long answer")

    monkeypatch.setattr(answers, "_math_verify", fail)
    monkeypatch.setattr(answers, "_verify_in_worker", fail)
    answer = extract_answer(text)
    assert answer is None or len(answer) > answers.MAX_ANSWER_CHARS or answer == "1"
    assert is_correct(text, "2") is False


def test_answers_over_the_size_cap_are_wrong_without_parsing(monkeypatch):
    def fail(*args):
        raise AssertionError("math-verify reached for an over-long answer")

    monkeypatch.setattr(answers, "_math_verify", fail)
    monkeypatch.setattr(answers, "_verify_in_worker", fail)
    long = "1" + " " * answers.MAX_ANSWER_CHARS
    assert verify(long, "1") is False
    assert verify("1", long) is False
    assert verify("x" * (answers.MAX_ANSWER_CHARS + 1), "x") is False


def test_checker_info_names_the_version_and_settings():
    from importlib.metadata import version

    info = answers.checker_info(timeout_s=5.0)
    assert info["checker_version"] == answers.CHECKER_VERSION
    assert info["math_verify"] == version("math-verify")
    assert info["timeout_s"] == 5.0
    assert info["max_answer_chars"] == answers.MAX_ANSWER_CHARS
    json.dumps(info)


def test_eval_results_name_the_checker(tmp_path):
    from parallel_r1.evaluate import EvalConfig, write_results

    out = tmp_path / "results.json"
    write_results(out, [], [], EvalConfig(verify_timeout_s=3.0))
    checker = json.loads(out.read_text())["checker"]
    assert checker == answers.checker_info(timeout_s=3.0)
    assert checker["checker_version"] == answers.CHECKER_VERSION and checker["timeout_s"] == 3.0


# ------------------------------------------------------------------------------------------------
# Answers stated the way real evaluations state them (issue 21): math-verify accepts each of these
# ------------------------------------------------------------------------------------------------

MINERVA = "Final Answer: The final answer is {}. I hope it is correct."

EVALUATION_SHAPES = [
    # Minerva's few-shot format (lm-evaluation-harness's MATH tasks) and other sentence lines
    (MINERVA.format("$12$"), "12"),
    (MINERVA.format("12"), "12"),
    (MINERVA.format("$(1,4)$"), "(1,4)"),
    (MINERVA.format("$[2,5)$"), "[2,5)"),
    (MINERVA.format("$x=3$"), "3"),
    (MINERVA.format("$2$ and $5$"), "2, 5"),
    (MINERVA.format("$\\text{(C)}$"), "\\text{(C)}"),
    (MINERVA.format("$12,000$"), "12000"),
    ("Final Answer: The total is 12 apples.", "12"),
    ("Final Answer: Thus, the answer is $5$.", "5"),
    ("Final Answer: So we get $\\frac{3}{4}$ of the cake.", "\\frac34"),
    # inequalities against the interval they describe
    ("Final Answer: $2<x<5$", "(2,5)"),
    ("\\boxed{2 < x < 5}", "(2,5)"),
    ("\\boxed{-1 \\le x \\le 3}", "[-1,3]"),
    ("\\boxed{x \\geq 3}", "[3,\\infty)"),
    ("\\boxed{x > 3}", "(3,\\infty)"),
    # spaced thousands
    ("Final Answer: 12 000", "12000"),
    ("Final Answer: 1 234 567", "1234567"),
    ("Final Answer: The total is 12 000 apples.", "12,000"),
]


@pytest.mark.parametrize("response, gold", EVALUATION_SHAPES)
def test_answers_stated_as_evaluations_state_them_are_right(response, gold):
    assert is_correct(response, gold)


@pytest.mark.parametrize(
    "response, gold",
    [
        (MINERVA.format("$20$ or $19$"), "19"),
        (MINERVA.format("$19$, $20$"), "19"),
        (MINERVA.format("$19$ or $20$"), "19"),
        ("Final Answer: Thus, the answer is $19$ or $20$.", "19"),
        ("Final Answer: $2<x<6$", "(2,5)"),
        ("\\boxed{x > 3}", "[3,\\infty)"),
        ("Final Answer: 12 001", "12000"),
        ("Final Answer: 19 20", "19"),
    ],
)
def test_hedges_and_near_misses_in_evaluation_shapes_are_wrong(response, gold):
    assert not is_correct(response, gold)


@pytest.mark.parametrize(
    "response, gold",
    [
        # named tuples and assignments against the bare value, assignments in another order
        ("Final Answer: $(x,y)=(1,4)$", "(1,4)"),
        ("\\boxed{(a, b) = (2, 5)}", "(2,5)"),
        ("Final Answer: $b=5, a=2$", "a=2, b=5"),
        # a set of solutions with "and"/"or", as separate boxes, in another order, against a gold list
        ("Final Answer: $x=3$ or $x=1$", "1, 3"),
        ("Final Answer: $3$ and $1$", "1,3"),
        ("\\boxed{3} and \\boxed{1}", "1, 3"),
        ("\\boxed{3}, \\boxed{1}", "1,3"),
        ("\\boxed{x=3 \\text{ or } x=1}", "1,3"),
        ("\\boxed{2}, \\boxed{3}, \\boxed{1}", "1,2,3"),
        # relation symbols written two ways
        ("\\boxed{x \\geq 3}", "x >= 3"),
        ("\\boxed{x >= 3}", "x \\ge 3"),
        ("\\boxed{x \\neq 3}", "x != 3"),
        ("\\boxed{x != 3}", "x \\ne 3"),
    ],
)
def test_evaluation_shapes_the_checker_already_reads_stay_right(response, gold):
    # checker 2 read these already; the hedge rule must keep them right
    assert is_correct(response, gold)


def test_latex_ignores_spaces_between_digit_groups():
    # LaTeX typesets "12 000" in math mode as 12000; math-verify reads it as 12 * 0
    assert is_correct("\\boxed{12 000}", "12000")
    assert is_correct("Final Answer: $12 000$", "12,000")
