"""Measure the answer checker against the goals of issue 11 and print the figures.

    python bench/bench_answers.py [--data ../shared/data] [--limit N]

- self-gold rate: every distinct gold answer of every benchmark file verified against itself, as a bare
  answer and as a response would state it ("Final Answer: \\boxed{gold}");
- hedges: for every distinct gold, responses that state it together with a wrong candidate ("d or g",
  "g, d", two boxes, ...); every one must be rejected;
- integer rewrites: "1,000", "19.0", "\\boxed{19}", "$19$", "19 dollars", "\\frac{38}{2}", ... of every
  integer gold; every one must be accepted;
- degenerate responses of about 160 KB: time to a verdict;
- throughput of the reward's common case (integer golds, "Final Answer: n").
"""

from __future__ import annotations

import argparse
import json
import sys
import time
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
        f"So the answer is \\boxed{{{d}}} or \\boxed{{{gold}}}.",
        f"So the answer is \\boxed{{{gold}}} or \\boxed{{{d}}}.",
        f"So the answer is $\\boxed{{{d}}}$, $\\boxed{{{gold}}}$",
        f"So it is {d}, \\boxed{{{gold}}}",
        f"Thus \\boxed{{{gold} \\text{{ or }} {d}}}",
    ]
    return responses


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
