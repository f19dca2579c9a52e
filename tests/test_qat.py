"""Late QAT really runs inside the compiled graph, on the exporter's grid; recurrence stages recompile."""

import copy

import torch

from conftest import tg
from test_model import full_model


def test_compiled_qat_and_stage_switch_match_eager():
    torch._dynamo.reset()
    model = full_model(NUM_LAYERS=2, UNIQUE_LAYERS=0, LOOP_START=0, LOOP_END=0, LOOP_REPEATS=1, LOOP_ENABLE_AT=0.5,
                       VE_LAYERS="1", PARALLEL_START=2, XSA_LAST_N=1)
    model.set_stage(0)
    compiled = torch.compile(model, dynamic=False, fullgraph=True)
    ids, targets = torch.randint(0, 128, (2, 32)), torch.randint(0, 128, (2, 32))
    plain = compiled(ids, targets)
    assert torch.allclose(plain, model(ids, targets), atol=1e-5)

    model.set_qat(6)
    qat = compiled(ids, targets)
    qat.backward()
    reference = copy.deepcopy(model)
    reference.set_qat(0)
    with torch.no_grad():
        for name, m in reference.blocks.named_modules():
            if isinstance(m, tg.CastedLinear):
                m.weight.copy_(tg.fake_quantize(m.weight, 6))
    ref = reference(ids, targets)
    ref.backward()
    assert torch.allclose(qat, ref, atol=1e-5) and abs(qat.item() - plain.item()) > 1e-4
    for (name, p), q in zip(model.blocks.named_parameters(), reference.blocks.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-5), name  # straight-through gradient

    model.set_qat(0)
    model.set_stage(1)  # the looped pass joins: a new schedule, one recompile
    assert torch.allclose(compiled(ids, targets), model(ids, targets), atol=1e-5)
    assert len(model.active) == 3


def test_fake_quantize_is_the_export_grid():
    w = torch.randn(16, 64)
    q = tg.quantize_state({"blocks.0.mlp.fc.weight": torch.randn(300, 300), "w": w}, tg.Hyperparameters.from_env({}))
    big = torch.randn(300, 300)
    qt = tg.quantize_state({"blocks.0.mlp.fc.weight": big}, tg.Hyperparameters.from_env({}))["blocks.0.mlp.fc.weight"]
    assert torch.equal(qt.dequantize(), tg.fake_quantize(big, 6))
    assert q["w"].bits == 0
