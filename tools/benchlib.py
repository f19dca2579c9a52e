"""Shared by the benchmark tools: the CPU-scale config, running train_gpt.py, printing tables."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EMBEDDED = dict(
    DATA_PATH=str(REPO / "data" / "datasets" / "pdmix_sp1024"),
    TOKENIZER_PATH=str(REPO / "data" / "tokenizers" / "pdmix_1024_bpe.model"),
)


def read_env_file(path: Path) -> dict:
    """A KEY=VALUE file (tools/cpu_scale.env, configs/*.env) as a dict; # lines are comments."""
    env = {}
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{path}:{n}: expected KEY=VALUE, got {line!r}")
        env[key.strip()] = value.strip()
    return env


def cpu_scale_env() -> dict:
    """tools/cpu_scale.env as a dict (the main job's configuration)."""
    return read_env_file(REPO / "tools" / "cpu_scale.env")


def ensure_embedded_data(*args: str) -> None:
    subprocess.run(
        [sys.executable, str(REPO / "data" / "prepare_data.py"), "--if-missing", *args],
        check=True,
        capture_output=True,
    )


def token_budget_base(args) -> dict:
    """tools/cpu_scale.env on the embedded corpus, trained for exactly args.tokens (warmdown: the second half)
    and scored on the first args.val_tokens: the same work on any machine, whatever its speed."""
    ensure_embedded_data()
    base = {**cpu_scale_env(), **EMBEDDED, "MAX_WALLCLOCK_SECONDS": 0, "VAL_MAX_TOKENS": args.val_tokens}
    base["ITERATIONS"] = args.tokens // int(base["TRAIN_BATCH_TOKENS"])
    base["WARMDOWN_ITERS"] = base["ITERATIONS"] // 2
    return base


def child_env(env: dict) -> dict:
    """This process's environment (PYTHONPATH, CUDA_*, LD_LIBRARY_PATH, NCCL_*, TORCH* pass through: a GPU
    image needs them) without any variable train_gpt.py reads as a knob or from torchrun, plus `env`."""
    sys.path.insert(0, str(REPO))
    import train_gpt as tg

    knobs = set(tg.knob_names())
    knobs |= {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}
    return {**{k: v for k, v in os.environ.items() if k not in knobs}, **{k: str(v) for k, v in env.items()}}


def run_train(env: dict, workdir: Path) -> dict:
    """Run train_gpt.py with the knobs of `env` alone (child_env) in workdir; return its JSON summary."""
    workdir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        [sys.executable, str(REPO / "train_gpt.py")],
        cwd=workdir,
        env=child_env(env),
        capture_output=True,
        text=True,
    )
    if proc.returncode:
        raise RuntimeError(f"train_gpt.py failed ({env.get('RUN_ID')}):\n{proc.stderr[-3000:]}")
    return json.loads((workdir / "logs" / f"{env['RUN_ID']}.json").read_text())


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    def fmt(v):
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)
