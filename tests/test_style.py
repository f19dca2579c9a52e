"""The layout belongs to the formatter, the shape to a few rules, and the size is counted where the artifact
counts it.

There is no line cap: a line count measures layout, which `ruff format` owns, while the artifact pays for
the packed script (comments and docstrings stripped, brotli-compressed). The shape: ruff's complexity, branch,
argument and statement limits and no named lambdas (ruff.toml), and two rules ruff has no check for, held on
the AST: no conditional expression inside another, and no tuple of three or more names bound from a tuple of
values (`a, b, c = x, y, z`: one statement per name reads and diffs better). These tests hold all of it."""

import ast
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


def test_the_minified_program_is_the_source_program():
    """minified_code renames locals and re-spaces ast.unparse's output by tokens: compiled, it is the source's
    program (bytecode, constants, global and attribute names), docstrings and knob help aside; on this Python it
    is the re-spaced text, not the plain unparse it falls back to, and most functions' locals are renamed."""
    from conftest import tg

    source = (REPO / "train_gpt.py").read_text()
    minified = tg.minified_code(source)
    stripped = tg.without_docstrings(ast.parse(source))
    unparsed = ast.unparse(stripped)
    assert len(minified) < 0.9 * len(unparsed)
    assert tg.code_shape(compile(minified, "m", "exec")) == tg.code_shape(compile(unparsed, "s", "exec"))
    assert "\n    " not in minified.split("class ", 1)[1][:200]  # one space per level
    scaled = minified.split("def scaled_plan(plan,factor):", 1)[1].split("def ", 1)[0]
    assert "*factor" in scaled and "(b,k)" not in scaled  # parameters keep their names, locals do not


def test_functions_keep_the_shape_rules():
    result = subprocess.run([*ruff(), "check", *FORMATTED], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, f"ruff check {' '.join(FORMATTED)} (ruff.toml's [lint]):\n{result.stdout}"


def shape_breaks(source: str) -> list[str]:
    """Nested conditional expressions and tuple-packed assignments of 3+ names, by line."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.IfExp) and any(
            isinstance(n, ast.IfExp) for part in (node.body, node.orelse, node.test) for n in ast.walk(part)
        ):
            found.append(f"{node.lineno}: a conditional expression inside another (write an if statement)")
        if (
            isinstance(node, ast.Assign)
            and isinstance(node.targets[0], ast.Tuple)
            and len(node.targets[0].elts) >= 3
            and isinstance(node.value, ast.Tuple)
        ):
            found.append(
                f"{node.lineno}: {len(node.targets[0].elts)} names bound from a tuple (one per line)"
            )
    return sorted(found, key=lambda line: int(line.split(":")[0]))


def test_no_nested_conditional_expressions_and_no_wide_tuple_packing():
    assert shape_breaks("a = 1 if x else 2 if y else 3\nb, c, d = 1, 2, 3\ne, f = 1, 2\ng, h, i = t\n") == [
        "1: a conditional expression inside another (write an if statement)",
        "2: 3 names bound from a tuple (one per line)",
    ]
    for path in ["train_gpt.py", *sorted(str(p.relative_to(REPO)) for p in (REPO / "tools").glob("*.py"))]:
        breaks = shape_breaks((REPO / path).read_text())
        assert not breaks, f"{path}:\n" + "\n".join(breaks)
