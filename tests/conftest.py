"""Shared fixtures: datasets built once per session with data/prepare_data.py, a tiny model config,
and helpers to run train_gpt.py in-process (CPU runtime) or as a subprocess."""

import contextlib
import io
import json
import lzma
import os
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))
import train_gpt as tg  # noqa: E402
from benchlib import child_env  # noqa: E402

PY = sys.executable
CORPUS = REPO / "data" / "corpus" / "docs_selected.jsonl.xz"

# A model small enough for a 2-core CPU that still exercises every component.
TINY = dict(
    NUM_LAYERS=3,
    MODEL_DIM=64,
    NUM_HEADS=4,
    NUM_KV_HEADS=2,
    MLP_MULT=2,
    TRAIN_SEQ_LEN=64,
    TRAIN_BATCH_TOKENS=4096,
    ITERATIONS=6,
    WARMUP_STEPS=1,
    WARMDOWN_ITERS=3,
    MAX_WALLCLOCK_SECONDS=0,
    VAL_LOSS_EVERY=0,
    TRAIN_LOG_EVERY=1,
    VAL_MAX_TOKENS=4096,
    VAL_BATCH_SIZE=1024,
    VE_LAYERS="1,2",
    VE_DIM=16,
    XSA_LAST_N=2,
    BIGRAM_VOCAB_SIZE=256,
    BIGRAM_DIM=16,
    ROPE_DIMS=8,
    EVAL_STRIDE=32,
    TTT_CHUNK_TOKENS=1024,
    TTT_EPOCHS=1,
    EMA_DECAY=0.9,
    LATE_QAT_THRESHOLD=0.5,
    SEED=1337,
)


def run_prepare(out: Path, *args: str) -> None:
    proc = subprocess.run(
        [PY, str(REPO / "data" / "prepare_data.py"), "--out-dir", str(out), *args],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.fixture(scope="session")
def embedded_data(tmp_path_factory):
    """The embedded default corpus, built exactly as the README's main job builds it (sp1024)."""
    out = tmp_path_factory.mktemp("embedded")
    run_prepare(out)
    return dict(
        DATA_PATH=str(out / "datasets" / "pdmix_sp1024"),
        TOKENIZER_PATH=str(out / "tokenizers" / "pdmix_1024_bpe.model"),
        VOCAB_SIZE="1024",
    )


def small_corpus(out: Path, *flags: str) -> Path:
    """600 docs of the embedded corpus (100 val) prepared with a 512-piece tokenizer and 150K-token shards;
    returns the data root (datasets/, tokenizers/)."""
    with lzma.open(CORPUS, "rt", encoding="utf-8") as f:
        lines = [next(f) for _ in range(600)]
    docs = out / "docs.jsonl"
    docs.write_text("".join(lines), encoding="utf-8")
    run_prepare(
        out,
        *flags,
        "--docs",
        str(docs),
        "--val-docs",
        "100",
        "--vocab-size",
        "512",
        "--shard-tokens",
        "150000",
        "--name",
        "small",
    )
    return out


@pytest.fixture(scope="session")
def small_data(tmp_path_factory):
    """600 docs of the embedded corpus (100 val), a 512-piece tokenizer, several train shards."""
    out = small_corpus(tmp_path_factory.mktemp("small"))
    return dict(
        DATA_PATH=str(out / "datasets" / "small_sp512"),
        TOKENIZER_PATH=str(out / "tokenizers" / "small_512_bpe.model"),
        VOCAB_SIZE="512",
    )


@pytest.fixture(scope="session")
def caseops_data(tmp_path_factory):
    """small_data's 600 docs as CaseOps: case-encoded tokens (512-piece tokenizer) and byte sidecars."""
    out = small_corpus(tmp_path_factory.mktemp("caseops"), "--caseops")
    return dict(
        DATA_PATH=str(out / "datasets" / "small_sp512_caseops"),
        TOKENIZER_PATH=str(out / "tokenizers" / "small_512_bpe_caseops.model"),
        VOCAB_SIZE="512",
    )


def make_env(data: dict, **over) -> dict:
    env = {k: str(v) for k, v in {**TINY, **data}.items()}
    env.update({k: str(v) for k, v in over.items()})
    return env


def hparams(data: dict, **over) -> tg.Hyperparameters:
    return tg.Hyperparameters.from_env(make_env(data, **over))


def cpu_runtime(rank: int = 0, world: int = 1) -> tg.Runtime:
    return tg.Runtime(rank, world, 0, torch.device("cpu"), False)


SILENT = tg.Log(None)


def script_env(env: dict, nproc: int = 0) -> dict:
    """benchlib.child_env: this environment (PYTHONPATH, CUDA_*, ...) minus the script's knobs, plus `env`
    (a test sets every knob it uses), single-threaded under torchrun, unbuffered."""
    full = child_env(env)
    full.update(
        OMP_NUM_THREADS="1" if nproc > 1 else os.environ.get("OMP_NUM_THREADS", "2"), PYTHONUNBUFFERED="1"
    )
    return full


def run_script(
    env: dict,
    cwd: Path,
    script: Path = REPO / "train_gpt.py",
    nproc: int = 0,
    timeout: int = 300,
    process: bool = False,
):
    """Run train_gpt.py in this environment minus the script's knobs (script_env), optionally under torchrun.
    A plain eager CPU run goes through train_gpt.main in this process (3 s of interpreter start-up less, the
    same exit status and output as `python train_gpt.py` gives); under torchrun, compiled, on a GPU machine,
    another script (the packed one) or with process=True it is a real process."""
    if (
        nproc
        or process
        or script != REPO / "train_gpt.py"
        or env.get("COMPILE", "auto") != "auto"
        or torch.cuda.is_available()
    ):
        cmd = (
            [PY, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(script)]
            if nproc
            else [PY, str(script)]
        )
        return subprocess.run(
            cmd, cwd=cwd, env=script_env(env, nproc), capture_output=True, text=True, timeout=timeout
        )
    out, err, here = io.StringIO(), io.StringIO(), os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:  # as `if __name__ == "__main__"` does
                tg.main(script_env(env))
                rc = 0
            except tg.ConfigError as e:
                print(f"error: {e}", file=sys.stderr)
                rc = 1
            except Exception:
                traceback.print_exc()
                rc = 1
    finally:
        os.chdir(here)
    return subprocess.CompletedProcess(["train_gpt.main"], rc, out.getvalue(), err.getvalue())


def summary(cwd: Path, run_id: str) -> dict:
    return json.loads((cwd / "logs" / f"{run_id}.json").read_text())


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn_entry(rank, world, port, fn, args, out_dir):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    result = fn(rank, world, *args)  # an exception fails the test with its traceback (mp.spawn)
    torch.save(result, os.path.join(out_dir, f"{rank}.pt"))
    dist.barrier()  # every rank is past its last collective
    # Leave without tearing gloo down: its teardown races between processes (a rank that exits first closes
    # pairs that another is still shutting down, which aborts it: "terminate called without an active
    # exception", SIGABRT, seen in CI after every result was in) and is not what these tests test.
    # train_gpt.main tears its own group down, under torchrun in the end-to-end and preflight tests.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_distributed(fn, world: int, tmp_path: Path, *args, timeout: float = 300.0):
    """Run fn(rank, world, *args) in `world` gloo processes; return each rank's result. A hang (ranks that
    disagree on a collective wait for each other forever) fails the test after `timeout` seconds."""
    import time

    import torch.multiprocessing as mp

    ctx = mp.spawn(
        _spawn_entry, args=(world, _free_port(), fn, args, str(tmp_path)), nprocs=world, join=False
    )
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=max(deadline - time.monotonic(), 0.0)):
        if time.monotonic() >= deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f"{world} ranks still running after {timeout:.0f}s: a hang (mismatched collectives?)")
    return [torch.load(tmp_path / f"{r}.pt") for r in range(world)]
