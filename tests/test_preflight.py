"""tools/preflight.py: per-rank GPU memory of a record run, traced on fake tensors on the CPU, the shrunk run's
graph counts, compliance lines and ranks-agree check, and the projected timeline (issue 29)."""

import json
import sys

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from conftest import REPO, tg

sys.path.insert(0, str(REPO / "tools"))
import preflight  # noqa: E402
from benchlib import read_env_file  # noqa: E402

H100 = preflight.LIMITS_GIB["H100"]
TOP = read_env_file(REPO / "configs" / "top_1_0611.env")
R23 = read_env_file(REPO / "configs" / "r23.env")


def phase(result: dict, name: str) -> dict:
    return next(p for p in result["phases"] if p["phase"] == name)


def test_tracer_counts_live_and_saved_bytes_exactly():
    """A 1024x1024 fp32 matmul chain: the live peak and the bytes saved for backward, to the byte."""
    tracer = preflight.MemoryTracer()
    mib = 2**20
    with FakeTensorMode(), tracer:
        w = torch.empty(256, 1024, requires_grad=True)  # 1 MiB
        x = torch.empty(1024, 1024)  # 4 MiB
        counter = preflight.SavedBytes(tracer)
        with counter.hooks():
            y = (x @ w.T).relu()  # 1 MiB for x @ w.T, 1 MiB for relu (saved: x, and relu's output)
        tracer.label("static", [w, x])
        assert counter.total() == 1 * mib  # relu's output; x is static
        tracer.phase()
        y.sum().backward()
        assert tracer.peak >= tracer.live
    assert tracer.by_label["static"] == 5 * mib


@pytest.fixture(scope="module")
def record():
    return preflight.preflight("defaults", {}, 8, preflight.CALIBRATION, False)


@pytest.fixture(scope="module")
def top_train():
    return preflight.preflight("top_1_0611", TOP, 8, preflight.CALIBRATION, False, ("train",))


def test_record_defaults_fit_80gb_in_every_phase(record):
    assert record["params"] == 26_928_220
    names = [p["phase"] for p in record["phases"]]
    assert names[:3] == ["train warm-up (snapshot live)", "train stage 0", "train stage 0 +QAT"]
    assert "chunk TTT train_rows" in names
    for p in record["phases"]:
        assert p["peak_gib"] < H100, p
    train = phase(record, "train stage 0")
    assert 25 < train["peak_gib"] < 40  # eager; 48 x 2048 tokens per rank, 11 layers
    assert train["saved_gib"] > 0.9 * (train["peak_gib"] - 1)  # the peak is the saved activations
    assert 0.1 < record["notes"]["warmup_snapshot_gib"] < 0.13  # ~120 MiB, through the warm-up only


def test_the_warmup_snapshot_is_freed_before_training_as_train_model_frees_it(record):
    """train_model deep-copies the weights before its compile warm-up and `del`s the copy once restored: the
    warm-up (every graph variant) holds the snapshot and no EMA yet, training the EMA and no snapshot."""
    warm = phase(record, "train warm-up (snapshot live)")
    assert warm["variants"] == ["stage 0", "stage 0 +QAT"]
    assert "warm-up snapshot" in warm["breakdown_gib"] and "ema" not in warm["breakdown_gib"]
    for p in record["phases"][1:]:
        assert "warm-up snapshot" not in p["breakdown_gib"], p
    assert "ema" in phase(record, "train stage 0")["breakdown_gib"]
    # WARMUP_STEPS=1 < 2 variants: the warm-up runs the last one only, as train_model's index does
    variants = [(0, None), (0, "qat")]
    assert preflight.warmup_variants(variants, 1) == [(0, "qat")]
    assert preflight.warmup_variants(variants, 20) == variants


def test_top_1_0611_training_fits_80gb_and_grows_with_each_recurrence_stage(top_train):
    stages = [p for p in top_train["phases"] if p["phase"].startswith("train stage")]
    assert [p["layers"] for p in stages] == [11, 14, 17]
    peaks = [p["peak_gib"] for p in stages]
    assert peaks == sorted(peaks) and peaks[-1] < H100
    gptq = phase(top_train, "GPTQ Hessians")
    # c_k and c_v share c_q's Hessian (one per distinct input: 67 names, 45 tensors), and each product is
    # added as the forward goes, so no layer's input outlives its layer (the peak was 17.8 GiB before)
    assert gptq["hessian_tensors"] == 67 and gptq["hessian_storages"] == 45
    assert gptq["peak_gib"] < 9


@pytest.mark.parametrize("rows", [32, 64])
def test_lora_ttt_rows_per_pass_set_the_eval_peak_and_doubling_them_fails_80gb(rows):
    """top_1_0611 as preset (32 of its 64 documents per pass) fits 80 GB; all 64 in one pass (the review's
    finding, the preset before TTT_LORA_ROWS_PER_PASS) does not, eager."""
    r = preflight.preflight(
        "top_1_0611", {**TOP, "TTT_LORA_ROWS_PER_PASS": str(rows)}, 8, preflight.CALIBRATION, False, ("eval",)
    )
    lora = phase(r, "LoRA TTT lora_batch")
    assert lora["rows"] == rows and lora["docs"] == 64 and lora["width"] == 2048
    saved_per_row = lora["saved_gib"] / rows
    assert 0.9 < saved_per_row < 1.4  # ~72 GiB for 64 rows of 2,048 tokens, eager
    assert lora["peak_gib"] > phase(r, "eval scoring (roundtrip/sliding)")["peak_gib"]
    if rows == 32:
        assert all(p["peak_gib"] < H100 for p in r["phases"]) and lora["H100"] == "PASS/PASS"
    else:
        assert lora["peak_gib"] > H100 and lora["H100"].startswith("FAIL")


def test_calibration_constant_matches_the_trace_of_the_measured_setting():
    traced = preflight.traced_r23_world1()
    ratio = preflight.MEASURED_R23_WORLD1_MIB / 1024 / traced
    assert ratio == pytest.approx(preflight.CALIBRATION, abs=0.005)


def test_table_and_summary_name_every_phase(record):
    preflight.verdicts(record["phases"], 0.5)
    text = preflight.table([record])
    assert text.count("| defaults |") == len(record["phases"]) and "PASS/PASS" in text
    assert any("warmup_snapshot_gib" in line for line in preflight.summary_lines(record))


def test_artifact_estimate_goes_through_rate_control():
    """pr1539_legal's default plan is over the budget; AUTO_FIT's plan (estimated sizes) fits, and with
    AUTO_FIT=0 the estimate is the default plan's, a FAIL: the export would write an artifact over 16 MB."""
    env = read_env_file(REPO / "configs" / "pr1539_legal.env")
    fitted = preflight.artifact_bytes(env)
    assert fitted["default_total_bytes_est"] > fitted["limit"] >= fitted["total_bytes_est"]
    assert fitted["verdict"] == "PASS" and fitted["plan"] != fitted["default_plan"]
    assert fitted["limit"] - fitted["total_bytes_est"] < 50_000  # fitted close to the budget, not far under
    off = preflight.artifact_bytes({**env, "AUTO_FIT": "0"})
    assert off["verdict"] == "FAIL" and off["plan"] == off["default_plan"]
    assert off["total_bytes_est"] == fitted["default_total_bytes_est"]
    line = next(x for x in preflight.summary_lines(dict(record_stub(), bytes=off)) if "artifact" in x)
    assert "FAIL (as planned (AUTO_FIT=0)" in line


def record_stub() -> dict:
    return dict(config="stub", params=1, world=8, seconds=0, phases=[], notes={})


# ----------------------------------------------------------------------------------------------------
# The projected timeline
# ----------------------------------------------------------------------------------------------------


def measured_log(folder, env: dict, step_ms: float, world: int = 1) -> None:
    """A GPU run's log as train_gpt writes it: its hyperparameters, device, world size and step lines."""
    h = tg.Hyperparameters.from_env(env)
    hp = {k: list(v) if isinstance(v, tuple) else v for k, v in h.flat().items()}
    lines = [
        f"hyperparameters:{json.dumps(hp)}",
        "device:NVIDIA H100 80GB HBM3 x1 cuda:13.0",
        f"world_size:{world} grad_accum_steps:{h.micro_batches(world) // world}",
        f"step:10/20000 train_loss:5.0 train_time:{10 * step_ms + 50:.0f}ms step_avg:{step_ms + 5:.2f}ms",
        f"step:100/20000 train_loss:5.0 train_time:{100 * step_ms:.0f}ms step_avg:{step_ms:.2f}ms",
    ]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "run.txt").write_text("\n".join(lines) + "\n")


def test_timeline_projects_steps_from_a_measured_step_of_the_same_work_else_not_measured(tmp_path):
    """One GPU's step of 8 micro-batches at 800 ms is 100 ms at 8 ranks (one micro-batch each): 6,000 steps in
    600 s. A config whose network differs (top_1_0611) reads 'not measured' and says what differs; so does a
    folder with no runs."""
    measured_log(tmp_path / "h100", R23, 800.0)
    r23 = preflight.timeline(tg.Hyperparameters.from_env(R23), 26_928_220, tmp_path)
    assert r23["status"] == "projected" and r23["ms_per_step"] == 100.0 and r23["steps"] == 6000
    assert r23["train_s"] == 600 and "eval_ttt_s" not in r23  # no bench_speed.json beside the log
    assert preflight.timeline_cell(r23).startswith("6,000 steps x 100.0 ms in 600 s")
    top = preflight.timeline(tg.Hyperparameters.from_env(TOP), 35_945_623, tmp_path)
    assert top["status"] == "not measured" and "num_layers" not in top["why"] and "mlp_mult" in top["why"]
    assert preflight.timeline_cell(top) == "not measured"
    empty = preflight.timeline(tg.Hyperparameters.from_env(R23), 26_928_220, tmp_path / "none")
    assert empty["status"] == "not measured"


# ----------------------------------------------------------------------------------------------------
# The shrunk run (2 gloo ranks, compiled with aot_eager): r23 at 2 layers, on the small corpus
# ----------------------------------------------------------------------------------------------------

SMALL_R23 = dict(NUM_LAYERS=2, VE_LAYERS="1", XSA_LAST_N=1, WARMUP_STEPS=2, ITERATIONS=4)


def test_shrunk_run_compiles_nothing_inside_the_timers_passes_every_check_and_its_ranks_agree(small_data):
    """The whole val set (VAL_MAX_TOKENS=0): every compliance line PASS (record_hardware INFO on a CPU); the
    compile warm-up builds every training graph, the eval's warm-up every eval graph; both ranks log the same
    losses, decisions and exact scores and train bitwise-equal weights."""
    full_val = dict(VAL_MAX_TOKENS=0, TTT_EPOCHS=1)  # 154K val tokens: roundtrip, sliding window, chunk TTT
    r = preflight.run_shrunk("r23", R23, data=small_data, timeout=300, **full_val, **SMALL_R23)
    assert r["verdict"] == "PASS" and not r["failed"], r
    g = r["graphs"]
    assert g["train"] == 0 and g["eval"] == 0 and g["train_warmup"] > 0 and g["eval_warmup"] > 0
    statuses = {k: c["status"] for k, c in r["compliance"].items()}
    assert statuses.pop("record_hardware") == "INFO" and set(statuses.values()) == {"PASS"}, r["compliance"]
    assert {"train_time", "eval_time", "artifact_bytes", "ttt_legal", "full_val"} <= set(statuses)
    agree = r["ranks_agree"]
    assert agree["status"] == "PASS" and agree["ranks"] == 2 and agree["lines_compared"] >= 4 + 3
    cells = preflight.shrunk_cells(r)
    assert cells["shrunk"] == "PASS" and cells["graphs"].endswith("/0") and cells["ranks_agree"] == "PASS"


def test_shrunk_run_reports_a_failed_compliance_check(small_data):
    """EVAL_BUDGET_SECONDS=0: compliance:eval_time FAILs and so does the shrunk check; full_val's FAIL on the
    sample the shrink scores is shown, excused, and is not what fails it. (One graph variant and the round
    trip alone: the cheapest compiled run.)"""
    cheap = dict(SMALL_R23, LATE_QAT_THRESHOLD=0, WARMUP_STEPS=1, TTT_ENABLED=0, EVAL_SLIDING=0)
    r = preflight.run_shrunk("r23", R23, data=small_data, timeout=300, EVAL_BUDGET_SECONDS=0, **cheap)
    assert r["verdict"] == "FAIL" and r["compliance"]["eval_time"]["status"] == "FAIL"
    assert [f for f in r["failed"] if f.startswith("compliance:")] == [
        f"compliance:eval_time FAIL {r['compliance']['eval_time']['detail']}"
    ]
    assert "excused" in r["compliance"]["full_val"] and r["ranks_agree"]["status"] == "PASS"
    assert r["graphs"]["train"] == r["graphs"]["eval"] == 0
    assert "eval_time FAIL" in preflight.shrunk_cells(r)["compliance"]


def test_ranks_agree_fails_on_a_rank_that_logged_another_loss_or_trained_other_weights():
    """read_shrunk on two ranks' reports: equal lines and weights agree; one train_loss or one hash apart
    does not (times, which are rank-local, are never compared)."""
    lines = [
        ["warmup_step:2/2", 3],
        ["step:1/4 train_loss:6.1000 train_time:10ms step_avg:10.00ms", 3],
        ["train_compiles: 0 graphs compiled after warm-up", 3],
        ["DIAGNOSTIC post_ema val_loss:6.0 val_bpb:3.0 eval_time:5ms", 4],
        ["eval_warmup: 2 graph shapes compiled in 1.0s (before the eval timer)", 6],
        ["final_int6_roundtrip_exact val_loss:6.00000001 val_bpb:3.00000001", 6],
        ["eval_compiles: 0 graphs compiled inside the timed eval", 6],
        ["compliance:eval_time PASS 1.0s, limit 600s", 6],
    ]

    def rank(r, lines, sha="a"):
        return dict(rank=r, lines=lines, state_sha256=sha)

    other_time = [[m.replace("10ms", "99ms"), g] for m, g in lines]
    ok = preflight.read_shrunk([rank(0, lines), rank(1, other_time)], {}, 2)
    assert ok["verdict"] == "PASS" and ok["graphs"] == dict(
        train_warmup=3, train=0, diagnostic=1, eval_warmup=2, eval=0
    )
    other_loss = [[m.replace("6.1000", "6.1001"), g] for m, g in lines]
    for second in (rank(1, other_loss), rank(1, lines, "b")):
        r = preflight.read_shrunk([rank(0, lines), second], {}, 2)
        assert r["verdict"] == "FAIL" and r["ranks_agree"]["status"] == "FAIL"
