#!/usr/bin/env python3
"""Quantization and compression: quality on a CPU-trained model, bytes at record scale.

  python3 tools/bench_quant.py                       # quality: train tools/cpu_scale.env 150 s, then measure
  python3 tools/bench_quant.py --record              # bytes: the record and #1493-shape models, trained-like
  python3 tools/bench_quant.py --layouts             # int8 stream layouts x codecs on a record-shape slice
  python3 tools/bench_quant.py --fit 1493-shape      # AUTO_FIT's search on a trained-like record-scale model
  python3 tools/bench_quant.py --fit record --fit-start-bytes 11685974   # ... sizes estimated, nothing compressed
  python3 tools/bench_quant.py --fit record --fit-start-bytes 11685974 --code raw   # ... the raw source budgeted
  python3 tools/bench_quant.py --train-seconds 30 --bits 6

Quality mode, per bit width and method (block matrices; embeddings int8, small tensors fp16): quant gap
= non-overlapping val bpb of the dequantized model - that of the float (post-EMA) model, compressed
bytes, order-0 entropy of the int symbols, relative reconstruction error. Methods: clip mse|sd (the
per-row MSE-best fraction of max|w|, or SDClip k*std(row)), lite (round to nearest) or full (Hessian
GPTQ calibrated on training batches); "sd rate@mse" is SDClip whose k was set by train_gpt's rate
control (fit_to_budget, k searched in [2, 4]) to the bytes of the mse row above it, the same-bytes comparison.

Record mode: the record model (R23, 26.9M params) and the #1493 shape (SP8192, 11 x 512, MLP 4x, no
BigramHash/VE, 35.9M) with their own initialisation plus N(0, 0.02) on every matrix, seed 0 (a stand-in
for trained weights; no Hessians, so lite only). Per method: bytes per codec, bits per weight, the
symbols' entropy, and the total with train_gpt.py's bytes against the 16,000,000 cap; then the int8
stream layouts (row-major, stride-2 byte shuffle, column-major) of the default plan. brotli-11 needs
minutes for 27 MB on a shared 2-core CPU, so only the default plan gets every codec (the #1493 shape
the first two); the other rows and the layouts use the first codec of --codecs.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from benchlib import EMBEDDED, REPO, cpu_scale_env, ensure_embedded_data, markdown_table

sys.path.insert(0, str(REPO))
import train_gpt as tg  # noqa: E402

SHAPES = {
    "record": {},
    "1493-shape": dict(VOCAB_SIZE="8192", MLP_MULT="4", BIGRAM_VOCAB_SIZE="0", VE_LAYERS=""),
}


def plan_for(h, clip: str, bits: int, mlp_bits: int = 0, k: float | None = None) -> dict:
    over = dict(QUANT_CLIP=clip, QUANT_BITS=str(bits), QUANT_BITS_MLP=str(mlp_bits))
    if k is not None:
        over["QUANT_CLIP_K"] = str(k)
    knobs = {f.name.upper(): f for _, f in h.knobs()}
    return tg.quant_plan(h.replace(**{k.lower(): tg.parse_knob(knobs[k], v) for k, v in over.items()}))


def symbol_stats(qstate, state) -> dict:
    """Order-0 entropy of the int symbols (bits/symbol) and the relative L2 error of the int tensors."""
    n_int = sum(q.values.numel() for q in qstate.values() if q.bits)
    ent = sum(q.values.numel() * entropy_bits(q.values) for q in qstate.values() if q.bits) / n_int
    err = sum((q.dequantize() - state[n].float()).square().sum().item() for n, q in qstate.items() if q.bits)
    ref = sum(state[n].float().square().sum().item() for n, q in qstate.items() if q.bits)
    return dict(entropy_bits=round(ent, 3), rel_err=round((err / ref) ** 0.5, 4))


def entropy_bits(v: torch.Tensor) -> float:
    p = torch.bincount(v.flatten().long() + 128, minlength=256).double() / v.numel()
    return -(p[p > 0] * p[p > 0].log2()).sum().item()


def layouts(qstate) -> dict[str, bytes]:
    """The int8 stream as train_gpt writes it (row-major) and the alternatives it was chosen over."""
    default = tg.encode_payload(qstate, {})
    head = default[: 4 + int.from_bytes(default[:4], "little")]
    ints = [q.values for q in qstate.values() if q.bits]
    n = sum(v.numel() for v in ints)
    rest = default[len(head) + n :]
    flat = np.frombuffer(default, dtype=np.uint8, count=n, offset=len(head))
    return {
        "int8 row-major (default)": default,
        "int8 stride-2 byte shuffle": head + flat[0::2].tobytes() + flat[1::2].tobytes() + rest,
        "int8 column-major": head + b"".join(v.T.contiguous().numpy().tobytes() for v in ints) + rest,
    }


def trained_like(over: dict):
    h = tg.Hyperparameters.from_env(over)
    torch.manual_seed(0)
    model = tg.GPT(h)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.add_(torch.randn(p.shape, generator=gen) * 0.02)
    return h, {k: v.detach().clone() for k, v in model.state_dict().items()}


def record_mode(args) -> None:
    """Rows in order of importance (the default plan first), the JSON rewritten after each one: brotli-11
    and lzma need minutes per 27 MB on a shared 2-core CPU."""
    code = len((REPO / "train_gpt.py").read_bytes())
    rows = []
    layout_rows = []
    codecs = args.codecs.split(",")
    default = ("sd", 0, "sd int6 k=12.85 (default)")
    int5 = ("sd", 5, "sd int5 MLP + int6 attn")
    mse = ("mse", 0, "mse int6 (old default)")
    jobs = [
        ("record", default, codecs, False),
        ("1493-shape", default, codecs[:2], False),
        ("record", int5, codecs[:1], False),
        ("record", mse, codecs[:1], False),
        ("record", default, [], True),
        ("1493-shape", mse, codecs[:1], False),
    ]
    models = {}
    for shape, (clip, mlp_bits, label), use, with_layouts in jobs:
        h, state = models[shape] if shape in models else models.setdefault(shape, trained_like(SHAPES[shape]))
        plan = plan_for(h, clip, 6, mlp_bits)
        n_params = sum(v.numel() for v in state.values())
        t = time.time()
        qstate = tg.quantize_state(state, plan)
        row = dict(
            model=shape,
            params=n_params,
            method=label,
            quantize_s=round(time.time() - t, 1),
            **symbol_stats(qstate, state),
        )
        payload = tg.encode_payload(qstate, {"model": h.model_config()})
        for codec in use:
            t = time.time()
            size = len(tg.compress(payload, codec)) + len(tg.ARTIFACT_MAGIC) + 33
            row[codec], row[f"{codec}_s"] = size, round(time.time() - t, 1)
            row[f"{codec}_bits_per_weight"] = round(8 * size / n_params, 3)
            row[f"{codec}_total_with_code"] = size + code
            print(json.dumps(row), flush=True)
        rows += [row] if use else []
        for layout, data in layouts(qstate).items() if with_layouts else ():
            layout_rows.append(
                dict(
                    model=shape,
                    layout=layout,
                    raw=len(data),
                    **{c: len(tg.compress(data, c)) for c in codecs[:1]},
                )
            )
            print(json.dumps(layout_rows[-1]), flush=True)
        args.json.parent.mkdir(exist_ok=True)
        args.json.write_text(json.dumps(dict(code_bytes=code, rows=rows, layouts=layout_rows), indent=1))
    print(f"train_gpt.py: {code} bytes")
    print(
        markdown_table(
            rows,
            ["model", "method", "entropy_bits", "rel_err"]
            + codecs
            + [f"{c}_bits_per_weight" for c in codecs]
            + [f"{c}_total_with_code" for c in codecs]
            + [f"{c}_s" for c in codecs],
        )
    )
    print(markdown_table(layout_rows, ["model", "layout", "raw"] + codecs[:1]))


def fit_mode(args) -> None:
    """train_gpt's rate control on a trained-like record-scale model: the default plan, AUTO_FIT's search
    against BYTE_BUDGET (the script's default) minus train_gpt.py as shipped (--code: packed, the default, or
    raw, the budget before CODE_SHIPPED), with real compression by the default codec, or with
    --fit-start-bytes N (a measured size of the default plan) every size estimated as entropy x the ratio N
    gives. No data here, so the calibration loss is the relative reconstruction error of the int tensors."""
    h, state = trained_like({**SHAPES[args.fit], "CODE_SHIPPED": args.code})
    code, _ = tg.shipped_code_bytes((REPO / "train_gpt.py").read_text(), h)

    def pack(q):
        return tg.pack_artifact(q, {"model": h.model_config()}, h.export.compressor)

    if args.fit_start_bytes:
        ratio = args.fit_start_bytes / tg.entropy_bytes(tg.quantize_state(state, tg.quant_plan(h)))

        def pack(q):
            return bytes(round(ratio * tg.entropy_bytes(q)))

    ref = sum(state[n].float().square().sum().item() for n in state if tg.quant_group(n, state[n]))

    def err(q):
        return sum((v.dequantize() - state[n].float()).square().sum().item() for n, v in q.items() if v.bits)

    def rel_err(q):
        return (err(q) / ref) ** 0.5

    t = time.time()
    fit = tg.fit_to_budget(
        lambda p: tg.quantize_state(state, p),
        pack,
        tg.quant_plan(h),
        min(h.export.byte_budget, tg.RULE_BYTES) - code,
        rel_err,
        lambda msg: print(msg, flush=True),
    )
    row = dict(
        model=args.fit,
        plan=tg.fmt_plan(fit.plan),
        codec=h.export.compressor,
        model_bytes=len(fit.blob),
        code_bytes=code,
        code_shipped=args.code,
        estimated_from_start_bytes=args.fit_start_bytes,
        total=len(fit.blob) + code,
        **symbol_stats(fit.qstate, state),
        seconds=round(time.time() - t, 1),
    )
    print(json.dumps(row), flush=True)
    args.json.parent.mkdir(exist_ok=True)
    args.json.write_text(json.dumps(row, indent=1))


def layouts_mode(args) -> None:
    """The int8 layouts on a record-shape slice (blocks 0-1 and the embedding tables, default plan) with
    every codec: the full 27 MB takes brotli-11 and lzma many minutes per layout on a shared 2-core CPU."""
    h, state = trained_like({})
    state = {k: v for k, v in state.items() if not k.startswith("blocks.") or k.split(".")[1] in ("0", "1")}
    qstate = tg.quantize_state(state, tg.quant_plan(h))
    rows = []
    for layout, data in layouts(qstate).items():
        rows.append(dict(slice="record blocks 0-1 + embeddings", layout=layout, raw=len(data)))
        for codec in args.codecs.split(","):
            t = time.time()
            rows[-1][codec], rows[-1][f"{codec}_s"] = len(tg.compress(data, codec)), round(time.time() - t, 1)
        print(json.dumps(rows[-1]), flush=True)
    args.json.parent.mkdir(exist_ok=True)
    args.json.write_text(json.dumps(rows, indent=1))
    print(markdown_table(rows, ["slice", "layout", "raw"] + args.codecs.split(",")))


def quality_mode(args) -> None:
    ensure_embedded_data()
    env = {
        **cpu_scale_env(),
        **EMBEDDED,
        "MAX_WALLCLOCK_SECONDS": str(args.train_seconds),
        "TTT_ENABLED": "0",
        "VAL_MAX_TOKENS": str(args.val_tokens),
    }
    h = tg.Hyperparameters.from_env(env)
    rt = tg.Runtime(0, 1, 0, torch.device("cpu"), False)
    torch.manual_seed(h.run.seed)
    model = tg.GPT(h)
    luts = tg.build_byte_luts(tg.load_tokenizer(h), "cpu")
    val = tg.load_val_tokens(h, rt)
    loader = tg.TrainLoader(tg.find_shards(h, "train")[0], rt)
    info = tg.train_model(model, h, rt, loader, val, luts, tg.Log(None))
    hessians = tg.collect_hessians(model, loader, h, rt)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    n_params = sum(p.numel() for p in model.parameters())
    batch = tg.eval_batch(h, 1, h.model.train_seq_len)

    def bpb_of(m):
        return tg.loss_and_bpb(
            tg.evaluate(m.token_nll, val, h.model.train_seq_len, h.model.train_seq_len, batch, luts, rt)
        )[1]

    float_bpb = bpb_of(model)
    calib = [c for c in info.calib]

    def calib_loss(qstate) -> float:
        with torch.no_grad():
            return tg.model_from_qstate(qstate, h, rt, model.stage)(*calib).item()

    rows = []

    def measure(bits, method, plan, hess, qstate=None):
        t = time.time()
        qstate = qstate or tg.quantize_state(state, plan, hess, h.export.gptq_damp)
        blob = tg.pack_artifact(qstate, {}, "brotli")
        bpb = bpb_of(tg.model_from_qstate(qstate, h, rt, model.stage))
        rows.append(
            dict(
                bits=bits,
                method=method,
                plan=tg.fmt_plan(plan),
                val_bpb=bpb,
                quant_gap=f"{bpb - float_bpb:+.5f}",
                model_bytes=len(blob),
                bytes_per_param=round(len(blob) / n_params, 4),
                **symbol_stats(qstate, state),
                seconds=round(time.time() - t, 1),
            )
        )
        print(json.dumps(rows[-1]), flush=True)
        return len(blob)

    for bits in [int(b) for b in args.bits.split(",")]:
        for gptq, hess in (("lite", None), ("full", hessians)):
            mse_bytes = measure(bits, f"mse {gptq}", plan_for(h, "mse", bits), hess)
            measure(bits, f"sd {gptq}", plan_for(h, "sd", bits), hess)

            def quantize(p, hess=hess):
                return tg.quantize_state(state, p, hess, h.export.gptq_damp)

            def pack(q):
                return tg.pack_artifact(q, {}, "brotli")

            fit = tg.fit_to_budget(
                quantize,
                pack,
                plan_for(h, "sd", bits, k=2.0),
                mse_bytes,
                calib_loss,
                tg.Log(None),
                fill=False,
            )  # SDClip only: filling could pick the MSE clip
            measure(bits, f"sd rate@mse {gptq}", fit.plan, hess, fit.qstate)
    args.json.parent.mkdir(exist_ok=True)
    args.json.write_text(
        json.dumps(
            dict(
                float_bpb=float_bpb,
                params=n_params,
                steps=info.stats.steps,
                val_tokens=args.val_tokens,
                train_seconds=args.train_seconds,
                rows=rows,
            ),
            indent=1,
        )
    )
    print(
        f"float (post-EMA) val_bpb {float_bpb:.5f}; {n_params} params; {info.stats.steps} steps; brotli-11; "
        f"{args.val_tokens or 'all'} val targets"
    )
    print(
        markdown_table(
            rows,
            [
                "bits",
                "method",
                "plan",
                "val_bpb",
                "quant_gap",
                "model_bytes",
                "bytes_per_param",
                "entropy_bits",
                "rel_err",
                "seconds",
            ],
        )
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--record", action="store_true", help="record-scale bytes instead of CPU-scale quality")
    p.add_argument("--layouts", action="store_true", help="int8 stream layouts on a record-shape slice")
    p.add_argument("--fit", choices=tuple(SHAPES), help="rate control (AUTO_FIT) on this trained-like shape")
    p.add_argument(
        "--fit-start-bytes",
        type=int,
        help="--fit without compressing: sizes from this measured default-plan size",
    )
    p.add_argument(
        "--code", choices=("packed", "raw"), default="packed", help="--fit: the code bytes budgeted"
    )
    p.add_argument("--train-seconds", type=float, default=150)
    p.add_argument("--bits", default="6,5")
    p.add_argument("--val-tokens", type=int, default=0, help="score only this many val targets (0 = all)")
    p.add_argument("--codecs", default="zstd,brotli,lzma")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    name, mode = "bench_quant", quality_mode
    if args.record:
        name, mode = "bench_quant_record", record_mode
    elif args.layouts:
        name, mode = "bench_quant_layouts", layouts_mode
    elif args.fit:
        name, mode = f"bench_quant_fit_{args.fit}", fit_mode
    args.json = args.json or REPO / "results" / f"{name}.json"
    mode(args)


if __name__ == "__main__":
    main()
