#!/usr/bin/env python3
"""The frontier's evaluation at CPU scale: sliding window + chunk TTT against document attention + LoRA
TTT and phased LoRA TTT, on the embedded corpus (documents start at BOS).

  python3 tools/bench_eval.py                     # ~20 min on 2 cores; prints a markdown table
  python3 tools/bench_eval.py --only doc_lora --set TTT_LORA_LR=3e-4

Two models are trained once on the same token budget (causal attention, and DOC_ATTENTION=1: a
model-shaping switch, so each evaluation uses the model trained with it), their float weights saved;
each row then re-exports one of them (EXPORT_FROM: same artifact, no training) and runs the timed
evaluation it names on the first --val-tokens of the val split. Columns: the artifact's
non-overlapping (roundtrip) bpb, the sliding-window bpb when that pass runs, the TTT bpb, the TTT pass's
and the whole eval's seconds, and what LoRA TTT's budget guard let run. CPU seconds are not GPU seconds:
compare rows with each other, not with 8xH100 eval times.
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

from benchlib import REPO, markdown_table, run_train, token_budget_base

MODELS = {"causal": {}, "doc": dict(DOC_ATTENTION=1)}
ROWS = {  # name: (model, eval settings)
    "sliding_chunk_ttt": ("causal", dict(TTT_MODE="chunk")),
    "doc_sliding_chunk_ttt": ("doc", dict(TTT_MODE="chunk")),
    "lora": ("causal", dict(TTT_MODE="lora", EVAL_SLIDING=0)),
    "doc_lora": ("doc", dict(TTT_MODE="lora", EVAL_SLIDING=0)),
    "doc_phased": ("doc", dict(TTT_MODE="phased", EVAL_SLIDING=0)),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=1_500_000, help="training tokens per model")
    p.add_argument("--val-tokens", type=int, default=131072)
    p.add_argument("--only", help="comma-separated row names")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every eval")
    p.add_argument("--json", type=Path, default=REPO / "results" / "bench_eval.json")
    args = p.parse_args()
    # a LoRA batch is TTT_DOCS_PER_BATCH rows however many documents are left in it: 8, not the record's
    # 64, so that a few hundred documents do not spend a CPU's time on padding rows
    base = {**token_budget_base(args), "EVAL_BUDGET_SECONDS": 3000, "TTT_DOCS_PER_BATCH": 8}
    names = args.only.split(",") if args.only else list(ROWS)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in sorted({ROWS[n][0] for n in names}):  # train once, no eval: the rows score it
            run_train(
                {
                    **base,
                    **MODELS[model],
                    "RUN_ID": f"train_{model}",
                    "ARTIFACT_PATH": f"{tmp}/{model}.ptz",
                    "FINAL_MODEL_PATH": f"{tmp}/{model}.pt",
                    "TTT_ENABLED": 0,
                    "EVAL_SLIDING": 0,
                },
                Path(tmp),
            )
        for name in names:
            model, settings = ROWS[name]
            env = {
                **base,
                **MODELS[model],
                **settings,
                "RUN_ID": f"eval_{name}",
                "EXPORT_FROM": f"{tmp}/{model}.pt",
                "ARTIFACT_PATH": f"{tmp}/{name}.ptz",
                "FINAL_MODEL_PATH": "",
            }
            env.update(kv.split("=", 1) for kv in args.set)
            t = time.time()
            s = run_train(env, Path(tmp))
            res = s["eval"]["results"]
            ttt = s["eval"]["ttt"]
            ms = s["eval"]["times_ms"]
            row = dict(
                row=name,
                model=model,
                ttt_mode=env["TTT_MODE"],
                roundtrip=res["roundtrip"]["val_bpb"],
                sliding=res.get("sliding", {}).get("val_bpb", ""),
                ttt=res["ttt"]["val_bpb"],
                ttt_s=f"{ms['ttt'] / 1000:.0f}",
                eval_s=f"{ms['total'] / 1000:.0f}",
                guard=(
                    f"{ttt['trained']}/{ttt['planned']} chunk-epochs"
                    if "trained" in ttt
                    else f"{ttt['adapted']}/{ttt['batches']} batches, {ttt['phases']}/{ttt['planned_phases']} phases"
                ),
                wall_s=round(time.time() - t),
            )
            rows.append(row)
            print(json.dumps(row), flush=True)
    args.json.parent.mkdir(exist_ok=True)
    args.json.write_text(
        json.dumps(dict(tokens=args.tokens, val_tokens=args.val_tokens, set=args.set, rows=rows), indent=1)
    )
    print(
        markdown_table(
            rows, ["row", "model", "ttt_mode", "roundtrip", "sliding", "ttt", "ttt_s", "eval_s", "guard"]
        )
    )


if __name__ == "__main__":
    main()
