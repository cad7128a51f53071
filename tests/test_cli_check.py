import json

from parallel_r1.cli import main

GOOD = "Start.<Parallel><Path>a</Path><Path>b</Path></Parallel><Summary>s</Summary>Final Answer: 1"
TWO_BLOCKS = GOOD + "<Parallel><Path>c</Path><Path>d</Path><Path>e</Path></Parallel><Summary>t</Summary>"
STRAY = "<Parallel><Path>a</Path> oops <Path>b</Path></Parallel><Summary>s</Summary>"
TRUNCATED = "So <Parallel><Path>a</Path><Path>b"


def _write(tmp_path, records, name="responses.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def _json_lines(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines()]


def test_all_valid_exits_zero_with_counts(tmp_path, capsys):
    path = _write(tmp_path, [{"response": GOOD}, {"response": "no blocks"}, {"response": TWO_BLOCKS}])
    assert main(["check", str(path), "--json"]) == 0
    assert _json_lines(capsys.readouterr().out) == [
        {"line": 1, "valid": True, "blocks": 1, "paths": [2], "errors": []},
        {"line": 2, "valid": True, "blocks": 0, "paths": [], "errors": []},
        {"line": 3, "valid": True, "blocks": 2, "paths": [2, 3], "errors": []},
    ]


def test_invalid_lines_exit_one_and_report_each_error(tmp_path, capsys):
    path = _write(tmp_path, [{"response": GOOD}, {"response": STRAY}, {"response": TRUNCATED}])
    assert main(["check", str(path), "--json"]) == 1
    good, stray, truncated = _json_lines(capsys.readouterr().out)
    assert good["valid"] and not stray["valid"] and not truncated["valid"]
    [error] = stray["errors"]
    assert (error["kind"], error["offset"]) == ("text_between_paths", STRAY.index("oops"))
    assert "oops" in error["message"]
    assert [(e["kind"], e["offset"]) for e in truncated["errors"]] == [
        ("unclosed_block", TRUNCATED.index("<Parallel>")),
        ("unclosed_path", TRUNCATED.rindex("<Path>")),
    ]
    # the counts describe what is there, even when it is cut off
    assert (truncated["blocks"], truncated["paths"]) == (1, [2])


def test_text_report_lists_errors_and_totals(tmp_path, capsys):
    path = _write(tmp_path, [{"response": GOOD}, {"response": STRAY}])
    assert main(["check", str(path)]) == 1
    out = capsys.readouterr().out
    assert f"{path}:2: text_between_paths at offset {STRAY.index('oops')}" in out
    assert "2 responses: 1 valid, 1 invalid; 2 blocks, 4 paths" in out
    assert "errors: text_between_paths 1" in out


def test_other_field_and_blank_lines(tmp_path, capsys):
    path = tmp_path / "out.jsonl"
    path.write_text(json.dumps({"completion": GOOD}) + "\n\n" + json.dumps({"completion": STRAY}) + "\n")
    assert main(["check", str(path), "--field", "completion", "--json"]) == 1
    assert [(r["line"], r["valid"]) for r in _json_lines(capsys.readouterr().out)] == [(1, True), (3, False)]


def test_unreadable_input_exits_two_naming_file_and_line(tmp_path, capsys):
    missing = tmp_path / "missing.jsonl"
    assert main(["check", str(missing)]) == 2
    assert str(missing) in capsys.readouterr().err

    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text(json.dumps({"response": GOOD}) + "\n{not json\n")
    assert main(["check", str(bad_json)]) == 2
    assert f"{bad_json}:2: not valid JSON" in capsys.readouterr().err

    no_field = _write(tmp_path, [{"response": GOOD}, {"answer": "3"}], name="nofield.jsonl")
    assert main(["check", str(no_field)]) == 2
    assert f"{no_field}:2: no field 'response'" in capsys.readouterr().err

    not_text = _write(tmp_path, [{"response": 3}], name="number.jsonl")
    assert main(["check", str(not_text), "--json"]) == 2
    captured = capsys.readouterr()
    assert f"{not_text}:1: field 'response' must be a string, not int" in captured.err and captured.out == ""


def test_plans_flag_checks_the_planned_format(tmp_path, capsys):
    planned = "<Parallel>a\n<Path>a 1</Path></Parallel><Summary>s</Summary>Final Answer: 1"
    path = _write(tmp_path, [{"response": planned}])
    assert main(["check", str(path), "--json", "--plans"]) == 0
    assert _json_lines(capsys.readouterr().out)[0]["valid"] is True
    assert main(["check", str(path), "--json"]) == 1
    assert not _json_lines(capsys.readouterr().out)[0]["valid"]


def test_max_depth_flag_accepts_nested_blocks_and_names_the_offset_past_it(tmp_path, capsys):
    inner = "<Parallel><Path>x</Path><Path>y</Path></Parallel><Summary>s</Summary>"
    nested = f"<Parallel><Path>a{inner}</Path><Path>b</Path></Parallel><Summary>t</Summary>Final Answer: 1"
    path = _write(tmp_path, [{"response": nested}])
    assert main(["check", str(path), "--json", "--max-depth", "2"]) == 0
    assert _json_lines(capsys.readouterr().out) == [
        {"line": 1, "valid": True, "blocks": 2, "paths": [2, 2], "errors": []}
    ]
    assert main(["check", str(path)]) == 1
    assert f"nested_block at offset {nested.index(inner)}" in capsys.readouterr().out
    assert main(["check", str(path), "--max-depth", "0"]) == 2
    assert "--max-depth must be at least 1" in capsys.readouterr().err
