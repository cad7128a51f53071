"""Every command turns bad input into one `error: ...` line naming the file and line or the setting, exit 2;
any other exception is a bug and keeps its traceback."""

import json
import subprocess
import sys

import pytest

from parallel_r1 import check as response_format
from parallel_r1.cli import main
from parallel_r1.coldstart import TeacherError
from parallel_r1.config import ConfigError

MODEL = "{name_or_path: tiny, tiny: {hidden_size: 64, num_layers: 2, num_heads: 4, intermediate_size: 128}}"
SFT_RECIPE = """
name: sft
logging: {{progress: false}}
stages:
  - name: sft
    kind: sft
    model: {model}
    data: {{source: {source}, prompt: question}}
    max_steps: 1
    sft: {{batch_size: 2}}
"""


def _error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def _sft_data(tmp_path):
    good = {"question": "1 + 1?", "response": "Final Answer: 2", "answer": "2"}
    path = tmp_path / "cold.jsonl"
    path.write_text(json.dumps(good) + "\n" + '{"question": "2 + 2?", "resp\n' + json.dumps(good) + "\n")
    return path


def test_train_with_a_malformed_jsonl_line(tmp_path, capsys):
    config = tmp_path / "recipe.yaml"
    config.write_text(SFT_RECIPE.format(model=MODEL, source=_sft_data(tmp_path)))
    argv = ["train", "--config", str(config), "--run-dir", str(tmp_path / "run")]
    assert main(argv) == 2
    assert f"{tmp_path / 'cold.jsonl'}:2: not valid JSON" in _error(capsys)
    with pytest.raises(ValueError, match="cold.jsonl:2"):
        main(["--debug", *argv])


def test_train_with_a_bad_recipe_names_file_line_and_setting(tmp_path, capsys):
    config = tmp_path / "recipe.yaml"
    config.write_text(SFT_RECIPE.format(model=MODEL, source="task").replace("batch_size: 2", "batch_sise: 2"))
    assert main(["train", "--config", str(config)]) == 2
    line = _error(capsys)
    assert f"{config}:10:" in line and "'batch_sise'" in line and "did you mean 'batch_size'" in line
    assert main(["train", "--set", "stages.0.grpo.n=1"]) == 2
    assert "stages[0]" in _error(capsys)


def test_eval_generate_view_and_analyze_with_missing_inputs(tmp_path, capsys):
    missing = tmp_path / "missing.jsonl"
    assert main(["eval", "--model", "tiny", "--benchmarks", f"gsm8k={missing}"]) == 2
    assert str(missing) in _error(capsys)
    assert main(["eval", "--model", "tiny", "--template", "nope"]) == 2
    assert "--template nope" in _error(capsys)
    assert main(["generate", "--model", str(tmp_path / "no-model"), "--prompt", "hi"]) == 2
    assert f"{tmp_path / 'no-model'} does not exist" in _error(capsys)
    assert main(["generate", "--model", "tiny", "--prompt", "hi", "--num-paths", "1"]) == 2
    assert "num_paths must be >= 2" in _error(capsys)
    for command in ("view", "analyze"):
        assert main([command, str(missing)]) == 2
        assert str(missing) in _error(capsys)


def test_a_teacher_server_that_does_not_answer(tmp_path, capsys):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dataset = tmp_path / "problems.jsonl"
    dataset.write_text(json.dumps({"question": "1 + 1?", "answer": "2"}) + "\n")
    argv = ["data", "generate", "--teacher-url", f"http://127.0.0.1:{port}", "--model", "teacher"]
    argv += ["--dataset", str(dataset), "--out", str(tmp_path / "out.jsonl"), "--retries", "0", "--timeout", "2"]
    assert main(argv) == 2
    assert "every request to the teacher failed" in _error(capsys)


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (ValueError("a plain ValueError from deep in the code"), 1),
        (KeyError("missing"), 1),
        (ModuleNotFoundError("No module named 'parallel_r1.gone'", name="parallel_r1.gone"), 1),
        (ConfigError("recipe.yaml:3: lr must be > 0"), 2),
        (FileNotFoundError("data.jsonl: no such file"), 2),
        (TeacherError("every request to the teacher failed"), 2),
        (ModuleNotFoundError("No module named 'wandb'", name="wandb"), 2),
    ],
)
def test_only_input_errors_are_one_line_and_bugs_keep_their_traceback(tmp_path, capsys, monkeypatch, error, status):
    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(response_format, "check_file", fail)
    assert main(["check", str(tmp_path / "any.jsonl")]) == status
    if status == 2:
        assert _error(capsys) == f"error: {error}"
        return
    err = capsys.readouterr().err
    assert "Traceback" in err and type(error).__name__ in err
    assert err.strip().splitlines()[-1].startswith("internal error: a bug in parallel-r1")
    with pytest.raises(type(error)):
        main(["--debug", "check", str(tmp_path / "any.jsonl")])


def test_commands_that_need_no_model_start_without_torch(tmp_path):
    records = tmp_path / "r.jsonl"
    records.write_text(json.dumps({"response": "Final Answer: 2"}) + "\n")
    code = (
        "import sys; from parallel_r1.cli import build_parser, main; build_parser(); "
        f"main(['check', {str(records)!r}]); import parallel_r1.viewer, parallel_r1.analysis; "
        "print(sorted(m for m in ('torch', 'transformers', 'datasets', 'parallel_r1.engine') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"
