#!/usr/bin/env python3
"""Plot a run's loss curve and its scores from a train_gpt.py log (needs matplotlib, optional).

  python3 tools/plot_curve.py logs/RUN.txt [more logs...] --out curve.png

Left: train_loss (and val_loss where logged) against step, in nats/token. Right: val_bpb at each
stage of the run: periodic validations, the averaged float model (DIAGNOSTIC), and the artifact's
roundtrip, sliding-window and legal-TTT scores.
"""

import argparse
import re
import sys
from pathlib import Path

STAGES = [
    ("DIAGNOSTIC", r"^DIAGNOSTIC post_\w+ val_loss:\S+ val_bpb:(\S+)"),
    ("roundtrip", r"^final_int\d+_roundtrip val_loss:\S+ val_bpb:(\S+)"),
    ("sliding", r"^final_int\d+_sliding_window val_loss:\S+ val_bpb:(\S+)"),
    ("legal TTT", r"^legal_ttt val_loss:\S+ val_bpb:(\S+)"),
]


def parse(text: str) -> dict:
    train = [(int(s), float(v)) for s, v in re.findall(r"^step:(\d+)/\d+ train_loss:(\S+)", text, re.M)]
    val = [
        (int(s), float(l), float(b))
        for s, l, b in re.findall(r"^step:(\d+)/\d+ val_loss:(\S+) val_bpb:(\S+)", text, re.M)
    ]
    stages = {name: float(m.group(1)) for name, pat in STAGES if (m := re.search(pat, text, re.M))}
    return dict(train=train, val=val, stages=stages)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("logs", nargs="+", type=Path)
    p.add_argument("--out", type=Path, default=Path("curve.png"))
    p.add_argument("--title", default="")
    args = p.parse_args()
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        sys.exit("plot_curve.py needs matplotlib: pip install matplotlib")
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for path in args.logs:
        run = parse(path.read_text())
        if not run["train"]:
            sys.exit(f"{path}: no 'step:N/M train_loss:' lines (is it a train_gpt.py log?)")
        steps, losses = zip(*run["train"])
        (line,) = left.plot(steps, losses, label=f"{path.stem} train")
        if run["val"]:
            left.plot(
                [v[0] for v in run["val"]],
                [v[1] for v in run["val"]],
                "o",
                color=line.get_color(),
                label=f"{path.stem} val",
            )
        names = list(run["stages"])
        right.plot(
            range(len(names)),
            [run["stages"][n] for n in names],
            "o-",
            color=line.get_color(),
            label=path.stem,
        )
        right.set_xticks(range(len(names)), names)
        for i, n in enumerate(names):
            right.annotate(
                f"{run['stages'][n]:.4f}",
                (i, run["stages"][n]),
                textcoords="offset points",
                xytext=(0, 6),
                ha="center",
                fontsize=8,
            )
    left.set(xlabel="step", ylabel="loss (nats/token)", title="training")
    right.set(ylabel="val_bpb", title="scores by stage")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if args.title:
        fig.suptitle(args.title)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
