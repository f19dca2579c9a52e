"""The model: causality with every component on, document boundaries, attention kernels, recurrence schedules,
counts."""

import math

import pytest
import torch

from conftest import tg

# every component on: BigramHash, SmearGate, XSA, VE, partial RoPE, recurrence (shared + looped), lanes,
# gated U-Net skips, Value Residual, attention-output gates
FULL = dict(
    VOCAB_SIZE=128,
    NUM_LAYERS=4,
    UNIQUE_LAYERS=3,
    LOOP_START=1,
    LOOP_END=2,
    LOOP_REPEATS=2,
    LOOP_ENABLE_AT="0.3,0.6",
    MODEL_DIM=32,
    NUM_HEADS=4,
    NUM_KV_HEADS=2,
    MLP_MULT=2,
    TRAIN_SEQ_LEN=32,
    TRAIN_BATCH_TOKENS=256,
    BIGRAM_VOCAB_SIZE=64,
    BIGRAM_DIM=8,
    VE_LAYERS="2,5",
    VE_DIM=8,
    XSA_LAST_N=3,
    ROPE_DIMS=4,
    PARALLEL_START=5,
    TTT_CHUNK_TOKENS=64,
    EVAL_STRIDE=16,
    SKIP_GATES=1,
    VALUE_RESIDUAL=1,
    ATTN_GATE="dense",
)


def full_model(**over) -> tg.GPT:
    torch.manual_seed(0)
    model = tg.GPT(tg.Hyperparameters.from_env({k: str(v) for k, v in {**FULL, **over}.items()}))
    with torch.no_grad():  # leave no component at an identity init (zero projections, zero tables)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    model.set_stage(model.n_stages - 1)
    return model


def test_causality_with_every_component():
    model = full_model()
    assert model.value_embed is not None and model.bigram is not None and any(model.xsa)
    assert any(c.lane_mix is not None for c in model.controls) and len(model.active) == 8
    ids = torch.randint(2, 128, (2, 32))
    ids[:, 10] = tg.BOS_ID
    base = model.logits(ids)
    for t in (0, 9, 10, 11, 31):
        changed = ids.clone()
        changed[:, t] = (changed[:, t] + 7) % 126 + 2
        out = model.logits(changed)
        assert torch.equal(out[:, :t], base[:, :t]), t
        assert not torch.allclose(out[:, t:], base[:, t:]), t  # the change is visible from t on


def test_smeargate_never_mixes_across_a_bos():
    smear = tg.SmearGate(8)
    torch.nn.init.normal_(smear.gate)
    x = torch.randn(1, 6, 8)
    starts = torch.tensor([[True, False, False, True, False, False]])
    y = smear(x, starts)
    x2 = x.clone()
    x2[0, 2] += 1.0  # the token before the BOS at position 3
    y2 = smear(x2, starts)
    assert torch.equal(y2[0, 3], y[0, 3]) and torch.equal(y[0, 3], x[0, 3])
    assert not torch.allclose(y2[0, 2], y[0, 2])


def test_input_path_at_a_bos_ignores_the_previous_document():
    """BigramHash and SmearGate at a BOS see nothing of the previous document's last token."""
    model = full_model()
    ids = torch.randint(2, 128, (1, 12))
    ids[0, 6] = tg.BOS_ID

    def embed_path(t):
        starts = (t == tg.BOS_ID) | (torch.arange(t.size(1)) == 0)
        x = tg.rms_norm(model.tok_emb(t) + model.bigram(t, starts))
        return model.smear(x, starts)

    changed = ids.clone()
    changed[0, 5] = (changed[0, 5] + 3) % 126 + 2
    a, b = embed_path(ids), embed_path(changed)
    assert torch.equal(a[0, 6], b[0, 6]) and not torch.equal(a[0, 5], b[0, 5])


def test_r23_parameter_count():
    h = tg.Hyperparameters.from_env({"BIGRAM_VOCAB_SIZE": "1536", "VE_LAYERS": "9,10"})
    assert sum(p.numel() for p in tg.GPT(h).parameters()) == 26_928_220


def test_schedule_shared_cores_form():
    h = tg.Hyperparameters.from_env({"NUM_LAYERS": "11", "UNIQUE_LAYERS": "10"})
    model = tg.GPT(h)
    assert [p for p, _ in model.slots] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0]
    assert len(model.blocks) == 10 and len(model.controls) == 11 and model.active == tuple(range(11))
    assert [i for i, on in enumerate(model.xsa) if on] == [7, 8, 9, 10]  # logical, so layer 10 (core 0) too
    by_core = tg.GPT(
        tg.Hyperparameters.from_env({"NUM_LAYERS": "11", "UNIQUE_LAYERS": "10", "XSA_BY": "physical"})
    )
    assert [i for i, on in enumerate(by_core.xsa) if on] == [
        6,
        7,
        8,
        9,
    ]  # #526: cores 6-9; layer 10 runs core 0


def test_schedule_looped_range_form():
    h = tg.Hyperparameters.from_env(
        {
            "LOOP_START": "3",
            "LOOP_END": "5",
            "LOOP_REPEATS": "2",
            "LOOP_ENABLE_AT": "0.5,0.65",
            "VE_LAYERS": "15,16",
        }
    )
    model = tg.GPT(h)
    assert [p for p, _ in model.slots] == [0, 1, 2, 3, 4, 5, 3, 4, 5, 3, 4, 5, 6, 7, 8, 9, 10]
    assert [s for _, s in model.slots] == [0] * 6 + [1] * 3 + [2] * 3 + [0] * 5
    assert len(model.blocks) == 11 and len(model.controls) == 17 and len(model.skip_weights) == 8
    assert [model.slots[i][0] for i in model.active] == list(range(11))
    model.set_stage(1)
    assert [model.slots[i][0] for i in model.active] == [0, 1, 2, 3, 4, 5, 3, 4, 5, 6, 7, 8, 9, 10]
    model.set_stage(2)
    assert len(model.active) == 17


def test_distribution_is_normalized_and_starts_near_uniform():
    torch.manual_seed(0)
    model = tg.GPT(tg.Hyperparameters.from_env({k: str(v) for k, v in FULL.items()}))
    ids = torch.randint(0, 128, (2, 32))
    probs = model.logits(ids).softmax(-1)
    assert torch.allclose(probs.sum(-1), torch.ones(2, 32), atol=1e-5)
    assert abs(model(ids, torch.randint(0, 128, (2, 32))).item() - math.log(128)) < 0.05
    for block in model.blocks:
        assert not block.attn.proj.weight.any() and not block.mlp.proj.weight.any()


@pytest.mark.parametrize("eval_len", [32, 64])
def test_rope_tables_cover_eval_length_with_ntk(eval_len):
    h = tg.Hyperparameters.from_env({k: str(v) for k, v in {**FULL, "EVAL_SEQ_LEN": eval_len}.items()})
    rot = tg.GPT(h).rotary
    cos, _ = rot(eval_len)
    assert cos.shape == (eval_len, 2)
    if eval_len > 32:  # stretched base: lower frequency in the rotated pair than at the train length
        assert not torch.allclose(cos[:32], rot(32)[0])


def test_skip_gates_interpolate_between_stream_and_skip():
    """A gate at +inf keeps the stream (as if the skip weight were 0); at 0 it averages stream and skip."""
    gated = full_model()
    plain = full_model(SKIP_GATES=0)
    ids = torch.randint(2, 128, (2, 32))
    with torch.no_grad():
        for g, w in zip(gated.skip_gates, plain.skip_weights):
            g.fill_(40.0)
            w.zero_()
    assert torch.allclose(gated.logits(ids), plain.logits(ids), atol=1e-5)
    with torch.no_grad():
        for g in gated.skip_gates:
            g.zero_()
    assert not torch.allclose(gated.logits(ids), plain.logits(ids), atol=1e-3)
    assert sum(p.numel() for p in gated.skip_gates) == 4 * 32  # 8 slots: 4 skips of MODEL_DIM gates


def parallel_layer(form: str):
    """The first parallel layer of a full model in `form` (random weights): its block, control, context, inputs."""
    model = full_model(PARALLEL_FORM=form, VALUE_RESIDUAL=0, ATTN_GATE="off", VE_LAYERS="")
    i = model.active[5]  # PARALLEL_START=5
    ctx = tg.AttnContext(
        *model.rotary(16), None, tg.make_attention("sdpa", torch.zeros(2, 16, dtype=torch.bool), False)
    )
    return model.blocks[model.slots[i][0]], model.controls[model.control_of[i]], ctx, torch.randn(2, 16, 32)


def test_gptj_form_reads_one_input_in_attention_and_mlp():
    """GPT-J (#1493): x_in + attention(x_in) + MLP(x_in), where the sequential block's MLP reads attention's output."""
    block, c, ctx, x = parallel_layer("gptj")
    x0 = torch.randn_like(x)
    with torch.no_grad():
        x_in = c.resid_mix[0] * x + c.resid_mix[1] * x0
        n = tg.rms_norm(x_in) * 0.5
        parallel = x_in + c.attn_scale * block.attn(n, c, ctx, False) + c.mlp_scale * block.mlp(n)
        assert c.form == "gptj" and c.lane_mix is None  # no parameters of its own
        out = block(tg.Stream(x), x0, c, ctx, 0.5, False).lanes
        assert len(out) == 1 and torch.allclose(out[0], parallel, atol=1e-5)
        c.form = "sequential"
        assert not torch.allclose(block(tg.Stream(x), x0, c, ctx, 0.5, False).lanes[0], parallel, atol=1e-3)


def test_lane1_form_runs_the_mlp_on_lane_one_alone():
    """#1530's lanes: lane 1's MLP reads neither lane 0 nor x0, so with the attention write-back into lane 1 at 0,
    new lane 1 ignores both entirely; lane 0 and (through that write-back) lane 1 see attention's output."""
    block, c, ctx, x = parallel_layer("lane1")

    def run(lane0, x0):
        return block(tg.Stream(lane0, x + 1.0), x0, c, ctx, 0.5, False).lanes

    with torch.no_grad():
        c.resid_mix[1].normal_()
        base, other = run(x, torch.randn_like(x)), run(torch.randn_like(x), torch.randn_like(x))
        assert not torch.allclose(other[1], base[1]) and not torch.allclose(other[0], base[0])
        c.lane_mix[1, 0] = 0.0
        base, other = run(x, torch.randn_like(x)), run(torch.randn_like(x), torch.randn_like(x))
    assert torch.equal(other[1], base[1]) and not torch.allclose(other[0], base[0])
    fresh = tg.LayerControl(8, False, "lane1", False, "off", 2)
    assert fresh.lane_resid.tolist() == pytest.approx([1.1, 1.1]) and fresh.lane_mix.tolist() == [
        [1, 1],
        [1, 1],
    ]


def test_lane1_form_sends_skips_into_lane_zero_only(monkeypatch):
    """Active slots 0-3 encode, 4-7 decode; lanes from slot 5: slot 6's skip changes lane 0 of its input, never lane 1."""
    model = full_model(PARALLEL_FORM="lane1")
    assert [model.controls[model.control_of[i]].form for i in model.active] == ["sequential"] * 5 + [
        "lane1"
    ] * 3
    inputs, forward = [], tg.Block.forward
    monkeypatch.setattr(tg.Block, "forward", lambda self, x, *a: inputs.append(x) or forward(self, x, *a))
    ids = torch.randint(2, 128, (2, 32))
    with torch.no_grad():
        model.logits(ids)
        model.skip_weights[2].zero_()  # the skip into slot 6
        model.logits(ids)
    (lane0, lane1), (lane0_no_skip, lane1_no_skip) = inputs[6].lanes, inputs[14].lanes
    assert torch.equal(lane1, lane1_no_skip) and not torch.allclose(lane0, lane0_no_skip)
    model.logits(ids).sum().backward()  # every lane lambda trains
    assert all(c.lane_resid.grad.abs().sum() > 0 for c in model.controls if c.form == "lane1")


def copy_shared(src, dst):
    """dst takes every weight of src that it has (a model without some optional component)."""
    own = dst.state_dict()
    dst.load_state_dict({k: v for k, v in src.state_dict().items() if k in own})


def test_value_residual_mix_and_attention_gate_reduce_to_plain_attention():
    ids = torch.randint(2, 128, (2, 32))
    full = full_model()
    plain = full_model(VALUE_RESIDUAL=0, ATTN_GATE="off")
    copy_shared(full, plain)
    assert full.controls[0].v_mix is None and all(c.v_mix is not None for c in full.controls[1:])
    with torch.no_grad():
        for c in full.controls:
            c.attn_gate.weight.zero_()
            c.attn_gate.bias.fill_(40.0)  # sigmoid = 1: an open gate
            if c.v_mix is not None:
                c.v_mix.copy_(torch.tensor([0.0, 1.0]))  # only this layer's own values
    assert torch.allclose(full.logits(ids), plain.logits(ids), atol=1e-5)
    with torch.no_grad():
        full.controls[3].v_mix.copy_(torch.tensor([1.0, 0.0]))  # layer 3 attends over layer 0's values
    assert not torch.allclose(full.logits(ids), plain.logits(ids), atol=1e-3)
    with torch.no_grad():
        full.controls[3].v_mix.copy_(torch.tensor([0.0, 1.0]))
        full.controls[2].attn_gate.bias.fill_(-40.0)  # a shut gate silences layer 2's attention
        plain.controls[2].attn_scale.zero_()
    assert torch.allclose(full.logits(ids), plain.logits(ids), atol=1e-5)


def test_gates_and_mixes_train_with_adamw_and_stay_fp16():
    """Every 2-D tensor under blocks.* is a CastedLinear weight (Muon, int6); the new per-layer
    parameters live under controls.* and go to AdamW and fp16."""
    model = full_model()
    linear = {f"blocks.{n}.weight" for n, m in model.blocks.named_modules() if isinstance(m, tg.CastedLinear)}
    assert {n for n, p in model.named_parameters() if n.startswith("blocks.") and p.ndim == 2} == linear
    h = tg.Hyperparameters.from_env({k: str(v) for k, v in FULL.items()})
    muon, _ = tg.build_optimizers(model, h, tg.Runtime(0, 1, 0, torch.device("cpu"), False))
    in_muon = {id(p) for p in muon.param_groups[0]["params"]}
    for c in model.controls:
        assert all(id(p) not in in_muon for p in c.parameters())
    qstate = tg.quantize_state({k: v.detach() for k, v in model.state_dict().items()}, tg.quant_plan(h))
    assert all(q.bits == 0 for n, q in qstate.items() if n.startswith("controls."))


def test_controls_per_block_are_shared_by_recurrence_passes():
    """CONTROLS_PER=block (#1493): every pass of a looped block uses that block's controls and LN scale."""
    env = {
        "LOOP_START": "3",
        "LOOP_END": "5",
        "LOOP_REPEATS": "2",
        "LOOP_ENABLE_AT": "0.35",
        "VE_LAYERS": "",
        "PARALLEL_START": "13",
    }
    per_layer = tg.GPT(tg.Hyperparameters.from_env(env))
    per_block = tg.GPT(tg.Hyperparameters.from_env({**env, "CONTROLS_PER": "block"}))
    assert len(per_layer.controls) == 17 and len(per_block.controls) == 11
    assert per_block.control_of == [p for p, _ in per_block.slots]
    assert per_block.ln_factors[6] == per_block.ln_factors[3] == 1 / 2  # slot 6 reruns block 3
    assert (
        sum(p.numel() for p in per_layer.parameters()) - sum(p.numel() for p in per_block.parameters())
        == 6 * 2048
    )
    frozen = tg.ttt_params(per_block, 4)[1] - tg.ttt_params(per_block, 3)[1]
    assert (
        frozen == sum(p.numel() for p in per_block.blocks[3].parameters()) + 2048
    )  # block 3 and its controls
    with pytest.raises(tg.ConfigError, match="CONTROLS_PER=block: block 4"):
        tg.Hyperparameters.from_env(
            {**env, "CONTROLS_PER": "block", "VE_LAYERS": "4"}
        )  # slot 7 reruns block 4


@pytest.mark.parametrize("length", [2048, 4096])
def test_default_rope_is_the_records_effective_rope(length):
    # records-spec §3 and §10.6: R23 builds its rotary with train_seq_len hard-coded to 1024, so at T >= 1024
    # its 16 rotated dims use base 10000 * (T / 1024)^(16/14): about 22,082 at T = 2048, in training and eval
    h = tg.Hyperparameters.from_env(
        {
            "MODEL_DIM": "32",
            "NUM_HEADS": "2",
            "NUM_KV_HEADS": "1",
            "NUM_LAYERS": "1",
            "VE_LAYERS": "",
            "XSA_LAST_N": "0",
            "EVAL_SEQ_LEN": str(length),
        }
    )
    cos, sin = tg.GPT(h).rotary(length)
    r23_inv_freq = (10000 * (length / 1024) ** (16 / 14)) ** (
        -torch.arange(0, 16, 2, dtype=torch.float64) / 16
    )
    assert torch.allclose(torch.atan2(sin[1], cos[1]).double(), r23_inv_freq, rtol=1e-6)
    assert length > 2048 or round(h.model.rope_base) == 22082


def test_doc_attention_keeps_every_logit_of_the_next_document_bit_identical():
    """DOC_ATTENTION=1 with every component on: changing document N (same length) leaves each logit of
    document N+1 bit-identical; with plain causal attention the change leaks through."""
    ids = torch.randint(2, 128, (2, 32))
    ids[:, 0], ids[0, 12], ids[1, 20] = tg.BOS_ID, tg.BOS_ID, tg.BOS_ID
    changed = ids.clone()
    changed[0, 1:12] = (changed[0, 1:12] + 5) % 126 + 2
    changed[1, 3:20] = (changed[1, 3:20] + 9) % 126 + 2
    for doc, leaks in ((1, False), (0, True)):
        model = full_model(DOC_ATTENTION=doc, ATTN_KERNEL="sdpa")
        a, b = model.logits(ids), model.logits(changed)
        assert torch.equal(a[0, 12:], b[0, 12:]) != leaks and torch.equal(a[1, 20:], b[1, 20:]) != leaks
        assert not torch.allclose(a[0, :12], b[0, :12])


def test_doc_attention_kernels_agree():
    """The FlexAttention block mask (unfused off CUDA, forward only) and the dense SDPA mask give the same
    scores; a row without a BOS inside gives plain causal attention's."""
    model = full_model(DOC_ATTENTION=1, ATTN_KERNEL="sdpa")
    ids = torch.randint(2, 128, (3, 32))
    ids[0, 7], ids[0, 19], ids[1, 1] = tg.BOS_ID, tg.BOS_ID, tg.BOS_ID
    with torch.no_grad():
        dense = model.token_nll(ids[:, :-1], ids[:, 1:])
        model.attn_kernel = "flex"
        flex = model.token_nll(ids[:, :-1], ids[:, 1:])
        model.attn_kernel, model.doc_attention = "sdpa", False
        causal = model.token_nll(ids[:, :-1], ids[:, 1:])
    assert torch.allclose(dense, flex, atol=1e-5, rtol=1e-5)
    assert torch.allclose(dense[2], causal[2], atol=1e-6) and not torch.allclose(
        dense[0], causal[0], atol=1e-4
    )


def test_sparse_attention_gate_starts_at_half_and_reads_only_the_first_channels():
    """ATTN_GATE=sparse (#1787): per head sigmoid(0.5 * W x[:12]), W zero: every gate starts at exactly 0.5
    (the layer's attention output halved), 96 parameters per layer, and the channels past 12 never
    move it."""
    ids = torch.randint(2, 128, (2, 32))
    sparse = full_model(ATTN_GATE="sparse", MODEL_DIM=64)
    plain = full_model(ATTN_GATE="off", MODEL_DIM=64)
    copy_shared(sparse, plain)
    fresh = tg.GPT(
        tg.Hyperparameters.from_env({k: str(v) for k, v in {**FULL, "ATTN_GATE": "sparse"}.items()})
    )
    assert all(c.attn_gate.weight.shape == (4, 12) and not c.attn_gate.weight.any() for c in fresh.controls)
    with torch.no_grad():
        for c in sparse.controls:
            c.attn_gate.weight.zero_()  # as initialized (full_model perturbs every parameter)
        for c in plain.controls:
            c.attn_scale.mul_(0.5)  # the proj is linear: half the heads' output = half the branch
    assert torch.allclose(sparse.logits(ids), plain.logits(ids), atol=1e-5)
    x = torch.randn(2, 5, 64)
    gate = sparse.controls[1].attn_gate
    with torch.no_grad():
        gate.weight.normal_()
    moved = x.clone()
    moved[..., 12:] += 1.0
    assert torch.equal(gate(x), gate(moved)) and not torch.equal(gate(x), gate(x + 1.0))


def test_input_dependent_smeargate_starts_as_identity_and_stops_at_a_bos():
    """SMEAR_INPUT_DIMS=12 (#1855): x_t + lam * sigmoid(w . x_t[:12]) * x_{t-1}, lam = 0 and w = 0 at init
    (13 parameters, the identity), never across a BOS or a row start."""
    smear = tg.SmearGate(64, 12)
    assert sum(p.numel() for p in smear.parameters()) == 13
    x = torch.randn(1, 6, 64)
    starts = torch.tensor([[True, False, False, True, False, False]])
    assert torch.equal(smear(x, starts), x)
    with torch.no_grad():
        smear.lam.fill_(0.7)
        smear.weight.normal_()
    y = smear(x, starts)
    assert (
        torch.equal(y[0, 3], x[0, 3])
        and torch.equal(y[0, 0], x[0, 0])
        and not torch.allclose(y[0, 4], x[0, 4])
    )
    x2 = x.clone()
    x2[0, 2] += 1.0  # the token before the BOS
    assert torch.equal(smear(x2, starts)[0, 3:], y[0, 3:])
    model = full_model(SMEAR_INPUT_DIMS=12, DOC_ATTENTION=1, ATTN_KERNEL="sdpa")
    ids = torch.randint(2, 128, (1, 32))
    ids[0, 0], ids[0, 16] = tg.BOS_ID, tg.BOS_ID
    with torch.no_grad():
        model.smear.lam.fill_(1.0)
    changed = ids.clone()
    changed[0, 1:16] = (changed[0, 1:16] + 5) % 126 + 2
    assert torch.equal(model.logits(ids)[0, 16:], model.logits(changed)[0, 16:])
