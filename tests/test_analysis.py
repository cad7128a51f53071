import json

import pytest

from parallel_r1.analysis import (
    analyze_records,
    analyze_response,
    answers_agree,
    path_answer,
    read_rollouts,
    run_analysis,
)

EXPLORE = (
    "Tom has 3 apples and buys 4 more.\nLet us add."
    "<Parallel><Path>3 + 4 = 7</Path><Path>Counting on from 4: 5, 6, 7. Final Answer: 7</Path></Parallel>"
    "<Summary>Both give 7.</Summary>So he has 7 apples.\nFinal Answer: 7"
)
VERIFY = (
    "3 + 4 = 7, so the answer is 7. Let us check."
    "<Parallel><Path>7 - 4 = 3</Path><Path>7 - 3 = 4</Path></Parallel><Summary>Consistent.</Summary>"
    "Final Answer: 7"
)


def test_path_answer_prefers_explicit_answers_then_last_number():
    assert path_answer("2 + 2 = 4, then 4 * 3 = 12") == "12"
    assert path_answer("so 1,200 in all") == "1200"
    assert path_answer("We get \\boxed{\\frac{1}{2}} and 3 more steps") == "\\frac{1}{2}"
    assert path_answer("Final Answer: 19\nchecked with 20") == "19"
    assert path_answer("no numbers here") is None


def test_answers_agree():
    assert answers_agree(["7", "7.0"]) is True
    assert answers_agree(["7", "8"]) is False
    assert answers_agree(["7", None]) is None
    assert answers_agree([None, None, "3", "3"]) is True


def test_block_before_any_candidate_is_exploration():
    [block] = analyze_response(EXPLORE)
    assert block.role == "exploration"
    assert block.position == pytest.approx(EXPLORE.index("<Parallel>") / len(EXPLORE))
    assert block.num_paths == 2
    assert block.path_answers == ["7", "7"] and block.agree is True
    assert block.path_chars == [len("3 + 4 = 7"), len("Counting on from 4: 5, 6, 7. Final Answer: 7")]


def test_block_after_a_stated_answer_is_verification():
    [block] = analyze_response(VERIFY)
    assert block.role == "verification"
    assert block.path_answers == ["3", "4"] and block.agree is False


def test_summary_counts_as_main_thread_and_question_restatement_does_not():
    # The first block's summary states 12; the second block checks it.
    text = (
        "He has 12 boxes of 1 pen. We need the total."
        "<Parallel><Path>6 * 2 = 12</Path><Path>12</Path></Parallel><Summary>The total is 12.</Summary>"
        "<Parallel><Path>12 / 2 = 6</Path><Path>12 / 6 = 2</Path></Parallel><Summary>ok</Summary>Final Answer: 12"
    )
    first, second = analyze_response(text, question="He has 12 boxes of 1 pen.")
    assert (first.role, second.role) == ("exploration", "verification")
    # Without the question, the 12 in the restatement reads as a candidate.
    assert analyze_response(text)[0].role == "verification"


def test_number_boundaries_and_truncated_blocks():
    # "17" does not mention the answer 7; a block cut off at the end still counts (lenient parse).
    text = "We have 17 cards.<Parallel><Path>a 7</Path><Path>b"
    [block] = analyze_response(text + "\nFinal Answer: 7")[:1]
    assert block.role == "exploration"
    assert analyze_response("no blocks here. Final Answer: 3") == []


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_groups_by_step_and_summaries(tmp_path):
    records = [
        {"step": 2, "response": VERIFY, "correct": True},
        {"step": 2, "response": "7. Final Answer: 7", "correct": False},
        {"step": 1, "response": EXPLORE, "correct": True},
        {"step": 10, "response": EXPLORE + VERIFY, "correct": True},
    ]
    summaries = analyze_records(records)
    assert [s.group for s in summaries] == ["1", "2", "10"]
    one, two, ten = summaries
    assert (one.exploration_share, one.verification_share) == (1.0, 0.0)
    assert (two.parallel_ratio, two.blocks_per_response, two.accuracy) == (0.5, 0.5, 0.5)
    assert two.verification_share == 1.0 and two.path_agreement == 0.0
    assert ten.num_blocks == 2 and ten.path_agreement == 0.5
    assert sum(one.position_histogram) == pytest.approx(1.0)
    bin_ = int(EXPLORE.index("<Parallel>") / len(EXPLORE) * 10)
    assert one.position_histogram[bin_] == 1.0
    assert one.paths_per_block == {2: 1.0} and ten.mean_paths == 2.0
    planned = "<Parallel>a\nb\nc\n<Path>a 1</Path><Path>b 2</Path><Path>c 3</Path></Parallel><Summary>s</Summary>"
    single = "<Parallel>a\n<Path>a 1</Path></Parallel><Summary>s</Summary>"
    [mixed] = analyze_records([{"step": 3, "response": planned + single + planned}])
    assert mixed.paths_per_block == {1: pytest.approx(1 / 3), 3: pytest.approx(2 / 3)}
    assert mixed.mean_paths == pytest.approx(7 / 3)
    assert one.mean_path_chars == pytest.approx(
        (len("3 + 4 = 7") + len("Counting on from 4: 5, 6, 7. Final Answer: 7")) / 2
    )


def test_read_rollouts_run_dir_eval_output_and_torn_line(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    _write(run / "rollouts.jsonl", [{"step": 0, "response": EXPLORE}])
    _write(run / "metrics.jsonl", [{"step": 0, "loss": 1.0}])  # not rollouts: ignored
    with (run / "rollouts.jsonl").open("a") as f:
        f.write('{"step": 1, "resp')  # a run killed mid-write
    _write(tmp_path / "ev.samples.jsonl", [{"model": "ckpt-a", "response": VERIFY}])
    (tmp_path / "ev.json").write_text(json.dumps({"results": [], "samples": "ev.samples.jsonl"}))
    records = read_rollouts([run, tmp_path / "ev.json"])
    assert [r["response"] for r in records] == [EXPLORE, VERIFY]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"response": "x"}\nnot json\n{"response": "y"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        read_rollouts([bad])
    with pytest.raises(ValueError, match="bad2.jsonl:1.*'response'"):
        _write(tmp_path / "bad2.jsonl", [{"text": "x"}])
        read_rollouts([tmp_path / "bad2.jsonl"])


def test_run_analysis_by_checkpoint_writes_json_and_png(tmp_path):
    pytest.importorskip("matplotlib")
    _write(tmp_path / "early.jsonl", [{"response": EXPLORE}, {"response": "Final Answer: 7"}])
    _write(tmp_path / "late.jsonl", [{"response": VERIFY}, {"response": VERIFY}])
    out = tmp_path / "out"
    summaries = run_analysis([tmp_path / "late.jsonl", tmp_path / "early.jsonl"], out)
    assert [s.group for s in summaries] == ["late", "early"]  # input order, not alphabetical
    payload = json.loads((out / "summary.json").read_text())
    assert payload["grouped_by"] == "checkpoint"
    assert [g["verification_share"] for g in payload["groups"]] == [1.0, 0.0]
    assert (out / "strategy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_analyze_cli(tmp_path):
    pytest.importorskip("matplotlib")
    from parallel_r1.cli import main

    _write(tmp_path / "r.jsonl", [{"step": s, "response": EXPLORE if s < 2 else VERIFY} for s in range(4)])
    assert main(["analyze", str(tmp_path / "r.jsonl"), "--out", str(tmp_path / "a")]) == 0
    groups = json.loads((tmp_path / "a" / "summary.json").read_text())["groups"]
    assert [g["exploration_share"] for g in groups] == [1.0, 1.0, 0.0, 0.0]


def test_nested_blocks_are_analysed_with_their_depth():
    inner = "<Parallel><Path>5+1=6</Path><Path>5+2=7</Path></Parallel><Summary>7</Summary>"
    text = f"<Parallel><Path>try 5 {inner}</Path><Path>4+3=7</Path></Parallel><Summary>7</Summary>Final Answer: 7"
    outer, nested = analyze_response(text, max_depth=2)
    assert (outer.depth, nested.depth) == (1, 2) and outer.num_paths == nested.num_paths == 2
    records = [{"response": text, "correct": True, "depth": 2}, {"response": "Final Answer: 7", "depth": 0}]
    [group] = analyze_records(records)
    assert group.num_blocks == 2 and group.depth_share == {0: 0.5, 2: 0.5}
