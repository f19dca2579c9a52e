#!/usr/bin/env python3
"""Throughput of training, evaluation and export on this machine's device, as a table and JSON.

  python3 tools/bench_speed.py                  # record + naive-baseline configs (meant for one H100)
  python3 tools/bench_speed.py --tiny           # a small config that runs on a CPU in a minute
  python3 tools/bench_speed.py --configs record --attn sdpa,sdpa-flash,sdpa-cudnn,flex,fa3,fa4,varlen   # + kernels

Per config: compile time; training micro-batch tokens/s and step time at the record's per-GPU
micro-batch (48 x 2048 tokens; the baseline's 64 x 1024), model FLOPs utilization, peak memory;
sliding-window (stride 64) and 3-epoch TTT scored tokens/s with projections to the full 62,021,632-
token FineWeb val on 8 GPUs; export (quantize + zstd-22) time. Tokens are random: throughput does
not depend on them. CPU numbers are for keeping the tool working, never a speed claim.

--attn adds, per config, one layer's attention (forward + backward, compiled, at the training shapes) under each
kernel: ATTN_KERNEL=sdpa (torch picks the backend), sdpa-flash / sdpa-cudnn (SDPA held to one backend), flex,
fa3 (FlashAttention-3), fa4 (FlashAttention-4, pip install flash-attn-4), varlen (torch's varlen_attn, torch >=
2.12), each resolved as train_gpt resolves ATTN_KERNEL (pick_attention: installed, not a placeholder, its probe
runs); times the config's layer count is its cost per micro-step. A kernel that cannot run here is listed with its
error (train_gpt's reason: not installed, placeholder, no CUDA, failed probe). `--doc` times them with DOC_ATTENTION=1 (documents of ~1,000 tokens).
"""

import argparse
import contextlib
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from benchlib import REPO, markdown_table

sys.path.insert(0, str(REPO))
import train_gpt as tg  # noqa: E402

FINEWEB_VAL_TARGETS = 62_021_632
H100_BF16_DENSE_FLOPS = 989e12
CONFIGS = {
    "record": dict(micro_seqs=48),
    "baseline": dict(
        micro_seqs=64,
        NUM_LAYERS=9,
        MLP_MULT=2,
        MLP_NEG_SLOPE=0,
        ROPE_DIMS=0,
        LN_SCALE=0,
        XSA_LAST_N=0,
        BIGRAM_VOCAB_SIZE=0,
        SMEAR_GATE=0,
        VE_LAYERS="",
        TRAIN_SEQ_LEN=1024,
        TRAIN_BATCH_TOKENS=524288,
    ),
    "tiny": dict(
        micro_seqs=4,
        NUM_LAYERS=2,
        MODEL_DIM=64,
        NUM_HEADS=4,
        NUM_KV_HEADS=2,
        VE_LAYERS="1",
        XSA_LAST_N=1,
        BIGRAM_VOCAB_SIZE=256,
        BIGRAM_DIM=16,
        VE_DIM=16,
        ROPE_DIMS=8,
        TRAIN_SEQ_LEN=128,
        TRAIN_BATCH_TOKENS=4096,
        TTT_CHUNK_TOKENS=1024,
    ),
}


def timed(fn, rt, repeat: int) -> float:
    rt.sync()
    t = time.perf_counter()
    for _ in range(repeat):
        fn()
    rt.sync()
    return (time.perf_counter() - t) / repeat


def flops_per_token(model: tg.GPT, h: tg.Hyperparameters) -> float:
    """Training FLOPs per token: 6 x matmul params (blocks, tied head, projections) + causal attention."""
    matmul = sum(p.numel() for n, p in model.named_parameters() if p.ndim == 2 and "embed." not in n)
    attention = 6 * h.model.train_seq_len * h.model.model_dim * len(model.active)
    return 6 * matmul + attention


ATTN = {
    "sdpa": ("sdpa", None),
    "sdpa-flash": ("sdpa", SDPBackend.FLASH_ATTENTION),
    "sdpa-cudnn": ("sdpa", SDPBackend.CUDNN_ATTENTION),
    "flex": ("flex", None),
    "fa3": ("fa3", None),
    "fa4": ("fa4", None),
    "varlen": ("varlen", None),
}


def attention_row(name: str, over: dict, variant: str, rt: tg.Runtime, steps: int) -> dict:
    """One layer's attention at the config's training shapes (micro-batch, heads, GQA, head dim; bf16 on a GPU),
    forward + backward, compiled, under one kernel: what a kernel change saves per layer and micro-step. A kernel
    train_gpt.py refuses here (validate: FlexAttention off CUDA; pick_attention: an FA/varlen kernel not installed, a
    placeholder, no CUDA, its probe failing) or that fails gives its error."""
    over = dict(over, ATTN_KERNEL=ATTN[variant][0])
    micro_seqs, backend = over.pop("micro_seqs"), ATTN[variant][1]
    row = dict(config=name, attn=variant)
    try:
        h = tg.Hyperparameters.from_env({k: str(v) for k, v in over.items()})
        row.update(doc_attention=int(h.model.doc_attention), layers=h.model.logical_layers)
        T, D = h.model.train_seq_len, h.model.model_dim // h.model.num_heads
        kernel, _ = tg.pick_attention(
            h.run.attn_kernel,
            h.model.doc_attention,
            (h.model.num_heads, h.model.num_kv_heads, h.model.num_kv_heads, D),
        )
        dtype = torch.bfloat16 if rt.device.type == "cuda" else torch.float32
        q, k, v = (
            torch.randn(micro_seqs, n, T, D, device=rt.device, dtype=dtype, requires_grad=True)
            for n in (h.model.num_heads, h.model.num_kv_heads, h.model.num_kv_heads)
        )
        ids = torch.randint(2, h.model.vocab_size, (micro_seqs, T), device=rt.device)
        ids[:, ::997] = tg.BOS_ID  # documents of ~1,000 tokens, as FineWeb's (they matter with DOC_ATTENTION)
        starts = (ids == tg.BOS_ID) | (torch.arange(T, device=rt.device) == 0)

        def layer(q, k, v):
            return tg.make_attention(kernel, starts, h.model.doc_attention)(q, k, v)

        attend = (
            torch.compile(layer, fullgraph=True, dynamic=False, backend=rt.backend) if rt.compile else layer
        )

        def fwd_bwd():
            with sdpa_kernel(backend) if backend else contextlib.nullcontext():
                attend(q, k, v).float().square().mean().backward()

        row["compile_s"] = round(timed(fwd_bwd, rt, 1), 1)
        ms = timed(fwd_bwd, rt, steps) * 1000
    except Exception as e:  # this kernel cannot run here: say why, go on with the others
        return dict(row, error=f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:120]}")
    return dict(row, fwd_bwd_ms=round(ms, 3), per_micro_step_ms=round(ms * row["layers"], 2))


def bench(name: str, over: dict, rt: tg.Runtime, steps: int, eval_tokens: int) -> dict:
    over = dict(over)
    micro_seqs = over.pop("micro_seqs")
    h = tg.Hyperparameters.from_env({k: str(v) for k, v in over.items()})
    torch.manual_seed(0)
    model = tg.GPT(h).to(rt.device)
    L = h.model.train_seq_len
    x = torch.randint(0, h.model.vocab_size, (micro_seqs, L), device=rt.device)
    compiled = tg.compile_model(model, rt)
    opts = tg.build_optimizers(model, h, rt)

    def micro_step():
        with rt.autocast():
            compiled(x, x).backward()

    def optimizer_step():
        for o in opts:
            o.step()
            o.zero_grad(set_to_none=True)

    if rt.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    compile_s = timed(micro_step, rt, 1)
    micro_step()
    optimizer_step()  # warms the optimizer (and Muon's compiled Newton-Schulz)
    micro_s = timed(micro_step, rt, steps)
    opt_s = timed(lambda: (micro_step(), optimizer_step()), rt, max(2, steps // 4)) - micro_s
    tokens = micro_seqs * L
    train_tps = tokens / micro_s
    row = dict(
        config=name,
        params=sum(p.numel() for p in model.parameters()),
        micro_batch=f"{micro_seqs}x{L}",
        compile_s=round(compile_s, 1),
        micro_step_ms=round(micro_s * 1000, 2),
        optimizer_ms=round(opt_s * 1000, 2),
        train_tokens_per_s=round(train_tps),
    )
    row["mfu"] = (
        round(flops_per_token(model, h) * train_tps / H100_BF16_DENSE_FLOPS, 4)
        if rt.device.type == "cuda"
        else ""
    )
    if rt.device.type == "cuda":
        row["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
    # evaluation throughput, on a fresh model as the artifact would give it
    luts = tuple(
        t.to(rt.device)
        for t in (
            torch.ones(h.model.vocab_size, dtype=torch.int32),
            torch.zeros(h.model.vocab_size, dtype=torch.bool),
            torch.zeros(h.model.vocab_size, dtype=torch.bool),
        )
    )
    val = torch.randint(2, h.model.vocab_size, (eval_tokens + 1,), device=rt.device, dtype=torch.int32)
    eval_model = tg.GPT(h).to(rt.device)
    score = tg.compile_model(eval_model.token_nll, rt)
    batch = tg.eval_batch(h, rt.world_size, L)
    windows = tg.plan_windows(eval_tokens, L, h.eval.eval_stride)
    tg.score_windows(tg.EvalContext(None, rt, luts), score, val, windows[:batch], L, batch)  # compile warm-up
    sliding_s = timed(
        lambda: tg.score_windows(tg.EvalContext(None, rt, luts), score, val, windows, L, batch), rt, 1
    )
    row["sliding_tokens_per_s"] = round(eval_tokens / sliding_s)
    h3 = h.replace(ttt_epochs=3)
    tg.eval_ttt(
        tg.EvalContext(h3, rt, luts), eval_model, val[: 2 * h.ttt.ttt_chunk_tokens + 1], 1e9
    )  # compile warm-up
    ttt_s = timed(lambda: tg.eval_ttt(tg.EvalContext(h3, rt, luts), eval_model, val, 1e9), rt, 1)
    row["ttt3_tokens_per_s"] = round(eval_tokens / ttt_s)
    row["sliding_8gpu_full_val_s"] = round(FINEWEB_VAL_TARGETS / (8 * row["sliding_tokens_per_s"]), 1)
    row["ttt3_8gpu_full_val_s"] = round(FINEWEB_VAL_TARGETS / (8 * row["ttt3_tokens_per_s"]), 1)
    t = time.perf_counter()
    blob = tg.pack_artifact(tg.quantize_state(model.state_dict(), tg.quant_plan(h)), {}, "zstd")
    row["export_s"] = round(time.perf_counter() - t, 2)
    row["artifact_bytes"] = len(blob)
    return row


ATTN_COLUMNS = [
    "config",
    "attn",
    "doc_attention",
    "layers",
    "compile_s",
    "fwd_bwd_ms",
    "per_micro_step_ms",
    "error",
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="only the small CPU-sized config")
    p.add_argument("--steps", type=int, default=20, help="timed training micro-steps")
    p.add_argument("--eval-tokens", type=int, default=0, help="val tokens to score (default 4 TTT chunks)")
    p.add_argument(
        "--configs", default="", help=f"comma-separated subset of {','.join(CONFIGS)} (default: by --tiny)"
    )
    p.add_argument("--json", type=Path, default=REPO / "logs" / "bench_speed.json")
    p.add_argument(
        "--attn", default="", help=f"comma-separated attention kernels to time too: {','.join(ATTN)}"
    )
    p.add_argument("--doc", action="store_true", help="--attn rows with DOC_ATTENTION=1")
    args = p.parse_args()
    variants = [v for v in args.attn.split(",") if v]
    if set(variants) - set(ATTN):
        p.error(f"--attn: unknown {sorted(set(variants) - set(ATTN))}; kernels: {','.join(ATTN)}")
    cuda = torch.cuda.is_available()
    rt = tg.Runtime(0, 1, 0, torch.device("cuda" if cuda else "cpu"), cuda)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch._dynamo.config.cache_size_limit = 32
    names = ["tiny"] if args.tiny else ["record", "baseline"]
    if args.configs:
        names = args.configs.split(",")
    rows = []
    for name in names:
        chunk = int(CONFIGS[name].get("TTT_CHUNK_TOKENS", 32768))
        rows.append(
            bench(name, CONFIGS[name], rt, args.steps if not args.tiny else 3, args.eval_tokens or 4 * chunk)
        )
        print(json.dumps(rows[-1]), flush=True)
    attn_rows = []
    for name in names:
        for variant in variants:
            over = dict(CONFIGS[name], **({"DOC_ATTENTION": 1} if args.doc else {}))
            attn_rows.append(attention_row(name, over, variant, rt, args.steps))
            print(json.dumps(attn_rows[-1]), flush=True)
    device = torch.cuda.get_device_name() if cuda else f"cpu ({platform.processor() or platform.machine()})"
    meta = dict(
        device=device,
        torch=torch.__version__,
        cuda=torch.version.cuda,
        date=datetime.date.today().isoformat(),
    )
    args.json.parent.mkdir(exist_ok=True)
    args.json.write_text(json.dumps(dict(meta, rows=rows, attention=attn_rows), indent=1))
    print(f"device {device}, torch {torch.__version__}, cuda {torch.version.cuda}, {meta['date']}")
    print(markdown_table(rows, [c for c in rows[0] if c not in ("params",)]))
    if attn_rows:
        print(markdown_table(attn_rows, ATTN_COLUMNS))


if __name__ == "__main__":
    main()
