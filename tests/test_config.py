"""Hyperparameters from env vars: defaults, parsing, and clear errors before any work."""

import re
import subprocess
import time

import pytest

from conftest import PY, REPO, make_env, run_script, tg


def test_defaults_are_the_record_run():
    h = tg.Hyperparameters.from_env({})
    assert (h.num_layers, h.model_dim, h.num_heads, h.num_kv_heads, h.mlp_mult) == (11, 512, 8, 4, 3.0)
    assert (h.bigram_vocab_size, h.ve_layers, h.xsa_last_n, h.rope_dims) == (1536, (9, 10), 4, 16)
    assert (h.ttt_enabled, h.ttt_freeze_blocks, h.ttt_epochs, h.eval_stride) == (True, 0, 3, 64)
    assert (h.train_batch_tokens, h.train_seq_len, h.max_wallclock_seconds) == (786432, 2048, 600.0)


def test_parsing_of_each_type():
    h = tg.Hyperparameters.from_env({"VE_LAYERS": "", "LOOP_ENABLE_AT": "0.5, 0.65", "LOOP_START": "3",
                                     "LOOP_END": "5", "LOOP_REPEATS": "2", "SMEAR_GATE": "false",
                                     "MATRIX_LR": "0.02", "ITERATIONS": " 7 ", "COMPILE": "0"})
    assert h.ve_layers == () and h.loop_enable_at == (0.5, 0.65) and h.smear_gate is False
    assert h.matrix_lr == 0.02 and h.iterations == 7 and h.compile == "0" and h.logical_layers == 17


@pytest.mark.parametrize("env, message", [
    ({"NUM_LAYERS": "abc"}, "NUM_LAYERS='abc': expected int"),
    ({"MODEL_DIM": "500"}, "MODEL_DIM=500 must be divisible by NUM_HEADS=8"),
    ({"NUM_KV_HEADS": "3"}, "NUM_HEADS=8 must be a multiple of NUM_KV_HEADS=3"),
    ({"NUM_LAYERS": "0"}, "NUM_LAYERS=0: must be in [1, inf]"),
    ({"EMA_DECAY": "nan"}, "EMA_DECAY='nan'"),
    ({"EMA_DECAY": "1.5"}, "EMA_DECAY=1.5: must be in [0.0, 1.0]"),
    ({"COMPRESSOR": "zip"}, "COMPRESSOR='zip': must be one of zstd, brotli, lzma"),
    ({"TTT_ENABLED": "maybe"}, "TTT_ENABLED='maybe'"),
    ({"VE_LAYERS": "9,x"}, "VE_LAYERS='9,x'"),
    ({"VE_LAYERS": "11"}, "VE_LAYERS=(11,): logical layers are 0..10"),
    ({"TRAIN_BATCH_TOKENS": "1000"}, "TRAIN_BATCH_TOKENS=1000 must be a multiple of 8*TRAIN_SEQ_LEN=16384"),
    ({"TRAIN_MICRO_BATCHES": "5"}, "TRAIN_BATCH_TOKENS=786432 must be a multiple of 5*TRAIN_SEQ_LEN=10240"),
    ({"LOOP_REPEATS": "1"}, "LOOP_START=-1, LOOP_END=-1"),
    ({"ROPE_DIMS": "2"}, "ROPE_DIMS=2"),
    ({"TTT_CHUNK_TOKENS": "1000"}, "TTT_CHUNK_TOKENS=1000 must be a multiple of EVAL_STRIDE=64"),
    ({"MUON_NS": "polar", "MUON_BACKEND_STEPS": "4"}, "MUON_NS=polar"),
])
def test_bad_values_name_the_variable(env, message):
    with pytest.raises(tg.ConfigError, match=re.escape(message)):
        tg.Hyperparameters.from_env(env)


@pytest.mark.parametrize("world, over, message", [
    ("3", {}, "WORLD_SIZE=3 must divide the 8 micro-batches"), ("x", {}, "must be integers"),
    ("0", {}, "WORLD_SIZE=0"), ("16", {"TRAIN_MICRO_BATCHES": "8"}, "WORLD_SIZE=16 must divide the 8"),
    ("10", {}, "TRAIN_BATCH_TOKENS=786432 must be a multiple of 10*TRAIN_SEQ_LEN")])
def test_world_size_must_split_the_batch(world, over, message):
    with pytest.raises(tg.ConfigError, match=re.escape(message)):
        tg.parse_dist_env({"WORLD_SIZE": world}, tg.Hyperparameters.from_env(over))


def test_world_sizes_beyond_8_take_one_micro_batch_each():
    h = tg.Hyperparameters.from_env({})
    assert tg.parse_dist_env({"WORLD_SIZE": "16", "RANK": "15"}, h) == (15, 16, 0) and h.micro_batches(16) == 16
    assert h.micro_batches(32) == 32 and h.micro_batches(4) == 8


def test_import_starts_nothing():
    code = ("import torch, torch.distributed as dist, train_gpt; "
            "assert not dist.is_initialized(); assert not torch.cuda.is_initialized(); print('inert')")
    proc = subprocess.run([PY, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0 and "inert" in proc.stdout, proc.stderr


def test_script_fails_fast_on_a_bad_value(tmp_path):
    t = time.time()
    proc = run_script(make_env({}, NUM_LAYERS="abc", DATA_PATH=str(tmp_path)), tmp_path)
    assert proc.returncode != 0 and "NUM_LAYERS='abc'" in proc.stderr
    assert time.time() - t < 30 and not (tmp_path / "logs").exists()


def test_misspelt_knobs_are_named_and_foreign_variables_stay_quiet():
    env = dict(MATRIX_LRR="0.1", TTT_EPOCH="2", NUM_LAYERS="3", PATH="/bin", HOME="/root", CUDA_VISIBLE_DEVICES="0",
               NCCL_DEBUG="INFO", TORCH_LOGS="recompiles", OMP_NUM_THREADS="1", LOCAL_WORLD_SIZE="8",
               TORCHELASTIC_RUN_ID="x", MASTER_PORT="29500", WORLD_SIZE="8", LANG="C.UTF-8")
    assert tg.misspelt_knobs(env) == [("MATRIX_LRR", "MATRIX_LR"), ("TTT_EPOCH", "TTT_EPOCHS")]
