"""Measure the answer checker against the goals of issues 11 and 21 and print the figures.

    python bench/bench_answers.py [--data ../shared/data] [--limit N]

- self-gold rate: every distinct gold answer of every benchmark file verified against itself, as a bare
  answer and as a response would state it ("Final Answer: \\boxed{gold}");
- hedges: for every distinct gold, responses that state it together with a wrong candidate ("d or g",
  "g, d", two boxes, ...); every one must be rejected;
- evaluation shapes (issue 21): each gold stated the way real evaluations state it (Minerva's "Final Answer:
  The final answer is $g$. I hope it is correct.", sentence lines, named tuples and assignments, inequalities
  for intervals, solution sets with and/or/separate boxes in another order, spaced thousands, relation symbols
  written two ways); the checker's verdict against math-verify's, which parses the whole response with its
  default extraction configs and the gold as LaTeX, as its authors intend;
- integer rewrites: "1,000", "19.0", "\\boxed{19}", "$19$", "19 dollars", "\\frac{38}{2}", ... of every
  integer gold; every one must be accepted;
- degenerate responses of about 160 KB: time to a verdict;
- throughput of the reward's common case (integer golds, "Final Answer: n").
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from parallel_r1.answers import checker_info, extract_answer, is_correct, verify

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
FILES = [
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


def golds_of(path: Path, limit: int | None) -> list[str]:
    golds = sorted({str(json.loads(line)["answer"]) for line in path.open(encoding="utf-8")})
    return golds[:limit] if limit else golds


def distractor(gold: str) -> str:
    try:
        return str(int(gold) + 1)
    except ValueError:
        return "0" if gold.strip() != "0" else "1"


def hedged_responses(gold: str) -> list[str]:
    d = distractor(gold)
    answers = [
        f"{d} or {gold}",
        f"{gold} or {d}",
        f"either {d} or {gold}",
        f"{d}, {gold}",
        f"{gold}, {d}",
        f"{gold}; {d}",
        f"{d} and {gold}",
        f"{d} \\text{{ or }} {gold}",
        f"${d}$ or ${gold}$",
        f"\\boxed{{{d}}} \\boxed{{{gold}}}",
        f"\\boxed{{{gold}}}, \\boxed{{{d}}}",
        f"{d} or \\boxed{{{gold}}}",
    ]
    responses = [f"Some work.\nFinal Answer: {a}" for a in answers]
    responses += [
        f"Some work.\nFinal Answer: The final answer is ${d}$ or ${gold}$. I hope it is correct.",
        f"Some work.\nFinal Answer: The final answer is ${gold}$, ${d}$. I hope it is correct.",
        f"Some work.\nFinal Answer: Thus, the answer is ${gold}$ or ${d}$.",
        f"So the answer is \\boxed{{{d}}} or \\boxed{{{gold}}}.",
        f"So the answer is \\boxed{{{gold}}} or \\boxed{{{d}}}.",
        f"So the answer is $\\boxed{{{d}}}$, $\\boxed{{{gold}}}$",
        f"So it is {d}, \\boxed{{{gold}}}",
        f"Thus \\boxed{{{gold} \\text{{ or }} {d}}}",
    ]
    return responses


SHAPE_FILES = ["math_test.jsonl", "math300.jsonl", "aime24.jsonl", "aime25.jsonl", "amc23.jsonl", "gsm8k_test.jsonl"]
_NUMBERISH = r"-?(?:\d+(?:\.\d+)?|\\infty|\\frac\{\d+\}\{\d+\}|\\sqrt\{?\d+\}?)"
_INTERVAL = re.compile(rf"(?:\\left)?\s*([(\[])\s*({_NUMBERISH})\s*,\s*({_NUMBERISH})\s*(?:\\right)?\s*([)\]])")


def elements(gold: str) -> list[str] | None:
    """The top-level comma-separated items of a gold list or bracketed tuple, None when it is neither."""
    text = gold.strip()
    bracketed = re.fullmatch(r"(?:\\left)?\s*\((.*?)(?:\\right)?\s*\)", text)
    if bracketed:
        text = bracketed.group(1)
    if any(separator in text for separator in ("\\!", "{,}", "\\,")):  # thousands or a thin space
        return None
    items, depth, lowest, start = [], 0, 0, 0
    for i, c in enumerate(text):
        depth += c in "([{"
        depth -= c in ")]}"
        lowest = min(lowest, depth)
        if c == "," and depth == 0:
            items.append(text[start:i].strip())
            start = i + 1
    items.append(text[start:].strip())
    nested = depth != 0 or lowest < 0 or (not bracketed and "(" in text)
    return items if len(items) > 1 and all(items) and not nested else None


def evaluation_shapes(gold: str) -> dict[str, list[tuple[str, str]]]:
    """{shape: [(response, gold), ...]} for one gold of a benchmark file, as evaluations would state it."""
    shapes: dict[str, list[tuple[str, str]]] = {
        "Minerva sentence": [(f"Final Answer: The final answer is ${gold}$. I hope it is correct.", gold)],
        "sentence with math": [(f"Final Answer: Thus, the answer is ${gold}$.", gold)],
    }
    if re.fullmatch(r"-?\d+", gold):
        n = int(gold)
        shapes["sentence, plain number"] = [(f"Final Answer: The total is {n} apples.", gold)]
        shapes["Minerva sentence"].append((f"Final Answer: The final answer is {n}. I hope it is correct.", gold))
        if abs(n) >= 1000:
            spaced = f"{n:,}".replace(",", " ")
            shapes["spaced thousands"] = [
                (f"Final Answer: {spaced}", gold),
                (f"Final Answer: The total is {spaced} apples.", gold),
            ]
        shapes["relation symbols"] = [
            (f"\\boxed{{x >= {n}}}", f"x \\geq {n}"), (f"\\boxed{{x \\ge {n}}}", f"x >= {n}"),
            (f"\\boxed{{x != {n}}}", f"x \\neq {n}"), (f"\\boxed{{x \\ne {n}}}", f"x != {n}"),
            (f"\\boxed{{x \\leq {n}}}", f"x <= {n}"),
        ]  # fmt: skip
    items = elements(gold)
    tuple_gold = gold.lstrip().startswith(("(", "\\left"))
    if items and tuple_gold and len(items) in (2, 3):
        names = ["x", "y", "z"][: len(items)]
        shapes["named tuple"] = [(f"Final Answer: $({', '.join(names)}) = {gold}$", gold)]
        assignment = ", ".join(f"{v} = {e}" for v, e in zip(names, items))
        reordered = ", ".join(f"{v} = {e}" for v, e in reversed(list(zip(names, items))))
        shapes["assignments, other order"] = [(f"\\boxed{{{reordered}}}", assignment)]
    elif items and not tuple_gold and len(set(items)) == len(items):
        back = items[::-1]
        shapes["solution set"] = [
            ("Final Answer: " + " and ".join(f"${e}$" for e in back), gold),
            ("Final Answer: " + " or ".join(f"$x = {e}$" for e in back), gold),
            (", ".join(f"\\boxed{{{e}}}" for e in back), gold),
        ]
    interval = _INTERVAL.fullmatch(gold.strip())
    if interval and ("infty" in gold or "[" in gold or "]" in gold):
        left, a, b, right = interval.groups()
        lo, hi = ("\\le" if left == "[" else "<"), ("\\le" if right == "]" else "<")
        if "infty" in a and "infty" not in b:
            inequality = f"x {hi} {b}"
        elif "infty" in b and "infty" not in a:
            inequality = f"{a} {lo} x"
        else:
            inequality = f"{a} {lo} x {hi} {b}"
        shapes["inequality for interval"] = [
            (f"\\boxed{{{inequality}}}", gold),
            (f"Final Answer: ${inequality}$", gold),
        ]
    return shapes


def math_verify_verdict(response: str, gold: str) -> bool:
    """math-verify as its authors intend: the whole response with the default extraction configs, the gold
    as LaTeX; inequalities may state intervals (its allow_set_relation_comp)."""
    from math_verify import parse
    from math_verify import verify as mv_verify

    return bool(mv_verify(parse(f"${gold}$"), parse(response), allow_set_relation_comp=True))


def integer_rewrites(n: int) -> list[str]:
    grouped = f"{n:,}"
    return [
        str(n), grouped, grouped.replace(",", "{,}"), f"{n}.0", f"{n}.00", f"\\boxed{{{n}}}", f"${n}$",
        f"\\({n}\\)", f"{n} dollars", f"\\${grouped}", f"{grouped} apples", f"{n} \\text{{ cm}}",
        f"The answer is {n}", f"x = {n}", f"\\frac{{{2 * n}}}{{2}}", f"\\dfrac{{{3 * n}}}{{3}}", f"**{n}**",
    ]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--limit", type=int, default=None, help="first N distinct golds of each file")
    args = parser.parse_args()
    print("checker:", json.dumps(checker_info(timeout_s=5.0)))

    if not args.data.is_dir():
        print(f"{args.data} is absent: only the degenerate-input figures")
    else:
        print("\nself-gold rate (distinct golds; bare answer / as 'Final Answer: \\boxed{gold}')")
        for name in FILES:
            path = args.data / name
            if not path.is_file():
                continue
            golds = golds_of(path, args.limit)
            t0 = time.perf_counter()
            bare = [g for g in golds if not verify(g, g)]
            stated = [g for g in golds if "\n" not in g and not is_correct(f"So.\nFinal Answer: \\boxed{{{g}}}", g)]
            seconds = time.perf_counter() - t0
            rate = 1 - len(bare) / len(golds)
            print(
                f"  {name:30s} {len(golds):5d} golds  bare {rate:8.4%}  stated {1 - len(stated) / len(golds):8.4%}"
                f"  ({seconds:.1f} s)"
            )
            for g in (bare + stated)[:5]:
                print(f"      fails: {g!r}")

        print("\nhedges (a gold stated together with a wrong candidate; all must be rejected)")
        total = accepted = 0
        for name in ("math_test.jsonl", "dapo_math_17k.jsonl", "gsm8k_test.jsonl", "aime25.jsonl"):
            path = args.data / name
            if not path.is_file():
                continue
            t0 = time.perf_counter()
            n = bad = 0
            for gold in golds_of(path, args.limit):
                for response in hedged_responses(gold):
                    n += 1
                    if is_correct(response, gold):
                        bad += 1
                        if bad <= 5:
                            print(f"      accepted: {response!r} for {gold!r}")
            total, accepted = total + n, accepted + bad
            print(f"  {name:30s} {n:6d} hedged responses, {bad} accepted ({time.perf_counter() - t0:.1f} s)")
        print(f"  total: {total} hedged responses, {accepted} accepted, {total - accepted} rejected")

        print("\nevaluation shapes: agreement with math-verify's verdict (distinct golds)")
        cases: dict[str, set[tuple[str, str]]] = {}
        for name in SHAPE_FILES:
            path = args.data / name
            if path.is_file():
                for gold in golds_of(path, args.limit):
                    if "\n" not in gold:
                        for shape, pairs in evaluation_shapes(gold).items():
                            cases.setdefault(shape, set()).update(pairs)
        t0 = time.perf_counter()
        totals: Counter[str] = Counter()
        for shape, pairs in cases.items():
            counts: Counter[str] = Counter()
            examples = []
            for response, gold in sorted(pairs):
                ours, reference = is_correct(response, gold), math_verify_verdict(response, gold)
                counts[f"ours={ours} mv={reference}"] += 1
                if ours != reference and len(examples) < 3:
                    examples.append(f"      ours={ours} math-verify={reference}: {response!r} for {gold!r}")
            agree = counts["ours=True mv=True"] + counts["ours=False mv=False"]
            print(
                f"  {shape:26s} {len(pairs):5d} cases  agree {agree / len(pairs):8.4%}  both right"
                f" {counts['ours=True mv=True']:5d}  only math-verify {counts['ours=False mv=True']:3d}"
                f"  only ours {counts['ours=True mv=False']:3d}  both wrong {counts['ours=False mv=False']:3d}"
            )
            for example in examples:
                print(example)
            totals.update(counts)
        n = sum(totals.values())
        agree = totals["ours=True mv=True"] + totals["ours=False mv=False"]
        print(
            f"  total: {n} cases, agree {agree / max(1, n):.4%}, accepted only by math-verify"
            f" {totals['ours=False mv=True']}, only by ours {totals['ours=True mv=False']}"
            f" ({time.perf_counter() - t0:.1f} s)"
        )

        print("\ninteger rewrites (all must be accepted)")
        integers: set[int] = set()
        for name in FILES:
            path = args.data / name
            if path.is_file():
                integers |= {int(g) for g in golds_of(path, args.limit) if g.lstrip("-").isdigit()}
        t0 = time.perf_counter()
        checks = [(r, n) for n in sorted(integers) for r in integer_rewrites(n)]
        rejected = [(r, n) for r, n in checks if not verify(r, str(n))]
        print(
            f"  {len(integers)} integer golds x {len(integer_rewrites(0))} rewrites = {len(checks)} checks,"
            f" {len(checks) - len(rejected)} accepted ({1 - len(rejected) / max(1, len(checks)):.4%},"
            f" {time.perf_counter() - t0:.1f} s)"
        )
        for r, n in rejected[:5]:
            print(f"      rejected: {r!r} for {n}")

    print("\ndegenerate responses (time to a verdict)")
    degenerate = {
        "unclosed boxes": "\\boxed{" * 23000,
        "Final Answer + unclosed boxes": "Final Answer: " + "\\boxed{" * 23000,
        "nested boxes": "\\boxed{" * 11500 + "1" + "}" * 11500,
        "adjacent boxes": "\\boxed{1}" * 18000,
        "empty Final Answer lines": "Final Answer:" + "\n." * 80000,
        "one 160 KB answer line": "Final Answer: " + "(" * 160000,
    }
    for label, text in degenerate.items():
        t0 = time.perf_counter()
        answer = extract_answer(text)
        verdict = is_correct(text, "1")
        print(
            f"  {label:32s} {len(text) / 1000:6.0f} KB  {time.perf_counter() - t0:6.3f} s"
            f"  correct={verdict}  answer length={len(answer) if answer else 0}"
        )

    print("\nthroughput, the reward's common case")
    responses = [(f"We add things up.\nFinal Answer: {n:,}", str(n)) for n in range(2000)]
    t0 = time.perf_counter()
    assert all(is_correct(r, g) for r, g in responses)
    seconds = time.perf_counter() - t0
    print(f"  integer golds, 'Final Answer: n': {len(responses) / seconds:,.0f} responses/s")
    responses = [(f"We add things up.\nFinal Answer: \\frac{{{2 * n}}}{{2}}", str(n)) for n in range(300)]
    t0 = time.perf_counter()
    assert all(is_correct(r, g) for r, g in responses)
    seconds = time.perf_counter() - t0
    print(f"  integer golds, LaTeX answers (math-verify): {len(responses) / seconds:,.0f} responses/s")


if __name__ == "__main__":
    main()
