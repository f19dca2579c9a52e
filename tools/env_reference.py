#!/usr/bin/env python3
"""Print (or write into README.md) the table of every environment variable train_gpt.py reads.

  python3 tools/env_reference.py            # print the markdown
  python3 tools/env_reference.py --write    # replace the README section between the env-reference markers

Generated from the Hyperparameters groups themselves (each group's title from its docstring; each knob's
name, default, allowed values and help from its field), so the README cannot drift from the code;
tests/test_readme.py checks that it is current.
"""

import argparse
import dataclasses
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


def group_title(group: type) -> str:
    """A group's README heading: its docstring up to the colon ("Data and run: ..." -> "data and run")."""
    title = (group.__doc__ or group.__name__).split(":")[0]
    return title[0].lower() + title[1:]


def default_text(f: dataclasses.Field) -> str:
    v = f.default
    if isinstance(v, tuple):
        return ",".join(str(x) for x in v) or '""'
    if isinstance(v, bool):
        return str(int(v))
    return '""' if v == "" else str(v)


def markdown() -> str:
    rows = []
    for _, group in tg.Hyperparameters.groups():
        rows.append(f"| **{group_title(group)}** | | |")
        for f in dataclasses.fields(group):
            lo, hi, choices = (f.metadata.get(k) for k in ("lo", "hi", "choices"))
            allowed = ""
            if choices:
                allowed = " (" + "/".join(choices) + ")"
            elif lo is not None:
                allowed = f" ({lo}..{'' if hi is None else hi})"
            help_text = f.metadata["help"].replace("|", "/")
            rows.append(f"| `{f.name.upper()}` | `{default_text(f)}`{allowed} | {help_text} |")
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
