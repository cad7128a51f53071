import random
import re

import pytest

from parallel_r1 import tasks
from parallel_r1.answers import extract_answer
from parallel_r1.format import TAGS, canonicalize, parse, validate
from parallel_r1.tasks import arith

ALL_LEVELS = tuple(arith.LEVELS)
QUESTION_STEPS = (
    (re.compile(r"^\w+ (?:gets|finds) (\d+) more\.$"), "+"),
    (re.compile(r"^\w+ (?:gives away|loses) (\d+)\.$"), "-"),
    (re.compile(r"^\w+ makes it (\d+) times as many\.$"), "*"),
)


def evaluate_question(question: str) -> int:
    """An evaluator independent of arith.py: read the question text back and evaluate it as Python."""
    sentences = re.findall(r"[^.?]+[.?]", question)
    start = re.fullmatch(r"\w+ has (\d+) \w+\.", sentences[0].strip())
    assert start, sentences[0]
    expr = start.group(1)
    for sentence in sentences[1:-1]:
        matches = [(m, op) for pattern, op in QUESTION_STEPS if (m := pattern.match(sentence.strip()))]
        assert len(matches) == 1, sentence
        m, op = matches[0]
        expr = f"({expr}){op}{m.group(1)}"
    assert sentences[-1].strip().startswith("How many")
    return eval(expr, {"__builtins__": {}})


def check_equation(line: str) -> None:
    m = re.fullmatch(r"(\d+)([-+*/])(\d+)=(-?\d+)", line)
    assert m, f"not an equation: {line!r}"
    a, op, b, c = int(m.group(1)), m.group(2), int(m.group(3)), int(m.group(4))
    assert (c - a == b) if op == "+" else (a - c == b) if op == "-" else (a * b == c) if op == "*" else (c * b == a), (
        line
    )


@pytest.fixture(scope="module")
def problems():
    return arith.generate(240, ALL_LEVELS, "train", seed=3)


def test_same_seed_same_problems_and_solutions():
    a = tasks.make_problems(30, (1, 4), "train", seed=7)
    b = tasks.make_problems(30, (1, 4), "train", seed=7)
    c = tasks.make_problems(30, (1, 4), "train", seed=8)
    assert a == b
    assert [p.question for p in a] != [p.question for p in c]
    specs = arith.generate(10, (3,), seed=7)
    first = [arith.teacher_solution(p, "parallel", random.Random(1)) for p in specs]
    again = [arith.teacher_solution(p, "parallel", random.Random(1)) for p in specs]
    assert first == again


def test_problem_fields(problems):
    converted = [p.to_problem() for p in problems]
    assert all(p.source == "arith" for p in converted)
    assert all(p.answer == str(int(p.answer)) for p in converted)
    assert len({p.id for p in converted}) == len(converted)


def test_answers_match_an_independent_evaluation(problems):
    for p in problems:
        assert str(evaluate_question(p.question)) == p.to_problem().answer, p.question


def test_higher_levels_have_more_steps_and_bigger_numbers(problems):
    by_level = {lv: [p for p in problems if p.level == lv] for lv in ALL_LEVELS}
    steps = [sum(len(p.steps) for p in ps) / len(ps) for ps in by_level.values()]
    biggest = [max(max(p.answer, p.start, *(n for _, n in p.steps)) for p in ps) for ps in by_level.values()]
    muls = [sum(op == "*" for p in ps for op, _ in p.steps) for ps in by_level.values()]
    assert steps == sorted(steps) and steps[-1] > steps[0] + 2
    assert biggest == sorted(biggest) and biggest[-1] > 5 * biggest[0]
    assert muls[0] == muls[1] == 0 and muls[-1] > muls[2] > 0
    for p in problems:
        values = [p.start]
        for op, n in p.steps:
            values.append({"+": values[-1] + n, "-": values[-1] - n, "*": values[-1] * n}[op])
        assert 0 <= min(values) and max(values) <= arith.LEVELS[p.level].max_value


def test_eval_split_never_shares_a_computation_with_training():
    train = arith.generate(3000, ALL_LEVELS, "train", seed=0) + arith.generate(600, (1,), "train", seed=1)
    held_out = arith.generate(600, ALL_LEVELS, "eval", seed=0)
    assert not {p.key for p in train} & {p.key for p in held_out}
    assert not {p.question for p in train} & {p.question for p in held_out}
    assert all(arith.split_of(p.key) == "eval" for p in held_out)
    assert [p.id for p in tasks.make_eval_problems(20)] == [p.id for p in tasks.make_eval_problems(20)]


@pytest.mark.parametrize("seed", range(3))
def test_parallel_solutions_are_valid_canonical_and_correct(problems, seed):
    rng = random.Random(seed)
    layouts = set()
    for p in problems:
        text = arith.teacher_solution(p, "parallel", rng)
        assert validate(text) == [], text
        assert canonicalize(text) == text
        assert extract_answer(text) == str(p.answer)
        parsed = parse(text)
        assert parsed.paths_per_block == [2]
        block = parsed.blocks[0]
        paths = [text[s.content.start : s.content.end] for s in block.paths]
        assert paths[0] != paths[1]
        for path in paths:
            for line in path.split("\n"):
                check_equation(line)
        assert str(p.answer) in text[block.summary.start : block.summary.end]
        main = text[: block.span.start]
        for line in filter(None, main.split("\n")):
            check_equation(line)
        layouts.add("verify" if main else "explore")
    assert layouts == {"verify", "explore"}


def test_paths_reach_the_answer_or_the_start_in_different_ways(problems):
    for p in problems:
        forward = arith.forward_lines(p.start, p.steps)
        grouped = arith.grouped_lines(p.start, p.steps)
        inverse = arith.inverse_lines(p.start, p.steps)
        assert forward[-1].endswith(f"={p.answer}") and grouped[-1].endswith(f"={p.answer}")
        assert inverse[-1].endswith(f"={p.start}") and inverse[0].startswith(str(p.answer))
        assert forward != grouped and len(forward) == len(grouped) == len(p.steps)


def test_sequential_solutions_have_no_blocks(problems):
    for p in problems:
        text = arith.teacher_solution(p, "sequential")
        assert not any(tag in text for tag in TAGS)
        assert extract_answer(text) == str(p.answer)
        *lines, final = text.split("\n")
        assert lines == arith.forward_lines(p.start, p.steps) and final == f"Final Answer: {p.answer}"


def test_solutions_are_short_with_the_tiny_tokenizer(problems):
    from parallel_r1.tiny import build_tokenizer

    tokenizer = build_tokenizer(tasks.tokenizer_corpus(500), vocab_size=512)
    rng = random.Random(0)

    def length(text: str) -> int:
        return len(tokenizer.encode(text, add_special_tokens=False))

    for p in problems:
        bound = 100 if p.level <= 3 else 150 if p.level == 4 else 250
        assert length(arith.teacher_solution(p, "parallel", rng)) < bound
        assert length(arith.teacher_solution(p, "sequential")) <= bound // 2
        assert length(p.question) < 70
    # Tags are single tokens and numbers split into digits: the tokenizer was trained on the task.
    assert length("<Parallel><Path>12+5=17</Path>") == 10


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="level"):
        arith.generate(1, (99,))
    with pytest.raises(ValueError, match="split"):
        arith.generate(1, (1,), split="test")
    with pytest.raises(ValueError, match="style"):
        arith.teacher_solution(arith.generate(1)[0], style="tree")
    with pytest.raises(ValueError, match="distinct"):
        arith.generate(10**6, (1,))


def test_sft_records_and_rl_problems_are_ready_for_the_trainers():
    from parallel_r1.data import SFTRecord

    records = tasks.make_sft_records(20, levels=(1, 2), seed=5)
    assert all(isinstance(r, SFTRecord) for r in records)
    specs = arith.generate(20, (1, 2), "train", seed=5, pool="sft")
    for record, spec in zip(records, specs):
        assert spec.question in record.prompt and "<Parallel>" in record.prompt
        assert validate(record.response) == [] and parse(record.response).has_parallel
        assert extract_answer(record.response) == record.answer == str(spec.answer)
    sequential = tasks.make_sft_records(5, seed=5, style="sequential", template="Problem: {question}\n")
    assert sequential[0].prompt == f"Problem: {specs[0].question}\n"
    assert not parse(sequential[0].response).has_parallel

    rl = tasks.make_problems(30, (3, 4), "train", seed=2)
    assert {p.id.split("-")[1] for p in rl} == {"L3", "L4"}
    assert all(arith.split_of(spec.key) == "train" for spec in arith.generate(30, (3, 4), "train", seed=2))
