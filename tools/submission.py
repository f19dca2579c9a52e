#!/usr/bin/env python3
"""Aggregate the runs of one configuration into submission.json, with the significance test.

  python3 tools/submission.py logs/seed1337.json logs/seed42.json logs/seed2025.json \\
      --name "My stack" --author "Ada" --github-id ada --blurb "what it does" \\
      --sota-val-loss 1.8893 [--sota-val-losses 1.889,1.890,1.888] --out submission.json

Reads the JSON summaries train_gpt.py writes next to each log. Refuses: runs whose configuration or
code differ (config_hash, code_sha256), repeated seeds, and any run with a compliance FAIL. The record
rule is to beat the SOTA by at least 0.005 nats (val_loss) at p < 0.01: with one SOTA number this is a
one-sided one-sample t-test of our mean against sota - 0.005; with the SOTA's per-seed losses it is a
one-sided Welch test. Pure stdlib.
"""

import argparse
import datetime
import json
import math
import statistics
import sys
from pathlib import Path


class Refused(Exception):
    pass


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularized incomplete beta function (modified Lentz)."""
    tiny = 1e-300
    c = 1.0
    d = 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    result = d
    for m in range(1, 500):
        for numerator in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            result *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return result


def regularized_beta(a: float, b: float, x: float) -> float:
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def student_t_cdf(t: float, df: float) -> float:
    tail = 0.5 * regularized_beta(df / 2.0, 0.5, df / (df + t * t))
    return tail if t < 0 else 1.0 - tail


def significance(ours: list[float], sota: list[float], margin: float) -> dict:
    """One-sided test of H1: mean(ours) < mean(sota) - margin (nats). One SOTA value: one-sample t."""
    n, mean = len(ours), statistics.fmean(ours)
    var = statistics.variance(ours) if n > 1 else 0.0
    target = statistics.fmean(sota) - margin
    if len(sota) == 1:
        se = math.sqrt(var / n)
        df = n - 1
        test = "one-sample t"
    else:
        va, vb = var / n, statistics.variance(sota) / len(sota)
        se, test = math.sqrt(va + vb), "Welch"
        own = va**2 / (n - 1) if n > 1 else 0
        df = (va + vb) ** 2 / (own + vb**2 / (len(sota) - 1)) if va + vb else 0
    if n < 2 or se == 0 or df <= 0:
        raise Refused(f"a t-test needs at least 2 runs with different losses (got {n})")
    t = (mean - target) / se
    return dict(
        test=test,
        mean_val_loss=mean,
        sota_val_loss=statistics.fmean(sota),
        margin_nats=margin,
        t=t,
        df=df,
        p_value=student_t_cdf(t, df),
    )


def load_runs(paths: list[Path]) -> list[dict]:
    runs = [json.loads(p.read_text()) for p in paths]
    for key in ("config_hash", "code_sha256"):
        values = {r[key] for r in runs}
        if len(values) > 1:
            raise Refused(
                f"runs differ in {key} ({', '.join(sorted(values))}): one submission is one configuration"
            )
    seeds = [r["seed"] for r in runs]
    if len(set(seeds)) != len(seeds):
        raise Refused(f"repeated seeds {seeds}")
    for path, run in zip(paths, runs):
        failed = [name for name, c in run["compliance"].items() if c["status"] == "FAIL"]
        if failed:
            raise Refused(f"{path}: compliance FAIL in {', '.join(failed)}")
    return runs


def build_submission(runs: list[dict], args) -> dict:
    finals = [r["final"] for r in runs]
    losses, bpbs = [f["val_loss"] for f in finals], [f["val_bpb"] for f in finals]
    bytes_ = [r["bytes"] for r in runs]
    sub = dict(
        name=args.name,
        author=args.author,
        github_id=args.github_id,
        blurb=args.blurb,
        date=args.date or datetime.date.today().isoformat(),
        val_loss=statistics.fmean(losses),
        val_bpb=statistics.fmean(bpbs),
        val_loss_std=statistics.stdev(losses) if len(runs) > 1 else 0.0,
        val_bpb_std=statistics.stdev(bpbs) if len(runs) > 1 else 0.0,
        seeds=[r["seed"] for r in runs],
        seed_results={
            str(r["seed"]): dict(val_loss=f["val_loss"], val_bpb=f["val_bpb"]) for r, f in zip(runs, finals)
        },
        pre_quant_val_loss=statistics.fmean(r["train"]["pre_quant"]["val_loss"] for r in runs),
        pre_quant_val_bpb=statistics.fmean(r["train"]["pre_quant"]["val_bpb"] for r in runs),
        step_stop=[r["train"]["steps"] for r in runs],
        wallclock_seconds=max(r["train"]["train_ms"] for r in runs) / 1000,
        eval_time_seconds=max(r["eval"]["times_ms"]["total"] for r in runs) / 1000,
        bytes_total=max(b["total"] for b in bytes_),
        bytes_code=bytes_[0]["code"],
        bytes_model=max(b["model"] for b in bytes_),
        final_stage=finals[0]["stage"],
        hardware=runs[0]["device"],
        torch=runs[0]["torch"],
        data=runs[0]["config"]["data_path"],
        config_hash=runs[0]["config_hash"],
        code_sha256=runs[0]["code_sha256"],
    )
    if args.sota_val_loss is not None or args.sota_val_losses:
        sota = (
            [float(v) for v in args.sota_val_losses.split(",")]
            if args.sota_val_losses
            else [args.sota_val_loss]
        )
        sig = significance(losses, sota, args.margin_nats)
        sig["alpha"], sig["beats_sota"] = args.alpha, sig["p_value"] < args.alpha
        sub["significance"] = sig
    return sub


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, help="logs/{RUN_ID}.json summaries, one per seed")
    p.add_argument("--name", required=True)
    p.add_argument("--author", required=True)
    p.add_argument("--github-id", required=True)
    p.add_argument("--blurb", required=True)
    p.add_argument("--date", help="ISO date (default today)")
    p.add_argument("--sota-val-loss", type=float, help="SOTA mean val_loss (nats/token)")
    p.add_argument("--sota-val-losses", help="SOTA per-seed val_loss values, comma-separated (Welch test)")
    p.add_argument("--margin-nats", type=float, default=0.005)
    p.add_argument("--alpha", type=float, default=0.01)
    p.add_argument("--out", type=Path, default=Path("submission.json"))
    args = p.parse_args()
    try:
        sub = build_submission(load_runs(args.runs), args)
    except Refused as e:
        sys.exit(f"refused: {e}")
    args.out.write_text(json.dumps(sub, indent=2) + "\n")
    line = (
        f"{args.out}: {len(sub['seeds'])} seeds, val_bpb {sub['val_bpb']:.5f} ± {sub['val_bpb_std']:.5f}, "
        f"val_loss {sub['val_loss']:.5f}, bytes_total {sub['bytes_total']}"
    )
    if "significance" in sub:
        s = sub["significance"]
        line += f"; {s['test']} p={s['p_value']:.4g} ({'beats' if s['beats_sota'] else 'does NOT beat'} SOTA by {s['margin_nats']} nats at p<{s['alpha']})"
    print(line)


if __name__ == "__main__":
    main()
