"""The README stays true: its test command is what CI runs."""

from conftest import REPO


def test_ci_runs_the_readme_test_command():
    command = (REPO / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert command.startswith("python3 -m venv .venv") and "pytest" in command
    assert f"\n{command}\n" in (REPO / "README.md").read_text()


def test_env_reference_is_current_and_complete():
    import inspect
    import re
    import sys

    sys.path.insert(0, str(REPO / "tools"))
    import env_reference
    from conftest import tg

    readme = (REPO / "README.md").read_text()
    section = readme.split(env_reference.START)[1].split(env_reference.END)[0].strip()
    assert section == env_reference.markdown(), "run: python3 tools/env_reference.py --write"
    read = set(tg.knob_names())
    read |= set(re.findall(r'"([A-Z][A-Z_]+)"', inspect.getsource(tg.parse_dist_env)))
    assert {"RANK", "WORLD_SIZE", "LOCAL_RANK"} <= read
    source = (REPO / "train_gpt.py").read_text()
    # only main() reads the environment and hands it on; setup_runtime only points inductor's cache dir
    assert len(re.findall(r'os\.environ(?!\["TORCHINDUCTOR_CACHE_DIR"\] = )', source)) == 1
    for name in read:
        assert f"| `{name}` |" in section, name
