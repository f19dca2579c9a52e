"""
Parameter Golf: train the GPT that compresses FineWeb best (val_bpb) within three hard limits:
an artifact of at most 16,000,000 bytes (compressed weights + this file), at most 600 s of training
on 8xH100 SXM, and at most 600 s of evaluation.

Run
  record, 8xH100:         torchrun --standalone --nproc_per_node=8 train_gpt.py
  one GPU, or a laptop:   python3 train_gpt.py        (CPU: gloo + eager; shrink the model, see README)
  N processes:            torchrun --standalone --nproc_per_node=N train_gpt.py   (N divides 8)
  verify an artifact:     EVAL_ONLY_ARTIFACT=final_model.int6.ptz python3 train_gpt.py
  re-export, no training: EXPORT_FROM=final_model.pt QUANT_CLIP_K=12 python3 train_gpt.py   (same config)
Every knob is an environment variable named after its Hyperparameters field (NUM_LAYERS=11, ...).

One run: train (Muon + AdamW, wallclock warmdown, EMA/SWA, late QAT, optional depth recurrence)
-> save the float weights -> quantize (SDClip int6 matrices, int8 embeddings, optionally full GPTQ) -> compress,
fitting the byte budget by rate control -> atomic write -> read the artifact back -> score it (non-overlapping,
sliding window, legal score-first TTT) -> PASS/FAIL lines for every budget and rule, a JSON summary by the log.
"""

from __future__ import annotations

import ast
import base64
import collections
import contextlib
import copy
import dataclasses
import datetime
import difflib
import functools
import glob
import hashlib
import importlib.util
import io
import json
import keyword
import lzma
import math
import os
import platform
import resource
import shutil
import statistics
import struct
import subprocess
import sys
import tokenize
import types
import uuid
from collections.abc import Callable
from pathlib import Path
from time import perf_counter as now

import numpy as np
import sentencepiece as spm
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

# =====================================================================================================
# HYPERPARAMETERS
# Every knob is an env var named like its field, upper-cased, in one of seven small frozen groups (h.run, h.train,
# h.model, h.optim, h.export, h.eval, h.ttt); h.model is what the artifact stores. Parsed in from_env (never at
# import), validated before any work (each group its own rules, then the rules across groups), so a typo fails
# in a second with the variable's name, not after a compile. Defaults are the 8xH100 record configuration.
# =====================================================================================================


class ConfigError(ValueError):
    """Bad user input (an env var, a data file, an artifact); the message names the culprit."""


def need(ok, msg: str) -> None:
    """A rule on user input (not an assert: it survives python -O); msg names the variable and what it expects."""
    if not ok:
        raise ConfigError(msg)


def knob(default, lo=None, hi=None, choices=None, auto="", help=""):
    """A field of a Hyperparameters group, read from the environment variable of its name in capitals.
    lo/hi/choices are checked by from_env; auto, for a knob whose 0 or -1 lets another knob decide, is the path
    (from Hyperparameters) of the one property that resolves it, whose value the run uses and logs (resolved:);
    help is the README's table (tools/env_reference.py). The packed script drops help (packed_code):
    documentation, not code."""
    meta = {"lo": lo, "hi": hi, "choices": choices, "auto": auto, "help": help}
    return dataclasses.field(default=default, metadata=meta)


def parse_knob(f: dataclasses.Field, text: str):
    """One knob's value from its env var's text, by the field's type, checked against its bounds or choices."""
    key, kind = f.name.upper(), f.type.split("[")[0]
    raw = text.strip()
    try:
        if kind == "tuple":
            item = float if "float" in f.type else int
            value = tuple(item(v) for v in raw.split(",") if v.strip())
        elif kind == "bool":  # .index raises ValueError for anything else
            value = ("0", "false", "no", "off", "1", "true", "yes", "on").index(raw.lower()) >= 4
        else:
            value = {"int": int, "float": float, "str": str}[kind](raw)
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError
    except ValueError:
        raise ConfigError(f"{key}={text!r}: expected {f.type} (default {f.default!r})") from None
    lo = f.metadata.get("lo")
    hi = f.metadata.get("hi")
    choices = f.metadata.get("choices")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ConfigError(f"{key}={raw}: must be in [{lo}, {'inf' if hi is None else hi}]")
    if choices and value not in choices:
        raise ConfigError(f"{key}={raw!r}: must be one of {', '.join(choices)}")
    return value


class KnobGroup:
    """A group of knobs: one frozen dataclass of knob() fields. validate() holds the rules among its own
    fields (Hyperparameters.validate the rules across groups)."""

    def validate(self) -> None:
        pass


@dataclasses.dataclass(frozen=True)
class RunConfig(KnobGroup):
    """Data and run: the data, the tokenizer, the seed, and how the run compiles and which attention it runs."""

    data_path: str = knob(
        "./data/datasets/fineweb10B_sp1024", help="folder of fineweb_{train,val}_*.bin shards"
    )
    tokenizer_path: str = knob(
        "./data/tokenizers/fineweb_1024_bpe.model", help="SentencePiece model of the shards"
    )
    run_id: str = knob("", help='names logs/{RUN_ID}.txt and .json; "" = a fresh uuid4')
    seed: int = knob(1337, 0, 2**32 - 1, help="model init (data order is fixed by the shards)")
    val_max_tokens: int = knob(0, 0, help="score only this many val targets (0 = all; not a record)")
    compile: str = knob("auto", choices=("auto", "0", "1"), help="torch.compile; auto = on for CUDA only")
    compile_cache_dir: str = knob(
        "", help="folder of torch.compile's disk caches, reused by later runs; \"\" = torch's default"
    )
    compile_backend: str = knob(
        "inductor", choices=("inductor", "aot_eager"), help="aot_eager: no code generation"
    )
    attn_kernel: str = knob(
        "auto",
        choices=("auto", "sdpa", "flex", "fa3", "fa4", "varlen"),
        help="auto: the first of fa3, fa4 (then varlen, flex for docs) whose probe runs on CUDA, else sdpa",
    )

    def validate(self) -> None:
        need(
            self.attn_kernel in ("auto", "sdpa") or torch.cuda.is_available(),
            f"ATTN_KERNEL={self.attn_kernel} needs CUDA (FlexAttention has no CPU backward; FA and varlen kernels "
            "are CUDA-only): use sdpa or auto",
        )


@dataclasses.dataclass(frozen=True)
class TrainConfig(KnobGroup):
    """Training: steps, batch, the LR schedule, the init, weight averaging and late QAT."""

    iterations: int = knob(20000, 1, help="step limit (the wallclock cap usually stops training first)")
    max_wallclock_seconds: float = knob(600.0, 0.0, help="training time cap; 0 = none (iteration warmdown)")
    train_batch_tokens: int = knob(
        786432, 1, help="global tokens per step, fixed for any number of processes"
    )
    train_micro_batches: int = knob(
        0, 0, help="micro-batches per step, all ranks together (0 = 8, or WORLD_SIZE above 8)"
    )
    warmup_steps: int = knob(20, 0, help="compile warm-up steps, undone before the timer starts")
    warmdown_iters: int = knob(3500, 0, help="linear LR decay over the last this-many (projected) steps")
    warmdown_frac: float = knob(
        0.0, 0.0, 1.0, help="... or over this fraction of the run (of the cap, else steps)"
    )
    min_lr: float = knob(0.0, 0.0, 1.0, help="floor of the warmdown LR multiplier")
    grad_clip_norm: float = knob(0.3, 0.0, help="global norm of the rank-averaged gradients; 0 = off")
    val_loss_every: int = knob(
        4000, 0, help="validate every N steps and at the last; 0 = never while training"
    )
    val_batch_size: int = knob(524288, 1, help="tokens per eval forward, all ranks together")
    train_log_every: int = knob(500, 1, help="train_loss line period (steps 1-10 are always logged)")
    tied_embed_init_std: float = knob(0.005, 0.0, help="init std of the tied embedding")
    ema_decay: float = knob(0.997, 0.0, 1.0, help="EMA of the weights every step; 0 = off")
    swa_every: int = knob(0, 0, help="SWA snapshot period (of the EMA when on); 0 = off")
    swa_start_lrmul: float = knob(0.2, 0.0, 1.0, help="SWA collects once the LR multiplier is below this")
    late_qat_threshold: float = knob(0.15, 0.0, 1.0, help="fake-quant once the LR multiplier < this; 0 = off")


@dataclasses.dataclass(frozen=True)
class ModelConfig(KnobGroup):
    """Model: what shapes the network. The artifact and the float checkpoint store this group whole, so that a
    verifier rebuilds exactly the network that was scored."""

    vocab_size: int = knob(1024, 2, 65536, help="must equal the tokenizer's piece count")
    train_seq_len: int = knob(2048, 2, help="training sequence length")
    num_layers: int = knob(11, 1, help="logical layers of the base schedule")
    unique_layers: int = knob(
        0, 0, auto="model.blocks", help="physical blocks (0 = NUM_LAYERS); layer i runs block i % this"
    )
    loop_start: int = knob(-1, -1, help="extra passes over base layers [LOOP_START, LOOP_END] ...")
    loop_end: int = knob(-1, -1, help="... (inclusive) ...")
    loop_repeats: int = knob(0, 0, help="... this many times, inserted after LOOP_END; 0 = no loop")
    loop_enable_at: tuple[float, ...] = knob((0.5,), help="training fraction at which each pass switches on")
    model_dim: int = knob(512, 2, help="residual width")
    num_heads: int = knob(8, 1, help="query heads")
    num_kv_heads: int = knob(4, 1, help="key/value heads (GQA)")
    mlp_mult: float = knob(3.0, 0.0, help="MLP hidden width / MODEL_DIM")
    mlp_neg_slope: float = knob(0.5, 0.0, 1.0, help="LeakyReLU(s)^2; 0 = relu^2 (the baseline)")
    logit_softcap: float = knob(30.0, 0.0, help="logits = c * tanh(z / c); 0 = off")
    rope_base: float = knob(
        10000 * 2 ** (16 / 14),
        1.0,
        help="RoPE base at TRAIN_SEQ_LEN (R23: 10000 NTK-stretched 1024->2048)",
    )
    rope_dims: int = knob(16, 0, help="rotated dims per head (0 = all)")
    qk_gain_init: float = knob(1.5, help="initial learnable per-head query scale")
    ln_scale: bool = knob(True, help="block inputs scaled by 1/sqrt(layer+1)")
    xsa_last_n: int = knob(4, 0, help="XSA on the last N logical layers ...")
    xsa_by: str = knob(
        "logical",
        choices=("logical", "physical"),
        help="... or on layers run by the last N blocks (#526)",
    )
    bigram_vocab_size: int = knob(1536, 0, help="BigramHash buckets; 0 = off")
    bigram_dim: int = knob(128, 1, help="BigramHash table width")
    smear_gate: bool = knob(True, help="SmearGate on the input embedding ...")
    smear_input_dims: int = knob(
        0,
        0,
        help="... a per-channel gate, or lam*sigmoid(w x_t[:N]) x_{t-1} from N channels (#1855: 12)",
    )
    ve_layers: tuple[int, ...] = knob((9, 10), help='logical layers with value embeddings ("" = none)')
    ve_dim: int = knob(128, 1, help="value-embedding table width")
    parallel_start: int = knob(
        -1, -1, help="first logical layer with parallel attention and MLP (-1 = off), ..."
    )
    parallel_form: str = knob(
        "lane1", choices=("lane1", "gptj"), help="... on two lanes (#1530) or one stream (#1493)"
    )
    controls_per: str = knob(
        "layer",
        choices=("layer", "block"),
        help="scales, mixes, LN scale per logical layer or block",
    )
    skip_gates: bool = knob(
        False, help="U-Net skips as lerp(w*skip, x, sigmoid(g)) with a learned gate g (#1493)"
    )
    value_residual: bool = knob(
        False,
        help="layers 1.. mix layer 0's values in: v = l0*v0 + l1*v, l init (0.5, 0.5) (#490)",
    )
    attn_gate: str = knob(
        "off",
        choices=("off", "dense", "sparse"),
        help="per-head output gate: dense sigmoid(W x + b) (#490) or sparse sigmoid(0.5 W x[:12]) (#1787)",
    )
    doc_attention: bool = knob(
        False, help="attend only within the document (from its BOS): training and eval"
    )

    @property
    def blocks(self) -> int:
        """Physical blocks: UNIQUE_LAYERS, or one per base layer."""
        return self.unique_layers or self.num_layers

    @property
    def logical_layers(self) -> int:
        return len(layer_slots(self))

    @property
    def stage_starts(self) -> list[float]:
        """The training fraction at which each recurrence pass switches on (one LOOP_ENABLE_AT serves all)."""
        at = self.loop_enable_at
        return [at[min(r, len(at) - 1)] for r in range(self.loop_repeats)]

    def validate(self) -> None:
        dim = self.model_dim
        heads = self.num_heads
        kv = self.num_kv_heads
        head_dim = dim // heads
        need(dim % heads == 0, f"MODEL_DIM={dim} must be divisible by NUM_HEADS={heads}")
        need(heads % kv == 0, f"NUM_HEADS={heads} must be a multiple of NUM_KV_HEADS={kv}")
        need(head_dim % 2 == 0, f"head dim MODEL_DIM/NUM_HEADS={head_dim} must be even for RoPE")
        need(
            4 <= (self.rope_dims or head_dim) <= head_dim and self.rope_dims % 2 == 0,
            f"ROPE_DIMS={self.rope_dims}: the rotated dims per head ({self.rope_dims or head_dim}) must be even and in "
            f"[4, head dim MODEL_DIM/NUM_HEADS={head_dim}] (0 = all; the NTK stretch needs more than 2)",
        )
        need(
            self.unique_layers <= self.num_layers,
            f"UNIQUE_LAYERS={self.unique_layers} exceeds NUM_LAYERS={self.num_layers}",
        )
        if self.loop_repeats:
            self.validate_loop()
        control_plan(self)
        self.validate_layers(self.logical_layers)
        need(
            self.smear_input_dims <= dim and (self.attn_gate != "sparse" or dim >= 12),
            f"SMEAR_INPUT_DIMS={self.smear_input_dims} and ATTN_GATE=sparse (12) read channels of MODEL_DIM={dim}",
        )
        need(
            self.bigram_vocab_size != 1,
            "BIGRAM_VOCAB_SIZE=1: 0 (off) or >= 2 buckets (one is for sequence starts)",
        )
        need(
            int(self.mlp_mult * dim) >= 1,
            f"MLP_MULT={self.mlp_mult} gives no MLP hidden unit at MODEL_DIM={dim}",
        )
        need(
            self.logit_softcap == 0 or self.logit_softcap >= 1,
            f"LOGIT_SOFTCAP={self.logit_softcap}: 0 (off) or >= 1",
        )

    def validate_loop(self) -> None:
        need(
            0 <= self.loop_start <= self.loop_end < self.num_layers,
            f"LOOP_START={self.loop_start}, LOOP_END={self.loop_end}: need 0 <= start <= end < "
            f"NUM_LAYERS={self.num_layers} when LOOP_REPEATS={self.loop_repeats}",
        )
        need(
            len(self.loop_enable_at) in (1, self.loop_repeats)
            and all(0 <= f <= 1 for f in self.loop_enable_at),
            f"LOOP_ENABLE_AT={self.loop_enable_at}: one fraction in [0, 1], or one per repeat",
        )

    def validate_layers(self, n: int) -> None:
        """The knobs that name logical layers, against the n that the depth schedule has."""
        need(
            all(0 <= i < n for i in self.ve_layers),
            f"VE_LAYERS={self.ve_layers}: logical layers are 0..{n - 1}",
        )
        need(self.xsa_last_n <= n, f"XSA_LAST_N={self.xsa_last_n} exceeds the {n} logical layers")
        need(self.parallel_start < n, f"PARALLEL_START={self.parallel_start} exceeds the {n} logical layers")


@dataclasses.dataclass(frozen=True)
class OptimConfig(KnobGroup):
    """Optimizers: Muon on the block matrices, AdamW on the rest."""

    matrix_lr: float = knob(0.025, 0.0, help="Muon LR (block matrices)")
    scalar_lr: float = knob(0.025, 0.0, help="AdamW LR of gains, scales and small projections")
    tied_embed_lr: float = knob(0.035, 0.0, help="AdamW LR of the embedding tables")
    muon_momentum: float = knob(0.99, 0.0, 1.0, help="Nesterov momentum after warm-up")
    muon_momentum_warmup_start: float = knob(0.92, 0.0, 1.0, help="... rising linearly from this ...")
    muon_momentum_warmup_steps: int = knob(1500, 0, help="... over this many steps")
    muon_backend_steps: int = knob(
        5, 1, help="Newton-Schulz iterations (Polar Express: the first N of its 5)"
    )
    muon_ns: str = knob(
        "classic", choices=("classic", "polar"), help="NS coefficients: quintic or Polar Express"
    )
    muon_eq_r: bool = knob(False, help="row-normalize the update before Newton-Schulz (MuonEq-R)")
    muon_wd: float = knob(
        0.04, 0.0, help="Muon decoupled weight decay (x scheduled LR), from this fraction of the run ..."
    )
    muon_wd_taper_at: float = knob(1.0, 0.0, 1.0, help="... tapering linearly (1 = never) ...")
    muon_wd_taper_to: float = knob(
        1.0, 0.0, help="... to this multiple of itself at the end (#1729: 0.7 -> 0.5)"
    )
    adam_wd: float = knob(0.04, 0.0, help="AdamW weight decay")
    embed_wd: float = knob(
        -1.0,
        -1.0,
        auto="optim.embedding_wd",
        help="AdamW weight decay of the embedding tables (-1 = ADAM_WD)",
    )
    beta1: float = knob(0.9, 0.0, 1.0, help="AdamW beta1 (also TTT with AdamW)")
    beta2: float = knob(0.95, 0.0, 1.0, help="AdamW beta2")
    adam_eps: float = knob(1e-8, 1e-30, help="AdamW epsilon (0 gives 0/0 = nan on a zero gradient)")

    @property
    def embedding_wd(self) -> float:
        """AdamW's weight decay of the embedding tables: EMBED_WD, or ADAM_WD when it is < 0."""
        return self.adam_wd if self.embed_wd < 0 else self.embed_wd

    def validate(self) -> None:
        need(
            self.beta1**2 < self.beta2 < 1,
            f"BETA1={self.beta1}, BETA2={self.beta2}: need BETA1^2 < BETA2 < 1 "
            "(else Adam's step, momentum over the root second moment, is unbounded)",
        )
        need(
            self.muon_ns == "classic" or self.muon_backend_steps <= len(NS_POLAR),
            f"MUON_NS=polar has {len(NS_POLAR)} tuned steps: MUON_BACKEND_STEPS=1..5 runs the first N (#1539: 4)",
        )


@dataclasses.dataclass(frozen=True)
class ExportConfig(KnobGroup):
    """Export: quantization, rate control, the artifact and where it comes from."""

    quant_bits: int = knob(6, 2, 8, help="block matrices (also the QAT grids), unless set per group:")
    quant_bits_attn: int = knob(0, 0, 8, help="attention matrices (0 = QUANT_BITS)")
    quant_bits_mlp: int = knob(0, 0, 8, help="MLP matrices (0 = QUANT_BITS)")
    embed_bits: int = knob(8, 2, 8, help="embedding tables")
    quant_clip: str = knob(
        "sd", choices=("sd", "mse"), help="row clip: k*std(row) (SDClip) or MSE-best of max|w|"
    )
    quant_clip_k: float = knob(12.85, 0.5, help="SDClip k of the block matrices, unless set per group:")
    quant_clip_k_attn: float = knob(0.0, 0.0, help="attention matrices (0 = QUANT_CLIP_K)")
    quant_clip_k_mlp: float = knob(
        0.0, 0.0, help="MLP matrices (0 = QUANT_CLIP_K; the 1.0611 record: attn 13, MLP 11.5)"
    )
    embed_clip_k: float = knob(20.0, 0.5, help="SDClip k of the embedding tables")
    lqer_rank: int = knob(
        0, 0, help="LQER: rank-r SVD of the quantization error, int2/int4 factors, added back (0 = off) ..."
    )
    lqer_tensors: int = knob(
        3, 1, help="... on the tensors with the largest error (#1797: rank 4, 3 tensors)"
    )
    prune_frac: float = knob(
        0.0, 0.0, 0.9, help="zero this fraction of smallest |w| of each int tensor first"
    )
    quant_method: str = knob("lite", choices=("lite", "full"), help="row clip alone, or + Hessian GPTQ")
    gptq_calib_batches: int = knob(16, 1, help="training micro-batches per rank for the Hessians (full)")
    gptq_reserve_seconds: float = knob(
        8.0, 0.0, help="training stops this early to calibrate in budget (full)"
    )
    gptq_damp: float = knob(
        0.01, 1e-6, help="Hessian damping, relative to its mean diagonal (x10 per failed try)"
    )
    compressor: str = knob(
        "brotli", choices=("zstd", "brotli", "lzma"), help="brotli-11 (smallest), zstd-22 or lzma-9e"
    )
    artifact_path: str = knob("final_model.int6.ptz", help="where the artifact is written")
    byte_budget: int = knob(
        15_900_000, 1, help="total-bytes target of rate control (100 KB under the 16,000,000 rule)"
    )
    code_shipped: str = knob(
        "packed",
        choices=("packed", "raw"),
        help="the train_gpt.py a record ships (tools/package_record.py), whose bytes the budget counts",
    )
    auto_fit: str = knob(
        "1",
        choices=("1", "tighten", "0"),
        help="over: coarser k, fewer bits; 1 also fills spare bytes (finer k)",
    )
    final_model_path: str = knob(
        "final_model.pt", help='post-EMA float weights saved for EXPORT_FROM; "" = none'
    )
    export_from: str = knob("", help="path: skip training, export and score this FINAL_MODEL_PATH file")
    eval_only_artifact: str = knob("", help="path: skip training, score this artifact (what a verifier runs)")

    def validate(self) -> None:
        need(
            self.quant_bits_attn != 1 and self.quant_bits_mlp != 1,
            "QUANT_BITS_ATTN/MLP: 0 (= QUANT_BITS) or 2..8",
        )
        need(
            not (self.export_from and self.eval_only_artifact),
            "set EXPORT_FROM or EVAL_ONLY_ARTIFACT, not both",
        )


@dataclasses.dataclass(frozen=True)
class EvalConfig(KnobGroup):
    """Evaluation: the scoring windows and the eval budget."""

    eval_seq_len: int = knob(0, 0, auto="eval_len", help="scoring window (0 = TRAIN_SEQ_LEN)")
    eval_stride: int = knob(64, 1, help="sliding-window stride: new targets per window")
    eval_sliding: bool = knob(True, help="the sliding-window pass (TTT's scoring pass is one too)")
    eval_budget_seconds: float = knob(600.0, 0.0, help="timed eval budget; TTT cuts epochs to fit")


@dataclasses.dataclass(frozen=True)
class TTTConfig(KnobGroup):
    """Test-time training: legal, score-first; full-weight chunks, per-document LoRA, or LoRA with phases."""

    ttt_enabled: bool = knob(True, help="legal score-first test-time training")
    ttt_mode: str = knob(
        "chunk",
        choices=("chunk", "lora", "phased"),
        help="full-weight chunks, per-document LoRA, + SGD phases",
    )
    ttt_chunk_tokens: int = knob(32768, 1, help="tokens scored, then trained on, per step of the pass")
    ttt_epochs: int = knob(3, 0, help="passes over each scored chunk (the budget guard may lower it)")
    ttt_optimizer: str = knob("sgd", choices=("sgd", "adamw"), help="TTT optimizer (one, across chunks)")
    ttt_lr: float = knob(0.002, 0.0, help="peak TTT LR, cosine-decayed across chunks")
    ttt_momentum: float = knob(0.9, 0.0, 1.0, help="SGD momentum")
    ttt_beta2: float = knob(
        -1.0, -1.0, 1.0, auto="ttt_adam_beta2", help="AdamW beta2 of TTT (-1 = BETA2; #490 used 0.999)"
    )
    ttt_freeze_blocks: int = knob(0, 0, help="first N logical layers stay fixed")
    ttt_grad_clip: float = knob(1.0, 0.0, help="global-norm clip of TTT gradients; 0 = off")
    ttt_batch_seqs: int = knob(32, 1, help="sequences per TTT step, all ranks together")
    ttt_lora_rank: int = knob(80, 1, help="LoRA TTT: adapter rank on every block matrix and the output head")
    ttt_lora_lr: float = knob(
        1e-4, 0.0, help="LoRA TTT: Adam LR (beta1 0, TTT_BETA2), one step per scored chunk"
    )
    ttt_lora_alpha: float = knob(
        0.0,
        0.0,
        auto="ttt.lora_alpha",
        help="LoRA TTT: adapters scaled by alpha/rank (0 = rank: by 1; #1787: 144)",
    )
    ttt_lora_wd: float = knob(0.0, 0.0, help="LoRA TTT: decoupled weight decay of the adapters (#1787: 0.5)")
    ttt_lora_warm_a: bool = knob(
        False, help="LoRA TTT: keep each row's A from document to document, reset only B (#1787)"
    )
    ttt_lora_chunk: int = knob(
        48, 1, help="LoRA TTT: tokens of a document scored, then learned from, per step"
    )
    ttt_docs_per_batch: int = knob(
        64, 1, help="LoRA TTT: documents adapted side by side on each rank, longest first"
    )
    ttt_lora_rows_per_pass: int = knob(
        0,
        0,
        auto="ttt.lora_rows",
        help="LoRA TTT: documents per forward and backward (0 = all; bounds the saved activations)",
    )
    ttt_phase_docs: int = knob(2500, 1, help="phased: after this many documents (the longest) ...")
    ttt_phases: int = knob(
        3, 1, help="... in this many equal steps, base weights take one SGD epoch on all scored docs"
    )

    @property
    def lora_alpha(self) -> float:
        """LoRA TTT's alpha: TTT_LORA_ALPHA, or the rank (adapters scaled by 1)."""
        return self.ttt_lora_alpha or self.ttt_lora_rank

    @property
    def lora_rows(self) -> int:
        """LoRA TTT's documents per forward and backward: one pass's saved activations scale with them."""
        return min(self.ttt_lora_rows_per_pass or self.ttt_docs_per_batch, self.ttt_docs_per_batch)

    def validate(self) -> None:
        need(
            self.ttt_docs_per_batch % self.lora_rows == 0,
            f"TTT_LORA_ROWS_PER_PASS={self.ttt_lora_rows_per_pass} must divide "
            f"TTT_DOCS_PER_BATCH={self.ttt_docs_per_batch} (every pass one compiled shape)",
        )


@dataclasses.dataclass(frozen=True)
class Hyperparameters:
    """Every knob, in groups (one small frozen dataclass each); a field's env var is its name in capitals,
    whatever its group."""

    run: RunConfig = dataclasses.field(default_factory=RunConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    export: ExportConfig = dataclasses.field(default_factory=ExportConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    ttt: TTTConfig = dataclasses.field(default_factory=TTTConfig)

    @classmethod
    def groups(cls) -> list[tuple[str, type]]:
        """(attribute, dataclass) of every group, in the order of the README's table."""
        return [(g.name, g.default_factory) for g in dataclasses.fields(cls)]

    @classmethod
    def knobs(cls) -> list[tuple[str, dataclasses.Field]]:
        """(group, field) of every knob: the one list that the env parser, the README and the logs read."""
        return [(name, f) for name, group in cls.groups() for f in dataclasses.fields(group)]

    @classmethod
    def from_env(cls, env) -> Hyperparameters:
        values = {f.name: parse_knob(f, env[f.name.upper()]) for _, f in cls.knobs() if f.name.upper() in env}
        h = cls().replace(**values)
        h.validate()
        return h

    def replace(self, **values) -> Hyperparameters:
        """A copy with the named knobs (field names, any group) changed; not validated, as dataclasses.replace."""
        unknown = set(values) - {f.name for _, f in self.knobs()}
        if unknown:
            raise TypeError(f"Hyperparameters has no knob {sorted(unknown)}")
        groups = {}
        for name, group in self.groups():
            mine = {f.name: values[f.name] for f in dataclasses.fields(group) if f.name in values}
            groups[name] = dataclasses.replace(getattr(self, name), **mine)
        return dataclasses.replace(self, **groups)

    def resolved(self) -> dict:
        """Every 'auto' knob (knob(auto=...)) with the value that the run uses in its place."""
        return {
            f.name: functools.reduce(getattr, f.metadata["auto"].split("."), self)
            for _, f in self.knobs()
            if f.metadata["auto"]
        }

    def flat(self) -> dict:
        """Every knob by field name, groups flattened: the hyperparameters log line, the run's JSON and its hash."""
        return {f.name: getattr(getattr(self, g), f.name) for g, f in self.knobs()}

    @property
    def eval_len(self) -> int:
        return self.eval.eval_seq_len or self.model.train_seq_len

    @property
    def ttt_adam_beta2(self) -> float:
        """TTT's AdamW beta2 (global-SGD train_rows and LoRA TTT): TTT_BETA2, or BETA2 when it is < 0."""
        return self.optim.beta2 if self.ttt.ttt_beta2 < 0 else self.ttt.ttt_beta2

    def validate(self) -> None:
        """The rules across groups; each group's own rules are its validate()."""
        for name, _ in self.groups():
            getattr(self, name).validate()
        n = self.model.logical_layers
        need(
            self.ttt.ttt_freeze_blocks <= n,
            f"TTT_FREEZE_BLOCKS={self.ttt.ttt_freeze_blocks} exceeds {n} layers",
        )
        self.check_world(1)
        C, L = self.ttt.ttt_chunk_tokens, self.eval_len
        need(self.eval.eval_stride <= L, f"EVAL_STRIDE={self.eval.eval_stride} exceeds the eval length {L}")
        need(
            C % self.eval.eval_stride == 0 and (C < L or C % L == 0),
            f"TTT_CHUNK_TOKENS={C} must be a multiple of "
            f"EVAL_STRIDE={self.eval.eval_stride} and, if longer, of the eval length {L}",
        )
        need(
            self.ttt.ttt_mode == "chunk" or self.ttt.ttt_lora_chunk <= L,
            f"TTT_LORA_CHUNK={self.ttt.ttt_lora_chunk} exceeds the eval length {L} (TTT_MODE={self.ttt.ttt_mode})",
        )
        T = self.model.train_seq_len
        need(
            not self.run.val_max_tokens or self.run.val_max_tokens >= max(L, T),
            f"VAL_MAX_TOKENS={self.run.val_max_tokens} is shorter than one window of max(TRAIN_SEQ_LEN, eval length) = "
            f"{max(L, T)} tokens",
        )
        need(
            self.export.quant_method != "full"
            or self.export.gptq_reserve_seconds < (self.train.max_wallclock_seconds or math.inf),
            f"GPTQ_RESERVE_SECONDS={self.export.gptq_reserve_seconds} leaves no training time under MAX_WALLCLOCK_SECONDS="
            f"{self.train.max_wallclock_seconds} (QUANT_METHOD=full)",
        )

    def micro_batches(self, world: int) -> int:
        return self.train.train_micro_batches or max(8, world)

    def check_world(self, world: int) -> None:
        """A step is micro_batches(world) micro-batches of whole sequences, split evenly over the ranks."""
        m = self.micro_batches(world)
        need(
            m % world == 0,
            f"WORLD_SIZE={world} must divide the {m} micro-batches of a step (TRAIN_MICRO_BATCHES; "
            "0 = 8, or WORLD_SIZE above 8)",
        )
        need(
            self.train.train_batch_tokens % (m * self.model.train_seq_len) == 0,
            f"TRAIN_BATCH_TOKENS={self.train.train_batch_tokens} "
            f"must be a multiple of {m}*TRAIN_SEQ_LEN={m * self.model.train_seq_len} ({m} micro-batches of whole sequences)",
        )

    def model_config(self) -> dict:
        """The model group, stored whole in the artifact and the float checkpoint, so a verifier rebuilds it."""
        return dataclasses.asdict(self.model)


def knob_names() -> list[str]:
    """The environment variable of every knob."""
    return [f.name.upper() for _, f in Hyperparameters.knobs()]


def misspelt_knobs(env) -> list[tuple[str, str]]:
    """Environment variables that are no knob but look like one: (name, the closest knob). A typo such
    as MATRIX_LRR=0.1 is otherwise ignored and the run silently uses the default."""
    knobs = knob_names() + ["RANK", "WORLD_SIZE", "LOCAL_RANK"]
    unknown = [
        name for name in sorted(env) if name not in knobs and not name.startswith(FOREIGN_ENV_PREFIXES)
    ]
    return [
        (name, close[0])
        for name in unknown
        if (close := difflib.get_close_matches(name, knobs, n=1, cutoff=0.8))
    ]


FOREIGN_ENV_PREFIXES = (
    "CUDA",
    "NCCL",
    "TORCH",
    "PYTORCH",
    "OMP_",
    "MKL_",
    "PYTHON",
    "MASTER_",
    "LOCAL_",
    "GROUP_",
    "ROLE_",
    "TRITON",
    "HF_",
    "LC_",
    "XDG_",
    "SLURM_",
)


# =====================================================================================================
# RUNTIME AND LOGGING
# One code path for CUDA (NCCL, bf16 autocast, torch.compile) and CPU (gloo, fp32, eager). The global
# batch is always TRAIN_MICRO_BATCHES micro-batches (8 up to 8 processes), so any number of processes
# that divides it trains the same model; beyond 8 processes (multi-node) each takes one micro-batch.
# =====================================================================================================


LONG_WAIT_S = 3 * 3600  # the export's wait (Runtime.long_wait_group): far beyond any export, short of forever


@dataclasses.dataclass
class Runtime:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    compile: bool
    micro_batches: int = 8
    backend: str = "inductor"  # torch.compile's (COMPILE_BACKEND)
    # This rank's host clock in seconds. Tests give each rank its own offset and rate: no decision that gates a
    # collective or the schedule may depend on it alone (see AgreedClock and agreed()).
    time: Callable[[], float] = now

    @property
    def grad_accum(self) -> int:
        return self.micro_batches // self.world_size

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def clock(self) -> float:
        """time(), once the work queued on the device so far has run (CUDA kernels run asynchronously)."""
        self.sync()
        return self.time()

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def start_together(self) -> float:
        """time() on every rank at once: once this rank's queued work has run and every rank got here."""
        self.sync()
        self.barrier()
        return self.time()

    def long_wait_group(self):
        """A gloo group for one barrier that may outlast the process group's timeout (NCCL's default: 10
        minutes): the other ranks wait in it while rank 0 exports alone (GPTQ, rate control's refits,
        brotli-11: minutes at record scale). Waiting there holds no NCCL work, so no watchdog fires. Every
        rank calls this before the wait's work begins."""
        if self.world_size == 1:
            return None
        return dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=LONG_WAIT_S))

    def autocast(self):
        return (
            torch.autocast("cuda", dtype=torch.bfloat16)
            if self.device.type == "cuda"
            else contextlib.nullcontext()
        )

    def all_reduce(self, t: Tensor, op=None) -> Tensor:
        if self.world_size > 1:
            dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
        return t

    def reduce(self, numbers: list, op=None) -> list[float]:
        """Python numbers summed (or combined by op) over the ranks, in float64: every rank decides alike."""
        return self.all_reduce(torch.tensor(numbers, dtype=torch.float64, device=self.device), op).tolist()

    def agreed(self, decision: bool) -> bool:
        """A decision every rank takes alike: true only where it is true on every rank."""
        return self.reduce([float(decision)], dist.ReduceOp.MIN)[0] > 0


def parse_dist_env(env, h: Hyperparameters) -> tuple[int, int, int]:
    try:
        rank, world, local = (
            int(env.get(k, d)) for k, d in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0))
        )
    except ValueError:
        raise ConfigError("RANK, WORLD_SIZE and LOCAL_RANK must be integers (torchrun sets them)") from None
    need(world >= 1, f"WORLD_SIZE={world} must be at least 1")
    h.check_world(world)
    need(0 <= rank < world, f"RANK={rank} must be in [0, WORLD_SIZE={world})")
    return rank, world, local


def setup_runtime(h: Hyperparameters, env) -> Runtime:
    rank, world, local = parse_dist_env(env, h)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if world > 1:
        dist.init_process_group(
            backend="nccl" if cuda else "gloo",
            rank=rank,
            world_size=world,
            **({"device_id": device} if cuda else {}),
        )
    use_compile = cuda if h.run.compile == "auto" else h.run.compile == "1"
    if use_compile:
        torch._dynamo.config.cache_size_limit = 32  # train/eval shapes x recurrence stages x QAT
        if (
            h.run.compile_cache_dir
        ):  # inductor's FX-graph, AOT-autograd, autotune and Triton caches all live under it
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.abspath(h.run.compile_cache_dir)
    return Runtime(rank, world, local, device, use_compile, h.micro_batches(world), h.run.compile_backend)


class Log:
    """Rank 0 writes logs/{RUN_ID}.txt (and echoes to stdout); other ranks stay silent."""

    def __init__(self, path: Path | None):
        self.path, self.t0 = path, now()
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

    def phase(self, name: str) -> None:
        """A phase of the run begins; tools/gpu_report.py builds the run's timeline from these lines."""
        self(f"phase:{name} t:{now() - self.t0:.1f}s")


def compile_cache_line(h: Hyperparameters) -> str:
    """torch.compile's disk-cache hits this run (a warm COMPILE_CACHE_DIR: misses 0)."""
    fx, aot = dynamo_counters()["inductor"], dynamo_counters()["aot_autograd"]
    return (
        f"compile_cache:{h.run.compile_cache_dir or 'default'} fx_graph_hits:{fx['fxgraph_cache_hit']} "
        f"fx_graph_misses:{fx['fxgraph_cache_miss']} aot_autograd_hits:{aot['autograd_cache_hit']} "
        f"aot_autograd_misses:{aot['autograd_cache_miss']}"
    )


def log_header(log: Log, h: Hyperparameters, rt: Runtime, code: str) -> None:
    log(code, console=False)
    log("=" * 100, console=False)
    log(
        f"Running Python {sys.version.split()[0]} PyTorch {torch.__version__} numpy {np.__version__} "
        f"on {platform.platform()}"
    )
    if rt.device.type == "cuda":
        smi = shutil.which("nvidia-smi")
        info = subprocess.run([smi], capture_output=True, text=True).stdout if smi else ""
        log(info or f"device: {torch.cuda.get_device_name(rt.device)}", console=False)
        log(f"device:{torch.cuda.get_device_name(rt.device)} x{rt.world_size} cuda:{torch.version.cuda}")
    else:
        log(f"device:cpu x{rt.world_size} threads:{torch.get_num_threads()}")
    log("=" * 100, console=False)
    log("hyperparameters:" + json.dumps(h.flat(), sort_keys=True))


# =====================================================================================================
# DATA
# Official shards: 256 little-endian int32 header (magic 20240520, version 1, token count), then uint16 tokens;
# each document is BOS + tokens; every shard is checked before any work. Training reads the sorted shards as one
# stream; each step takes the next contiguous span, a slice per rank: the tokens seen do not depend on the ranks.
# =====================================================================================================

SHARD_MAGIC = 20240520
SIDECAR_MAGIC = 20240521
SHARD_VERSION = 1
HEADER_BYTES = 256 * 4
BOS_ID = 1


def shard_token_count(path: str, magics: tuple[int, ...] = (SHARD_MAGIC,)) -> int:
    size = os.path.getsize(path)
    need(size >= HEADER_BYTES, f"{path}: {size} bytes is shorter than the {HEADER_BYTES}-byte shard header")
    header = np.fromfile(path, dtype="<i4", count=256)
    need(
        header[0] in magics and header[1] == SHARD_VERSION,
        f"{path}: magic/version {header[0]}/{header[1]}, "
        f"expected {'|'.join(map(str, magics))}/{SHARD_VERSION} (not a Parameter Golf shard)",
    )
    n = int(header[2])
    need(
        size == HEADER_BYTES + 2 * n,
        f"{path}: header says {n} tokens, so {HEADER_BYTES + 2 * n} bytes, but the file "
        f"has {size} (truncated or corrupted)",
    )
    return n


def load_shard(path: str, magics: tuple[int, ...] = (SHARD_MAGIC,)) -> np.ndarray:
    return np.fromfile(path, dtype="<u2", count=shard_token_count(path, magics), offset=HEADER_BYTES)


def find_shards(h: Hyperparameters, split: str) -> tuple[list[str], int]:
    pattern = os.path.join(h.run.data_path, f"fineweb_{split}_*.bin")
    files = sorted(
        f for f in glob.glob(pattern) if "_bytes_" not in os.path.basename(f)
    )  # not CaseOps sidecars
    need(
        files,
        f"no {split} shards match {pattern}: set DATA_PATH (build data with "
        "`python3 data/prepare_data.py`, or download FineWeb, see README)",
    )
    total = sum(shard_token_count(f) for f in files)
    need(total > 0, f"the {split} shards under {pattern} hold no tokens")
    return files, total


class TrainLoader:
    """Endless stream over the train shards; next_batch gives this rank's micro-batch."""

    def __init__(self, files: list[str], rt: Runtime):
        self.files, self.rt = files, rt
        self.file_idx = 0
        self.pos = 0
        self.tokens = load_shard(files[0])
        self.check_docs = (
            False  # FA3 document attention: each batch's documents counted here (check_documents)
        )

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
            piece = self.tokens[self.pos : self.pos + n]
            parts.append(piece)
            self.pos += len(piece)
            n -= len(piece)
        return np.concatenate(parts) if len(parts) > 1 else parts[0]

    def next_batch(self, global_tokens: int, seq_len: int) -> tuple[Tensor, Tensor]:
        local = global_tokens // (self.rt.world_size * self.rt.grad_accum)
        span = self.take((local + 1) * self.rt.world_size)
        mine = span[self.rt.rank * (local + 1) : (self.rt.rank + 1) * (local + 1)]
        if self.check_docs:  # every row starts a document; each BOS after its first position another
            rows = mine[:-1].reshape(-1, seq_len)  # (rows, seq_len) as they will train
            docs = len(rows) + int(np.count_nonzero(rows[:, 1:] == BOS_ID))
            check_documents(docs, len(rows), seq_len, f"training data ({self.files[self.file_idx]})")
        t = torch.from_numpy(mine.astype(np.int64)).to(self.rt.device, non_blocking=True)
        return t[:-1].view(-1, seq_len), t[1:].view(-1, seq_len)  # inputs, targets: (rows, seq_len)


def load_val_tokens(h: Hyperparameters, rt: Runtime) -> Tensor:
    """Every evaluator scores whole windows: of the eval length, and of TRAIN_SEQ_LEN while training."""
    files, _ = find_shards(h, "val")
    tokens = np.concatenate([load_shard(f) for f in files])[
        : h.run.val_max_tokens + 1 if h.run.val_max_tokens else None
    ]
    window = max(h.eval_len, h.model.train_seq_len) + 1
    need(
        len(tokens) >= window,
        f"the val split ({', '.join(files)}) has {len(tokens)} tokens, fewer than one window "
        f"+ 1 ({window}); lower TRAIN_SEQ_LEN/EVAL_SEQ_LEN",
    )
    return torch.from_numpy(tokens.astype(np.int32)).to(rt.device)


# =====================================================================================================
# METRIC: bits per byte
# The one byte rule: a target's bytes are the UTF-8 length of its piece without the SentencePiece "▁", plus one
# for that leading space unless the previous token is a control token (BOS); byte-fallback pieces are one byte.
# Summed over a document this equals len(decode(ids).encode()) exactly (tested). CaseOps data counts each token's
# bytes of the original text from its byte sidecar (case operators own none). bpb = NLL / (ln 2 * bytes).
# =====================================================================================================


def load_tokenizer(h: Hyperparameters) -> spm.SentencePieceProcessor:
    need(
        os.path.isfile(h.run.tokenizer_path),
        f"tokenizer file not found: TOKENIZER_PATH={h.run.tokenizer_path}",
    )
    sp = spm.SentencePieceProcessor(model_file=h.run.tokenizer_path)
    need(
        sp.vocab_size() == h.model.vocab_size,
        f"{h.run.tokenizer_path} has {sp.vocab_size()} pieces but VOCAB_SIZE={h.model.vocab_size}",
    )
    need(
        sp.bos_id() == BOS_ID,
        f"{h.run.tokenizer_path}: bos_id is {sp.bos_id()}, the shard format needs {BOS_ID}",
    )
    return sp


def read_manifest(h: Hyperparameters, tokenizer_sha: str) -> dict:
    """The shards' manifest.json from data/prepare_data.py ({} when there is none, as for FineWeb).
    Its tokenizer must be the one in use: another of the same vocab size gives wrong byte counts."""
    path = os.path.join(h.run.data_path, "manifest.json")
    if not os.path.isfile(path):
        return {}
    manifest = json.loads(Path(path).read_text(encoding="utf-8"))
    made_with = manifest.get("tokenizer", {})
    need(
        made_with.get("sha256", tokenizer_sha) == tokenizer_sha,
        f"{path}: the shards were tokenized with "
        f"{made_with.get('path')} (sha256 {made_with.get('sha256')}), but TOKENIZER_PATH={h.run.tokenizer_path} has "
        f"sha256 {tokenizer_sha}",
    )
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


def byte_counter(h: Hyperparameters, sp: spm.SentencePieceProcessor, tokens: Tensor, rt: Runtime) -> tuple:
    """What target_bytes reads: the tokenizer's byte tables, or for CaseOps data (data/prepare_data.py --caseops:
    case operators as pieces, which own no bytes of the text) the val byte sidecar, each token's bytes of the
    original text, shard by shard beside the tokens and sliced like them."""
    files = sorted(glob.glob(os.path.join(h.run.data_path, "fineweb_val_bytes_*.bin")))
    caseops = sp.piece_to_id("\ue000") != sp.unk_id()
    if not files:
        need(
            not caseops,
            f"{h.run.tokenizer_path} is a CaseOps tokenizer, but {h.run.data_path} has no fineweb_val_bytes_*.bin "
            "sidecar: its bytes of original text are the bpb denominator (data/prepare_data.py --caseops writes them)",
        )
        return build_byte_luts(sp, rt.device)
    shards = find_shards(h, "val")[0]
    paired = all(
        shard_token_count(f, (SIDECAR_MAGIC, SHARD_MAGIC)) == shard_token_count(t)
        for f, t in zip(files, shards)
    )
    need(
        caseops and [f.replace("_bytes_", "_") for f in files] == shards and paired,
        f"{h.run.data_path}: the byte "
        f"sidecars {files} do not pair with the val shards {shards} of a CaseOps tokenizer (rebuild with data/prepare_data.py --caseops)",
    )
    counts = torch.from_numpy(
        np.concatenate([load_shard(f, (SIDECAR_MAGIC, SHARD_MAGIC)) for f in files])[: tokens.numel()].astype(
            np.int32
        )
    ).to(rt.device)
    need(
        not counts[tokens == BOS_ID].any(),
        f"{files}: a BOS owns bytes in the sidecar (not this tokenization's)",
    )
    return (counts,)


def target_bytes(prev: Tensor, tgt: Tensor, luts, idx: Tensor | None = None) -> Tensor:
    """Bytes of each target tgt (after prev; at input positions idx): from the sidecar, or the piece tables."""
    if len(luts) == 1:
        return luts[0][idx + 1]
    base, leading_space, is_control = luts
    return base[tgt] + (leading_space[tgt] & ~is_control[prev]).int()


def scored_totals(nll: Tensor, mask: Tensor, x: Tensor, y: Tensor, pos: Tensor, luts) -> Tensor:
    """(NLL sum, byte sum, target count) in float64 over the targets that mask marks as scored."""
    return torch.stack(
        (
            (nll.double() * mask).sum(),
            (target_bytes(x, y, luts, pos) * mask).sum().double(),
            mask.sum().double(),
        )
    )


def loss_and_bpb(totals: Tensor) -> tuple[float, float]:
    nll, n_bytes, count = totals.tolist()
    return nll / count, nll / (math.log(2) * n_bytes)


# =====================================================================================================
# MODEL
# GPT with tied embeddings, logit softcap, U-Net skips, input-embedding residual mix, GQA attention with q/k
# RMSNorm, learnable per-head QK gain, partial RoPE and XSA; LeakyReLU^2 MLP; BigramHash, SmearGate and value
# embeddings at the input; optionally parallel residuals, and attention within documents (DOC_ATTENTION: with
# BigramHash and SmearGate reset at BOS, nothing of one document reaches the next). Depth recurrence is a schedule
# of logical layers ("slots") over shared physical blocks. One hidden-state path serves the loss, the logits and
# per-token NLL, so training, scoring and TTT never run different forwards.
# =====================================================================================================


def rms_norm(x: Tensor) -> Tensor:
    return F.rms_norm(x, (x.size(-1),))


def lora_linear(x: Tensor, w: Tensor, lora: tuple[Tensor, Tensor] | None) -> Tensor:
    """x @ w.T, plus LoRA TTT's per-row adapter x @ A @ B (row r of the batch is document r's)."""
    y = F.linear(x, w)
    return y if lora is None else y + torch.bmm(torch.bmm(x, lora[0]), lora[1])


class CastedLinear(nn.Linear):
    """fp32 master weight (autocast computes in bf16). When qat = (bits, k) is set, the forward sees the exporter's
    fake-quantized weight with a straight-through gradient; lora = (A, B) adds LoRA TTT's adapters. Both are plain
    attributes: torch.compile guards on them, so setting one recompiles once instead of being constant-folded.
    `group` ('attn', 'mlp'; '' outside the blocks) routes the weight: a group's weights train with Muon and on
    that group's export grid under late QAT (quant_plan); quant_group reads the same group from a state dict's
    names (a test holds the two equal)."""

    def __init__(self, in_features: int, out_features: int, zero_init: bool = False, group: str = ""):
        super().__init__(in_features, out_features, bias=False)
        self.zero_init = zero_init
        self.group = group
        self.qat = None
        self.lora = None

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight
        if self.qat:
            w = w + (fake_quantize(w.detach(), *self.qat) - w).detach()
        return lora_linear(x, w, self.lora)


def layer_slots(cfg: ModelConfig) -> list[tuple[int, int]]:
    """The full depth schedule, one (physical block, stage) per logical layer. Base layer i runs block
    i % UNIQUE_LAYERS; LOOP_REPEATS extra passes over base layers [LOOP_START, LOOP_END] follow LOOP_END,
    the r-th pass in stage r, which joins at LOOP_ENABLE_AT of training."""
    physical = cfg.blocks
    base = [(i % physical, 0) for i in range(cfg.num_layers)]
    if not cfg.loop_repeats:
        return base
    passes = [
        (base[i][0], r)
        for r in range(1, cfg.loop_repeats + 1)
        for i in range(cfg.loop_start, cfg.loop_end + 1)
    ]
    return base[: cfg.loop_end + 1] + passes + base[cfg.loop_end + 1 :]


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
        cos, sin = (
            (self.cos_train, self.sin_train) if seq_len <= self.train_len else (self.cos_long, self.sin_long)
        )
        return cos[:seq_len], sin[:seq_len]


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    half = cos.size(-1)
    x1 = x[..., :half]
    x2 = x[..., half : 2 * half]
    rest = x[..., 2 * half :]
    c, s = cos[None, :, None, :].to(x.dtype), sin[None, :, None, :].to(x.dtype)
    return torch.cat((x1 * c - x2 * s, x1 * s + x2 * c, rest), dim=-1)


def fa3_doc_capacity(rows: int, seq_len: int) -> int:
    """Documents a batch may hold under FA3's varlen attention: cu_seqlens has a fixed length (no recompiles),
    room for documents of 128 tokens on average."""
    return rows * (1 + -(-seq_len // 128))


def check_documents(docs: int, rows: int, seq_len: int, where: str) -> None:
    """Raise, on the host, if a batch of `rows` sequences holds more documents than fa3_doc_capacity: a
    device-side assert is dropped inside compiled graphs and fatal in eager."""
    if docs > fa3_doc_capacity(rows, seq_len):
        raise RuntimeError(
            f"{where}: {docs} documents in {rows} rows of {seq_len} tokens, more than the varlen kernels' fixed "
            f"cu_seqlens hold ({fa3_doc_capacity(rows, seq_len)}); set ATTN_KERNEL=flex"
        )


def most_documents(ids: np.ndarray, seq_len: int) -> int:
    """The most documents any window of seq_len tokens of a stream can hold (its first position always starts
    one): what a scoring batch of windows holds at worst, per row."""
    bos = np.concatenate([[0], np.cumsum(ids == BOS_ID)])
    return 1 + int((bos[seq_len:] - bos[1 : len(bos) - seq_len + 1]).max(initial=0))


def cu_seqlens(starts: Tensor, doc: bool) -> Tensor:
    """The varlen kernels' cu_seqlens (int32) for a (B, T) batch: its rows, or with `doc` the documents (`starts`:
    a row's first position and every BOS) in a fixed length (fa3_doc_capacity + 1: no recompiles; checked on the
    host, where the tokens are batched: check_documents), the rest empty sequences."""
    B, T = starts.shape
    if not doc:
        return torch.arange(0, B * T + 1, T, device=starts.device, dtype=torch.int32)
    return F.pad(
        torch.nonzero_static(starts.flatten(), size=fa3_doc_capacity(B, T), fill_value=B * T).flatten(),
        (0, 1),
        value=B * T,
    ).int()


@torch.library.custom_op("train_gpt::fa4", mutates_args=())
def fa4(q: Tensor, k: Tensor, v: Tensor, cu: Tensor, T: int) -> tuple[Tensor, Tensor]:
    """FlashAttention-4's varlen kernel (flash_attn.cute: an autograd.Function over CuTe kernels, which
    torch.compile cannot trace) as a torch op: causal within each sequence of cu, (tokens, heads, dim). Gives
    (out, LSE (heads, tokens)); its backward is the op fa4_bwd."""
    from flash_attn.cute import flash_attn_varlen_func as f

    return f(
        q,
        k,
        v,
        cu_seqlens_q=cu,
        cu_seqlens_k=cu,
        max_seqlen_q=T,
        max_seqlen_k=T,
        causal=True,
        return_lse=True,
    )


fa4.register_fake(
    lambda q, k, v, cu, T: (torch.empty_like(q), q.new_empty(q.shape[1::-1], dtype=torch.float32))
)


@torch.library.custom_op("train_gpt::fa4_bwd", mutates_args=())
def fa4_bwd(  # noqa: PLR0913 (the op's schema: FA4's backward inputs)
    g: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, cu: Tensor, T: int
) -> tuple[Tensor, Tensor, Tensor]:
    """FA4's backward, as its autograd.Function calls it: dq, dk, dv."""
    from flash_attn.cute.interface import _flash_attn_bwd as f

    return f(
        q, k, v, out, g, lse, None, True, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=T, max_seqlen_k=T
    )


fa4_bwd.register_fake(lambda g, q, k, v, *_: (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)))


fa4.register_autograd(  # setup_context saves what fa4_bwd reads: q, k, v, out, LSE, cu; and T
    lambda ctx, g, _: (*fa4_bwd(g, *ctx.saved_tensors, ctx.T), None, None),
    setup_context=lambda ctx, inputs, output: (
        ctx.save_for_backward(*inputs[:3], *output, inputs[3]),
        setattr(ctx, "T", inputs[4]),
    ),
)


def fa3_varlen(x: list, cu: Tensor, T: int) -> Tensor:
    import flash_attn_interface as fa3

    return fa3.flash_attn_varlen_func(
        *x, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=T, max_seqlen_k=T, causal=True
    )


def fa4_varlen(x: list, cu: Tensor, T: int) -> Tensor:
    return fa4(*x, cu, T)


def torch_varlen(x: list, cu: Tensor, T: int) -> Tensor:
    from torch.nn.attention.varlen import varlen_attn

    return varlen_attn(*x, cu, cu, T, T, window_size=(-1, 0), enable_gqa=True)  # (-1, 0): causal


# The varlen kernels by ATTN_KERNEL name: the module and function pick_attention checks are installed, and the
# call, which takes [q, k, v] as (tokens, heads, dim), cu_seqlens and T.
ATTN_LIBS = {
    "fa3": ("flash_attn_interface", "flash_attn_varlen_func", fa3_varlen),
    "fa4": ("flash_attn.cute", "flash_attn_varlen_func", fa4_varlen),
    "varlen": ("torch.nn.attention.varlen", "varlen_attn", torch_varlen),
}


def flash_attention(kernel: str, starts: Tensor, doc: bool):
    """fa3 (FlashAttention-3, flash_attn_interface), fa4 (FlashAttention-4, flash_attn.cute) and varlen (torch's
    varlen_attn, torch >= 2.12): their varlen kernels over (tokens, heads, dim), causal within each sequence of
    cu_seqlens (the rows, or the documents). Each is a torch op: the forward compiles as one graph."""
    B, T = starts.shape
    cu = cu_seqlens(starts, doc)
    varlen = ATTN_LIBS[kernel][2]

    def attend(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        x = [t.transpose(1, 2).flatten(0, 1) for t in (q, k, v)]  # (B, heads, T, dim) -> (B * T, heads, dim)
        out = varlen(x, cu, T)
        out = out[0] if isinstance(out, tuple) else out  # FA4 and some FA3 versions also return the LSE
        return out.unflatten(0, (B, T)).transpose(1, 2)  # (B * T, heads, dim) -> (B, heads, T, dim)

    return attend


def probe_attention(kernel: str, doc: bool, heads: tuple, device: str = "cuda") -> None:
    """A forward and backward of `kernel` on this GPU, in bf16 at the model's heads, three documents a row: what the
    run will call (the same make_attention), at a tiny length. Raises what the kernel raises. Gradients on, whatever
    the caller's mode: the first model may be built under no_grad or inference mode (a verifier's), and a backward
    there would fail for every kernel, passing the fastest over for a reason that is not the kernel's."""
    with torch.inference_mode(False), torch.enable_grad():
        q, k, v = (
            torch.ones(2, n, 256, heads[3], device=device, dtype=torch.bfloat16, requires_grad=True)
            for n in heads[:3]
        )
        starts = torch.arange(512, device=device).view(2, 256) % 100 == 0
        make_attention(kernel, starts, doc)(q, k, v).sum().backward()


@functools.cache
def pick_attention(kernel: str, doc: bool, heads: tuple) -> tuple[str, dict]:
    """ATTN_KERNEL resolved, once a process: auto tries fa3, fa4, then for documents on CUDA varlen (in order of
    expected speed), else takes flex (documents on CUDA) or sdpa. Returns the kernel and why each one tried before
    it was passed over: not installed, a placeholder (a module without the function: PyPI's flash-attn-interface
    0.0.1 is one), no CUDA, or a failed probe, each with its error. A kernel asked for by name that cannot run is a
    ConfigError naming it and why."""
    cuda = torch.cuda.is_available()
    reasons = {}
    candidates = [kernel]
    if kernel == "auto":
        candidates = ["fa3", "fa4"] + (["varlen", "flex"] if doc and cuda else ["sdpa"])
    for k in candidates:
        why = "not installed"  # what failed, if the next step raises
        try:
            if k in ATTN_LIBS:
                module, function, _ = ATTN_LIBS[k]
                lib = importlib.import_module(module)
                why = "placeholder"  # a module without the function this script calls
                getattr(lib, function)
                why = "failed probe" if cuda else "no CUDA"
                probe_attention(k, doc, heads)
            return k, reasons
        except Exception as e:
            reasons[k] = f"{why}: {e!r}"
            need(kernel == "auto", f"ATTN_KERNEL={k}: {reasons[k]}")


def flex_block_attention(starts: Tensor, doc: bool):
    """FlexAttention with a block mask that skips blocks across documents (fused when compiled: CUDA)."""
    B, T = starts.shape
    docs = starts.cumsum(1) * doc  # (B, T): each position's document number, all 0 without `doc`
    block = create_block_mask(
        lambda b, _, q, k: (docs[b, q] == docs[b, k]) & (q >= k), B, None, T, T, device=docs.device
    )
    return lambda q, k, v: flex_attention(q, k, v, block_mask=block, enable_gqa=k.size(1) != q.size(1))


def sdpa_attention(starts: Tensor, doc: bool):
    """torch's SDPA: is_causal alone, or for documents a dense (B, 1, T, T) mask."""
    mask = None  # is_causal
    if doc:
        docs = starts.cumsum(1)  # (B, T): each position's document number
        mask = (docs[:, :, None] == docs[:, None, :]).tril().unsqueeze(1)  # (B, 1, T, T)
    return lambda q, k, v: F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=not doc, enable_gqa=k.size(1) != q.size(1)
    )


# ATTN_KERNEL (as pick_attention resolves it) -> (starts, doc) -> one forward's attend(q, k, v), q, k, v and the
# output as (B, heads, T, dim).
ATTENTION_KERNELS = {
    "sdpa": sdpa_attention,
    "flex": flex_block_attention,
    **{k: functools.partial(flash_attention, k) for k in ATTN_LIBS},
}


def make_attention(kernel: str, starts: Tensor, doc: bool):
    """One forward's attention, built once for all layers: causal, with `doc` only within each document (`starts`: a
    row's first position and every BOS)."""
    return ATTENTION_KERNELS[kernel](starts, doc)


@dataclasses.dataclass
class AttnContext:
    """What every layer's attention reads in one forward: the rotary tables, the value embeddings, the attention
    kernel (causal, or within documents) and layer 0's values for Value Residual (layer 0 fills them in)."""

    cos: Tensor
    sin: Tensor
    ve: Tensor | None
    attend: object
    v0: Tensor | None = None


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        dim = cfg.model_dim
        self.n_heads = cfg.num_heads
        self.n_kv = cfg.num_kv_heads
        self.head_dim = dim // cfg.num_heads
        kv_dim = self.n_kv * self.head_dim
        self.c_q = CastedLinear(dim, dim, group="attn")
        self.c_k = CastedLinear(dim, kv_dim, group="attn")
        self.c_v = CastedLinear(dim, kv_dim, group="attn")
        self.proj = CastedLinear(dim, dim, zero_init=True, group="attn")
        self.q_gain = nn.Parameter(torch.full((cfg.num_heads,), cfg.qk_gain_init))

    def forward(self, x: Tensor, c: LayerControl, ctx: AttnContext, xsa: bool) -> Tensor:
        B, T, C = x.shape
        q = self.c_q(x).view(B, T, self.n_heads, self.head_dim)  # (B, T, C) -> (B, T, heads, dim)
        k = self.c_k(x).view(B, T, self.n_kv, self.head_dim)  # (B, T, kv heads, dim)
        v = self.c_v(x)
        if ctx.v0 is None:  # the first layer's values, for Value Residual in the later ones
            ctx.v0 = v
        if c.v_mix is not None:
            v = c.v_mix[0].to(v.dtype) * ctx.v0 + c.v_mix[1].to(v.dtype) * v
        if c.ve_scale is not None:
            v = v + ctx.ve * c.ve_scale
        v = v.view(B, T, self.n_kv, self.head_dim)  # (B, T, kv heads, dim)
        q = apply_rope(rms_norm(q), ctx.cos, ctx.sin)
        q = q * self.q_gain.to(q.dtype)[:, None]
        k = apply_rope(rms_norm(k), ctx.cos, ctx.sin)
        # the kernels take and give (B, heads, T, dim); y is back to (B, T, heads, dim)
        y = ctx.attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
        if xsa:  # remove each head's component along its own position's value vector
            # (B, T, kv heads, query heads per kv head, dim): each query head beside its own value head
            y = y.reshape(B, T, self.n_kv, self.n_heads // self.n_kv, self.head_dim)
            v_hat = F.normalize(v.to(y.dtype), dim=-1).unsqueeze(3)
            y = y - (y * v_hat).sum(-1, keepdim=True) * v_hat
        if c.attn_gate is not None:  # per head, from this layer's attention input
            y = y.reshape(B, T, self.n_heads, self.head_dim) * torch.sigmoid(c.attn_gate(x)).unsqueeze(-1)
        return self.proj(y.reshape(B, T, C))  # heads concatenated: (B, T, C)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hidden = int(cfg.mlp_mult * cfg.model_dim)
        self.fc, self.proj = (
            CastedLinear(cfg.model_dim, hidden, group="mlp"),
            CastedLinear(hidden, cfg.model_dim, zero_init=True, group="mlp"),
        )
        self.neg_slope = cfg.mlp_neg_slope

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(F.leaky_relu(self.fc(x), self.neg_slope).square())


class LayerControl(nn.Module):
    """Per-logical-layer scales, never shared by recurrence: branch scales, the mix of the running stream with the
    input embedding x0, a value-embedding gain, the parallel form's lane lambdas, the Value Residual mix and the
    attention-output gate. Small and outside `blocks`, they train with AdamW and are stored in fp16."""

    def __init__(self, dim: int, value_embed: bool, form: str, v_mix: bool, gate: str, heads: int):
        super().__init__()
        self.form = form  # how Block runs this layer: sequential, or a parallel form (gptj, lane1)
        self.attn_scale = nn.Parameter(torch.ones(dim))
        self.mlp_scale = nn.Parameter(torch.ones(dim))
        self.resid_mix = nn.Parameter(torch.stack((torch.ones(dim), torch.zeros(dim))))
        self.ve_scale = nn.Parameter(torch.ones(())) if value_embed else None
        # lane1: new lane i = resid[i] * lane i + mix[i, 0] * attention out + mix[i, 1] * MLP out (#1530's init)
        self.lane_mix = nn.Parameter(torch.ones(2, 2)) if form == "lane1" else None
        self.lane_resid = nn.Parameter(torch.full((2,), 1.1)) if form == "lane1" else None
        self.v_mix = nn.Parameter(torch.full((2,), 0.5)) if v_mix else None
        self.attn_gate = {"off": None, "dense": nn.Linear(dim, heads), "sparse": SparseGate(heads)}[gate]
        if gate == "dense":  # sigmoid(4) ~ 0.98: nearly open at the start
            nn.init.zeros_(self.attn_gate.weight)
            nn.init.constant_(self.attn_gate.bias, 4.0)


class SparseGate(nn.Module):
    """#1787's attention-output gate logits: per head, 0.5 * W x[:12] from the first 12 channels only (96
    parameters for 8 heads); W = 0, so every head starts at sigmoid(0) = 0.5."""

    def __init__(self, heads: int, k: int = 12):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(heads, k))

    def forward(self, x: Tensor) -> Tensor:
        return 0.5 * F.linear(x[..., : self.weight.size(1)], self.weight.to(x.dtype))


class Stream:
    """The residual stream between layers: one lane, or two from the first PARALLEL_FORM=lane1 layer on (#1530:
    attention reads and writes lane 0, the MLP reads lane 1). U-Net skips join lane 0; what leaves for a skip or
    the final norm is the lanes' mean. A plain Python object: torch.compile traces through it."""

    def __init__(self, *lanes: Tensor):
        self.lanes = lanes

    def mean(self) -> Tensor:
        if len(self.lanes) == 1:
            return self.lanes[0]
        return (self.lanes[0] + self.lanes[1]) * 0.5

    def with_first(self, lane: Tensor) -> "Stream":
        return Stream(lane, *self.lanes[1:])


def sequential_form(blk, s: Stream, x0: Tensor, c, ctx: AttnContext, ln: float, xsa: bool) -> Stream:
    """The record's block: the MLP reads attention's output."""
    x = c.resid_mix[0] * s.mean() + c.resid_mix[1] * x0
    x = x + c.attn_scale * blk.attn(rms_norm(x) * ln, c, ctx, xsa)
    return Stream(x + c.mlp_scale * blk.mlp(rms_norm(x) * ln))


def gptj_form(blk, s: Stream, x0: Tensor, c, ctx: AttnContext, ln: float, xsa: bool) -> Stream:
    """GPT-J's parallel residual (#1493): attention and the MLP read the same normed input."""
    x = c.resid_mix[0] * s.mean() + c.resid_mix[1] * x0
    n = rms_norm(x) * ln
    return Stream(x + c.attn_scale * blk.attn(n, c, ctx, xsa) + c.mlp_scale * blk.mlp(n))


def lane1_form(blk, s: Stream, x0: Tensor, c, ctx: AttnContext, ln: float, xsa: bool) -> Stream:
    """#1530's two lanes: attention on lane 0 (mixed with x0), the MLP on lane 1, each output written back into
    both lanes by lane_mix; a one-lane stream enters as two equal lanes (lanes[-1] is lanes[0])."""
    a_in = c.resid_mix[0] * s.lanes[0] + c.resid_mix[1] * x0
    att = c.attn_scale * blk.attn(rms_norm(a_in) * ln, c, ctx, xsa)
    mlp = c.mlp_scale * blk.mlp(rms_norm(s.lanes[-1]) * ln)
    return Stream(
        c.lane_resid[0] * a_in + c.lane_mix[0, 0] * att + c.lane_mix[0, 1] * mlp,
        c.lane_resid[1] * s.lanes[-1] + c.lane_mix[1, 0] * att + c.lane_mix[1, 1] * mlp,
    )


BLOCK_FORMS = {"sequential": sequential_form, "gptj": gptj_form, "lane1": lane1_form}


class Block(nn.Module):
    """A physical block: attention + MLP weights, run by every logical layer mapped to it, in its control's form
    (BLOCK_FORMS)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn, self.mlp = Attention(cfg), MLP(cfg)

    def forward(
        self, s: Stream, x0: Tensor, c: LayerControl, ctx: AttnContext, ln: float, xsa: bool
    ) -> Stream:
        return BLOCK_FORMS[c.form](self, s, x0, c, ctx, ln, xsa)


class BigramHash(nn.Module):
    """Hashed (previous, current) token pair -> table -> projection, scaled. The first position of the
    sequence and every BOS use the reserved bucket, so no pair spans a document boundary."""

    def __init__(self, buckets: int, dim: int, model_dim: int):
        super().__init__()
        self.buckets, self.embed = buckets, nn.Embedding(buckets, dim)
        nn.init.zeros_(self.embed.weight)
        self.proj, self.scale = CastedLinear(dim, model_dim), nn.Parameter(torch.tensor(0.05))

    def forward(self, ids: Tensor, starts: Tensor) -> Tensor:
        prev = F.pad(ids[:, :-1], (1, 0))
        bucket = torch.bitwise_xor(36313 * ids, 27191 * prev) % (self.buckets - 1)
        bucket = torch.where(starts, self.buckets - 1, bucket)
        return self.proj(self.embed(bucket)) * self.scale


class SmearGate(nn.Module):
    """x_t += sigmoid(gate) * (x_{t-1} - x_t) with a per-channel gate, or (input_dims = N, #1855) x_t +=
    lam * sigmoid(w . x_t[:N]) * x_{t-1}, lam = w = 0 at the start; never at a sequence start or a BOS
    (no mixing across documents: the SmearGate BOS fix)."""

    def __init__(self, dim: int, input_dims: int = 0):
        super().__init__()
        self.input_dims = input_dims
        if input_dims:
            self.weight, self.lam = nn.Parameter(torch.zeros(input_dims)), nn.Parameter(torch.zeros(()))
        else:
            self.gate = nn.Parameter(torch.zeros(dim))

    def forward(self, x: Tensor, starts: Tensor) -> Tensor:
        keep = (~starts).unsqueeze(-1).to(x.dtype)  # 0 at a sequence start or a BOS
        prev = F.pad(x[:, :-1], (0, 0, 1, 0)) * keep
        if self.input_dims:
            g = self.lam.to(x.dtype) * torch.sigmoid(x[..., : self.input_dims] @ self.weight.to(x.dtype))
            return x + g.unsqueeze(-1) * prev
        return x + torch.sigmoid(self.gate).to(x.dtype) * keep * (prev - x)


class ValueEmbedding(nn.Module):
    """One shared token table projected to the KV width, added to v in the VE_LAYERS."""

    def __init__(self, vocab: int, dim: int, kv_dim: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        nn.init.normal_(self.embed.weight, std=0.01)
        self.proj, self.scale = CastedLinear(dim, kv_dim), nn.Parameter(torch.tensor(0.1))

    def forward(self, ids: Tensor) -> Tensor:
        return self.proj(self.embed(ids)) * self.scale


def control_plan(cfg: ModelConfig) -> tuple[list[int], list[tuple[bool, str, bool]]]:
    """Which LayerControl each logical layer uses (its own, or under CONTROLS_PER=block its physical
    block's, as #1493 shares them across recurrence passes), and each control's (value embedding,
    block form, Value Residual) switches, which all the layers sharing it must agree on."""
    slots = layer_slots(cfg)
    parallel_from = cfg.parallel_start if cfg.parallel_start >= 0 else len(slots)
    control_of = [p if cfg.controls_per == "block" else i for i, (p, _) in enumerate(slots)]
    features: dict[int, tuple[bool, str, bool]] = {}
    for i, k in enumerate(control_of):
        f = (
            i in cfg.ve_layers,
            cfg.parallel_form if i >= parallel_from else "sequential",
            cfg.value_residual and i > 0,
        )
        need(
            features.setdefault(k, f) == f,
            f"CONTROLS_PER=block: block {k} runs logical layers that differ in "
            "VE_LAYERS, PARALLEL_START or VALUE_RESIDUAL (layer 0); align them or use CONTROLS_PER=layer",
        )
    return control_of, [features[k] for k in range(len(features))]


class GPT(nn.Module):
    def __init__(self, h: Hyperparameters):
        super().__init__()
        cfg = h.model
        self.slots = layer_slots(cfg)
        n_logical, dim = len(self.slots), cfg.model_dim
        kv_dim = cfg.num_kv_heads * (dim // cfg.num_heads)
        self.tok_emb = nn.Embedding(cfg.vocab_size, dim)
        self.bigram = (
            BigramHash(cfg.bigram_vocab_size, cfg.bigram_dim, dim) if cfg.bigram_vocab_size else None
        )
        self.smear = SmearGate(dim, cfg.smear_input_dims) if cfg.smear_gate else None
        self.value_embed = ValueEmbedding(cfg.vocab_size, cfg.ve_dim, kv_dim) if cfg.ve_layers else None
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(max(p for p, _ in self.slots) + 1))
        self.control_of, features = control_plan(cfg)
        self.controls = nn.ModuleList(LayerControl(dim, *f, cfg.attn_gate, cfg.num_heads) for f in features)
        self.skip_weights = nn.ParameterList(nn.Parameter(torch.ones(dim)) for _ in range(n_logical // 2))
        self.skip_gates = (
            nn.ParameterList(nn.Parameter(torch.zeros(dim)) for _ in range(n_logical // 2))
            if cfg.skip_gates
            else None
        )
        self.ln_factors = [1 / math.sqrt(k + 1) if cfg.ln_scale else 1.0 for k in self.control_of]
        last_block = len(self.blocks) - cfg.xsa_last_n
        self.xsa = [
            p >= last_block if cfg.xsa_by == "physical" else i >= n_logical - cfg.xsa_last_n
            for i, (p, _) in enumerate(self.slots)
        ]
        self.rotary = Rotary(
            cfg.rope_dims or dim // cfg.num_heads,
            cfg.rope_base,
            cfg.train_seq_len,
            h.eval_len,
        )
        self.softcap, self.doc_attention = cfg.logit_softcap, cfg.doc_attention
        self.head_lora = None  # LoRA TTT's adapter of the tied output head
        self.attn_kernel, self.attn_reasons = pick_attention(
            h.run.attn_kernel,
            cfg.doc_attention,
            (cfg.num_heads, cfg.num_kv_heads, cfg.num_kv_heads, dim // cfg.num_heads),
        )
        self.set_stage(0)
        nn.init.normal_(self.tok_emb.weight, std=h.train.tied_embed_init_std)
        for m in self.modules():
            if isinstance(m, CastedLinear):
                nn.init.zeros_(m.weight) if m.zero_init else nn.init.orthogonal_(m.weight)

    def layout(self) -> str:
        """Which logical layers run XSA and each control's block form: what a config slip changes silently."""
        return f"xsa:{[i for i, x in enumerate(self.xsa) if x]} forms:{[c.form for c in self.controls]}"

    @property
    def n_stages(self) -> int:
        return max(s for _, s in self.slots) + 1

    def set_stage(self, stage: int) -> None:
        """Activate the recurrence passes up to `stage` (a new schedule: torch.compile recompiles once)."""
        self.stage = stage
        self.active = tuple(i for i, (_, s) in enumerate(self.slots) if s <= stage)

    def set_qat(self, plan: dict | None) -> None:
        """Block matrices train on their group's export grid (plan: quant_plan), or plainly (None)."""
        for m in self.grouped_linears():
            m.qat = plan[m.group] if plan else None

    def grouped_linears(self) -> list[CastedLinear]:
        """The block matrices (CastedLinear with a group), in module order: Muon's, and late QAT's."""
        return [m for m in self.modules() if isinstance(m, CastedLinear) and m.group]

    def hidden(self, ids: Tensor) -> Tensor:
        starts = (ids == BOS_ID) | (torch.arange(ids.size(1), device=ids.device) == 0)
        x = self.tok_emb(ids)
        if self.bigram is not None:
            x = x + self.bigram(ids, starts)
        x = rms_norm(x)
        if self.smear is not None:
            x = self.smear(x, starts)
        x0 = x
        ctx = AttnContext(
            *self.rotary(ids.size(1)),
            self.value_embed(ids) if self.value_embed is not None else None,
            make_attention(self.attn_kernel, starts, self.doc_attention),
        )
        n_enc = len(self.active) // 2
        skips = []
        s = Stream(x)
        for pos, i in enumerate(self.active):
            if pos >= n_enc and skips:  # U-Net: decoder layer j adds encoder output n_enc-1-j
                s = s.with_first(self.add_skip(s.lanes[0], skips.pop(), pos - n_enc))
            c = self.controls[self.control_of[i]]
            s = self.blocks[self.slots[i][0]](s, x0, c, ctx, self.ln_factors[i], self.xsa[i])
            if pos < n_enc:
                skips.append(s.mean())
        return rms_norm(s.mean())  # the final norm

    def add_skip(self, lane: Tensor, skip: Tensor, j: int) -> Tensor:
        skip = self.skip_weights[j] * skip
        if self.skip_gates is None:
            return lane + skip
        # gated: a learned per-channel interpolation between the skip and the stream
        return torch.lerp(skip, lane, torch.sigmoid(self.skip_gates[j]).to(skip.dtype))

    def logits(self, ids: Tensor) -> Tensor:
        z = lora_linear(self.hidden(ids), self.tok_emb.weight, self.head_lora).float()
        return self.softcap * torch.tanh(z / self.softcap) if self.softcap else z

    def token_nll(self, ids: Tensor, targets: Tensor) -> Tensor:
        z = self.logits(ids)
        return F.cross_entropy(z.view(-1, z.size(-1)), targets.reshape(-1), reduction="none").view_as(targets)

    def forward(self, ids: Tensor, targets: Tensor) -> Tensor:
        return self.token_nll(ids, targets).mean()


# =====================================================================================================
# OPTIMIZERS
# Muon for the block matrices: Nesterov momentum, Newton-Schulz orthogonalization (classic quintic or Polar
# Express), decoupled weight decay, sqrt(rows/cols) scale. Each rank owns a contiguous share of every same-shape
# stack: a reduce-scatter averages the stack's gradients into the shares (started before the rest is reduced), the
# rank keeps that share's momentum, orthogonalizes it and all-gathers: the one-process update. AdamW for embeddings
# and the small control tensors, their gradients averaged in one flat buffer (no DDP); all clipped by the global norm.
# =====================================================================================================

NS_CLASSIC = ((3.4445, -4.7750, 2.0315),)
NS_POLAR = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)


def newton_schulz(G: Tensor, steps: int, polar: bool) -> Tensor:
    """Approximate U V^T of each matrix in a (n, rows, cols) stack."""
    X = G.to(torch.bfloat16 if G.is_cuda else torch.float32)
    wide = X.size(-2) > X.size(-1)
    if wide:
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for i in range(steps):
        a, b, c = NS_POLAR[i] if polar else NS_CLASSIC[0]
        A = X @ X.mT
        X = a * X + (b * A + c * (A @ A)) @ X
    return X.mT if wide else X


@dataclasses.dataclass(frozen=True)
class MuonNS:
    """Muon's orthogonalization: Newton-Schulz iterations, polar-express coefficients (else the classic quintic),
    and whether each row of the update is normalized after it (MUON_BACKEND_STEPS, MUON_NS, MUON_EQ_R)."""

    steps: int
    polar: bool
    row_normalize: bool


class Muon(torch.optim.Optimizer):
    def __init__(self, params, lr: float, momentum: float, weight_decay: float, ns: MuonNS, rt: Runtime):
        super().__init__(list(params), dict(lr=lr, momentum=momentum, weight_decay=weight_decay))
        self.steps = ns.steps
        self.polar = ns.polar
        self.row_normalize = ns.row_normalize
        self.rt = rt
        self.stacks: dict[tuple, list[Tensor]] = {}
        for p in self.param_groups[0]["params"]:
            self.stacks.setdefault(tuple(p.shape), []).append(p)
        for shape, params in self.stacks.items():  # the share's momentum (kept at the stack's first param)
            self.state[params[0]]["momentum_buffer"] = params[0].new_zeros(
                -(-len(params) // rt.world_size), *shape
            )
        self.orthogonalize = torch.compile(newton_schulz, backend=rt.backend) if rt.compile else newton_schulz
        self.shares, self.grad_scale = {}, 1.0  # per stack: this rank's averaged gradients; the clip's factor

    @torch.no_grad()
    def reduce_grads(self, meanwhile=lambda: None) -> Tensor:
        """Average each stack's gradients over the ranks into the shares (reduce-scatters, in flight while
        meanwhile() runs); return the squared norm of this rank's shares, for the global clip."""
        world, pending = self.rt.world_size, []
        for shape, params in self.stacks.items():
            share = -(
                -len(params) // world
            )  # one copy of the gradients, padded with zero matrices to whole shares
            G = torch.stack(
                [p.grad for p in params] + [params[0].new_zeros(shape)] * (share * world - len(params))
            )
            self.shares[shape] = G if world == 1 else G.new_empty(share, *shape)
            if world > 1:
                pending.append(
                    dist.reduce_scatter_tensor(self.shares[shape], G, op=dist.ReduceOp.AVG, async_op=True)
                )
        meanwhile()
        for work in pending:
            work.wait()
        return torch.stack(torch._foreach_norm(list(self.shares.values()))).square().sum()

    @torch.no_grad()
    def step(self):
        lr, mu, wd = (self.param_groups[0][k] for k in ("lr", "momentum", "weight_decay"))
        if not self.shares:  # not reduced by the training step (a single process, a test)
            self.reduce_grads()
        updates = []
        for (rows, cols), params in self.stacks.items():
            G, buf = (
                self.shares.pop((rows, cols)).mul_(self.grad_scale),
                self.state[params[0]]["momentum_buffer"],
            )
            U = G.add(buf.mul_(mu).add_(G), alpha=mu)  # Nesterov
            if self.row_normalize:
                U = U / (U.norm(dim=-1, keepdim=True) + 1e-7)
            updates.append(self.orthogonalize(U, self.steps, self.polar))
        for ((rows, cols), params), update in zip(self.stacks.items(), self.gather(updates)):
            torch._foreach_mul_(params, 1 - lr * wd)
            # mixed dtypes (bf16 updates, fp32 weights) promote in place: no fp32 copy of the update
            torch._foreach_add_(
                params, list(update[: len(params)].unbind(0)), alpha=-lr * max(1.0, rows / cols) ** 0.5
            )

    def gather(self, shares: list[Tensor]) -> list[Tensor]:
        """Every rank's orthogonalized share of every stack, in rank order: one all-gather for all stacks."""
        world = self.rt.world_size
        if world == 1:
            return shares
        flat = torch.cat([u.reshape(-1) for u in shares])  # this rank's shares of every stack, end to end
        out = flat.new_empty(world * flat.numel())
        dist.all_gather_into_tensor(out, flat)
        parts = out.view(world, -1).split(
            [u.numel() for u in shares], dim=1
        )  # per stack: (rank, share * rows * cols)
        # (rank, share * rows * cols) -> the whole stack (world * share, rows, cols), rank r's share at r
        return [p.reshape(world * u.size(0), *u.shape[1:]) for p, u in zip(parts, shares)]


def build_optimizers(model: GPT, h: Hyperparameters, rt: Runtime) -> list[torch.optim.Optimizer]:
    matrices = [m.weight for m in model.grouped_linears()]
    embeds = [model.tok_emb.weight] + [
        m.embed.weight for m in (model.bigram, model.value_embed) if m is not None
    ]
    taken = {id(p) for p in matrices + embeds}
    scalars = [p for p in model.parameters() if id(p) not in taken]
    ns = MuonNS(h.optim.muon_backend_steps, h.optim.muon_ns == "polar", h.optim.muon_eq_r)
    muon = Muon(matrices, h.optim.matrix_lr, h.optim.muon_momentum, h.optim.muon_wd, ns, rt)
    adam = torch.optim.AdamW(
        [
            dict(params=embeds, lr=h.optim.tied_embed_lr, weight_decay=h.optim.embedding_wd),
            dict(params=scalars, lr=h.optim.scalar_lr),
        ],
        betas=(h.optim.beta1, h.optim.beta2),
        eps=h.optim.adam_eps,
        weight_decay=h.optim.adam_wd,
        fused=rt.device.type in ("cuda", "cpu"),  # CPU too: one kernel per group, not ~10 ops per tensor
    )
    for opt in (muon, adam):
        for g in opt.param_groups:
            g["base_lr"] = g["lr"]
    return [muon, adam]


def all_reduce_grads(params: list[Tensor], rt: Runtime, divide_by: float) -> None:
    """Sum gradients over ranks in one flat buffer (one collective), then divide."""
    if rt.world_size > 1:
        grads = [p.grad for p in params if p.grad is not None]
        flat = rt.all_reduce(torch.cat([g.reshape(-1) for g in grads])).div_(divide_by)
        torch._foreach_copy_(
            grads, [v.view_as(g) for v, g in zip(flat.split([g.numel() for g in grads]), grads)]
        )


def lr_multiplier(step: int, elapsed_ms: float, cap_ms: float, h: Hyperparameters) -> float:
    """1, then a linear decay to MIN_LR over the last WARMDOWN_FRAC of the run (of the wallclock cap, else
    of ITERATIONS), or else over the last WARMDOWN_ITERS steps, projected from the mean step time so far
    under a cap (a run shorter than that starts in warmdown: train_model warns)."""
    if h.train.warmdown_frac:
        progress = elapsed_ms / cap_ms if cap_ms > 0 else step / h.train.iterations
        return max(min((1 - progress) / h.train.warmdown_frac, 1.0), h.train.min_lr)
    if h.train.warmdown_iters <= 0:
        return 1.0
    if cap_ms > 0:
        warmdown_ms = h.train.warmdown_iters * elapsed_ms / max(step, 1)
        remaining_ms = max(cap_ms - elapsed_ms, 0.0)
        mul = remaining_ms / max(warmdown_ms, 1e-9) if remaining_ms <= warmdown_ms else 1.0
    else:
        mul = min((h.train.iterations - step) / h.train.warmdown_iters, 1.0)
    return max(mul, h.train.min_lr)


def muon_wd_multiplier(progress: float, h: Hyperparameters) -> float:
    """1 until MUON_WD_TAPER_AT of the run, then linear to MUON_WD_TAPER_TO at its end."""
    at = h.optim.muon_wd_taper_at
    return (
        1.0
        if progress <= at or at >= 1
        else 1 + (h.optim.muon_wd_taper_to - 1) * min((progress - at) / (1 - at), 1.0)
    )


@dataclasses.dataclass(frozen=True)
class StepPlan:
    """The training schedule as data: what one step runs with, all from the step and the agreed time (the
    slowest rank's), so every rank plans the same step. plan_step writes it; Trainer applies it."""

    progress: float  # of the wallclock cap, or of ITERATIONS without one
    stage: int  # recurrence passes on: those whose LOOP_ENABLE_AT fraction is reached
    lr_mul: float  # times every group's base LR (the warmdown)
    wd_mul: float  # times MUON_WD (the taper)
    momentum: float  # Muon's, warming up over MUON_MOMENTUM_WARMUP_STEPS
    qat: bool  # late QAT: the LR multiplier is under LATE_QAT_THRESHOLD


def muon_momentum(step: int, h: Hyperparameters) -> float:
    o = h.optim
    warm = min(step / o.muon_momentum_warmup_steps, 1.0) if o.muon_momentum_warmup_steps else 1.0
    return (1 - warm) * o.muon_momentum_warmup_start + warm * o.muon_momentum


def plan_step(step: int, elapsed_ms: float, cap_ms: float, h: Hyperparameters) -> StepPlan:
    progress = elapsed_ms / cap_ms if cap_ms else step / h.train.iterations
    lr_mul = lr_multiplier(step, elapsed_ms, cap_ms, h)
    return StepPlan(
        progress=progress,
        stage=sum(progress >= f for f in h.model.stage_starts),
        lr_mul=lr_mul,
        wd_mul=muon_wd_multiplier(progress, h),
        momentum=muon_momentum(step, h),
        qat=lr_mul < h.train.late_qat_threshold,
    )


class WeightAverager:
    """EMA of the weights after every optimizer step and/or SWA: the uniform mean of snapshots (of the
    EMA when it is on) taken every SWA_EVERY steps once the LR multiplier is below SWA_START_LRMUL.
    final() says which weights get exported: SWA if it has snapshots, else EMA, else the raw weights."""

    def __init__(self, model: GPT, h: Hyperparameters):
        self.h, self.params = h, [p.detach() for p in model.parameters()]  # views: they follow the weights
        self.ema = [p.float().clone() for p in self.params] if h.train.ema_decay else None
        self.swa, self.swa_count = None, 0

    @torch.no_grad()
    def update(self, step: int, lr_mul: float, log: Log) -> None:
        if self.ema is not None:
            torch._foreach_lerp_(self.ema, self.params, 1 - self.h.train.ema_decay)
        if (
            self.h.train.swa_every
            and lr_mul < self.h.train.swa_start_lrmul
            and step % self.h.train.swa_every == 0
        ):
            source = self.ema if self.ema is not None else self.params
            if self.swa is None:
                self.swa = [torch.zeros_like(t) for t in source]
                log(f"swa:start step:{step}")
            torch._foreach_add_(self.swa, source)
            self.swa_count += 1

    @torch.no_grad()
    def apply_final(self, log: Log) -> str:
        if self.swa_count:
            n = self.swa_count
            label, weights = f"swa({n} snapshots{' of ema' if self.ema else ''})", [t / n for t in self.swa]
        elif self.ema is not None:
            label, weights = f"ema(decay={self.h.train.ema_decay})", self.ema
        else:
            return "raw"
        for p, w in zip(self.params, weights):
            p.copy_(w.to(p.dtype))
        log(f"weights:applying {label}")
        return label


# =====================================================================================================
# QUANTIZATION AND SERIALIZATION
# Pure functions: state dict -> quantized tensors -> bytes -> quantized tensors -> state dict. Attention and MLP
# matrices (int6) and embedding tables (int8) get int grids with per-row fp16 scales, SDClip (k * std(row) / qmax: k
# sets the symbols' entropy) or the MSE-best clip of max |w|, the grids late QAT trains on; the small rest stays
# fp16. Full GPTQ rounds columns in act-order with Hessian error feedback; LQER adds low-rank corrections. The
# artifact is magic + codec + sha256 + compressed payload (a JSON header and raw arrays).
# =====================================================================================================

SMALL_NUMEL = 65536
CLIP_FRACTIONS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)
ARTIFACT_MAGIC = b"PGOLF-Q1"
CODECS = ("zstd", "brotli", "lzma")
FILL_MIN_S = 0.25  # finer than k/4 (3.2 std for int6 matrices), SDClip clips more than the MSE clip would


def round_to_grid(w: Tensor, scale: Tensor, qmax: int) -> Tensor:
    return torch.clamp(torch.round(w / scale[:, None]), -qmax, qmax)


def fp16_grid(x: Tensor) -> Tensor:
    """Round positive fp32 values in fp16's normal range to fp16 precision, in integer arithmetic: a
    compiled graph may drop a .half().float() round trip, which would move QAT off the export grid."""
    return ((x.view(torch.int32) + 0x1000) & -0x2000).view(torch.float32)


def row_scales(w: Tensor, bits: int, k: float) -> Tensor:
    """Per-row scale, exactly representable in fp16. SDClip (k > 0): the grid spans +-k*std(row), so k
    sets the step and the symbols' entropy (about bits - log2 k). k = 0: the clip among fractions of
    the row's max |w| that minimizes its squared rounding error."""
    qmax = 2 ** (bits - 1) - 1
    if k:
        return fp16_grid((k * w.std(dim=1, correction=0) / qmax).clamp_min(2**-14))
    scales = torch.stack(
        [fp16_grid((w.abs().amax(dim=1) * f / qmax).clamp_min(2**-14)) for f in CLIP_FRACTIONS]
    )
    errors = torch.stack([(round_to_grid(w, s, qmax) * s[:, None] - w).square().sum(dim=1) for s in scales])
    return scales.gather(0, errors.argmin(0, keepdim=True))[0]  # per row, the first fraction of least error


def fake_quantize(w: Tensor, bits: int, k: float) -> Tensor:
    scale = row_scales(w, bits, k)
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
        L, info = torch.linalg.cholesky_ex(H + torch.eye(len(H), device=H.device) * damp * 10**attempt)
        if info == 0:
            U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
        if info == 0:
            break
    else:
        raise ConfigError(
            f"GPTQ: a Hessian is not positive definite with GPTQ_DAMP={damp} x 1e5 (nan weights? else "
            "raise GPTQ_DAMP)"
        )
    Q = torch.zeros_like(W)
    for i1 in range(0, W.size(1), block):
        i2 = min(i1 + block, W.size(1))
        W1 = W[:, i1:i2].clone()
        E1 = torch.zeros_like(W[:, i1:i2])
        U1 = U[i1:i2, i1:i2]
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
        values = self.values.float()
        return (values * self.scale.float()[:, None]).reshape(self.shape) if self.bits else values


def quant_group(name: str, t: Tensor) -> str:
    """'attn' / 'mlp': block matrices at any size (the grids late QAT trains on); 'embed': the other
    tensors above 65,536 values (embedding tables); '': the fp16 rest (vectors, gains, small projections)."""
    if name.startswith("blocks.") and t.ndim == 2:
        return name.split(".")[2]
    return "embed" if t.numel() > SMALL_NUMEL else ""


def quant_plan(h: Hyperparameters) -> dict[str, tuple[int, float]]:
    """Group -> (bits, SDClip k); k = 0 is the MSE clip search."""
    sd = h.export.quant_clip == "sd"
    return {
        "attn": (
            h.export.quant_bits_attn or h.export.quant_bits,
            (h.export.quant_clip_k_attn or h.export.quant_clip_k) * sd,
        ),
        "mlp": (
            h.export.quant_bits_mlp or h.export.quant_bits,
            (h.export.quant_clip_k_mlp or h.export.quant_clip_k) * sd,
        ),
        "embed": (h.export.embed_bits, h.export.embed_clip_k * sd),
    }


def quantize_state(
    state: dict[str, Tensor],
    plan: dict,
    hessians: dict[str, Tensor] | None = None,
    damp: float = 0.01,
    prune: float = 0.0,
) -> dict[str, QTensor]:
    """Every tensor on its group's grid (scales from the unpruned weights, so QAT's grid is kept), after
    zeroing the `prune` fraction of smallest |w|; rounded by GPTQ where a Hessian is given. Computed on
    the tensors' device; the results are on the CPU."""
    out = {}
    for name, t in state.items():
        t = t.detach().float()
        group = quant_group(name, t)
        if not group:
            out[name] = QTensor(tuple(t.shape), 0, t.half().cpu())
            continue
        bits, k = plan[group]
        w = t.reshape(t.shape[0], -1)  # (rows, every other dim): one scale per row
        scale, qmax = row_scales(w, bits, k), 2 ** (bits - 1) - 1
        if int(prune * w.numel()):
            w = w * (w.abs() > w.abs().flatten().kthvalue(int(prune * w.numel())).values)
        H = hessians.get(name) if hessians else None
        q = gptq_round(w, H.to(w), scale, qmax, damp) if H is not None else round_to_grid(w, scale, qmax)
        out[name] = QTensor(tuple(t.shape), bits, q.to(torch.int8).cpu(), scale.half().cpu())
    return out


def add_lqer(
    state: dict[str, Tensor], qstate: dict[str, QTensor], rank: int, count: int
) -> dict[str, QTensor]:
    """LQER (#1797): for the `count` int tensors with the largest quantization error E = W - Q(W), the rank-r SVD
    E ~ A B as artifact entries added to a copy of qstate, folded back by dequantized(): '<name>.lqA' = A^T int2 (a scale per rank component;
    k = 1.224: a Gaussian's Lloyd-Max 3-level grid), '<name>.lqB' = B int4 in groups of 64 (else rows of B)."""
    if not rank:
        return qstate
    qstate = dict(qstate)
    err = {
        n: state[n].detach().float().cpu().reshape(q.values.shape) - q.dequantize().reshape(q.values.shape)
        for n, q in qstate.items()
        if q.bits
    }
    for n in sorted(err, key=lambda n: -err[n].norm().item())[:count]:
        U, S, Vh = torch.linalg.svd(err[n], full_matrices=False)
        B = Vh[:rank].reshape(-1, 64) if Vh.size(1) % 64 == 0 else Vh[:rank]
        for suffix, f, bits, k in (("lqA", (U[:, :rank] * S[:rank]).T, 2, 1.224), ("lqB", B, 4, 0.0)):
            scale = row_scales(f, bits, k)
            q = round_to_grid(f, scale, 2 ** (bits - 1) - 1).to(torch.int8)
            qstate[f"{n}.{suffix}"] = QTensor(tuple(f.shape), bits, q, scale.half())
    return qstate


def dequantized(qstate: dict[str, QTensor]) -> dict[str, Tensor]:
    """The model's weights from an artifact's tensors (float ones pass through), each plus its LQER correction A @ B."""
    w = {
        k: q.dequantize() if isinstance(q, QTensor) else q
        for k, q in qstate.items()
        if not k.endswith((".lqA", ".lqB"))
    }
    for k in w:
        if f"{k}.lqA" in qstate:
            a_t = qstate[f"{k}.lqA"].dequantize()
            w[k] = w[k] + (a_t.T @ qstate[f"{k}.lqB"].dequantize().reshape(a_t.size(0), -1)).reshape(
                w[k].shape
            )
    return w


def entropy_bytes(qstate: dict[str, QTensor]) -> float:
    """Order-0 entropy of each int tensor's symbols plus 2 bytes per fp16 value: a fast size proxy."""
    total = 0.0
    for q in qstate.values():
        if q.bits:
            p = torch.bincount(q.values.flatten().long() + 128, minlength=256).double() / q.values.numel()
            total += -(p[p > 0] * p[p > 0].log2()).sum().item() * q.values.numel() / 8 + 2 * q.scale.numel()
        else:
            total += 2 * q.values.numel()
    return total


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
        head = json.loads(payload[4 : 4 + n])
        entries, pos = head["tensors"], 4 + n
        n_ints = sum(math.prod(s) for _, s, b in entries if b)
        rows = sum(s[0] if b else math.prod(s) for _, s, b in entries)
        if len(payload) != pos + n_ints + 2 * rows:
            raise ValueError(f"payload is {len(payload)} bytes, its header implies {pos + n_ints + 2 * rows}")
        ints = np.frombuffer(payload, dtype=np.int8, count=n_ints, offset=pos)
        halves = (
            np.frombuffer(payload, dtype=np.uint8, offset=pos + n_ints)
            .reshape(2, -1)
            .T.copy()
            .view(np.float16)
        )
    except (struct.error, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{where}: malformed artifact payload ({e})") from None
    out = {}
    i_pos = 0
    h_pos = 0
    for name, shape, bits in entries:
        if bits:
            r, c = shape[0], math.prod(shape) // shape[0]
            values = torch.from_numpy(ints[i_pos : i_pos + r * c].reshape(r, c).copy())
            scale = torch.from_numpy(halves[h_pos : h_pos + r].reshape(-1).copy())
            out[name] = QTensor(tuple(shape), bits, values, scale)
            i_pos, h_pos = i_pos + r * c, h_pos + r
        else:
            k = math.prod(shape)
            out[name] = QTensor(
                tuple(shape), 0, torch.from_numpy(halves[h_pos : h_pos + k].reshape(shape).copy())
            )
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
    return (
        mod.compress(data, quality=11)
        if codec == "brotli"
        else mod.compress(data, preset=9 | lzma.PRESET_EXTREME)
    )


def decompress(data: bytes, codec: str) -> bytes:
    mod = _codec_module(codec)
    return mod.ZstdDecompressor().decompress(data) if codec == "zstd" else mod.decompress(data)


def pack_artifact(qstate: dict[str, QTensor], meta: dict, codec: str) -> bytes:
    body = compress(encode_payload(qstate, meta), codec)
    return ARTIFACT_MAGIC + bytes([CODECS.index(codec)]) + hashlib.sha256(body).digest() + body


def read_artifact(path: str) -> tuple[dict[str, QTensor], dict]:
    need(os.path.isfile(path), f"artifact not found: {path}")
    blob, m = Path(path).read_bytes(), len(ARTIFACT_MAGIC)
    head = m + 1 + 32  # magic, codec id, sha256 of the body
    need(
        len(blob) >= head and blob[: m - 1] == ARTIFACT_MAGIC[:-1],
        f"{path}: not a Parameter Golf artifact (bad magic; expected {ARTIFACT_MAGIC!r})",
    )
    need(
        blob[:m] == ARTIFACT_MAGIC,
        f"{path}: artifact format {blob[:m]!r}, this script reads {ARTIFACT_MAGIC!r}",
    )
    codec_id = blob[m]
    digest = blob[m + 1 : head]
    body = blob[head:]
    need(codec_id < len(CODECS), f"{path}: unknown codec id {codec_id}")
    need(
        hashlib.sha256(body).digest() == digest,
        f"{path}: sha256 mismatch, the artifact is truncated or corrupted",
    )
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


def scaled_plan(plan: dict, factor: float) -> dict:
    """Every group's SDClip k times factor (bits kept)."""
    return {g: (b, k * factor) for g, (b, k) in plan.items()}


@dataclasses.dataclass
class Fit:
    """A rate-control candidate: the plan (group -> (bits, SDClip k)), its quantized weights and, once packed
    for real, the artifact's bytes."""

    plan: dict
    qstate: dict
    blob: bytes | None = None


class RateControl:
    """The searches of fit_to_budget. Bytes fall monotonically with k (entropy ~ bits - log2 k), so a common
    factor s on every SDClip k is bisected against the symbols' entropy times `ratio`, the measured
    compressed/entropy ratio; only a search's result is packed for real, and a miss corrects the ratio (it was
    low) and searches again. Every step and candidate is logged as auto_fit:..."""

    def __init__(self, quantize, pack, limit: int, calib_loss, log: Log):
        self.quantize = quantize
        self.pack = pack
        self.limit = limit
        self.calib_loss = calib_loss
        self.log = log
        self.t0 = now()
        self.steps = 0
        self.ratio = 0.0  # compressed bytes per entropy byte: fit_to_budget measures it on the first pack

    def step(self, plan: dict, real: bool, what: str, q=None) -> tuple[Fit, float]:
        """The plan as a Fit (quantized, or q when it already is; packed when `real`) and its size: the packed
        bytes, or else the estimate."""
        q = self.quantize(plan) if q is None else q
        blob = self.pack(q) if real else None
        size = len(blob) if real else self.ratio * entropy_bytes(q)
        self.steps += 1
        self.log(
            f"auto_fit:step {self.steps} {what} plan:{fmt_plan(plan)} {'bytes' if real else 'est_bytes'}:{size:.0f} "
            f"limit:{self.limit} elapsed:{now() - self.t0:.1f}s"
        )
        return Fit(plan, q, blob), size

    def correct(self, size: int, fit: Fit) -> None:
        """A real pack came out over its estimate: raise the ratio to what it measured (+0.2 %)."""
        self.ratio *= size / (self.ratio * entropy_bytes(fit.qstate)) * 1.002

    def smallest_scale(self, plan: dict, lo: float, hi: float, at_hi: Fit) -> tuple[float, Fit]:
        """Bisect s in [lo, hi] (the estimate fits at hi, whose Fit is at_hi, and not at lo): the smallest s that
        fits, and its Fit."""
        for _ in range(7):
            mid = (lo + hi) / 2
            trial, est = self.step(scaled_plan(plan, mid), False, f"k x{mid:.3f}")
            if est <= self.limit:
                hi, at_hi = mid, trial
            else:
                lo = mid
        return hi, at_hi

    def least_loss(self, fits: list[Fit]) -> Fit:
        """The candidate of lowest calibration loss (the first of equals), every one logged."""
        losses = []
        for fit in fits:
            losses.append(self.calib_loss(fit.qstate))
            self.log(
                f"auto_fit:candidate {fmt_plan(fit.plan)} est_bytes:{self.ratio * entropy_bytes(fit.qstate):.0f} "
                f"calib_loss:{losses[-1]:.5f} elapsed:{now() - self.t0:.1f}s"
            )
        return fits[losses.index(min(losses))]

    def fill(self, start: Fit) -> Fit:
        """Under the limit: the smallest s in [FILL_MIN_S, 1] that fits and the MSE clip (k = 0) are the
        candidates; whichever fits with a calibration loss below the start's is packed for real. Up to three
        real misses; else the start."""
        plan = start.plan
        for _ in range(3):
            finer, est = self.step(scaled_plan(plan, FILL_MIN_S), False, f"k x{FILL_MIN_S:.3f}")
            s = FILL_MIN_S
            if est > self.limit:
                s, finer = self.smallest_scale(plan, FILL_MIN_S, 1.0, start)
            mse, est_mse = self.step({g: (b, 0.0) for g, (b, _) in plan.items()}, False, "mse clip")
            options = [finer] * (s < 1) + [mse] * (est_mse <= self.limit)
            if not options:
                break
            best = self.least_loss([start, *options])
            if best is start:
                break
            packed, size = self.step(best.plan, True, "fill", best.qstate)
            if size <= self.limit:
                return packed
            self.correct(size, packed)
        return start

    def cheapest_bit(self, base: Fit) -> Fit | None:
        """The plan with one bit less in the group whose calibration loss rises least per byte saved, and its
        qstate; None when no group can lose one (none above int2) or none saves bytes."""
        base_bytes = entropy_bytes(base.qstate)
        base_loss = self.calib_loss(base.qstate)
        best = None
        best_cost = math.inf  # calibration loss per byte saved
        for g, (b, k) in base.plan.items():
            if b > 2:
                trial = {**base.plan, g: (b - 1, k)}
                q = self.quantize(trial)
                saved = base_bytes - entropy_bytes(q)
                cost = self.calib_loss(q) - base_loss
                self.log(
                    f"auto_fit:candidate {g} int{b}->int{b - 1} saves ~{self.ratio * saved:.0f} bytes, "
                    f"calib loss {cost:+.5f}"
                )
                if saved > 0 and (best is None or cost / saved < best_cost):
                    best, best_cost = Fit(trial, q), cost / saved
        return best

    def shrink(self, fit: Fit, size: int) -> Fit:
        """Over the limit: s in [1, 2] (s = 2 is worth about one bit); when even s = 2 is over, the group whose
        calibration loss rises least per byte saved loses a bit (cheapest_bit), and k is searched again."""
        base = fit  # the plan with unscaled k, and its qstate: what loses the next bit
        while size > self.limit:
            if any(k for _, k in base.plan.values()):
                top, est = self.step(scaled_plan(base.plan, 2.0), False, "k x2.000")
                if est <= self.limit:
                    s, finer = self.smallest_scale(base.plan, 1.0, 2.0, top)
                    fit, size = self.step(finer.plan, True, f"k x{s:.3f}", finer.qstate)
                    if size <= self.limit:
                        return fit
                    self.correct(size, fit)
                    continue
            fewer = self.cheapest_bit(base)
            need(
                fewer is not None,
                f"AUTO_FIT: nothing fits {self.limit} bytes: even {fmt_plan(base.plan)} with k x2 is over "
                f"(last packed {size} bytes); raise BYTE_BUDGET or shrink the model",
            )
            fit, size = self.step(fewer.plan, True, "bits", fewer.qstate)
            base = fit
        return fit


def fit_to_budget(quantize, pack, plan: dict, limit: int, calib_loss, log: Log, fill: bool = True) -> Fit:
    """Rate control: the plan (group -> (bits, k)) whose packed artifact fits `limit` bytes, searched by
    RateControl. Over the limit, it shrinks (RateControl.shrink); under it, with `fill` and some SDClip k in the
    plan, it spends what is left on a lower calibration loss (RateControl.fill); else the plan as given."""
    control = RateControl(quantize, pack, limit, calib_loss, log)
    start, size = control.step(plan, True, "start")
    control.ratio = size / entropy_bytes(start.qstate)
    if size > limit:
        return control.shrink(start, size)
    if fill and size < limit and any(k for _, k in plan.values()):
        return control.fill(start)
    return start


def fmt_plan(plan: dict) -> str:
    return ",".join(f"{g}=int{b}" + (f"@k{k:.2f}" if k else "@mse") for g, (b, k) in plan.items())


def without_docstrings(tree: ast.Module) -> ast.Module:
    """The tree with every module/class/function docstring, every knob's help and every function's argument
    and return annotations dropped (a body left empty gets `pass`): documentation, which nothing reads at run
    time (`from __future__ import annotations` keeps them unevaluated strings). torch.library.custom_op reads
    its function's annotations (the op's schema): those stay, as do dataclass fields (Hyperparameters parses
    by them)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and not any(
            "custom_op" in ast.unparse(d) for d in node.decorator_list
        ):
            args = node.args
            for a in (
                args.posonlyargs + args.args + args.kwonlyargs + [a for a in (args.vararg, args.kwarg) if a]
            ):
                a.annotation = None
            node.returns = None
        if (
            isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
            and ast.get_docstring(node, clean=False) is not None
        ):
            node.body = node.body[1:] or [ast.Pass()]
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "knob":
            node.keywords = [k for k in node.keywords if k.arg != "help"]  # the README's, not the run's
    return tree


def code_shape(code: types.CodeType) -> tuple:
    """A code object's bytecode, global and attribute names and constants, inner code objects likewise: two programs
    of equal shape run the same, whatever their local variables are called."""
    consts = tuple(code_shape(c) if isinstance(c, types.CodeType) else c for c in code.co_consts)
    return code.co_code, code.co_names, consts


def short_locals(tree: ast.Module) -> ast.Module:
    """Each function's local variables renamed to the shortest names it does not use, most frequent first (~1.2 KB
    packed); parameters, globals and attributes keep theirs. A function with an inner scope (def, lambda, class),
    a global or nonlocal statement keeps its names, and so does one whose renamed bytecode would differ beyond the
    names (e.g. a comprehension variable also read as a global elsewhere in the function)."""
    letters = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
    names = [*letters, *(a + b for a in letters for b in letters if not keyword.iskeyword(a + b))]
    scopes = (ast.FunctionDef, ast.Lambda, ast.ClassDef, ast.Global, ast.Nonlocal)
    for f in [f for f in ast.walk(tree) if isinstance(f, ast.FunctionDef)]:
        inner = [n for s in f.body for n in ast.walk(s)]
        if any(isinstance(n, scopes) for n in inner):
            continue
        refs = [n for n in inner if isinstance(n, ast.Name)]
        params = {a.arg for a in ast.walk(f.args) if isinstance(a, ast.arg)}
        bound = {n.id for n in refs if not isinstance(n.ctx, ast.Load)} - params
        used = {v for n in ast.walk(f) for v in vars(n).values() if isinstance(v, str)}  # every name in it
        fresh = iter([n for n in names if n not in used])
        order = collections.Counter(n.id for n in refs if n.id in bound).most_common()
        new = {name: next(fresh) for name, _ in order}
        if not new:
            continue
        before = code_shape(compile(ast.Module([f], []), "", "exec"))
        old = [n.id for n in refs]
        for n in refs:
            n.id = new.get(n.id, n.id)
        if code_shape(compile(ast.Module([f], []), "", "exec")) != before:
            for n, name in zip(refs, old):
                n.id = name
    return tree


def minified_code(code: str) -> str:
    """The program of `code` in fewer bytes: ast.unparse of it without docstrings (no comments, no layout),
    re-spaced by tokens: one space per level of indentation instead of four (Python needs only consistency) and
    no space beside an operator or bracket (`a = f(b, c)` -> `a=f(b,c)`): ~770 B fewer once packed. The
    program must stay the same one, whatever the Python's tokenizer does (3.12 splits f-strings into tokens):
    when the re-spaced tree differs from the source's, the plain ast.unparse is packed instead."""
    source = ast.unparse(short_locals(without_docstrings(ast.parse(code))))
    out, prev = [], None
    for t in tokenize.generate_tokens(io.StringIO(source).readline):
        if t.type in (
            tokenize.INDENT,
            tokenize.DEDENT,
            tokenize.NL,
        ):  # NL: a blank line (none inside brackets)
            continue
        if prev is None or prev.type == tokenize.NEWLINE:
            out.append(" " * (t.start[1] // 4))
        elif t.start[1] > prev.end[1] and tokenize.OP not in (t.type, prev.type):
            out.append(" ")
        out.append(t.string)
        prev = t
    minified = "".join(out)
    if ast.dump(ast.parse(minified)) != ast.dump(ast.parse(source)):
        return source + "\n"
    return minified


PACKED_PREFIX = 'import brotli as C,base64 as B\nexec(C.decompress(B.b85decode("'


def packed_code(code: str) -> str:
    """Self-extracting form of this file (brotli-11 + base85 in a two-line exec wrapper): what tools/pack_script.py
    writes, and the code size a packed submission pays. It packs the source minified (ast.unparse: no comments or
    docstrings, which nothing here reads at run time): the same program in fewer bytes. brotli (a requirement: the
    default artifact codec) packs this source ~3 % smaller than LZMA2 at its extreme preset (30.8 vs 31.8 KB)."""
    data = base64.b85encode(compress(minified_code(code).encode(), "brotli")).decode()
    return PACKED_PREFIX + data + '")))\n'


SAME_INPUT_AS = {"c_k": "c_q", "c_v": "c_q"}  # matrices that read another's input: one Hessian for both


def shipped_code_bytes(code: str, h: Hyperparameters) -> tuple[int, str]:
    """The bytes of the train_gpt.py a record ships, and which form: the packed script by default (what
    tools/package_record.py writes), the readable source with CODE_SHIPPED=raw, or this file itself when it
    already is the packed script (a run from a records/ folder)."""
    if code.startswith(PACKED_PREFIX):
        return len(code.encode()), "packed (this file)"
    if h.export.code_shipped == "packed":
        return len(packed_code(code).encode()), "packed"
    return len(code.encode()), "raw"


@torch.no_grad()
def collect_hessians(
    model: GPT, loader: TrainLoader, h: Hyperparameters, rt: Runtime, may_read=lambda: True
) -> dict[str, Tensor]:
    """X^T X of the input of every block matrix, and of the final hidden state for the tied embedding (the output
    head), summed over ranks and up to GPTQ_CALIB_BATCHES training micro-batches per rank (fewer once may_read() says
    the training cap has come). Each product is added in place as the forward goes, so no layer's input outlives
    its layer; c_k and c_v read c_q's input and get c_q's Hessian (the same tensor: one per distinct input)."""
    hessians: dict[str, Tensor] = {}

    def accumulate(name: str, x: Tensor) -> None:
        flat = x.detach().float().reshape(-1, x.size(-1))  # (B * T, in_features): H += X^T X
        if name in hessians:
            hessians[name].addmm_(flat.T, flat)
        else:
            hessians[name] = flat.T @ flat

    linears = [(n, m) for n, m in model.blocks.named_modules() if isinstance(m, CastedLinear)]
    hooks = [
        m.register_forward_hook(lambda _, inputs, out, name=f"blocks.{n}.weight": accumulate(name, inputs[0]))
        for n, m in linears
        if n.rsplit(".", 1)[-1] not in SAME_INPUT_AS
    ]
    for _ in range(h.export.gptq_calib_batches):
        if not may_read():
            break
        x, _ = loader.next_batch(h.train.train_batch_tokens, h.model.train_seq_len)
        with rt.autocast():
            accumulate("tok_emb.weight", model.hidden(x))  # the tied head reads the final hidden state
    for hook in hooks:
        hook.remove()
    for name in sorted(hessians):
        rt.all_reduce(hessians[name])
    for n, _ in linears:  # the aliases, after the reduction (each distinct tensor is reduced once)
        parent, leaf = n.rsplit(".", 1)
        if leaf in SAME_INPUT_AS and f"blocks.{parent}.{SAME_INPUT_AS[leaf]}.weight" in hessians:
            hessians[f"blocks.{n}.weight"] = hessians[f"blocks.{parent}.{SAME_INPUT_AS[leaf]}.weight"]
    return hessians


# =====================================================================================================
# TRAINING
# Wallclock-capped loop: the timer pauses for validation; a step starts only if projected to end before the cap
# (MAX_WALLCLOCK_SECONDS, less GPTQ_RESERVE_SECONDS when full GPTQ calibrates on training data after it): every
# read of training data is inside the budget. Compile warm-up steps run every graph the run needs, then are undone.
# =====================================================================================================


class AgreedClock:
    """Training time that every rank agrees on, without a host sync per step.

    The schedule (recurrence stage, LR, WD, late QAT) and the stop switch on training time. Read from each
    rank's own clock they switch on different steps on different ranks: the AdamW buffer then has a different
    length on each rank (a mismatched collective) and the weights drift apart. So each step's elapsed time is
    all-reduced (MAX, the slowest rank) without waiting, and read one step later, when it has long arrived:
    every rank sees the same number at the same step, and the device queue never drains for it. On CUDA the
    value is copied into pinned host memory behind the all-reduce and read through an event, so the host
    waits for the previous step's work only. pause() is the exact, synced time (validation, the end)."""

    def __init__(self, rt: Runtime):
        self.rt = rt
        self.paused_ms = 0.0
        self.t0 = 0.0
        self.pending = None
        self.ms = 0.0  # the agreed time
        self.at_step = 0  # its step
        self.prev = (0.0, 0)  # the one before
        # How many steps the stop looks ahead of the last agreed time: the next step, this one, and on CUDA
        # up to two more that the host may have queued ahead of the device when it measured.
        self.lookahead = 4 if rt.device.type == "cuda" else 2

    def start(self) -> None:
        """(Re)start the timer, every rank at once."""
        self.t0 = self.rt.start_together()

    def pause(self, step: int) -> float:
        """Stop the timer: the exact time so far, the slowest rank's."""
        mine = self.local_ms(synced=True)
        self.paused_ms = self.rt.reduce([mine], dist.ReduceOp.MAX)[0]
        self.pending = None
        self.agree(self.paused_ms, step)
        return self.paused_ms

    def local_ms(self, synced: bool = False) -> float:
        """This rank's own training time (synced: once its queued work has run): never a decision's input."""
        return self.paused_ms + ((self.rt.clock() if synced else self.rt.time()) - self.t0) * 1000

    def agree(self, ms: float, step: int) -> None:
        if step > self.at_step:
            self.prev = (self.ms, self.at_step)
        self.ms, self.at_step = ms, step

    def post(self, step: int) -> None:
        """Send this rank's elapsed time after `step` steps; take in the one sent a step ago."""
        previous = self.pending
        self.pending = (step, self.send(self.local_ms()))
        if previous is not None:
            self.agree(self.receive(previous[1]), previous[0])

    def send(self, ms: float) -> tuple:
        rt, cuda = self.rt, self.rt.device.type == "cuda"
        src = torch.tensor([ms], dtype=torch.float64)
        t = src.pin_memory().to(rt.device, non_blocking=True) if cuda else src
        work = dist.all_reduce(t, op=dist.ReduceOp.MAX, async_op=True) if rt.world_size > 1 else None
        if not cuda:
            return (work, t, None)
        if work is not None:
            work.wait()  # NCCL: the current stream waits for the all-reduce, the host does not
        host = torch.empty(1, dtype=torch.float64, pin_memory=True)
        host.copy_(t, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return (None, host, event)

    @staticmethod
    def receive(sent: tuple) -> float:
        work, value, event = sent
        if event is not None:
            event.synchronize()
        if work is not None:
            work.wait()
        return float(value[0])

    def step_ms(self) -> float:
        """The longer of the mean step and the last measured one, in agreed time."""
        ms, step = self.ms, self.at_step
        last = (ms - self.prev[0]) / (step - self.prev[1]) if step > self.prev[1] else 0.0
        return max(ms / max(step, 1), last)

    def cap_reached(self, cap_ms: float) -> bool:
        """Whether a step started now might end past the cap (the same answer on every rank)."""
        return cap_ms > 0 and self.at_step > 0 and self.ms + self.lookahead * self.step_ms() >= cap_ms


def compile_model(fn, rt: Runtime):
    """The model (training loss) or its token_nll (scoring), compiled when compiling."""
    return torch.compile(fn, dynamic=False, fullgraph=True, backend=rt.backend) if rt.compile else fn


def dynamo_counters():
    """torch.compile's counters (graphs built, cache hits); torch._dynamo is slow to import, so only when compiling."""
    from torch._dynamo.utils import counters

    return counters


def compiled_graphs(rt: Runtime) -> int:
    """Graphs torch.compile has built so far in this process (0 when not compiling)."""
    return dynamo_counters()["stats"]["unique_graphs"] if rt.compile else 0


class Trainer:
    """Training's state and its phases: the step (micro-batches, the reduction, the clip, the optimizers), the
    compile warm-up, the schedule, the timed loop, GPTQ's calibration inside the cap, the validation score.
    Every schedule decision reads the agreed clock (the slowest rank's time, one step late), never this rank's."""

    def __init__(
        self, model: GPT, h: Hyperparameters, rt: Runtime, loader: TrainLoader, val: tuple, log: Log
    ):
        self.model = model
        self.h = h
        self.rt = rt
        self.loader = loader
        self.val = val  # (val tokens, byte tables)
        self.log = log
        self.compiled = compile_model(model, rt)
        self.score_fn = compile_model(model.token_nll, rt)
        self.optimizers = build_optimizers(model, h, rt)
        self.adam_params = [
            p for g in self.optimizers[1].param_groups for p in g["params"]
        ]  # Muon reduces its own
        reserve = h.export.gptq_reserve_seconds if h.export.quant_method == "full" else 0.0
        self.cap_ms = (
            max(h.train.max_wallclock_seconds - reserve, 0.0) * 1000 if h.train.max_wallclock_seconds else 0.0
        )
        self.last_batch = []  # the export's calibration tokens: data read inside the cap, never re-read
        self.clock = AgreedClock(rt)
        self.qat_on = False
        self.warned_schedule = False

    def set_hyper(self, plan: StepPlan) -> None:
        muon = self.optimizers[0].param_groups[0]
        for opt in self.optimizers:
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * plan.lr_mul
        muon["weight_decay"] = self.h.optim.muon_wd * plan.wd_mul
        muon["momentum"] = plan.momentum

    def clip(self, muon_sq: Tensor) -> None:
        """The global norm of the rank-averaged gradients: Muon's shares (muon_sq, this rank's) and the rest."""
        adam_grads = [p.grad for p in self.adam_params if p.grad is not None]
        adam_sq = torch.stack(torch._foreach_norm(adam_grads)).square().sum()
        norm = (self.rt.all_reduce(muon_sq) + adam_sq).sqrt()
        self.optimizers[0].grad_scale = (self.h.train.grad_clip_norm / (norm + 1e-6)).clamp(max=1.0)
        torch._foreach_mul_(adam_grads, self.optimizers[0].grad_scale)

    def step(self, plan: StepPlan) -> Tensor:
        """One optimizer step over this rank's micro-batches; returns this rank's mean loss (on the device)."""
        h, rt = self.h, self.rt
        self.set_hyper(plan)
        total = torch.zeros((), device=rt.device)
        for _ in range(rt.grad_accum):
            x, y = self.loader.next_batch(h.train.train_batch_tokens, h.model.train_seq_len)
            with rt.autocast():
                loss = self.compiled(x, y)
            (loss / rt.grad_accum).backward()
            total += loss.detach()
        self.last_batch[:] = x, y
        muon_sq = self.optimizers[0].reduce_grads(
            lambda: all_reduce_grads(self.adam_params, rt, rt.world_size)
        )
        if h.train.grad_clip_norm:
            self.clip(muon_sq)
        for opt in self.optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
        return total / rt.grad_accum

    def val_score(self) -> tuple[float, float]:
        """Non-overlapping windows at the training length."""
        h, rt = self.h, self.rt
        batch = eval_batch(h, rt.world_size, h.model.train_seq_len)
        tokens, luts = self.val
        return loss_and_bpb(
            evaluate(self.score_fn, tokens, h.model.train_seq_len, h.model.train_seq_len, batch, luts, rt)
        )

    def warm_up(self) -> None:
        """Compile every variant of the graph (each recurrence stage, then late QAT's), then restore the weights, the
        optimizer state and the data position: the timed run starts as if this never ran."""
        h, model = self.h, self.model
        variants = [(s, None) for s in range(model.n_stages)]
        if h.train.late_qat_threshold:
            variants.append((model.n_stages - 1, quant_plan(h)))
        if not h.train.warmup_steps:
            return
        weights = copy.deepcopy(model.state_dict())
        states = [copy.deepcopy(o.state_dict()) for o in self.optimizers]
        position = self.loader.state()
        for i in range(h.train.warmup_steps):
            stage, bits = variants[max(0, i - (h.train.warmup_steps - len(variants)))]
            model.set_stage(stage)
            model.set_qat(bits)
            self.step(StepPlan(0.0, stage, 1.0, 1.0, muon_momentum(0, h), False))
            if i < 3 or (i + 1) % 10 == 0 or i + 1 == h.train.warmup_steps:
                self.log(f"warmup_step:{i + 1}/{h.train.warmup_steps}")
        model.load_state_dict(weights)
        for opt, state in zip(self.optimizers, states):
            opt.load_state_dict(state)
        self.loader.restore(position)
        model.set_stage(0)
        model.set_qat(None)
        if h.train.warmup_steps < len(variants):
            self.log(
                f"warmup: {len(variants) - h.train.warmup_steps} graph variants will compile inside the timed run"
            )

    def schedule(self, step: int) -> StepPlan:
        """The step's plan (plan_step, from the agreed time), its stage switch and late QAT's applied here, once."""
        h, model = self.h, self.model
        plan = plan_step(step, self.clock.ms, self.cap_ms, h)
        if plan.stage != model.stage:
            model.set_stage(plan.stage)
            self.log(f"recurrence:stage {plan.stage} active_layers:{len(model.active)} step:{step}")
        if plan.lr_mul < 1 and plan.progress < 0.1 and not (self.warned_schedule or h.train.warmdown_frac):
            self.warned_schedule = True
            self.log(
                f"warning: the LR warmdown starts at step {step}, {plan.progress:.0%} into the run (lr_mul "
                f"{plan.lr_mul:.3f}" + (", late QAT on at once" if plan.qat else "") + "): WARMDOWN_ITERS="
                f"{h.train.warmdown_iters} is about as long as the whole run; set WARMDOWN_FRAC (e.g. 0.5) for short runs"
            )
        if plan.qat and not self.qat_on:
            model.set_qat(quant_plan(h))
            self.qat_on = True
            self.log(f"late_qat:enabled step:{step} scale:{plan.lr_mul:.4f} grid:{fmt_plan(quant_plan(h))}")
        return plan

    def validate(self, step: int, last: bool) -> float:
        """The clock paused (synced, exact) around the VAL_LOSS_EVERY score; returns the training time so far."""
        h = self.h
        train_ms = self.clock.pause(step)
        if h.train.val_loss_every:  # VAL_LOSS_EVERY=0: no validation while training, not even at the end
            loss, bpb = self.val_score()
            self.log(
                f"step:{step}/{h.train.iterations} val_loss:{loss:.4f} val_bpb:{bpb:.4f} train_time:{train_ms:.0f}ms "
                f"step_avg:{train_ms / max(step, 1):.2f}ms"
            )
        if not last:
            self.clock.start()
        return train_ms

    def log_step(self, step: int, loss: Tensor) -> None:
        loss = self.rt.all_reduce(loss) / self.rt.world_size  # the global mean, any world size
        mine = self.clock.local_ms(synced=True)  # rank 0's time, for the log only
        self.log(
            f"step:{step}/{self.h.train.iterations} train_loss:{loss.item():.4f} train_time:{mine:.0f}ms "
            f"step_avg:{mine / step:.2f}ms"
        )

    def loop(self, averager: WeightAverager) -> tuple[int, bool, float]:
        """The timed run, to ITERATIONS or the agreed cap; returns the steps, whether the cap stopped it, and the
        training time."""
        h, clock = self.h, self.clock
        step, stop_after = 0, None
        clock.start()
        while True:
            last = step == h.train.iterations or (stop_after is not None and step >= stop_after)
            if last or (h.train.val_loss_every and step % h.train.val_loss_every == 0):
                train_ms = self.validate(step, last)
            if last:
                break
            plan = self.schedule(step)
            loss = self.step(plan)
            step += 1
            averager.update(step, plan.lr_mul, self.log)
            clock.post(step)
            if stop_after is None and clock.cap_reached(self.cap_ms):
                stop_after = step
            if step <= 10 or step % h.train.train_log_every == 0 or stop_after is not None:
                self.log_step(step, loss)
        stopped = stop_after is not None and step < h.train.iterations
        if stopped:
            self.log(
                f"stopping_early: wallclock_cap train_time:{train_ms:.0f}ms step:{step}/{h.train.iterations}"
            )
        return step, stopped, train_ms

    def calibrate(self, train_ms: float, steps: int) -> tuple[dict, float]:
        """GPTQ's Hessians from training batches: reading training data is training time, so inside the cap, each
        read granted (by all ranks alike) only with room for twice the last one. Returns them and the new time."""
        h, rt = self.h, self.rt
        clock = self.clock
        reads = []  # the times of granted reads
        limit_ms = h.train.max_wallclock_seconds * 1000 if h.train.max_wallclock_seconds else math.inf
        clock.start()

        def may_read() -> bool:  # the first batch's estimate: a training micro-step (fwd+bwd)
            t_now = rt.clock()
            batch_ms = (t_now - reads[-1]) * 1000 if reads else train_ms / max(steps * rt.grad_accum, 1)
            granted = rt.agreed(train_ms + (t_now - clock.t0) * 1000 + 2 * batch_ms <= limit_ms)
            if granted:
                reads.append(t_now)
            return granted

        hessians = collect_hessians(self.model, self.loader, h, rt, may_read)
        train_ms = clock.pause(steps)
        self.log(
            f"gptq:calibrated {len(hessians)} matrices on {len(reads)}/{h.export.gptq_calib_batches} batches/rank, "
            f"last training-data read at train_time:{train_ms:.0f}ms"
        )
        if len(reads) < h.export.gptq_calib_batches:
            self.log(
                f"gptq:calibration stopped at the {h.train.max_wallclock_seconds:.0f}s training cap"
                + ("; no batch fit, exporting with GPTQ-lite rounding" if not reads else "")
            )
        return hessians, train_ms


def log_peak_memory(rt: Runtime, log: Log) -> None:
    if rt.device.type == "cuda":
        log(
            f"peak memory allocated: {torch.cuda.max_memory_allocated() // 2**20} MiB reserved: "
            f"{torch.cuda.max_memory_reserved() // 2**20} MiB"
        )
    else:
        log(f"peak memory rss: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024} MiB")


@dataclasses.dataclass
class TrainStats:
    """Training's facts, the run summary's "train" (tools/submission.py reads it): steps taken, training time
    (ms, every training-data read included), the final weights (e.g. "ema(0.9965)"), graphs compiled after the
    warm-up (inside the timer), whether the wallclock cap stopped it, and the float weights' val score."""

    steps: int
    train_ms: float
    weights: str
    compiled_after_warmup: int
    stopped_early: bool
    pre_quant: dict


@dataclasses.dataclass
class Trained:
    """train_model's result: its facts, and what the export reads beside the weights: GPTQ's Hessians
    (QUANT_METHOD=full, else None) and the last training micro-batch [x, y], the calibration loss's tokens."""

    stats: TrainStats
    hessians: dict | None
    calib: list


def train_model(
    model: GPT, h: Hyperparameters, rt: Runtime, loader: TrainLoader, val_tokens: Tensor, luts, log: Log
) -> Trained:
    """Warm-up, the timed loop, the final weights (EMA/SWA), GPTQ calibration, the diagnostic score."""
    trainer = Trainer(model, h, rt, loader, (val_tokens, luts), log)
    trainer.warm_up()
    averager = WeightAverager(model, h)
    graphs = compiled_graphs(rt)
    steps, stopped, train_ms = trainer.loop(averager)
    graphs = compiled_graphs(rt) - graphs
    if rt.compile:
        log(f"train_compiles: {graphs} graphs compiled after warm-up")
    log_peak_memory(rt, log)
    model.set_qat(None)
    weights = averager.apply_final(log)
    hessians = None
    if h.export.quant_method == "full":
        hessians, train_ms = trainer.calibrate(train_ms, steps)
    t = now()
    loss, bpb = trainer.val_score()
    log(
        f"DIAGNOSTIC post_{weights.split('(')[0]} val_loss:{loss:.4f} val_bpb:{bpb:.4f} eval_time:{(now() - t) * 1000:.0f}ms"
    )
    stats = TrainStats(steps, train_ms, weights, graphs, stopped, dict(val_loss=loss, val_bpb=bpb))
    return Trained(stats, hessians, trainer.last_batch)


# =====================================================================================================
# EVALUATION
# One window plan and one scorer serve every evaluator. The plan cuts the targets into blocks of EVAL_STRIDE, each
# scored by a window of EVAL_SEQ_LEN ending at the block's end (the first window scores its whole span): every
# target scored exactly once with up to a window of left context; blocks never straddle a TTT chunk. Legal TTT
# scores each chunk (or LoRA TTT each document's chunk) with the weights fixed, then trains on exactly those
# targets, never on a last chunk. Budget guards measure TTT's own speed and cut its work to fit the time.
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
    return max(1, h.train.val_batch_size // (world_size * seq_len))


def rank_share(windows: np.ndarray, rt: Runtime) -> np.ndarray:
    n = len(windows)
    return windows[rt.rank * n // rt.world_size : (rt.rank + 1) * n // rt.world_size]


def score_batch(n_windows: int, batch: int) -> int:
    """The batch shape score_windows runs n_windows at: `batch`, or the power of two that holds them
    all when fewer (no padding far past the work). The eval warm-up compiles exactly these shapes."""
    return min(batch, 1 << max(n_windows - 1, 0).bit_length())


@dataclasses.dataclass
class EvalContext:
    """What every evaluator reads besides the model and the tokens: the config (None where only scoring runs), the
    runtime, the metric's byte tables, the log, and an observer(kind, target positions, NLLs) that sees every
    scoring and training event (the legality tests and the budget tests' fake clock read it)."""

    h: Hyperparameters | None
    rt: Runtime
    luts: tuple
    log: Log = dataclasses.field(default_factory=lambda: Log(None))
    observer: Callable | None = None


def score_windows(
    ctx: EvalContext, score_fn, tokens: Tensor, windows: np.ndarray, seq_len: int, batch: int
) -> Tensor:
    """(NLL sum, byte sum, target count) in float64 over the windows' scored targets, this rank only,
    under inference_mode. Batches are padded to a few shapes (padding rows score nothing), so compiled
    graphs are reused; the observer sees exactly what was scored."""
    rt = ctx.rt
    totals = torch.zeros(3, dtype=torch.float64, device=rt.device)
    batch = score_batch(len(windows), batch)
    offsets = torch.arange(seq_len, device=rt.device)
    with torch.inference_mode():
        for i in range(0, len(windows), batch):
            w = torch.as_tensor(windows[i : i + batch], device=rt.device)
            w = F.pad(w, (0, 0, 0, batch - len(w)))  # padding rows (0, 0, 0) score nothing
            idx = w[:, :1] + offsets
            mask = (idx >= w[:, 1:2]) & (idx < w[:, 2:3])
            x, y = tokens[idx].long(), tokens[idx + 1].long()
            with rt.autocast():
                nll = score_fn(x, y).float()
            totals += scored_totals(nll, mask, x, y, idx, ctx.luts)
            if ctx.observer is not None:
                ctx.observer("score", idx[mask], nll[mask])
    return totals


def evaluate(score_fn, tokens: Tensor, seq_len: int, stride: int, batch: int, luts, rt: Runtime) -> Tensor:
    """One scoring pass over all targets, windows of seq_len every stride, shared out over the ranks: the totals."""
    windows = plan_windows(tokens.numel() - 1, seq_len, stride)
    ctx = EvalContext(None, rt, luts)
    return rt.all_reduce(score_windows(ctx, score_fn, tokens, rank_share(windows, rt), seq_len, batch))


def ttt_params(model: GPT, freeze: int) -> tuple[list[Tensor], int]:
    """Trainable params after freezing the first `freeze` logical layers (their physical blocks, which
    recurrence may share with later layers, and their controls)."""
    frozen = set()
    for i in range(freeze):
        frozen |= {id(p) for p in model.blocks[model.slots[i][0]].parameters()}
        frozen |= {id(p) for p in model.controls[model.control_of[i]].parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) not in frozen)
    return [p for p in model.parameters() if p.requires_grad], sum(
        p.numel() for p in model.parameters() if id(p) in frozen
    )


def ttt_plan(n_targets: int, h: Hyperparameters) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """TTT's window plan, each chunk's slice of it (windows[bounds[c]:bounds[c + 1]]), and a chunk's training
    rows: input positions from the chunk's start, in sequences of the eval length (or the chunk, if shorter)."""
    C, seq = h.ttt.ttt_chunk_tokens, min(h.eval_len, h.ttt.ttt_chunk_tokens)
    windows = plan_windows(n_targets, h.eval_len, h.eval.eval_stride, C)
    bounds = np.searchsorted(windows[:, 1] // C, np.arange(-(-n_targets // C) + 1))
    return windows, bounds, np.arange(0, C, seq)[:, None] + np.arange(seq)


def ttt_backward(train_fn, tokens: Tensor, idx: Tensor, weight: float, rt: Runtime) -> None:
    """One TTT micro-step's forward and backward: row r reads inputs tokens[idx[r]], targets tokens[idx[r] + 1]."""
    with rt.autocast():
        loss = train_fn(tokens[idx].long(), tokens[idx + 1].long())
    (loss * weight).backward()


def ttt_optimizer(params: list[Tensor], h: Hyperparameters) -> torch.optim.Optimizer:
    if h.ttt.ttt_optimizer == "sgd":
        return torch.optim.SGD(params, lr=h.ttt.ttt_lr, momentum=h.ttt.ttt_momentum)
    return torch.optim.AdamW(
        params, lr=h.ttt.ttt_lr, betas=(h.optim.beta1, h.ttt_adam_beta2), weight_decay=0.0
    )


def train_rows(
    ctx: EvalContext, train_fn, tokens: Tensor, rows: np.ndarray, params: list[Tensor], opt
) -> None:
    """One pass of full-weight TTT steps over `rows` (each a sequence of input positions), TTT_BATCH_SEQS
    rows per step shared out over the ranks, the loss a mean over the step's rows."""
    h = ctx.h
    rt = ctx.rt
    for b in range(0, len(rows), h.ttt.ttt_batch_seqs):
        group = rows[b : b + h.ttt.ttt_batch_seqs]
        mine = torch.as_tensor(group[rt.rank :: rt.world_size], device=rt.device)
        if len(mine):
            ttt_backward(train_fn, tokens, mine, len(mine) / len(group), rt)
            if ctx.observer is not None:
                ctx.observer("train", mine, None)
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        all_reduce_grads(params, rt, 1.0)
        if h.ttt.ttt_grad_clip:
            torch.nn.utils.clip_grad_norm_(params, h.ttt.ttt_grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)


class TTTBudgetGuard:
    """Chooses each chunk's TTT epochs so that the pass ends inside the eval budget, at pessimistic rates: what
    remains to score costs the slowest of the last WINDOW chunks' scoring plus SLACK, and an epoch that scoring
    time times the highest recent epoch-to-scoring ratio, so a machine that slows down (seen in every chunk's
    scoring) raises the epoch estimate at once. Chunk 1 never counts (a compile, a cold cache). The chunk-epochs
    that fit are spread over the chunks still to train. When none fit for PROBE_EVERY chunks, one epoch is
    probed if twice its cost at the fastest ratio measured fits: a stale ratio comes down instead of starving
    TTT, and a probe that runs slow still leaves the rest room. Every input is the slowest rank's (eval_ttt),
    so every rank trains the same epochs."""

    MARGIN = 0.05
    SLACK = 0.25
    WINDOW = 5
    PROBE_EVERY = 8

    def __init__(self, max_epochs: int, n_chunks: int, budget_s: float):
        self.max_epochs = max_epochs
        self.n_chunks = n_chunks
        self.budget_s = budget_s
        self.score_s, self.ratios = [], []  # (chunk, seconds) and (chunk, epoch s / scoring s) samples
        self.first_epoch_s = None  # chunk 1's time per epoch: the only estimate until a later chunk trains
        self.trained = 0
        self.probes = 0
        self.last_sample = 0
        self.planned = max_epochs * max(n_chunks - 1, 0)

    def epochs_for(self, chunk: int, elapsed_s: float, score_s: float, last_epoch_s: float | None) -> int:
        """Epochs to train on `chunk`, just scored in score_s seconds, at elapsed_s seconds into the pass;
        last_epoch_s is the previous chunk's time per epoch (None if it was not trained)."""
        self.score_s.append((chunk, score_s))
        if last_epoch_s is not None:
            self.take_epoch_sample(chunk - 1, last_epoch_s)
        rest = self.n_chunks - 1 - chunk  # chunks still to score, and to train with this one
        if rest == 0 or not self.max_epochs:
            return 0
        epochs = self.max_epochs  # chunk 1: nothing measured but its own scoring
        if chunk > 0:
            score = max(s for c, s in self.score_s[-self.WINDOW :] if c > 0) * (1 + self.SLACK)
            epochs = self.fit(
                chunk, self.budget_s * (1 - self.MARGIN) - elapsed_s - rest * score, rest, score
            )
        self.trained += epochs
        return epochs

    def take_epoch_sample(self, chunk: int, epoch_s: float) -> None:
        self.last_sample = chunk
        if chunk == 0:
            self.first_epoch_s = epoch_s
        else:
            score_s = next(s for c, s in reversed(self.score_s) if c == chunk)
            self.ratios.append((chunk, epoch_s / max(score_s, 1e-9)))

    def fit(self, chunk: int, left_s: float, rest: int, score_s: float) -> int:
        """Epochs for this chunk out of left_s seconds, with `rest` chunks to train; score_s: the pessimistic
        scoring time of a chunk."""
        newest = self.ratios[-1][0] if self.ratios else 0
        recent = [
            r for c, r in self.ratios if c > newest - self.WINDOW
        ]  # the last WINDOW chunks that trained
        if not recent and self.first_epoch_s is None or left_s <= 0:
            return 0
        epoch_s = max(recent) * score_s if recent else self.first_epoch_s * (1 + self.SLACK)
        epochs = min(self.max_epochs, -(-int(left_s // epoch_s) // rest))
        fastest_s = min(r for _, r in self.ratios) * score_s if self.ratios else epoch_s
        if not epochs and chunk - self.last_sample > self.PROBE_EVERY and 2 * fastest_s <= left_s:
            epochs, self.probes = 1, self.probes + 1
        return epochs


def eval_ttt(ctx: EvalContext, model: GPT, tokens: Tensor, budget_s: float) -> tuple[Tensor, dict]:
    h = ctx.h
    rt = ctx.rt
    log = ctx.log
    C = h.ttt.ttt_chunk_tokens
    n = tokens.numel() - 1
    L = h.eval_len
    windows, bounds, chunk_rows = ttt_plan(n, h)
    n_chunks = len(bounds) - 1
    params, n_frozen = ttt_params(model, h.ttt.ttt_freeze_blocks)
    opt = ttt_optimizer(params, h)
    score_fn, train_fn = compile_model(model.token_nll, rt), compile_model(model, rt)
    batch = eval_batch(h, rt.world_size, L)
    log(
        f"ttt_sliding:start chunks={n_chunks} chunk_tokens={C} total_windows={len(windows)} stride={h.eval.eval_stride} "
        f"ttt_lr={h.ttt.ttt_lr} ttt_epochs={h.ttt.ttt_epochs} freeze_blocks={h.ttt.ttt_freeze_blocks} optimizer={h.ttt.ttt_optimizer}"
    )
    log(f"ttt_sliding:params unfrozen={sum(p.numel() for p in params)} frozen={n_frozen}")
    totals = torch.zeros(3, dtype=torch.float64, device=rt.device)
    guard = TTTBudgetGuard(h.ttt.ttt_epochs, n_chunks, budget_s)
    epochs = h.ttt.ttt_epochs
    changes = []
    epoch_s = -1.0
    t_start = rt.time()
    model.eval()
    for c in range(n_chunks):
        t0 = rt.time()
        chunk = rt.all_reduce(
            score_windows(ctx, score_fn, tokens, rank_share(windows[bounds[c] : bounds[c + 1]], rt), L, batch)
        )
        totals += chunk
        if int(chunk[2].item()) != min((c + 1) * C, n) - c * C:  # rules, not asserts: they survive python -O
            raise RuntimeError(f"TTT chunk {c}: {int(chunk[2].item())} targets scored, not the whole chunk")
        scored_upto = min((c + 1) * C, n)
        t1 = rt.time()
        # the slowest rank's timings, so that every rank takes the same decision
        score_s, epoch_s, elapsed = rt.reduce([t1 - t0, epoch_s, t1 - t_start], dist.ReduceOp.MAX)
        chosen = guard.epochs_for(c, elapsed, score_s, epoch_s if epoch_s >= 0 else None)
        if chosen != epochs and c < n_chunks - 1:
            changes.append((c + 1, epochs, chosen))
            if len(changes) <= 20:
                log(
                    f"ttt_budget: chunk {c + 1}/{n_chunks} epochs {epochs}->{chosen} at {elapsed:.1f}s of {budget_s:.1f}s"
                )
            epochs = chosen
        epoch_s = -1.0
        if chosen:
            for g in opt.param_groups:
                g["lr"] = h.ttt.ttt_lr * 0.5 * (1 + math.cos(math.pi * c / (n_chunks - 1)))
            rows = c * C + chunk_rows
            if rows[-1, -1] + 1 > scored_upto:
                raise RuntimeError(
                    f"TTT chunk {c} would train on targets up to {rows[-1, -1] + 1}, scored: {scored_upto}"
                )
            model.train()
            for _ in range(chosen):
                train_rows(ctx, train_fn, tokens, rows, params, opt)
            model.eval()
            epoch_s = (rt.clock() - t1) / chosen
        if (c + 1) % 10 == 0 or c == 0 or c == n_chunks - 1:
            log(
                f"  ttt_chunk [{c + 1}/{n_chunks}] bpb={loss_and_bpb(totals)[1]:.6f} time={rt.time() - t_start:.1f}s"
            )
    model.requires_grad_(True)
    log(
        f"ttt_budget: trained {guard.trained}/{guard.planned} chunk-epochs ({len(changes)} changes, "
        f"{guard.probes} probes; budget {budget_s:.1f}s)"
    )
    return totals, dict(
        chunks=n_chunks,
        epoch_changes=changes,
        trained=guard.trained,
        planned=guard.planned,
        probes=guard.probes,
        legal=True,
    )  # legality is checked per chunk, above


def documents(tokens: Tensor, n_targets: int) -> np.ndarray:
    """Rows (first input position, length) of the documents, longest first (ties in stream order). A
    document runs from a BOS (or position 0) to the next; target j belongs to the document of input j,
    so the documents partition the targets [0, n_targets) (a document's last target is the next BOS)."""
    starts = np.union1d([0], np.flatnonzero(tokens[:n_targets].cpu().numpy() == BOS_ID))
    lengths = np.diff(np.r_[starts, n_targets])
    order = np.argsort(-lengths, kind="stable")
    return np.stack((starts[order], lengths[order]), axis=1)


def lora_widths(h: Hyperparameters) -> list[int]:
    """The row widths LoRA TTT runs at: powers of two from the chunk's up, capped at the eval length. A
    step's rows are as wide as the first of these that holds its longest window: a few fixed shapes, all
    compiled before the eval timer, whatever the documents."""
    w = 1 << (h.ttt.ttt_lora_chunk - 1).bit_length()
    return sorted({min(w << i, h.eval_len) for i in range(max(h.eval_len // w, 1).bit_length() + 1)})


class LoRAAdapters:
    """LoRA TTT's adapters A (rows, in, rank) and B (rows, rank, out) on every block matrix and the tied output head,
    row r for document r of a batch. Not model parameters (the artifact's weights stay as they are); reset in place
    per batch, A seeded-random (warm_a: at the first batch only, then kept), B zero: a fresh adapter adds exactly zero
    and compiled graphs see the same tensors. A kept has learned only from documents scored before: legal.
    Held in groups of `per_pass` rows, each group its own tensors: a pass attaches one group (the same shapes, so the
    same compiled graph), and only that group's activations are saved for its backward."""

    def __init__(self, model: GPT, rows: int, rank: int, seed: int, warm_a: bool = False, per_pass: int = 0):
        self.model = model
        self.seed = seed
        self.warm_a = warm_a
        self.drawn = False
        self.per_pass = per_pass or rows
        self.linears = [m for m in model.blocks.modules() if isinstance(m, CastedLinear)]
        dev = model.tok_emb.weight.device
        self.shapes = [(m.in_features, m.out_features) for m in self.linears] + [
            model.tok_emb.weight.shape[::-1]
        ]
        self.groups = [
            [
                (
                    torch.zeros(self.per_pass, i, rank, device=dev, requires_grad=True),
                    torch.zeros(self.per_pass, rank, o, device=dev, requires_grad=True),
                )
                for i, o in self.shapes
            ]
            for _ in range(rows // self.per_pass)
        ]
        self.params = [t for group in self.groups for pair in group for t in pair]
        self.gen = torch.Generator(dev)

    @classmethod
    def for_run(cls, model: GPT, h: Hyperparameters) -> LoRAAdapters:
        """The adapters a run's LoRA TTT uses: TTT_DOCS_PER_BATCH rows in groups of the rows per pass."""
        t = h.ttt
        return cls(model, t.ttt_docs_per_batch, t.ttt_lora_rank, h.run.seed, t.ttt_lora_warm_a, t.lora_rows)

    def attach(self, on: bool, group: int = 0) -> None:
        pairs = self.groups[group]
        for m, pair in zip(self.linears, pairs):
            m.lora = pair if on else None
        self.model.head_lora = pairs[-1] if on else None

    @torch.no_grad()
    def reset(self, batch: int) -> None:
        self.gen.manual_seed(self.seed + batch)
        for j, (i, _) in enumerate(self.shapes):
            if not (self.warm_a and self.drawn):
                # drawn for all rows at once: the same adapters whatever the rows per pass
                a = torch.empty(len(self.groups) * self.per_pass, i, self.groups[0][j][0].size(2))
                a = a.to(self.gen.device).uniform_(-1, 1, generator=self.gen).mul_(i**-0.5)
                for group, rows in zip(self.groups, a.split(self.per_pass)):
                    group[j][0].copy_(rows)
            for group in self.groups:
                group[j][1].zero_()
        self.drawn = True


class LoRABudget:
    """LoRA TTT's eval-time guard. Adapted scoring costs the measured seconds per document token (pessimistic: the
    slowest of the last few batches, plus a slack). Before a batch: if this rank's remaining documents at that rate would end past the budget, the batch is
    scored unadapted (one forward per window, not one step per chunk). Before a global-SGD phase: if the phase (at the
    last phase's rate, else the LoRA rate) on top of the slowest rank's rest would overrun, it is skipped."""

    MARGIN = 0.05
    SLACK = 0.25
    WINDOW = 5

    def __init__(self, budget_s: float):
        self.budget_s = budget_s
        self.rates = []
        self.sgd_rate = None

    def rate(self) -> float:
        """Seconds per adapted document token, pessimistic: the slowest of the last WINDOW batches, plus SLACK."""
        return max(self.rates[-self.WINDOW :]) * (1 + self.SLACK) if self.rates else 0.0

    def fits(self, projected_s: float, sgd_tokens: int = 0) -> bool:
        sgd_s = sgd_tokens * (self.rate() if self.sgd_rate is None else self.sgd_rate)
        return projected_s + sgd_s <= self.budget_s * (1 - self.MARGIN)


def lora_batch(
    ctx: EvalContext, score_fn, adapters: LoRAAdapters, opt, tokens: Tensor, batch: np.ndarray, index: int
) -> Tensor:
    """Score one batch of documents (a row each), TTT_LORA_CHUNK tokens per document per step, each chunk
    under the adapters as they are, the window its document's last EVAL_SEQ_LEN tokens up to the chunk's
    end; then (with an optimizer) one Adam step on the chunks just scored, except a document's last. Unadapted
    (opt None), a step scores a whole window. The scores come from the forward the step differentiates, fixed
    before its backward. Returns (NLL sum, byte sum, target count) and the targets scored per document."""
    h = ctx.h
    rt = ctx.rt
    adapt = opt is not None
    R = h.ttt.ttt_docs_per_batch
    L = h.eval_len
    K = h.ttt.ttt_lora_chunk if adapt else h.eval_len
    start, length = np.pad(
        batch, ((0, R - len(batch)), (0, 0))
    ).T  # one row per document; padding rows: length 0
    adapters.reset(index)
    if adapt:
        opt.state.clear()  # Adam starts afresh with each document
    totals = torch.zeros(3, dtype=torch.float64, device=rt.device)
    done = np.zeros(R, np.int64)  # targets scored per document
    for lo in range(0, int(length.max()), K):
        live, end = length > lo, np.minimum(lo + K, length)
        first = np.maximum(end - L, 0)  # window start, in document positions
        cols = np.arange(min(w for w in lora_widths(h) if w >= (end - first)[live].max()))
        at = first[:, None] + cols  # document position of each column
        valid = live[:, None] & (cols < (end - first)[:, None])
        score = valid & (at >= lo)
        learn = score & ((end < length) & adapt)[:, None]
        pos = torch.as_tensor(start[:, None] + np.where(valid, at, 0), device=rt.device)
        valid_t, score_t, learn_t = (torch.as_tensor(m, device=rt.device) for m in (valid, score, learn))
        x = torch.where(valid_t, tokens[pos], 0).long()
        y = torch.where(valid_t, tokens[pos + 1], 0).long()
        done += score.sum(1)
        if learn.any():  # rules, not asserts: only targets scored, never a document's last chunk
            if (learn & (at >= done[:, None])).any() or (learn.any(1) & (done >= length)).any():
                raise RuntimeError(
                    f"LoRA TTT batch {index}: a step would learn from unscored targets or a last chunk"
                )
        scored = torch.cat(
            [lora_pass(score_fn, adapters, x, y, learn, g, rt) for g in range(len(adapters.groups))]
        )
        totals += scored_totals(scored, score_t, x, y, pos, ctx.luts)
        if ctx.observer is not None:
            ctx.observer("score", pos[score_t], scored[score_t])
        if learn.any():
            for p in adapters.params:  # a group with nothing to learn: zero, as one pass of all rows gives
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if ctx.observer is not None:
                ctx.observer("train", pos[learn_t], None)
    if (done != length).any():
        raise RuntimeError(f"LoRA TTT batch {index}: targets scored per document {done}, lengths {length}")
    return totals, done


def lora_pass(
    score_fn, adapters: LoRAAdapters, x: Tensor, y: Tensor, learn: np.ndarray, group: int, rt: Runtime
):
    """One group of rows through the model under its adapters: their NLLs, fixed before the backward, and (where
    learn marks targets) the backward of the mean NLL per document, which touches only this group's adapters.
    A group with nothing to learn (an unadapted batch, or every row on its last chunk) scores under inference
    mode: no activations saved, as the sliding pass (warm_up_eval compiles both modes of every width)."""
    rows = slice(group * adapters.per_pass, (group + 1) * adapters.per_pass)
    adapters.attach(True, group)
    learning = bool(learn[rows].any())
    with lora_grad_mode(learning), rt.autocast():
        nll = score_fn(x[rows].clone(), y[rows].clone()).float()
    if learning:
        mask = torch.as_tensor(learn[rows], device=rt.device)
        ((nll * mask).sum(1) / mask.sum(1).clamp(min=1)).sum().backward()
    return nll.detach()


def lora_grad_mode(learning: bool):
    """The autograd mode of a LoRA TTT forward: grad for a pass that learns, inference mode for one that only scores."""
    if learning:
        return torch.enable_grad()
    return torch.inference_mode()


def phase_rows(docs: np.ndarray, h: Hyperparameters) -> np.ndarray:
    """A global-SGD phase's training rows: the documents' input positions end to end, EVAL_SEQ_LEN per
    row, wrapped round to whole steps of TTT_BATCH_SEQS rows (fixed shapes; the wrap repeats scored tokens)."""
    src = np.concatenate([np.arange(s, s + n) for s, n in docs])
    step = h.ttt.ttt_batch_seqs * h.eval_len
    return np.resize(src, -(-len(src) // step) * step).reshape(-1, h.eval_len)


def lora_optimizer(params: list[Tensor], h: Hyperparameters) -> torch.optim.AdamW:
    """Adam (beta1 0) on the adapters [A, B, A, B, ...]. x A B scaled by s = alpha/rank (B from 0) is exactly B's LR
    times s, its decay over s: Adam's step ignores a gradient's scale, so A steps alike, B's move x A B s times as far."""
    lr = h.ttt.ttt_lora_lr
    wd = h.ttt.ttt_lora_wd
    s = h.ttt.lora_alpha / h.ttt.ttt_lora_rank
    return torch.optim.AdamW(
        [dict(params=params[0::2]), dict(params=params[1::2], lr=lr * s, weight_decay=wd / s)],
        lr=lr,
        betas=(0.0, h.ttt_adam_beta2),
        weight_decay=wd,
    )


def phase_batches(h: Hyperparameters, n_docs: int, n_batches: int) -> list[int]:
    """Phased: the batches before which a global-SGD phase runs, each where the scored documents reach
    TTT_PHASE_DOCS*k/TTT_PHASES (k = 1..TTT_PHASES); none for plain LoRA TTT or past the last batch."""
    if h.ttt.ttt_mode != "phased":
        return []
    R = h.ttt.ttt_docs_per_batch
    at = {
        -(-min(h.ttt.ttt_phase_docs, n_docs) * k // h.ttt.ttt_phases // R)
        for k in range(1, h.ttt.ttt_phases + 1)
    }
    return sorted(b for b in at if b < n_batches)


def global_sgd_phase(
    ctx: EvalContext, model: GPT, adapters: LoRAAdapters, train_fn, tokens: Tensor, rows
) -> float:
    """One epoch of full-weight TTT steps on the rows (documents already scored), adapters off; returns its
    seconds per row token (the guard's rate for the next phase)."""
    t0 = ctx.rt.time()
    adapters.attach(False)
    params, _ = ttt_params(model, ctx.h.ttt.ttt_freeze_blocks)
    model.train()
    train_rows(ctx, train_fn, tokens, rows, params, ttt_optimizer(params, ctx.h))
    model.eval().requires_grad_(False)
    adapters.attach(True)
    return (ctx.rt.clock() - t0) / rows.size


def eval_ttt_lora(
    ctx: EvalContext, model: GPT, adapters: LoRAAdapters, tokens: Tensor, budget_s: float
) -> tuple[Tensor, dict]:
    """Document-independent LoRA TTT, longest documents first, batches shared out round-robin over the
    ranks. Phased: before the batch that brings the scored count to TTT_PHASE_DOCS*k/TTT_PHASES, every
    rank stops and the base weights take one epoch of full-weight TTT steps on all documents scored."""
    h = ctx.h
    rt = ctx.rt
    log = ctx.log
    n, R = tokens.numel() - 1, h.ttt.ttt_docs_per_batch
    docs = documents(tokens, n)
    batches = [docs[i : i + R] for i in range(0, len(docs), R)]
    phase_at = phase_batches(h, len(docs), len(batches))
    mine = [b for b in range(len(batches)) if b % rt.world_size == rt.rank]
    rest = np.cumsum([batches[b][:, 1].sum() * (b in mine) for b in range(len(batches))][::-1])[
        ::-1
    ]  # my tokens from b
    opt = lora_optimizer(adapters.params, h)
    score_fn, train_fn = compile_model(model.token_nll, rt), compile_model(model, rt)
    log(
        f"ttt_lora:start docs={len(docs)} batches={len(batches)} docs_per_batch={R} chunk={h.ttt.ttt_lora_chunk} "
        f"rank={h.ttt.ttt_lora_rank} lr={h.ttt.ttt_lora_lr} phases_before_batches={phase_at}"
    )
    totals = torch.zeros(3, dtype=torch.float64, device=rt.device)
    scored_docs = torch.zeros(len(docs), dtype=torch.float64, device=rt.device)  # targets scored, this rank
    guard = LoRABudget(budget_s)
    adapted = 0
    phases = 0
    t_start = rt.time()
    adapters.attach(True)
    for b, batch in enumerate(batches):
        if b in phase_at:
            projected = rt.reduce([rt.time() - t_start + rest[b] * guard.rate()], dist.ReduceOp.MAX)[0]
            done = rt.all_reduce(scored_docs.clone())[: b * R]
            if not torch.equal(done.cpu(), torch.as_tensor(docs[: b * R, 1], dtype=torch.float64)):
                raise RuntimeError(f"TTT phase before batch {b}: a document to train on is not fully scored")
            rows = phase_rows(docs[: b * R], h)
            run_phase = rt.agreed(
                guard.fits(projected, rows.size)
            )  # its steps all-reduce: every rank or none
            if run_phase:
                guard.sgd_rate = global_sgd_phase(ctx, model, adapters, train_fn, tokens, rows)
                phases += 1
            log(
                f"ttt_phase: before batch {b}/{len(batches)} docs={b * R} rows={len(rows)} "
                f"{'trained' if run_phase else 'skipped (budget)'} at {rt.time() - t_start:.1f}s"
            )
        if b % rt.world_size != rt.rank:
            continue
        t0 = rt.time()
        adapt = guard.fits(t0 - t_start + rest[b] * guard.rate())
        part, done = lora_batch(ctx, score_fn, adapters, opt if adapt else None, tokens, batch, b)
        totals += part
        scored_docs[b * R : b * R + len(batch)] = torch.as_tensor(done[: len(batch)], dtype=torch.float64)
        if adapt:
            guard.rates.append((rt.clock() - t0) / batch[:, 1].sum())
            adapted += 1
        if b == mine[0] or b == mine[-1] or len(mine) > 10 and b % (len(batches) // 10) == 0:
            log(
                f"  ttt_lora [{b + 1}/{len(batches)}] rank0_bpb={loss_and_bpb(totals)[1]:.6f} time={rt.time() - t_start:.1f}s"
            )
    adapters.attach(False)
    model.requires_grad_(True)
    adapted = int(rt.reduce([adapted])[0])
    log(
        f"ttt_budget: adapted {adapted}/{len(batches)} batches, global SGD phases {phases}/{len(phase_at)} "
        f"(budget {budget_s:.1f}s)"
    )
    return rt.all_reduce(totals), dict(
        docs=len(docs),
        batches=len(batches),
        adapted=adapted,
        phases=phases,
        planned_phases=len(phase_at),
        legal=True,
    )  # rules checked per step, above


def warm_up_eval(model: GPT, h: Hyperparameters, rt: Runtime, n_targets: int, luts, adapters=None) -> int:
    """Compile, before the eval timer, every graph the timed eval runs: each scoring batch shape of each pass (a last
    partial batch included), each TTT training shape and each LoRA TTT width, called through the same code with the
    same modes (eval/train, inference mode, frozen params, adapters on or off, distinct ids and targets), on random
    tokens. Weights are untouched (no optimizer step); returns the number of shapes."""
    L = h.eval_len  # TTT rows: none
    batch = eval_batch(h, rt.world_size, h.eval_len)
    rows = np.zeros((0, h.eval_len))
    shares = [rank_share(plan_windows(n_targets, L, L), rt)]
    if h.eval.eval_sliding and h.eval.eval_stride < L:
        shares.append(rank_share(plan_windows(n_targets, L, h.eval.eval_stride), rt))
    if h.ttt.ttt_enabled and h.ttt.ttt_mode == "chunk":
        windows, bounds, chunk_rows = ttt_plan(n_targets, h)
        shares += [rank_share(windows[a:b], rt) for a, b in zip(bounds[:-1], bounds[1:])]
        rows = chunk_rows if len(bounds) > 2 else rows  # the last chunk is never trained
    elif h.ttt.ttt_enabled and h.ttt.ttt_mode == "phased":  # phase_rows: whole steps of TTT_BATCH_SEQS rows
        rows = np.zeros((h.ttt.ttt_batch_seqs, L))
    B = h.ttt.ttt_batch_seqs
    seq = rows.shape[1]
    widths = lora_widths(h) if adapters else []
    train_shapes = {len(rows[b : b + B][rt.rank :: rt.world_size]) for b in range(0, len(rows), B)} - {
        0
    }  # as train_rows
    noise = torch.randint(0, h.model.vocab_size, (L + 1,), device=rt.device).to(torch.int32)
    score_fn, score_shapes = (
        compile_model(model.token_nll, rt),
        {score_batch(len(s), batch) for s in shares if len(s)},
    )
    model.eval()
    for b in score_shapes:
        score_windows(EvalContext(h, rt, luts), score_fn, noise, np.array([[0, 0, L]] * b), L, b)
    if widths:
        adapters.attach(True)
        for w in widths:
            x = noise[:w].long().repeat(h.ttt.lora_rows, 1)  # contiguous, as the pass's
            with lora_grad_mode(True), rt.autocast():
                score_fn(x, x.flip(1)).float().sum().backward()
            with lora_grad_mode(False), rt.autocast():
                # inputs made under inference mode, as the pass's: dynamo guards on their dispatch keys
                score_fn(x.clone(), x.flip(1))
        adapters.attach(False)
        for t in adapters.params:
            t.grad = None
    if train_shapes:
        train_fn = compile_model(model, rt)
        ttt_params(model, h.ttt.ttt_freeze_blocks)  # what chunk TTT and the global-SGD phases train
        model.train()
        for b in train_shapes:
            ttt_backward(train_fn, noise, torch.arange(seq, device=rt.device).expand(b, seq), 1.0, rt)
        model.zero_grad(set_to_none=True)
        model.eval()
        if h.ttt.ttt_mode == "phased":
            model.requires_grad_(False)
    # each LoRA width twice: learning and scoring only
    return len(score_shapes) + len(train_shapes) + 2 * len(widths)


def sliding_fits(h: Hyperparameters, rt: Runtime, elapsed_s: float, roundtrip_ms: float) -> bool:
    """The whole eval's budget, before the sliding pass. With TTT on, that pass is a diagnostic: TTT's pass scores
    the same windows and gives the final score, and its guard can cut training, never scoring. So the sliding pass
    runs only if it and TTT's scoring fit in what is left, each estimated pessimistically at the round trip's rate
    times the windows per target (EVAL_SEQ_LEN/EVAL_STRIDE) plus the guard's slack; all ranks agree (it gates
    collectives). A loaded machine then keeps its time for the score that counts."""
    if not h.ttt.ttt_enabled:
        return True
    pass_s = roundtrip_ms / 1000 * h.eval_len / h.eval.eval_stride * (1 + TTTBudgetGuard.SLACK)
    return rt.agreed(elapsed_s + 2 * pass_s <= h.eval.eval_budget_seconds * (1 - TTTBudgetGuard.MARGIN))


def run_evaluations(model: GPT, h: Hyperparameters, rt: Runtime, val_tokens: Tensor, luts, log: Log) -> dict:
    """The timed evaluation of the dequantized artifact: compile warm-up on random tokens (never val tokens) runs
    before the timer, as the contest counts it; scoring and TTT run inside (graphs compiled there are logged: 0)."""
    L = h.eval_len
    bits = h.export.quant_bits
    n_targets = val_tokens.numel() - 1
    adapters = None
    batch = eval_batch(h, rt.world_size, L)
    if (
        h.ttt.ttt_enabled and h.ttt.ttt_mode == "chunk"
    ):  # the whole eval runs with TTT's frozen set: no graph sees
        ttt_params(model, h.ttt.ttt_freeze_blocks)  # a requires_grad change
    elif h.ttt.ttt_enabled:  # LoRA TTT: the model's weights are fixed (but in global-SGD phases)
        model.requires_grad_(False)
        adapters = LoRAAdapters.for_run(model, h)
    score_fn = compile_model(model.token_nll, rt)
    if rt.compile:
        t = rt.time()
        shapes = warm_up_eval(model, h, rt, n_targets, luts, adapters)
        log(f"eval_warmup: {shapes} graph shapes compiled in {rt.time() - t:.1f}s (before the eval timer)")
    model.eval()
    graphs_before = compiled_graphs(rt)
    results = {}
    times = {}
    t_eval = rt.start_together()  # after every rank's warm-up

    def record(key: str, name: str, totals: Tensor, t0: float, extra: str = "") -> None:
        times[key] = (rt.clock() - t0) * 1000
        loss, bpb = loss_and_bpb(totals)
        results[key] = dict(val_loss=loss, val_bpb=bpb, scored=int(totals[2].item()), name=name)
        log(f"{name} val_loss:{loss:.4f} val_bpb:{bpb:.4f}{extra} eval_time:{times[key]:.0f}ms")
        log(f"{name}_exact val_loss:{loss:.8f} val_bpb:{bpb:.8f}")

    t0 = rt.time()
    record(
        "roundtrip", f"final_int{bits}_roundtrip", evaluate(score_fn, val_tokens, L, L, batch, luts, rt), t0
    )
    if (
        h.eval.eval_sliding
        and h.eval.eval_stride < L
        and not sliding_fits(h, rt, rt.time() - t_eval, times["roundtrip"])
    ):
        log(
            f"sliding_window: skipped (budget) after {rt.time() - t_eval:.1f}s: TTT's pass scores its windows"
        )
    elif h.eval.eval_sliding and h.eval.eval_stride < L:
        t0 = rt.time()
        record(
            "sliding",
            f"final_int{bits}_sliding_window",
            evaluate(score_fn, val_tokens, L, h.eval.eval_stride, batch, luts, rt),
            t0,
            f" stride:{h.eval.eval_stride}",
        )
    ttt_info = None
    if h.ttt.ttt_enabled:
        t0 = rt.time()
        # TTT's budget sizes its collectives (epochs per chunk, global-SGD phases): the same on every rank
        left = rt.reduce([h.eval.eval_budget_seconds - (t0 - t_eval)], dist.ReduceOp.MIN)[0]
        totals, ttt_info = (
            eval_ttt(EvalContext(h, rt, luts, log), model, val_tokens, left)
            if adapters is None
            else eval_ttt_lora(EvalContext(h, rt, luts, log), model, adapters, val_tokens, left)
        )
        loss, bpb = loss_and_bpb(totals)
        log(f"ttt_sliding:done val_loss={loss:.6f} val_bpb={bpb:.6f} elapsed={rt.time() - t0:.1f}s")
        record("ttt", "legal_ttt", totals, t0)
    times["total"] = (rt.clock() - t_eval) * 1000
    compiled_inside = compiled_graphs(rt) - graphs_before
    if rt.compile:
        log(f"eval_compiles: {compiled_inside} graphs compiled inside the timed eval")
    final_key = next(k for k in ("ttt", "sliding", "roundtrip") if k in results)  # the last pass run
    log("eval_time: " + " ".join(f"{k}:{v:.0f}ms" for k, v in times.items()))
    return dict(
        results=results,
        times_ms=times,
        final=final_key,
        ttt=ttt_info,
        n_targets=n_targets,
        compiled_inside=compiled_inside,
    )


# =====================================================================================================
# ARTIFACT AND BUDGET REPORT
# The counted size is the compressed model plus the bytes of the file that runs (this source, or its packed form).
# Rate control (AUTO_FIT, fit_to_budget) fits the budget and spends what is left under it, each step logged with its
# calibration-loss cost; AUTO_FIT=0 gives a loud FAIL when over. The float weights are saved first
# (FINAL_MODEL_PATH), so EXPORT_FROM can redo all of this without training. Every rank reads the artifact.
# =====================================================================================================

RULE_BYTES = 16_000_000
RULE_TRAIN_S = 600.0
RULE_EVAL_S = 600.0


def file_sha256(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def stored_model_config(stored: dict, where: str) -> tuple[dict, list[str]]:
    """The whole model config from an artifact's or checkpoint's stored one: every model field, those that an
    older file lacks at their defaults (listed, so the caller can say so); a field this code does not know
    is an error (a newer file)."""
    fields = {f.name: f for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(stored) - set(fields))
    need(
        not unknown,
        f"{where} stores model fields this train_gpt.py does not know: {unknown} (a newer version)",
    )
    missing = sorted(set(fields) - set(stored))
    config = {k: tuple(v) if isinstance(v, list) else v for k, v in stored.items()}
    return {**{k: fields[k].default for k in missing}, **config}, missing


def artifact_hparams(h: Hyperparameters, stored: dict, where: str, log: Log) -> Hyperparameters:
    """The run's settings with the network the artifact was scored with: its stored model config, whole."""
    config, missing = stored_model_config(stored, where)
    if missing:
        log(f"artifact_config: {where} predates {', '.join(k.upper() for k in missing)}: their defaults")
    return dataclasses.replace(h, model=ModelConfig(**config))


def model_from_qstate(qstate: dict[str, QTensor], h: Hyperparameters, rt: Runtime, stage: int) -> GPT:
    """A fresh model with the artifact's weights, running the depth schedule training ended in."""
    model = GPT(h).to(rt.device)
    weights = dequantized(qstate)
    missing = set(model.state_dict()) ^ set(weights)
    need(not missing, f"artifact tensors do not match the model built from its config: {sorted(missing)[:5]}")
    model.load_state_dict(weights)
    model.set_stage(stage)
    return model


@dataclasses.dataclass
class Checkpoint:
    """What the export reads, train_phase's or EXPORT_FROM's (FINAL_MODEL_PATH saves it): the float weights,
    their recurrence stage and averaging ("ema(0.9965)"), the training run's id and tokenizer, the calibration
    tokens [x, y] and GPTQ's Hessians (None under QUANT_METHOD=lite). The weights are on the device that
    quantizes them; the calibration tokens and Hessians wait on the host."""

    state: dict
    stage: int
    weights: str
    run_id: str
    tokenizer_sha256: str
    calib: list
    hessians: dict | None


def export_artifact(ck: Checkpoint, h: Hyperparameters, rt: Runtime, log: Log, code: str, meta: dict) -> dict:
    """Quantize the float weights (ck: train_phase's or a checkpoint's) on QUANT_PLAN's grids, pack, fit the
    budget (AUTO_FIT), write."""
    state = ck.state
    hessians = ck.hessians
    t = now()
    raw_bytes, (code_bytes, shipped) = len(code.encode()), shipped_code_bytes(code, h)
    limit = min(h.export.byte_budget, RULE_BYTES)
    trial = GPT(h).to(rt.device)
    trial.set_stage(ck.stage)

    @torch.no_grad()
    def calib_loss(weights: dict) -> float:  # mean NLL of the last training micro-batch (rank 0's)
        trial.load_state_dict(dequantized(weights))
        with rt.autocast():
            return trial(*(c.to(rt.device) for c in ck.calib)).item()

    def pack(qstate: dict) -> bytes:
        return pack_artifact(qstate, meta, h.export.compressor)

    fit_limit = limit - code_bytes if h.export.auto_fit != "0" else math.inf
    fits = []  # AUTO_FIT=1 keeps LQER when, fitted to the same limit, its calibration loss is lower
    rounded = {}
    for lqer in [(h.export.lqer_rank, h.export.lqer_tensors)] + [(0, 0)] * (
        h.export.lqer_rank > 0 and h.export.auto_fit == "1"
    ):

        def quantize(
            plan: dict, lqer=lqer
        ) -> dict[str, QTensor]:  # the two fits share each plan's rounding (GPTQ)
            key = repr(sorted(plan.items()))
            rounded[key] = rounded.get(key) or quantize_state(
                state, plan, hessians, h.export.gptq_damp, h.export.prune_frac
            )
            return add_lqer(state, rounded[key], *lqer)

        fit = fit_to_budget(
            quantize, pack, quant_plan(h), fit_limit, calib_loss, log, fill=h.export.auto_fit == "1"
        )
        fits.append((calib_loss(fit.qstate), fit))
    if len(fits) > 1:
        log(
            f"lqer:{'kept' if fits[0][0] <= fits[1][0] else 'dropped'} calib_loss with:{fits[0][0]:.5f} "
            f"without:{fits[1][0]:.5f} (each fitted to {fit_limit} bytes)"
        )
    q_loss, fit = min(fits, key=lambda f: f[0])
    write_atomic(h.export.artifact_path, fit.blob)
    export_s = now() - t
    n_params, total = sum(t.numel() for t in state.values()), len(fit.blob) + code_bytes
    base_loss = calib_loss(state)
    tag = f"int{export_bits(fit.qstate)}+{h.export.compressor}"
    log(
        f"quant:plan {fmt_plan(fit.plan)} method:{h.export.quant_method} prune_frac:{h.export.prune_frac} "
        f"bytes_per_param:{len(fit.blob) / n_params:.4f} calib_loss float:{base_loss:.5f} quantized:{q_loss:.5f} "
        f"({q_loss - base_loss:+.5f})"
    )
    log(f"Serialized model: {sum(t.numel() * t.element_size() for t in state.values())} bytes")
    log(
        f"Code size: {code_bytes} bytes ({shipped}: the shipped train_gpt.py, counted; raw source {raw_bytes})"
    )
    log(
        f"Serialized model {tag}: {len(fit.blob)} bytes (export: calibrate+search+compress+write {export_s:.1f}s)"
    )
    log(f"Total submission size {tag}: {total} bytes")
    verdict = "PASS" if total <= limit else "FAIL"
    log(
        f"budget:{verdict} total {total} {'<=' if verdict == 'PASS' else '>'} {limit} bytes "
        f"(headroom {limit - total}; code counted {shipped})"
        + ("" if verdict == "PASS" else " -- OVER THE CAP: set AUTO_FIT=1 or shrink the model")
    )
    return dict(
        model=len(fit.blob),
        code=code_bytes,
        code_shipped=shipped,
        code_raw=raw_bytes,
        total=total,
        limit=limit,
        plan=fmt_plan(fit.plan),
        calib_loss_cost=q_loss - base_loss,
        export_s=export_s,
    )


def export_bits(qstate: dict[str, QTensor]) -> int:
    """The widest block-matrix grid: the N of the final_intN_* score lines."""
    return max(q.bits for name, q in qstate.items() if name.startswith("blocks."))


CHECKPOINT_FORMAT = "pgolf-float-1"


def save_checkpoint(path: str, ck: Checkpoint, h: Hyperparameters) -> None:
    """The float weights with what re-exporting needs: torch.save of plain tensors, lists and dicts (no code
    objects), read back with weights_only=True."""
    buf = io.BytesIO()
    state = {k: v.detach().float().cpu() for k, v in ck.state.items()}
    torch.save(dict(format=CHECKPOINT_FORMAT, model=h.model_config(), **{**vars(ck), "state": state}), buf)
    write_atomic(path, buf.getvalue())


def load_checkpoint(path: str, h: Hyperparameters, tokenizer_sha: str) -> Checkpoint:
    need(os.path.isfile(path), f"EXPORT_FROM={path}: file not found")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if saved.get("format") != CHECKPOINT_FORMAT:  # a rule, not an assert: it must survive python -O
            raise ValueError(f"format {saved.get('format')!r}")
    except Exception as e:
        raise ConfigError(
            f"EXPORT_FROM={path}: not a {CHECKPOINT_FORMAT} checkpoint written by FINAL_MODEL_PATH "
            f"({type(e).__name__}: {e})"
        ) from None
    stored, _ = stored_model_config(saved["model"], f"EXPORT_FROM={path}")
    for key, value in h.model_config().items():
        need(
            stored[key] == value,
            f"EXPORT_FROM={path}: the checkpoint has {key.upper()}="
            f"{stored[key]!r}, this run {key.upper()}={value!r}; run with the training configuration",
        )
    need(
        saved["tokenizer_sha256"] == tokenizer_sha,
        f"EXPORT_FROM={path}: trained with tokenizer sha256 "
        f"{saved['tokenizer_sha256']}, but TOKENIZER_PATH={h.run.tokenizer_path} has {tokenizer_sha}",
    )
    need(
        h.export.quant_method != "full" or saved["hessians"],
        f"EXPORT_FROM={path}: QUANT_METHOD=full needs Hessians, and this "
        "checkpoint has none (its run used QUANT_METHOD=lite): use QUANT_METHOD=lite",
    )
    return Checkpoint(**{f.name: saved[f.name] for f in dataclasses.fields(Checkpoint)})


# =====================================================================================================
# COMPLIANCE AND SUMMARY
# The contest rules as PASS/FAIL lines at the end of every run, and a JSON summary next to the log with
# every stage's score, bytes, times, steps, seed and a hash of the configuration (for aggregation).
# =====================================================================================================


def compliance_checks(
    h: Hyperparameters, train: dict | None, ev: dict, sizes: dict | None, manifest: dict
) -> list:
    verdict = {True: "PASS", False: "FAIL", None: "SKIP"}  # None: nothing to check
    eval_ms, eval_limit = ev["times_ms"]["total"], min(h.eval.eval_budget_seconds, RULE_EVAL_S)
    checks = [
        ("train_time", "SKIP", "no training in this run")
        if train is None
        else (
            "train_time",
            verdict[train["train_ms"] <= RULE_TRAIN_S * 1000],
            f"{train['train_ms'] / 1000:.3f}s incl. every training-data read, limit {RULE_TRAIN_S:.0f}s",
        ),
        (
            "eval_time",
            verdict[eval_ms <= eval_limit * 1000],
            f"{eval_ms / 1000:.3f}s, limit {eval_limit:.0f}s",
        ),
    ]
    if sizes is not None:
        checks.append(
            (
                "artifact_bytes",
                verdict[sizes["total"] <= RULE_BYTES],
                f"{sizes['total']} bytes, limit {RULE_BYTES}",
            )
        )
    reset = "B" if h.ttt.ttt_lora_warm_a else "B and A"
    rule = (
        "each chunk scored whole before training on exactly its targets; last chunk never trained"
        if h.ttt.ttt_mode == "chunk"
        else f"chunks scored before the step on them, {reset} reset per "
        "document, no document's last chunk trained, phases only on documents scored to the end"
    )
    checks.append(
        ("ttt_legal", "SKIP", "TTT off")
        if ev["ttt"] is None
        else ("ttt_legal", verdict[ev["ttt"]["legal"]], f"score-first: {rule}; single pass")
    )
    scored = {k: r["scored"] for k, r in ev["results"].items()}
    full = h.run.val_max_tokens == 0 and all(v == ev["n_targets"] for v in scored.values())
    checks.append(
        (
            "full_val",
            verdict[full],
            f"scored {scored} of {ev['n_targets']} val targets"
            + (f", VAL_MAX_TOKENS={h.run.val_max_tokens}" if h.run.val_max_tokens else ""),
        )
    )
    disjoint = manifest.get("train_val_disjoint")
    checks.append(
        (
            "train_val_disjoint",
            verdict[disjoint],
            f"{os.path.join(h.run.data_path, 'manifest.json')}: train_val_disjoint={disjoint}"
            if disjoint is not None
            else "no data/prepare_data.py manifest to check",
        )
    )
    return checks


def config_hash(h: Hyperparameters) -> str:
    """What must match across the seeds of one submission: everything but seed, run id and paths."""
    cfg = {
        k: v
        for k, v in h.flat().items()
        if k not in ("seed", "run_id", "artifact_path", "eval_only_artifact", "data_path", "tokenizer_path")
    }
    return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:16]


# =====================================================================================================
# MAIN
# run() is its phases, each a function with a named result: load_data (RunData), train_phase (TrainPhase: the
# TrainStats the summary keeps, the parameter count, the Checkpoint) or EXPORT_FROM's load_checkpoint,
# export_phase (the byte counts), load_eval_model (the scored model, read back from the artifact),
# run_evaluations (every score and its time), report (compliance lines, the JSON summary, the final line).
# =====================================================================================================


@dataclasses.dataclass
class RunData:
    """What every phase of a run reads: the tokenizer's hash, the dataset's manifest, the train shards and their
    token count (None when the run does not train), the val tokens and the metric's byte tables."""

    tokenizer_sha: str
    manifest: dict
    train_files: tuple | None
    val_tokens: Tensor
    luts: tuple


def load_data(h: Hyperparameters, rt: Runtime, log: Log) -> RunData:
    log.phase("data")
    tokenizer_sha = file_sha256(h.run.tokenizer_path)
    manifest = read_manifest(h, tokenizer_sha)
    train_files = None if h.export.eval_only_artifact or h.export.export_from else find_shards(h, "train")
    val_tokens = load_val_tokens(h, rt)
    luts = byte_counter(h, load_tokenizer(h), val_tokens, rt)
    log(f"val_bpb:enabled tokenizer_kind=sentencepiece tokenizer_path={h.run.tokenizer_path}")
    if train_files:
        log(
            f"train_loader:dataset:{os.path.basename(os.path.normpath(h.run.data_path))} train_shards:{len(train_files[0])} "
            f"tokens:{train_files[1]}"
        )
    log(
        f"val_loader:shards pattern={os.path.join(h.run.data_path, 'fineweb_val_*.bin')} tokens:{val_tokens.numel() - 1}"
    )
    return RunData(tokenizer_sha, manifest, train_files, val_tokens, luts)


def log_model(model: GPT, h: Hyperparameters, rt: Runtime, log: Log) -> int:
    """The model's lines of the log header; returns its parameter count."""
    params = sum(p.numel() for p in model.parameters())
    log(f"model_params:{params}")
    log(f"model_layout: {model.layout()}")
    schedule = " ".join(f"{i}:{p}" + (f"@s{s}" if s else "") for i, (p, s) in enumerate(model.slots))
    log(
        f"layer_schedule:{len(model.slots)} logical on {len(model.blocks)} physical "
        f"(logical:physical[@stage]) {schedule}"
    )
    log(f"XSA:last_{h.model.xsa_last_n} active_layers:{[i for i, on in enumerate(model.xsa) if on]}")
    log(f"world_size:{rt.world_size} grad_accum_steps:{rt.grad_accum} compile:{int(rt.compile)}")
    log("resolved: " + " ".join(f"{k}:{v}" for k, v in h.resolved().items()))
    log(
        f"attention_mode:{'gqa' if h.model.num_kv_heads < h.model.num_heads else 'mha'} num_heads:{h.model.num_heads} "
        f"num_kv_heads:{h.model.num_kv_heads} kernel:{model.attn_kernel} (ATTN_KERNEL={h.run.attn_kernel}) "
        f"passed_over:{model.attn_reasons}"  # the kernels auto tried first, and why each did not run
    )
    log(
        f"tie_embeddings:True embed_lr:{h.optim.tied_embed_lr} head_lr:0.0 matrix_lr:{h.optim.matrix_lr} scalar_lr:{h.optim.scalar_lr}"
    )
    log(
        f"train_batch_tokens:{h.train.train_batch_tokens} train_seq_len:{h.model.train_seq_len} iterations:{h.train.iterations} "
        f"warmup_steps:{h.train.warmup_steps} max_wallclock_seconds:{h.train.max_wallclock_seconds:.3f}"
    )
    log(f"seed:{h.run.seed}")
    return params


@dataclasses.dataclass
class TrainPhase:
    """train_phase's result: training's facts, the model's parameter count and the export's input."""

    stats: TrainStats
    params: int
    checkpoint: Checkpoint


def train_phase(h: Hyperparameters, rt: Runtime, data: RunData, run_id: str, log: Log) -> TrainPhase:
    """Build and train the model; returns its facts and the checkpoint the export reads (the float weights,
    their stage and averaging, the Hessians and calibration tokens moved to the host), saved first as
    FINAL_MODEL_PATH."""
    log.phase("model")
    torch.manual_seed(h.run.seed)
    np.random.seed(h.run.seed)
    model = GPT(h).to(rt.device)
    params = log_model(model, h, rt, log)
    loader = TrainLoader(data.train_files[0], rt)
    loader.check_docs = model.attn_kernel in ATTN_LIBS and h.model.doc_attention
    log.phase("train")
    trained = train_model(model, h, rt, loader, data.val_tokens, data.luts, log)
    stats = trained.stats
    on_cpu = {}  # one host copy per tensor: the Hessians of matrices that read the same input stay aliases
    hessians = trained.hessians and {
        k: on_cpu.setdefault(id(v), v.cpu()) for k, v in trained.hessians.items()
    }
    calib = [c.cpu() for c in trained.calib]
    ck = Checkpoint(
        model.state_dict(), model.stage, stats.weights, run_id, data.tokenizer_sha, calib, hessians
    )
    del trained  # the GPU copies of the Hessians: not kept through the eval
    if rt.rank == 0 and h.export.final_model_path:
        save_checkpoint(h.export.final_model_path, ck, h)
        log(
            f"final_model: {h.export.final_model_path} (post-{stats.weights.split('(')[0]} float weights; "
            f"EXPORT_FROM={h.export.final_model_path} re-exports them)"
        )
    return TrainPhase(stats, params, ck)


def export_phase(h: Hyperparameters, rt: Runtime, ck: Checkpoint, code: str, log: Log) -> dict | None:
    """Rank 0 writes the artifact (sizes returned there, None elsewhere) while the others wait without a
    timeout that the export could outlast."""
    log.phase("export")
    meta = dict(
        model=h.model_config(),
        stage=ck.stage,
        tokenizer_sha256=ck.tokenizer_sha256,
        run_id=ck.run_id,
        weights=ck.weights,
        quant=dict(
            method=h.export.quant_method,
            clip=h.export.quant_clip,
            prune_frac=h.export.prune_frac,
            lqer=[h.export.lqer_rank, h.export.lqer_tensors],
        ),
    )
    waiting = rt.long_wait_group()
    sizes = None
    if rt.rank == 0:
        sizes = export_artifact(ck, h, rt, log, code, meta)
    if waiting is not None:
        dist.barrier(group=waiting)
        dist.destroy_process_group(waiting)
    return sizes


def load_eval_model(
    h: Hyperparameters, rt: Runtime, data: RunData, log: Log
) -> tuple[GPT, Hyperparameters, str]:
    """The scored model, rebuilt from the artifact on disk alone (every rank reads it), with the eval settings."""
    log.phase("eval_load")
    artifact = h.export.eval_only_artifact or h.export.artifact_path
    qstate, meta = read_artifact(artifact)
    need(
        meta.get("tokenizer_sha256") == data.tokenizer_sha,
        f"{artifact} was trained with tokenizer sha256 "
        f"{meta.get('tokenizer_sha256')}, but TOKENIZER_PATH={h.run.tokenizer_path} has {data.tokenizer_sha}",
    )
    eval_h = artifact_hparams(h, meta["model"], artifact, log)
    eval_h = eval_h.replace(quant_bits=export_bits(qstate))
    if h.export.eval_only_artifact:
        eval_h.validate()  # the eval settings from the environment must fit the artifact's model
        log(
            f"eval_only: {artifact} ({os.path.getsize(artifact)} bytes, weights {meta['weights']}, "
            f"quant {meta['quant']})"
        )
    model = model_from_qstate(qstate, eval_h, rt, meta["stage"])
    if (
        model.attn_kernel in ATTN_LIBS and eval_h.model.doc_attention
    ):  # the worst window, times a batch's rows
        rows = eval_batch(eval_h, rt.world_size, eval_h.eval_len)
        most = most_documents(data.val_tokens.cpu().numpy(), eval_h.eval_len)
        check_documents(rows * most, rows, eval_h.eval_len, f"the val tokens of {h.run.data_path}")
    log(f"eval_model: stage {model.stage}, {len(model.active)} of {len(model.slots)} logical layers active")
    log(f"eval_model_layout: {model.layout()}")  # the verifier's network: equal to the trained model_layout
    return model, eval_h, artifact


def report(h: Hyperparameters, rt: Runtime, summary: dict, manifest: dict, log: Log) -> dict:
    """The compliance lines, the run's JSON summary (rank 0) and, last, the final score under its legacy name."""
    ev = summary["eval"]
    checks = compliance_checks(h, summary["train"], ev, summary["bytes"], manifest)
    for name, status, detail in checks:
        log(f"compliance:{name} {status} {detail}")
    record_hw = rt.device.type == "cuda" and rt.world_size == 8 and "H100" in summary["device"]
    log(
        f"compliance:record_hardware {'PASS' if record_hw else 'INFO'} {summary['device']} "
        f"(a record runs on 8xH100 SXM)"
    )
    final = ev["results"][ev["final"]]
    summary.update(
        final=dict(stage=ev["final"], **final),
        compliance={n: dict(status=s, detail=d) for n, s, d in checks},
        artifact_sha256=file_sha256(summary["artifact"]),
    )
    if rt.rank == 0:
        Path("logs", f"{summary['run_id']}.json").write_text(json.dumps(summary, indent=1, default=str))
        log(f"summary:logs/{summary['run_id']}.json")
    # the last line: the run's score (the final legal stage) under the name legacy parsers read
    log(f"final_int8_zlib_roundtrip_exact val_loss:{final['val_loss']:.8f} val_bpb:{final['val_bpb']:.8f}")
    return summary


def run(h: Hyperparameters, rt: Runtime, code: str, misspelt: list[tuple[str, str]] = ()) -> dict:
    """A run's phases: data, then training (or EXPORT_FROM's checkpoint) and the export (unless
    EVAL_ONLY_ARTIFACT), the scored model read back from disk, its timed eval, the report."""
    run_id = h.run.run_id or str(uuid.uuid4())
    log = Log(Path("logs") / f"{run_id}.txt" if rt.rank == 0 else None)
    log_header(log, h, rt, code)
    for name, knob_name in misspelt:
        log(f"warning: {name} is not a knob and is ignored; did you mean {knob_name}?")
    data = load_data(h, rt, log)
    summary = dict(
        run_id=run_id,
        seed=h.run.seed,
        config=h.flat(),
        config_hash=config_hash(h),
        code_sha256=hashlib.sha256(code.encode()).hexdigest(),
        torch=torch.__version__,
        device=f"{torch.cuda.get_device_name(rt.device) if rt.device.type == 'cuda' else 'cpu'} x{rt.world_size}",
        train=None,
        bytes=None,
    )
    if h.export.export_from:
        ck = load_checkpoint(h.export.export_from, h, data.tokenizer_sha)
        ck.state = {k: v.to(rt.device) for k, v in ck.state.items()}  # quantize where training would
        log(f"export_from: {h.export.export_from} (run {ck.run_id}, weights {ck.weights}, stage {ck.stage})")
    elif not h.export.eval_only_artifact:
        trained = train_phase(h, rt, data, run_id, log)
        summary.update(train=dataclasses.asdict(trained.stats), model_params=trained.params)
        ck = trained.checkpoint
    if not h.export.eval_only_artifact:
        summary["bytes"] = export_phase(h, rt, ck, code, log)
        del ck  # the float weights and Hessians: not kept through the eval
    model, eval_h, summary["artifact"] = load_eval_model(h, rt, data, log)
    log.phase("eval")
    summary["eval"] = run_evaluations(model, eval_h, rt, data.val_tokens, data.luts, log)
    log.phase("done")
    if rt.compile:
        log(compile_cache_line(h))
    return report(h, rt, summary, data.manifest, log)


def read_source(path: str) -> str:
    """The file's raw bytes as text, without newline translation: a CRLF copy counts every byte it has."""
    return Path(path).read_bytes().decode("utf-8")


def main(env=os.environ) -> None:
    h = Hyperparameters.from_env(env)
    rt = setup_runtime(h, env)
    try:
        run(h, rt, read_source(__file__), misspelt_knobs(env))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main()
    except ConfigError as e:
        sys.exit(f"error: {e}")
