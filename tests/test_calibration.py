"""Full-GPTQ calibration: one X^T X per distinct input, and reads stop when told (the training cap)."""

import torch

from conftest import cpu_runtime, hparams, tg


def test_hessians_one_product_per_input_and_no_read_after_stop(small_data, monkeypatch):
    h = hparams(small_data, GPTQ_CALIB_BATCHES=5, TRAIN_BATCH_TOKENS=1024)
    rt = cpu_runtime()
    torch.manual_seed(0)
    model = tg.GPT(h)
    files = tg.find_shards(h, "train")[0]
    # reference: every matrix's own X^T X over the first two micro-batches
    expected, ref_loader = {}, tg.TrainLoader(files, rt)

    def naive_hook(name):
        def hook(module, inputs, output):
            x = inputs[0].reshape(-1, inputs[0].size(-1))
            expected[name] = expected.get(name, 0) + x.T @ x

        return hook

    hooks = [
        m.register_forward_hook(naive_hook(f"blocks.{n}.weight"))
        for n, m in model.blocks.named_modules()
        if isinstance(m, tg.CastedLinear)
    ]
    with torch.no_grad():
        for _ in range(2):
            model.hidden(ref_loader.next_batch(h.train.train_batch_tokens, h.model.train_seq_len)[0])
    for hook in hooks:
        hook.remove()

    asked, matmuls = [], []

    def may_read():  # the training cap arrives after two batches
        asked.append(1)
        return len(asked) <= 2

    real_matmul = torch.Tensor.__matmul__
    real_addmm = torch.Tensor.addmm_
    monkeypatch.setattr(torch.Tensor, "__matmul__", lambda a, b: matmuls.append(1) or real_matmul(a, b))
    monkeypatch.setattr(torch.Tensor, "addmm_", lambda t, a, b: matmuls.append(1) or real_addmm(t, a, b))
    loader = tg.TrainLoader(files, rt)
    hessians = tg.collect_hessians(model, loader, h, rt, may_read)
    monkeypatch.undo()
    assert len(asked) == 3 and loader.state() == ref_loader.state()  # 2 batches read, then none
    assert set(hessians) == set(expected) | {"tok_emb.weight"}
    for name, H in expected.items():
        assert torch.allclose(hessians[name], H, rtol=1e-5, atol=1e-3), name
    # c_q, c_k and c_v read the same input: 4 products per layer (+ the head's), not 6, and one tensor
    assert len(matmuls) == 2 * (4 * h.model.num_layers + 1)
    assert hessians["blocks.0.attn.c_k.weight"] is hessians["blocks.0.attn.c_q.weight"]
