#!/usr/bin/env python3
"""Side by side with the March record's own code at equal config (issue 27): as good and as fast?

  python3 tools/bench_anchor.py                          # 300 steps, seeds 1337 42 (~25 min on 2 cores)
  python3 tools/bench_anchor.py --steps 100 --seeds 1337 # a short check
  python3 tools/bench_anchor.py --table-only --out DIR   # the table of an earlier run's logs
  python3 tools/bench_anchor.py --profile --seeds 1337   # both sides' training steps under torch.profiler

Runs the shared anchor's r23_side_by_side.sh (the record's script ported to CPU by its r23_cpu_port.py, and
this checkout's train_gpt.py, on one laptop-scale config: same data, seeds and step count), then reads both
sides' logs and prints, per side (mean over seeds) and as ours - record: params, raw val_bpb at the last step,
post-EMA val_bpb, int6 round trip, int6 sliding window, ms/step; per-seed figures and the means go to JSON.
With --profile, both sides run through tools/profile_step.py (same config, same schedule, stopped after
the profiled steps): the table lists the ops with the most self CPU time per step on either side, side by side.
The anchor is a comparator only: nothing of its code is imported or copied here, it runs as a subprocess.
Run it alone on the machine (two runs at once distort ms/step); CPU ms/step is noisy, never a speed claim
from one run. Needs data/datasets/pdmix_sp1024 (built with data/prepare_data.py --if-missing when missing).
"""

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SIDES = ("r23", "ours")
LIKE_FOR_LIKE = "NUM_HEADS=2 NUM_KV_HEADS=1 VE_DIM=128"  # anchors/README.md: equal params (936,332) on both
# What each side logs, as the last match in its log (both scripts print these lines in the same format).
PATTERNS = {
    "params": r"model_params:(\d+)",
    "raw": r"^step:(\d+)/\1 val_loss:\S+ val_bpb:([0-9.]+)",  # the last step's, not a step-0 score
    "post_ema": r"DIAGNOSTIC post_\w+ val_loss:\S+ val_bpb:([0-9.]+)",
    "int6": r"final_int6_roundtrip_exact val_loss:\S+ val_bpb:([0-9.]+)",
    "sliding": r"final_int6_sliding_window_exact val_loss:\S+ val_bpb:([0-9.]+)",
    "ms_step": r"step_avg:([0-9.]+)ms",
}
COLUMNS = [
    ("params", "params", "{:.0f}"),
    ("raw", "raw bpb", "{:.4f}"),
    ("post_ema", "post-EMA", "{:.4f}"),
    ("int6", "int6 rt", "{:.4f}"),
    ("sliding", "sliding", "{:.4f}"),
    ("ms_step", "ms/step", "{:.1f}"),
]


def parse_log(path: Path) -> dict:
    text = path.read_text(errors="replace")
    out = {}
    for key, pattern in PATTERNS.items():
        found = [m.groups()[-1] for m in re.finditer(pattern, text, re.MULTILINE)]
        out[key] = float(found[-1]) if found else math.nan
    return out


def collect(outdir: Path) -> dict:
    """{side: {seed: figures}} from OUTDIR/{r23,ours}_seed*.txt (the side by side's log names)."""
    runs = {}
    for side in SIDES:
        for log in sorted(outdir.glob(f"{side}_seed*.txt")):
            runs.setdefault(side, {})[log.stem.split("_seed", 1)[1]] = parse_log(log)
    return runs


def mean(values: list[float]) -> float:
    values = [v for v in values if not math.isnan(v)]
    return statistics.mean(values) if values else math.nan


def summarize(runs: dict) -> dict:
    means = {
        side: {k: mean([r[k] for r in seeds.values()]) for k in PATTERNS} for side, seeds in runs.items()
    }
    summary = {"per_seed": runs, "mean": means}
    if all(side in means for side in SIDES):
        summary["diff"] = {k: means["ours"][k] - means["r23"][k] for k in PATTERNS}
        paired = sorted(set(runs["r23"]) & set(runs["ours"]))
        summary["diff_per_seed"] = {
            s: {k: runs["ours"][s][k] - runs["r23"][s][k] for k in PATTERNS} for s in paired
        }
    return summary


def finite(obj):
    """NaN (a figure a log lacks) as null: JSON has no NaN."""
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    return None if isinstance(obj, float) and math.isnan(obj) else obj


def table(summary: dict) -> str:
    def fmt(spec, v):
        return "nan" if math.isnan(v) else spec.format(v)

    width = 10
    lines = [f"{'':12}" + "".join(f"{title:>{width}}" for _, title, _ in COLUMNS) + "   (mean over seeds)"]
    for side, m in summary["mean"].items():
        n = len(summary["per_seed"][side])
        label = {"r23": "record", "ours": "ours"}[side]
        lines.append(
            f"{label:12}" + "".join(f"{fmt(spec, m[k]):>{width}}" for k, _, spec in COLUMNS) + f"   n={n}"
        )
    if "diff" in summary:

        def signed(spec, v):
            if math.isnan(v):
                return "nan"
            return ("+" if v >= 0 else "") + spec.format(v)

        d = summary["diff"]
        lines.append(
            f"{'ours-record':12}" + "".join(f"{signed(spec, d[k]):>{width}}" for k, _, spec in COLUMNS)
        )
        for seed, ds in summary["diff_per_seed"].items():
            lines.append(
                f"{'  seed ' + seed:12}"
                + "".join(f"{signed(spec, ds[k]):>{width}}" for k, _, spec in COLUMNS)
            )
    return "\n".join(lines)


def profile_wrapper(outdir: Path, python: str) -> Path:
    """A stand-in for SBS_PY that runs each side's train_gpt.py through tools/profile_step.py."""
    wrapper = outdir / "profile_python.sh"
    wrapper.write_text(f'#!/bin/sh\nexec "{python}" "{REPO / "tools" / "profile_step.py"}" "$@"\n')
    wrapper.chmod(0o755)
    return wrapper


def profile_table(outdir: Path, top: int) -> str:
    """The ops with the most self CPU ms per step on either side (mean over seeds), record beside ours."""
    sides = {}
    for side in SIDES:
        runs = [json.loads(p.read_text()) for p in sorted(outdir.glob(f"sbs_{side}_*.json"))]
        if runs:
            sides[side] = runs
    if set(sides) != set(SIDES):
        return f"no profiles of both sides in {outdir}"

    def per_op(side: str, key: str) -> dict:
        names = {name for run in sides[side] for name in run["ops"]}
        return {n: mean([run["ops"].get(n, {}).get(key, 0.0) for run in sides[side]]) for n in names}

    ms = {side: per_op(side, "self_ms_per_step") for side in SIDES}
    calls = {side: per_op(side, "calls_per_step") for side in SIDES}
    names = sorted(
        set(ms["r23"]) | set(ms["ours"]), key=lambda n: -max(ms["r23"].get(n, 0), ms["ours"].get(n, 0))
    )
    lines = [f"{'op (self CPU ms/step)':40}{'record':>10}{'ours':>10}{'ours-rec':>10}{'calls r/o':>14}"]
    for n in names[:top]:
        r, o = ms["r23"].get(n, 0.0), ms["ours"].get(n, 0.0)
        c = f"{calls['r23'].get(n, 0):.0f}/{calls['ours'].get(n, 0):.0f}"
        lines.append(f"{n[:39]:40}{r:10.1f}{o:10.1f}{o - r:+10.1f}{c:>14}")
    for key, title in (
        ("self_ms_per_step", "all ops (profiled)"),
        ("unprofiled_wall_ms_per_step", "wall, unprofiled"),
    ):
        r, o = (mean([run[key] for run in sides[side]]) for side in SIDES)
        lines.append(f"{title:40}{r:10.1f}{o:10.1f}{o - r:+10.1f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--anchor", type=Path, default=REPO.parent / "shared" / "anchors", help="the shared anchors"
    )
    p.add_argument("--record", type=Path, help="the record's script (default: ANCHOR/r23_train_gpt.py)")
    p.add_argument("--out", type=Path, default=Path("/tmp/bench_anchor"), help="logs of both sides go here")
    p.add_argument("--steps", type=int, default=300, help="training steps of each run (no wallclock cap)")
    p.add_argument("--seeds", type=int, nargs="+", default=[1337, 42])
    p.add_argument("--extra", default=LIKE_FOR_LIKE, help="KEY=VALUE ... for both sides (SBS_EXTRA)")
    p.add_argument(
        "--python", default=str(REPO / ".venv" / "bin" / "python"), help="the Python of both sides"
    )
    p.add_argument("--json", type=Path, help="write the figures here (default: OUT/bench_anchor.json)")
    p.add_argument("--table-only", action="store_true", help="no runs: the table of the logs already in OUT")
    p.add_argument("--profile", action="store_true", help="profile both sides' training steps instead")
    p.add_argument("--top", type=int, default=20, help="ops in the --profile table")
    args = p.parse_args(argv)
    script, record = args.anchor / "r23_side_by_side.sh", args.record or args.anchor / "r23_train_gpt.py"
    if not args.table_only:
        for path in (script, record, args.anchor / "sbs_table.py"):
            if not path.is_file():
                p.error(f"{path} not found (--anchor: the shared anchors folder)")
        if not (REPO / "data" / "datasets" / "pdmix_sp1024").is_dir():
            prepare = [args.python, str(REPO / "data" / "prepare_data.py"), "--if-missing"]
            subprocess.run(prepare, cwd=REPO, check=True)
        args.out.mkdir(parents=True, exist_ok=True)
        for side in SIDES:  # stale logs of other seeds would join the means
            for log in args.out.glob(f"{side}_seed*.txt"):
                log.unlink()
        env = {**os.environ, "SBS_EXTRA": args.extra, "SBS_PY": args.python}
        if args.profile:
            for stale in args.out.glob("sbs_*.json"):
                stale.unlink()
            env.update(SBS_PY=str(profile_wrapper(args.out, args.python)), PROFILE_OUT=str(args.out))
        cmd = ["bash", str(script), str(REPO), str(record), str(args.out), str(args.steps)]
        cmd += [str(s) for s in args.seeds]
        print("+ SBS_EXTRA=" + repr(args.extra) + " " + " ".join(cmd), flush=True)
        subprocess.run(
            cmd, env=env, check=not args.profile
        )  # prints each run's rc, then the anchor's own table
    if args.profile:
        print()
        print(profile_table(args.out, args.top))
        return 0
    runs = collect(args.out)
    if not runs:
        print(f"no side-by-side logs in {args.out}", file=sys.stderr)
        return 1
    summary = summarize(runs)
    print()
    print(table(summary))
    summary["config"] = {
        "steps": None if args.table_only else args.steps,
        "seeds": sorted({int(s) for seeds in runs.values() for s in seeds}),
        "extra": args.extra,
        "anchor": str(args.anchor),
        "out": str(args.out),
    }
    path = args.json or args.out / "bench_anchor.json"
    path.write_text(json.dumps(finite(summary), indent=1) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
