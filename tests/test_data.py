import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from parallel_r1.data import (
    BENCHMARKS,
    Problem,
    SFTRecord,
    dapo_question,
    gsm8k_final_answer,
    gsm8k_worked_solution,
    load_problems,
    load_sft_records,
)
from parallel_r1.prompts import build_prompt

ROWS = [
    {"question": "Tom has 3 apples and buys 4. How many?", "answer": "7"},
    {"question": "What is $\\frac{1}{2} + \\frac{1}{4}$?", "answer": "\\frac{3}{4}"},
    {"question": "Amy reads 12 pages a day for 5 days. Pages?", "answer": "60"},
]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_jsonl_round_trip(tmp_path):
    path = _write_jsonl(tmp_path / "toy.jsonl", ROWS)
    problems = load_problems(str(path))
    assert [(p.question, p.answer) for p in problems] == [(r["question"], r["answer"]) for r in ROWS]
    assert all(isinstance(p, Problem) and p.source == "toy" for p in problems)
    assert [p.id for p in problems] == ["toy/0", "toy/1", "toy/2"]


def test_parquet_round_trip_with_numeric_answers(tmp_path):
    path = tmp_path / "amc.parquet"
    table = pa.table({"question": [r["question"] for r in ROWS[:2]], "answer": [27.0, 2.5], "id": [11, 12]})
    pq.write_table(table, path)
    problems = load_problems(str(path))
    assert [(p.question, p.answer, p.id) for p in problems] == [
        (ROWS[0]["question"], "27", "amc/11"),
        (ROWS[1]["question"], "2.5", "amc/12"),
    ]


def test_json_array_file(tmp_path):
    path = tmp_path / "toy.json"
    path.write_text(json.dumps(ROWS), encoding="utf-8")
    assert [p.answer for p in load_problems(str(path))] == ["7", "\\frac{3}{4}", "60"]


def test_directory_and_split(tmp_path):
    _write_jsonl(tmp_path / "gsm_train.jsonl", ROWS[:2])
    _write_jsonl(tmp_path / "gsm_test.jsonl", ROWS[2:])
    (tmp_path / "notes.txt").write_text("not data")
    assert len(load_problems(str(tmp_path))) == 3
    test = load_problems(str(tmp_path), split="test")
    assert [p.answer for p in test] == ["60"] and test[0].source == "gsm_test"
    with pytest.raises(FileNotFoundError, match="validation"):
        load_problems(str(tmp_path), split="validation")


def test_limit(tmp_path):
    path = _write_jsonl(tmp_path / "toy.jsonl", ROWS)
    assert [p.answer for p in load_problems(str(path), limit=2)] == ["7", "\\frac{3}{4}"]
    with pytest.raises(ValueError, match="limit"):
        load_problems(str(path), limit=0)


def test_field_overrides(tmp_path):
    path = _write_jsonl(tmp_path / "math.jsonl", [{"problem": "1 + 1?", "solution": "2"}])
    problems = load_problems(str(path), question_field="problem", answer_field="solution")
    assert (problems[0].question, problems[0].answer) == ("1 + 1?", "2")


def test_gsm8k_style_answers_keep_the_final_number(tmp_path):
    assert gsm8k_final_answer("She has 3 + 4 = <<3+4=7>>7 apples.\n#### 7") == "7"
    assert gsm8k_final_answer("Total 1,000 + 234\n#### 1,234") == "1234"
    with pytest.raises(ValueError, match="####"):
        gsm8k_final_answer("no marker")
    path = _write_jsonl(tmp_path / "gsm.jsonl", [{"question": "q", "answer": "2 * 617 = 1234\n#### 1,234"}])
    assert load_problems(str(path))[0].answer == "1234"


def test_missing_field_error_names_file_row_and_field(tmp_path):
    path = _write_jsonl(tmp_path / "bad.jsonl", [ROWS[0], {"question": "q", "solution": "3"}])
    with pytest.raises(ValueError) as err:
        load_problems(str(path))
    message = str(err.value)
    assert f"{path}:2:" in message and "'answer'" in message
    assert "question, solution" in message  # the fields that are there


def test_missing_field_error_in_parquet(tmp_path):
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"problem": ["a", "b"], "answer": ["1", "2"]}), path)
    with pytest.raises(ValueError) as err:
        load_problems(str(path))
    message = str(err.value)
    assert str(path) in message and "row 1" in message and "'question'" in message and "answer, problem" in message


def test_empty_answer_and_bad_json_raise(tmp_path):
    empty = _write_jsonl(tmp_path / "empty.jsonl", [{"question": "q", "answer": "  "}])
    with pytest.raises(ValueError, match=r"empty.jsonl:1: field 'answer' is empty"):
        load_problems(str(empty))
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps(ROWS[0]) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"broken.jsonl:2: not valid JSON"):
        load_problems(str(broken))


def test_unknown_source_and_file_type(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a known dataset name"):
        load_problems(str(tmp_path / "nope.jsonl"))
    csv = tmp_path / "data.csv"
    csv.write_text("question,answer\n")
    with pytest.raises(ValueError, match="unsupported file type"):
        load_problems(str(csv))


# ---- the Hub, through a stand-in for datasets.load_dataset (no network) ----

HUB_ROWS = {
    "openai/gsm8k": [
        {
            "question": "Natalia sold 48 clips, then half as many. Total?",
            "answer": "48 / 2 = 24\n48 + 24 = 72\n#### 72",
        },
        {"question": "A big sum?", "answer": "#### 1,500"},
    ],
    "BytedTsinghua-SIA/DAPO-Math-17k": [
        {
            "data_source": "math_dapo",
            "prompt": [
                {
                    "role": "user",
                    "content": "Solve the following math problem step by step. The last line of your response "
                    "should be of the form Answer: $Answer (without quotes) where $Answer is the answer to the "
                    "problem.\n\nFind $x$ if $2x = 10$.\n\nRemember to put your answer on its own line after "
                    '"Answer:".',
                }
            ],
            "reward_model": {"ground_truth": "5", "style": "rule"},
            "extra_info": {"index": "abc-1"},
        }
    ]
    * 3,  # the Hub copy repeats its problems
    "HuggingFaceH4/MATH-500": [
        {"problem": "Simplify $\\frac{2}{4}$.", "answer": "\\frac{1}{2}", "unique_id": "test/algebra/1.json"}
    ],
    "HuggingFaceH4/aime_2024": [{"id": 60, "problem": "Find 540.", "answer": "540"}],
    "yentinglin/aime_2025": [{"problem": "Find 70.", "answer": "70"}],
    "math-ai/amc23": [{"question": "Miles from A?", "answer": 27.0}],
}


@pytest.fixture()
def fake_hub(monkeypatch):
    import datasets

    calls = []

    def load_dataset(path, name=None, split=None):
        calls.append((path, name, split))
        return list(HUB_ROWS[path])

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


@pytest.mark.parametrize(
    "name, call, expected",
    [
        ("gsm8k", ("openai/gsm8k", "main", "train"), [("Natalia sold 48 clips, then half as many. Total?", "72")]),
        ("dapo", ("BytedTsinghua-SIA/DAPO-Math-17k", None, "train"), [("Find $x$ if $2x = 10$.", "5")]),
        ("dapo_math_17k", ("BytedTsinghua-SIA/DAPO-Math-17k", None, "train"), [("Find $x$ if $2x = 10$.", "5")]),
        ("math500", ("HuggingFaceH4/MATH-500", None, "test"), [("Simplify $\\frac{2}{4}$.", "\\frac{1}{2}")]),
        ("aime24", ("HuggingFaceH4/aime_2024", None, "train"), [("Find 540.", "540")]),
        ("aime25", ("yentinglin/aime_2025", None, "train"), [("Find 70.", "70")]),
        ("amc23", ("math-ai/amc23", None, "test"), [("Miles from A?", "27")]),
    ],
)
def test_hub_benchmarks_map_their_fields(fake_hub, name, call, expected):
    problems = load_problems(name, limit=1)
    assert fake_hub == [call]
    assert [(p.question, p.answer) for p in problems] == expected
    assert problems[0].source == name


def test_hub_ids_split_override_and_dedupe(fake_hub):
    assert load_problems("math500")[0].id == "math500/test/algebra/1.json"
    assert load_problems("aime24")[0].id == "aime24/60"
    assert load_problems("aime25")[0].id == "aime25/0"  # no id field: the row number
    assert [p.answer for p in load_problems("gsm8k", split="test")] == ["72", "1500"]
    assert fake_hub[-1] == ("openai/gsm8k", "main", "test")
    dapo = load_problems("dapo")
    assert len(dapo) == 1 and dapo[0].id == "dapo/abc-1"


def test_hub_missing_field_names_dataset_row_and_field(fake_hub, monkeypatch):
    monkeypatch.setitem(HUB_ROWS, "HuggingFaceH4/MATH-500", [{"problem": "p", "answer": "1"}, {"problem": "q"}])
    with pytest.raises(ValueError) as err:
        load_problems("math500")
    message = str(err.value)
    assert "HuggingFaceH4/MATH-500" in message and "row 2" in message and "'answer'" in message


def test_hub_gsm8k_answer_without_marker_names_the_row(fake_hub, monkeypatch):
    monkeypatch.setitem(HUB_ROWS, "openai/gsm8k", [{"question": "q", "answer": "just 5"}])
    with pytest.raises(ValueError, match=r"openai/gsm8k \(train\), row 1: .*'####'"):
        load_problems("gsm8k")


def test_every_benchmark_is_documented_and_loadable_by_name():
    assert {"gsm8k", "dapo", "math500", "aime24", "aime25", "amc23"} <= set(BENCHMARKS)
    for spec in BENCHMARKS.values():
        assert spec.path.count("/") == 1 and spec.split and spec.question and spec.answer


def test_dapo_question_keeps_bare_problems():
    assert dapo_question("Find $x$.") == "Find $x$."


# ---- worked solutions (the few-shot examples) ----


def test_worked_solutions_from_a_solution_field_or_a_gsm8k_answer(tmp_path):
    rows = [
        {"question": "q1", "answer": "Half of 48 is 48/2 = <<48/2=24>>24.\n#### 1,024"},
        {"question": "q2", "answer": "5", "solution": "2 + 3 = 5."},
        {"question": "q3", "answer": "6"},
    ]
    problems = load_problems(str(_write_jsonl(tmp_path / "train.jsonl", rows)))
    assert [(p.answer, p.solution) for p in problems] == [
        ("1024", "Half of 48 is 48/2 = 24."),
        ("5", "2 + 3 = 5."),
        ("6", None),
    ]
    assert gsm8k_worked_solution("a <<1+1=2>>2\nb\n#### 2") == "a 2\nb"


# ---- cold-start records ----


def test_sft_records_from_a_local_file(tmp_path):
    rows = [
        {"question": "3 + 4?", "response": "<Parallel>...</Parallel>\nFinal Answer: 7", "answer": "7"},
        {"question": "2 + 2?", "response": "Final Answer: 4", "my_prompt": "Q: 2 + 2?\n"},
    ]
    path = _write_jsonl(tmp_path / "cold.jsonl", rows)
    records = load_sft_records(str(path))
    assert records[0] == SFTRecord(build_prompt("3 + 4?"), rows[0]["response"], "7")
    assert records[1].answer is None
    with pytest.raises(ValueError, match=r"cold.jsonl:1: no field 'my_prompt'"):
        load_sft_records(str(path), prompt_field="my_prompt")
    with pytest.raises(ValueError, match=r"cold.jsonl:1: no field 'text'"):
        load_sft_records(str(path), response_field="text")


# ---- the shared data folder ----

SHARED_ROWS = {
    "parallel_gsm8k_sample": 341,
    "gsm8k_train": 7473,
    "gsm8k_test": 1319,
    "dapo_math_17k": 17917,
    "math_test": 5000,
    "math300": 316,
    "aime24": 30,
    "aime25": 30,
    "amc23": 40,
}


@pytest.mark.parametrize("stem, rows", SHARED_ROWS.items())
def test_shared_data_loads(shared_data, stem, rows):
    problems = load_problems(str(shared_data / f"{stem}.jsonl"))
    assert len(problems) == rows
    assert len({p.id for p in problems}) == rows
    assert all(p.question and p.answer for p in problems)


def test_shared_cold_start_records(shared_data):
    path = shared_data / "parallel_gsm8k_sample.jsonl"
    raw = [json.loads(line) for line in path.open()]
    records = load_sft_records(str(path))
    assert len(records) == 341
    assert [r.answer for r in records] == [row["answer"] for row in raw]
    # Our own prompt, not the teacher's reference prompt.
    assert records[0].prompt == build_prompt(raw[0]["question"]) != raw[0]["prompt"]
    with_reference = load_sft_records(str(path), prompt_field="prompt")
    assert with_reference[5].prompt == raw[5]["prompt"] and with_reference[5].response == raw[5]["response"]
