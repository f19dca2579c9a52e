#!/usr/bin/env python3
"""Preflight without a GPU: does a config's record run fit one GPU's memory, per rank, in every phase?

  python3 tools/preflight.py                          # the record defaults (Hyperparameters() with no env)
  python3 tools/preflight.py configs/*.env --json results/preflight.json
  python3 tools/preflight.py configs/r23.env --world 1 # the setting of the one real H100 measurement
  python3 tools/preflight.py configs/top_1_0611.env --set TTT_DOCS_PER_BATCH=128
  python3 tools/preflight.py configs/r23.env --shrunk  # + the config run shrunk on 2 gloo ranks, compiled

Each phase runs train_gpt.py's own code (GPT, build_optimizers, Muon, WeightAverager, collect_hessians,
score_windows, train_rows, LoRAAdapters, lora_batch) on fake tensors (FakeTensorMode: shapes and dtypes, no
data, no arithmetic), at the record's shapes and world size (default 8: one micro-batch of
TRAIN_BATCH_TOKENS/8 tokens per rank). A TorchDispatchMode counts the bytes of every storage an op creates
and frees it when the storage dies (weakref, as torch.distributed._tools.mem_tracker does), so the live
peak is eager PyTorch's allocated bytes (no caching-allocator slack); saved_tensors_hooks sum the
distinct storages autograd keeps for backward. What is live at each phase mirrors train_gpt.run: the compile
warm-up (every graph variant) holds params, grads, Muon momentum (this rank's share), AdamW moments and the
warm-up snapshot (train_model's deep copy of the weights and optimizer state, `del`ed once restored);
training holds the same with the EMA instead of the snapshot; GPTQ calibration and the diagnostic eval also hold the optimizer state (train_model's locals); the eval
phases hold the eval model, the GPU Hessians (run()'s `hessians` local) and the LoRA adapters.

Assumptions, as on CUDA: fp32 master weights under bf16 autocast (emulated by CPU autocast, which casts
linear/matmul/bmm to bf16 like CUDA's); attention is a flash-style kernel (SDPA flash/cuDNN, FA3 or
compiled FlexAttention: output plus an fp32 log-sum-exp saved, no T x T scores, GQA not expanded), not the
CPU math path; collectives are no-ops that keep their real output buffers (reduce-scatter shares,
all-gathers); training's AdamW is fused, as train_gpt builds it on CUDA. The real run is compiled: inductor
saves fewer activations than eager, so each phase is shown eager (raw) and scaled by CALIBRATION, the
compiled/eager ratio of the one measurement (R23, world 1, 26,867 MiB max_memory_allocated on an H100,
torch 2.11, a peak over warm-up and training: /work/shared/measurements/h100-2026-11-23.md; this tool traces
32.86 GiB eager for it, its warm-up's peak: 0.798).
The verdicts read eager/calibrated: FAIL/PASS means only the compiled estimate fits. The factor is one
training measurement, applied to every phase; the compiled LoRA TTT and eval graphs were never measured.

Phases traced at reduced cost, with the same peak: GPTQ over 2 calibration batches (each batch is alike,
the Hessians accumulate in place); chunk TTT and the global-SGD phase over two steps of one batch; LoRA TTT
with a 2-chunk document at the widest width (TTT_LORA_CHUNK set to the eval length, so the second step
runs at rows x EVAL_SEQ_LEN with Adam's state live, as the widest steps of the real pass do).

Timeline (every config): where --measurements (/work/shared/measurements) holds a train_gpt.py log of a GPU run
whose training step does the same work (the network's shape knobs, the micro-batch's tokens, late QAT on or
off), its step time x micro-batches per rank at world 8 / the run's projects the steps in the training cap on
8 GPUs (compute only: no collectives, so an upper bound), with the eval passes' seconds where bench_speed.json
beside it measured this model; else "not measured". Today: R23 (the defaults and configs/r23.env), 821.3 ms
per 8-micro-batch step on one H100 (2026-11-23) -> ~102.7 ms at 8 ranks.

--shrunk: the config as `PRESET=<config> bash tools/main_job.sh` shrinks it (tools/preset_cpu.env over it, on
the embedded corpus, built if missing), with its own WARMUP_STEPS, 6 steps, a 8,192-token eval, compile on
with COMPILE_BACKEND=aot_eager (dynamo's graphs and guards without C++ builds), through train, export and the
timed eval on 2 gloo ranks (torchrun), killed after --shrunk-timeout. Each rank runs train_gpt.main unchanged
but for a Log that also keeps its lines on ranks > 0 (train_gpt logs rank 0 only) with torch.compile's graph
count at each, and a hash of the weights train_model returns. Read back: graphs compiled per phase (compile
warm-up / training after it / diagnostic eval / eval warm-up / timed eval; both in-timer counts must be 0),
every compliance line (full_val's FAIL on the shrink's val sample is shown, excused), and ranks agree (the same
train losses, schedule and TTT decisions, exact scores and graph counts on every rank, times cut off, and
bitwise-equal trained weights). About 4 minutes per 11-layer preset on 2 CPU cores.
"""

import argparse
import contextlib
import dataclasses
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import types
import weakref
from pathlib import Path

import numpy as np
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map_only
from torch.utils.weak import WeakIdKeyDictionary

from benchlib import EMBEDDED, REPO, child_env, ensure_embedded_data, markdown_table, read_env_file

sys.path.insert(0, str(REPO))
import train_gpt as tg  # noqa: E402

GIB = 2**30
# What nvidia-smi reports for the whole GPU (81,559 MiB and 143,771 MiB), before the CUDA context and NCCL take ~1 GiB
LIMITS_GIB = {"H100": 81_559 / 1024, "H200": 143_771 / 1024}
# The measured compiled peak over this tool's eager trace of the same setting (configs/r23.env, --world 1,
# training): recomputed by `--calibrate`, which prints the ratio. 1.0 would mean eager = compiled.
MEASURED_R23_WORLD1_MIB = 26_867
CALIBRATION = 0.798


# ----------------------------------------------------------------------------------------------------
# The tracer
# ----------------------------------------------------------------------------------------------------


class MemoryTracer(TorchDispatchMode):
    """Live bytes of every storage created by an op while active, by label; a storage leaves when it dies.
    label() moves tensors that exist already (params, optimizer state) to a named bucket; phase() resets the
    peak. The breakdown at the peak says what the peak is made of."""

    def __init__(self):
        super().__init__()
        self.seen = WeakIdKeyDictionary()  # storage -> info dict (bytes, label)
        self.refs = {}  # id(info) -> weakref with the free callback
        self.by_label: dict[str, int] = {}
        self.live = self.peak = 0
        self.at_peak: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.add(t, "activations+temps", relabel=False)  # in-place ops return their input
        return out

    def add(self, t: torch.Tensor, label: str, relabel: bool = True) -> None:
        st = t.untyped_storage()
        info = self.seen.get(st)
        if info is None:
            info = dict(bytes=st.nbytes(), label=label)
            self.seen[st] = info
            self.refs[id(info)] = weakref.ref(st, lambda _, info=info: self.free(info))
            self.move(label, info["bytes"])
        elif relabel and info["label"] != label:
            self.move(info["label"], -info["bytes"], bump=False)
            info["label"] = label
            self.move(label, info["bytes"], bump=False)

    def free(self, info: dict) -> None:
        self.refs.pop(id(info), None)
        self.move(info["label"], -info["bytes"])

    def move(self, label: str, n: int, bump: bool = True) -> None:
        self.by_label[label] = self.by_label.get(label, 0) + n
        self.live += n if bump else 0
        if self.live > self.peak:
            self.peak, self.at_peak = self.live, dict(self.by_label)

    def label(self, name: str, tensors) -> None:
        for t in tensors:
            if isinstance(t, torch.Tensor):
                self.add(t, name)

    def phase(self) -> None:
        self.peak, self.at_peak = self.live, dict(self.by_label)


class SavedBytes:
    """Distinct storages autograd saves for backward while active (pack hook), net of the labelled static
    ones (weights): the activations a backward needs."""

    def __init__(self, tracer: MemoryTracer):
        self.tracer, self.saved = tracer, WeakIdKeyDictionary()

    def pack(self, t: torch.Tensor):
        self.saved[t.untyped_storage()] = True
        return t.detach()  # the same storage without its grad_fn: no reference cycle through saved outputs

    def total(self) -> int:
        infos = (self.tracer.seen.get(st) for st in list(self.saved.keys()))
        return sum(i["bytes"] for i in infos if i and i["label"] == "activations+temps")

    @contextlib.contextmanager
    def hooks(self):
        with torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t):
            yield self


class FlashAttention(torch.autograd.Function):
    """A flash-style attention kernel's memory: the output and an fp32 log-sum-exp per query saved for
    backward (with q, k, v), an fp32 dq accumulator in backward; no T x T scores."""

    @staticmethod
    def forward(ctx, q, k, v):
        out, lse = torch.empty_like(q), q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, _, _ = ctx.saved_tensors
        accum = torch.empty(q.shape, dtype=torch.float32)
        dq = accum.to(q.dtype)
        return dq, torch.empty_like(k), torch.empty_like(v)


class _Done:
    def wait(self):
        return None


def _no_collective(*args, **kwargs):
    return _Done() if kwargs.get("async_op") else None


FAKE_DIST = types.SimpleNamespace(
    ReduceOp=tg.dist.ReduceOp,
    all_reduce=_no_collective,
    reduce_scatter_tensor=_no_collective,
    all_gather_into_tensor=_no_collective,
    barrier=_no_collective,
)


@contextlib.contextmanager
def patched_train_gpt():
    """Flash-style attention for every kernel, and collectives that move nothing (their buffers are real)."""
    saved = tg.make_attention, tg.dist
    tg.make_attention = lambda kernel, starts, doc: FlashAttention.apply
    tg.dist = FAKE_DIST
    try:
        yield
    finally:
        tg.make_attention, tg.dist = saved


# ----------------------------------------------------------------------------------------------------
# One run's state, phase by phase
# ----------------------------------------------------------------------------------------------------


class FakeLoader:
    """TrainLoader's next_batch shapes: this rank's micro-batch, random ids (fake: no values)."""

    def __init__(self, rt: tg.Runtime, vocab: int):
        self.rt, self.vocab = rt, vocab

    def next_batch(self, global_tokens: int, seq_len: int):
        local = global_tokens // (self.rt.world_size * self.rt.grad_accum)
        shape = (local // seq_len, seq_len)
        return torch.randint(0, self.vocab, shape), torch.randint(0, self.vocab, shape)


@dataclasses.dataclass
class Trace:
    """The tracer and the objects alive in the traced run."""

    h: tg.Hyperparameters
    rt: tg.Runtime
    tracer: MemoryTracer
    phases: list = dataclasses.field(default_factory=list)
    params: int = 0
    notes: dict = dataclasses.field(default_factory=dict)

    def autocast(self):
        return torch.autocast("cpu", dtype=torch.bfloat16)

    def record(self, name: str, saved: int | None = None, **extra) -> dict:
        row = dict(
            phase=name,
            peak_gib=self.tracer.peak / GIB,
            saved_gib=None if saved is None else saved / GIB,
            breakdown_gib={k: round(v / GIB, 3) for k, v in self.tracer.at_peak.items() if v > 2**20},
            **extra,
        )
        self.phases.append(row)
        return row


def train_step(t: Trace, model, optimizers, loader, micro: int) -> int:
    """train_gpt.train_model's train_step on `micro` of this rank's micro-batches: returns the bytes saved for
    backward by the last one (the optimizers' steps run as the real step does)."""
    h, rt = t.h, t.rt
    adam_params = [p for g in optimizers[1].param_groups for p in g["params"]]
    saved = 0
    for _ in range(micro):
        x, y = loader.next_batch(h.train.train_batch_tokens, h.model.train_seq_len)
        counter = SavedBytes(t.tracer)
        with counter.hooks(), t.autocast():
            loss = model(x, y)
        saved = counter.total()
        (loss / rt.grad_accum).backward()
    muon_sq = optimizers[0].reduce_grads(lambda: tg.all_reduce_grads(adam_params, rt, rt.world_size))
    if h.train.grad_clip_norm:
        adam_grads = [p.grad for p in adam_params if p.grad is not None]
        norm = (rt.all_reduce(muon_sq) + sum(g.square().sum() for g in adam_grads)).sqrt()
        optimizers[0].grad_scale = (h.train.grad_clip_norm / (norm + 1e-6)).clamp(max=1.0)
        torch._foreach_mul_(adam_grads, optimizers[0].grad_scale)
    t.tracer.label("grads", [p.grad for p in model.parameters()])
    for opt in optimizers:
        opt.step()
        opt.zero_grad(set_to_none=True)
    label_optimizer_state(t, optimizers)
    return saved


def label_optimizer_state(t: Trace, optimizers) -> None:
    for opt in optimizers:
        for state in opt.state.values():
            t.tracer.label("optimizer state", state.values())


def build_training(t: Trace):
    """The model, train_gpt.build_optimizers (AdamW fused, as on CUDA) and the warm-up snapshot, taken as
    train_model takes it: before any step, so it holds the weights (the optimizers' state is still empty)."""
    model = tg.GPT(t.h)
    t.tracer.label("params+buffers", list(model.parameters()) + list(model.buffers()))
    optimizers = tg.build_optimizers(model, t.h, t.rt)
    for g in optimizers[1].param_groups:
        g["fused"], g["foreach"] = True, None
    label_optimizer_state(t, optimizers)
    snapshot = None
    if t.h.train.warmup_steps:
        # copy.deepcopy as train_model does; fake storages cannot be deep-copied, so each tensor is cloned
        def clone(obj):
            return tree_map_only(torch.Tensor, torch.clone, obj)

        snapshot = (clone(model.state_dict()), [clone(o.state_dict()) for o in optimizers])
        t.tracer.label("warm-up snapshot", list(snapshot[0].values()))
        for sd in snapshot[1]:
            for state in sd["state"].values():
                t.tracer.label("warm-up snapshot", state.values())
    t.notes["warmup_snapshot_gib"] = (t.tracer.by_label.get("warm-up snapshot", 0)) / GIB
    return model, optimizers, snapshot


def graph_variants(model, h: tg.Hyperparameters) -> list:
    """train_model's graph variants: (recurrence stage, QAT plan) for each stage, and the last stage with late
    QAT when it is on."""
    variants = [(s, None) for s in range(model.n_stages)]
    return variants + ([(model.n_stages - 1, tg.quant_plan(h))] if h.train.late_qat_threshold else [])


def warmup_variants(variants: list, warmup_steps: int) -> list:
    """The variants train_model's warm-up steps run, in order, once each (step i runs
    variants[max(0, i - (WARMUP_STEPS - len(variants)))]: the last steps cover every variant)."""
    picked = [variants[max(0, i - (warmup_steps - len(variants)))] for i in range(warmup_steps)]
    return [v for i, v in enumerate(picked) if v not in picked[:i]]


def variant_name(stage: int, qat) -> str:
    return f"stage {stage}" + (" +QAT" if qat else "")


def trace_training(t: Trace):
    """Training as train_model runs it. The compile warm-up: every graph variant it steps through, with the
    snapshot live and no EMA yet (one row, its highest peak); then the snapshot is restored and freed (train_model
    `del`s it) and the EMA is made. Then a step at each recurrence stage, and with late QAT at the last stage
    when it is on, with the EMA live and no snapshot."""
    h = t.h
    loader = FakeLoader(t.rt, h.model.vocab_size)
    model, optimizers, snapshot = build_training(t)
    t.params = sum(p.numel() for p in model.parameters())
    model.train()
    micro = min(t.rt.grad_accum, 2)  # the second micro-batch runs with the first's gradients live
    variants = graph_variants(model, h)
    train_step(t, model, optimizers, loader, 1)  # the first step: every optimizer state allocated
    if snapshot is not None:
        warm = warmup_variants(variants, h.train.warmup_steps)
        t.tracer.phase()
        saved = 0
        for stage, qat in warm:
            model.set_stage(stage)
            model.set_qat(qat)
            saved = max(saved, train_step(t, model, optimizers, loader, micro))
        t.record("train warm-up (snapshot live)", saved, variants=[variant_name(*v) for v in warm])
        model.load_state_dict(snapshot[0])
        for opt, state in zip(optimizers, snapshot[1]):
            opt.load_state_dict(state)
        del snapshot  # as train_model: not kept through the run
        model.set_stage(0)
        model.set_qat(None)
    averager = tg.WeightAverager(model, h)
    t.tracer.label("ema", averager.ema or [])
    for stage, qat in variants:
        model.set_stage(stage)
        model.set_qat(qat)
        train_step(t, model, optimizers, loader, 1)  # steady state: every moment allocated
        t.tracer.phase()
        saved = train_step(t, model, optimizers, loader, micro)
        averager.update(1, 1.0, tg.Log(None))
        t.record(
            f"train {variant_name(stage, qat)}",
            saved,
            layers=len(model.active),
            tokens_per_rank=h.train.train_batch_tokens // t.rt.micro_batches,
        )
    model.set_qat(None)
    return model, optimizers, loader, averager


def trace_after_training(t: Trace, model, loader, averager):
    """GPTQ calibration (full) and the diagnostic post-EMA eval, with train_model's state still alive."""
    h, rt = t.h, t.rt
    averager.apply_final(tg.Log(None))
    hessians = {}
    if h.export.quant_method == "full":
        t.tracer.phase()
        calib_h = h.replace(gptq_calib_batches=min(2, h.export.gptq_calib_batches))
        with patched_autocast(rt, t):
            hessians = tg.collect_hessians(model, loader, calib_h, rt)
        t.tracer.label("hessians", hessians.values())
        distinct = {id(v.untyped_storage()) for v in hessians.values()}
        t.record(
            "GPTQ Hessians",
            None,
            hessian_gib=sum(v.numel() * 4 for v in hessians.values()) / GIB,
            hessian_tensors=len(hessians),
            hessian_storages=len(distinct),
        )
    t.tracer.phase()
    score(t, model, h.model.train_seq_len, "score@train_len (diagnostic)")
    return hessians


def fake_luts(h: tg.Hyperparameters):
    v = h.model.vocab_size
    return (
        torch.zeros(v, dtype=torch.int32),
        torch.zeros(v, dtype=torch.bool),
        torch.ones(v, dtype=torch.bool),
    )


def score(t: Trace, model, seq_len: int, name: str) -> None:
    """One forward batch of score_windows at eval_batch's rows, under inference_mode."""
    h, rt = t.h, t.rt
    batch = tg.eval_batch(h, rt.world_size, seq_len)
    tokens = torch.randint(0, h.model.vocab_size, (seq_len + 1,), dtype=torch.int32)
    model.eval()
    fn = model.token_nll
    with patched_autocast(rt, t):
        tg.score_windows(
            tg.EvalContext(h, rt, fake_luts(h)),
            fn,
            tokens,
            np.array([[0, 0, seq_len]] * batch),
            seq_len,
            batch,
        )
    t.record(name, None, rows=batch, seq_len=seq_len)


@contextlib.contextmanager
def patched_autocast(rt: tg.Runtime, t: Trace):
    """train_gpt's rt.autocast() is a no-op off CUDA: make it the bf16 autocast the CUDA run has."""
    saved = rt.autocast
    object.__setattr__(rt, "autocast", t.autocast)
    try:
        yield
    finally:
        object.__setattr__(rt, "autocast", saved)


def trace_eval(t: Trace) -> None:
    """The timed eval's passes on a fresh model (model_from_qstate), the GPU Hessians still alive."""
    h, rt = t.h, t.rt
    model = tg.GPT(h)
    t.tracer.label("params+buffers", list(model.parameters()) + list(model.buffers()))
    t.params = t.params or sum(p.numel() for p in model.parameters())
    model.set_stage(model.n_stages - 1)
    adapters = None
    if h.ttt.ttt_enabled and h.ttt.ttt_mode != "chunk":
        model.requires_grad_(False)
        adapters = tg.LoRAAdapters.for_run(model, h)
        t.tracer.label("lora adapters", adapters.params)
    elif h.ttt.ttt_enabled:
        tg.ttt_params(model, h.ttt.ttt_freeze_blocks)
    t.tracer.phase()
    score(t, model, h.eval_len, "eval scoring (roundtrip/sliding)")
    if h.ttt.ttt_enabled and h.ttt.ttt_mode == "chunk":
        trace_ttt_rows(t, model, "chunk TTT train_rows")
    if adapters is not None:
        trace_lora(t, model, adapters)
        if h.ttt.ttt_mode == "phased":
            adapters.attach(False)
            trace_ttt_rows(t, model, "phased global-SGD train_rows")
            model.requires_grad_(False)


def trace_ttt_rows(t: Trace, model, name: str) -> None:
    """train_rows over one TTT_BATCH_SEQS batch of eval-length rows, twice: the second with SGD's momentum."""
    h, rt = t.h, t.rt
    L = h.eval_len
    params, _ = tg.ttt_params(model, h.ttt.ttt_freeze_blocks)
    opt = tg.ttt_optimizer(params, h)
    rows = np.arange(0, L * h.ttt.ttt_batch_seqs, L)[:, None] + np.arange(L)
    rows = rows[: h.ttt.ttt_batch_seqs] if h.ttt.ttt_mode != "chunk" else rows[: h.ttt.ttt_chunk_tokens // L]
    tokens = torch.randint(0, h.model.vocab_size, (int(rows.max()) + 2,), dtype=torch.int32)
    model.train()
    with patched_autocast(rt, t):
        tg.train_rows(tg.EvalContext(h, rt, None), model, tokens, rows, params, opt)
        label_optimizer_state(t, [opt])
        t.tracer.phase()
        tg.train_rows(tg.EvalContext(h, rt, None), model, tokens, rows, params, opt)
    per_rank = len(rows[:: rt.world_size]) if len(rows) else 0
    t.record(name, None, rows_per_rank=per_rank, seq_len=L)
    model.eval()
    del opt


def trace_lora(t: Trace, model, adapters) -> None:
    """lora_batch on TTT_DOCS_PER_BATCH documents of 2 x EVAL_SEQ_LEN + 1 tokens at chunk = EVAL_SEQ_LEN:
    two adapted steps of rows x EVAL_SEQ_LEN (the widest of lora_widths), the second with Adam's state. A pass
    (forward and backward) holds TTT_LORA_ROWS_PER_PASS rows' activations: the saved bytes are one pass's."""
    h, rt = t.h, t.rt
    L, R = h.eval_len, h.ttt.ttt_docs_per_batch
    wide = h.replace(ttt_lora_chunk=L)
    opt = tg.lora_optimizer(adapters.params, h)
    for g in opt.param_groups:
        g["foreach"] = True  # as on CUDA (torch's default there)
    batch = np.array([[0, 2 * L + 1]] * R)
    tokens = torch.randint(0, h.model.vocab_size, (2 * L + 3,), dtype=torch.int32)
    adapters.attach(True)
    model.eval()
    t.tracer.phase()
    counter = SavedBytes(t.tracer)
    x = tokens[:L].long().repeat(h.ttt.lora_rows, 1)  # one pass: TTT_LORA_ROWS_PER_PASS of the batch's rows
    with torch.enable_grad(), counter.hooks(), t.autocast():
        nll = model.token_nll(x, x.flip(1)).float()
    saved = counter.total()
    nll.sum().backward()
    del nll
    for p in adapters.params:
        p.grad = None
    with patched_autocast(rt, t):
        tg.lora_batch(
            tg.EvalContext(wide, rt, fake_luts(h)), model.token_nll, adapters, opt, tokens, batch, 0
        )
    state = [v for s in opt.state.values() for v in s.values()]
    t.notes["lora_adapters_grads_adam_gib"] = (2 * sum_bytes(adapters.params) + sum_bytes(state)) / GIB
    t.record("LoRA TTT lora_batch", saved, rows=h.ttt.lora_rows, docs=R, width=L)
    adapters.attach(False)


def sum_bytes(tensors) -> int:
    return sum(x.numel() * x.element_size() for x in tensors if isinstance(x, torch.Tensor))


# ----------------------------------------------------------------------------------------------------
# A config: parameters, bytes, the phases
# ----------------------------------------------------------------------------------------------------


def trace_config(h: tg.Hyperparameters, world: int, parts: tuple = ("train", "eval")) -> dict:
    """Every phase's per-rank peak for config h at `world` ranks (fake tensors: seconds, no GPU). parts: "train"
    (training, GPTQ, the diagnostic eval) and/or "eval" (the timed eval; without "train", no Hessians live)."""
    h.check_world(world)
    rt = tg.Runtime(0, world, 0, torch.device("cpu"), False, h.micro_batches(world))
    tracer = MemoryTracer()
    t = Trace(h, rt, tracer)
    torch.manual_seed(0)
    with FakeTensorMode(allow_non_fake_inputs=True), tracer, patched_train_gpt():
        hessians = trace_train_part(t) if "train" in parts else None
        if "eval" in parts:
            trace_eval(t)
        del hessians
    return dict(phases=t.phases, notes=t.notes, world=world, params=t.params)


def trace_train_part(t: Trace) -> dict:
    """Training, then GPTQ and the diagnostic eval; returns the Hessians, which run() keeps through the eval."""
    model, optimizers, loader, averager = trace_training(t)
    return trace_after_training(t, model, loader, averager)


# Compressed bytes / order-0 entropy bytes (train_gpt.entropy_bytes) of the default plan on the record-shape
# trained-like model, each codec measured once at 27 MB (results/bench_quant_record.json: brotli 11,685,974 B,
# zstd 11,738,397 B, lzma 12,424,841 B over an entropy of 11,635,525 B). The real export measures its own ratio
# on its first compression and corrects it on a miss; a preflight has no minutes per codec to spend.
CODEC_RATIO = {"brotli": 1.0043, "zstd": 1.0088, "lzma": 1.0678}


def artifact_bytes(env: dict) -> dict:
    """The artifact at record scale through rate control, on a trained-like model (bench_quant.trained_like):
    the default plan's bytes, then the plan AUTO_FIT would settle on (train_gpt.fit_to_budget against the budget
    less the shipped train_gpt.py, LQER as configured) with every size estimated as the symbols' order-0 entropy
    times the codec's measured ratio (CODEC_RATIO). The calibration loss is the int tensors' relative
    reconstruction error: there is no trained model and no data here, so the fitted k is a stand-in for the
    real run's (which calibrates on a training batch), while the bytes are what the budget sees."""
    import bench_quant

    h, state = bench_quant.trained_like(env)
    code, _ = tg.shipped_code_bytes(tg.read_source(str(REPO / "train_gpt.py")), h)  # what the budget counts
    limit = min(h.export.byte_budget, tg.RULE_BYTES)
    ratio = CODEC_RATIO[h.export.compressor]
    ref = sum(state[n].float().square().sum().item() for n in state if tg.quant_group(n, state[n]))

    def quantize(plan: dict) -> dict:
        return tg.add_lqer(state, tg.quantize_state(state, plan), h.export.lqer_rank, h.export.lqer_tensors)

    def pack(qstate: dict) -> bytes:  # a stand-in of the estimated size: fit_to_budget reads len()
        return bytes(round(ratio * tg.entropy_bytes(qstate)))

    def rel_err(qstate: dict) -> float:
        err = sum(
            (q.dequantize() - state[n].float()).square().sum().item()
            for n, q in qstate.items()
            if q.bits and n in state
        )
        return (err / ref) ** 0.5

    default_plan = tg.quant_plan(h)
    default_q = quantize(default_plan)
    default_bytes = len(pack(default_q))
    plan = default_plan
    qstate = default_q
    blob = default_bytes
    if h.export.auto_fit != "0":
        fitted = tg.fit_to_budget(
            quantize,
            pack,
            default_plan,
            limit - code,
            rel_err,
            lambda msg: None,
            fill=h.export.auto_fit == "1",
        )
        plan = fitted.plan
        qstate = fitted.qstate
        blob = len(fitted.blob)
    return dict(
        codec=h.export.compressor,
        ratio=ratio,
        auto_fit=h.export.auto_fit,
        default_plan=tg.fmt_plan(default_plan),
        default_model_bytes_est=default_bytes,
        default_total_bytes_est=default_bytes + code,
        plan=tg.fmt_plan(plan),
        rel_err=round(rel_err(qstate), 4),
        model_bytes_est=blob,
        code_bytes=code,
        total_bytes_est=blob + code,
        limit=limit,
        verdict="PASS" if blob + code <= limit else "FAIL",
    )


def verdicts(phases: list, calibration: float) -> None:
    """PASS/FAIL per GPU, eager and compiled-estimate: 'FAIL/PASS' = eager over, compiled estimate under."""
    for row in phases:
        row["calibrated_gib"] = row["peak_gib"] * calibration
        for gpu, limit in LIMITS_GIB.items():
            row[gpu] = "/".join("PASS" if row[k] <= limit else "FAIL" for k in ("peak_gib", "calibrated_gib"))


@dataclasses.dataclass
class Extras:
    """preflight()'s optional parts: the shrunk run (and its timeout) and where measured GPU runs are."""

    shrunk: bool = False
    shrunk_timeout: float = 900
    measurements: Path | None = None


def preflight(
    name: str,
    env: dict,
    world: int,
    calibration: float,
    with_bytes: bool,
    parts=("train", "eval"),
    extras: Extras | None = None,
) -> dict:
    """One config: the traced phases (verdicts at `calibration`), the artifact estimate (with_bytes), the
    projected timeline (extras.measurements: MEASUREMENTS by default) and, with extras.shrunk, the shrunk run."""
    extras = extras or Extras()
    h = tg.Hyperparameters.from_env(env)
    t0 = time.time()
    result = dict(config=name, **trace_config(h, world, parts))
    if with_bytes:
        result["bytes"] = artifact_bytes(env)
    verdicts(result["phases"], calibration)
    result["timeline"] = timeline(h, result["params"], extras.measurements or MEASUREMENTS, world)
    result["seconds"] = round(time.time() - t0, 1)
    if extras.shrunk:
        result["shrunk"] = run_shrunk(name, env, timeout=extras.shrunk_timeout)
    return result


# ----------------------------------------------------------------------------------------------------
# The projected timeline: a measured GPU step time, where one exists for the config
# ----------------------------------------------------------------------------------------------------

MEASUREMENTS = Path("/work/shared/measurements")  # --measurements; one folder of raw logs per session
# Model knobs that set values, not the work of a step: a step time measured at one value holds for any
VALUE_ONLY = {"mlp_neg_slope", "logit_softcap", "rope_base", "qk_gain_init"}


def read_measured_run(path: Path) -> dict | None:
    """A train_gpt.py log on a GPU (lines optionally prefixed by a clock time): its hyperparameters, device,
    world size and the last step_avg; None for any other file."""
    hp = None
    device = None
    world = None
    step = 0
    step_ms = None
    for raw in path.read_text(errors="replace").splitlines():
        line = re.sub(r"^\d\d:\d\d:\d\d ", "", raw)
        if line.startswith("hyperparameters:"):
            hp = json.loads(line.partition(":")[2])
        elif line.startswith("device:"):
            device = re.sub(r" x\d+$", "", line.partition(":")[2].split(" cuda:")[0])
        elif m := re.match(r"world_size:(\d+) grad_accum_steps:(\d+)", line):
            world = int(m[1])
        elif m := re.match(r"step:(\d+)/\d+ train_loss:\S+ train_time:\d+ms step_avg:([\d.]+)ms", line):
            step, step_ms = int(m[1]), float(m[2])
    if hp is None or not device or world is None or step_ms is None:
        return None
    return dict(path=str(path), hp=hp, device=device, world=world, steps=step, step_ms=step_ms)


def step_shape(hp: dict, world: int) -> dict:
    """What sets a training step's work per micro-batch: the network (the model group) but VALUE_ONLY, the
    micro-batch's tokens and whether late QAT fake-quantizes. Knobs a measurement's log predates read as
    today's default (the component was not there yet: off)."""
    defaults = tg.Hyperparameters.from_env({}).flat()

    def get(k):
        return hp.get(k, defaults[k])

    def norm(v):
        return list(v) if isinstance(v, (list, tuple)) else v

    micro = hp.get("train_micro_batches") or 0
    shape = {k: norm(get(k)) for k in tg.Hyperparameters.from_env({}).model_config() if k not in VALUE_ONLY}
    shape["micro_batch_tokens"] = get("train_batch_tokens") // (micro or max(8, world))
    shape["late_qat"] = bool(get("late_qat_threshold"))
    return shape


def measured_runs(folder: Path) -> list[dict]:
    runs = [read_measured_run(p) for p in sorted(folder.glob("**/*.txt"))] if folder.is_dir() else []
    return [r for r in runs if r]


def timeline(h: tg.Hyperparameters, params: int, folder: Path = MEASUREMENTS, world: int = 8) -> dict:
    """Steps in the training cap on `world` GPUs, projected from a measured GPU step of the same work (the
    longest such run): its step time x this world's micro-batches per rank / the measurement's. Compute only:
    the collectives (all-reduce, Muon's reduce-scatter and all-gather) and stragglers are not in it, so the
    steps are an upper bound. Else 'not measured', with the nearest run's differences."""
    mine = step_shape(h.flat(), world)
    runs = measured_runs(folder)
    same = [r for r in runs if step_shape(r["hp"], r["world"]) == mine]
    if not same:
        near = min(
            runs,
            key=lambda r: sum(v != mine[k] for k, v in step_shape(r["hp"], r["world"]).items()),
            default=None,
        )
        differs = near and sorted(k for k, v in step_shape(near["hp"], near["world"]).items() if v != mine[k])
        why = (
            f"nearest: {Path(near['path']).name} differs in {', '.join(differs)}"
            if near
            else f"none in {folder}"
        )
        return dict(status="not measured", why=why)
    run = max(same, key=lambda r: r["steps"])

    def per_rank(hp, w):
        return (hp.get("train_micro_batches") or max(8, w)) // w

    ms = run["step_ms"] * per_rank(h.flat(), world) / per_rank(run["hp"], run["world"])
    reserve = h.export.gptq_reserve_seconds if h.export.quant_method == "full" else 0.0
    train_s = max((h.train.max_wallclock_seconds or tg.RULE_TRAIN_S) - reserve, 0.0)
    out = dict(
        status="projected",
        source=run["path"],
        measured=f"{run['device']} x{run['world']}: {run['step_ms']:.1f} ms/step over {run['steps']} steps",
        world=world,
        ms_per_step=round(ms, 1),
        train_s=train_s,
        steps=min(int(train_s * 1000 // ms), h.train.iterations),
        note="compute only (no collectives, no stragglers): an upper bound on the steps; the measured "
        "run's attention was SDPA and its late QAT was on throughout",
    )
    out.update(measured_eval(h, params, Path(run["path"]).parent, world))
    return out


def measured_eval(h: tg.Hyperparameters, params: int, folder: Path, world: int) -> dict:
    """The eval passes' seconds on the full challenge val set over 8 GPUs, where tools/bench_speed.py measured
    this model's throughput beside the run (bench_speed.json: sliding window, chunk TTT at 3 epochs)."""
    path = folder / "bench_speed.json"
    if world != 8 or not path.exists():
        return {}
    rows = json.loads(path.read_text()).get("rows", [])
    out = {}
    for row in rows:
        shape = f"{h.train.train_batch_tokens // h.micro_batches(8) // h.model.train_seq_len}x{h.model.train_seq_len}"
        if row.get("params") != params or row.get("micro_batch") != shape:
            continue
        if h.eval.eval_sliding and h.eval.eval_stride == 64 and h.eval_len == h.model.train_seq_len:
            out["eval_sliding_s"] = row["sliding_8gpu_full_val_s"]
        if h.ttt.ttt_enabled and h.ttt.ttt_mode == "chunk" and h.ttt.ttt_epochs == 3:
            out["eval_ttt_s"] = row["ttt3_8gpu_full_val_s"]
        out["eval_source"] = str(path)
    return out


# ----------------------------------------------------------------------------------------------------
# The shrunk run: the config at CPU scale on 2 gloo ranks, compiled, through train, export and the timed eval
# ----------------------------------------------------------------------------------------------------

# Over tools/preset_cpu.env (itself over the preset): a handful of steps scheduled by step (no wallclock cap),
# compile on with aot_eager (dynamo's graphs and guards, no C++ builds), a small eval
SHRUNK = dict(
    COMPILE="1",
    COMPILE_BACKEND="aot_eager",
    ITERATIONS="6",
    MAX_WALLCLOCK_SECONDS="0",
    GPTQ_CALIB_BATCHES="1",
    VAL_MAX_TOKENS="8192",
    TTT_CHUNK_TOKENS="2048",
    FINAL_MODEL_PATH="",
)
CHILD: dict = {}  # what the child process keeps for its rank's report beside the log


def shrunk_env(env: dict, data: dict | None = None, **over) -> dict:
    """The config as `PRESET=<config> bash tools/main_job.sh` composes it (tools/preset_cpu.env over it, the
    data over both), then SHRUNK, the preset's own WARMUP_STEPS back (preset_cpu.env zeroes them: the compile
    warm-up is what the graph counts check), then `over`."""
    cpu = read_env_file(REPO / "tools" / "preset_cpu.env")
    warmup = env.get("WARMUP_STEPS", str(tg.Hyperparameters.from_env({}).train.warmup_steps))
    data = data if data is not None else dict(EMBEDDED, VOCAB_SIZE="1024")
    return {k: str(v) for k, v in {**env, **cpu, **data, **SHRUNK, "WARMUP_STEPS": warmup, **over}.items()}


class RecordingLog(tg.Log):
    """train_gpt's Log (rank 0's file and stdout unchanged), also keeping every line on every rank with the
    graphs torch.compile has built when it was written: train_gpt's other ranks log nothing."""

    runs: list = []

    def __init__(self, path):
        super().__init__(path)
        self.lines = []
        RecordingLog.runs.append(self)

    def __call__(self, msg: str, console: bool = True) -> None:
        if console:  # the source and the separator line are not log lines
            graphs = tg.dynamo_counters()["stats"]["unique_graphs"] if "torch._dynamo" in sys.modules else 0
            self.lines.append((msg, graphs))
        super().__call__(msg, console)


def state_sha256(state: dict) -> str:
    digest = hashlib.sha256()
    for k in sorted(state):
        digest.update(k.encode())
        digest.update(state[k].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def shrunk_child(out: Path) -> None:
    """One rank of the shrunk run (under torchrun): train_gpt.main as `python train_gpt.py` runs it, with
    RecordingLog for its Log and the trained weights' hash taken where train_model returns (the weights every
    rank exports from); writes out/rank<RANK>.json."""
    train_model = tg.train_model

    def hashed(model, *args, **kwargs):
        info = train_model(model, *args, **kwargs)
        CHILD["state_sha256"] = state_sha256(model.state_dict())
        return info

    tg.Log, tg.train_model = RecordingLog, hashed
    rank, rc = int(os.environ.get("RANK", "0")), 0
    try:
        tg.main(os.environ)
    except tg.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        rc = 1
    finally:
        lines = RecordingLog.runs[0].lines if RecordingLog.runs else []
        (out / f"rank{rank}.json").write_text(json.dumps(dict(rank=rank, lines=lines, **CHILD)))
    sys.exit(rc)


def run_shrunk(
    name: str, env: dict, data: dict | None = None, timeout: float = 900, nproc: int = 2, **over
) -> dict:
    """The config shrunk (shrunk_env) on `nproc` gloo ranks under torchrun, killed after `timeout` seconds; its
    graph counts, compliance lines and ranks-agree check (read_shrunk)."""
    if data is None:
        ensure_embedded_data()
    run_env = shrunk_env(env, data, **over)
    with tempfile.TemporaryDirectory(prefix=f"preflight_{name}_") as tmp:
        work = Path(tmp)
        run_env.setdefault("RUN_ID", f"preflight_{name}")
        run_env.setdefault("ARTIFACT_PATH", str(work / "model.ptz"))
        full = child_env(run_env)
        full.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
        cmd += [str(Path(__file__).resolve()), "--shrunk-child", str(work)]
        t0 = time.time()
        proc = subprocess.Popen(
            cmd, cwd=work, env=full, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            output, timed_out = proc.communicate(timeout=timeout)[0], False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # torchrun and its ranks: a session of their own
            output, timed_out = proc.communicate()[0], True
        ranks = [work / f"rank{r}.json" for r in range(nproc)]
        ranks = [json.loads(p.read_text()) for p in ranks if p.exists()]
        result = read_shrunk(ranks, run_env, nproc)
    result.update(seconds=round(time.time() - t0, 1), rc=proc.returncode, timed_out=timed_out)
    result["env"] = {k: run_env[k] for k in (*SHRUNK, "WARMUP_STEPS", *over) if k in run_env}
    if proc.returncode or timed_out:
        tail = output.decode(errors="replace")[-3000:]
        result.update(verdict="FAIL", tail=tail)
        why = f"timed out after {timeout:.0f}s" if timed_out else f"exit status {proc.returncode}"
        result["failed"].insert(0, f"run: {why}")
    return result


# Rank-local lines the ranks must agree on, with their rank-local times cut off: the training loss (a global
# mean), the schedule's decisions, TTT's, every exact score and the graphs each rank compiled
AGREED = re.compile(
    r"^(step:\d+/\d+ train_loss:\S+|recurrence:.*?|late_qat:.*?|stopping_early:.*?|ttt_phase:.*?|ttt_budget:.*?"
    r"|DIAGNOSTIC \S+ val_loss:\S+ val_bpb:\S+|\S+_exact .*|train_compiles: .*|eval_compiles: .*)"
    r"(?= train_time:| at | eval_time:|$)"
)


def agreed_lines(lines: list[str]) -> list[str]:
    return [m[1] for m in map(AGREED.match, lines) if m]


def read_compliance(lines: list, env: dict, failed: list) -> dict:
    """Every compliance line of rank 0's log; a FAIL goes to `failed` unless it is full_val on a val sample."""
    compliance = {}
    for m, _ in lines:
        if c := re.match(r"compliance:(\w+) (\w+) ?(.*)$", m):
            compliance[c[1]] = dict(status=c[2], detail=c[3])
    sample = env.get("VAL_MAX_TOKENS", "0") not in ("", "0")
    for name, c in compliance.items():
        if c["status"] == "FAIL" and name == "full_val" and sample:
            c["excused"] = f"the shrunk run scores a sample (VAL_MAX_TOKENS={env['VAL_MAX_TOKENS']})"
        elif c["status"] == "FAIL":
            failed.append(f"compliance:{name} FAIL {c['detail']}")
    if not compliance:
        failed.append("compliance: no compliance lines")
    return compliance


def read_shrunk(ranks: list[dict], env: dict, nproc: int) -> dict:
    """From each rank's lines (rank 0's are its log): graphs compiled per phase (the compile warm-up, training
    after it, the diagnostic eval, the eval's warm-up, inside the timed eval), every compliance line, and whether
    all ranks logged the same losses, decisions and scores and trained bitwise-equal weights."""
    failed = []
    if len(ranks) < nproc or not ranks[0]["lines"]:
        return dict(verdict="FAIL", failed=[f"ranks reported: {len(ranks)} of {nproc}"], compliance={})
    lines = ranks[0]["lines"]

    def at(prefix):
        return next((g for m, g in reversed(lines) if m.startswith(prefix)), None)

    def first(pattern):
        return next((mm for m, _ in lines if (mm := re.match(pattern, m))), None)

    train, evaled = first(r"train_compiles: (\d+)"), first(r"eval_compiles: (\d+)")
    warm = first(r"eval_warmup: (\d+) graph shapes compiled in ([\d.]+)s")
    marks = [at("warmup_step:") or 0, at("train_compiles:"), at("DIAGNOSTIC"), at("eval_warmup:")]
    graphs = None
    if None not in (train, evaled, *marks[1:]):
        graphs = dict(
            train_warmup=marks[0],
            train=int(train[1]),
            diagnostic=marks[2] - marks[1],
            eval_warmup=marks[3] - marks[2],
            eval=int(evaled[1]),
        )
        failed += [
            f"{k}: {graphs[k]} graphs compiled inside the timer" for k in ("train", "eval") if graphs[k]
        ]
    else:
        failed.append("graph counts: no train_compiles/eval_compiles/eval_warmup line (compile off?)")
    compliance = read_compliance(lines, env, failed)
    per_rank = [agreed_lines([m for m, _ in r["lines"]]) for r in ranks]
    hashes = [r.get("state_sha256") for r in ranks]
    agree = all(p == per_rank[0] for p in per_rank) and None not in hashes and len(set(hashes)) == 1
    disagree = []
    for r, mine in zip(ranks[1:], per_rank[1:]):
        if mine != per_rank[0]:
            pairs = [(a, b) for a, b in zip(per_rank[0], mine) if a != b]
            disagree.append(f"rank {r['rank']} vs 0: {pairs[0] if pairs else f'{len(mine)} lines'}")
    if not agree:
        failed.append(f"ranks_agree: {disagree or 'trained weights differ'}")
    steps = [int(s[1]) for m, _ in lines if (s := re.match(r"step:(\d+)/", m))]
    return dict(
        verdict="FAIL" if failed else "PASS",
        failed=failed,
        steps=max(steps, default=0),
        graphs=graphs,
        eval_warmup=warm and dict(shapes=int(warm[1]), seconds=float(warm[2])),
        compliance=compliance,
        ranks_agree=dict(
            status="PASS" if agree else "FAIL",
            ranks=len(ranks),
            lines_compared=len(per_rank[0]),
            state_sha256=hashes[0],
            disagree=disagree,
        ),
        lines=[m for m, _ in lines if re.match(r"(train_compiles|eval_warmup|eval_compiles|compliance):", m)],
    )


# ----------------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------------


def table(results: list[dict]) -> str:
    rows = []
    for r in results:
        for p in r["phases"]:
            rows.append(
                dict(
                    config=r["config"],
                    phase=p["phase"],
                    eager_GiB=f"{p['peak_gib']:.2f}",
                    saved_GiB="" if p["saved_gib"] is None else f"{p['saved_gib']:.2f}",
                    calibrated_GiB=f"{p['calibrated_gib']:.2f}",
                    H100_80GB=p["H100"],
                    H200_141GB=p["H200"],
                )
            )
    cols = ["config", "phase", "eager_GiB", "saved_GiB", "calibrated_GiB", "H100_80GB", "H200_141GB"]
    cols[-2:] = [f"{c} (eager/calibrated)" for c in cols[-2:]]
    rows = [{**r, cols[-2]: r.pop("H100_80GB"), cols[-1]: r.pop("H200_141GB")} for r in rows]
    return markdown_table(rows, cols)


def timeline_cell(t: dict) -> str:
    if t["status"] != "projected":
        return "not measured"
    cell = f"{t['steps']:,} steps x {t['ms_per_step']:.1f} ms in {t['train_s']:.0f} s"
    evals = [f"{k[5:-2]} {t[k]:.0f} s" for k in ("eval_sliding_s", "eval_ttt_s") if k in t]
    return cell + (f"; eval {' + '.join(evals)}" if evals else "")


def shrunk_cells(s: dict | None) -> dict:
    if s is None:
        return {"shrunk": "not run", "graphs": "", "compliance": "", "ranks_agree": ""}
    g = s.get("graphs")
    graphs = (
        "/".join(str(g[k]) for k in ("train_warmup", "train", "diagnostic", "eval_warmup", "eval"))
        if g
        else "?"
    )
    marks = []
    for name, c in s.get("compliance", {}).items():
        if c["status"] == "FAIL":
            marks.append(f"{name} FAIL" + (" (sample, excused)" if "excused" in c else ""))
    passed = sum(c["status"] == "PASS" for c in s.get("compliance", {}).values())
    return {
        "shrunk": s["verdict"] + (f" ({s['failed'][0]})" if s["failed"] else ""),
        "graphs": graphs,
        "compliance": ", ".join([f"{passed} PASS", *marks]) if s.get("compliance") else "none",
        "ranks_agree": s.get("ranks_agree", {}).get("status", "?"),
    }


def config_table(results: list[dict]) -> str:
    """One row per config: the highest phase's memory, the artifact estimate, the shrunk run and the timeline."""
    rows = []
    for r in results:
        top = max(r["phases"], key=lambda p: p["peak_gib"])
        b = r.get("bytes")
        rows.append(
            {
                "config": r["config"],
                "peak phase": top["phase"],
                "eager/calibrated GiB": f"{top['peak_gib']:.1f}/{top['calibrated_gib']:.1f}",
                "H100 80GB": top["H100"],
                "artifact est. B (fitted)": f"{b['total_bytes_est']:,} {b['verdict']}" if b else "",
                **shrunk_cells(r.get("shrunk")),
                "8xH100 timeline (projected)": timeline_cell(r["timeline"]),
            }
        )
    cols = list(rows[0]) if rows else []
    return markdown_table(rows, cols)


def summary_lines(r: dict) -> list[str]:
    lines = [f"{r['config']}: {r['params']:,} params, world {r['world']}, traced in {r['seconds']} s"]
    if "bytes" in r:
        b = r["bytes"]
        fitted = (
            "as planned (AUTO_FIT=0)" if b["auto_fit"] == "0" else f"AUTO_FIT={b['auto_fit']}: {b['plan']}"
        )
        lines.append(
            f"  artifact est. {b['total_bytes_est']:,} B vs {b['limit']:,}: {b['verdict']} ({fitted}, rel. error "
            f"{b['rel_err']}; model {b['model_bytes_est']:,} = entropy x {b['ratio']} ({b['codec']}) + code "
            f"{b['code_bytes']:,}); the default plan {b['default_plan']}: {b['default_total_bytes_est']:,} B"
        )
    for p in r["phases"]:
        parts = ", ".join(
            f"{k} {v:.2f}" for k, v in sorted(p["breakdown_gib"].items(), key=lambda kv: -kv[1])
        )
        extra = {k: v for k, v in p.items() if k in ("hessian_gib", "hessian_tensors", "hessian_storages")}
        lines.append(
            f"  {p['phase']}: peak {p['peak_gib']:.2f} GiB = {parts}" + (f"; {extra}" if extra else "")
        )
    lines += [f"  {k}: {v:.3f} GiB" for k, v in r["notes"].items()]
    t = r.get("timeline")
    if t and t["status"] == "projected":
        lines.append(
            f"  timeline: {timeline_cell(t)} on {t['world']} GPUs, from {t['measured']}; {t['note']}"
        )
    elif t:
        lines.append(f"  timeline: not measured ({t['why']})")
    if s := r.get("shrunk"):
        lines.append(
            f"  shrunk run ({s.get('steps', 0)} steps, 2 gloo ranks, {s['env'].get('COMPILE_BACKEND')}): "
            f"{s['verdict']} in {s['seconds']} s; graphs {s.get('graphs')}; eval warm-up {s.get('eval_warmup')}"
        )
        lines += [f"    {line}" for line in s.get("lines", []) if not line.startswith(("train_", "eval_"))]
        lines += [f"    FAIL: {f}" for f in s["failed"]]
        if "tail" in s:
            lines.append("    " + s["tail"][-1500:].replace("\n", "\n    "))
    return lines


def load_config(arg: str) -> tuple[str, dict]:
    if arg == "defaults":
        return "defaults", {}
    return Path(arg).stem, read_env_file(Path(arg))


def parse_sets(sets: list[str]) -> dict:
    out = {}
    for s in sets:
        key, sep, value = s.partition("=")
        if not sep:
            raise SystemExit(f"--set {s!r}: expected KEY=VALUE")
        out[key.strip()] = value.strip()
    return out


def traced_r23_world1() -> float:
    """This tool's eager training peak (GiB) for the measured setting: configs/r23.env, one GPU, 8 micro-batches."""
    r = preflight("r23", read_env_file(REPO / "configs" / "r23.env"), 1, 1.0, False, ("train",))
    return max(p["peak_gib"] for p in r["phases"] if p["phase"].startswith("train"))


def calibrate() -> float:
    """The compiled/eager ratio: the measured R23 world-1 training peak over this tool's trace of it."""
    traced = traced_r23_world1()
    ratio = MEASURED_R23_WORLD1_MIB / 1024 / traced
    print(
        f"calibration: r23 world 1 traced training peak {traced:.2f} GiB (eager), measured compiled "
        f"{MEASURED_R23_WORLD1_MIB / 1024:.2f} GiB: ratio {ratio:.3f}"
    )
    return ratio


def main() -> None:
    if sys.argv[1:2] == ["--shrunk-child"]:  # one rank of run_shrunk, under torchrun
        return shrunk_child(Path(sys.argv[2]))
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("configs", nargs="*", default=["defaults"], help="configs/*.env files, or 'defaults'")
    p.add_argument("--world", type=int, default=8, help="ranks (8: the record's 8xH100)")
    p.add_argument("--set", action="append", default=[], help="KEY=VALUE over every config")
    p.add_argument("--no-bytes", action="store_true", help="skip the artifact-size estimate")
    p.add_argument("--calibrate", action="store_true", help="recompute the calibration ratio vs 26.9 GiB")
    p.add_argument(
        "--shrunk", action="store_true", help="also run each config shrunk: 2 gloo ranks, compiled"
    )
    p.add_argument("--shrunk-only", default="", help="NAME,...: the shrunk run for these configs alone")
    p.add_argument("--shrunk-timeout", type=float, default=900, help="seconds before a shrunk run is killed")
    p.add_argument("--measurements", type=Path, default=MEASUREMENTS, help="measured GPU runs (timeline)")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    calibration = calibrate() if args.calibrate else CALIBRATION
    results = []
    for arg in args.configs:
        name, env = load_config(arg)
        env = {**env, **parse_sets(args.set)}
        results.append(
            preflight(
                name,
                env,
                args.world,
                calibration,
                not args.no_bytes,
                extras=Extras(
                    shrunk=name in args.shrunk_only.split(",") if args.shrunk_only else args.shrunk,
                    shrunk_timeout=args.shrunk_timeout,
                    measurements=args.measurements,
                ),
            )
        )
        print("\n".join(summary_lines(results[-1])), flush=True)
    print(
        f"\nper-rank peak memory, world {args.world}; calibrated = eager x {calibration:.3f} (compiled/eager, "
        f"R23 world 1 vs {MEASURED_R23_WORLD1_MIB:,} MiB measured); limits {LIMITS_GIB['H100']:.1f} and "
        f"{LIMITS_GIB['H200']:.1f} GiB (the whole GPU)"
    )
    print(table(results))
    print(
        "\npreflight per config: the highest phase; the shrunk run (graphs compiled: warm-up/train/diagnostic/"
        "eval warm-up/timed eval; compliance lines; ranks agree); steps projected from a measured GPU step"
    )
    print(config_table(results))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(dict(calibration=calibration, results=results), indent=1))


if __name__ == "__main__":
    main()
