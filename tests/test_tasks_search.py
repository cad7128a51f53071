"""The built-in search task: generator, splits, the teacher styles, the per-path check."""

import random

import pytest

from parallel_r1.answers import is_correct
from parallel_r1.format import parse
from parallel_r1.tasks import search


def test_every_problem_has_exactly_one_candidate_that_reaches_the_target():
    for level in search.LEVELS:
        for p in search.generate(50, (level,), "train", seed=3):
            reaching = [c for c in p.candidates if search.value(c, p.factor, p.offset) == p.target]
            assert reaching == [p.answer]
            assert len(set(p.candidates)) == search.LEVELS[level].num_candidates
            assert p.target > 0
            assert f"={p.target}." in p.question and all(str(c) in p.question for c in p.candidates)


def test_generation_is_deterministic_and_distinct():
    a = search.generate(200, (2, 3), "train", seed=1)
    assert [p.id for p in a] == [p.id for p in search.generate(200, (2, 3), "train", seed=1)]
    assert [p.id for p in a] != [p.id for p in search.generate(200, (2, 3), "train", seed=2)]
    assert len({p.id for p in a}) == 200


def test_train_problems_never_try_the_computation_that_solves_a_heldout_problem():
    heldout = search.generate(300, (2, 3, 4), "eval", seed=0)
    solved = {p.key for p in heldout}
    assert all(search.split_of(k) == "eval" for k in solved)
    for seed in (0, 1):
        for p in search.generate(2000, (1, 2, 3, 4), "train", seed=seed):
            tried = {search.computation_key(p.factor, p.offset, c) for c in p.candidates}
            assert not tried & solved


@pytest.mark.parametrize("style", (*search.STYLES, search.CHOICE))
def test_teacher_solutions_are_well_formed_and_right(style):
    rng = random.Random(0)
    for level in search.LEVELS:
        for p in search.generate(40, (level,), "train", seed=level):
            text = search.teacher_solution(p, style, rng)
            parsed = parse(text)
            assert parsed.well_formed, (text, parsed.errors)
            assert is_correct(text, str(p.answer))
            if style in ("parallel", "mixed"):
                assert (parsed.num_blocks > 0) == (style == "parallel" or level > 1)
            elif style == "choice":
                assert parsed.num_blocks == 0 or level > 1
            else:
                assert parsed.num_blocks == 0 and "<" not in text
            assert text.count(f": {p.answer} works") == 1  # exactly the right candidate checks out
            others = (
                text.replace(f": {p.answer} works", "")
                .replace(f">{p.answer} works<", "")
                .replace(">none works<", "")
                .replace(f"So {p.answer} works\n", "")
                .replace("So none works\n", "")
            )
            assert " works" not in others


def test_both_styles_try_the_same_candidates_in_the_same_order():
    for p in search.generate(60, (3, 4, 5), "train", seed=9):
        parallel = search.teacher_solution(p, "parallel", random.Random(p.id))
        sequential = search.teacher_solution(p, "sequential", random.Random(p.id))
        tried_seq = [line.split("*")[0] for line in sequential.splitlines() if "*" in line]
        tried_par = [line.split("*")[0].split(">")[-1] for line in parallel.split("<Path>")[1:]]
        # The sequential teacher stops at the hit; the parallel one finishes the hit's block (and may re-try
        # a ruled-out candidate to give its last block a second path).
        order = list(dict.fromkeys(tried_par))
        assert order[: len(tried_seq)] == tried_seq
        assert len(order) - len(tried_seq) <= 1
        assert tried_seq[-1] == str(p.answer)


def test_path_hits_needs_the_right_candidate_and_its_verdict():
    p = search.SearchProblem(3, (4, 9, 2, 7), answer=7, factor=3, offset=10)
    right = search.try_lines(7, 3, 10, p.target)
    wrong = search.try_lines(4, 3, 10, p.target)
    assert right == "7*3=21\n21+10=31\n31 vs 31: 7 works"
    assert wrong.endswith("22 vs 31: 4 fails")
    assert search.path_hits(right, "7")
    assert not search.path_hits(wrong, "7")
    assert not search.path_hits(right.replace("works", "fails"), "7")
    assert not search.path_hits(wrong.replace("fails", "works"), "7")


def _tries(text: str) -> list[int]:
    """The candidates a solution of any style tries, in order."""
    return [int(line.split("*")[0].split(">")[-1]) for line in text.splitlines() if "*" in line]


def test_the_controls_hold_the_parallel_script_and_change_one_thing():
    for p in search.generate(80, (2, 3, 4, 5), "train", seed=4):
        parallel, plain, thorough, sequential = (
            search.teacher_solution(p, style, random.Random(p.id))
            for style in ("parallel", "plain", "thorough", "sequential")
        )
        # plain: the same text but for the tags, each replaced by its delimiter.
        expected = parallel
        for tag, delimiter in search.PLAIN_DELIMITERS.items():
            expected = expected.replace(tag, delimiter)
        assert plain == expected
        # thorough: exactly the parallel script's tries, re-tries included, as sequential text.
        assert _tries(thorough) == _tries(parallel) == _tries(plain)
        assert thorough.split("\nFinal Answer")[0].split("\n\n") == [
            search.try_lines(c, p.factor, p.offset, p.target) for c in _tries(parallel)
        ]
        assert _tries(sequential) == list(dict.fromkeys(_tries(parallel)))[: len(_tries(sequential))]


def test_mixed_opens_a_block_only_while_three_candidates_remain():
    for p in search.generate(120, (1, 2, 3, 4, 5), "train", seed=5):
        text = search.teacher_solution(p, "mixed", random.Random(p.id))
        order = list(p.candidates)
        random.Random(p.id).shuffle(order)
        parsed = parse(text)
        tried = 0
        for block in parsed.blocks:
            assert len(order) - tried >= 3 and len(block.paths) == 2
            tried += 2
        tries = _tries(text)
        assert tries == order[: len(tries)]  # no re-tries
        ends_in_block = text.endswith("</Summary>" + f"Final Answer: {p.answer}")
        assert p.answer in (tries[-2:] if ends_in_block else tries[-1:])  # stops at the hit
        assert len(tries) - 2 * parsed.num_blocks <= 2  # single tries only for the last two candidates


def test_splits_are_apart_by_computation_and_valid_problems_never_try_a_heldout_one():
    heldout = {p.key for p in search.generate(200, (2, 3, 4), "eval", seed=0)}
    valid = search.generate(200, (2, 3, 4), "valid", seed=0)
    assert all(search.split_of(p.key) == "valid" for p in valid)
    for p in valid:
        assert not {search.computation_key(p.factor, p.offset, c) for c in p.candidates} & heldout
    train = search.generate(1000, (1, 2, 3, 4), "train", seed=0)
    tried = {search.computation_key(p.factor, p.offset, c) for p in train for c in p.candidates}
    assert not tried & ({p.key for p in valid} | heldout)
    shares = [
        search.split_of(search.computation_key(f, o, n))
        for f in range(2, 8)
        for o in range(-29, 30)
        for n in range(2, 10)
    ]
    assert 0.05 < shares.count("valid") / len(shares) < 0.15 and 0.05 < shares.count("eval") / len(shares) < 0.15


def test_path_candidate_reads_the_try():
    assert search.path_candidate(search.try_lines(7, 3, 10, 31)) == 7
    assert search.path_candidate("none works") is None


def test_choice_opens_a_block_on_even_odds_where_mixed_always_does():
    problems = search.generate(400, (3, 4, 5), "train", seed=6)
    opened = decisions = 0
    for p in problems:
        text = search.teacher_solution(p, "choice", random.Random(p.id))
        parsed = parse(text)
        assert parsed.well_formed and is_correct(text, str(p.answer))
        order = list(p.candidates)
        random.Random(p.id).shuffle(order)
        tries = _tries(text)
        assert tries == order[: len(tries)]  # the mixed script's order, no re-tries, stops at the hit
        assert all(len(b.paths) == 2 for b in parsed.blocks)
        # every decision point (three or more candidates left) either opened a block or tried one candidate
        i = 0
        for block_or_try in _units(text):
            if len(order) - i >= 3:
                decisions += 1
                opened += block_or_try == "block"
            i += 2 if block_or_try == "block" else 1
    assert 0.4 < opened / decisions < 0.6
    mixed = [search.teacher_solution(p, "mixed", random.Random(p.id)) for p in problems]
    assert all(parse(t).num_blocks > 0 for t in mixed)  # mixed opens one whenever it can


def _units(text: str) -> list[str]:
    """The solution as a list of "block" / "try" in order."""
    units, rest = [], text.split("Final Answer")[0]
    while rest.strip():
        if rest.startswith("<Parallel>"):
            units.append("block")
            rest = rest[rest.index("</Summary>") + len("</Summary>") :]
        else:
            units.append("try")
            cut = [i for i in (rest.find("\n\n"), rest.find("<Parallel>")) if i > 0]
            rest = rest[min(cut) :].lstrip("\n") if cut else ""
    return units


def test_planned_teacher_plans_each_block_and_keeps_the_parallel_tries():
    from parallel_r1 import diagnostics
    from parallel_r1.answers import extract_answer
    from parallel_r1.format import validate

    problems = search.generate(200, levels=(1, 2, 3, 4), seed=3)
    sizes = set()
    for p in problems:
        planned = search.teacher_solution(p, "planned", random.Random(p.id))
        assert validate(planned, plans=True) == [] and validate(planned) != []
        blocks = parse(planned, plans=True).blocks
        sizes |= {len(b.paths) for b in blocks}
        for block in blocks:
            lines = [planned[s.start : s.end] for s in block.plan_lines]
            tried = [search.path_candidate(planned[q.content.start : q.content.end]) for q in block.paths]
            assert lines == [f"{c}*{p.factor}" for c in tried]
        # the shuffled order of every style, a full block at a time, fewer paths only when candidates run out
        order = list(p.candidates)
        random.Random(p.id).shuffle(order)
        tries = diagnostics.tried_candidates(planned)
        assert tries == order[: len(tries)]
        assert len(set(tries)) == len(tries) and p.answer in tries[-len(blocks[-1].paths) :]
        assert all(len(b.paths) == search.PLANNED_PATHS for b in blocks[:-1])
        left = len(p.candidates) - search.PLANNED_PATHS * (len(blocks) - 1)
        assert len(blocks[-1].paths) == min(search.PLANNED_PATHS, left)
        assert extract_answer(planned) == str(p.answer)
    assert sizes == {1, 2, 3}
    with pytest.raises(ValueError, match="planned"):
        search.teacher_solution(problems[0], "unknown")
