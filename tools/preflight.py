#!/usr/bin/env python3
"""Preflight without a GPU: does a config's record run fit one GPU's memory, per rank, in every phase?

  python3 tools/preflight.py                          # the record defaults (Hyperparameters() with no env)
  python3 tools/preflight.py configs/*.env --json results/preflight.json
  python3 tools/preflight.py configs/r23.env --world 1 # the setting of the one real H100 measurement
  python3 tools/preflight.py configs/top_1_0611.env --set TTT_DOCS_PER_BATCH=128

Each phase runs train_gpt.py's own code (GPT, build_optimizers, Muon, WeightAverager, collect_hessians,
score_windows, train_rows, LoRAAdapters, lora_batch) on fake tensors (FakeTensorMode: shapes and dtypes, no
data, no arithmetic), at the record's shapes and world size (default 8: one micro-batch of
TRAIN_BATCH_TOKENS/8 tokens per rank). A TorchDispatchMode counts the bytes of every storage an op creates
and frees it when the storage dies (weakref, as torch.distributed._tools.mem_tracker does), so the live
peak is eager PyTorch's allocated bytes (no caching-allocator slack); saved_tensors_hooks sum the
distinct storages autograd keeps for backward. What is live at each phase mirrors train_gpt.run: training
holds params, grads, Muon momentum (this rank's share), AdamW moments, the EMA and the warm-up snapshot;
GPTQ calibration and the diagnostic eval also hold the optimizer state (train_model's locals); the eval
phases hold the eval model, the GPU Hessians (run()'s `hessians` local) and the LoRA adapters.

Assumptions, as on CUDA: fp32 master weights under bf16 autocast (emulated by CPU autocast, which casts
linear/matmul/bmm to bf16 like CUDA's); attention is a flash-style kernel (SDPA flash/cuDNN, FA3 or
compiled FlexAttention: output plus an fp32 log-sum-exp saved, no T x T scores, GQA not expanded), not the
CPU math path; collectives are no-ops that keep their real output buffers (reduce-scatter shares,
all-gathers); training's AdamW is fused, as train_gpt builds it on CUDA. The real run is compiled: inductor
saves fewer activations than eager, so each phase is shown eager (raw) and scaled by CALIBRATION, the
compiled/eager ratio of the one measurement (R23, world 1, 26,867 MiB max_memory_allocated on an H100,
torch 2.11: /work/shared/measurements/h100-2026-11-23.md; this tool traces 32.86 GiB eager for it: 0.798).
The verdicts read eager/calibrated: FAIL/PASS means only the compiled estimate fits. The factor is one
training measurement, applied to every phase; the compiled LoRA TTT and eval graphs were never measured.

Phases traced at reduced cost, with the same peak: GPTQ over 2 calibration batches (each batch is alike,
the Hessians accumulate in place); chunk TTT and the global-SGD phase over two steps of one batch; LoRA TTT
with a 2-chunk document at the widest width (TTT_LORA_CHUNK set to the eval length, so the second step
runs at rows x EVAL_SEQ_LEN with Adam's state live, as the widest steps of the real pass do).
"""

import argparse
import contextlib
import dataclasses
import json
import sys
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

from benchlib import REPO, markdown_table, read_env_file

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
        x, y = loader.next_batch(h.train_batch_tokens, h.train_seq_len)
        counter = SavedBytes(t.tracer)
        with counter.hooks(), t.autocast():
            loss = model(x, y)
        saved = counter.total()
        (loss / rt.grad_accum).backward()
    muon_sq = optimizers[0].reduce_grads(lambda: tg.all_reduce_grads(adam_params, rt, rt.world_size))
    if h.grad_clip_norm:
        adam_grads = [p.grad for p in adam_params if p.grad is not None]
        norm = (rt.all_reduce(muon_sq) + sum(g.square().sum() for g in adam_grads)).sqrt()
        optimizers[0].grad_scale = (h.grad_clip_norm / (norm + 1e-6)).clamp(max=1.0)
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
    """The model, train_gpt.build_optimizers (AdamW fused, as on CUDA) and the warm-up snapshot."""
    model = tg.GPT(t.h)
    t.tracer.label("params+buffers", list(model.parameters()) + list(model.buffers()))
    optimizers = tg.build_optimizers(model, t.h, t.rt)
    for g in optimizers[1].param_groups:
        g["fused"], g["foreach"] = True, None
    label_optimizer_state(t, optimizers)
    snapshot = None
    if t.h.warmup_steps:
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


def trace_training(t: Trace):
    """Training: one warm step (so every optimizer state exists, then restored as train_model's warm-up does),
    then a step at each recurrence stage, and with late QAT on at the last stage when it is on."""
    h = t.h
    loader = FakeLoader(t.rt, h.vocab_size)
    model, optimizers, snapshot = build_training(t)
    t.params = sum(p.numel() for p in model.parameters())
    model.train()
    micro = min(t.rt.grad_accum, 2)  # the second micro-batch runs with the first's gradients live
    train_step(t, model, optimizers, loader, 1)
    if snapshot is not None:
        model.load_state_dict(snapshot[0])
        for opt, state in zip(optimizers, snapshot[1]):
            opt.load_state_dict(state)
    averager = tg.WeightAverager(model, h)
    t.tracer.label("ema", averager.ema or [])
    variants = [(s, None) for s in range(model.n_stages)]
    variants += [(model.n_stages - 1, tg.quant_plan(h))] if h.late_qat_threshold else []
    for stage, qat in variants:
        model.set_stage(stage)
        model.set_qat(qat)
        train_step(t, model, optimizers, loader, 1)  # steady state: every moment allocated
        t.tracer.phase()
        saved = train_step(t, model, optimizers, loader, micro)
        averager.update(1, 1.0, tg.Log(None))
        name = f"train stage {stage}" + (" +QAT" if qat else "")
        t.record(
            name, saved, layers=len(model.active), tokens_per_rank=h.train_batch_tokens // t.rt.micro_batches
        )
    model.set_qat(None)
    return model, optimizers, loader, averager, snapshot


def trace_after_training(t: Trace, model, loader, averager):
    """GPTQ calibration (full) and the diagnostic post-EMA eval, with train_model's state still alive."""
    h, rt = t.h, t.rt
    averager.apply_final(tg.Log(None))
    hessians = {}
    if h.quant_method == "full":
        t.tracer.phase()
        calib_h = dataclasses.replace(h, gptq_calib_batches=min(2, h.gptq_calib_batches))
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
    score(t, model, h.train_seq_len, "score@train_len (diagnostic)")
    return hessians


def fake_luts(h: tg.Hyperparameters):
    v = h.vocab_size
    return (
        torch.zeros(v, dtype=torch.int32),
        torch.zeros(v, dtype=torch.bool),
        torch.ones(v, dtype=torch.bool),
    )


def score(t: Trace, model, seq_len: int, name: str) -> None:
    """One forward batch of score_windows at eval_batch's rows, under inference_mode."""
    h, rt = t.h, t.rt
    batch = tg.eval_batch(h, rt.world_size, seq_len)
    tokens = torch.randint(0, h.vocab_size, (seq_len + 1,), dtype=torch.int32)
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
    if h.ttt_enabled and h.ttt_mode != "chunk":
        model.requires_grad_(False)
        adapters = tg.LoRAAdapters(
            model, h.ttt_docs_per_batch, h.ttt_lora_rank, h.seed, h.ttt_lora_warm_a, h.lora_rows
        )
        t.tracer.label("lora adapters", adapters.params)
    elif h.ttt_enabled:
        tg.ttt_params(model, h.ttt_freeze_blocks)
    t.tracer.phase()
    score(t, model, h.eval_len, "eval scoring (roundtrip/sliding)")
    if h.ttt_enabled and h.ttt_mode == "chunk":
        trace_ttt_rows(t, model, "chunk TTT train_rows")
    if adapters is not None:
        trace_lora(t, model, adapters)
        if h.ttt_mode == "phased":
            adapters.attach(False)
            trace_ttt_rows(t, model, "phased global-SGD train_rows")
            model.requires_grad_(False)


def trace_ttt_rows(t: Trace, model, name: str) -> None:
    """train_rows over one TTT_BATCH_SEQS batch of eval-length rows, twice: the second with SGD's momentum."""
    h, rt = t.h, t.rt
    L = h.eval_len
    params, _ = tg.ttt_params(model, h.ttt_freeze_blocks)
    opt = tg.ttt_optimizer(params, h)
    rows = np.arange(0, L * h.ttt_batch_seqs, L)[:, None] + np.arange(L)
    rows = rows[: h.ttt_batch_seqs] if h.ttt_mode != "chunk" else rows[: h.ttt_chunk_tokens // L]
    tokens = torch.randint(0, h.vocab_size, (int(rows.max()) + 2,), dtype=torch.int32)
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
    L, R = h.eval_len, h.ttt_docs_per_batch
    wide = dataclasses.replace(h, ttt_lora_chunk=L)
    opt = tg.lora_optimizer(adapters.params, h)
    for g in opt.param_groups:
        g["foreach"] = True  # as on CUDA (torch's default there)
    batch = np.array([[0, 2 * L + 1]] * R)
    tokens = torch.randint(0, h.vocab_size, (2 * L + 3,), dtype=torch.int32)
    adapters.attach(True)
    model.eval()
    t.tracer.phase()
    counter = SavedBytes(t.tracer)
    x = tokens[:L].long().repeat(h.lora_rows, 1)  # one pass: TTT_LORA_ROWS_PER_PASS of the batch's rows
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
    t.record("LoRA TTT lora_batch", saved, rows=h.lora_rows, docs=R, width=L)
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
    model, optimizers, loader, averager, snapshot = trace_training(t)
    return trace_after_training(t, model, loader, averager)


def artifact_bytes(env: dict) -> dict:
    """The default plan's bytes at record scale, on a trained-like model (bench_quant.trained_like): the
    order-0 entropy of the int symbols + 2 B per fp16 value (train_gpt.entropy_bytes) + the shipped train_gpt.py (packed)."""
    import bench_quant

    h, state = bench_quant.trained_like(env)
    qstate = tg.quantize_state(state, tg.quant_plan(h))
    model = int(tg.entropy_bytes(qstate))
    code, _ = tg.shipped_code_bytes(tg.read_source(str(REPO / "train_gpt.py")), h)  # what the budget counts
    return dict(model_bytes_est=model, code_bytes=code, total_bytes_est=model + code, limit=tg.RULE_BYTES)


def verdicts(phases: list, calibration: float) -> None:
    """PASS/FAIL per GPU, eager and compiled-estimate: 'FAIL/PASS' = eager over, compiled estimate under."""
    for row in phases:
        row["calibrated_gib"] = row["peak_gib"] * calibration
        for gpu, limit in LIMITS_GIB.items():
            row[gpu] = "/".join("PASS" if row[k] <= limit else "FAIL" for k in ("peak_gib", "calibrated_gib"))


def preflight(
    name: str, env: dict, world: int, calibration: float, with_bytes: bool, parts=("train", "eval")
) -> dict:
    h = tg.Hyperparameters.from_env(env)
    t0 = time.time()
    result = dict(config=name, **trace_config(h, world, parts))
    if with_bytes:
        result["bytes"] = artifact_bytes(env)
    verdicts(result["phases"], calibration)
    result["seconds"] = round(time.time() - t0, 1)
    return result


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


def summary_lines(r: dict) -> list[str]:
    lines = [f"{r['config']}: {r['params']:,} params, world {r['world']}, traced in {r['seconds']} s"]
    if "bytes" in r:
        b = r["bytes"]
        lines.append(
            f"  artifact est. {b['total_bytes_est']:,} B (model {b['model_bytes_est']:,} entropy estimate + code "
            f"{b['code_bytes']:,}) vs {b['limit']:,}: {'PASS' if b['total_bytes_est'] <= b['limit'] else 'FAIL'}"
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
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("configs", nargs="*", default=["defaults"], help="configs/*.env files, or 'defaults'")
    p.add_argument("--world", type=int, default=8, help="ranks (8: the record's 8xH100)")
    p.add_argument("--set", action="append", default=[], help="KEY=VALUE over every config")
    p.add_argument("--no-bytes", action="store_true", help="skip the artifact-size estimate")
    p.add_argument("--calibrate", action="store_true", help="recompute the calibration ratio vs 26.9 GiB")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    calibration = calibrate() if args.calibrate else CALIBRATION
    results = []
    for arg in args.configs:
        name, env = load_config(arg)
        results.append(
            preflight(name, {**env, **parse_sets(args.set)}, args.world, calibration, not args.no_bytes)
        )
        print("\n".join(summary_lines(results[-1])), flush=True)
    print(
        f"\nper-rank peak memory, world {args.world}; calibrated = eager x {calibration:.3f} (compiled/eager, "
        f"R23 world 1 vs {MEASURED_R23_WORLD1_MIB:,} MiB measured); limits {LIMITS_GIB['H100']:.1f} and "
        f"{LIMITS_GIB['H200']:.1f} GiB (the whole GPU)"
    )
    print(table(results))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(dict(calibration=calibration, results=results), indent=1))


if __name__ == "__main__":
    main()
