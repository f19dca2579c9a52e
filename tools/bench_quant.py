#!/usr/bin/env python3
"""Quantization and compression on a model trained on the embedded corpus (CPU scale).

  python3 tools/bench_quant.py                  # trains tools/cpu_scale.env for 150 s, then measures
  python3 tools/bench_quant.py --train-seconds 30 --bits 6

Table 1, per bit width and method (block matrices; embeddings int8 and small tensors fp16 throughout):
quant gap = non-overlapping val bpb of the dequantized model - that of the float (post-EMA) model, and
the compressed model's bytes per parameter. Methods: rtn (row max scale), lite-matrix (GPTQ-lite, one
clip fraction per matrix, as the records did), lite-row (one per row: train_gpt.py's default), full
(Hessian GPTQ on the lite-row grid, calibrated on training batches). Table 2: compressed size of the
default export for each codec and payload layout (fp16 byte-shuffle on/off, int6 values bit-packed).
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


def scales_for(w: torch.Tensor, bits: int, method: str) -> torch.Tensor:
    qmax = 2 ** (bits - 1) - 1
    amax = w.abs().amax(dim=1)
    if method == "rtn":
        return tg.fp16_grid((amax / qmax).clamp_min(2 ** -14))
    if method == "lite-matrix":
        best = None
        for f in tg.CLIP_FRACTIONS:
            s = tg.fp16_grid((amax * f / qmax).clamp_min(2 ** -14))
            err = (tg.round_to_grid(w, s, qmax) * s[:, None] - w).square().sum().item()
            best = (err, s) if best is None or err < best[0] else best
        return best[1]
    return tg.row_scales(w, bits)


def quantize_variant(state, h, bits, method, hessians):
    qstate = tg.quantize_state(state, h)  # embeddings and small tensors as exported
    for name, t in state.items():
        if tg.tensor_bits(name, t, h) and name.startswith("blocks."):
            w = t.float().reshape(t.shape[0], -1)
            s = scales_for(w, bits, method)
            qmax = 2 ** (bits - 1) - 1
            q = tg.gptq_round(w, hessians[name], s, qmax, h.gptq_damp) if method == "full" else tg.round_to_grid(w, s, qmax)
            qstate[name] = tg.QTensor(tuple(t.shape), bits, q.to(torch.int8), s.half())
    return qstate


def payload_variants(qstate, meta) -> dict[str, bytes]:
    """The default layout (train_gpt.encode_payload) and the alternatives it was chosen over."""
    default = tg.encode_payload(qstate, meta)
    header = default[: 4 + int.from_bytes(default[:4], "little")]
    ints = np.concatenate([q.values.numpy().reshape(-1) for q in qstate.values() if q.bits])
    halves = np.concatenate([(q.scale if q.bits else q.values).numpy().reshape(-1) for q in qstate.values()])
    v = (ints.astype(np.int16) + 32).astype(np.uint8)  # int6 -> 0..63, 4 values in 3 bytes
    v = np.pad(v, (0, -len(v) % 4)).reshape(-1, 4).astype(np.uint32)
    packed = (v[:, 0] | v[:, 1] << 6 | v[:, 2] << 12 | v[:, 3] << 18)
    packed = np.stack([(packed >> s) & 0xFF for s in (0, 8, 16)], axis=1).astype(np.uint8).tobytes()
    shuffled = halves.view(np.uint8).reshape(-1, 2).T.tobytes()
    return {"int8 + fp16 shuffled (default)": default,
            "int8 + fp16 interleaved": header + ints.tobytes() + halves.tobytes(),
            "6-bit packed + fp16 shuffled": header + packed + shuffled}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train-seconds", type=float, default=150)
    p.add_argument("--bits", default="6,5,4")
    p.add_argument("--json", type=Path, default=REPO / "logs" / "bench_quant.json")
    args = p.parse_args()
    ensure_embedded_data()
    env = {**cpu_scale_env(), **EMBEDDED, "MAX_WALLCLOCK_SECONDS": str(args.train_seconds), "TTT_ENABLED": "0"}
    h = tg.Hyperparameters.from_env(env)
    rt = tg.Runtime(0, 1, 0, torch.device("cpu"), False)
    torch.manual_seed(h.seed)
    model = tg.GPT(h)
    luts = tg.build_byte_luts(tg.load_tokenizer(h), "cpu")
    val = tg.load_val_tokens(h, rt)
    loader = tg.TrainLoader(tg.find_shards(h, "train")[0], rt)
    info = tg.train_model(model, h, rt, loader, val, luts, tg.Log(None))
    hessians = tg.collect_hessians(model, loader, h, rt)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    n_params = sum(p.numel() for p in model.parameters())
    batch = tg.eval_batch(h, 1, h.train_seq_len)
    float_bpb = tg.loss_and_bpb(tg.evaluate(model.token_nll, val, h.train_seq_len, h.train_seq_len, batch, luts, rt))[1]
    rows = []
    for bits in [int(b) for b in args.bits.split(",")]:
        for method in ("rtn", "lite-matrix", "lite-row", "full"):
            t = time.time()
            qstate = quantize_variant(state, h, bits, method, hessians)
            quant_s = time.time() - t
            blob = tg.pack_artifact(qstate, {}, "zstd")
            trial = tg.model_from_qstate(qstate, h, rt, model.stage)
            bpb = tg.loss_and_bpb(tg.evaluate(trial.token_nll, val, h.train_seq_len, h.train_seq_len, batch, luts, rt))[1]
            rows.append(dict(bits=bits, method=method, val_bpb=bpb, quant_gap=f"{bpb - float_bpb:+.5f}",
                             model_bytes=len(blob), bytes_per_param=round(len(blob) / n_params, 4),
                             quantize_s=round(quant_s, 2)))
            print(json.dumps(rows[-1]), flush=True)
    sizes = []
    default_q = tg.quantize_state(state, h)
    for layout, payload in payload_variants(default_q, {"model": h.model_config()}).items():
        row = dict(layout=layout, raw=len(payload))
        for codec in tg.CODECS:
            t = time.time()
            row[codec] = len(tg.compress(payload, codec))
            row[f"{codec}_s"] = round(time.time() - t, 2)
        sizes.append(row)
    args.json.parent.mkdir(exist_ok=True)
    args.json.write_text(json.dumps(dict(float_bpb=float_bpb, params=n_params, steps=info["steps"], rows=rows,
                                         compression=sizes), indent=1))
    print(f"float (post-EMA) val_bpb {float_bpb:.5f}; {n_params} params; {info['steps']} steps")
    print(markdown_table(rows, ["bits", "method", "val_bpb", "quant_gap", "model_bytes", "bytes_per_param", "quantize_s"]))
    print(markdown_table(sizes, ["layout", "raw", "zstd", "brotli", "lzma", "zstd_s", "brotli_s", "lzma_s"]))


if __name__ == "__main__":
    main()
