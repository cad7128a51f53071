"""CI must run exactly the README's test command, so a green CI means the documented set-up works."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _commands(readme: str) -> list[str]:
    return [line.strip() for line in readme.splitlines() if line.startswith("    python3 -m venv .venv")]


def test_ci_runs_the_readme_test_command():
    commands = _commands((ROOT / "README.md").read_text())
    assert len(commands) == 2, "the README must show exactly two set-up commands"
    run, test = commands
    assert run.endswith("parallel-r1 run") and "pytest" in test
    assert test in (ROOT / ".ci" / "run").read_text().splitlines()
