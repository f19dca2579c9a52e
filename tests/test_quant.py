"""Quantization (MSE clip, SDClip, mixed bits, pruning), the artifact format, bad artifacts, GPTQ, rate control."""

import hashlib

import pytest
import torch

from conftest import SILENT, tg
from test_model import full_model

H = tg.Hyperparameters.from_env({})
PLAN = tg.quant_plan(H)
MSE = {g: (b, 0.0) for g, (b, _) in PLAN.items()}


def test_per_row_scales_bound_the_error_and_have_no_floor():
    torch.manual_seed(0)
    w = torch.randn(64, 512) * torch.logspace(-3, 0, 64)[:, None]  # rows from 1e-3 to 1 in scale
    w[0, 0] = 1.6 * w[0].abs().max()  # a mild outlier: clipping it must win
    scale = tg.row_scales(w, 6, 0.0)
    q = tg.round_to_grid(w, scale, 31)
    err = (q * scale[:, None] - w).square().sum(1)
    rowmax_scale = tg.fp16_grid(w.abs().amax(1) / 31)
    rtn_err = (tg.round_to_grid(w, rowmax_scale, 31) * rowmax_scale[:, None] - w).square().sum(1)
    assert (err <= rtn_err).all() and err[0] < 0.95 * rtn_err[0]
    inside = q.abs() < 31
    assert ((q * scale[:, None] - w).abs()[inside] <= scale[:, None].expand_as(w)[inside] / 2 + 1e-7).all()
    # the smallest rows get a grid as fine as their own magnitude (the records floored scales at 1/31)
    assert (scale[:8] < w[:8].abs().amax(1) / 31 * 1.01).all()
    assert torch.equal(scale.half().float(), scale)


def small_state():
    model = full_model(MODEL_DIM=256, VOCAB_SIZE=1024, BIGRAM_VOCAB_SIZE=600)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_quantize_kinds():
    qstate = tg.quantize_state(small_state(), PLAN)
    kinds = {name: q.bits for name, q in qstate.items()}
    assert kinds["tok_emb.weight"] == 8 and kinds["blocks.0.mlp.fc.weight"] == 6
    assert kinds["bigram.embed.weight"] == 0  # 600 x 8 values: small enough to stay fp16
    tiny = tg.quantize_state(
        {"blocks.0.attn.c_k.weight": torch.randn(8, 16), "blocks.0.attn.q_gain": torch.ones(4)}, PLAN
    )
    assert tiny["blocks.0.attn.c_k.weight"].bits == 6 and tiny["blocks.0.attn.q_gain"].bits == 0  # QAT's grid
    assert all(b == 0 for n, b in kinds.items() if n.startswith("controls."))


@pytest.mark.parametrize("codec", ["zstd", "brotli", "lzma"])
def test_artifact_round_trip(tmp_path, codec):
    state = small_state()
    qstate = tg.quantize_state(state, PLAN)
    meta = {"model": {"num_layers": 4}, "note": "x"}
    path = tmp_path / "a.ptz"
    tg.write_atomic(str(path), tg.pack_artifact(qstate, meta, codec))
    back, meta2 = tg.read_artifact(str(path))
    assert meta2 == meta and list(back) == list(qstate)
    for name, q in qstate.items():
        b = back[name]
        assert (b.shape, b.bits, b.values.dtype) == (q.shape, q.bits, q.values.dtype)
        assert torch.equal(b.values, q.values) and (q.scale is None or torch.equal(b.scale, q.scale))
        deq = b.dequantize()
        assert deq.dtype == torch.float32 and deq.shape == state[name].shape
    assert not list(tmp_path.glob("*.tmp*"))


def corrupt(blob: bytes, kind: str) -> bytes:
    if kind == "flip":
        return blob[:100] + bytes([blob[100] ^ 1]) + blob[101:]
    if kind == "truncate":
        return blob[:-50]
    if kind == "foreign":
        return b"PK\x03\x04" + bytes(200)
    if kind == "version":
        return blob[:7] + b"9" + blob[8:]
    if kind == "empty":
        return b""
    if kind == "codec":
        return blob[:8] + bytes([7]) + blob[9:]


@pytest.mark.parametrize(
    "kind, message",
    [
        ("flip", "sha256 mismatch"),
        ("truncate", "sha256 mismatch"),
        ("foreign", "bad magic"),
        ("version", "artifact format"),
        ("empty", "bad magic"),
        ("codec", "unknown codec"),
    ],
)
def test_bad_artifacts_are_refused(tmp_path, kind, message):
    blob = tg.pack_artifact(tg.quantize_state(small_state(), PLAN), {}, "zstd")
    path = tmp_path / "bad.ptz"
    path.write_bytes(corrupt(blob, kind))
    with pytest.raises(tg.ConfigError, match=message) as e:
        tg.read_artifact(str(path))
    assert "bad.ptz" in str(e.value)


def test_checksummed_but_malformed_payload_is_refused(tmp_path):
    body = tg.compress(b"\x05\x00\x00\x00{}", "zstd")
    path = tmp_path / "odd.ptz"
    path.write_bytes(tg.ARTIFACT_MAGIC + bytes([0]) + hashlib.sha256(body).digest() + body)
    with pytest.raises(tg.ConfigError, match="odd.ptz: malformed artifact payload"):
        tg.read_artifact(str(path))


def test_gptq_beats_round_to_nearest_on_layer_output():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(48, 96, generator=gen)
    x = torch.randn(2048, 24, generator=gen) @ torch.randn(24, 96, generator=gen)  # correlated inputs
    x += 0.1 * torch.randn(2048, 96, generator=gen)
    H_ = x.T @ x
    scale = tg.row_scales(w, 4, 0.0)
    rtn = tg.round_to_grid(w, scale, 7)
    gptq = tg.gptq_round(w, H_, scale, 7, damp=0.01)
    assert gptq.abs().max() <= 7 and torch.equal(gptq, gptq.round())

    def out_err(q):
        return (x @ (w - q * scale[:, None]).T).square().sum().item()

    assert out_err(gptq) < 0.7 * out_err(rtn)


def test_sdclip_grid_spans_k_std_and_round_trips(tmp_path):
    torch.manual_seed(0)
    w = torch.randn(32, 256) * torch.logspace(-3, 0, 32)[:, None]
    scale = tg.row_scales(w, 6, 12.85)
    assert torch.allclose(scale, 12.85 * w.std(1, correction=0) / 31, rtol=1e-3) and torch.equal(
        scale.half().float(), scale
    )
    state = {"blocks.0.mlp.fc.weight": w, "tok_emb.weight": torch.randn(1024, 80) * 0.02}
    qstate = tg.quantize_state(state, PLAN)
    emb = qstate["tok_emb.weight"]
    assert emb.bits == 8 and torch.allclose(
        emb.scale.float(), 20 * state["tok_emb.weight"].std(1, correction=0) / 127, rtol=1e-3
    )
    for name, q in qstate.items():  # nothing is clipped at k = 12.85 / 20 on Gaussian rows: error <= step / 2
        assert ((q.dequantize() - state[name]).abs() <= q.scale.float()[:, None] / 2 + 1e-7).all()

    # the step (0.41 std) is coarser than the MSE clip's, so the symbols carry fewer bits
    def ent(q):
        return tg.entropy_bytes({"x": q}) - 2 * q.scale.numel()

    mse = tg.quantize_state(state, MSE)
    assert ent(qstate["blocks.0.mlp.fc.weight"]) < 0.8 * ent(mse["blocks.0.mlp.fc.weight"])
    tg.write_atomic(str(tmp_path / "a.ptz"), tg.pack_artifact(qstate, {}, "brotli"))
    back, _ = tg.read_artifact(str(tmp_path / "a.ptz"))
    assert all(torch.equal(back[n].dequantize(), q.dequantize()) for n, q in qstate.items())


def test_mixed_bits_and_pruning_round_trip(tmp_path):
    state = small_state()
    plan = {**PLAN, "mlp": (5, 12.85), "attn": (6, 12.85), "embed": (7, 15.0)}
    qstate = tg.quantize_state(state, plan, prune=0.1)
    for name, q in qstate.items():
        group = tg.quant_group(name, state[name])
        assert q.bits == (plan[group][0] if group else 0), name
        if q.bits:
            assert q.values.abs().max() <= 2 ** (q.bits - 1) - 1
            assert (q.values == 0).float().mean() >= 0.1  # the smallest 10% of |w| pruned first
    assert tg.export_bits(qstate) == 6
    tg.write_atomic(str(tmp_path / "m.ptz"), tg.pack_artifact(qstate, {}, "zstd"))
    back, _ = tg.read_artifact(str(tmp_path / "m.ptz"))
    assert all(torch.equal(back[n].values, q.values) and back[n].bits == q.bits for n, q in qstate.items())


def rate_control_setup():
    gen = torch.Generator().manual_seed(0)
    state = {
        n: torch.randn(r, c, generator=gen) * 0.02
        for n, r, c in (
            ("blocks.0.attn.c_q.weight", 128, 128),
            ("blocks.0.mlp.fc.weight", 256, 128),
            ("tok_emb.weight", 1024, 96),
        )
    }

    def quantize(plan):
        return tg.quantize_state(state, plan)

    def pack(q):
        return tg.pack_artifact(q, {}, "zstd")

    def attn_matters(q):
        return 1.0 if q["blocks.0.attn.c_q.weight"].bits < 6 else 0.0  # a calibration loss

    return quantize, pack, attn_matters, len(pack(quantize(PLAN))), state


def test_rate_control_hits_a_budget_and_refuses_an_impossible_one():
    quantize, pack, loss, full, _ = rate_control_setup()
    fit = tg.fit_to_budget(quantize, pack, PLAN, int(0.6 * full), loss, SILENT)
    assert len(fit.blob) <= 0.6 * full and fit.blob == pack(fit.qstate) and fit.plan != PLAN
    assert any(
        b < PLAN[g][0] for g, (b, _) in fit.plan.items()
    )  # k x2 alone saves ~1 bit of 6: bits had to drop
    assert fit.plan["attn"][0] == 6  # the groups whose bits cost no calibration loss went first
    fit2 = tg.fit_to_budget(quantize, pack, PLAN, int(0.9 * full), loss, SILENT)  # k alone suffices
    assert len(fit2.blob) <= 0.9 * full and all(
        fit2.plan[g][0] == PLAN[g][0] and fit2.plan[g][1] > PLAN[g][1] for g in PLAN
    )
    assert tg.fit_to_budget(quantize, pack, PLAN, full, loss, SILENT).plan == PLAN  # fits: nothing changes
    with pytest.raises(tg.ConfigError, match="AUTO_FIT: nothing fits 1000 bytes"):
        tg.fit_to_budget(quantize, pack, PLAN, 1000, loss, SILENT)


def test_rate_control_spends_spare_bytes_on_a_finer_grid():
    quantize, pack, _, full, state = rate_control_setup()

    def error(q):
        return sum((v.dequantize() - state[n]).square().sum().item() for n, v in q.items())  # a calib loss

    calls, lines = {"quantize": 0, "pack": 0}, []

    def counted(name, fn):
        def wrapped(x):
            calls[name] += 1
            return fn(x)

        return wrapped

    start_loss = error(quantize(PLAN))
    fit = tg.fit_to_budget(
        counted("quantize", quantize), counted("pack", pack), PLAN, int(1.3 * full), error, lines.append
    )
    assert (
        full < len(fit.blob) <= 1.3 * full
        and fit.blob == pack(fit.qstate)
        and error(fit.qstate) < 0.7 * start_loss
    )
    assert all(
        fit.plan[g][0] == PLAN[g][0] and 0.25 * PLAN[g][1] < fit.plan[g][1] < PLAN[g][1] for g in PLAN
    )  # s bisected
    tries = sum(
        " fill plan:" in line for line in lines
    )  # a real size over the estimate: correct, search again
    assert 1 <= tries <= 3 and calls == {
        "quantize": 1 + 9 * tries,
        "pack": 1 + tries,
    }  # s = 1/4, 7 bisection steps, mse
    assert (
        sum(line.startswith("auto_fit:candidate") for line in lines) == 2 * tries
    )  # start, finer k (mse: too big)
    # room for everything: the finest SDClip (s = 1/4) and the MSE clip both fit; the lower loss wins
    fit = tg.fit_to_budget(quantize, pack, PLAN, 3 * full, error, SILENT)
    finest = {g: (b, k / 4) for g, (b, k) in PLAN.items()}
    assert fit.plan == min((finest, MSE), key=lambda p: error(quantize(p))) and len(fit.blob) <= 3 * full

    # exactly at the start size, with a loss that does not fall, or with fill off: the plan as given
    def no_gain(q):
        return 0.0

    for limit, loss, fill in ((full, error, True), (3 * full, no_gain, True), (3 * full, error, False)):
        fit = tg.fit_to_budget(quantize, pack, PLAN, limit, loss, SILENT, fill=fill)
        assert fit.plan == PLAN and len(fit.blob) == full


def test_rate_control_never_returns_a_miss():
    """Codecs whose real size outgrows the estimates: a mild one (a tenth of every byte over the start
    again) is met by correcting the ratio and trying again; one that misses always gives the plan as is."""
    quantize, pack, _, full, state = rate_control_setup()

    def error(q):
        return sum((v.dequantize() - state[n]).square().sum().item() for n, v in q.items())

    limit, lines = int(1.3 * full), []

    def mild(q):
        return pack(q) + bytes(max(0, len(pack(q)) - full) // 10)

    fit = tg.fit_to_budget(quantize, mild, PLAN, limit, error, lines.append)
    assert full < len(fit.blob) <= limit and fit.blob == mild(fit.qstate) and fit.plan != PLAN
    assert sum(" fill plan:" in line for line in lines) >= 2

    def always(q):
        return pack(q) + bytes(limit * (len(pack(q)) > full))

    fit = tg.fit_to_budget(quantize, always, PLAN, limit, error, SILENT)
    assert fit.plan == PLAN and len(fit.blob) == full


def test_lqer_adds_back_the_largest_errors_low_rank_and_round_trips(tmp_path):
    """LQER (rank 4, 3 tensors): the rank-4 SVD of the quantization error on exactly the 3 int tensors with the
    largest error, A^T int2 with 4 scales and B int4 in groups of 64, stored as artifact entries, read back and
    folded into the weights: each of those tensors gets closer to the float one, every other one is untouched."""
    state = small_state()
    plan = {g: (4, k) for g, (_, k) in PLAN.items()}  # coarse grids: errors a low rank can matter for
    base = tg.quantize_state(state, plan)
    lq = tg.add_lqer(state, base, 4, 3)
    err = {n: (state[n] - q.dequantize()).norm().item() for n, q in base.items() if q.bits}
    top = sorted(err, key=err.get, reverse=True)[:3]
    assert sorted(n[:-4] for n in lq if n.endswith(".lqA")) == sorted(top)
    for n in top:
        cols = state[n].numel() // state[n].shape[0]
        assert lq[f"{n}.lqA"].shape == (4, state[n].shape[0]) and lq[f"{n}.lqA"].bits == 2
        assert (
            lq[f"{n}.lqB"].shape == ((4 * cols // 64, 64) if cols % 64 == 0 else (4, cols))
            and lq[f"{n}.lqB"].bits == 4
        )
    assert any(lq[f"{n}.lqB"].shape[1] == 64 for n in top)
    tg.write_atomic(str(tmp_path / "lq.ptz"), tg.pack_artifact(lq, {}, "zstd"))
    folded = tg.dequantized(tg.read_artifact(str(tmp_path / "lq.ptz"))[0])
    assert set(folded) == set(state)
    for n in top:  # the int4 factors keep most of what the exact rank-4 SVD removes
        E = (state[n] - base[n].dequantize()).reshape(state[n].shape[0], -1)
        best = (E.square().sum() - torch.linalg.svdvals(E)[:4].square().sum()).item()
        assert (state[n] - folded[n]).square().sum().item() - best < 0.3 * (err[n] ** 2 - best)
    assert all(torch.equal(folded[n], q.dequantize()) for n, q in base.items() if n not in top)
