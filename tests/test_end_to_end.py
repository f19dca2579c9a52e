"""The script as users run it: python3 and torchrun, logs, artifact accounting, eval-only, packing."""

import os
import re
import subprocess
import sys

import pytest

from conftest import PY, REPO, make_env, run_script, summary, tg

sys.path.insert(0, str(REPO / "tools"))
from pack_script import same_program  # noqa: E402


def finals(text: str) -> dict:
    return dict(re.findall(r"^(\S+_exact) (val_loss:\S+ val_bpb:\S+)", text, re.M))


def losses(text: str) -> list[float]:
    return [float(v) for v in re.findall(r"^step:\d+/\d+ train_loss:(\S+)", text, re.M)]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, small_data):
    cwd = tmp_path_factory.mktemp("smoke")
    # a looped pass that joins halfway: the artifact must be scored in the stage training ended in
    env = make_env(
        small_data,
        RUN_ID="smoke",
        ARTIFACT_PATH=cwd / "model.ptz",
        VAL_LOSS_EVERY=4,
        LOOP_START=1,
        LOOP_END=1,
        LOOP_REPEATS=1,
        LOOP_ENABLE_AT=0.5,
        MATRIX_LRR=0.1,
    )  # a typo, warned about
    proc = run_script(env, cwd)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return cwd, env, proc.stdout


def test_smoke_run_logs_the_official_lines(smoke):
    cwd, _, out = smoke
    log = (cwd / "logs" / "smoke.txt").read_text()
    assert log.startswith('"""\nParameter Golf')  # the log opens with the full source
    for line in (
        "model_params:",
        "world_size:1 grad_accum_steps:8 compile:0",
        "resolved: unique_layers:3 embed_wd:",
        "step:0/6 val_loss:",
        "step:4/6 val_loss:",
        "step:6/6 val_loss:",
        "recurrence:stage 1 active_layers:4 step:3",
        "eval_model: stage 1, 4 of 4 logical layers active",
        "late_qat:enabled",
        "weights:applying ema",
        "DIAGNOSTIC post_ema",
        "final_int6_roundtrip val_loss:",
        "final_int6_sliding_window val_loss:",
        "legal_ttt val_loss:",
        "final_int8_zlib_roundtrip_exact",
        "compliance:ttt_legal PASS",
        "compliance:train_val_disjoint PASS",
        "compliance:eval_time PASS",
        "warning: MATRIX_LRR is not a knob and is ignored; did you mean MATRIX_LR?",
    ):
        assert line in out and line in log, line
    assert "compliance:full_val FAIL" in out  # VAL_MAX_TOKENS scores a prefix: flagged as not a record
    assert (
        log.rstrip().splitlines()[-1] == "final_int8_zlib_roundtrip_exact " + finals(out)["legal_ttt_exact"]
    )
    assert len(finals(out)) == 4 and len(losses(out)) == 6
    s = summary(cwd, "smoke")
    assert s["final"]["stage"] == "ttt" and s["train"]["steps"] == 6 and s["seed"] == 1337
    assert set(s["eval"]["results"]) == {"roundtrip", "sliding", "ttt"}


def test_budget_accounting_equals_bytes_on_disk(smoke):
    """The budget counts the bytes a record ships: the model on disk plus the packed train_gpt.py that
    tools/package_record.py writes by default (CODE_SHIPPED=raw counts the readable source instead)."""
    cwd, env, out = smoke
    model = int(re.search(r"^Serialized model int6\+\w+: (\d+) bytes", out, re.M).group(1))
    code, form, raw = re.search(r"^Code size: (\d+) bytes \((\w+): .* raw source (\d+)\)", out, re.M).groups()
    total = int(re.search(r"^Total submission size int6\+\w+: (\d+) bytes", out, re.M).group(1))
    source = (REPO / "train_gpt.py").read_text()
    assert model == os.path.getsize(env["ARTIFACT_PATH"]) and int(raw) == len(source.encode())
    assert form == "packed" and int(code) == len(tg.packed_code(source).encode())
    assert total == model + int(code) and summary(cwd, "smoke")["bytes"]["total"] == total
    h = tg.Hyperparameters.from_env({"CODE_SHIPPED": "raw"})
    assert tg.shipped_code_bytes(source, h) == (len(source.encode()), "raw")
    packed = tg.packed_code(source)
    assert tg.shipped_code_bytes(packed, h) == (len(packed.encode()), "packed (this file)")


def test_code_bytes_are_the_files_raw_bytes(tmp_path):
    crlf = tmp_path / "train_gpt.py"
    crlf.write_bytes((REPO / "train_gpt.py").read_bytes().replace(b"\n", b"\r\n"))
    assert len(tg.read_source(str(crlf)).encode()) == crlf.stat().st_size  # read_text() counts each CRLF as 1
    assert "read_source(__file__)" in (REPO / "train_gpt.py").read_text()  # what main() hands to run()


def test_same_seed_same_run(smoke, tmp_path):
    _, env, out = smoke
    proc = run_script({**env, "RUN_ID": "again", "ARTIFACT_PATH": str(tmp_path / "m.ptz")}, tmp_path)
    assert losses(proc.stdout) == losses(out) and finals(proc.stdout) == finals(out)


def test_torchrun_two_processes_match_one(smoke, tmp_path):
    _, env, out = smoke
    proc = run_script({**env, "RUN_ID": "two", "ARTIFACT_PATH": str(tmp_path / "m.ptz")}, tmp_path, nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "world_size:2 grad_accum_steps:4" in proc.stdout
    assert losses(proc.stdout) == pytest.approx(losses(out), abs=2e-4)
    for key, value in finals(out).items():
        bpb = float(value.split("val_bpb:")[1])
        assert float(finals(proc.stdout)[key].split("val_bpb:")[1]) == pytest.approx(bpb, abs=2e-3), key


def test_eval_only_reproduces_the_score_from_the_artifact(smoke, tmp_path):
    _, env, out = smoke
    proc = run_script(
        {**env, "RUN_ID": "verify", "EVAL_ONLY_ARTIFACT": env["ARTIFACT_PATH"], "NUM_LAYERS": "9"}, tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "eval_only:" in proc.stdout and "step:" not in proc.stdout  # architecture from the artifact
    assert finals(proc.stdout) == finals(out)
    assert "compliance:train_time SKIP" in proc.stdout


def test_eval_only_refuses_a_broken_artifact(smoke, tmp_path):
    _, env, _ = smoke
    broken = tmp_path / "cut.ptz"
    broken.write_bytes(open(env["ARTIFACT_PATH"], "rb").read()[:-10])
    proc = run_script({**env, "EVAL_ONLY_ARTIFACT": str(broken)}, tmp_path)
    assert proc.returncode != 0 and "cut.ptz: sha256 mismatch" in proc.stderr


def test_packed_script_behaves_identically(smoke, tmp_path):
    _, env, out = smoke
    packed = tmp_path / "train_gpt.py"
    subprocess.run(
        [PY, str(REPO / "tools" / "pack_script.py"), "--output", str(packed)], check=True, capture_output=True
    )
    assert same_program(
        packed.read_text(), (REPO / "train_gpt.py").read_text()
    )  # comments/docstrings dropped
    proc = run_script(
        {**env, "RUN_ID": "packed", "ARTIFACT_PATH": str(tmp_path / "m.ptz")}, tmp_path, script=packed
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert losses(proc.stdout) == losses(out) and finals(proc.stdout) == finals(out)
    assert f"Code size: {packed.stat().st_size} bytes" in proc.stdout  # it pays its own, packed, size


def test_full_gptq_reads_training_data_only_inside_the_cap(small_data, tmp_path):
    """Far more calibration batches than the 4-s reserve holds: calibration reads until the cap comes,
    then stops (logged) instead of reading late, however slow this machine is."""
    env = make_env(
        small_data,
        RUN_ID="gptq",
        ARTIFACT_PATH=tmp_path / "m.ptz",
        QUANT_METHOD="full",
        ITERATIONS=10000,
        MAX_WALLCLOCK_SECONDS=12,
        GPTQ_RESERVE_SECONDS=4,
        GPTQ_CALIB_BATCHES=100000,
        TTT_ENABLED=0,
        EVAL_SLIDING=0,
        WARMDOWN_ITERS=20,
    )
    proc = run_script(env, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stop = float(re.search(r"stopping_early: wallclock_cap train_time:(\d+)ms", proc.stdout).group(1))
    calib = re.search(
        r"gptq:calibrated 19 matrices on (\d+)/100000 batches/rank, "
        r"last training-data read at train_time:(\d+)ms",
        proc.stdout,
    )
    n_read, last_read = int(calib.group(1)), float(calib.group(2))
    assert 0 < n_read < 100000 and "gptq:calibration stopped at the 12s training cap" in proc.stdout
    assert stop < last_read <= 12000 and "compliance:train_time PASS" in proc.stdout
    assert summary(tmp_path, "gptq")["train"]["train_ms"] == pytest.approx(last_read, abs=1)


def test_over_budget_fails_loudly_or_fits(smoke, tmp_path):
    _, env, out = (
        smoke  # AUTO_FIT=1 may have spent spare bytes on a finer grid: take the configured plan's size
    )
    start = int(re.search(r"^auto_fit:step 1 start plan:\S+ bytes:(\d+) ", out, re.M).group(1))
    total = start + int(re.search(r"^Code size: (\d+) bytes", out, re.M).group(1))
    assert re.search(r"^auto_fit:candidate .* calib_loss:.*^budget:PASS", out, re.M | re.S)  # it looked
    base = {
        **env,
        "TTT_ENABLED": "0",
        "EVAL_SLIDING": "0",
        "BYTE_BUDGET": str(int(total * 0.97)),
        "FINAL_MODEL_PATH": "",
    }
    proc = run_script(
        {**base, "RUN_ID": "over", "AUTO_FIT": "0", "ARTIFACT_PATH": str(tmp_path / "a.ptz")}, tmp_path
    )
    assert proc.returncode == 0 and "budget:FAIL" in proc.stdout and "OVER THE CAP" in proc.stdout
    assert not (tmp_path / "final_model.pt").exists()  # FINAL_MODEL_PATH="" saves nothing
    proc = run_script(
        {**base, "RUN_ID": "fit", "ARTIFACT_PATH": str(tmp_path / "b.ptz")}, tmp_path
    )  # AUTO_FIT=1
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "budget:PASS" in proc.stdout and re.search(
        r"^auto_fit:step 2 k x2\.000 .* elapsed:", proc.stdout, re.M
    )
    assert re.search(
        r"^quant:plan attn=int6@k\d.* calib_loss float:\S+ quantized:\S+ \([+-]", proc.stdout, re.M
    )
    fitted = int(re.search(r"^Total submission size int\d\+\w+: (\d+) bytes", proc.stdout, re.M).group(1))
    assert fitted <= int(total * 0.97)


def test_phases_announce_themselves_in_order(smoke):
    cwd, _, out = smoke
    phases = re.findall(r"^phase:(\w+) t:([\d.]+)s$", (cwd / "logs" / "smoke.txt").read_text(), re.M)
    order = ["data", "model", "train", "export", "eval_load", "eval", "done"]
    assert [p for p, _ in phases if p in order] == order
    times = [float(t) for _, t in phases]
    assert times == sorted(times) and re.findall(r"^phase:\w+", out, re.M) == [
        f"phase:{p}" for p, _ in phases
    ]


def test_a_second_compiled_run_loads_its_graphs_from_the_compile_cache(smoke, tmp_path):
    """COMPILE_CACHE_DIR: the first run fills it, the second (a fresh process) compiles nothing. Eval-only
    runs of the smoke artifact (one inference graph) keep this affordable on a CPU."""
    _, env, _ = smoke
    env = {
        **env,
        "EVAL_ONLY_ARTIFACT": env["ARTIFACT_PATH"],
        "COMPILE": "1",
        "COMPILE_CACHE_DIR": str(tmp_path / "cache"),
        "TTT_ENABLED": "0",
        "EVAL_SLIDING": "0",
        "VAL_MAX_TOKENS": "1024",
    }
    counts = []
    for run in ("cold", "warm"):
        proc = run_script({**env, "RUN_ID": run}, tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        line = re.search(r"^compile_cache:(\S+) (.*)$", proc.stdout, re.M)
        assert line and line.group(1) == str(tmp_path / "cache"), proc.stdout[-2000:]
        counts.append({k: int(v) for k, v in re.findall(r"(\w+):(\d+)", line.group(2))})
    assert counts[0]["fx_graph_misses"] > 0 and counts[0]["fx_graph_hits"] == 0
    assert counts[1]["fx_graph_hits"] == counts[0]["fx_graph_misses"] and counts[1]["fx_graph_misses"] == 0
    assert "compile_cache:" not in smoke[2]  # eager runs (COMPILE=0 on a CPU) report nothing


def test_export_from_checkpoint_reproduces_the_run(smoke, tmp_path):
    cwd, env, out = smoke
    ckpt = cwd / "final_model.pt"
    assert "final_model: final_model.pt (post-ema float weights" in out
    proc = run_script(
        {**env, "RUN_ID": "reexport", "EXPORT_FROM": str(ckpt), "ARTIFACT_PATH": str(tmp_path / "m.ptz")},
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "step:" not in proc.stdout and "export_from:" in proc.stdout
    assert (tmp_path / "m.ptz").read_bytes() == open(env["ARTIFACT_PATH"], "rb").read()
    assert finals(proc.stdout) == finals(out)
    proc = run_script({**env, "EXPORT_FROM": str(ckpt), "MODEL_DIM": "32"}, tmp_path)
    assert proc.returncode != 0 and "the checkpoint has MODEL_DIM=64, this run MODEL_DIM=32" in proc.stderr
    proc = run_script({**env, "EXPORT_FROM": env["ARTIFACT_PATH"]}, tmp_path)
    assert proc.returncode != 0 and "not a pgolf-float-1 checkpoint" in proc.stderr
    proc = run_script({**env, "EXPORT_FROM": str(ckpt), "QUANT_METHOD": "full"}, tmp_path)
    assert proc.returncode != 0 and "QUANT_METHOD=full needs Hessians" in proc.stderr
