#!/usr/bin/env python3
"""Write the self-extracting form of train_gpt.py: the source minified (comments and docstrings dropped and
local variables renamed short, via ast), then brotli-11 + base85 inside a two-line exec wrapper.

The packed file runs exactly like the source (same env vars, same logs) but pays ~4x fewer code bytes
against the 16,000,000-byte cap. Checked here: compiled, the payload has the source's bytecode, constants,
global and attribute names (train_gpt.code_shape, the source without docstrings), so only comments,
docstrings, layout and the names of local variables differ. The wrapper format is
train_gpt.packed_code, the same function the script uses to count its shipped "Code size", so the logged
number is the size of what this tool writes.

  python3 tools/pack_script.py                         # train_gpt.py -> packed/train_gpt.py
  python3 tools/pack_script.py --input X.py --output Y.py
"""

import argparse
import ast
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from train_gpt import code_shape, decompress, packed_code, without_docstrings  # noqa: E402


def unpack(packed: str) -> str:
    """The (minified) source a packed file executes."""
    match = re.search(r'b85decode\("([^"]*)"\)', packed)
    if not match:
        raise ValueError("not a packed train_gpt.py (no b85 payload)")
    import base64

    return decompress(base64.b85decode(match.group(1)), "brotli").decode()


def same_program(packed: str, source: str) -> bool:
    """Whether a packed file runs source's program: compiled, its payload and source without docstrings have
    the same bytecode, constants, global and attribute names (the names of local variables may differ)."""
    plain = compile(ast.unparse(without_docstrings(ast.parse(source))), "source", "exec")
    return code_shape(compile(unpack(packed), "packed", "exec")) == code_shape(plain)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--input", type=Path, default=REPO / "train_gpt.py")
    parser.add_argument("--output", type=Path, default=REPO / "packed" / "train_gpt.py")
    args = parser.parse_args()
    source = args.input.read_text(encoding="utf-8")
    packed = packed_code(source)
    if not same_program(packed, source):
        sys.exit(
            "error: the packed form is not the source's program (its bytecode differs beyond local names)"
        )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(packed, encoding="utf-8")
    print(
        f"{args.input}: {len(source.encode())} raw bytes -> {args.output}: {len(packed.encode())} packed bytes "
        "(same bytecode, local names aside)"
    )


if __name__ == "__main__":
    main()
