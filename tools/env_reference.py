#!/usr/bin/env python3
"""Print (or write into README.md) the table of every environment variable train_gpt.py reads.

  python3 tools/env_reference.py            # print the markdown
  python3 tools/env_reference.py --write    # replace the README section between the env-reference markers

Generated from the Hyperparameters class itself (name, default, allowed values, the knob's help),
so the README cannot drift from the code; tests/test_readme.py checks that it is current.
"""

import argparse
import dataclasses
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import train_gpt as tg  # noqa: E402

START, END = "<!-- env-reference:start -->", "<!-- env-reference:end -->"
TORCHRUN = [
    ("RANK", "0", "this process's rank (set by torchrun)"),
    ("WORLD_SIZE", "1", "number of processes: 1, 2, 4 or 8 (set by torchrun)"),
    ("LOCAL_RANK", "0", "GPU index on this node (set by torchrun)"),
]


def fields_with_comments() -> list[tuple[str, str, str]]:
    """(group, field name, help) in source order: the help from each knob's metadata, the group from the
    comment line above each group of fields in the Hyperparameters class body."""
    source = (REPO / "train_gpt.py").read_text()
    body = source[source.index("class Hyperparameters:") : source.index("    @classmethod")]
    helps = {f.name: f.metadata["help"] for f in dataclasses.fields(tg.Hyperparameters)}
    out, group = [], ""
    for line in body.splitlines():
        if m := re.match(r"    # (.+)$", line):
            group = m.group(1)
        elif m := re.match(r"    (\w+): ", line):
            out.append((group, m.group(1), helps[m.group(1)]))
    return out


def default_text(f: dataclasses.Field) -> str:
    v = f.default
    if isinstance(v, tuple):
        return ",".join(str(x) for x in v) or '""'
    if isinstance(v, bool):
        return str(int(v))
    return '""' if v == "" else str(v)


def markdown() -> str:
    fields = {f.name: f for f in dataclasses.fields(tg.Hyperparameters)}
    rows, group = [], None
    for g, name, comment in fields_with_comments():
        if g != group:
            rows.append(f"| **{g}** | | |")
            group = g
        f = fields[name]
        lo, hi, choices = (f.metadata.get(k) for k in ("lo", "hi", "choices"))
        allowed = ""
        if choices:
            allowed = " (" + "/".join(choices) + ")"
        elif lo is not None:
            allowed = f" ({lo}..{'' if hi is None else hi})"
        rows.append(f"| `{name.upper()}` | `{default_text(f)}`{allowed} | {comment.replace('|', '/')} |")
    rows.append("| **distributed** | | |")
    rows += [f"| `{n}` | `{d}` | {c} |" for n, d, c in TORCHRUN]
    return "| variable | default (allowed) | meaning |\n|---|---|---|\n" + "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--write", action="store_true")
    args = p.parse_args()
    table = markdown()
    if not args.write:
        print(table)
        return
    readme = (REPO / "README.md").read_text()
    if START not in readme or END not in readme:
        sys.exit(f"README.md has no {START} ... {END} section")
    head, rest = readme.split(START, 1)
    (REPO / "README.md").write_text(head + START + "\n" + table + "\n" + END + rest.split(END, 1)[1])
    print("README.md env reference updated")


if __name__ == "__main__":
    main()
