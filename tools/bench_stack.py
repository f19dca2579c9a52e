#!/usr/bin/env python3
"""The record stack at CPU scale: baseline vs full stack vs each component removed (and the two
optional extras added), each trained for the same token budget on the embedded corpus.

  python3 tools/bench_stack.py                      # ~45 min on 2 cores; prints a markdown table
  python3 tools/bench_stack.py --only full,no_xsa --tokens 500000

Columns: post-EMA pre-quant bpb, the int6 artifact's non-overlapping (roundtrip), sliding-window and
legal-TTT bpb, all on the first --val-tokens of the embedded val split, and training tokens/s. A 4x128
model trained on 1.5M tokens of 19th-century prose is a CPU-scale signal about the components, not a
prediction of their effect on 8xH100 FineWeb runs.
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

from benchlib import REPO, ensure_embedded_data, markdown_table, run_train, token_budget_base

# The official naive baseline's choices at the same scale: relu^2 MLP 2x, full RoPE, no LN scale, no
# BigramHash/SmearGate/XSA/VE, no EMA/QAT, its Muon/Adam settings, int8 export, non-overlapping eval.
BASELINE = dict(
    MLP_MULT=2,
    MLP_NEG_SLOPE=0,
    ROPE_DIMS=0,
    LN_SCALE=0,
    XSA_LAST_N=0,
    BIGRAM_VOCAB_SIZE=0,
    SMEAR_GATE=0,
    VE_LAYERS="",
    EMA_DECAY=0,
    LATE_QAT_THRESHOLD=0,
    MATRIX_LR=0.04,
    SCALAR_LR=0.04,
    TIED_EMBED_LR=0.05,
    MUON_MOMENTUM=0.95,
    MUON_MOMENTUM_WARMUP_START=0.85,
    MUON_MOMENTUM_WARMUP_STEPS=500,
    MUON_WD=0,
    ADAM_WD=0,
    GRAD_CLIP_NORM=0,
    QUANT_BITS=8,
    EVAL_SLIDING=0,
    TTT_ENABLED=0,
)
VARIANTS = {
    "baseline": BASELINE,
    "full": {},
    "no_bigram": dict(BIGRAM_VOCAB_SIZE=0),
    "no_smeargate": dict(SMEAR_GATE=0),
    "no_xsa": dict(XSA_LAST_N=0),
    "no_value_embed": dict(VE_LAYERS=""),
    "full_rope": dict(ROPE_DIMS=0),
    "no_ln_scale": dict(LN_SCALE=0),
    "relu2": dict(MLP_NEG_SLOPE=0),
    "no_ema": dict(EMA_DECAY=0),
    "no_late_qat": dict(LATE_QAT_THRESHOLD=0),
    "plus_loop": dict(LOOP_START=1, LOOP_END=2, LOOP_REPEATS=1, LOOP_ENABLE_AT=0.4),
    "plus_lanes": dict(PARALLEL_START=2),  # PARALLEL_FORM=lane1, #1530's two lanes
    "plus_gptj": dict(PARALLEL_START=2, PARALLEL_FORM="gptj"),  # #1493's one-stream parallel block
    # the 1.0611 record's additions (issue 17), one at a time on the full stack
    "plus_sparse_gate": dict(ATTN_GATE="sparse"),
    "plus_smear_input": dict(SMEAR_INPUT_DIMS=12),
    "plus_lqer": dict(LQER_RANK=4, LQER_TENSORS=3),
    "plus_doc_attention": dict(DOC_ATTENTION=1),
    # CaseOps data (`python3 data/prepare_data.py --caseops`): bpb over the original text's bytes (sidecar)
    "plus_caseops": dict(
        DATA_PATH=str(REPO / "data" / "datasets" / "pdmix_sp1024_caseops"),
        TOKENIZER_PATH=str(REPO / "data" / "tokenizers" / "pdmix_1024_bpe_caseops.model"),
    ),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=1_500_000, help="training tokens per variant")
    p.add_argument("--val-tokens", type=int, default=131072)
    p.add_argument("--only", help="comma-separated variant names")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override for every variant"
    )
    p.add_argument("--json", type=Path, default=REPO / "logs" / "bench_stack.json")
    args = p.parse_args()
    base = token_budget_base(args)
    base.update(kv.split("=", 1) for kv in args.set)
    names = args.only.split(",") if args.only else list(VARIANTS)
    if "plus_caseops" in names:
        ensure_embedded_data("--caseops")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            t = time.time()
            env = {**base, **VARIANTS[name], "RUN_ID": f"bench_{name}", "ARTIFACT_PATH": f"{tmp}/{name}.ptz"}
            s = run_train(env, Path(tmp))
            res = s["eval"]["results"]
            row = dict(
                variant=name,
                params=s["model_params"],
                pre_quant=s["train"]["pre_quant"]["val_bpb"],
                roundtrip=res["roundtrip"]["val_bpb"],
                sliding=res.get("sliding", {}).get("val_bpb", ""),
                ttt=res.get("ttt", {}).get("val_bpb", ""),
                tokens_per_s=round(
                    s["train"]["steps"] * int(base["TRAIN_BATCH_TOKENS"]) / (s["train"]["train_ms"] / 1000)
                ),
                model_bytes=s["bytes"]["model"],
                wall_s=round(time.time() - t),
            )
            rows.append(row)
            print(json.dumps(row), flush=True)
    full = next((r for r in rows if r["variant"] == "full"), None)
    if full:
        for r in rows:
            best = next(r[k] for k in ("ttt", "sliding", "roundtrip") if r[k] != "" or k == "roundtrip")
            r["final_vs_full"] = f"{best - full['ttt']:+.4f}"
    args.json.parent.mkdir(exist_ok=True)
    args.json.write_text(
        json.dumps(dict(tokens=args.tokens, val_tokens=args.val_tokens, set=args.set, rows=rows), indent=1)
    )
    print(
        markdown_table(
            rows,
            [
                "variant",
                "params",
                "pre_quant",
                "roundtrip",
                "sliding",
                "ttt",
                "final_vs_full",
                "tokens_per_s",
                "model_bytes",
            ],
        )
    )


if __name__ == "__main__":
    main()
