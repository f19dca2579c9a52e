"""The README stays true: its test command is what CI runs."""

from conftest import REPO


def test_ci_runs_the_readme_test_command():
    command = (REPO / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert command.startswith("python3 -m venv .venv") and "pytest" in command
    assert f"\n{command}\n" in (REPO / "README.md").read_text()
