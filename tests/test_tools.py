"""tools/: submission aggregation and its t-test, record packaging and verification, benchmarks, plots."""

import ast
import io
import json
import math
import shutil
import statistics
import subprocess
import tarfile
import sys
import tokenize
from argparse import Namespace
from pathlib import Path

import pytest

import torch

from conftest import PY, REPO, make_env, run_script, script_env, tg

sys.path.insert(0, str(REPO / "tools"))
import gpu_report  # noqa: E402
import pack_script  # noqa: E402
import package_record  # noqa: E402
import plot_curve  # noqa: E402
import submission  # noqa: E402


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, small_data):
    """Two seeds of one tiny config that score the full val split (so compliance passes)."""
    cwd = tmp_path_factory.mktemp("runs")
    paths = []
    for seed in (1, 2):
        env = make_env(
            small_data,
            SEED=seed,
            RUN_ID=f"seed{seed}",
            ARTIFACT_PATH=cwd / f"m{seed}.ptz",
            VAL_MAX_TOKENS=0,
            EVAL_SLIDING=0,
            ITERATIONS=4,
            EVAL_STRIDE=64,
            TTT_CHUNK_TOKENS=8192,
        )
        proc = run_script(env, cwd)
        assert proc.returncode == 0, proc.stderr[-2000:]
        paths.append(cwd / "logs" / f"seed{seed}.json")
    return paths


ARGS = dict(
    name="test",
    author="a",
    github_id="g",
    blurb="b",
    date="2026-11-22",
    sota_val_loss=None,
    sota_val_losses=None,
    margin_nats=0.005,
    alpha=0.01,
)


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
    assert sig["p_value"] == pytest.approx(0.5 + math.atan(t) / math.pi) and sig["beats_sota"] == (
        sig["p_value"] < 0.01
    )


def test_welch_test_by_hand():
    ours, sota = [1.00, 1.02, 0.98], [1.10, 1.13, 1.07, 1.10]
    sig = submission.significance(ours, sota, 0.005)
    va, vb = statistics.variance(ours) / 3, statistics.variance(sota) / 4
    assert sig["t"] == pytest.approx((1.0 - (1.1 - 0.005)) / math.sqrt(va + vb))
    assert sig["df"] == pytest.approx((va + vb) ** 2 / (va**2 / 2 + vb**2 / 3))
    assert 0 < sig["p_value"] < 0.01 and sig["test"] == "Welch"
    assert submission.significance([1.2, 1.25], [1.1], 0.005)["p_value"] > 0.9  # worse than SOTA: no


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda s: s.update(config_hash="other"), "differ in config_hash"),
        (lambda s: s.update(code_sha256="other"), "differ in code_sha256"),
        (lambda s: s.update(seed=1), "repeated seeds"),
        (lambda s: s["compliance"]["full_val"].update(status="FAIL"), "compliance FAIL in full_val"),
    ],
)
def test_aggregation_refuses(two_runs, tmp_path, edit, message):
    bad = json.loads(two_runs[1].read_text())
    edit(bad)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(bad))
    with pytest.raises(submission.Refused, match=message):
        submission.load_runs([two_runs[0], path])


def cli_submission(two_runs, out: Path) -> Path:
    subprocess.run(
        [
            PY,
            str(REPO / "tools" / "submission.py"),
            *map(str, two_runs),
            "--name",
            "n",
            "--author",
            "a",
            "--github-id",
            "g",
            "--blurb",
            "b",
            "--out",
            str(out),
        ],
        check=True,
        capture_output=True,
    )
    return out


@pytest.mark.parametrize("packed", [False, True])
def test_package_writes_a_verified_folder(two_runs, tmp_path, packed):
    sub = cli_submission(two_runs, tmp_path / "submission.json")
    out = tmp_path / "records" / "x"
    proc = subprocess.run(
        [
            PY,
            str(REPO / "tools" / "package_record.py"),
            "--submission",
            str(sub),
            "--runs",
            *map(str, two_runs),
            "--out",
            str(out),
        ]
        + ([] if packed else ["--raw"]),
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md",
        "submission.json",
        "train_gpt.py",
        "train_seed1.log",
        "train_seed2.log",
    ]
    folder_sub = json.loads((out / "submission.json").read_text())
    assert folder_sub["bytes_code"] == (out / "train_gpt.py").stat().st_size
    assert (folder_sub["bytes_code"] < 60_000) == packed and "val_bpb" in (out / "README.md").read_text()
    if packed:  # the default: the folder ships exactly the code bytes the runs' budget counted
        runs = [json.loads(r.read_text()) for r in two_runs]
        assert all(r["bytes"]["code"] == folder_sub["bytes_code"] for r in runs)
        assert folder_sub["bytes_total"] == max(r["bytes"]["total"] for r in runs)
    if (
        packed
    ):  # a packed script must pack the very program the runs used (its log embeds the readable source)
        (out / "train_gpt.py").write_text(tg.packed_code((REPO / "train_gpt.py").read_text() + "x = 1\n"))
        with pytest.raises(package_record.Rejected, match="does not pack the code the runs used"):
            package_record.verify(out)


TRICKY_LOCALS = """
x, k, counter = 10, 3, 0


def shadow(ys):
    doubled = [x * 2 for x in ys]  # the comprehension's x; the x returned is the global
    return doubled, x


def handler(v):
    try:
        ratio = 1 / v
    except ZeroDivisionError as e:
        ratio = str(e)
    return ratio


def debug(v):
    width = v + 1
    return f"{width=}"


def defaults(v, m=k):  # the default reads the global k, the body a local one
    k = v * m
    return k


def bump(v):
    global counter
    counter += v
    return counter


def outer(v):
    scale = 2

    def inner(w):
        return w * scale

    return inner(v)


def local_import(v):
    import math as mth

    root = mth.sqrt(v)
    del v
    return (total := root + 1), total
"""


def test_packer_renames_locals_without_changing_behaviour():
    tree = tg.short_locals(ast.parse(TRICKY_LOCALS))
    renamed = ast.unparse(tree)
    before, after = {}, {}
    exec(TRICKY_LOCALS, before)
    exec(renamed, after)
    for name, arg in [("shadow", [1, 2]), ("handler", 0), ("handler", 4), ("debug", 1), ("defaults", 2)]:
        assert before[name](arg) == after[name](arg), name
    for name in ("bump", "outer", "local_import"):
        assert before[name](4) == after[name](4), name
    module = tg.code_shape(compile(TRICKY_LOCALS, "a", "exec"))
    assert module == tg.code_shape(compile(renamed, "b", "exec"))
    body = {f.name: ast.unparse(f) for f in tree.body if isinstance(f, ast.FunctionDef)}
    assert "doubled" in body["shadow"]  # renaming the comprehension's x would read an unbound local: kept
    assert "global counter" in body["bump"] and "scale = 2" in body["outer"]  # skipped: global, inner scope
    assert (
        "ratio" not in body["handler"]
        and "width =" not in body["debug"]
        and "root" not in body["local_import"]
    )
    assert "mth" in body["local_import"] and "m=k" in body["defaults"].replace(" ", "")


def test_packer_strips_comments_and_docstrings():
    """The packed payload is the same program minified: smaller than packing the source verbatim, it
    compiles, and has no comment and no docstring on the module or any class or function."""
    source = (REPO / "train_gpt.py").read_text()
    packed = tg.packed_code(source)
    verbatim = tg.base64.b85encode(tg.compress(source.encode(), "brotli"))
    assert len(packed.encode()) < len(verbatim)  # even without the wrapper around the verbatim payload
    payload = pack_script.unpack(packed)
    compile(payload, "packed", "exec")
    assert pack_script.same_program(packed, source)
    assert not any(
        t.type == tokenize.COMMENT for t in tokenize.generate_tokens(io.StringIO(payload).readline)
    )
    assert all(
        ast.get_docstring(n) is None
        for n in ast.walk(ast.parse(payload))
        if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
    )


def test_package_verification_rejects_bad_folders(two_runs, tmp_path):
    sub = cli_submission(two_runs, tmp_path / "submission.json")
    good = tmp_path / "good"
    subprocess.run(
        [
            PY,
            str(REPO / "tools" / "package_record.py"),
            "--submission",
            str(sub),
            "--runs",
            *map(str, two_runs),
            "--out",
            str(good),
        ],
        check=True,
        capture_output=True,
    )
    package_record.verify(good)

    def broken(name, change):
        folder = tmp_path / name
        shutil.copytree(good, folder)
        change(folder)
        return folder

    def over(f):
        return (f / "submission.json").write_text(
            json.dumps(
                {
                    **json.loads((f / "submission.json").read_text()),
                    "bytes_model": 16_000_000,
                    "bytes_total": 16_000_000 + json.loads((f / "submission.json").read_text())["bytes_code"],
                }
            )
        )

    cases = {
        "missing README.md": lambda f: (f / "README.md").unlink(),
        "no log for seed 2": lambda f: (f / "train_seed2.log").unlink(),
        "> 16000000": over,
        "not the code the runs used": lambda f: (f / "train_gpt.py").write_text("print(1)\n"),
        "embedded source": lambda f: (f / "train_seed2.log").write_text("something else\n"),
    }
    for message, change in cases.items():
        with pytest.raises(package_record.Rejected, match=message):
            package_record.verify(broken(message.split()[0] + str(len(message)), change))


def test_plot_parser_reads_a_real_log(two_runs):
    run = plot_curve.parse(two_runs[0].with_suffix(".txt").read_text())
    assert len(run["train"]) == 4 and set(run["stages"]) == {"DIAGNOSTIC", "roundtrip", "legal TTT"}


def test_gpu_report_runs_end_to_end_on_cpu(small_data, tmp_path):
    """tools/gpu_report.py --tiny: versions, bench_speed, the profiler, a timed training run, the GPU tests
    (they skip here), and the report built from them."""
    out = tmp_path / "report"
    proc = subprocess.run(
        [
            PY,
            str(REPO / "tools" / "gpu_report.py"),
            "--tiny",
            "--out",
            str(out),
            "--train-seconds",
            "2",
            "--profile-steps",
            "2",
        ],
        env=script_env(small_data),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads((out / "report.json").read_text())
    assert (
        r["env"]["device"] == "cpu" and r["env"]["torch"] == torch.__version__ and r["env"]["missing"] == []
    )
    b = r["bench"]
    assert b["rc"] == 0 and b["config"] == "tiny" and b["train_tokens_per_s"] > 0 and b["micro_step_ms"] > 0
    assert b["sliding_tokens_per_s"] > 0 and b["ttt3_tokens_per_s"] > 0 and b["artifact_bytes"] > 0
    attn = {row["attn"]: row for row in b["attention"]}  # every kernel: timed, or why it cannot run on a CPU
    assert attn["sdpa"]["fwd_bwd_ms"] > 0 and attn["sdpa-flash"]["fwd_bwd_ms"] > 0
    # validate refuses each CUDA-only kernel on a CPU before it is tried (pick_attention's reasons: test_kernels)
    assert all("needs CUDA" in attn[k]["error"] for k in ("fa3", "flex", "fa4", "varlen")), attn
    prof = r["profile"]
    assert (
        prof["rc"] == 0
        and len(prof["top"]) == 25
        and prof["top"][0]["ms_per_step"] >= prof["top"][-1]["ms_per_step"]
    )
    assert "Self CPU" in (out / "profile.txt").read_text()
    t = r["train"]
    assert t["rc"] == 0 and t["steps"] > 0 and 0 < t["final_val_bpb"] < 10 and not t["errors"]
    order = ["startup", "data", "model", "train", "export", "eval_load", "eval", "done"]
    assert [k for k in t["phases"] if k in order] == order
    assert t["phases"]["train.training"] > 0 and t["phases"]["eval.timed"] > 0
    assert t["recompiles"]["total"] == 0  # eager on a CPU: nothing compiles
    assert t["phases"]["overhead"] > 0 and not (out / "report_train.ptz").exists()  # the artifact is not kept
    assert (out / "logs" / "report_train.txt").exists() and (out / "report_train.log").read_text().startswith(
        "[+"
    )
    assert "4 skipped" in r["tests"]["result"] and set(r["tests"]["tests"].values()) == {"SKIPPED"}
    assert (
        len(r["tests"]["tests"]) == 4
        and "test_compiled_flex_document_attention_matches_the_mask[0]" in r["tests"]["tests"]
    )
    assert (
        list(r["tests"]["tests"])[-1] == "test_record_config_pipeline"
    )  # the slow one last: a deadline cuts it alone
    md = (out / "report.md").read_text()
    for heading in (
        "## Device",
        "## Throughput",
        "### Attention kernels",
        "## Top kernels",
        "### Phases",
        "### Recompiles: 0",
        "### Timeline",
        "## GPU tests",
    ):
        assert heading in md, heading


def test_gpu_report_deadline_kills_the_running_step_skips_the_rest_and_still_packs(small_data, tmp_path):
    """A lent GPU gives 10 minutes a command and 8 files back: --deadline stops the report in time (the step
    running is killed, the later ones are listed as skipped) and --tar packs whatever was written."""
    out, tar = tmp_path / "report", tmp_path / "out" / "report.tar.gz"
    tar.parent.mkdir()
    proc = subprocess.run(
        [
            PY,
            str(REPO / "tools" / "gpu_report.py"),
            "--tiny",
            "--out",
            str(out),
            "--deadline",
            "3",
            "--skip",
            "profile",
            "--tar",
            str(tar),
        ],
        env=script_env(small_data),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads((out / "report.json").read_text())
    assert (
        r["env"]["device"] == "cpu"
        and r["bench"]["rc"] == -9
        and r["skipped_at_deadline"] == ["train", "tests"]
    )
    assert (out / "bench_speed.txt").read_text().rstrip().endswith("gpu_report: killed at the --deadline")
    with tarfile.open(tar) as t:
        assert {"report/report.md", "report/report.json", "report/bench_speed.txt"} <= set(t.getnames())
    assert "Not run, the --deadline had passed: train, tests" in (out / "report.md").read_text()


def test_gpu_report_runs_a_preset_on_the_embedded_corpus_at_its_vocabulary():
    env, data = gpu_report.run_env("top_1_0611", False, {"SEED": "7"})
    assert (
        data == ["--vocab-size", "8192", "--caseops"] and env["SEED"] == "7" and env["TTT_MODE"] == "phased"
    )
    assert env["DATA_PATH"].endswith("pdmix_sp8192_caseops") and env["TOKENIZER_PATH"].endswith(
        "pdmix_8192_bpe_caseops.model"
    )
    env, data = gpu_report.run_env("top_1_0611", True, {"VOCAB_SIZE": "512"})  # shrunk; the environment wins
    assert (
        data == ["--vocab-size", "512", "--caseops"]
        and env["MODEL_DIM"] == "64"
        and env["NUM_LAYERS"] == "11"
    )
    env, data = gpu_report.run_env(None, False, {"DATA_PATH": "/d", "TOKENIZER_PATH": "/t.model"})
    assert data == [] and env == {"DATA_PATH": "/d", "TOKENIZER_PATH": "/t.model"}  # train_gpt.py's defaults
    env, data = gpu_report.run_env(None, True, {})
    assert (
        data == ["--vocab-size", "1024"]
        and env["NUM_LAYERS"] == "2"
        and env["DATA_PATH"].endswith("pdmix_sp1024")
    )


def test_gpu_report_parses_phases_and_recompiles():
    lines = [
        (2.0, "phase:data t:0.0s"),
        (3.0, "phase:model t:1.0s"),
        (4.0, "phase:train t:2.0s"),
        (5.0, "[rank0]:V1125 [0/1] [__recompiles] Recompiling function newton_schulz in x.py:1"),
        (5.5, "[rank1]:V1125 [0/1] [__recompiles] Recompiling function newton_schulz in x.py:1"),
        (30.0, "step:1/9 train_loss:6.0 train_time:1000ms step_avg:1000.00ms"),
        (33.0, "V1125 [0/2] [__recompiles] Recompiling function forward in x.py:9"),
        (40.0, "step:9/9 train_loss:5.0 train_time:10000ms step_avg:1111.11ms"),
        (50.0, "phase:export t:48.0s"),
        (60.0, "phase:eval t:58.0s"),
        (61.0, "eval_compiles: 0 graphs compiled inside the timed eval"),
        (70.0, "eval_time: roundtrip:3000ms total:4000ms"),
        (71.0, "phase:done t:69.0s"),
        (72.0, "final"),
    ]
    ph = gpu_report.phases(lines)
    assert ph == {
        "startup": 2.0,
        "data": 1.0,
        "model": 1.0,
        "train": 46.0,
        "export": 10.0,
        "eval": 11.0,
        "done": 1.0,
        "train.compile_warmup": 25.0,
        "train.training": 10.0,
        "train.after_training": 11.0,
        "eval.untimed_warmup": 7.0,
        "eval.timed": 4.0,
        "total": 72.0,
        "overhead": 58.0,
    }
    rc = gpu_report.recompiles(lines)
    assert rc == dict(
        total=2, after_training_began=1, by_function={"newton_schulz": 1, "forward": 1}, eval_compiles=0
    )
    tl = gpu_report.timeline(lines)
    assert [p["at_s"] for p in tl] == [2.0, 3.0, 4.0, 30.0, 50.0, 60.0, 61.0, 70.0, 71.0]
    assert tl[3]["since_prev_s"] == 26.0


def test_script_env_inherits_the_parent_but_none_of_the_scripts_knobs(monkeypatch):
    """The subprocess gets PYTHONPATH, CUDA_*, LD_LIBRARY_PATH (a GPU image needs them), but a knob exported
    in the shell (NUM_LAYERS, WORLD_SIZE) never leaks into a test's run."""
    for k, v in dict(
        PYTHONPATH="/tmp/site",
        CUDA_HOME="/usr/local/cuda",
        LD_LIBRARY_PATH="/x",
        NUM_LAYERS="99",
        WORLD_SIZE="4",
        COMPILE_CACHE_DIR="/c",
    ).items():
        monkeypatch.setenv(k, v)
    env = script_env({"SEED": 7, "NUM_HEADS": "2"}, nproc=2)
    assert (env["PYTHONPATH"], env["CUDA_HOME"], env["LD_LIBRARY_PATH"]) == (
        "/tmp/site",
        "/usr/local/cuda",
        "/x",
    )
    assert not {"NUM_LAYERS", "WORLD_SIZE", "COMPILE_CACHE_DIR"} & set(env)
    assert (env["SEED"], env["NUM_HEADS"], env["OMP_NUM_THREADS"], env["PYTHONUNBUFFERED"]) == (
        "7",
        "2",
        "1",
        "1",
    )
