"""GPU checks (skipped without CUDA): bf16 + torch.compile numerics, and the whole pipeline on the
record configuration. Run them on a GPU machine with: python -m pytest -q tests/test_gpu.py
(the whole-pipeline test is the slow one: it runs last, so that a time limit cuts it, not the others)"""

import re

import pytest
import torch

from conftest import run_script, tg

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_bf16_compiled_forward_matches_fp32_eager():
    torch.manual_seed(0)
    h = tg.Hyperparameters.from_env({})  # the record model
    model = tg.GPT(h).cuda()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    ids = torch.randint(0, h.model.vocab_size, (4, 2048), device="cuda")
    kernel, model.attn_kernel = model.attn_kernel, "sdpa"  # the fp32 reference: FA kernels take bf16 only
    reference = model.token_nll(ids, ids)
    model.attn_kernel = kernel  # the run's kernel (FA3 where installed), fed bf16 under autocast
    compiled = torch.compile(model.token_nll, dynamic=False, fullgraph=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        fast = compiled(ids, ids)
    assert torch.isfinite(fast).all()
    assert (fast - reference).abs().mean() / reference.abs().mean() < 2e-2
    assert abs(fast.mean().item() - reference.mean().item()) < 5e-3 * reference.mean().item()


@pytest.mark.parametrize("doc", [1, 0])
def test_compiled_flex_document_attention_matches_the_mask(doc):
    """The attention kernels at the record's shapes, compiled, forward and gradients in bf16, against SDPA (a dense
    mask with DOC_ATTENTION): FlexAttention's block mask, and FA3, FA4 and torch's varlen_attn where they run."""
    torch.manual_seed(0)
    h = tg.Hyperparameters.from_env({"DOC_ATTENTION": str(doc)})
    model = tg.GPT(h).cuda()
    with torch.no_grad():  # no zero-initialized projection: every gradient is non-trivial
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    ids = torch.randint(2, h.model.vocab_size, (4, 2048), device="cuda")
    ids[:, [0, 300, 301, 1500]] = tg.BOS_ID
    out = {}
    for kernel in ("sdpa", "flex", *runnable_flash_kernels(h)):
        model.attn_kernel = kernel
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = torch.compile(model, dynamic=False, fullgraph=True)(ids, ids.roll(-1, 1))
        loss.backward()
        out[kernel] = loss.item(), model.blocks[0].attn.c_q.weight.grad.clone()
    for kernel in out:
        assert abs(out["sdpa"][0] - out[kernel][0]) < 1e-2 * out["sdpa"][0], kernel
        assert torch.allclose(
            out["sdpa"][1], out[kernel][1], rtol=5e-2, atol=1e-4 * out["sdpa"][1].abs().max().item()
        )


def runnable_flash_kernels(h) -> list[str]:
    """fa3, fa4, varlen: those installed here whose probe runs (train_gpt.pick_attention asked for each by name)."""
    heads = (
        h.model.num_heads,
        h.model.num_kv_heads,
        h.model.num_kv_heads,
        h.model.model_dim // h.model.num_heads,
    )
    runs = []
    for kernel in ("fa3", "fa4", "varlen"):
        try:
            runs.append(tg.pick_attention(kernel, h.model.doc_attention, heads)[0])
        except tg.ConfigError as e:
            print(e)
    return runs


def test_record_config_pipeline(embedded_data, tmp_path):
    """Train a few steps -> export -> round-trip from disk -> sliding -> TTT, at the record's shapes."""
    env = dict(
        embedded_data,
        RUN_ID="gpu_pipeline",
        ARTIFACT_PATH=str(tmp_path / "m.ptz"),
        ITERATIONS="6",
        WARMUP_STEPS="2",
        MAX_WALLCLOCK_SECONDS="0",
        VAL_LOSS_EVERY="0",
        VAL_MAX_TOKENS="131072",
        TTT_EPOCHS="1",
        WARMDOWN_ITERS="3",
    )
    proc = run_script(env, tmp_path, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = proc.stdout
    assert "model_params:26928220" in out and "compliance:ttt_legal PASS" in out
    for name in ("final_int6_roundtrip", "final_int6_sliding_window", "legal_ttt"):
        bpb = float(re.search(rf"^{name}_exact val_loss:\S+ val_bpb:(\S+)", out, re.M).group(1))
        assert 0 < bpb < 10
