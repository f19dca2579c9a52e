"""tools/: submission aggregation and its t-test, record packaging and verification, benchmarks, plots."""

import json
import math
import shutil
import statistics
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest

from conftest import PY, REPO, make_env, run_script

sys.path.insert(0, str(REPO / "tools"))
import package_record  # noqa: E402
import plot_curve  # noqa: E402
import submission  # noqa: E402


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, small_data):
    """Two seeds of one tiny config that score the full val split (so compliance passes)."""
    cwd = tmp_path_factory.mktemp("runs")
    paths = []
    for seed in (1, 2):
        env = make_env(small_data, SEED=seed, RUN_ID=f"seed{seed}", ARTIFACT_PATH=cwd / f"m{seed}.ptz", VAL_MAX_TOKENS=0,
                       EVAL_SLIDING=0, ITERATIONS=4)
        proc = run_script(env, cwd)
        assert proc.returncode == 0, proc.stderr[-2000:]
        paths.append(cwd / "logs" / f"seed{seed}.json")
    return paths


ARGS = dict(name="test", author="a", github_id="g", blurb="b", date="2026-11-22", sota_val_loss=None,
            sota_val_losses=None, margin_nats=0.005, alpha=0.01)


def test_aggregation_and_one_sample_t_test_by_hand(two_runs):
    runs = submission.load_runs(two_runs)
    losses = [r["final"]["val_loss"] for r in runs]
    sota = statistics.fmean(losses) + 0.2
    sub = submission.build_submission(runs, Namespace(**{**ARGS, "sota_val_loss": sota}))
    assert sub["seeds"] == [1, 2] and sub["val_loss"] == pytest.approx(sum(losses) / 2)
    assert sub["val_loss_std"] == pytest.approx(abs(losses[0] - losses[1]) / math.sqrt(2))
    assert sub["bytes_total"] == max(r["bytes"]["total"] for r in runs) and sub["final_stage"] == "ttt"
    # n = 2: t = (mean - (sota - 0.005)) / (s / sqrt 2), one degree of freedom: p = 1/2 + atan(t)/pi
    t = (sub["val_loss"] - (sota - 0.005)) / (sub["val_loss_std"] / math.sqrt(2))
    sig = sub["significance"]
    assert sig["t"] == pytest.approx(t) and sig["df"] == 1
    assert sig["p_value"] == pytest.approx(0.5 + math.atan(t) / math.pi) and sig["beats_sota"] == (sig["p_value"] < 0.01)


def test_welch_test_by_hand():
    ours, sota = [1.00, 1.02, 0.98], [1.10, 1.13, 1.07, 1.10]
    sig = submission.significance(ours, sota, 0.005)
    va, vb = statistics.variance(ours) / 3, statistics.variance(sota) / 4
    assert sig["t"] == pytest.approx((1.0 - (1.1 - 0.005)) / math.sqrt(va + vb))
    assert sig["df"] == pytest.approx((va + vb) ** 2 / (va ** 2 / 2 + vb ** 2 / 3))
    assert 0 < sig["p_value"] < 0.01 and sig["test"] == "Welch"
    assert submission.significance([1.2, 1.25], [1.1], 0.005)["p_value"] > 0.9  # worse than SOTA: no


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.update(config_hash="other"), "differ in config_hash"),
    (lambda s: s.update(code_sha256="other"), "differ in code_sha256"),
    (lambda s: s.update(seed=1), "repeated seeds"),
    (lambda s: s["compliance"]["full_val"].update(status="FAIL"), "compliance FAIL in full_val"),
])
def test_aggregation_refuses(two_runs, tmp_path, edit, message):
    bad = json.loads(two_runs[1].read_text())
    edit(bad)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(bad))
    with pytest.raises(submission.Refused, match=message):
        submission.load_runs([two_runs[0], path])


def cli_submission(two_runs, out: Path) -> Path:
    subprocess.run([PY, str(REPO / "tools" / "submission.py"), *map(str, two_runs), "--name", "n", "--author", "a",
                    "--github-id", "g", "--blurb", "b", "--out", str(out)], check=True, capture_output=True)
    return out


@pytest.mark.parametrize("packed", [False, True])
def test_package_writes_a_verified_folder(two_runs, tmp_path, packed):
    sub = cli_submission(two_runs, tmp_path / "submission.json")
    out = tmp_path / "records" / "x"
    proc = subprocess.run([PY, str(REPO / "tools" / "package_record.py"), "--submission", str(sub), "--runs",
                           *map(str, two_runs), "--out", str(out)] + (["--packed"] if packed else []),
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "submission.json", "train_gpt.py",
                                                      "train_seed1.log", "train_seed2.log"]
    folder_sub = json.loads((out / "submission.json").read_text())
    assert folder_sub["bytes_code"] == (out / "train_gpt.py").stat().st_size
    assert (folder_sub["bytes_code"] < 40_000) == packed and "val_bpb" in (out / "README.md").read_text()


def test_package_verification_rejects_bad_folders(two_runs, tmp_path):
    sub = cli_submission(two_runs, tmp_path / "submission.json")
    good = tmp_path / "good"
    subprocess.run([PY, str(REPO / "tools" / "package_record.py"), "--submission", str(sub), "--runs",
                    *map(str, two_runs), "--out", str(good)], check=True, capture_output=True)
    package_record.verify(good)

    def broken(name, change):
        folder = tmp_path / name
        shutil.copytree(good, folder)
        change(folder)
        return folder

    over = lambda f: (f / "submission.json").write_text(json.dumps(
        {**json.loads((f / "submission.json").read_text()), "bytes_model": 16_000_000,
         "bytes_total": 16_000_000 + json.loads((f / "submission.json").read_text())["bytes_code"]}))
    cases = {"missing README.md": lambda f: (f / "README.md").unlink(),
             "no log for seed 2": lambda f: (f / "train_seed2.log").unlink(),
             "> 16000000": over,
             "not the code the runs used": lambda f: (f / "train_gpt.py").write_text("print(1)\n"),
             "embedded source": lambda f: (f / "train_seed1.log").write_text("something else\n")}
    for message, change in cases.items():
        with pytest.raises(package_record.Rejected, match=message):
            package_record.verify(broken(message.split()[0] + str(len(message)), change))


def test_plot_parser_reads_a_real_log(two_runs):
    run = plot_curve.parse(two_runs[0].with_suffix(".txt").read_text())
    assert len(run["train"]) == 4 and set(run["stages"]) == {"DIAGNOSTIC", "roundtrip", "legal TTT"}


def test_speed_benchmark_runs_on_cpu(tmp_path):
    proc = subprocess.run([PY, str(REPO / "tools" / "bench_speed.py"), "--tiny", "--json", str(tmp_path / "s.json")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = json.loads((tmp_path / "s.json").read_text())["rows"][0]
    assert row["train_tokens_per_s"] > 0 and row["sliding_tokens_per_s"] > 0 and row["ttt3_tokens_per_s"] > 0
    assert row["artifact_bytes"] > 0 and "| config |" in proc.stdout
