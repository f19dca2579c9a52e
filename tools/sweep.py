#!/usr/bin/env python3
"""Run a grid of train_gpt.py configurations and seeds; resumable; a table with mean +- std per point
and a Welch test against a baseline point; one JSONL of results; a plot of score against a knob.

  python3 tools/sweep.py --base tools/cpu_scale.env --grid MATRIX_LR=0.02,0.025 --grid EMA_DECAY=0.9,0.95 \\
      --set MAX_WALLCLOCK_SECONDS=120 --seeds 1337,42 --out sweeps/lr_ema --nproc 1 \\
      --baseline MATRIX_LR=0.025 --baseline EMA_DECAY=0.9

Every point (base env file < --set < --grid values < SEED) is checked by train_gpt.py's own parser
before anything runs, so a misspelt knob or a bad value stops the sweep at once. Each point runs in
DIR/runs/<id>/ (its log, JSON summary and artifact stay there), <id> being a hash of its resolved
environment: a point already in DIR/results.jsonl is never run again, an interrupted one is rerun.
On a GPU node points run side by side, each pinned to --nproc GPUs (CUDA_VISIBLE_DEVICES); on a CPU
one at a time. The score is the run's final legal stage (TTT, else sliding, else round-trip).
"""

import argparse
import difflib
import hashlib
import itertools
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))
import train_gpt as tg  # noqa: E402
from benchlib import read_env_file  # noqa: E402
from submission import student_t_cdf  # noqa: E402

KNOBS = set(tg.knob_names())
PATH_KNOBS = ("DATA_PATH", "TOKENIZER_PATH", "EVAL_ONLY_ARTIFACT")


class SweepError(Exception):
    pass


def parse_assignment(text: str, flag: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise SweepError(f"{flag} {text!r}: expected KEY=VALUE")
    return key.strip(), value.strip()


def check_keys(keys, where: str) -> None:
    for key in keys:
        if key not in KNOBS:
            close = difflib.get_close_matches(key, sorted(KNOBS), n=1)
            raise SweepError(
                f"{where}: {key} is not a train_gpt.py knob"
                + (f" (did you mean {close[0]}?)" if close else "")
            )


def resolve_points(args) -> tuple[list[str], list[dict]]:
    """Every (grid point, seed) as a full environment; validated by train_gpt.py's parser."""
    base = read_env_file(args.base) if args.base else {}
    check_keys(base, str(args.base))
    fixed = dict(parse_assignment(s, "--set") for s in args.set)
    grid = [parse_assignment(g, "--grid") for g in args.grid]
    check_keys(list(fixed) + [k for k, _ in grid], "command line")
    if "SEED" in fixed or any(k == "SEED" for k, _ in grid):
        raise SweepError("give seeds with --seeds, not as a knob")
    defaults = tg.Hyperparameters().flat()
    for key in PATH_KNOBS:  # every point runs in its own folder: paths are resolved here, once
        value = fixed.get(key, base.get(key, defaults[key.lower()]))
        if value:
            fixed[key] = str(Path(value).resolve())
    grid_keys = [k for k, _ in grid]
    values = [[v for v in vs.split(",") if v] for _, vs in grid]
    if len(set(grid_keys)) != len(grid_keys) or any(not v for v in values):
        raise SweepError("each --grid KEY=v1,v2 needs a distinct KEY and at least one value")
    points = []
    for combo in itertools.product(*values):
        for seed in args.seeds:
            env = {**base, **fixed, **dict(zip(grid_keys, combo)), "SEED": str(seed)}
            try:
                tg.Hyperparameters.from_env(env)
            except tg.ConfigError as e:
                raise SweepError(f"point {dict(zip(grid_keys, combo))}: {e}") from None
            key = hashlib.sha256(json.dumps(env, sort_keys=True).encode()).hexdigest()[:12]
            points.append(dict(id=key, grid=dict(zip(grid_keys, combo)), seed=seed, env=env))
    return grid_keys, points


def load_results(path: Path) -> dict:
    results = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                results[r["id"]] = r
    return results


def gpu_count() -> int:
    smi = shutil.which("nvidia-smi")
    if not smi:
        return 0
    out = subprocess.run([smi, "-L"], capture_output=True, text=True).stdout
    return sum(line.startswith("GPU ") for line in out.splitlines())


def launch(point: dict, out: Path, nproc: int, gpus: list[int] | None) -> tuple[subprocess.Popen, Path]:
    run_dir = out / "runs" / point["id"]
    if run_dir.exists():  # an interrupted earlier attempt
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    env = {**os.environ, **point["env"], "RUN_ID": point["id"], "ARTIFACT_PATH": str(run_dir / "model.ptz")}
    if gpus is not None:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, gpus))
    script = str(REPO / "train_gpt.py")
    cmd = (
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", script]
        if nproc > 1
        else [sys.executable, script]
    )
    with open(run_dir / "stdout.txt", "w") as f:
        return subprocess.Popen(cmd, cwd=run_dir, env=env, stdout=f, stderr=subprocess.STDOUT), run_dir


def result_of(point: dict, run_dir: Path, returncode: int, seconds: float) -> dict:
    row = dict(
        id=point["id"],
        grid=point["grid"],
        seed=point["seed"],
        env=point["env"],
        returncode=returncode,
        wall_s=round(seconds, 1),
    )
    summary = run_dir / "logs" / f"{point['id']}.json"
    if returncode == 0 and summary.exists():
        s = json.loads(summary.read_text())
        row.update(
            status="ok",
            final_stage=s["final"]["stage"],
            val_loss=s["final"]["val_loss"],
            val_bpb=s["final"]["val_bpb"],
            bytes_total=(s.get("bytes") or {}).get("total"),
            train_ms=(s.get("train") or {}).get("train_ms"),
            eval_ms=s["eval"]["times_ms"]["total"],
            compliance={k: v["status"] for k, v in s["compliance"].items()},
        )
    else:
        tail = (run_dir / "stdout.txt").read_text()[-2000:] if (run_dir / "stdout.txt").exists() else ""
        row.update(status="failed", error=tail)
    return row


def run_points(points: list[dict], out: Path, nproc: int) -> None:
    results_path = out / "results.jsonl"
    done = load_results(results_path)
    todo = [p for p in points if done.get(p["id"], {}).get("status") != "ok"]
    print(
        f"sweep: {len(points)} runs, {len(points) - len(todo)} already done, {len(todo)} to run", flush=True
    )
    n_gpus = gpu_count()
    slots = (
        [list(range(i * nproc, (i + 1) * nproc)) for i in range(n_gpus // nproc)]
        if n_gpus >= nproc
        else [None]
    )
    free = list(slots)
    running = []
    t0 = time.time()
    finished = 0
    while todo or running:
        while todo and free:
            point, gpus = todo.pop(0), free.pop(0)
            proc, run_dir = launch(point, out, nproc, gpus)
            running.append((proc, run_dir, point, gpus, time.time()))
            print(
                f"sweep: start {point['id']} {point['grid']} seed={point['seed']}"
                + (f" on GPUs {gpus}" if gpus is not None else ""),
                flush=True,
            )
        time.sleep(0.5)
        for item in [r for r in running if r[0].poll() is not None]:
            proc, run_dir, point, gpus, started = item
            running.remove(item)
            free.append(gpus)
            row = result_of(point, run_dir, proc.returncode, time.time() - started)
            with open(results_path, "a") as f:
                f.write(json.dumps(row) + "\n")
            finished += 1
            elapsed = time.time() - t0
            eta = elapsed / finished * (len(todo) + len(running))
            score = (
                f"val_bpb {row['val_bpb']:.5f}" if row["status"] == "ok" else f"FAILED (rc {proc.returncode})"
            )
            print(
                f"sweep: [{finished}/{finished + len(todo) + len(running)}] {point['id']} {point['grid']} "
                f"seed={point['seed']}: {score}; {len(todo) + len(running)} left, elapsed {elapsed / 60:.1f} min, "
                f"eta {eta / 60:.1f} min",
                flush=True,
            )


def welch(a: list[float], b: list[float]) -> tuple[float, float] | None:
    """Two-sided Welch t-test of mean(a) != mean(b): (t, p), or None without 2 distinct runs each."""
    if len(a) < 2 or len(b) < 2:
        return None
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    if va + vb == 0:
        return None
    t = (statistics.fmean(a) - statistics.fmean(b)) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    return t, 2 * (1 - student_t_cdf(abs(t), df))


def table(grid_keys: list[str], points: list[dict], results: dict, baseline: dict | None) -> list[dict]:
    """One row per grid point over its seeds, sorted by mean val_bpb (lower is better)."""
    rows = {}
    for p in points:
        r = results.get(p["id"])
        if r and r["status"] == "ok":
            rows.setdefault(tuple(p["grid"].items()), []).append(r)
    base_runs = rows.get(tuple(baseline.items())) if baseline else None
    out = []
    for grid, runs in rows.items():
        bpb, nats = [r["val_bpb"] for r in runs], [r["val_loss"] for r in runs]
        row = dict(
            grid=dict(grid),
            seeds=len(runs),
            val_bpb=statistics.fmean(bpb),
            val_bpb_std=statistics.stdev(bpb) if len(bpb) > 1 else 0.0,
            val_loss=statistics.fmean(nats),
        )
        if base_runs is not None:
            row["delta_nats"] = row["val_loss"] - statistics.fmean(r["val_loss"] for r in base_runs)
            test = welch(nats, [r["val_loss"] for r in base_runs])
            row["welch_p"] = None if test is None or dict(grid) == baseline else test[1]
        out.append(row)
    return sorted(out, key=lambda r: r["val_bpb"])


def print_table(rows: list[dict], grid_keys: list[str], baseline: dict | None) -> None:
    head = (
        grid_keys
        + ["seeds", "val_bpb (mean ± std)", "val_loss"]
        + (["Δ nats vs baseline", "Welch p"] if baseline else [])
    )
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for r in rows:
        cells = [r["grid"][k] for k in grid_keys] + [
            str(r["seeds"]),
            f"{r['val_bpb']:.5f} ± {r['val_bpb_std']:.5f}",
            f"{r['val_loss']:.5f}",
        ]
        if baseline:
            p = r.get("welch_p")
            cells += [
                "baseline" if r["grid"] == baseline else f"{r['delta_nats']:+.5f}",
                "" if p is None else f"{p:.3g}",
            ]
        print("| " + " | ".join(cells) + " |")
    print("(Welch p: two-sided, on val_loss in nats over seeds; the record bar is 0.005 nats at p < 0.01)")


def plot(rows: list[dict], key: str, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("sweep: no plot (pip install matplotlib)")
        return
    others = sorted({tuple((k, v) for k, v in r["grid"].items() if k != key) for r in rows})
    fig, ax = plt.subplots(figsize=(6, 4))
    for rest in others:
        pts = sorted(
            (float(r["grid"][key]), r["val_bpb"], r["val_bpb_std"])
            for r in rows
            if tuple((k, v) for k, v in r["grid"].items() if k != key) == rest
        )
        ax.errorbar(
            [p[0] for p in pts],
            [p[1] for p in pts],
            yerr=[p[2] for p in pts],
            marker="o",
            capsize=3,
            label=", ".join(f"{k}={v}" for k, v in rest) or None,
        )
    ax.set_xlabel(key)
    ax.set_ylabel("val_bpb (mean ± std over seeds)")
    if any(others):
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"sweep: plot {path}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", type=Path, help="env file of KEY=VALUE lines (e.g. tools/cpu_scale.env)")
    p.add_argument("--grid", action="append", default=[], help="KEY=v1,v2,...: swept knob (repeatable)")
    p.add_argument("--set", action="append", default=[], help="KEY=value for every point (repeatable)")
    p.add_argument("--seeds", default="1337", help="comma-separated seeds, each run for every point")
    p.add_argument("--out", type=Path, required=True, help="sweep folder: results.jsonl, runs/, table, plot")
    p.add_argument("--nproc", type=int, default=1, help="processes (GPUs) per run")
    p.add_argument("--baseline", action="append", default=[], help="KEY=value naming the baseline grid point")
    p.add_argument("--plot", help="knob on the plot's x axis (default: the first numeric --grid knob)")
    p.add_argument("--dry-run", action="store_true", help="resolve and check every point, run nothing")
    args = p.parse_args()
    try:
        args.seeds = [int(s) for s in args.seeds.split(",") if s]
        grid_keys, points = resolve_points(args)
        given = dict(parse_assignment(b, "--baseline") for b in args.baseline)
        baseline = {k: given[k] for k in grid_keys if k in given} if given else None
        if baseline and (set(given) != set(grid_keys) or not any(pt["grid"] == baseline for pt in points)):
            raise SweepError(f"--baseline {baseline} is not a point of the grid {grid_keys}")
    except (SweepError, ValueError, OSError) as e:
        sys.exit(f"sweep: error: {e}")
    if args.dry_run:
        for pt in points:
            print(pt["id"], pt["grid"], f"seed={pt['seed']}")
        return
    args.out.mkdir(parents=True, exist_ok=True)
    run_points(points, args.out, args.nproc)
    rows = table(grid_keys, points, load_results(args.out / "results.jsonl"), baseline)
    (args.out / "table.json").write_text(json.dumps(rows, indent=1))
    print_table(rows, grid_keys, baseline)
    numeric = [k for k in grid_keys if all(_is_number(pt["grid"][k]) for pt in points)]
    key = args.plot or (numeric[0] if numeric else None)
    if key and rows:
        plot(rows, key, args.out / "plot.png")


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


if __name__ == "__main__":
    main()
