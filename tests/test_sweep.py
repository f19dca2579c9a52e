"""tools/sweep.py: a grid x seeds sweep end to end on a tiny CPU config, resumed after a kill."""

import json
import os
import signal
import subprocess
import time

from conftest import PY, REPO, TINY

SWEEP = str(REPO / "tools" / "sweep.py")


def sweep(args, cwd, **kw):
    return subprocess.run([PY, SWEEP, *args], cwd=cwd, capture_output=True, text=True, **kw)


def write_base(path, data):
    tiny = {
        **TINY,
        **data,
        "ITERATIONS": 2,
        "WARMDOWN_ITERS": 2,
        "TTT_ENABLED": 0,
        "EVAL_SLIDING": 0,
        "VAL_MAX_TOKENS": 1024,
    }
    path.write_text("# tiny CPU config\n" + "".join(f"{k}={v}\n" for k, v in tiny.items()))


def test_sweep_runs_resumes_and_compares(small_data, tmp_path):
    base = tmp_path / "tiny.env"
    write_base(base, small_data)
    out = tmp_path / "sweep"
    args = [
        "--base",
        str(base),
        "--grid",
        "MATRIX_LR=0.01,0.05",
        "--seeds",
        "1,2",
        "--out",
        str(out),
        "--baseline",
        "MATRIX_LR=0.01",
    ]
    # killed once the first of its 4 runs has finished
    first = subprocess.Popen(
        [PY, SWEEP, *args],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    deadline = time.time() + 600
    while not (out / "results.jsonl").exists() or not (out / "results.jsonl").read_text().strip():
        assert first.poll() is None and time.time() < deadline, first.stdout.read() if first.stdout else ""
        time.sleep(0.2)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    done_first = [json.loads(l)["id"] for l in (out / "results.jsonl").read_text().splitlines()]
    assert len(done_first) == 1

    proc = sweep(args, tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "sweep: 4 runs, 1 already done, 3 to run" in proc.stdout
    assert proc.stdout.count("sweep: start ") == 3 and done_first[0] not in "".join(
        l for l in proc.stdout.splitlines() if l.startswith("sweep: start")
    )
    rows = [json.loads(l) for l in (out / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and {r["status"] for r in rows} == {"ok"} and len({r["id"] for r in rows}) == 4
    assert {(r["grid"]["MATRIX_LR"], r["seed"]) for r in rows} == {
        ("0.01", 1),
        ("0.01", 2),
        ("0.05", 1),
        ("0.05", 2),
    }
    assert all(r["env"]["MATRIX_LR"] == r["grid"]["MATRIX_LR"] and r["val_bpb"] > 0 for r in rows)
    for r in rows:  # each run's log, summary and artifact stay in its own folder
        assert (out / "runs" / r["id"] / "logs" / f"{r['id']}.json").exists()
    table = json.loads((out / "table.json").read_text())
    assert (
        len(table) == 2 and all(t["seeds"] == 2 for t in table) and table[0]["val_bpb"] <= table[1]["val_bpb"]
    )
    other = next(t for t in table if t["grid"] == {"MATRIX_LR": "0.05"})
    assert 0 <= other["welch_p"] <= 1 and "| 0.01 | 2 |" in proc.stdout and "baseline" in proc.stdout
    assert (out / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    again = sweep(args, tmp_path, timeout=300)  # everything done: nothing runs, same table
    assert "sweep: 4 runs, 4 already done, 0 to run" in again.stdout and "sweep: start" not in again.stdout


def test_sweep_refuses_bad_input_before_running(small_data, tmp_path):
    base = tmp_path / "tiny.env"
    write_base(base, small_data)
    out = tmp_path / "never"
    common = ["--base", str(base), "--out", str(out)]
    proc = sweep([*common, "--grid", "MATRIX_LRR=0.01,0.02"], tmp_path)
    assert (
        proc.returncode != 0
        and "MATRIX_LRR is not a train_gpt.py knob (did you mean MATRIX_LR?)" in proc.stderr
    )
    proc = sweep([*common, "--grid", "NUM_LAYERS=3,abc"], tmp_path)
    assert proc.returncode != 0 and "NUM_LAYERS='abc'" in proc.stderr
    proc = sweep([*common, "--grid", "MATRIX_LR=0.01,0.02", "--baseline", "MATRIX_LR=0.03"], tmp_path)
    assert proc.returncode != 0 and "is not a point of the grid" in proc.stderr
    (tmp_path / "bad.env").write_text("NUM_LAYERS 3\n")
    proc = sweep(["--base", str(tmp_path / "bad.env"), "--out", str(out)], tmp_path)
    assert proc.returncode != 0 and "bad.env:1: expected KEY=VALUE" in proc.stderr
    assert not out.exists()
