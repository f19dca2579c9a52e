#!/usr/bin/env python3
"""One command that measures everything on a GPU machine and writes it under one folder.

  python3 tools/gpu_report.py                        # GPU: record model, 120 s of training (~15 min)
  python3 tools/gpu_report.py --train-seconds 600    # the full training wallclock
  python3 tools/gpu_report.py --tiny                 # CPU-sized (tiny config, seconds of training): the tests

Steps (each can be left out with --skip NAME):
  env      device, driver (nvidia-smi), torch / CUDA / Python versions, missing packages
  bench    tools/bench_speed.py on the record model: tokens/s, ms per micro-step, peak memory, MFU
  profile  torch.profiler over a few training micro-steps: the top kernels by device time, raw table
  train    a record-config run of train_gpt.py (torchrun on a GPU) under TORCH_LOGS=recompiles; every
           output line timestamped on arrival; its phase timeline and recompile count (--warm-rerun:
           twice, on a cold then a warm COMPILE_CACHE_DIR)
  tests    python -m pytest -q tests/test_gpu.py
Output (default results/gpu_report_<date>/): report.md (tables), report.json, and the raw files
(env.txt, bench_speed.txt/.json, profile.txt, report_train.log with arrival times, logs/, tests.txt).

Data: DATA_PATH / TOKENIZER_PATH from the environment, else the embedded corpus (built if missing, at the
run's VOCAB_SIZE, CaseOps when the preset's tokenizer is). The training run is train_gpt.py's defaults (the
2026-03-23 record), or --preset NAME (configs/NAME.env at full size; --tiny shrinks it by tools/preset_cpu.env).
Every train_gpt.py knob in the environment wins over both (COMPILE_CACHE_DIR=... for a warm-cache run).

On a lent device machine (15 min of device time a session, 10 min a command, 8 files back): give the report a
--deadline under the command's limit (a step still running then is killed and reported as such; steps not
begun are marked skipped) and --tar $OUT/report.tar.gz (one file, packed even when the deadline struck).
README "GPU sessions" has the commands that fit one session each. A GPU image without zstandard/brotli:
carry wheels in .whl/ and first run
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
"""

import argparse
import datetime
import importlib.util
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import torch

from benchlib import REPO, ensure_embedded_data, markdown_table, read_env_file

PY = sys.executable
STEPS = ("env", "bench", "profile", "train", "tests")
# the tiny training run: bench_speed's tiny model, a few seconds of training, a short val prefix
TINY_TRAIN = dict(
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
    TTT_EPOCHS=1,
    ITERATIONS=100000,
    WARMUP_STEPS=1,
    WARMDOWN_ITERS=20,
    VAL_LOSS_EVERY=0,
    TRAIN_LOG_EVERY=10,
    VAL_MAX_TOKENS=2048,
    VAL_BATCH_SIZE=2048,
)
# lines that mark a point in the run's timeline (the first match of each pattern, or every match when listed)
MARKERS = [
    (r"^phase:(\w+)", True),
    (r"^warmup_step:1/", False),
    (r"^eval_warmup", True),
    (r"^step:1/\d+ train_loss", False),
    (r"^late_qat:enabled", False),
    (r"^recurrence:stage", True),
    (r"^stopping_early", False),
    (r"^peak memory", False),
    (r"^weights:", False),
    (r"^gptq:", True),
    (r"^DIAGNOSTIC", False),
    (r"^Serialized model int", False),
    (r"^(final_int\d+_\w+|legal_ttt) val_loss", True),
    (r"^eval_time:", False),
    (r"^\w+_compiles:", True),
    (r"^compile_cache:", False),
]


DEADLINE = [None]  # perf_counter() at which every step stops (--deadline); None = no limit


def seconds_left() -> float | None:
    return None if DEADLINE[0] is None else DEADLINE[0] - time.perf_counter()


def run_logged(cmd: list, path: Path, env: dict | None = None) -> tuple[int, list]:
    """Run cmd, stdout and stderr merged; write each line to path as `[+seconds] line`; return the lines
    as (seconds since launch, text). At the deadline its whole process group is killed (torchrun's workers
    too, so that the GPU is free) and the log says so; rc is then -9."""
    t0 = time.perf_counter()
    lines = []
    with (
        open(path, "w", encoding="utf-8") as f,
        subprocess.Popen(
            cmd,
            cwd=path.parent,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            start_new_session=True,
        ) as proc,
    ):
        left = seconds_left()
        timer = (
            None if left is None else threading.Timer(max(left, 0.0), os.killpg, (proc.pid, signal.SIGKILL))
        )
        if timer:
            timer.start()
        for text in proc.stdout:
            t = time.perf_counter() - t0
            lines.append((t, text.rstrip("\n")))
            f.write(f"[+{t:8.2f}s] {text}")
            f.flush()
        rc = proc.wait()
        if timer:
            timer.cancel()
        if rc == -signal.SIGKILL and left is not None and seconds_left() <= 0:
            lines.append((time.perf_counter() - t0, "gpu_report: killed at the --deadline"))
            f.write(f"[+{lines[-1][0]:8.2f}s] {lines[-1][1]}\n")
    return rc, lines


def env_info(out: Path) -> dict:
    cuda = torch.cuda.is_available()
    info = dict(
        host=platform.node(),
        platform=platform.platform(),
        python=platform.python_version(),
        torch=torch.__version__,
        cuda=torch.version.cuda,
        cpus=os.cpu_count(),
        device=torch.cuda.get_device_name() if cuda else "cpu",
        gpus=torch.cuda.device_count() if cuda else 0,
        missing=[
            m for m in ("zstandard", "brotli", "sentencepiece", "numpy") if not importlib.util.find_spec(m)
        ],
    )
    smi = shutil.which("nvidia-smi")
    text = subprocess.run([smi], capture_output=True, text=True).stdout if smi else "no nvidia-smi\n"
    if smi:
        q = subprocess.run(
            [smi, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True
        )
        info["driver"] = q.stdout.strip().splitlines()[0] if q.returncode == 0 and q.stdout.strip() else ""
    (out / "env.txt").write_text(json.dumps(info, indent=1) + "\n\n" + text)
    return info


def bench(out: Path, tiny: bool) -> dict:
    cmd = [
        PY,
        str(REPO / "tools" / "bench_speed.py"),
        "--configs",
        "tiny" if tiny else "record",
        "--attn",
        "sdpa,sdpa-flash,sdpa-cudnn,flex,fa3,fa4,varlen",  # each where it installs and runs
        "--json",
        str(out / "bench_speed.json"),
    ] + (["--tiny"] if tiny else [])
    rc, _ = run_logged(cmd, out / "bench_speed.txt")
    if rc:
        return dict(rc=rc)
    result = json.loads((out / "bench_speed.json").read_text())
    return dict(rc=0, **result["rows"][0], attention=result["attention"])


def profile_steps(config: str, steps: int, out: Path) -> None:
    """Runs in its own process (so the training run gets a clean GPU): compiled training micro-steps of
    bench_speed's config under torch.profiler; writes profile.txt and profile.json."""
    import bench_speed
    import train_gpt as tg
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    rt = tg.Runtime(0, 1, 0, torch.device("cuda" if cuda else "cpu"), cuda)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # as setup_runtime does
    over = dict(bench_speed.CONFIGS[config])
    micro_seqs = over.pop("micro_seqs")
    h = tg.Hyperparameters.from_env({k: str(v) for k, v in over.items()})
    torch.manual_seed(0)
    model = tg.GPT(h).to(rt.device)
    compiled = tg.compile_model(model, rt)
    x = torch.randint(0, h.model.vocab_size, (micro_seqs, h.model.train_seq_len), device=rt.device)

    def micro_step():
        with rt.autocast():
            compiled(x, x).backward()

    for _ in range(2):  # compile and warm up outside the trace
        micro_step()
    rt.sync()
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        for _ in range(steps):
            micro_step()
        rt.sync()
    events = prof.key_averages()
    if cuda:  # device kernels, by their own time on the GPU
        kernels = [
            (e.key, e.count, e.self_device_time_total)
            for e in events
            if e.device_type == torch.autograd.DeviceType.CUDA and e.self_device_time_total > 0
        ]
        sort = "self_device_time_total"
    else:  # no kernels on a CPU: the operators, by their own CPU time
        kernels = [(e.key, e.count, e.self_cpu_time_total) for e in events if e.self_cpu_time_total > 0]
        sort = "self_cpu_time_total"
    kernels.sort(key=lambda k: -k[2])
    total_us = sum(k[2] for k in kernels)
    rows = [
        dict(
            kernel=name[:100], calls=n, ms_per_step=round(us / 1000 / steps, 3), share=round(us / total_us, 4)
        )
        for name, n, us in kernels[:25]
    ]
    (out / "profile.txt").write_text(events.table(sort_by=sort, row_limit=60, max_name_column_width=100))
    (out / "profile.json").write_text(
        json.dumps(
            dict(
                config=config,
                micro_batch=f"{micro_seqs}x{h.model.train_seq_len}",
                steps=steps,
                timed="device" if cuda else "cpu",
                ms_per_step=round(total_us / 1000 / steps, 3),
                top=rows,
            ),
            indent=1,
        )
    )


def profile(out: Path, tiny: bool, steps: int) -> dict:
    cmd = [
        PY,
        str(Path(__file__).resolve()),
        "--profile-only",
        "tiny" if tiny else "record",
        "--profile-steps",
        str(steps),
        "--out",
        str(out),
    ]
    rc, _ = run_logged(cmd, out / "profile.log")
    return dict(rc=rc, **json.loads((out / "profile.json").read_text())) if rc == 0 else dict(rc=rc)


def timeline(lines: list) -> list[dict]:
    """The marker lines of a run in arrival order: seconds since launch and since the previous marker."""
    seen, points = set(), []
    for t, text in lines:
        for i, (pattern, every) in enumerate(MARKERS):
            if re.match(pattern, text) and (every or i not in seen):
                seen.add(i)
                points.append(dict(at_s=round(t, 2), line=text[:110]))
                break
    for prev, p in zip([None] + points, points):
        p["since_prev_s"] = round(p["at_s"] - (prev["at_s"] if prev else 0.0), 2)
    return points


def phases(lines: list) -> dict:
    """Seconds per phase, from the phase: lines' arrival (launch -> phase:data is start-up), the train
    phase split by the training wallclock the log reports, the eval phase by the timed eval it reports."""
    marks = [(m.group(1), t) for t, text in lines if (m := re.match(r"^phase:(\w+) ", text))]
    end = lines[-1][0] if lines else 0.0
    out = {"startup": round(marks[0][1], 2)} if marks else {}
    for (name, t), nxt in zip(marks, marks[1:] + [(None, end)]):
        out[name] = round(nxt[1] - t, 2)
    texts = [text for _, text in lines]
    steps = [
        (t, float(m.group(1)))
        for t, text in lines
        if (m := re.match(r"^step:\d+/\d+ train_loss:\S+ train_time:(\d+)ms", text))
    ]
    start = dict(marks)
    if steps and "train" in start:
        train_s = steps[-1][1] / 1000
        out["train.compile_warmup"] = round(steps[0][0] - steps[0][1] / 1000 - start["train"], 2)
        out["train.training"] = round(train_s, 2)
        out["train.after_training"] = round(out["train"] - out["train.compile_warmup"] - train_s, 2)
    timed = next(
        (float(m.group(1)) / 1000 for x in texts if (m := re.search(r"^eval_time: .*total:(\d+)ms", x))), None
    )
    if timed is not None and "eval" in out:
        out["eval.untimed_warmup"] = round(out["eval"] - timed, 2)
        out["eval.timed"] = round(timed, 2)
    if (
        "train.training" in out and "eval.timed" in out
    ):  # what the budget counts: all but the two timers
        out["total"] = round(end, 2)
        out["overhead"] = round(end - out["train.training"] - out["eval.timed"], 2)
    return out


def recompiles(lines: list) -> dict:
    """TORCH_LOGS=recompiles lines (rank 0's only) by function, those after training began apart; and the
    graph counts train_gpt.py reports itself (train_compiles:, eval_compiles:)."""
    steps = [t for t, text in lines if re.match(r"^step:\d+/\d+ train_loss", text)]
    begun = steps[0] if steps else float("inf")
    found = [
        (t, m.group(1))
        for t, text in lines
        if (m := re.search(r"Recompiling function (\w+)", text)) and not re.search(r"\[rank[1-9]\d*\]", text)
    ]
    counts = {
        m.group(1): int(m.group(2)) for _, text in lines if (m := re.match(r"^(\w+_compiles): (\d+)", text))
    }
    by_fn = {}
    for _, fn in found:
        by_fn[fn] = by_fn.get(fn, 0) + 1
    return dict(
        total=len(found), after_training_began=sum(t >= begun for t, _ in found), by_function=by_fn, **counts
    )


def run_env(preset: str | None, tiny: bool, environ: dict) -> tuple[dict, list]:
    """The training run's environment and, when it needs the embedded corpus (no DATA_PATH given), the
    prepare_data.py arguments that build it: the preset's knobs (configs/NAME.env; tools/preset_cpu.env over
    them with --tiny), or TINY_TRAIN with --tiny, or none (train_gpt.py's defaults); `environ` wins over them."""
    knobs = read_env_file(REPO / "configs" / f"{preset}.env") if preset else {}
    if tiny:
        knobs.update(
            read_env_file(REPO / "tools" / "preset_cpu.env")
            if preset
            else {k: str(v) for k, v in TINY_TRAIN.items()}
        )
    data_args = []
    if "DATA_PATH" not in environ:  # the embedded corpus at the run's vocabulary, CaseOps if the preset's is
        vocab, caseops = (
            environ.get("VOCAB_SIZE", knobs.get("VOCAB_SIZE", "1024")),
            "caseops" in knobs.get("TOKENIZER_PATH", ""),
        )
        data_args = ["--vocab-size", vocab] + (["--caseops"] if caseops else [])
        tag = "_caseops" if caseops else ""
        knobs.update(
            DATA_PATH=str(REPO / "data" / "datasets" / f"pdmix_sp{vocab}{tag}"),
            TOKENIZER_PATH=str(REPO / "data" / "tokenizers" / f"pdmix_{vocab}_bpe{tag}.model"),
        )
    return {**knobs, **environ}, data_args


def train_run(
    out: Path, tiny: bool, seconds: float, nproc: int, run_id: str, cache: Path | None, preset: str | None
) -> dict:
    env, data_args = run_env(
        preset, tiny, dict(os.environ, **({"COMPILE_CACHE_DIR": str(cache)} if cache else {}))
    )
    if data_args:
        ensure_embedded_data(*data_args)
    env.update(
        RUN_ID=run_id,
        MAX_WALLCLOCK_SECONDS=str(seconds),
        ARTIFACT_PATH=str(out / f"{run_id}.ptz"),
        TORCH_LOGS=",".join(filter(None, [env.get("TORCH_LOGS"), "recompiles"])),
        PYTHONUNBUFFERED="1",
    )
    script = str(REPO / "train_gpt.py")
    cmd = (
        [PY, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", script]
        if torch.cuda.is_available() or nproc > 1
        else [PY, script]
    )
    rc, lines = run_logged(cmd, out / f"{run_id}.log", env)
    summary = out / "logs" / f"{run_id}.json"
    s = json.loads(summary.read_text()) if summary.exists() else {}
    (out / f"{run_id}.ptz").unlink(missing_ok=True)  # its size is in the summary; the folder gets committed
    texts = [text for _, text in lines]
    step_avg = [
        float(m.group(1))
        for x in texts
        if (m := re.search(r"^step:\d+/\d+ train_loss.* step_avg:([\d.]+)ms", x))
    ]
    ev = s.get("eval") or {}
    timed_ms, targets = (ev.get("times_ms") or {}).get("total"), ev.get("n_targets")
    return dict(
        rc=rc,
        cmd=" ".join(cmd[-3:]),
        preset=preset or "(defaults: r23)",
        compile_cache=env.get("COMPILE_CACHE_DIR", ""),
        wall_s=round(lines[-1][0], 2) if lines else 0.0,
        phases=phases(lines),
        recompiles=recompiles(lines),
        timeline=timeline(lines),
        steps=(s.get("train") or {}).get("steps"),
        step_avg_ms=step_avg[-1] if step_avg else None,
        final_val_bpb=(s.get("final") or {}).get("val_bpb"),
        bytes_total=(s.get("bytes") or {}).get("total"),
        eval_ms=ev.get("times_ms"),
        eval_targets=targets,
        ttt_mode=env.get("TTT_MODE", "chunk") if env.get("TTT_ENABLED", "1") != "0" else "off",
        ttt=ev.get("ttt"),
        # per GPU, what the timed eval costs per million scored targets: x the val split's targets / 8 GPUs
        # is a linear projection of a record's eval (CaseOps val: 47.85M targets)
        eval_s_per_m_targets=round(timed_ms / 1000 / (targets / 1e6), 2) if timed_ms and targets else None,
        errors=[x for x in texts if x.startswith(("error:", "Traceback"))][:5],
        compile_cache_line=next((x for x in texts if x.startswith("compile_cache:")), ""),
    )


def gpu_tests(out: Path) -> dict:
    rc, lines = run_logged(
        [PY, "-m", "pytest", "-v", "-rs", str(REPO / "tests" / "test_gpu.py")], out / "tests.txt"
    )
    tail = [text for _, text in lines if re.search(r"\d+ (passed|failed|skipped|error)", text)]
    each = {
        m.group(1): m.group(2)
        for _, text in lines
        if (m := re.match(r"\S+::(\S+) (PASSED|FAILED|SKIPPED|ERROR)", text))
    }
    return dict(rc=rc, result=tail[-1].strip("= ") if tail else "no result line (killed?)", tests=each)


def write_report(out: Path, r: dict) -> None:
    md = [f"# GPU report {r['date']}", "", f"Command: `{r['command']}`", ""]
    if r.get("skipped_at_deadline"):
        md += [f"Not run, the --deadline had passed: {', '.join(r['skipped_at_deadline'])}", ""]
    if "env" in r:
        e = r["env"]
        md += [
            "## Device",
            "",
            markdown_table(
                [{k: e.get(k, "") for k in ("device", "gpus", "driver", "torch", "cuda", "python", "cpus")}],
                ["device", "gpus", "driver", "torch", "cuda", "python", "cpus"],
            ),
            "",
        ]
        if e["missing"]:
            md += [
                f"Missing packages: {', '.join(e['missing'])} (carry wheels in .whl/; see the tool's docstring)",
                "",
            ]
    if "bench" in r:
        b = r["bench"]
        cols = [
            c
            for c in (
                "config",
                "micro_batch",
                "compile_s",
                "micro_step_ms",
                "optimizer_ms",
                "train_tokens_per_s",
                "mfu",
                "peak_mem_gib",
                "sliding_tokens_per_s",
                "ttt3_tokens_per_s",
                "export_s",
            )
            if c in b
        ]
        md += [
            "## Throughput (tools/bench_speed.py)",
            "",
            markdown_table([b], cols) if b["rc"] == 0 else f"failed: rc {b['rc']}",
            "",
        ]
        if b.get("attention"):
            md += [
                "### Attention kernels: one layer's forward + backward at the training shapes",
                "",
                markdown_table(
                    b["attention"],
                    ["attn", "doc_attention", "compile_s", "fwd_bwd_ms", "per_micro_step_ms", "error"],
                ),
                "",
            ]
    if "profile" in r:
        p = r["profile"]
        md += [
            f"## Top kernels ({p.get('steps')} micro-steps of {p.get('micro_batch')}, {p.get('timed')} time "
            f"{p.get('ms_per_step')} ms per micro-step; raw table in profile.txt)",
            "",
        ]
        md += [
            markdown_table(p["top"], ["kernel", "calls", "ms_per_step", "share"])
            if p["rc"] == 0
            else f"failed: rc {p['rc']}",
            "",
        ]
    runs = [k for k in ("train", "train_warm") if k in r]
    if len(runs) == 2:
        names = list(dict.fromkeys([*r["train"]["phases"], *r["train_warm"]["phases"]]))
        md += [
            "## Phases, fresh and warm compile cache (seconds)",
            "",
            markdown_table(
                [
                    dict(
                        phase=k,
                        fresh=r["train"]["phases"].get(k, ""),
                        warm=r["train_warm"]["phases"].get(k, ""),
                    )
                    for k in names
                ],
                ["phase", "fresh", "warm"],
            ),
            "",
        ]
    for key in runs:
        t = r[key]
        md += [
            f"## Training run{' (warm compile cache)' if key == 'train_warm' else ''} (`{t['cmd']}`, preset "
            f"{t['preset']}, {r['train_seconds']} s of training, rc {t['rc']}, "
            f"COMPILE_CACHE_DIR={t['compile_cache'] or '(unset)'})",
            "",
        ]
        md += [
            markdown_table(
                [
                    dict(
                        steps=t["steps"],
                        step_avg_ms=t["step_avg_ms"],
                        final_val_bpb=t["final_val_bpb"],
                        bytes_total=t["bytes_total"],
                        wall_s=t["wall_s"],
                    )
                ],
                ["steps", "step_avg_ms", "final_val_bpb", "bytes_total", "wall_s"],
            ),
            "",
        ]
        if t["eval_ms"]:
            md += [
                f"### Timed eval (TTT {t['ttt_mode']}): {t['eval_targets']} targets, "
                f"{t['eval_s_per_m_targets']} s per million targets on this device",
                "",
                markdown_table(
                    [{k: round(v / 1000, 2) for k, v in t["eval_ms"].items()}], list(t["eval_ms"])
                ),
                "",
                f"TTT: `{json.dumps(t['ttt'])}`",
                "",
            ]
        md += [
            "### Phases (seconds)",
            "",
            markdown_table([dict(phase=k, seconds=v) for k, v in t["phases"].items()], ["phase", "seconds"]),
            "",
        ]
        rc = t["recompiles"]
        md += [
            f"### Recompiles: {rc['total']} ({rc['after_training_began']} after training began) "
            f"{json.dumps(rc['by_function'])}"
            + "".join(f"; {k}: {v}" for k, v in rc.items() if k.endswith("_compiles")),
            "",
            t["compile_cache_line"],
            "",
        ]
        md += [
            "### Timeline (arrival of each marker line)",
            "",
            markdown_table(t["timeline"], ["at_s", "since_prev_s", "line"]),
            "",
        ]
        if t["errors"]:
            md += ["Errors: " + " / ".join(t["errors"]), ""]
    if "tests" in r:
        md += [
            f"## GPU tests (pytest tests/test_gpu.py): {r['tests']['result']}",
            "",
            *(f"- {name}: {outcome}" for name, outcome in r["tests"]["tests"].items()),
            "",
        ]
    (out / "report.md").write_text("\n".join(md))
    (out / "report.json").write_text(json.dumps(r, indent=1, default=str))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="CPU-sized: tiny config, a few seconds of training")
    p.add_argument("--out", type=Path, help="output folder (default results/gpu_report_<date>[_tiny])")
    p.add_argument(
        "--train-seconds", type=float, help="training wallclock of the run (default 120; --tiny 3)"
    )
    p.add_argument("--nproc", type=int, default=max(torch.cuda.device_count(), 1), help="torchrun processes")
    p.add_argument("--profile-steps", type=int, default=5, help="micro-steps in the profiler trace")
    p.add_argument(
        "--warm-rerun",
        action="store_true",
        help="train twice on one emptied COMPILE_CACHE_DIR "
        "(.compile_cache/gpu_report): the phase timeline with a cold and with a warm compile cache",
    )
    p.add_argument("--skip", default="", help=f"comma-separated steps to leave out: {','.join(STEPS)}")
    p.add_argument(
        "--preset",
        help="the training run's knobs: configs/NAME.env (default: train_gpt.py's, the r23 record)",
    )
    p.add_argument(
        "--deadline",
        type=float,
        help="seconds for the whole report: a step running then is killed, "
        "later ones are skipped (a lent device machine's command limit, less its start-up)",
    )
    p.add_argument("--tar", type=Path, help="also pack the output folder into this .tar.gz (a device's $OUT)")
    p.add_argument("--profile-only", help=argparse.SUPPRESS)  # internal: the profiler's own process
    return p


def main() -> None:
    p = parser()
    args = p.parse_args()
    sys.path.insert(0, str(REPO))
    if args.profile_only:
        return profile_steps(args.profile_only, args.profile_steps, args.out)
    skip = set(filter(None, args.skip.split(",")))
    if "train" in skip:
        skip.add("train_warm")
    if skip - set(STEPS) - {"train_warm"}:
        p.error(f"--skip: unknown step(s) {sorted(skip - set(STEPS))}; steps: {','.join(STEPS)}")
    if args.preset and not (REPO / "configs" / f"{args.preset}.env").exists():
        p.error(f"--preset {args.preset}: no configs/{args.preset}.env")
    if args.deadline is not None:
        DEADLINE[0] = time.perf_counter() + args.deadline
    out = (
        args.out
        or REPO / "results" / f"gpu_report_{datetime.date.today().isoformat()}{'_tiny' if args.tiny else ''}"
    )
    out.mkdir(parents=True, exist_ok=True)
    default_seconds = 3.0 if args.tiny else 120.0
    seconds = default_seconds if args.train_seconds is None else args.train_seconds
    r = dict(
        command=" ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
        tiny=args.tiny,
        train_seconds=seconds,
        preset=args.preset or "(defaults: r23)",
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )
    work = [
        ("env", lambda: env_info(out)),
        ("bench", lambda: bench(out, args.tiny)),
        ("profile", lambda: profile(out, args.tiny, args.profile_steps)),
        ("train", lambda: train_run(out, args.tiny, seconds, args.nproc, "report_train", cache, args.preset)),
        (
            "train_warm",
            lambda: train_run(out, args.tiny, seconds, args.nproc, "report_train_warm", cache, args.preset),
        ),
        ("tests", lambda: gpu_tests(out)),
    ]
    cache = REPO / ".compile_cache" / "gpu_report" if args.warm_rerun else None
    if cache:
        shutil.rmtree(cache, ignore_errors=True)
    else:
        skip.add("train_warm")
    try:
        for name, fn in work:
            if name in skip:
                continue
            if (seconds_left() or 1.0) <= 0:
                r.setdefault("skipped_at_deadline", []).append(name)
                continue
            t = time.perf_counter()
            print(f"gpu_report: {name} ...", flush=True)
            r[name] = fn()
            print(f"gpu_report: {name} done in {time.perf_counter() - t:.1f}s", flush=True)
            write_report(out, r)  # after every step, so a step that hangs leaves the others' results
        write_report(out, r)
    finally:
        if args.tar:
            with tarfile.open(args.tar, "w:gz") as tar:
                tar.add(out, arcname=out.name)
            print(f"gpu_report: packed {out} into {args.tar}", flush=True)
    print(f"gpu_report: {out}/report.md")
    print((out / "report.md").read_text())


if __name__ == "__main__":
    main()
