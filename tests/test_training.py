"""The training loop's compile warm-up: undone exactly, and with it nothing compiles once the timers run."""

import re

import torch

from conftest import SILENT, cpu_runtime, hparams, make_env, run_distributed, run_script, tg


def train_tiny(data, warmup_steps):
    h = hparams(
        data,
        WARMUP_STEPS=warmup_steps,
        ITERATIONS=4,
        WARMDOWN_ITERS=4,
        LOOP_START=1,
        LOOP_END=1,
        LOOP_REPEATS=1,
        LOOP_ENABLE_AT=0.5,
        LATE_QAT_THRESHOLD=0.5,
        EMA_DECAY=0.9,
    )
    rt = cpu_runtime()
    torch.manual_seed(0)
    model = tg.GPT(h)
    loader = tg.TrainLoader(tg.find_shards(h, "train")[0], rt)
    luts = tg.build_byte_luts(tg.load_tokenizer(h), "cpu")
    tg.train_model(model, h, rt, loader, tg.load_val_tokens(h, rt), luts, SILENT)
    return model.state_dict(), loader.state()


def test_warmup_leaves_weights_optimizer_and_data_order_unchanged(small_data):
    """Warm-up steps run every graph variant (both recurrence stages, late QAT) with real optimizer
    steps, then restore weights, optimizer state and the data position: the run ends bit-identical."""
    plain, plain_pos = train_tiny(small_data, 0)
    warmed, warmed_pos = train_tiny(small_data, 3)
    assert plain_pos == warmed_pos
    assert all(torch.equal(plain[k], warmed[k]) for k in plain)


def test_compiled_run_compiles_nothing_once_timers_run(small_data, tmp_path):
    """A whole compiled run (late QAT switching on mid-training, a frozen TTT block, a short last TTT
    chunk): every graph is built by a warm-up, none during training or inside the timed eval. Graphs and
    their guards are dynamo's, whatever the backend: aot_eager spares the CPU inductor's C++ builds."""
    env = make_env(
        small_data,
        RUN_ID="recompile",
        ARTIFACT_PATH=tmp_path / "m.ptz",
        COMPILE=1,
        COMPILE_BACKEND="aot_eager",
        NUM_LAYERS=2,
        VE_LAYERS=1,
        XSA_LAST_N=1,
        ITERATIONS=3,
        WARMUP_STEPS=2,
        WARMDOWN_ITERS=3,
        VAL_MAX_TOKENS=4 * 1024 + 200,
        TTT_EPOCHS=1,
        TTT_BATCH_SEQS=8,
        TTT_FREEZE_BLOCKS=1,
    )
    proc = run_script(env, tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"late_qat:enabled step:[12] ", proc.stdout)
    assert "train_compiles: 0 graphs compiled after warm-up" in proc.stdout
    assert "eval_compiles: 0 graphs compiled inside the timed eval" in proc.stdout
    assert "ttt_budget: trained 4/4 chunk-epochs" in proc.stdout


def train_ranks(rank, world, data):
    """Two steps on `world` gloo ranks of a step made of 16 micro-batches (two per rank at 8 ranks), gradients
    clipped (GRAD_CLIP_NORM is low enough to bite)."""
    torch.set_num_threads(1)
    h = hparams(
        data,
        TRAIN_MICRO_BATCHES=16,
        ITERATIONS=2,
        WARMUP_STEPS=0,
        EMA_DECAY=0,
        LATE_QAT_THRESHOLD=0,
        GRAD_CLIP_NORM=0.1,
    )
    rt = tg.Runtime(rank, world, 0, torch.device("cpu"), False, h.micro_batches(world))
    torch.manual_seed(0)
    model = tg.GPT(h)
    tokens = tg.load_val_tokens(h, rt)
    luts = tg.build_byte_luts(tg.load_tokenizer(h), "cpu")
    info = tg.train_model(
        model, h, rt, tg.TrainLoader(tg.find_shards(h, "train")[0], rt), tokens, luts, SILENT
    )
    return info.stats.pre_quant["val_loss"], [p.detach().clone() for p in model.parameters()]


def test_eight_ranks_train_like_one(small_data, tmp_path):
    """8 gloo ranks (Muon's gradients reduce-scattered into shares smaller than a rank each, the rest all-reduced,
    all clipped by the global norm) end where one process with the same 16 micro-batches per step does."""
    loss, params = train_ranks(0, 1, small_data)
    for loss8, params8 in run_distributed(train_ranks, 8, tmp_path, small_data):
        assert abs(loss8 - loss) < 1e-5
        assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(params8, params))
