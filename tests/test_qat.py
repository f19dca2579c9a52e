"""Late QAT really runs inside the compiled graph, on the exporter's grid; recurrence stages recompile."""

import copy

import pytest
import torch

from conftest import tg
from test_model import full_model


def test_compiled_qat_and_stage_switch_match_eager():
    torch._dynamo.reset()
    model = full_model(
        NUM_LAYERS=2,
        UNIQUE_LAYERS=0,
        LOOP_START=0,
        LOOP_END=0,
        LOOP_REPEATS=1,
        LOOP_ENABLE_AT=0.5,
        VE_LAYERS="1",
        PARALLEL_START=2,
        XSA_LAST_N=1,
    )
    model.set_stage(0)
    compiled = torch.compile(model, dynamic=False, fullgraph=True)
    ids, targets = torch.randint(0, 128, (2, 32)), torch.randint(0, 128, (2, 32))
    plain = compiled(ids, targets)
    assert torch.allclose(plain, model(ids, targets), atol=1e-5)

    plan = {"attn": (6, 12.85), "mlp": (5, 0.0), "embed": (8, 20.0)}  # SDClip attention, MSE-clip int5 MLP
    model.set_qat(plan)
    qat = compiled(ids, targets)
    qat.backward()
    reference = copy.deepcopy(model)
    reference.set_qat(None)
    with torch.no_grad():
        for name, m in reference.blocks.named_modules():
            if isinstance(m, tg.CastedLinear):
                m.weight.copy_(tg.fake_quantize(m.weight, *plan[name.split(".")[1]]))
    ref = reference(ids, targets)
    ref.backward()
    assert torch.allclose(qat, ref, atol=1e-5) and abs(qat.item() - plain.item()) > 1e-4
    for (name, p), q in zip(model.blocks.named_parameters(), reference.blocks.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-5), name  # straight-through gradient

    model.set_qat(None)
    model.set_stage(1)  # the looped pass joins: a new schedule, one recompile
    assert torch.allclose(compiled(ids, targets), model(ids, targets), atol=1e-5)
    assert len(model.active) == 3


@pytest.mark.parametrize("clip", ["sd", "mse"])
def test_fake_quantize_is_the_export_grid(clip):
    h = tg.Hyperparameters.from_env({"QUANT_CLIP": clip, "QUANT_BITS_MLP": "5"})
    model = full_model()
    model.set_qat(tg.quant_plan(h))
    qstate = tg.quantize_state(
        {f"blocks.{k}": v for k, v in model.blocks.state_dict().items()}, tg.quant_plan(h)
    )
    for name, m in model.blocks.named_modules():
        if isinstance(m, tg.CastedLinear):
            q = qstate[f"blocks.{name}.weight"]
            assert m.qat == tg.quant_plan(h)[name.split(".")[1]] and q.bits == m.qat[0]
            assert torch.equal(q.dequantize(), tg.fake_quantize(m.weight.detach(), *m.qat))
