"""Hyperparameters from env vars: defaults, parsing, and clear errors before any work."""

import re
import subprocess
import time

import pytest

from conftest import PY, REPO, make_env, run_script, tg


# R23 ("2026-03-23_LeakyReLU_LegalTTT_ParallelMuon", the submitted run, not its code defaults) from
# /work/shared/reference/records-spec.md, by section: every default the README calls the record's.
R23 = [
    ("§1", "VOCAB_SIZE", 1024),
    ("§1", "TRAIN_BATCH_TOKENS", 786432),
    ("§1", "TRAIN_SEQ_LEN", 2048),
    ("§2", "VAL_BATCH_SIZE", 524288),
    ("§3", "NUM_LAYERS", 11),
    ("§3", "MODEL_DIM", 512),
    ("§3", "NUM_HEADS", 8),
    ("§3", "NUM_KV_HEADS", 4),
    ("§3", "MLP_MULT", 3.0),
    ("§3", "MLP_NEG_SLOPE", 0.5),
    ("§3", "BIGRAM_VOCAB_SIZE", 1536),
    ("§3", "BIGRAM_DIM", 128),
    ("§3", "SMEAR_GATE", True),
    ("§3", "XSA_LAST_N", 4),
    ("§3", "ROPE_DIMS", 16),
    ("§3", "VE_LAYERS", (9, 10)),
    ("§3", "VE_DIM", 128),
    ("§3", "LN_SCALE", True),
    ("§3", "QK_GAIN_INIT", 1.5),
    ("§3", "TIED_EMBED_INIT_STD", 0.005),
    ("§3", "LOGIT_SOFTCAP", 30.0),
    ("§3", "UNIQUE_LAYERS", 0),
    ("§3", "LOOP_REPEATS", 0),
    ("§3", "PARALLEL_START", -1),
    ("§4", "MUON_BACKEND_STEPS", 5),
    ("§4", "MUON_NS", "classic"),
    ("§4", "MUON_EQ_R", False),
    ("§4", "MATRIX_LR", 0.025),
    ("§4", "MUON_WD", 0.04),
    ("§4", "MUON_MOMENTUM", 0.99),
    ("§4", "MUON_MOMENTUM_WARMUP_START", 0.92),
    ("§4", "MUON_MOMENTUM_WARMUP_STEPS", 1500),
    ("§4", "BETA1", 0.9),
    ("§4", "BETA2", 0.95),
    ("§4", "ADAM_EPS", 1e-8),
    ("§4", "ADAM_WD", 0.04),
    ("§4", "TIED_EMBED_LR", 0.035),
    ("§4", "SCALAR_LR", 0.025),
    ("§4", "WARMUP_STEPS", 20),
    ("§4", "WARMDOWN_ITERS", 3500),
    ("§4", "GRAD_CLIP_NORM", 0.3),
    ("§4", "MAX_WALLCLOCK_SECONDS", 600.0),
    ("§4", "ITERATIONS", 20000),
    ("§5", "EMA_DECAY", 0.997),
    ("§5", "SWA_EVERY", 0),
    ("§5", "LATE_QAT_THRESHOLD", 0.15),  # R23's SWA: never applied
    ("§6", "QUANT_BITS", 6),
    ("§6", "EMBED_BITS", 8),
    ("§6", "QUANT_METHOD", "lite"),
    ("§7", "EVAL_SEQ_LEN", 0),
    ("§7", "EVAL_STRIDE", 64),
    ("§7", "EVAL_SLIDING", True),
    ("§7", "TTT_ENABLED", True),
    ("§7", "TTT_CHUNK_TOKENS", 32768),
    ("§7", "TTT_EPOCHS", 3),
    ("§7", "TTT_OPTIMIZER", "sgd"),
    ("§7", "TTT_LR", 0.002),
    ("§7", "TTT_MOMENTUM", 0.9),
    ("§7", "TTT_FREEZE_BLOCKS", 0),
    ("§7", "TTT_GRAD_CLIP", 1.0),
    ("§7", "TTT_BATCH_SEQS", 32),
    ("§8", "VAL_LOSS_EVERY", 4000),
    ("§8", "TRAIN_LOG_EVERY", 500),
    ("§9", "SEED", 1337),
]


@pytest.mark.parametrize("section, name, value", R23, ids=[n for _, n, _ in R23])
def test_defaults_are_the_record_run(section, name, value):
    assert tg.Hyperparameters.from_env({}).flat()[name.lower()] == value, f"records-spec {section}"


def test_parsing_of_each_type():
    h = tg.Hyperparameters.from_env(
        {
            "VE_LAYERS": "",
            "LOOP_ENABLE_AT": "0.5, 0.65",
            "LOOP_START": "3",
            "LOOP_END": "5",
            "LOOP_REPEATS": "2",
            "SMEAR_GATE": "false",
            "MATRIX_LR": "0.02",
            "ITERATIONS": " 7 ",
            "COMPILE": "0",
        }
    )
    assert h.model.ve_layers == () and h.model.loop_enable_at == (0.5, 0.65) and h.model.smear_gate is False
    assert (
        h.optim.matrix_lr == 0.02
        and h.train.iterations == 7
        and h.run.compile == "0"
        and h.model.logical_layers == 17
    )


@pytest.mark.parametrize(
    "env, message",
    [
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
        (
            {"TRAIN_BATCH_TOKENS": "1000"},
            "TRAIN_BATCH_TOKENS=1000 must be a multiple of 8*TRAIN_SEQ_LEN=16384",
        ),
        (
            {"TRAIN_MICRO_BATCHES": "5"},
            "TRAIN_BATCH_TOKENS=786432 must be a multiple of 5*TRAIN_SEQ_LEN=10240",
        ),
        ({"LOOP_REPEATS": "1"}, "LOOP_START=-1, LOOP_END=-1"),
        ({"ROPE_DIMS": "2"}, "ROPE_DIMS=2"),
        ({"TTT_CHUNK_TOKENS": "1000"}, "TTT_CHUNK_TOKENS=1000 must be a multiple of EVAL_STRIDE=64"),
        ({"MUON_NS": "polar", "MUON_BACKEND_STEPS": "6"}, "MUON_NS=polar"),
        # found by tests/test_fuzz.py (each crashed or trained to nan before its rule)
        ({"BIGRAM_VOCAB_SIZE": "1"}, "BIGRAM_VOCAB_SIZE=1: 0 (off) or >= 2"),  # modulo 0 in BigramHash
        (
            {"NUM_HEADS": "8", "MODEL_DIM": "16", "ROPE_DIMS": "0"},
            "ROPE_DIMS=0: the rotated dims per head (2)",
        ),  # Rotary 2/0
        ({"GPTQ_DAMP": "0"}, "GPTQ_DAMP=0: must be in [1e-06, inf]"),  # cholesky of a singular Hessian
        ({"ADAM_EPS": "0"}, "ADAM_EPS=0: must be in [1e-30, inf]"),  # 0/0 on a zero gradient: nan
        ({"ADAM_EPS": "1e-50"}, "ADAM_EPS=1e-50: must be in [1e-30, inf]"),  # 0 in fp32: nan
        ({"LOGIT_SOFTCAP": "1e-200"}, "LOGIT_SOFTCAP=1e-200: 0 (off) or >= 1"),  # 0 in fp32: nan
        (
            {"MLP_MULT": "0.001"},
            "MLP_MULT=0.001 gives no MLP hidden unit at MODEL_DIM=512",
        ),  # 0 columns: 1/0 in Muon
        ({"SEED": "-1"}, "SEED=-1: must be in [0, 4294967295]"),  # numpy's seed range
        (
            {"VAL_MAX_TOKENS": "100"},
            "VAL_MAX_TOKENS=100 is shorter than one window",
        ),  # IndexError in the eval
        (
            {"BETA2": "1"},
            "BETA1=0.9, BETA2=1.0: need BETA1^2 < BETA2 < 1",
        ),  # torch's AdamW refuses it, after training
        (
            {"BETA2": "0", "ADAM_EPS": "1e-14"},
            "BETA1=0.9, BETA2=0.0: need BETA1^2",
        ),  # weights blew up: nan in TTT
        # not a crash: a reserve as long as the cap made the cap 0, i.e. none
        (
            {"QUANT_METHOD": "full", "MAX_WALLCLOCK_SECONDS": "5"},
            "GPTQ_RESERVE_SECONDS=8.0 leaves no training time",
        ),
    ],
)
def test_bad_values_name_the_variable(env, message):
    with pytest.raises(tg.ConfigError, match=re.escape(message)):
        tg.Hyperparameters.from_env(env)


@pytest.mark.parametrize(
    "world, over, message",
    [
        ("3", {}, "WORLD_SIZE=3 must divide the 8 micro-batches"),
        ("x", {}, "must be integers"),
        ("0", {}, "WORLD_SIZE=0"),
        ("16", {"TRAIN_MICRO_BATCHES": "8"}, "WORLD_SIZE=16 must divide the 8"),
        ("10", {}, "TRAIN_BATCH_TOKENS=786432 must be a multiple of 10*TRAIN_SEQ_LEN"),
    ],
)
def test_world_size_must_split_the_batch(world, over, message):
    with pytest.raises(tg.ConfigError, match=re.escape(message)):
        tg.parse_dist_env({"WORLD_SIZE": world}, tg.Hyperparameters.from_env(over))


def test_world_sizes_beyond_8_take_one_micro_batch_each():
    h = tg.Hyperparameters.from_env({})
    assert (
        tg.parse_dist_env({"WORLD_SIZE": "16", "RANK": "15"}, h) == (15, 16, 0) and h.micro_batches(16) == 16
    )
    assert h.micro_batches(32) == 32 and h.micro_batches(4) == 8


def test_import_starts_nothing():
    code = (
        "import torch, torch.distributed as dist, train_gpt; "
        "assert not dist.is_initialized(); assert not torch.cuda.is_initialized(); print('inert')"
    )
    proc = subprocess.run([PY, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0 and "inert" in proc.stdout, proc.stderr


def test_script_fails_fast_on_a_bad_value(tmp_path):
    t = time.time()
    proc = run_script(
        make_env({}, NUM_LAYERS="abc", DATA_PATH=str(tmp_path)), tmp_path, process=True
    )  # the program
    assert proc.returncode != 0 and "NUM_LAYERS='abc'" in proc.stderr
    assert time.time() - t < 30 and not (tmp_path / "logs").exists()


def test_misspelt_knobs_are_named_and_foreign_variables_stay_quiet():
    env = dict(
        MATRIX_LRR="0.1",
        TTT_EPOCH="2",
        NUM_LAYERS="3",
        PATH="/bin",
        HOME="/root",
        CUDA_VISIBLE_DEVICES="0",
        NCCL_DEBUG="INFO",
        TORCH_LOGS="recompiles",
        OMP_NUM_THREADS="1",
        LOCAL_WORLD_SIZE="8",
        TORCHELASTIC_RUN_ID="x",
        MASTER_PORT="29500",
        WORLD_SIZE="8",
        LANG="C.UTF-8",
    )
    assert tg.misspelt_knobs(env) == [("MATRIX_LRR", "MATRIX_LR"), ("TTT_EPOCH", "TTT_EPOCHS")]


def test_every_knob_lives_in_one_group_and_the_flat_view_round_trips():
    """Field names are env names: unique across groups, or two env vars would set one knob (or flat() hide one)."""
    names = [f.name for _, f in tg.Hyperparameters.knobs()]
    assert len(names) == len(set(names))
    h = tg.Hyperparameters.from_env(
        {"NUM_LAYERS": "7", "VE_LAYERS": "5,6", "TTT_LORA_RANK": "16", "MATRIX_LR": "0.05"}
    )
    assert (h.model.num_layers, h.ttt.ttt_lora_rank, h.optim.matrix_lr) == (7, 16, 0.05)
    flat = h.flat()
    assert sorted(flat) == sorted(names)
    assert tg.Hyperparameters().replace(**flat) == h
    assert h.replace(num_layers=9).model.num_layers == 9 and h.model.num_layers == 7
    with pytest.raises(TypeError, match="num_layer"):
        h.replace(num_layer=9)


def test_the_model_group_is_what_the_artifact_stores_and_a_stored_one_rebuilds_it():
    h = tg.Hyperparameters.from_env({"NUM_LAYERS": "5", "VE_LAYERS": "3,4", "MLP_MULT": "2.5"})
    stored = h.model_config()
    assert sorted(stored) == sorted(f.name for f in tg.dataclasses.fields(tg.ModelConfig))
    log = []
    rebuilt = tg.artifact_hparams(tg.Hyperparameters(), stored, "m.ptz", log.append)
    assert rebuilt.model == h.model and rebuilt.run == tg.Hyperparameters().run and not log
    older = {k: v for k, v in stored.items() if k != "ve_dim"}
    assert tg.artifact_hparams(tg.Hyperparameters(), older, "m.ptz", log.append).model.ve_dim == 128
    assert log and "VE_DIM" in log[0]


def test_each_group_checks_its_own_rules_and_the_whole_checks_across_groups():
    with pytest.raises(tg.ConfigError, match="NUM_KV_HEADS"):
        tg.ModelConfig(num_heads=8, num_kv_heads=3).validate()
    with pytest.raises(tg.ConfigError, match="BETA2"):
        tg.OptimConfig(beta1=0.9, beta2=0.5).validate()
    with pytest.raises(tg.ConfigError, match="TTT_LORA_ROWS_PER_PASS"):
        tg.TTTConfig(ttt_docs_per_batch=64, ttt_lora_rows_per_pass=5).validate()
    with pytest.raises(tg.ConfigError, match="TTT_FREEZE_BLOCKS"):
        tg.Hyperparameters.from_env({"NUM_LAYERS": "4", "VE_LAYERS": "3", "TTT_FREEZE_BLOCKS": "5"})


def test_every_auto_knob_is_resolved_by_one_property_and_logged():
    h = tg.Hyperparameters.from_env({"TRAIN_SEQ_LEN": "512", "ADAM_WD": "0.02", "BETA2": "0.99"})
    assert h.resolved() == dict(
        unique_layers=11,
        embed_wd=0.02,
        eval_seq_len=512,
        ttt_beta2=0.99,
        ttt_lora_alpha=80,
        ttt_lora_rows_per_pass=64,
    )
    given = dict(
        UNIQUE_LAYERS="4",
        EMBED_WD="0.1",
        EVAL_SEQ_LEN="1024",
        TTT_BETA2="0.999",
        TTT_LORA_ALPHA="144",
        TTT_LORA_ROWS_PER_PASS="16",
    )
    h = tg.Hyperparameters.from_env(given)
    assert h.resolved() == dict(
        unique_layers=4,
        embed_wd=0.1,
        eval_seq_len=1024,
        ttt_beta2=0.999,
        ttt_lora_alpha=144.0,
        ttt_lora_rows_per_pass=16,
    )
    # the values the code runs with are these properties
    assert (h.model.blocks, h.eval_len, h.optim.embedding_wd) == (4, 1024, 0.1)
    assert (h.ttt_adam_beta2, h.ttt.lora_alpha, h.ttt.lora_rows) == (0.999, 144, 16)


def test_knobs_that_pick_a_registered_function_offer_exactly_the_registry():
    """A block form, attention kernel or codec added to its registry and not to its knob's choices (or the other
    way round) fails here, not as a rejected value or a KeyError in somebody's run. CODECS' order is the
    artifact's codec id: only appending keeps old artifacts readable."""
    choices = {f.name: set(f.metadata["choices"] or ()) for _, f in tg.Hyperparameters.knobs()}
    assert choices["parallel_form"] | {"sequential"} == set(tg.BLOCK_FORMS)
    assert choices["attn_kernel"] == {"auto", *tg.ATTENTION_KERNELS}
    assert choices["compressor"] == set(tg.CODECS) and tg.CODECS[:3] == ("zstd", "brotli", "lzma")
    for gate in choices["attn_gate"]:  # LayerControl builds each gate by name
        assert (tg.LayerControl(8, False, "sequential", False, gate, 2).attn_gate is None) == (gate == "off")
