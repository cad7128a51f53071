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
