"""The FlashAttention / varlen kernels (ATTN_KERNEL=fa3, fa4, varlen) and how ATTN_KERNEL=auto picks one.

No GPU here: each library is a stand-in with its documented interface, installed into sys.modules and computed
with SDPA over each sequence of cu_seqlens. FlashAttention-3 is `flash_attn_interface` (flash_attn_varlen_func,
tensors (tokens, heads, dim), int32 cu_seqlens, keyword max_seqlen_q/k and causal; it registers its kernels as
torch ops). FlashAttention-4 is `flash_attn.cute` (pip install flash-attn-4; flash_attn_varlen_func(q, k, v, qv=None,
cu_seqlens_q=..., ..., causal=..., return_lse=...) -> (out, lse (heads, tokens)); backward in
flash_attn.cute.interface._flash_attn_bwd(q, k, v, out, dout, lse, softmax_scale, causal, ..., cu_seqlens_q=...)
-> (dq, dk, dv); no torch ops, which train_gpt's op pair fa4 / fa4_bwd supplies). torch's varlen_attn (torch >=
2.12) is varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, window_size=(-1, 0) for causal,
enable_gqa=...)."""

import importlib.machinery
import sys
import types

import pytest
import torch
import torch.nn.functional as F
import torch.nn.attention.varlen as torch_varlen
from conftest import tg
from test_model import full_model

HEADS = (4, 2, 2, 8)  # full_model's q, k, v heads and head dim


def varlen_sdpa(q, k, v, cu, causal):
    """The varlen kernels' result, by SDPA over each sequence of cu (tokens, heads, dim); empty ones skipped."""
    bounds = cu.tolist()
    assert bounds[0] == 0 and max(bounds) == len(q)
    return torch.cat(
        [
            F.scaled_dot_product_attention(
                *(t[lo:hi].transpose(0, 1)[None] for t in (q, k, v)), is_causal=causal, enable_gqa=True
            )[0].transpose(0, 1)
            for lo, hi in zip(bounds, bounds[1:])
            if hi > lo
        ]
    )


def module(name: str, calls: list, **functions) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__spec__, mod.calls = importlib.machinery.ModuleSpec(name, None), calls
    for fn_name, fn in functions.items():
        setattr(mod, fn_name, fn)
    return mod


def install_fa3(monkeypatch, calls: list) -> None:
    def flash_attn_varlen_func(  # noqa: PLR0913 (FA3's signature)
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=False
    ):
        calls.append(("fa3", cu_seqlens_q.dtype, cu_seqlens_q.tolist(), max_seqlen_q, causal))
        assert torch.equal(cu_seqlens_q, cu_seqlens_k) and q.dim() == 3
        return varlen_sdpa(q, k, v, cu_seqlens_q, causal), None  # some versions also return the LSE

    fa3 = module("flash_attn_interface", calls, flash_attn_varlen_func=flash_attn_varlen_func)
    monkeypatch.setitem(sys.modules, "flash_attn_interface", fa3)


def install_fa4(monkeypatch, calls: list) -> None:
    """flash_attn.cute as FlashAttention-4 4.0.0b36 documents it: qv is the fourth positional parameter (so every
    other argument goes by keyword), the result is (out, lse); lse only with return_lse (or a grad)."""

    def flash_attn_varlen_func(  # noqa: PLR0913 (FA4's signature)
        q, k, v, qv=None, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None, **kw
    ):
        calls.append(("fa4", cu_seqlens_q.dtype, cu_seqlens_q.tolist(), max_seqlen_q, kw.get("causal")))
        assert qv is None and torch.equal(cu_seqlens_q, cu_seqlens_k) and q.dim() == 3
        lse = q.new_zeros(q.size(1), q.size(0), dtype=torch.float32) if kw.get("return_lse") else None
        return varlen_sdpa(q, k, v, cu_seqlens_q, kw["causal"]), lse

    def _flash_attn_bwd(  # noqa: PLR0913 (FA4's signature)
        q, k, v, out, dout, lse, softmax_scale=None, causal=False, softcap=0.0, **kw
    ):
        calls.append(("fa4_bwd", kw["cu_seqlens_q"].tolist(), kw["max_seqlen_q"], causal, tuple(lse.shape)))
        _, vjp = torch.func.vjp(lambda *qkv: varlen_sdpa(*qkv, kw["cu_seqlens_q"], causal), q, k, v)
        return vjp(dout)  # (inside an op autograd is off: functorch's vjp, not torch.autograd.grad)

    interface = module("flash_attn.cute.interface", calls, _flash_attn_bwd=_flash_attn_bwd)
    cute = module(
        "flash_attn.cute", calls, flash_attn_varlen_func=flash_attn_varlen_func, interface=interface
    )
    flash_attn = module("flash_attn", calls, cute=cute)
    for name, mod in (
        ("flash_attn", flash_attn),
        ("flash_attn.cute", cute),
        ("flash_attn.cute.interface", interface),
    ):
        monkeypatch.setitem(sys.modules, name, mod)


def install_varlen(monkeypatch, calls: list) -> None:
    def varlen_attn(  # noqa: PLR0913 (torch's signature)
        query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, window_size=(-1, -1), enable_gqa=False
    ):
        calls.append(("varlen", cu_seq_q.dtype, cu_seq_q.tolist(), max_q, window_size, enable_gqa))
        assert torch.equal(cu_seq_q, cu_seq_k) and query.dim() == 3
        return varlen_sdpa(query, key, value, cu_seq_q, window_size == (-1, 0))

    monkeypatch.setattr(torch_varlen, "varlen_attn", varlen_attn)


INSTALL = {"fa3": install_fa3, "fa4": install_fa4, "varlen": install_varlen}


@pytest.fixture(autouse=True)
def fresh_picks():
    """pick_attention resolves once a process (cached): each test resolves anew."""
    tg.pick_attention.cache_clear()
    yield
    tg.pick_attention.cache_clear()


def test_cu_seqlens_rows_or_documents_in_a_fixed_length():
    starts = torch.zeros(2, 32, dtype=torch.bool)
    starts[:, 0], starts[0, 7], starts[0, 19] = True, True, True
    rows, docs = tg.cu_seqlens(starts, False), tg.cu_seqlens(starts, True)
    assert rows.dtype == docs.dtype == torch.int32 and rows.tolist() == [0, 32, 64]
    assert len(docs) == tg.fa3_doc_capacity(2, 32) + 1 == 5 and docs.tolist() == [0, 7, 19, 32, 64]
    starts[1, 9] = True  # 5 documents: past the fixed length, which the host refuses (check_documents)
    with pytest.raises(RuntimeError, match="set ATTN_KERNEL=flex"):
        tg.check_documents(int(starts.sum()), 2, 32, "here")
    tg.check_documents(4, 2, 32, "here")


@pytest.mark.parametrize("doc", [0, 1])
@pytest.mark.parametrize("kernel", ["fa3", "fa4", "varlen"])
def test_flash_kernels_give_sdpa_scores_and_gradients(monkeypatch, kernel, doc):
    """Each kernel's plumbing (layouts, GQA, cu_seqlens from the rows or the BOS positions, padded to a fixed
    length; FA4's backward through train_gpt's op pair) gives SDPA's scores and gradients."""
    calls = []
    INSTALL[kernel](monkeypatch, calls)
    model = full_model(DOC_ATTENTION=doc, ATTN_KERNEL="sdpa")
    ids = torch.randint(2, 128, (4, 33))
    ids[0, 7], ids[0, 19], ids[1, 1] = tg.BOS_ID, tg.BOS_ID, tg.BOS_ID
    out = {}
    for k in (kernel, "sdpa"):
        model.attn_kernel = k
        model.zero_grad(set_to_none=True)
        nll = model.token_nll(ids[:, :-1], ids[:, 1:])
        nll.sum().backward()
        out[k] = nll.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]
    assert torch.allclose(out[kernel][0], out["sdpa"][0], atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(out[kernel][1], out["sdpa"][1]))
    # each row and BOS starts a sequence; the fixed length (room for 2 a row) ends in an empty one
    cu = [0, 7, 19, 32, 33, 64, 96, 128, 128] if doc else [0, 32, 64, 96, 128]
    name, dtype, seqlens, max_len, *causal = calls[0]
    assert (name, dtype, seqlens, max_len) == (kernel, torch.int32, cu, 32)
    assert causal == ([(-1, 0), True] if kernel == "varlen" else [True])
    if kernel == "fa4":
        assert ("fa4_bwd", cu, 32, True, (4, 128)) in calls  # (heads, tokens): the LSE the forward gave


@pytest.mark.parametrize("kernel", ["fa3", "fa4", "varlen"])
def test_flash_document_attention_compiles_whole_graph(monkeypatch, kernel):
    """With the kernel a torch op (FA3 and torch's varlen_attn register theirs; FA4 runs in train_gpt's op),
    document attention (fixed-size cu_seqlens from nonzero_static) compiles as one graph, as the training step
    runs it."""
    calls = []
    INSTALL[kernel](monkeypatch, calls)
    if kernel != "fa4":  # the stand-in as a torch op, as the library's kernel is
        op = torch.library.custom_op(f"kernel_stand_in::{kernel}", mutates_args=())(varlen_op)
        op.register_fake(lambda q, k, v, cu: torch.empty_like(q))
        module_, fn = (
            (sys.modules["flash_attn_interface"], "flash_attn_varlen_func")
            if kernel == "fa3"
            else (
                torch_varlen,
                "varlen_attn",
            )
        )
        monkeypatch.setattr(module_, fn, compiled_call(op))
    model = full_model(DOC_ATTENTION=1, ATTN_KERNEL="sdpa")
    model.attn_kernel = kernel
    ids = torch.randint(2, 128, (2, 32))
    ids[0, 9] = tg.BOS_ID
    with torch.no_grad():
        eager = model.token_nll(ids, ids)
        compiled = torch.compile(model.token_nll, fullgraph=True, dynamic=False, backend="aot_eager")(
            ids, ids
        )
    assert torch.allclose(eager, compiled, atol=1e-5)


def varlen_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor) -> torch.Tensor:
    return varlen_sdpa(q, k, v, cu, True)


def compiled_call(op):
    def call(q, k, v, *args, **kw):
        return op(q, k, v, kw.get("cu_seqlens_q", args[0] if args else None))

    return call


def test_fa4_ops_trace_with_their_fakes(monkeypatch):
    """train_gpt's fa4 / fa4_bwd (FA4 has no torch ops): forward and backward compile in one graph each, the
    fakes' shapes (out like q, LSE (heads, tokens), grads like q, k, v) matching what the library returns."""
    calls = []
    install_fa4(monkeypatch, calls)
    starts = torch.zeros(2, 16, dtype=torch.bool)
    starts[:, 0], starts[1, 5] = True, True
    q, k, v = (torch.randn(2, n, 16, 8, requires_grad=True) for n in (4, 2, 2))

    def loss(q, k, v):
        return tg.make_attention("fa4", starts, True)(q, k, v).square().sum()

    eager = torch.autograd.grad(loss(q, k, v), (q, k, v))
    compiled = torch.compile(loss, fullgraph=True, dynamic=False, backend="aot_eager")(q, k, v)
    assert all(
        torch.allclose(a, b, atol=1e-5) for a, b in zip(eager, torch.autograd.grad(compiled, (q, k, v)))
    )


def fake_cuda(monkeypatch, fails: dict) -> list:
    """CUDA 'available' and a probe that records what auto tried, failing where `fails` says."""
    tried = []

    def probe(kernel, doc, heads):
        tried.append(kernel)
        if kernel in fails:
            raise RuntimeError(fails[kernel])

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(tg, "probe_attention", probe)
    return tried


def test_auto_tries_the_kernels_in_order_of_speed_and_says_why_it_passed_each_over(monkeypatch):
    for install in INSTALL.values():
        install(monkeypatch, [])
    tried = fake_cuda(monkeypatch, {"fa3": "sm90 only", "fa4": "no kernel for hdim 8"})
    kernel, reasons = tg.pick_attention("auto", True, HEADS)
    assert kernel == "varlen" and tried == ["fa3", "fa4", "varlen"]
    assert reasons == {
        "fa3": "failed probe: RuntimeError('sm90 only')",
        "fa4": "failed probe: RuntimeError('no kernel for hdim 8')",
    }
    tg.pick_attention.cache_clear()
    tried.clear()
    assert tg.pick_attention("auto", False, HEADS)[0] == "sdpa" and tried == ["fa3", "fa4"]  # no varlen, flex
    tg.pick_attention.cache_clear()
    tried = fake_cuda(monkeypatch, {k: "broken" for k in INSTALL})
    assert tg.pick_attention("auto", True, HEADS) == (
        "flex",
        {k: "failed probe: RuntimeError('broken')" for k in INSTALL},
    )
    with pytest.raises(tg.ConfigError, match=r"ATTN_KERNEL=fa4: failed probe: RuntimeError\('broken'\)"):
        tg.pick_attention("fa4", True, HEADS)
    tg.pick_attention.cache_clear()
    tried = fake_cuda(monkeypatch, {})
    assert tg.pick_attention("fa3", False, HEADS) == ("fa3", {}) and tried == ["fa3"]
    assert tg.pick_attention("auto", True, HEADS)[0] == "fa3" and tg.pick_attention("flex", True, HEADS) == (
        "flex",
        {},
    )


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_the_probe_runs_its_backward_whatever_the_callers_grad_mode(mode):
    """The first model may be built under no_grad or inference mode (a verifier's): the probe's backward still runs
    there, so auto never passes a working kernel over as a "failed probe" for the caller's mode."""
    with mode():
        tg.probe_attention("sdpa", True, HEADS, device="cpu")
        tg.probe_attention("sdpa", False, HEADS, device="cpu")


def test_placeholder_packages_are_passed_over(monkeypatch):
    """PyPI's flash-attn-interface 0.0.1 is an empty module: `import flash_attn_interface` works, its functions do
    not exist. auto passes it over (and an empty flash_attn.cute) as a placeholder, never probing it; asked for by
    name it is a ConfigError."""
    monkeypatch.setitem(sys.modules, "flash_attn_interface", module("flash_attn_interface", []))
    monkeypatch.setitem(sys.modules, "flash_attn", module("flash_attn", []))
    monkeypatch.setitem(sys.modules, "flash_attn.cute", module("flash_attn.cute", []))
    tried = fake_cuda(monkeypatch, {})
    kernel, reasons = tg.pick_attention("auto", True, HEADS)
    assert kernel == "varlen" and tried == ["varlen"]
    assert (
        reasons["fa3"].startswith("placeholder: AttributeError(")
        and "flash_attn_varlen_func" in reasons["fa3"]
    )
    assert reasons["fa4"].startswith("placeholder: ")
    with pytest.raises(tg.ConfigError, match="ATTN_KERNEL=fa3: placeholder"):
        tg.pick_attention("fa3", True, HEADS)


def test_off_cuda_auto_is_sdpa_and_a_named_kernel_is_refused(monkeypatch):
    """On this CPU: FA kernels installed or not, auto gives SDPA (as before); the reasons say which is missing and
    which has no CUDA; a model asking for one by name is a ConfigError."""
    install_fa3(monkeypatch, [])
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # FA4 not installed
    kernel, reasons = tg.pick_attention("auto", True, HEADS)
    assert kernel == "sdpa" and set(reasons) == {"fa3", "fa4"}
    assert reasons["fa3"].startswith("no CUDA: ") and reasons["fa4"].startswith("not installed: ")
    assert full_model(DOC_ATTENTION=1).attn_kernel == "sdpa"
    with pytest.raises(tg.ConfigError, match="ATTN_KERNEL=fa3.* CUDA"):  # validate refuses it first
        full_model(ATTN_KERNEL="fa3")
