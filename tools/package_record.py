#!/usr/bin/env python3
"""Write a records/ submission folder from aggregated runs, and verify folders.

  python3 tools/package_record.py --submission submission.json --runs logs/s1.json logs/s2.json logs/s3.json \\
      --out records/track_10min_16mb/2026-11-22_MyStack [--raw]
  python3 tools/package_record.py --verify records/track_10min_16mb/2026-11-22_MyStack

The folder holds README.md (generated), submission.json, train_gpt.py (the self-extracting packed form,
which the runs' budget counted by default; with --raw the readable source, for runs with CODE_SHIPPED=raw) and train_seed{S}.log for every seed. Verification
(run after writing, and on its own with --verify) rejects a folder with a missing file, a log whose
embedded source is not the shipped script (or, packed, not the program it packs: the same bytecode,
local names aside), a seed without a log, or bytes_model + bytes of train_gpt.py over 16,000,000.
"""

import argparse
import hashlib
import json
import shutil
import sys
from pathlib import Path

from pack_script import same_program

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from train_gpt import PACKED_PREFIX, RULE_BYTES, packed_code  # noqa: E402

REQUIRED_FIELDS = (
    "name",
    "author",
    "github_id",
    "blurb",
    "date",
    "val_loss",
    "val_bpb",
    "bytes_total",
    "bytes_code",
    "bytes_model",
    "seeds",
    "seed_results",
    "code_sha256",
)


class Rejected(Exception):
    pass


def verify(folder: Path) -> dict:
    for name in ("README.md", "submission.json", "train_gpt.py"):
        if not (folder / name).is_file():
            raise Rejected(f"{folder}: missing {name}")
    sub = json.loads((folder / "submission.json").read_text())
    missing = [f for f in REQUIRED_FIELDS if f not in sub]
    if missing:
        raise Rejected(f"{folder}/submission.json: missing fields {missing}")
    script = (folder / "train_gpt.py").read_text()
    forms = [script]
    first = folder / f"train_seed{sub['seeds'][0]}.log" if sub["seeds"] else None
    if script.startswith(PACKED_PREFIX) and first and first.is_file():
        forms.append(first.read_text().partition("\n" + "=" * 100 + "\n")[0])  # the source its log embeds
    ran = [f for f in forms if hashlib.sha256(f.encode()).hexdigest() == sub["code_sha256"]]
    if not ran:  # the runs may have executed the readable source or the packed file itself
        raise Rejected(
            f"{folder}/train_gpt.py is not the code the runs used (sha256 differs from code_sha256)"
        )
    if ran[0] is not script and not same_program(script, ran[0]):
        raise Rejected(
            f"{folder}/train_gpt.py does not pack the code the runs used (its bytecode differs "
            "beyond local names); re-run tools/package_record.py"
        )
    code_bytes = len(script.encode())
    if sub["bytes_code"] != code_bytes or sub["bytes_total"] != sub["bytes_model"] + code_bytes:
        raise Rejected(f"{folder}: bytes_code/bytes_total do not match the {code_bytes}-byte train_gpt.py")
    if sub["bytes_total"] > RULE_BYTES:
        raise Rejected(
            f"{folder}: {sub['bytes_total']} bytes > {RULE_BYTES} (model {sub['bytes_model']} + code {code_bytes})"
        )
    for seed in sub["seeds"]:
        log = folder / f"train_seed{seed}.log"
        if not log.is_file():
            raise Rejected(f"{folder}: no log for seed {seed} ({log.name})")
        if not log.read_text().startswith(ran[0]):
            raise Rejected(f"{log}: its embedded source is not the shipped train_gpt.py")
    return sub


def readme(sub: dict, packed: bool) -> str:
    rows = "\n".join(
        f"| {seed} | {r['val_loss']:.5f} | {r['val_bpb']:.5f} |" for seed, r in sub["seed_results"].items()
    )
    sig = sub.get("significance")
    verdict = "significant" if sig and sig["beats_sota"] else "NOT significant"
    sig_line = (
        (
            f"\n{sig['test']} test against SOTA val_loss {sig['sota_val_loss']:.5f} - {sig['margin_nats']} nats: "
            f"t = {sig['t']:.3f}, df = {sig['df']:.1f}, p = {sig['p_value']:.3g} "
            f"({verdict} at {sig['alpha']}).\n"
        )
        if sig
        else ""
    )
    return f"""# {sub["name"]}

{sub["blurb"]}

**val_bpb {sub["val_bpb"]:.5f}** (mean of {len(sub["seeds"])} seeds, std {sub["val_bpb_std"]:.5f}; final stage:
{sub["final_stage"]}), val_loss {sub["val_loss"]:.5f} nats. Artifact: {sub["bytes_model"]:,} model bytes +
{sub["bytes_code"]:,} code bytes{" (packed train_gpt.py)" if packed else ""} = **{sub["bytes_total"]:,} bytes**.
Training {sub["wallclock_seconds"]:.1f} s, evaluation {sub["eval_time_seconds"]:.1f} s (longest seed), on {sub["hardware"]}
(torch {sub["torch"]}). Data: `{sub["data"]}`.

| seed | val_loss | val_bpb |
|---|---|---|
{rows}
{sig_line}
Reproduce each seed (the configuration is in the hyperparameters line of every log):
```bash
SEED=<seed> torchrun --standalone --nproc_per_node=8 train_gpt.py
```
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--submission", type=Path)
    p.add_argument("--runs", nargs="*", type=Path, default=[], help="the runs' logs/{RUN_ID}.json summaries")
    p.add_argument("--out", type=Path)
    p.add_argument("--raw", action="store_true", help="ship the readable source (runs with CODE_SHIPPED=raw)")
    p.add_argument("--verify", type=Path, help="only verify this folder")
    args = p.parse_args()
    try:
        if args.verify:
            sub = verify(args.verify)
        else:
            if not (args.submission and args.runs and args.out):
                p.error("--submission, --runs and --out are required to write a folder")
            sub = json.loads(args.submission.read_text())
            summaries = [json.loads(r.read_text()) for r in args.runs]
            if sorted(s["seed"] for s in summaries) != sorted(sub["seeds"]):
                raise Rejected(
                    f"the runs' seeds {[s['seed'] for s in summaries]} are not the submission's {sub['seeds']}"
                )
            source = (REPO / "train_gpt.py").read_text()
            script = source if args.raw else packed_code(source)
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "train_gpt.py").write_text(script)
            for run, summary in zip(args.runs, summaries):
                shutil.copyfile(run.with_suffix(".txt"), args.out / f"train_seed{summary['seed']}.log")
            sub = dict(
                sub, bytes_code=len(script.encode()), bytes_total=sub["bytes_model"] + len(script.encode())
            )
            (args.out / "submission.json").write_text(json.dumps(sub, indent=2) + "\n")
            (args.out / "README.md").write_text(readme(sub, not args.raw))
            verify(args.out)
    except Rejected as e:
        sys.exit(f"rejected: {e}")
    print(f"ok: {args.verify or args.out}: val_bpb {sub['val_bpb']:.5f}, {sub['bytes_total']} bytes")


if __name__ == "__main__":
    main()
