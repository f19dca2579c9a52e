"""Quantization, the artifact format, bad artifacts, GPTQ, pruning to a byte budget."""

import hashlib

import pytest
import torch

from conftest import SILENT, tg
from test_model import full_model

H = tg.Hyperparameters.from_env({})


def test_per_row_scales_bound_the_error_and_have_no_floor():
    torch.manual_seed(0)
    w = torch.randn(64, 512) * torch.logspace(-3, 0, 64)[:, None]  # rows from 1e-3 to 1 in scale
    w[0, 0] = 1.6 * w[0].abs().max()  # a mild outlier: clipping it must win
    scale = tg.row_scales(w, 6)
    q = tg.round_to_grid(w, scale, 31)
    err = (q * scale[:, None] - w).square().sum(1)
    rowmax_scale = tg.fp16_grid(w.abs().amax(1) / 31)
    rtn_err = (tg.round_to_grid(w, rowmax_scale, 31) * rowmax_scale[:, None] - w).square().sum(1)
    assert (err <= rtn_err).all() and err[0] < 0.95 * rtn_err[0]
    inside = (q.abs() < 31)
    assert ((q * scale[:, None] - w).abs()[inside] <= scale[:, None].expand_as(w)[inside] / 2 + 1e-7).all()
    # the smallest rows get a grid as fine as their own magnitude (the records floored scales at 1/31)
    assert (scale[:8] < w[:8].abs().amax(1) / 31 * 1.01).all()
    assert torch.equal(scale.half().float(), scale)


def small_state():
    model = full_model(MODEL_DIM=256, VOCAB_SIZE=1024, BIGRAM_VOCAB_SIZE=600)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_quantize_kinds():
    qstate = tg.quantize_state(small_state(), H)
    kinds = {name: q.bits for name, q in qstate.items()}
    assert kinds["tok_emb.weight"] == 8 and kinds["blocks.0.mlp.fc.weight"] == 6
    assert kinds["bigram.embed.weight"] == 0  # 600 x 8 values: small enough to stay fp16
    tiny = tg.quantize_state({"blocks.0.attn.c_k.weight": torch.randn(8, 16), "blocks.0.attn.q_gain": torch.ones(4)}, H)
    assert tiny["blocks.0.attn.c_k.weight"].bits == 6 and tiny["blocks.0.attn.q_gain"].bits == 0  # QAT's grid
    assert all(b == 0 for n, b in kinds.items() if n.startswith("controls."))


@pytest.mark.parametrize("codec", ["zstd", "brotli", "lzma"])
def test_artifact_round_trip(tmp_path, codec):
    state = small_state()
    qstate = tg.quantize_state(state, H)
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


@pytest.mark.parametrize("kind, message", [("flip", "sha256 mismatch"), ("truncate", "sha256 mismatch"),
                                           ("foreign", "bad magic"), ("version", "artifact format"),
                                           ("empty", "bad magic"), ("codec", "unknown codec")])
def test_bad_artifacts_are_refused(tmp_path, kind, message):
    blob = tg.pack_artifact(tg.quantize_state(small_state(), H), {}, "zstd")
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
    scale = tg.row_scales(w, 4)
    rtn = tg.round_to_grid(w, scale, 7)
    gptq = tg.gptq_round(w, H_, scale, 7, damp=0.01)
    assert gptq.abs().max() <= 7 and torch.equal(gptq, gptq.round())
    out_err = lambda q: (x @ (w - q * scale[:, None]).T).square().sum().item()
    assert out_err(gptq) < 0.7 * out_err(rtn)


def test_prune_to_fit_meets_the_limit_cheapest_first():
    torch.manual_seed(0)
    state = {"blocks.0.mlp.fc.weight": torch.randn(512, 512) * 0.02}
    qstate = tg.quantize_state(state, H)
    original = qstate["blocks.0.mlp.fc.weight"].values.clone()
    make = lambda: tg.pack_artifact(qstate, {}, "zstd")
    limit = int(len(make()) * 0.93)
    blob, pruned = tg.prune_to_fit(qstate, state, limit, make, SILENT)
    after = qstate["blocks.0.mlp.fc.weight"].values
    changed = after != original
    assert len(blob) <= limit and pruned > 0 and changed.sum() == pruned
    scale = qstate["blocks.0.mlp.fc.weight"].scale.float()[:, None]
    w = state["blocks.0.mlp.fc.weight"]
    cost = w.square() - (w - original.float() * scale).square()
    kept = (after != 0)
    assert (after[changed] == 0).all() and cost[changed].max() <= cost[kept].min() + 1e-12  # cheapest first
    with pytest.raises(tg.ConfigError, match="AUTO_FIT"):
        tg.prune_to_fit(qstate, state, 100, make, SILENT)
