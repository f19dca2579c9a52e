"""
Parameter Golf: train the GPT that compresses FineWeb best (val_bpb) within three hard limits:
an artifact of at most 16,000,000 bytes (compressed weights + this file), at most 600 s of training
on 8xH100 SXM, and at most 600 s of evaluation.

Run
  record, 8xH100:         torchrun --standalone --nproc_per_node=8 train_gpt.py
  one GPU, or a laptop:   python3 train_gpt.py        (CPU: gloo + eager; shrink the model, see README)
  N processes:            torchrun --standalone --nproc_per_node=N train_gpt.py   (N divides 8)
  verify an artifact:     EVAL_ONLY_ARTIFACT=final_model.int6.ptz python3 train_gpt.py
Every knob is an environment variable named after its Hyperparameters field (NUM_LAYERS=11, ...).

One run: train (Muon + AdamW, wallclock warmdown, EMA/SWA, late QAT, optional depth recurrence)
-> quantize (int6 GPTQ-lite or full GPTQ, int8 embeddings) -> compress -> atomic write -> read the
artifact back from disk -> score it (non-overlapping, sliding window, legal score-first TTT) ->
PASS/FAIL lines for every budget and rule, and a JSON summary next to the log.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import dataclasses
import glob
import hashlib
import importlib
import json
import lzma
import math
import os
import platform
import resource
import shutil
import struct
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import sentencepiece as spm
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

# =====================================================================================================
# HYPERPARAMETERS
# Every knob is an env var named like its field, upper-cased. Parsed in from_env (never at import),
# validated before any work, so a typo fails in a second with the variable's name, not after a compile.
# Defaults are the 8xH100 record configuration.
# =====================================================================================================


class ConfigError(ValueError):
    """Bad user input (an env var, a data file, an artifact); the message names the culprit."""


def knob(default, lo=None, hi=None, choices=None):
    return dataclasses.field(default=default, metadata={"lo": lo, "hi": hi, "choices": choices})


@dataclasses.dataclass(frozen=True)
class Hyperparameters:
    # data and run
    data_path: str = "./data/datasets/fineweb10B_sp1024"  # folder of fineweb_{train,val}_*.bin shards
    tokenizer_path: str = "./data/tokenizers/fineweb_1024_bpe.model"  # SentencePiece model of the shards
    run_id: str = ""  # names logs/{RUN_ID}.txt and .json; "" = a fresh uuid4
    seed: int = knob(1337, 0, 2 ** 32 - 1)  # model init (data order is fixed by the shards)
    vocab_size: int = knob(1024, 2, 65536)  # must equal the tokenizer's piece count
    val_max_tokens: int = knob(0, 0)  # score only this many val targets (0 = all; not a record)
    # training schedule
    iterations: int = knob(20000, 1)  # step limit (the wallclock cap usually stops training first)
    max_wallclock_seconds: float = knob(600.0, 0.0)  # training time cap; 0 = none (iteration warmdown)
    train_batch_tokens: int = knob(786432, 1)  # global tokens per step, fixed for any number of processes
    train_seq_len: int = knob(2048, 2)  # training sequence length
    warmup_steps: int = knob(20, 0)  # compile warm-up steps, undone before the timer starts
    warmdown_iters: int = knob(3500, 0)  # linear LR decay over the last this-many (projected) steps
    min_lr: float = knob(0.0, 0.0, 1.0)  # floor of the warmdown LR multiplier
    grad_clip_norm: float = knob(0.3, 0.0)  # global norm of the rank-averaged gradients; 0 = off
    val_loss_every: int = knob(4000, 0)  # validate every N steps and at the last; 0 = never while training
    val_batch_size: int = knob(524288, 1)  # tokens per eval forward, all ranks together
    train_log_every: int = knob(500, 1)  # train_loss line period (steps 1-10 are always logged)
    compile: str = knob("auto", choices=("auto", "0", "1"))  # torch.compile; auto = on for CUDA only
    # model
    num_layers: int = knob(11, 1)  # logical layers of the base schedule
    unique_layers: int = knob(0, 0)  # physical blocks (0 = NUM_LAYERS); layer i runs block i % this
    loop_start: int = knob(-1, -1)  # extra passes over base layers [LOOP_START, LOOP_END] ...
    loop_end: int = knob(-1, -1)  # ... (inclusive) ...
    loop_repeats: int = knob(0, 0)  # ... this many times, inserted after LOOP_END; 0 = no loop
    loop_enable_at: tuple[float, ...] = (0.5,)  # training fraction at which each pass switches on
    model_dim: int = knob(512, 2)  # residual width
    num_heads: int = knob(8, 1)  # query heads
    num_kv_heads: int = knob(4, 1)  # key/value heads (GQA)
    mlp_mult: float = knob(3.0, 0.0)  # MLP hidden width / MODEL_DIM
    mlp_neg_slope: float = knob(0.5, 0.0, 1.0)  # LeakyReLU(s)^2; 0 = relu^2 (the baseline)
    logit_softcap: float = knob(30.0, 0.0)  # logits = c * tanh(z / c); 0 = off
    rope_base: float = knob(10000 * 2 ** (16 / 14), 1.0)  # RoPE base at TRAIN_SEQ_LEN (R23: 10000 NTK-stretched 1024->2048)
    rope_dims: int = knob(16, 0)  # rotated dims per head (0 = all)
    qk_gain_init: float = 1.5  # initial learnable per-head query scale
    tied_embed_init_std: float = knob(0.005, 0.0)  # init std of the tied embedding
    ln_scale: bool = True  # block inputs scaled by 1/sqrt(layer+1)
    xsa_last_n: int = knob(4, 0)  # XSA on the last N logical layers
    bigram_vocab_size: int = knob(1536, 0)  # BigramHash buckets; 0 = off
    bigram_dim: int = knob(128, 1)  # BigramHash table width
    smear_gate: bool = True  # SmearGate on the input embedding
    ve_layers: tuple[int, ...] = (9, 10)  # logical layers with value embeddings ("" = none)
    ve_dim: int = knob(128, 1)  # value-embedding table width
    parallel_start: int = knob(-1, -1)  # first logical layer with two residual lanes (-1 = off)
    # optimizers
    matrix_lr: float = knob(0.025, 0.0)  # Muon LR (block matrices)
    scalar_lr: float = knob(0.025, 0.0)  # AdamW LR of gains, scales and small projections
    tied_embed_lr: float = knob(0.035, 0.0)  # AdamW LR of the embedding tables
    muon_momentum: float = knob(0.99, 0.0, 1.0)  # Nesterov momentum after warm-up
    muon_momentum_warmup_start: float = knob(0.92, 0.0, 1.0)  # ... rising linearly from this ...
    muon_momentum_warmup_steps: int = knob(1500, 0)  # ... over this many steps
    muon_backend_steps: int = knob(5, 1)  # Newton-Schulz iterations
    muon_ns: str = knob("classic", choices=("classic", "polar"))  # NS coefficients: quintic or Polar Express
    muon_eq_r: bool = False  # row-normalize the update before Newton-Schulz (MuonEq-R)
    muon_wd: float = knob(0.04, 0.0)  # Muon decoupled weight decay (x scheduled LR)
    adam_wd: float = knob(0.04, 0.0)  # AdamW weight decay
    beta1: float = knob(0.9, 0.0, 1.0)  # AdamW beta1 (also TTT with AdamW)
    beta2: float = knob(0.95, 0.0, 1.0)  # AdamW beta2
    adam_eps: float = knob(1e-8, 1e-30)  # AdamW epsilon (0 gives 0/0 = nan on a zero gradient)
    # weight averaging and QAT
    ema_decay: float = knob(0.997, 0.0, 1.0)  # EMA of the weights every step; 0 = off
    swa_every: int = knob(0, 0)  # SWA snapshot period (of the EMA when on); 0 = off
    swa_start_lrmul: float = knob(0.2, 0.0, 1.0)  # SWA collects once the LR multiplier is below this
    late_qat_threshold: float = knob(0.15, 0.0, 1.0)  # fake-quant once the LR multiplier < this; 0 = off
    # export
    quant_bits: int = knob(6, 2, 8)  # block matrices (also the QAT grid)
    embed_bits: int = knob(8, 2, 8)  # embedding tables
    quant_method: str = knob("lite", choices=("lite", "full"))  # per-row clip search, or + Hessian GPTQ
    gptq_calib_batches: int = knob(16, 1)  # training micro-batches per rank for the Hessians (full)
    gptq_reserve_seconds: float = knob(8.0, 0.0)  # training stops this early to calibrate in budget (full)
    gptq_damp: float = knob(0.01, 1e-6)  # Hessian damping, relative to its mean diagonal (x10 per failed try)
    compressor: str = knob("zstd", choices=("zstd", "brotli", "lzma"))  # zstd-22, brotli-11 or lzma-9e
    artifact_path: str = "final_model.int6.ptz"  # where the artifact is written
    byte_budget: int = knob(16_000_000, 1)  # total-bytes limit; can only tighten the 16,000,000 rule
    auto_fit: bool = False  # over budget: prune the cheapest int values until it fits
    eval_only_artifact: str = ""  # path: skip training, score this artifact (what a verifier runs)
    # evaluation
    eval_seq_len: int = knob(0, 0)  # scoring window (0 = TRAIN_SEQ_LEN)
    eval_stride: int = knob(64, 1)  # sliding-window stride: new targets per window
    eval_sliding: bool = True  # the sliding-window pass (TTT's scoring pass is one too)
    eval_budget_seconds: float = knob(600.0, 0.0)  # timed eval budget; TTT cuts epochs to fit
    ttt_enabled: bool = True  # legal score-first test-time training
    ttt_chunk_tokens: int = knob(32768, 1)  # tokens scored, then trained on, per step of the pass
    ttt_epochs: int = knob(3, 0)  # passes over each scored chunk (the budget guard may lower it)
    ttt_optimizer: str = knob("sgd", choices=("sgd", "adamw"))  # TTT optimizer (one, across chunks)
    ttt_lr: float = knob(0.002, 0.0)  # peak TTT LR, cosine-decayed across chunks
    ttt_momentum: float = knob(0.9, 0.0, 1.0)  # SGD momentum
    ttt_freeze_blocks: int = knob(0, 0)  # first N logical layers stay fixed
    ttt_grad_clip: float = knob(1.0, 0.0)  # global-norm clip of TTT gradients; 0 = off
    ttt_batch_seqs: int = knob(32, 1)  # sequences per TTT step, all ranks together

    @classmethod
    def from_env(cls, env) -> Hyperparameters:
        values = {}
        for f in dataclasses.fields(cls):
            key = f.name.upper()
            if key not in env:
                continue
            raw = env[key].strip()
            kind = f.type.split("[")[0]
            try:
                if kind == "tuple":
                    item = float if "float" in f.type else int
                    value = tuple(item(v) for v in raw.split(",") if v.strip())
                elif kind == "bool":
                    if raw.lower() not in ("0", "1", "true", "false", "yes", "no", "on", "off"):
                        raise ValueError
                    value = raw.lower() in ("1", "true", "yes", "on")
                else:
                    value = {"int": int, "float": float, "str": str}[kind](raw)
                if isinstance(value, float) and not math.isfinite(value):
                    raise ValueError
            except ValueError:
                raise ConfigError(f"{key}={env[key]!r}: expected {f.type} (default {f.default!r})") from None
            lo, hi, choices = f.metadata.get("lo"), f.metadata.get("hi"), f.metadata.get("choices")
            if (lo is not None and value < lo) or (hi is not None and value > hi):
                raise ConfigError(f"{key}={raw}: must be in [{lo}, {'inf' if hi is None else hi}]")
            if choices and value not in choices:
                raise ConfigError(f"{key}={raw!r}: must be one of {', '.join(choices)}")
            values[f.name] = value
        h = cls(**values)
        h.validate()
        return h

    @property
    def eval_len(self) -> int:
        return self.eval_seq_len or self.train_seq_len

    @property
    def logical_layers(self) -> int:
        return len(layer_slots(self))

    def validate(self) -> None:
        def need(ok: bool, msg: str):
            if not ok:
                raise ConfigError(msg)

        need(self.model_dim % self.num_heads == 0,
             f"MODEL_DIM={self.model_dim} must be divisible by NUM_HEADS={self.num_heads}")
        need(self.num_heads % self.num_kv_heads == 0,
             f"NUM_HEADS={self.num_heads} must be a multiple of NUM_KV_HEADS={self.num_kv_heads}")
        head_dim = self.model_dim // self.num_heads
        need(head_dim % 2 == 0, f"head dim MODEL_DIM/NUM_HEADS={head_dim} must be even for RoPE")
        need(4 <= (self.rope_dims or head_dim) <= head_dim and self.rope_dims % 2 == 0,
             f"ROPE_DIMS={self.rope_dims}: the rotated dims per head ({self.rope_dims or head_dim}) must be even and in "
             f"[4, head dim MODEL_DIM/NUM_HEADS={head_dim}] (0 = all; the NTK stretch needs more than 2)")
        need(self.unique_layers <= self.num_layers,
             f"UNIQUE_LAYERS={self.unique_layers} cannot exceed NUM_LAYERS={self.num_layers}")
        if self.loop_repeats:
            need(0 <= self.loop_start <= self.loop_end < self.num_layers,
                 f"LOOP_START={self.loop_start}, LOOP_END={self.loop_end}: need 0 <= start <= end < "
                 f"NUM_LAYERS={self.num_layers} when LOOP_REPEATS={self.loop_repeats}")
            need(len(self.loop_enable_at) in (1, self.loop_repeats)
                 and all(0.0 <= f <= 1.0 for f in self.loop_enable_at),
                 f"LOOP_ENABLE_AT={self.loop_enable_at}: one fraction in [0, 1], or one per repeat")
        n = self.logical_layers
        need(all(0 <= i < n for i in self.ve_layers), f"VE_LAYERS={self.ve_layers}: logical layers are 0..{n - 1}")
        need(self.xsa_last_n <= n, f"XSA_LAST_N={self.xsa_last_n} exceeds the {n} logical layers")
        need(self.parallel_start < n, f"PARALLEL_START={self.parallel_start} exceeds the {n} logical layers")
        need(self.ttt_freeze_blocks <= n, f"TTT_FREEZE_BLOCKS={self.ttt_freeze_blocks} exceeds {n} layers")
        need(self.train_batch_tokens % (8 * self.train_seq_len) == 0,
             f"TRAIN_BATCH_TOKENS={self.train_batch_tokens} must be a multiple of 8*TRAIN_SEQ_LEN="
             f"{8 * self.train_seq_len} (8 micro-batches of whole sequences per step)")
        need(self.eval_stride <= self.eval_len, f"EVAL_STRIDE={self.eval_stride} exceeds the eval length {self.eval_len}")
        need(self.ttt_chunk_tokens % self.eval_stride == 0,
             f"TTT_CHUNK_TOKENS={self.ttt_chunk_tokens} must be a multiple of EVAL_STRIDE={self.eval_stride}")
        need(self.ttt_chunk_tokens % min(self.eval_len, self.ttt_chunk_tokens) == 0,
             f"TTT_CHUNK_TOKENS={self.ttt_chunk_tokens} must be a multiple of the eval length {self.eval_len} "
             "(or smaller than it)")
        need(self.bigram_vocab_size != 1, "BIGRAM_VOCAB_SIZE=1: 0 (off) or >= 2 buckets (one is for sequence starts)")
        need(int(self.mlp_mult * self.model_dim) >= 1, f"MLP_MULT={self.mlp_mult} gives no MLP hidden unit at "
             f"MODEL_DIM={self.model_dim}")
        need(self.logit_softcap == 0 or self.logit_softcap >= 1, f"LOGIT_SOFTCAP={self.logit_softcap}: 0 (off) or >= 1")
        need(not self.val_max_tokens or self.val_max_tokens >= max(self.eval_len, self.train_seq_len),
             f"VAL_MAX_TOKENS={self.val_max_tokens} is shorter than one window of max(TRAIN_SEQ_LEN, eval length) = "
             f"{max(self.eval_len, self.train_seq_len)} tokens")
        need(self.quant_method != "full" or not self.max_wallclock_seconds
             or self.gptq_reserve_seconds < self.max_wallclock_seconds,
             f"GPTQ_RESERVE_SECONDS={self.gptq_reserve_seconds} leaves no training time under "
             f"MAX_WALLCLOCK_SECONDS={self.max_wallclock_seconds} (QUANT_METHOD=full)")
        need(self.beta1 ** 2 < self.beta2 < 1, f"BETA1={self.beta1}, BETA2={self.beta2}: need BETA1^2 < BETA2 < 1 "
             "(else Adam's step, momentum over the root second moment, is unbounded)")
        need(self.muon_ns == "classic" or self.muon_backend_steps == 5,
             "MUON_NS=polar has exactly 5 tuned steps: set MUON_BACKEND_STEPS=5")

    def model_config(self) -> dict:
        """The fields that shape the network: stored in the artifact so a verifier rebuilds it."""
        return {k: getattr(self, k) for k in MODEL_FIELDS}


MODEL_FIELDS = ("vocab_size", "num_layers", "unique_layers", "loop_start", "loop_end", "loop_repeats",
                "loop_enable_at", "model_dim", "num_heads", "num_kv_heads", "mlp_mult", "mlp_neg_slope",
                "logit_softcap", "rope_base", "rope_dims", "qk_gain_init", "ln_scale", "xsa_last_n",
                "bigram_vocab_size", "bigram_dim", "smear_gate", "ve_layers", "ve_dim", "parallel_start",
                "train_seq_len")


# =====================================================================================================
# RUNTIME AND LOGGING
# One code path for CUDA (NCCL, bf16 autocast, torch.compile) and CPU (gloo, fp32, eager). The global
# batch is always 8 micro-batches, so 1, 2, 4 or 8 processes train the same model.
# =====================================================================================================


@dataclasses.dataclass
class Runtime:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    compile: bool

    @property
    def is_master(self) -> bool:
        return self.rank == 0

    @property
    def grad_accum(self) -> int:
        return 8 // self.world_size

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def autocast(self):
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def all_reduce(self, t: Tensor, op=None) -> Tensor:
        if self.world_size > 1:
            dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
        return t

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


def parse_dist_env(env) -> tuple[int, int, int]:
    try:
        rank, world, local = (int(env.get(k, d)) for k, d in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)))
    except ValueError:
        raise ConfigError("RANK, WORLD_SIZE and LOCAL_RANK must be integers (torchrun sets them)") from None
    if world < 1 or 8 % world:
        raise ConfigError(f"WORLD_SIZE={world}: the global batch is 8 micro-batches, so the number of "
                          "processes must divide 8 (1, 2, 4 or 8)")
    if not 0 <= rank < world:
        raise ConfigError(f"RANK={rank} must be in [0, WORLD_SIZE={world})")
    return rank, world, local


def setup_runtime(h: Hyperparameters, env) -> Runtime:
    rank, world, local = parse_dist_env(env)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if world > 1:
        dist.init_process_group(backend="nccl" if cuda else "gloo", rank=rank, world_size=world,
                                **({"device_id": device} if cuda else {}))
    use_compile = cuda if h.compile == "auto" else h.compile == "1"
    if use_compile:
        torch._dynamo.config.cache_size_limit = 32  # train/eval shapes x recurrence stages x QAT
    return Runtime(rank, world, local, device, use_compile)


class Log:
    """Rank 0 writes logs/{RUN_ID}.txt (and echoes to stdout); other ranks stay silent."""

    def __init__(self, path: Path | None):
        self.path = path
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.file = open(path, "a", encoding="utf-8")

    def __call__(self, msg: str, console: bool = True) -> None:
        if self.path is None:
            return
        if console:
            print(msg, flush=True)
        self.file.write(msg + "\n")
        self.file.flush()


def log_header(log: Log, h: Hyperparameters, rt: Runtime, code: str) -> None:
    log(code, console=False)
    log("=" * 100, console=False)
    log(f"Running Python {sys.version.split()[0]} PyTorch {torch.__version__} numpy {np.__version__} "
        f"on {platform.platform()}")
    if rt.device.type == "cuda":
        smi = shutil.which("nvidia-smi")
        info = subprocess.run([smi], capture_output=True, text=True).stdout if smi else ""
        log(info or f"device: {torch.cuda.get_device_name(rt.device)}", console=False)
        log(f"device:{torch.cuda.get_device_name(rt.device)} x{rt.world_size} cuda:{torch.version.cuda}")
    else:
        log(f"device:cpu x{rt.world_size} threads:{torch.get_num_threads()}")
    log("=" * 100, console=False)
    log("hyperparameters:" + json.dumps(dataclasses.asdict(h), sort_keys=True))


def now() -> float:
    return time.perf_counter()


# =====================================================================================================
# DATA
# Official shards: 256 little-endian int32 header (magic 20240520, version 1, token count), then uint16
# tokens; each document is BOS + tokens. Every shard is checked before any work. Training reads the
# sorted shards as one endless stream; each step takes the next contiguous span and gives each rank
# its slice, so the tokens seen do not depend on the number of processes.
# =====================================================================================================

SHARD_MAGIC, SHARD_VERSION, HEADER_BYTES = 20240520, 1, 256 * 4
BOS_ID = 1


def shard_token_count(path: str) -> int:
    size = os.path.getsize(path)
    if size < HEADER_BYTES:
        raise ConfigError(f"{path}: {size} bytes is shorter than the {HEADER_BYTES}-byte shard header")
    header = np.fromfile(path, dtype="<i4", count=256)
    if header[0] != SHARD_MAGIC or header[1] != SHARD_VERSION:
        raise ConfigError(f"{path}: magic/version {header[0]}/{header[1]}, expected {SHARD_MAGIC}/{SHARD_VERSION} "
                          "(not a Parameter Golf token shard)")
    n = int(header[2])
    if size != HEADER_BYTES + 2 * n:
        raise ConfigError(f"{path}: header says {n} tokens, so {HEADER_BYTES + 2 * n} bytes, but the file has "
                          f"{size} (truncated or corrupted)")
    return n


def load_shard(path: str) -> np.ndarray:
    return np.fromfile(path, dtype="<u2", count=shard_token_count(path), offset=HEADER_BYTES)


def find_shards(h: Hyperparameters, split: str) -> tuple[list[str], int]:
    pattern = os.path.join(h.data_path, f"fineweb_{split}_*.bin")
    files = sorted(glob.glob(pattern))
    if not files:
        raise ConfigError(f"no {split} shards match {pattern}: set DATA_PATH (build data with "
                          "`python3 data/prepare_data.py`, or download FineWeb, see README)")
    total = sum(shard_token_count(f) for f in files)
    if total == 0:
        raise ConfigError(f"the {split} shards under {pattern} hold no tokens")
    return files, total


class TrainLoader:
    """Endless stream over the train shards; next_batch gives this rank's micro-batch."""

    def __init__(self, files: list[str], rt: Runtime):
        self.files, self.rt = files, rt
        self.file_idx, self.pos, self.tokens = 0, 0, load_shard(files[0])

    def state(self) -> tuple[int, int]:
        return self.file_idx, self.pos

    def restore(self, state: tuple[int, int]) -> None:
        if state[0] != self.file_idx:
            self.tokens = load_shard(self.files[state[0]])
        self.file_idx, self.pos = state

    def take(self, n: int) -> np.ndarray:
        parts = []
        while n > 0:
            if self.pos == len(self.tokens):
                self.file_idx = (self.file_idx + 1) % len(self.files)
                self.tokens, self.pos = load_shard(self.files[self.file_idx]), 0
            piece = self.tokens[self.pos: self.pos + n]
            parts.append(piece)
            self.pos += len(piece)
            n -= len(piece)
        return np.concatenate(parts) if len(parts) > 1 else parts[0]

    def next_batch(self, global_tokens: int, seq_len: int) -> tuple[Tensor, Tensor]:
        local = global_tokens // (self.rt.world_size * self.rt.grad_accum)
        span = self.take((local + 1) * self.rt.world_size)
        mine = span[self.rt.rank * (local + 1): (self.rt.rank + 1) * (local + 1)]
        t = torch.from_numpy(mine.astype(np.int64)).to(self.rt.device, non_blocking=True)
        return t[:-1].view(-1, seq_len), t[1:].view(-1, seq_len)


def load_val_tokens(h: Hyperparameters, rt: Runtime) -> Tensor:
    """Every evaluator scores whole windows: of the eval length, and of TRAIN_SEQ_LEN while training."""
    files, _ = find_shards(h, "val")
    tokens = np.concatenate([load_shard(f) for f in files])[: h.val_max_tokens + 1 if h.val_max_tokens else None]
    need = max(h.eval_len, h.train_seq_len) + 1
    if len(tokens) < need:
        raise ConfigError(f"the val split ({', '.join(files)}) has {len(tokens)} tokens, fewer than one window + 1 "
                          f"({need}); lower TRAIN_SEQ_LEN/EVAL_SEQ_LEN")
    return torch.from_numpy(tokens.astype(np.int32)).to(rt.device)


# =====================================================================================================
# METRIC: bits per byte
# The one byte rule: a target's bytes are the UTF-8 length of its piece without the SentencePiece "▁",
# plus one for that leading space unless the previous token is a control token (BOS). Byte-fallback
# pieces are one byte each. Summed over a document this equals len(decode(ids).encode()) exactly,
# which a test checks. bpb = total NLL / (ln 2 * total bytes).
# =====================================================================================================


def load_tokenizer(h: Hyperparameters) -> spm.SentencePieceProcessor:
    if not os.path.isfile(h.tokenizer_path):
        raise ConfigError(f"tokenizer file not found: TOKENIZER_PATH={h.tokenizer_path}")
    sp = spm.SentencePieceProcessor(model_file=h.tokenizer_path)
    if sp.vocab_size() != h.vocab_size:
        raise ConfigError(f"{h.tokenizer_path} has {sp.vocab_size()} pieces but VOCAB_SIZE={h.vocab_size}")
    if sp.bos_id() != BOS_ID:
        raise ConfigError(f"{h.tokenizer_path}: bos_id is {sp.bos_id()}, the shard format needs {BOS_ID}")
    return sp


def read_manifest(h: Hyperparameters, tokenizer_sha: str) -> dict:
    """The shards' manifest.json from data/prepare_data.py ({} when there is none, as for FineWeb).
    Its tokenizer must be the one in use: another of the same vocab size gives wrong byte counts."""
    path = os.path.join(h.data_path, "manifest.json")
    if not os.path.isfile(path):
        return {}
    manifest = json.loads(Path(path).read_text(encoding="utf-8"))
    made_with = manifest.get("tokenizer", {})
    if made_with.get("sha256", tokenizer_sha) != tokenizer_sha:
        raise ConfigError(f"{path}: the shards were tokenized with {made_with.get('path')} (sha256 "
                          f"{made_with['sha256']}), but TOKENIZER_PATH={h.tokenizer_path} has sha256 {tokenizer_sha}")
    return manifest


def build_byte_luts(sp: spm.SentencePieceProcessor, device) -> tuple[Tensor, Tensor, Tensor]:
    n = sp.vocab_size()
    base = np.zeros(n, dtype=np.int32)
    leading_space = np.zeros(n, dtype=bool)
    is_control = np.ones(n, dtype=bool)
    for i in range(n):
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
            continue
        is_control[i] = False
        if sp.is_byte(i):
            base[i] = 1
            continue
        piece = sp.id_to_piece(i)
        if piece.startswith("\u2581"):
            leading_space[i], piece = True, piece[1:]
        base[i] = len(piece.encode("utf-8"))
    return tuple(torch.from_numpy(a).to(device) for a in (base, leading_space, is_control))


def target_bytes(prev: Tensor, tgt: Tensor, luts) -> Tensor:
    base, leading_space, is_control = luts
    return base[tgt] + (leading_space[tgt] & ~is_control[prev]).int()


def loss_and_bpb(totals: Tensor) -> tuple[float, float]:
    nll, n_bytes, count = totals.tolist()
    return nll / count, nll / (math.log(2) * n_bytes)


# =====================================================================================================
# MODEL
# GPT with tied embeddings, logit softcap, U-Net skips, input-embedding residual mix, GQA attention with
# q/k RMSNorm, learnable per-head QK gain, partial RoPE and XSA; LeakyReLU^2 MLP; BigramHash, SmearGate
# and value embeddings at the input. Depth recurrence is a schedule of logical layers ("slots") over
# shared physical blocks; each slot keeps its own scales. The hidden-state path is shared by the loss,
# the logits and per-token NLL, so training, scoring and TTT can never run different forwards.
# =====================================================================================================


def rms_norm(x: Tensor) -> Tensor:
    return F.rms_norm(x, (x.size(-1),))


class RMSNorm(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x)


class CastedLinear(nn.Linear):
    """fp32 master weight (autocast computes in bf16). When qat_bits is set, the forward sees the
    exporter's fake-quantized weight with a straight-through gradient. qat_bits is a plain attribute:
    torch.compile guards on it, so flipping it recompiles once instead of being constant-folded."""

    def __init__(self, in_features: int, out_features: int, zero_init: bool = False):
        super().__init__(in_features, out_features, bias=False)
        self.zero_init, self.qat_bits = zero_init, 0

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight
        if self.qat_bits:
            w = w + (fake_quantize(w.detach(), self.qat_bits) - w).detach()
        return F.linear(x, w)


def layer_slots(h) -> list[tuple[int, int]]:
    """The full depth schedule, one (physical block, stage) per logical layer. Base layer i runs block
    i % UNIQUE_LAYERS; LOOP_REPEATS extra passes over base layers [LOOP_START, LOOP_END] follow LOOP_END,
    the r-th pass in stage r, which joins at LOOP_ENABLE_AT of training."""
    physical = h.unique_layers or h.num_layers
    base = [(i % physical, 0) for i in range(h.num_layers)]
    if not h.loop_repeats:
        return base
    passes = [(base[i][0], r) for r in range(1, h.loop_repeats + 1) for i in range(h.loop_start, h.loop_end + 1)]
    return base[: h.loop_end + 1] + passes + base[h.loop_end + 1:]


class Rotary(nn.Module):
    """Partial RoPE tables: the first rope_dims of each head rotate as half-split pairs (d_i, d_i+rd/2).
    Built once here, never lazily (a table first made under inference_mode breaks TTT's autograd).
    Beyond the training length the base is NTK-stretched by (T / train_len)^(rd / (rd - 2))."""

    def __init__(self, rope_dims: int, base: float, train_len: int, eval_len: int):
        super().__init__()
        self.train_len = train_len
        for name, length in (("train", train_len), ("long", max(eval_len, train_len))):
            stretch = (length / train_len) ** (rope_dims / (rope_dims - 2))
            inv_freq = (base * stretch) ** (-torch.arange(0, rope_dims, 2, dtype=torch.float64) / rope_dims)
            angles = torch.outer(torch.arange(length, dtype=torch.float64), inv_freq)
            self.register_buffer(f"cos_{name}", angles.cos().float(), persistent=False)
            self.register_buffer(f"sin_{name}", angles.sin().float(), persistent=False)

    def forward(self, seq_len: int) -> tuple[Tensor, Tensor]:
        if seq_len <= self.train_len:
            return self.cos_train[:seq_len], self.sin_train[:seq_len]
        return self.cos_long[:seq_len], self.sin_long[:seq_len]


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    half = cos.size(-1)
    x1, x2, rest = x[..., :half], x[..., half: 2 * half], x[..., 2 * half:]
    c, s = cos[None, :, None, :].to(x.dtype), sin[None, :, None, :].to(x.dtype)
    return torch.cat((x1 * c - x2 * s, x1 * s + x2 * c, rest), dim=-1)


class Attention(nn.Module):
    def __init__(self, h: Hyperparameters):
        super().__init__()
        dim, self.n_heads, self.n_kv = h.model_dim, h.num_heads, h.num_kv_heads
        self.head_dim = dim // h.num_heads
        kv_dim = self.n_kv * self.head_dim
        self.c_q, self.c_k, self.c_v = CastedLinear(dim, dim), CastedLinear(dim, kv_dim), CastedLinear(dim, kv_dim)
        self.proj = CastedLinear(dim, dim, zero_init=True)
        self.q_gain = nn.Parameter(torch.full((h.num_heads,), h.qk_gain_init))

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, ve: Tensor | None, xsa: bool) -> Tensor:
        B, T, C = x.shape
        q = self.c_q(x).view(B, T, self.n_heads, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv, self.head_dim)
        v = self.c_v(x)
        if ve is not None:
            v = v + ve
        v = v.view(B, T, self.n_kv, self.head_dim)
        q = apply_rope(rms_norm(q), cos, sin)
        q = q * self.q_gain.to(q.dtype)[:, None]
        k = apply_rope(rms_norm(k), cos, sin)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           is_causal=True, enable_gqa=self.n_kv != self.n_heads).transpose(1, 2)
        if xsa:  # remove each head's component along its own position's value vector
            y = y.reshape(B, T, self.n_kv, self.n_heads // self.n_kv, self.head_dim)
            v_hat = F.normalize(v.to(y.dtype), dim=-1).unsqueeze(3)
            y = y - (y * v_hat).sum(-1, keepdim=True) * v_hat
        return self.proj(y.reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, h: Hyperparameters):
        super().__init__()
        hidden = int(h.mlp_mult * h.model_dim)
        self.fc, self.proj = CastedLinear(h.model_dim, hidden), CastedLinear(hidden, h.model_dim, zero_init=True)
        self.neg_slope = h.mlp_neg_slope

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(F.leaky_relu(self.fc(x), self.neg_slope).square())


class LayerControl(nn.Module):
    """Per-logical-layer scales, never shared by recurrence: branch scales, the mix of the running
    stream with the input embedding x0, a value-embedding gain, and the 2x2 lane write-back."""

    def __init__(self, dim: int, value_embed: bool, lanes: bool):
        super().__init__()
        self.attn_scale = nn.Parameter(torch.ones(dim))
        self.mlp_scale = nn.Parameter(torch.ones(dim))
        self.resid_mix = nn.Parameter(torch.stack((torch.ones(dim), torch.zeros(dim))))
        self.ve_scale = nn.Parameter(torch.ones(())) if value_embed else None
        # rows: [attention lane, MLP lane]; cols: [attention out, MLP out]. All ones = the sequential
        # block, so lanes start identical and separate only as training pulls them apart.
        self.lane_mix = nn.Parameter(torch.ones(2, 2)) if lanes else None


class Block(nn.Module):
    """A physical block: attention + MLP weights, run by every logical layer mapped to it."""

    def __init__(self, h: Hyperparameters):
        super().__init__()
        self.attn, self.mlp = Attention(h), MLP(h)

    def forward(self, x, x0: Tensor, c: LayerControl, ln: float, ve, xsa: bool, cos: Tensor, sin: Tensor):
        ve = ve * c.ve_scale if c.ve_scale is not None else None
        if isinstance(x, tuple):  # two residual lanes: attention reads lane 0, the MLP lane 1
            lane_a, lane_m = x
            a_in = c.resid_mix[0] * lane_a + c.resid_mix[1] * x0
            att = c.attn_scale * self.attn(rms_norm(a_in) * ln, cos, sin, ve, xsa)
            m_in = c.resid_mix[0] * lane_m + c.resid_mix[1] * x0 + c.lane_mix[1, 0] * att
            mlp = c.mlp_scale * self.mlp(rms_norm(m_in) * ln)
            return a_in + c.lane_mix[0, 0] * att + c.lane_mix[0, 1] * mlp, m_in + c.lane_mix[1, 1] * mlp
        x = c.resid_mix[0] * x + c.resid_mix[1] * x0
        x = x + c.attn_scale * self.attn(rms_norm(x) * ln, cos, sin, ve, xsa)
        return x + c.mlp_scale * self.mlp(rms_norm(x) * ln)


class BigramHash(nn.Module):
    """Hashed (previous, current) token pair -> table -> projection, scaled. The first position of the
    sequence and every BOS use the reserved bucket, so no pair spans a document boundary."""

    def __init__(self, buckets: int, dim: int, model_dim: int):
        super().__init__()
        self.buckets = buckets
        self.embed = nn.Embedding(buckets, dim)
        nn.init.zeros_(self.embed.weight)
        self.proj = CastedLinear(dim, model_dim)
        self.scale = nn.Parameter(torch.tensor(0.05))

    def forward(self, ids: Tensor, starts: Tensor) -> Tensor:
        prev = F.pad(ids[:, :-1], (1, 0))
        bucket = torch.bitwise_xor(36313 * ids, 27191 * prev) % (self.buckets - 1)
        bucket = torch.where(starts, self.buckets - 1, bucket)
        return self.proj(self.embed(bucket)) * self.scale


class SmearGate(nn.Module):
    """x_t += sigmoid(gate) * (x_{t-1} - x_t), except at a sequence start or a BOS (no mixing across
    documents: the SmearGate BOS fix)."""

    def __init__(self, dim: int):
        super().__init__()
        self.gate = nn.Parameter(torch.zeros(dim))

    def forward(self, x: Tensor, starts: Tensor) -> Tensor:
        prev = F.pad(x[:, :-1], (0, 0, 1, 0))
        g = torch.sigmoid(self.gate).to(x.dtype) * (~starts).unsqueeze(-1).to(x.dtype)
        return x + g * (prev - x)


class ValueEmbedding(nn.Module):
    """One shared token table projected to the KV width, added to v in the VE_LAYERS."""

    def __init__(self, vocab: int, dim: int, kv_dim: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        nn.init.normal_(self.embed.weight, std=0.01)
        self.proj = CastedLinear(dim, kv_dim)
        self.scale = nn.Parameter(torch.tensor(0.1))

    def forward(self, ids: Tensor) -> Tensor:
        return self.proj(self.embed(ids)) * self.scale


class GPT(nn.Module):
    def __init__(self, h: Hyperparameters):
        super().__init__()
        self.slots = layer_slots(h)
        n_logical, dim = len(self.slots), h.model_dim
        kv_dim = h.num_kv_heads * (dim // h.num_heads)
        self.tok_emb = nn.Embedding(h.vocab_size, dim)
        self.bigram = BigramHash(h.bigram_vocab_size, h.bigram_dim, dim) if h.bigram_vocab_size else None
        self.smear = SmearGate(dim) if h.smear_gate else None
        self.value_embed = ValueEmbedding(h.vocab_size, h.ve_dim, kv_dim) if h.ve_layers else None
        self.blocks = nn.ModuleList(Block(h) for _ in range(max(p for p, _ in self.slots) + 1))
        lanes_from = h.parallel_start if h.parallel_start >= 0 else n_logical
        self.controls = nn.ModuleList(LayerControl(dim, i in h.ve_layers, i >= lanes_from) for i in range(n_logical))
        self.skip_weights = nn.ParameterList(nn.Parameter(torch.ones(dim)) for _ in range(n_logical // 2))
        self.ln_factors = [1 / math.sqrt(i + 1) if h.ln_scale else 1.0 for i in range(n_logical)]
        self.xsa = [i >= n_logical - h.xsa_last_n for i in range(n_logical)]
        self.rotary = Rotary(h.rope_dims or dim // h.num_heads, h.rope_base, h.train_seq_len, h.eval_len)
        self.final_norm = RMSNorm()
        self.softcap = h.logit_softcap
        self.set_stage(0)
        nn.init.normal_(self.tok_emb.weight, std=h.tied_embed_init_std)
        for m in self.modules():
            if isinstance(m, CastedLinear):
                nn.init.zeros_(m.weight) if m.zero_init else nn.init.orthogonal_(m.weight)

    @property
    def n_stages(self) -> int:
        return max(s for _, s in self.slots) + 1

    def set_stage(self, stage: int) -> None:
        """Activate the recurrence passes up to `stage` (a new schedule: torch.compile recompiles once)."""
        self.stage = stage
        self.active = tuple(i for i, (_, s) in enumerate(self.slots) if s <= stage)

    def set_qat(self, bits: int) -> None:
        for m in self.blocks.modules():
            if isinstance(m, CastedLinear):
                m.qat_bits = bits

    def hidden(self, ids: Tensor) -> Tensor:
        starts = (ids == BOS_ID) | (torch.arange(ids.size(1), device=ids.device) == 0)
        x = self.tok_emb(ids)
        if self.bigram is not None:
            x = x + self.bigram(ids, starts)
        x = rms_norm(x)
        if self.smear is not None:
            x = self.smear(x, starts)
        x0 = x
        ve = self.value_embed(ids) if self.value_embed is not None else None
        cos, sin = self.rotary(ids.size(1))
        n_enc = len(self.active) // 2
        skips = []
        for pos, i in enumerate(self.active):
            c = self.controls[i]
            if pos >= n_enc and skips:  # U-Net: decoder layer j adds encoder output n_enc-1-j
                skip = self.skip_weights[pos - n_enc] * skips.pop()
                x = (x[0] + skip, x[1] + skip) if isinstance(x, tuple) else x + skip
            if c.lane_mix is not None and not isinstance(x, tuple):
                x = (x, x)
            x = self.blocks[self.slots[i][0]](x, x0, c, self.ln_factors[i], ve, self.xsa[i], cos, sin)
            if pos < n_enc:
                skips.append((x[0] + x[1]) * 0.5 if isinstance(x, tuple) else x)
        if isinstance(x, tuple):
            x = (x[0] + x[1]) * 0.5
        return self.final_norm(x)

    def logits(self, ids: Tensor) -> Tensor:
        z = F.linear(self.hidden(ids), self.tok_emb.weight).float()
        return self.softcap * torch.tanh(z / self.softcap) if self.softcap else z

    def token_nll(self, ids: Tensor, targets: Tensor) -> Tensor:
        z = self.logits(ids)
        return F.cross_entropy(z.view(-1, z.size(-1)), targets.reshape(-1), reduction="none").view_as(targets)

    def forward(self, ids: Tensor, targets: Tensor) -> Tensor:
        return self.token_nll(ids, targets).mean()


def describe_schedule(model: GPT) -> str:
    return " ".join(f"{i}:{p}" + (f"@s{s}" if s else "") for i, (p, s) in enumerate(model.slots))


# =====================================================================================================
# OPTIMIZERS
# Muon for the block matrices: Nesterov momentum, then Newton-Schulz orthogonalization (the classic
# quintic or Polar Express), decoupled weight decay, sqrt(rows/cols) scale. Each rank orthogonalizes a
# contiguous share of every same-shape stack and the results are all-gathered, which equals the
# one-process update. AdamW for embeddings and the small control tensors. Gradients are averaged over
# ranks in flat buckets (no DDP), then clipped by their global norm.
# =====================================================================================================

NS_CLASSIC = ((3.4445, -4.7750, 2.0315),)
NS_POLAR = ((8.156554524902461, -22.48329292557795, 15.878769915207462),
            (4.042929935166739, -2.808917465908714, 0.5000178451051316),
            (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
            (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
            (2.3465413258596377, -1.7097828382687081, 0.42323551169305323))


def newton_schulz(G: Tensor, steps: int, polar: bool) -> Tensor:
    """Approximate U V^T of each matrix in a (n, rows, cols) stack."""
    X = G.to(torch.bfloat16 if G.is_cuda else torch.float32)
    wide = X.size(-2) > X.size(-1)
    if wide:
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * (1.02 if polar else 1.0) + 1e-7)
    for i in range(steps):
        a, b, c = NS_POLAR[i] if polar else NS_CLASSIC[0]
        A = X @ X.mT
        X = a * X + (b * A + c * (A @ A)) @ X
    return X.mT if wide else X


class Muon(torch.optim.Optimizer):
    def __init__(self, params, lr: float, momentum: float, weight_decay: float, steps: int, polar: bool,
                 row_normalize: bool, rt: Runtime):
        super().__init__(list(params), dict(lr=lr, momentum=momentum, weight_decay=weight_decay))
        self.steps, self.polar, self.row_normalize, self.rt = steps, polar, row_normalize, rt
        self.stacks: dict[tuple, list[Tensor]] = {}
        for p in self.param_groups[0]["params"]:
            self.stacks.setdefault(tuple(p.shape), []).append(p)
            self.state[p]["momentum_buffer"] = torch.zeros_like(p)  # once: a step allocates nothing
        self.orthogonalize = torch.compile(newton_schulz) if rt.compile else newton_schulz

    @torch.no_grad()
    def step(self):
        group = self.param_groups[0]
        lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
        rank, world = self.rt.rank, self.rt.world_size
        for (rows, cols), params in self.stacks.items():
            live = [p for p in params if p.grad is not None]  # slots not yet in the schedule get no grad
            if not live:
                continue
            grads = [p.grad for p in live]
            bufs = [self.state[p]["momentum_buffer"] for p in live]
            torch._foreach_mul_(bufs, mu)
            torch._foreach_add_(bufs, grads)
            U = torch.stack(torch._foreach_add(grads, bufs, alpha=mu))  # Nesterov
            if self.row_normalize:
                U = U / (U.norm(dim=-1, keepdim=True) + 1e-7)
            share = -(-len(live) // world)
            U = F.pad(U, (0, 0, 0, 0, 0, share * world - len(live)))
            mine = self.orthogonalize(U[rank * share: (rank + 1) * share], self.steps, self.polar)
            if world > 1:
                gathered = torch.empty((share * world, rows, cols), dtype=mine.dtype, device=mine.device)
                dist.all_gather(list(gathered.chunk(world)), mine.contiguous())
                mine = gathered
            torch._foreach_mul_(live, 1 - lr * wd)
            torch._foreach_add_(live, list(mine[: len(live)].to(live[0].dtype).unbind(0)),
                                alpha=-lr * max(1.0, rows / cols) ** 0.5)


def build_optimizers(model: GPT, h: Hyperparameters, rt: Runtime) -> list[torch.optim.Optimizer]:
    matrices = [p for p in model.blocks.parameters() if p.ndim == 2]
    embeds = [model.tok_emb.weight] + [m.embed.weight for m in (model.bigram, model.value_embed) if m is not None]
    taken = {id(p) for p in matrices + embeds}
    scalars = [p for p in model.parameters() if id(p) not in taken]
    muon = Muon(matrices, h.matrix_lr, h.muon_momentum, h.muon_wd, h.muon_backend_steps, h.muon_ns == "polar",
                h.muon_eq_r, rt)
    adam = torch.optim.AdamW([dict(params=embeds, lr=h.tied_embed_lr), dict(params=scalars, lr=h.scalar_lr)],
                             betas=(h.beta1, h.beta2), eps=h.adam_eps, weight_decay=h.adam_wd,
                             fused=rt.device.type == "cuda")
    for opt in (muon, adam):
        for g in opt.param_groups:
            g["base_lr"] = g["lr"]
    return [muon, adam]


def all_reduce_grads(params: list[Tensor], rt: Runtime, divide_by: float) -> None:
    """Sum gradients over ranks in ~64 MB flat buckets (one collective each), then divide."""
    if rt.world_size == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    bucket, size = [], 0
    for i, g in enumerate(grads):
        bucket.append(g)
        size += g.numel()
        if size >= 1 << 24 or i == len(grads) - 1:
            flat = torch.cat([t.reshape(-1) for t in bucket])
            dist.all_reduce(flat)
            flat /= divide_by
            torch._foreach_copy_(bucket, [v.view_as(t) for v, t in zip(flat.split([t.numel() for t in bucket]), bucket)])
            bucket, size = [], 0


def lr_multiplier(step: int, elapsed_ms: float, cap_ms: float, h: Hyperparameters) -> float:
    """1, then a linear decay to MIN_LR over the last WARMDOWN_ITERS steps, which under a wallclock
    cap are projected from the mean step time so far."""
    if h.warmdown_iters <= 0:
        return 1.0
    if cap_ms > 0:
        warmdown_ms = h.warmdown_iters * elapsed_ms / max(step, 1)
        remaining_ms = max(cap_ms - elapsed_ms, 0.0)
        mul = remaining_ms / max(warmdown_ms, 1e-9) if remaining_ms <= warmdown_ms else 1.0
    else:
        mul = min((h.iterations - step) / h.warmdown_iters, 1.0)
    return max(mul, h.min_lr)


class WeightAverager:
    """EMA of the weights after every optimizer step and/or SWA: the uniform mean of snapshots (of the
    EMA when it is on) taken every SWA_EVERY steps once the LR multiplier is below SWA_START_LRMUL.
    final() says which weights get exported: SWA if it has snapshots, else EMA, else the raw weights."""

    def __init__(self, model: GPT, h: Hyperparameters):
        self.h, self.params = h, [p.detach() for p in model.parameters()]  # views: they follow the weights
        self.ema = [p.float().clone() for p in self.params] if h.ema_decay else None
        self.swa, self.swa_count = None, 0

    @torch.no_grad()
    def update(self, step: int, lr_mul: float, log: Log) -> None:
        if self.ema is not None:
            torch._foreach_lerp_(self.ema, self.params, 1 - self.h.ema_decay)
        if self.h.swa_every and lr_mul < self.h.swa_start_lrmul and step % self.h.swa_every == 0:
            source = self.ema if self.ema is not None else self.params
            if self.swa is None:
                self.swa = [torch.zeros_like(t) for t in source]
                log(f"swa:start step:{step}")
            torch._foreach_add_(self.swa, source)
            self.swa_count += 1

    @torch.no_grad()
    def apply_final(self, log: Log) -> str:
        if self.swa_count:
            label, weights = f"swa({self.swa_count} snapshots{' of ema' if self.ema else ''})", \
                [t / self.swa_count for t in self.swa]
        elif self.ema is not None:
            label, weights = f"ema(decay={self.h.ema_decay})", self.ema
        else:
            return "raw"
        for p, w in zip(self.params, weights):
            p.copy_(w.to(p.dtype))
        log(f"weights:applying {label}")
        return label


# =====================================================================================================
# QUANTIZATION AND SERIALIZATION
# Pure functions: state dict -> quantized tensors -> bytes -> quantized tensors -> state dict.
# Block matrices get int6 per-row scales, embedding tables int8, the small rest fp16. The
# scale of each row comes from a clip search over fractions of the row's max |w| (GPTQ-lite, chosen per
# row, no 1/qmax floor); late QAT fake-quantizes on exactly this grid. Full GPTQ keeps the grid and
# rounds columns in act-order with Hessian error feedback. The artifact is magic + codec + sha256 +
# compressed payload (a JSON header and raw arrays; no pickle), written atomically.
# =====================================================================================================

SMALL_NUMEL = 65536
CLIP_FRACTIONS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)
ARTIFACT_MAGIC = b"PGOLF-Q1"
CODECS = ("zstd", "brotli", "lzma")


def round_to_grid(w: Tensor, scale: Tensor, qmax: int) -> Tensor:
    return torch.clamp(torch.round(w / scale[:, None]), -qmax, qmax)


def fp16_grid(x: Tensor) -> Tensor:
    """Round positive fp32 values in fp16's normal range to fp16 precision, in integer arithmetic: a
    compiled graph may drop a .half().float() round trip, which would move QAT off the export grid."""
    return ((x.view(torch.int32) + 0x1000) & -0x2000).view(torch.float32)


def row_scales(w: Tensor, bits: int) -> Tensor:
    """Per-row scale (exactly representable in fp16) minimizing the row's squared rounding error."""
    qmax = 2 ** (bits - 1) - 1
    amax = w.abs().amax(dim=1)
    best_scale, best_err = None, None
    for fraction in CLIP_FRACTIONS:
        scale = fp16_grid((amax * fraction / qmax).clamp_min(2 ** -14))
        err = (round_to_grid(w, scale, qmax) * scale[:, None] - w).square().sum(dim=1)
        if best_err is None:
            best_scale, best_err = scale, err
        else:
            better = err < best_err
            best_scale, best_err = torch.where(better, scale, best_scale), torch.where(better, err, best_err)
    return best_scale


def fake_quantize(w: Tensor, bits: int) -> Tensor:
    scale = row_scales(w, bits)
    return round_to_grid(w, scale, 2 ** (bits - 1) - 1) * scale[:, None]


def gptq_round(w: Tensor, H: Tensor, scale: Tensor, qmax: int, damp: float, block: int = 128) -> Tensor:
    """GPTQ on a fixed grid: quantize columns in decreasing Hessian-diagonal order, pushing each
    column's error onto the columns not yet quantized through the inverse Hessian's Cholesky factor."""
    W, H = w.clone(), H.clone()
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    order = torch.argsort(H.diagonal(), descending=True)
    W, H = W[:, order], H[order][:, order] / H.diagonal().mean()  # scale-free; damping cannot underflow
    for attempt in range(6):
        L, info = torch.linalg.cholesky_ex(H + torch.eye(len(H), device=H.device) * damp * 10 ** attempt)
        if info == 0:
            U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
        if info == 0:
            break
    else:
        raise ConfigError(f"GPTQ: a Hessian is not positive definite with GPTQ_DAMP={damp} x 1e5 (nan weights? else "
                          "raise GPTQ_DAMP)")
    Q = torch.zeros_like(W)
    for i1 in range(0, W.size(1), block):
        i2 = min(i1 + block, W.size(1))
        W1, E1, U1 = W[:, i1:i2].clone(), torch.zeros_like(W[:, i1:i2]), U[i1:i2, i1:i2]
        for j in range(i2 - i1):
            q = torch.clamp(torch.round(W1[:, j] / scale), -qmax, qmax)
            Q[:, i1 + j] = q
            err = (W1[:, j] - q * scale) / U1[j, j]
            W1[:, j:] -= err[:, None] * U1[j, j:][None, :]
            E1[:, j] = err
        W[:, i2:] -= E1 @ U[i1:i2, i2:]
    return Q[:, torch.argsort(order)]


@dataclasses.dataclass
class QTensor:
    shape: tuple
    bits: int  # 0 = stored as fp16
    values: Tensor  # int8 (rows, cols) when bits, else fp16 with the original shape
    scale: Tensor | None = None  # fp16 per row

    def dequantize(self) -> Tensor:
        if not self.bits:
            return self.values.float()
        return (self.values.float() * self.scale.float()[:, None]).reshape(self.shape)


def tensor_bits(name: str, t: Tensor, h: Hyperparameters) -> int:
    """Block matrices: QUANT_BITS at any size (the grid late QAT trains on). Other tensors above
    65,536 values (the embedding tables): EMBED_BITS. The rest (vectors, gains, small projections) fp16."""
    if name.startswith("blocks.") and t.ndim == 2:
        return h.quant_bits
    return h.embed_bits if t.numel() > SMALL_NUMEL else 0


def quantize_state(state: dict[str, Tensor], h: Hyperparameters, hessians: dict[str, Tensor] | None = None):
    out = {}
    for name, t in state.items():
        t = t.detach().float().cpu()
        bits = tensor_bits(name, t, h)
        if not bits:
            out[name] = QTensor(tuple(t.shape), 0, t.half())
            continue
        w = t.reshape(t.shape[0], -1)
        scale = row_scales(w, bits)
        qmax = 2 ** (bits - 1) - 1
        H = hessians.get(name) if hessians else None
        q = gptq_round(w, H.float().cpu(), scale, qmax, h.gptq_damp) if H is not None else round_to_grid(w, scale, qmax)
        out[name] = QTensor(tuple(t.shape), bits, q.to(torch.int8), scale.half())
    return out


def encode_payload(qstate: dict[str, QTensor], meta: dict) -> bytes:
    """JSON header, then all int8 values, then every fp16 array (scales and small tensors) byte-shuffled:
    high bytes together, then low bytes, which compresses better than interleaved."""
    entries = [[name, list(q.shape), q.bits] for name, q in qstate.items()]
    header = json.dumps({"meta": meta, "tensors": entries}, separators=(",", ":")).encode()
    ints = b"".join(q.values.numpy().tobytes() for q in qstate.values() if q.bits)
    halves = np.concatenate([(q.scale if q.bits else q.values).numpy().reshape(-1) for q in qstate.values()])
    return struct.pack("<I", len(header)) + header + ints + halves.view(np.uint8).reshape(-1, 2).T.tobytes()


def decode_payload(payload: bytes, where: str) -> tuple[dict[str, QTensor], dict]:
    try:
        (n,) = struct.unpack_from("<I", payload)
        head = json.loads(payload[4: 4 + n])
        entries, pos = head["tensors"], 4 + n
        n_ints = sum(math.prod(s) for _, s, b in entries if b)
        rows = sum(s[0] if b else math.prod(s) for _, s, b in entries)
        if len(payload) != pos + n_ints + 2 * rows:
            raise ValueError(f"payload is {len(payload)} bytes, its header implies {pos + n_ints + 2 * rows}")
        ints = np.frombuffer(payload, dtype=np.int8, count=n_ints, offset=pos)
        halves = np.frombuffer(payload, dtype=np.uint8, offset=pos + n_ints).reshape(2, -1).T.copy().view(np.float16)
    except (struct.error, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{where}: malformed artifact payload ({e})") from None
    out, i_pos, h_pos = {}, 0, 0
    for name, shape, bits in entries:
        if bits:
            r, c = shape[0], math.prod(shape) // shape[0]
            values = torch.from_numpy(ints[i_pos: i_pos + r * c].reshape(r, c).copy())
            scale = torch.from_numpy(halves[h_pos: h_pos + r].reshape(-1).copy())
            out[name] = QTensor(tuple(shape), bits, values, scale)
            i_pos, h_pos = i_pos + r * c, h_pos + r
        else:
            k = math.prod(shape)
            out[name] = QTensor(tuple(shape), 0, torch.from_numpy(halves[h_pos: h_pos + k].reshape(shape).copy()))
            h_pos += k
    return out, head["meta"]


def _codec_module(codec: str):
    if codec == "lzma":
        return lzma
    package = {"zstd": "zstandard", "brotli": "brotli"}[codec]
    try:
        return importlib.import_module(package)
    except ImportError:
        raise ConfigError(f"COMPRESSOR={codec} needs the {package} package: pip install {package}") from None


def compress(data: bytes, codec: str) -> bytes:
    mod = _codec_module(codec)
    if codec == "zstd":
        return mod.ZstdCompressor(level=22).compress(data)
    if codec == "brotli":
        return mod.compress(data, quality=11)
    return mod.compress(data, preset=9 | lzma.PRESET_EXTREME)


def decompress(data: bytes, codec: str) -> bytes:
    mod = _codec_module(codec)
    return mod.ZstdDecompressor().decompress(data) if codec == "zstd" else mod.decompress(data)


def pack_artifact(qstate: dict[str, QTensor], meta: dict, codec: str) -> bytes:
    body = compress(encode_payload(qstate, meta), codec)
    return ARTIFACT_MAGIC + bytes([CODECS.index(codec)]) + hashlib.sha256(body).digest() + body


def read_artifact(path: str) -> tuple[dict[str, QTensor], dict]:
    if not os.path.isfile(path):
        raise ConfigError(f"artifact not found: {path}")
    blob = Path(path).read_bytes()
    head = len(ARTIFACT_MAGIC) + 1 + 32
    if len(blob) < head or blob[: len(ARTIFACT_MAGIC) - 1] != ARTIFACT_MAGIC[:-1]:
        raise ConfigError(f"{path}: not a Parameter Golf artifact (bad magic; expected {ARTIFACT_MAGIC!r})")
    if blob[: len(ARTIFACT_MAGIC)] != ARTIFACT_MAGIC:
        raise ConfigError(f"{path}: artifact format {blob[:len(ARTIFACT_MAGIC)]!r}, this script reads {ARTIFACT_MAGIC!r}")
    codec_id, digest, body = blob[len(ARTIFACT_MAGIC)], blob[len(ARTIFACT_MAGIC) + 1: head], blob[head:]
    if codec_id >= len(CODECS):
        raise ConfigError(f"{path}: unknown codec id {codec_id}")
    if hashlib.sha256(body).digest() != digest:
        raise ConfigError(f"{path}: sha256 mismatch, the artifact is truncated or corrupted")
    try:
        payload = decompress(body, CODECS[codec_id])
    except Exception as e:  # a decoder error on checksummed bytes means a foreign or broken writer
        raise ConfigError(f"{path}: {CODECS[codec_id]} decompression failed ({e})") from None
    return decode_payload(payload, path)


def write_atomic(path: str, data: bytes) -> None:
    """Temp file + fsync + rename: an interrupted run never leaves a truncated file under `path`."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def prune_to_fit(qstate: dict[str, QTensor], originals: dict[str, Tensor], limit: int, make_blob, log: Log):
    """Zero the int values whose loss costs least (zeroing q raises the squared error by
    w^2 - (w - q*s)^2, smallest for +-1) until the artifact fits `limit` bytes. The bytes saved per
    pruned value are measured on each pass, not guessed."""
    names = [n for n, q in qstate.items() if q.bits]
    if not names:
        raise ConfigError("AUTO_FIT: nothing to prune, no tensor is int-quantized")
    costs, which, flat_idx = [], [], []
    for k, n in enumerate(names):
        q = qstate[n]
        w, s = originals[n].float().reshape(q.values.shape), q.scale.float()[:, None]
        idx = (q.values != 0).flatten().nonzero().squeeze(1)
        costs.append((w.square() - (w - q.values.float() * s).square()).flatten()[idx])
        which.append(torch.full_like(idx, k))
        flat_idx.append(idx)
    order = torch.argsort(torch.cat(costs))
    which, flat_idx = torch.cat(which)[order], torch.cat(flat_idx)[order]
    blob, pruned, rate = make_blob(), 0, 0.25  # first guess: a pruned value saves ~2 bits
    while len(blob) > limit:
        if pruned == len(order):
            raise ConfigError(f"AUTO_FIT: even with every int value zeroed the model is {len(blob)} > {limit} bytes")
        target = min(len(order), pruned + math.ceil((len(blob) - limit) / rate * 1.15) + 1000)
        for k, n in enumerate(names):
            sel = flat_idx[pruned:target][which[pruned:target] == k]
            qstate[n].values.view(-1)[sel] = 0
        new_blob = make_blob()
        rate = max((len(blob) - len(new_blob)) / (target - pruned), 1e-3)
        log(f"auto_fit: pruned {target} of {len(order)} int values -> {len(new_blob)} bytes (limit {limit})")
        blob, pruned = new_blob, target
    return blob, pruned


def packed_code(code: str) -> str:
    """Self-extracting form of this file (raw LZMA2 + base85 in a two-line exec wrapper): what
    tools/pack_script.py writes, and the code size a packed submission pays."""
    filters = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}]
    data = base64.b85encode(lzma.compress(code.encode(), format=lzma.FORMAT_RAW, filters=filters)).decode()
    return ('import lzma as L,base64 as B\nexec(L.decompress(B.b85decode("' + data +
            '"),format=L.FORMAT_RAW,filters=[{"id":L.FILTER_LZMA2}]))\n')


@torch.no_grad()
def collect_hessians(model: GPT, loader: TrainLoader, h: Hyperparameters, rt: Runtime) -> dict[str, Tensor]:
    """X^T X of the input of every block matrix, and of the final hidden state for the tied embedding
    (it is the output head), over GPTQ_CALIB_BATCHES training micro-batches per rank, summed over ranks."""
    hessians: dict[str, Tensor] = {}

    def hook_for(name: str, use_output: bool):
        def hook(module, inputs, output):
            x = (output if use_output else inputs[0]).detach().float()
            x = x.reshape(-1, x.size(-1))
            hessians[name] = hessians[name].addmm_(x.T, x) if name in hessians else x.T @ x
        return hook

    hooks = [m.register_forward_hook(hook_for(f"blocks.{n}.weight", False))
             for n, m in model.blocks.named_modules() if isinstance(m, CastedLinear)]
    hooks.append(model.final_norm.register_forward_hook(hook_for("tok_emb.weight", True)))
    for _ in range(h.gptq_calib_batches):
        x, _ = loader.next_batch(h.train_batch_tokens, h.train_seq_len)
        with rt.autocast():
            model.hidden(x)
    for hook in hooks:
        hook.remove()
    for name in sorted(hessians):
        rt.all_reduce(hessians[name])
    return hessians


# =====================================================================================================
# TRAINING
# Wallclock-capped loop: the timer pauses for validation; a step starts only if it is projected to end
# before the cap (MAX_WALLCLOCK_SECONDS, minus GPTQ_RESERVE_SECONDS when full GPTQ calibrates on
# training data afterwards), so every read of training data happens inside the budget. Compile warm-up
# steps run every graph the run will need (each recurrence stage, QAT on) and are then undone.
# =====================================================================================================


def compile_model(model: GPT, rt: Runtime):
    return torch.compile(model, dynamic=False, fullgraph=True) if rt.compile else model


def make_score_fn(model: GPT, rt: Runtime):
    return torch.compile(model.token_nll, dynamic=False, fullgraph=True) if rt.compile else model.token_nll


def train_model(model: GPT, h: Hyperparameters, rt: Runtime, loader: TrainLoader, val_tokens: Tensor, luts,
                log: Log) -> dict:
    compiled, score_fn = compile_model(model, rt), make_score_fn(model, rt)
    optimizers = build_optimizers(model, h, rt)
    params = list(model.parameters())
    reserve = h.gptq_reserve_seconds if h.quant_method == "full" else 0.0
    cap_ms = max(h.max_wallclock_seconds - reserve, 0.0) * 1000 if h.max_wallclock_seconds else 0.0
    enable_at = [h.loop_enable_at[min(r, len(h.loop_enable_at) - 1)] for r in range(h.loop_repeats)]

    def train_step(step: int, lr_mul: float) -> Tensor:
        for opt in optimizers:
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * lr_mul
        warm = min(step / h.muon_momentum_warmup_steps, 1.0) if h.muon_momentum_warmup_steps else 1.0
        optimizers[0].param_groups[0]["momentum"] = (1 - warm) * h.muon_momentum_warmup_start + warm * h.muon_momentum
        total = torch.zeros((), device=rt.device)
        for _ in range(rt.grad_accum):
            x, y = loader.next_batch(h.train_batch_tokens, h.train_seq_len)
            with rt.autocast():
                loss = compiled(x, y)
            (loss / rt.grad_accum).backward()
            total += loss.detach()
        all_reduce_grads(params, rt, rt.world_size)
        if h.grad_clip_norm:
            torch.nn.utils.clip_grad_norm_(params, h.grad_clip_norm)
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
        return total / rt.grad_accum

    def val_score() -> tuple[float, float]:  # non-overlapping, at the training length
        batch = eval_batch(h, rt.world_size, h.train_seq_len)
        return loss_and_bpb(evaluate(score_fn, val_tokens, h.train_seq_len, h.train_seq_len, batch, luts, rt))

    def validate(step: int, train_ms: float) -> None:
        loss, bpb = val_score()
        log(f"step:{step}/{h.iterations} val_loss:{loss:.4f} val_bpb:{bpb:.4f} train_time:{train_ms:.0f}ms "
            f"step_avg:{train_ms / max(step, 1):.2f}ms")

    # Compile warm-up on every variant of the graph, then restore weights, optimizer state and data.
    variants = [(s, 0) for s in range(model.n_stages)] + ([(model.n_stages - 1, h.quant_bits)] if h.late_qat_threshold else [])
    if h.warmup_steps:
        snapshot = (copy.deepcopy(model.state_dict()), [copy.deepcopy(o.state_dict()) for o in optimizers], loader.state())
        for i in range(h.warmup_steps):
            stage, bits = variants[max(0, i - (h.warmup_steps - len(variants)))]
            model.set_stage(stage)
            model.set_qat(bits)
            train_step(0, 1.0)
            if i < 3 or (i + 1) % 10 == 0 or i + 1 == h.warmup_steps:
                log(f"warmup_step:{i + 1}/{h.warmup_steps}")
        model.load_state_dict(snapshot[0])
        for opt, state in zip(optimizers, snapshot[1]):
            opt.load_state_dict(state)
        loader.restore(snapshot[2])
        model.set_stage(0)
        model.set_qat(0)
        if h.warmup_steps < len(variants):
            log(f"warmup: {len(variants) - h.warmup_steps} graph variants will compile inside the timed run")

    averager = WeightAverager(model, h)
    train_ms, step, stop_after, qat_on = 0.0, 0, None, False
    rt.sync()
    t0 = now()
    while True:
        last = step == h.iterations or (stop_after is not None and step >= stop_after)
        if last or (h.val_loss_every and step % h.val_loss_every == 0):
            rt.sync()
            train_ms += (now() - t0) * 1000
            if h.val_loss_every:  # VAL_LOSS_EVERY=0: no validation while training, not even at the end
                validate(step, train_ms)
            rt.sync()
            t0 = now()
        if last:
            if stop_after is not None and step < h.iterations:
                log(f"stopping_early: wallclock_cap train_time:{train_ms:.0f}ms step:{step}/{h.iterations}")
            break
        elapsed = train_ms + (now() - t0) * 1000
        progress = elapsed / cap_ms if cap_ms else step / h.iterations
        stage = sum(progress >= f for f in enable_at)
        if stage != model.stage:
            model.set_stage(stage)
            log(f"recurrence:stage {stage} active_layers:{len(model.active)} step:{step}")
        lr_mul = lr_multiplier(step, elapsed, cap_ms, h)
        if h.late_qat_threshold and not qat_on and lr_mul < h.late_qat_threshold:
            model.set_qat(h.quant_bits)
            qat_on = True
            log(f"late_qat:enabled step:{step} scale:{lr_mul:.4f} bits:{h.quant_bits}")
        loss = train_step(step, lr_mul)
        step += 1
        averager.update(step, lr_mul, log)
        rt.sync()
        before, elapsed = elapsed, train_ms + (now() - t0) * 1000
        next_step_ms = max(elapsed / step, elapsed - before)  # stop if the next step may cross the cap
        stop = torch.tensor(float(cap_ms > 0 and elapsed + next_step_ms >= cap_ms), device=rt.device)
        if rt.all_reduce(stop, dist.ReduceOp.MAX).item() and stop_after is None:
            stop_after = step
        if step <= 10 or step % h.train_log_every == 0 or stop_after is not None:  # global mean, any world size
            loss = rt.all_reduce(loss) / rt.world_size
            log(f"step:{step}/{h.iterations} train_loss:{loss.item():.4f} train_time:{elapsed:.0f}ms "
                f"step_avg:{elapsed / step:.2f}ms")

    if rt.device.type == "cuda":
        log(f"peak memory allocated: {torch.cuda.max_memory_allocated() // 2 ** 20} MiB "
            f"reserved: {torch.cuda.max_memory_reserved() // 2 ** 20} MiB")
    else:
        log(f"peak memory rss: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024} MiB")
    model.set_qat(0)
    weights = averager.apply_final(log)
    hessians = None
    if h.quant_method == "full":  # calibration reads training data, so it is training time
        t = now()
        hessians = collect_hessians(model, loader, h, rt)
        rt.sync()
        train_ms += (now() - t) * 1000
        log(f"gptq:calibrated {len(hessians)} matrices on {h.gptq_calib_batches} batches/rank, "
            f"last training-data read at train_time:{train_ms:.0f}ms")
    t = now()
    loss, bpb = val_score()
    log(f"DIAGNOSTIC post_{weights.split('(')[0]} val_loss:{loss:.4f} val_bpb:{bpb:.4f} eval_time:{(now() - t) * 1000:.0f}ms")
    return dict(steps=step, train_ms=train_ms, weights=weights, hessians=hessians,
                stopped_early=stop_after is not None and step < h.iterations, pre_quant=dict(val_loss=loss, val_bpb=bpb))


# =====================================================================================================
# EVALUATION
# One window plan and one scorer serve every evaluator. The plan cuts the targets into blocks of
# EVAL_STRIDE, each scored by a window of EVAL_SEQ_LEN ending at the block's end (the first window
# scores its whole span), so every target is scored exactly once with up to a window of left context;
# blocks never straddle a TTT chunk. Stride = length gives the non-overlapping eval. Legal TTT: for each
# chunk in order, score all its targets with the weights fixed, then (unless it is the last chunk)
# train on exactly those targets. The eval budget guard measures TTT's own speed and lowers the epochs
# of later chunks when the projection would overrun.
# =====================================================================================================


def plan_windows(n_targets: int, seq_len: int, stride: int, chunk_tokens: int = 0) -> np.ndarray:
    """Rows (start, lo, hi): inputs tokens[start:start+seq_len] score targets lo..hi-1, where target j
    is token j+1 predicted from tokens 0..j. The [lo, hi) ranges partition [0, n_targets)."""
    lo = np.arange(0, n_targets, stride, dtype=np.int64)
    hi = np.minimum(lo + stride, n_targets)
    start = np.maximum(hi - seq_len, 0)
    chunk = lo // chunk_tokens if chunk_tokens else np.zeros_like(lo)
    # blocks whose window starts at 0 within one chunk share that window
    merge = (start == 0) & np.r_[False, start[:-1] == 0] & np.r_[False, chunk[1:] == chunk[:-1]]
    first = np.flatnonzero(~merge)
    return np.stack((start[first], lo[first], np.maximum.reduceat(hi, first)), axis=1)


def eval_batch(h: Hyperparameters, world_size: int, seq_len: int) -> int:
    """Windows per forward on each rank: VAL_BATCH_SIZE tokens over all ranks."""
    return max(1, h.val_batch_size // (world_size * seq_len))


def rank_share(windows: np.ndarray, rt: Runtime) -> np.ndarray:
    n = len(windows)
    return windows[rt.rank * n // rt.world_size: (rt.rank + 1) * n // rt.world_size]


def score_windows(score_fn, tokens: Tensor, windows: np.ndarray, seq_len: int, batch: int, luts, rt: Runtime,
                  observer=None) -> Tensor:
    """(NLL sum, byte sum, target count) in float64 over the windows' scored targets, this rank only,
    under inference_mode. Batches are padded to a few shapes (padding rows score nothing), so compiled
    graphs are reused; observer(kind, target_indices, nll) sees exactly what was scored."""
    totals = torch.zeros(3, dtype=torch.float64, device=rt.device)
    batch = min(batch, 1 << max(len(windows) - 1, 0).bit_length())  # no padding far past the work
    offsets = torch.arange(seq_len, device=rt.device)
    with torch.inference_mode():
        for i in range(0, len(windows), batch):
            w = torch.as_tensor(windows[i: i + batch], device=rt.device)
            if len(w) < batch:
                w = torch.cat((w, torch.zeros((batch - len(w), 3), dtype=w.dtype, device=w.device)))
            idx = w[:, :1] + offsets
            mask = (idx >= w[:, 1:2]) & (idx < w[:, 2:3])
            x, y = tokens[idx].long(), tokens[idx + 1].long()
            with rt.autocast():
                nll = score_fn(x, y).float()
            totals += torch.stack(((nll.double() * mask).sum(), (target_bytes(x, y, luts) * mask).sum().double(),
                                   mask.sum().double()))
            if observer is not None:
                observer("score", idx[mask], nll[mask])
    return totals


def evaluate(score_fn, tokens: Tensor, seq_len: int, stride: int, batch: int, luts, rt: Runtime) -> Tensor:
    windows = plan_windows(tokens.numel() - 1, seq_len, stride)
    return rt.all_reduce(score_windows(score_fn, tokens, rank_share(windows, rt), seq_len, batch, luts, rt))


def ttt_params(model: GPT, freeze: int) -> tuple[list[Tensor], int]:
    """Trainable params after freezing the first `freeze` logical layers (their physical blocks, which
    recurrence may share with later layers, and their controls)."""
    frozen = set()
    for i in range(freeze):
        frozen |= {id(p) for p in model.blocks[model.slots[i][0]].parameters()}
        frozen |= {id(p) for p in model.controls[i].parameters()}
    params = []
    for p in model.parameters():
        p.requires_grad_(id(p) not in frozen)
        if id(p) not in frozen:
            params.append(p)
    return params, sum(p.numel() for p in model.parameters() if id(p) in frozen)


def eval_ttt(model: GPT, tokens: Tensor, h: Hyperparameters, rt: Runtime, luts, log: Log, budget_s: float,
             observer=None) -> tuple[Tensor, dict]:
    L, C, n = h.eval_len, h.ttt_chunk_tokens, tokens.numel() - 1
    seq = min(L, C)
    windows = plan_windows(n, L, h.eval_stride, C)
    n_chunks = -(-n // C)
    bounds = np.searchsorted(windows[:, 1] // C, np.arange(n_chunks + 1))
    params, n_frozen = ttt_params(model, h.ttt_freeze_blocks)
    if h.ttt_optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=h.ttt_lr, momentum=h.ttt_momentum)
    else:
        opt = torch.optim.AdamW(params, lr=h.ttt_lr, betas=(h.beta1, h.beta2), weight_decay=0.0)
    score_fn, train_fn = make_score_fn(model, rt), compile_model(model, rt)
    batch = eval_batch(h, rt.world_size, L)
    log(f"ttt_sliding:start chunks={n_chunks} chunk_tokens={C} total_windows={len(windows)} stride={h.eval_stride} "
        f"ttt_lr={h.ttt_lr} ttt_epochs={h.ttt_epochs} freeze_blocks={h.ttt_freeze_blocks} optimizer={h.ttt_optimizer}")
    log(f"ttt_sliding:params unfrozen={sum(p.numel() for p in params)} frozen={n_frozen}")
    totals = torch.zeros(3, dtype=torch.float64, device=rt.device)
    epochs, score_times, epoch_times, cuts, scored_upto = h.ttt_epochs, [], [], [], 0
    t_start = now()
    model.eval()
    for c in range(n_chunks):
        t0 = now()
        chunk = rt.all_reduce(score_windows(score_fn, tokens, rank_share(windows[bounds[c]: bounds[c + 1]], rt), L,
                                            batch, luts, rt, observer))
        totals += chunk
        if int(chunk[2].item()) != min((c + 1) * C, n) - c * C:  # rules, not asserts: they survive python -O
            raise RuntimeError(f"TTT chunk {c}: {int(chunk[2].item())} targets scored, not the whole chunk")
        scored_upto = min((c + 1) * C, n)
        t1 = now()
        if c < n_chunks - 1 and epochs:
            for g in opt.param_groups:
                g["lr"] = h.ttt_lr * 0.5 * (1 + math.cos(math.pi * c / (n_chunks - 1)))
            starts = c * C + np.arange(0, C, seq)
            if starts[-1] + seq > scored_upto:
                raise RuntimeError(f"TTT chunk {c} would train on targets up to {starts[-1] + seq}, scored: {scored_upto}")
            model.train()
            for _ in range(epochs):
                for b in range(0, len(starts), h.ttt_batch_seqs):
                    group = starts[b: b + h.ttt_batch_seqs]
                    mine = torch.as_tensor(group[rt.rank:: rt.world_size], device=rt.device)
                    if len(mine):
                        idx = mine[:, None] + torch.arange(seq, device=rt.device)
                        if observer is not None:
                            observer("train", idx, None)
                        with rt.autocast():
                            loss = train_fn(tokens[idx].long(), tokens[idx + 1].long())
                        (loss * (len(mine) / len(group))).backward()  # mean over the whole group's tokens
                    for p in params:
                        if p.grad is None:
                            p.grad = torch.zeros_like(p)
                    all_reduce_grads(params, rt, 1.0)
                    if h.ttt_grad_clip:
                        torch.nn.utils.clip_grad_norm_(params, h.ttt_grad_clip)
                    opt.step()
                    opt.zero_grad(set_to_none=True)
            model.eval()
        rt.sync()
        t2 = now()
        # budget guard: slowest rank's timings, so every rank takes the same decision
        stats = rt.all_reduce(torch.tensor([t1 - t0, (t2 - t1) / max(epochs, 1), t2 - t_start], device=rt.device,
                                           dtype=torch.float64), dist.ReduceOp.MAX).tolist()
        score_times.append(stats[0])
        if c < n_chunks - 1 and epochs:
            epoch_times.append(stats[1])
        if c < n_chunks - 2 and epoch_times:
            ts, te = sum(score_times) / len(score_times), sum(epoch_times) / len(epoch_times)
            left = budget_s - stats[2] - 0.02 * budget_s - ts
            to_score, to_train = n_chunks - 1 - c, n_chunks - 2 - c
            fit = max([e for e in range(h.ttt_epochs + 1) if to_score * ts + to_train * e * te <= left], default=0)
            if fit != epochs:
                cuts.append((c + 1, epochs, fit))
                log(f"ttt_budget: after chunk {c + 1}/{n_chunks} epochs {epochs}->{fit} (projected "
                    f"{to_score * ts + to_train * fit * te:.1f}s for the rest, {left:.1f}s left after margin)")
                epochs = fit
        if (c + 1) % 10 == 0 or c == 0 or c == n_chunks - 1:
            loss, bpb = loss_and_bpb(totals)
            log(f"  ttt_chunk [{c + 1}/{n_chunks}] bpb={bpb:.6f} time={now() - t_start:.1f}s")
    for p in model.parameters():
        p.requires_grad_(True)
    return totals, dict(chunks=n_chunks, epoch_cuts=cuts, final_epochs=epochs, legal=True)  # checked per chunk


def run_evaluations(model: GPT, h: Hyperparameters, rt: Runtime, val_tokens: Tensor, luts, log: Log) -> dict:
    """The timed evaluation of the dequantized artifact. Compile warm-up on random tokens (never val
    tokens) happens before the timer, as the contest counts it; scoring and TTT are inside."""
    L, bits = h.eval_len, h.quant_bits
    batch = eval_batch(h, rt.world_size, L)
    score_fn = make_score_fn(model, rt)
    if rt.compile:
        noise = torch.randint(0, h.vocab_size, (batch, L), device=rt.device)
        with torch.inference_mode(), rt.autocast():
            score_fn(noise, noise)
        if h.ttt_enabled:  # TTT's training graph too, at this rank's group shape; gradients discarded
            ttt_params(model, h.ttt_freeze_blocks)
            seq = min(L, h.ttt_chunk_tokens)
            group = min(h.ttt_batch_seqs, h.ttt_chunk_tokens // seq)
            noise = torch.randint(0, h.vocab_size, (len(range(rt.rank, group, rt.world_size)), seq), device=rt.device)
            if len(noise):
                with rt.autocast():
                    compile_model(model, rt)(noise, noise).backward()
            model.zero_grad(set_to_none=True)
    results, times = {}, {}
    n_targets = val_tokens.numel() - 1
    rt.sync()
    t_eval = now()

    def record(key: str, name: str, totals: Tensor, t0: float, extra: str = "") -> None:
        rt.sync()
        times[key] = (now() - t0) * 1000
        loss, bpb = loss_and_bpb(totals)
        results[key] = dict(val_loss=loss, val_bpb=bpb, scored=int(totals[2].item()), name=name)
        log(f"{name} val_loss:{loss:.4f} val_bpb:{bpb:.4f}{extra} eval_time:{times[key]:.0f}ms")
        log(f"{name}_exact val_loss:{loss:.8f} val_bpb:{bpb:.8f}")

    t0 = now()
    record("roundtrip", f"final_int{bits}_roundtrip", evaluate(score_fn, val_tokens, L, L, batch, luts, rt), t0)
    if h.eval_sliding and h.eval_stride < L:
        t0 = now()
        record("sliding", f"final_int{bits}_sliding_window",
               evaluate(score_fn, val_tokens, L, h.eval_stride, batch, luts, rt), t0, f" stride:{h.eval_stride}")
    ttt_info = None
    if h.ttt_enabled:
        t0 = now()
        totals, ttt_info = eval_ttt(model, val_tokens, h, rt, luts, log, h.eval_budget_seconds - (t0 - t_eval))
        loss, bpb = loss_and_bpb(totals)
        log(f"ttt_sliding:done val_loss={loss:.6f} val_bpb={bpb:.6f} elapsed={now() - t0:.1f}s")
        record("ttt", "legal_ttt", totals, t0)
    rt.sync()
    times["total"] = (now() - t_eval) * 1000
    final_key = "ttt" if "ttt" in results else "sliding" if "sliding" in results else "roundtrip"
    log("eval_time: " + " ".join(f"{k}:{v:.0f}ms" for k, v in times.items()))
    return dict(results=results, times_ms=times, final=final_key, ttt=ttt_info, n_targets=n_targets)


# =====================================================================================================
# ARTIFACT AND BUDGET REPORT
# The counted size is the compressed model plus the bytes of the file that runs (this source, or its
# packed form when that is what runs). Over the 16,000,000-byte cap: a loud FAIL, or with AUTO_FIT=1
# pruning until it fits, with the bpb it costs measured. Then every rank reads the artifact from disk.
# =====================================================================================================

RULE_BYTES, RULE_TRAIN_S, RULE_EVAL_S = 16_000_000, 600.0, 600.0


def file_sha256(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def model_from_qstate(qstate: dict[str, QTensor], h: Hyperparameters, rt: Runtime, stage: int) -> GPT:
    """A fresh model with the artifact's weights, running the depth schedule training ended in."""
    model = GPT(h).to(rt.device)
    missing = set(model.state_dict()) ^ set(qstate)
    if missing:
        raise ConfigError(f"artifact tensors do not match the model built from its config: {sorted(missing)[:5]}")
    model.load_state_dict({k: q.dequantize() for k, q in qstate.items()})
    model.set_stage(stage)
    return model


def export_artifact(model: GPT, h: Hyperparameters, rt: Runtime, log: Log, code: str, meta: dict, hessians,
                    val_tokens: Tensor, luts) -> dict:
    state = {k: v.detach().float() for k, v in model.state_dict().items()}
    t = now()
    qstate = quantize_state(state, h, hessians)
    blob = pack_artifact(qstate, meta, h.compressor)
    export_s = now() - t
    code_bytes, packed_bytes = len(code.encode()), len(packed_code(code).encode())
    limit = min(h.byte_budget, RULE_BYTES)
    tag = f"int{h.quant_bits}+{h.compressor}"
    pruned = 0
    if len(blob) + code_bytes > limit and h.auto_fit:
        n_eval = val_tokens.numel() - 1
        batch = eval_batch(h, 1, h.train_seq_len)  # rank 0 alone

        def roundtrip_bpb() -> float:
            trial = model_from_qstate(qstate, h, rt, meta["stage"])
            windows = plan_windows(n_eval, h.train_seq_len, h.train_seq_len)
            return loss_and_bpb(score_windows(trial.token_nll, val_tokens, windows, h.train_seq_len, batch, luts, rt))[1]

        before = roundtrip_bpb()
        blob, pruned = prune_to_fit(qstate, state, limit - code_bytes, lambda: pack_artifact(qstate, meta, h.compressor), log)
        after = roundtrip_bpb()
        log(f"auto_fit: pruned {pruned} int values, roundtrip val_bpb {before:.4f} -> {after:.4f} ({after - before:+.4f})")
    write_atomic(h.artifact_path, blob)
    total = len(blob) + code_bytes
    log(f"Serialized model: {sum(t.numel() * t.element_size() for t in model.state_dict().values())} bytes")
    log(f"Code size: {code_bytes} bytes")
    log(f"Code size packed: {packed_bytes} bytes (self-extracting lzma+base85; tools/pack_script.py)")
    log(f"Serialized model {tag}: {len(blob)} bytes (quantize+compress {export_s:.1f}s)")
    log(f"Total submission size {tag}: {total} bytes")
    verdict = "PASS" if total <= limit else "FAIL"
    log(f"budget:{verdict} total {total} {'<=' if verdict == 'PASS' else '>'} {limit} bytes "
        f"(headroom {limit - total}; {len(blob) + packed_bytes} with packed code)"
        + ("" if verdict == "PASS" else " -- OVER THE CAP: set AUTO_FIT=1, shrink the model, or pack the code"))
    return dict(model=len(blob), code=code_bytes, code_packed=packed_bytes, total=total, limit=limit,
                pruned=pruned, export_s=export_s)


# =====================================================================================================
# COMPLIANCE AND SUMMARY
# The contest rules as PASS/FAIL lines at the end of every run, and a JSON summary next to the log with
# every stage's score, bytes, times, steps, seed and a hash of the configuration (for aggregation).
# =====================================================================================================


def compliance_checks(h: Hyperparameters, train: dict | None, ev: dict, sizes: dict | None, manifest: dict) -> list:
    checks = []
    if train is None:
        checks.append(("train_time", "SKIP", "eval-only run"))
    else:
        ok = train["train_ms"] <= RULE_TRAIN_S * 1000
        checks.append(("train_time", "PASS" if ok else "FAIL",
                       f"{train['train_ms'] / 1000:.3f}s incl. every training-data read, limit {RULE_TRAIN_S:.0f}s"))
    eval_limit = min(h.eval_budget_seconds, RULE_EVAL_S)
    checks.append(("eval_time", "PASS" if ev["times_ms"]["total"] <= eval_limit * 1000 else "FAIL",
                   f"{ev['times_ms']['total'] / 1000:.3f}s, limit {eval_limit:.0f}s"))
    if sizes is not None:
        checks.append(("artifact_bytes", "PASS" if sizes["total"] <= RULE_BYTES else "FAIL",
                       f"{sizes['total']} bytes, limit {RULE_BYTES}"))
    if ev["ttt"] is None:
        checks.append(("ttt_legal", "SKIP", "TTT off"))
    else:
        checks.append(("ttt_legal", "PASS" if ev["ttt"]["legal"] else "FAIL",
                       "score-first: each chunk scored whole under inference_mode before training on exactly "
                       "its targets; last chunk never trained; single pass"))
    scored = {k: r["scored"] for k, r in ev["results"].items()}
    full = h.val_max_tokens == 0 and all(v == ev["n_targets"] for v in scored.values())
    checks.append(("full_val", "PASS" if full else "FAIL",
                   f"scored {scored} of {ev['n_targets']} val targets" + (f", VAL_MAX_TOKENS={h.val_max_tokens}"
                                                                         if h.val_max_tokens else "")))
    disjoint = manifest.get("train_val_disjoint")
    checks.append(("train_val_disjoint", {True: "PASS", False: "FAIL", None: "SKIP"}[disjoint],
                   f"{os.path.join(h.data_path, 'manifest.json')}: train_val_disjoint={disjoint}" if disjoint is not None
                   else "no data/prepare_data.py manifest to check"))
    return checks


def config_hash(h: Hyperparameters) -> str:
    """What must match across the seeds of one submission: everything but seed, run id and paths."""
    cfg = {k: v for k, v in dataclasses.asdict(h).items()
           if k not in ("seed", "run_id", "artifact_path", "eval_only_artifact", "data_path", "tokenizer_path")}
    return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:16]


# =====================================================================================================
# MAIN
# =====================================================================================================


def run(h: Hyperparameters, rt: Runtime, code: str) -> dict:
    run_id = h.run_id or str(uuid.uuid4())
    log = Log(Path("logs") / f"{run_id}.txt" if rt.is_master else None)
    log_header(log, h, rt, code)
    sp = load_tokenizer(h)
    tokenizer_sha = file_sha256(h.tokenizer_path)
    manifest = read_manifest(h, tokenizer_sha)
    luts = build_byte_luts(sp, rt.device)
    train_files = None if h.eval_only_artifact else find_shards(h, "train")
    val_tokens = load_val_tokens(h, rt)
    val_pattern = os.path.join(h.data_path, "fineweb_val_*.bin")
    log(f"val_bpb:enabled tokenizer_kind=sentencepiece tokenizer_path={h.tokenizer_path}")
    if train_files:
        log(f"train_loader:dataset:{os.path.basename(os.path.normpath(h.data_path))} train_shards:{len(train_files[0])} "
            f"tokens:{train_files[1]}")
    log(f"val_loader:shards pattern={val_pattern} tokens:{val_tokens.numel() - 1}")
    train_info, sizes = None, None
    summary = dict(run_id=run_id, seed=h.seed, config=dataclasses.asdict(h), config_hash=config_hash(h),
                   code_sha256=hashlib.sha256(code.encode()).hexdigest(), torch=torch.__version__,
                   device=f"{torch.cuda.get_device_name(rt.device) if rt.device.type == 'cuda' else 'cpu'} x{rt.world_size}")
    if not h.eval_only_artifact:
        torch.manual_seed(h.seed)
        np.random.seed(h.seed)
        model = GPT(h).to(rt.device)
        summary["model_params"] = sum(p.numel() for p in model.parameters())
        log(f"model_params:{summary['model_params']}")
        log(f"layer_schedule:{len(model.slots)} logical on {len(model.blocks)} physical "
            f"(logical:physical[@stage]) {describe_schedule(model)}")
        log(f"XSA:last_{h.xsa_last_n} active_layers:{[i for i, on in enumerate(model.xsa) if on]}")
        log(f"world_size:{rt.world_size} grad_accum_steps:{rt.grad_accum}")
        log(f"attention_mode:{'gqa' if h.num_kv_heads < h.num_heads else 'mha'} num_heads:{h.num_heads} "
            f"num_kv_heads:{h.num_kv_heads}")
        log(f"tie_embeddings:True embed_lr:{h.tied_embed_lr} head_lr:0.0 matrix_lr:{h.matrix_lr} scalar_lr:{h.scalar_lr}")
        log(f"train_batch_tokens:{h.train_batch_tokens} train_seq_len:{h.train_seq_len} iterations:{h.iterations} "
            f"warmup_steps:{h.warmup_steps} max_wallclock_seconds:{h.max_wallclock_seconds:.3f}")
        log(f"seed:{h.seed}")
        loader = TrainLoader(train_files[0], rt)
        train_info = train_model(model, h, rt, loader, val_tokens, luts, log)
        meta = dict(model=h.model_config(), stage=model.stage, tokenizer_sha256=tokenizer_sha, run_id=run_id,
                    weights=train_info["weights"], quant=dict(method=h.quant_method, bits=h.quant_bits, embed_bits=h.embed_bits))
        if rt.is_master:
            sizes = export_artifact(model, h, rt, log, code, meta, train_info.pop("hessians"), val_tokens, luts)
        train_info.pop("hessians", None)
        del model
        rt.barrier()
    artifact = h.eval_only_artifact or h.artifact_path
    qstate, meta = read_artifact(artifact)  # every rank, from disk
    if meta.get("tokenizer_sha256") != tokenizer_sha:
        raise ConfigError(f"{artifact} was trained with tokenizer sha256 {meta.get('tokenizer_sha256')}, but "
                          f"TOKENIZER_PATH={h.tokenizer_path} has {tokenizer_sha}")
    eval_h = dataclasses.replace(h, **{k: tuple(v) if isinstance(v, list) else v for k, v in meta["model"].items()})
    if h.eval_only_artifact:
        eval_h = dataclasses.replace(eval_h, quant_bits=meta["quant"]["bits"])
        eval_h.validate()  # the eval settings from the environment must fit the artifact's model
        log(f"eval_only: {artifact} ({os.path.getsize(artifact)} bytes, weights {meta['weights']}, "
            f"quant {meta['quant']})")
    model = model_from_qstate(qstate, eval_h, rt, meta["stage"])
    log(f"eval_model: stage {model.stage}, {len(model.active)} of {len(model.slots)} logical layers active")
    ev = run_evaluations(model, eval_h, rt, val_tokens, luts, log)
    checks = compliance_checks(h, train_info, ev, sizes, manifest)
    for name, status, detail in checks:
        log(f"compliance:{name} {status} {detail}")
    record_hw = rt.device.type == "cuda" and rt.world_size == 8 and "H100" in summary["device"]
    log(f"compliance:record_hardware {'PASS' if record_hw else 'INFO'} {summary['device']} "
        f"(a record runs on 8xH100 SXM)")
    final = ev["results"][ev["final"]]
    summary.update(train=train_info, bytes=sizes, eval=ev, final=dict(stage=ev["final"], **final),
                   compliance={n: dict(status=s, detail=d) for n, s, d in checks}, artifact=artifact,
                   artifact_sha256=file_sha256(artifact))
    if rt.is_master:
        Path("logs", f"{run_id}.json").write_text(json.dumps(summary, indent=1, default=str))
        log(f"summary:logs/{run_id}.json")
    # the last line: the run's score (the final legal stage) under the name legacy parsers read
    log(f"final_int8_zlib_roundtrip_exact val_loss:{final['val_loss']:.8f} val_bpb:{final['val_bpb']:.8f}")
    return summary


def read_source(path: str) -> str:
    """The file's raw bytes as text, without newline translation: a CRLF copy counts every byte it has."""
    return Path(path).read_bytes().decode("utf-8")


def main() -> None:
    h = Hyperparameters.from_env(os.environ)
    rt = setup_runtime(h, os.environ)
    try:
        run(h, rt, read_source(__file__))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main()
    except ConfigError as e:
        sys.exit(f"error: {e}")
