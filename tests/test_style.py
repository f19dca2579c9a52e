"""The layout belongs to the formatter and the size is counted where the artifact counts it.

There is no line cap: a line count measures layout, which `ruff format` owns, while the artifact pays for
the packed script (comments and docstrings stripped, LZMA-compressed). These tests hold both rules."""

import shutil
import subprocess
import sys

import pytest
from conftest import REPO

FORMATTED = ["train_gpt.py", "tools", "tests", "data"]
PACKED_BYTES_LIMIT = 40_000


def ruff() -> list[str]:
    """The ruff of this venv (the README's test command installs the pinned one), else one on PATH."""
    beside = REPO / ".venv" / "bin" / "ruff"
    if beside.exists():
        return [str(beside)]
    if shutil.which("ruff"):
        return ["ruff"]
    try:
        import ruff as _  # noqa: F401
    except ImportError:
        pytest.fail("ruff is not installed: the README's test command installs ruff==0.17.6")
    return [sys.executable, "-m", "ruff"]


def test_the_formatter_owns_the_layout():
    result = subprocess.run(
        [*ruff(), "format", "--check", *FORMATTED], cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode == 0, f"run: ruff format {' '.join(FORMATTED)}\n{result.stdout}{result.stderr}"


def test_the_packed_script_fits_its_byte_budget():
    from conftest import tg

    source = (REPO / "train_gpt.py").read_text()
    packed = len(tg.packed_code(source).encode())
    assert packed <= PACKED_BYTES_LIMIT, f"packed train_gpt.py is {packed:,} bytes > {PACKED_BYTES_LIMIT:,}"
