"""Muon (Newton-Schulz, sharded across ranks), AdamW grouping, LR schedule, EMA/SWA."""

import pytest
import torch

from conftest import SILENT, cpu_runtime, run_distributed, tg
from test_model import full_model


@pytest.mark.parametrize(
    "polar, steps, lo, hi", [(False, 5, 0.6, 1.25), (True, 5, 0.85, 1.15), (True, 4, 0.4, 1.6)]
)  # 4 of 5: rougher
def test_newton_schulz_orthogonalizes(polar, steps, lo, hi):
    torch.manual_seed(0)
    G = torch.randn(4, 64, 32) @ torch.diag(torch.logspace(0, -2, 32))  # condition number 100
    X = tg.newton_schulz(G, steps, polar)
    s = torch.linalg.svdvals(X)
    assert X.shape == G.shape and s.min() > lo and s.max() < hi
    assert torch.allclose(tg.newton_schulz(G.mT, steps, polar), X.mT, atol=1e-5)  # tall and wide agree


def test_polar_express_steps_are_the_first_of_its_five():
    """MUON_BACKEND_STEPS=4 with Polar Express (#1539) runs its first 4 tuned steps; a 6th does not exist."""
    G = torch.randn(2, 16, 8)
    X = G / G.norm(dim=(-2, -1), keepdim=True)
    for a, b, c in tg.NS_POLAR[:4]:
        A = X @ X.mT
        X = a * X + (b * A + c * (A @ A)) @ X
    assert torch.allclose(tg.newton_schulz(G.mT, 4, True), X.mT, atol=1e-5)
    tg.Hyperparameters.from_env({"MUON_NS": "polar", "MUON_BACKEND_STEPS": "4"})
    with pytest.raises(tg.ConfigError, match="MUON_BACKEND_STEPS=1..5"):
        tg.Hyperparameters.from_env({"MUON_NS": "polar", "MUON_BACKEND_STEPS": "6"})


SHAPES = [(16, 8)] * 3 + [(8, 24)] * 2 + [(12, 12)]


def muon_run(rank, world, row_normalize):
    rt = tg.Runtime(rank, world, 0, torch.device("cpu"), False)
    gen = torch.Generator().manual_seed(1)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in SHAPES]
    opt = tg.Muon(
        params,
        lr=0.05,
        momentum=0.9,
        weight_decay=0.1,
        ns=tg.MuonNS(5, False, row_normalize),
        rt=rt,
    )
    for _ in range(3):
        for p in params:  # each rank its own gradient; their mean is `base`, one process's
            base, noise = torch.randn(p.shape, generator=gen), torch.randn(p.shape, generator=gen)
            p.grad = base + (rank - (world - 1) / 2) * noise
        opt.step()
    return [p.detach().clone() for p in params]


@pytest.mark.parametrize("row_normalize", [False, True])
def test_muon_two_ranks_equal_one(tmp_path, row_normalize):
    """Gradients reduce-scattered into each rank's share of a stack (3 matrices over 2 ranks: one padded),
    momentum on the share, the orthogonalized shares all-gathered: the one-process update."""
    single = muon_run(0, 1, row_normalize)
    for result in run_distributed(muon_run, 2, tmp_path, row_normalize):
        for a, b in zip(result, single):
            assert torch.allclose(a, b, atol=1e-6)
    start = [torch.randn(s, generator=torch.Generator().manual_seed(1)) for s in SHAPES[:1]]
    assert not torch.allclose(single[0], start[0])  # the step did something


def test_muon_update_is_scaled_orthogonal_with_decay():
    rt = cpu_runtime()
    p = torch.nn.Parameter(torch.randn(24, 8))
    before = p.detach().clone()
    p.grad = torch.randn(24, 8)
    tg.Muon([p], lr=0.1, momentum=0.0, weight_decay=0.5, ns=tg.MuonNS(5, True, False), rt=rt).step()
    update = (before * (1 - 0.1 * 0.5) - p.detach()) / (0.1 * 3**0.5)  # sqrt(rows/cols) = sqrt(3)
    s = torch.linalg.svdvals(update)
    assert s.min() > 0.8 and s.max() < 1.2


def test_muon_momentum_buffer_is_made_once_and_steps_nesterov(monkeypatch):
    gen = torch.Generator().manual_seed(3)
    p = torch.nn.Parameter(torch.randn(16, 8, generator=gen))
    opt = tg.Muon(
        [p],
        lr=0.05,
        momentum=0.9,
        weight_decay=0.1,
        ns=tg.MuonNS(5, False, False),
        rt=cpu_runtime(),
    )
    buf = opt.state[p]["momentum_buffer"]
    w, m = p.detach().clone(), torch.zeros(16, 8)
    made = []
    monkeypatch.setattr(torch, "zeros_like", lambda *a, **k: made.append(a) or torch.zeros(a[0].shape))
    for _ in range(3):
        p.grad = torch.randn(16, 8, generator=gen)
        m = 0.9 * m + p.grad
        w = w * (1 - 0.05 * 0.1) - 0.05 * 2**0.5 * tg.newton_schulz((p.grad + 0.9 * m)[None], 5, False)[0]
        opt.step()
        assert opt.state[p]["momentum_buffer"].data_ptr() == buf.data_ptr()  # updated in place
    assert not made  # no step allocates (or zeroes) a buffer
    assert torch.allclose(buf, m, atol=1e-6) and torch.allclose(p.detach(), w, atol=1e-6)


def test_parameter_groups_cover_every_parameter_once():
    model = full_model()
    muon, adam = tg.build_optimizers(model, tg.Hyperparameters.from_env({}), cpu_runtime())
    groups = [muon.param_groups[0]["params"], adam.param_groups[0]["params"], adam.param_groups[1]["params"]]
    ids = [id(p) for g in groups for p in g]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    assert all(p.ndim == 2 for p in groups[0]) and len(groups[0]) == 6 * len(model.blocks)
    assert {id(p) for p in groups[1]} == {
        id(model.tok_emb.weight),
        id(model.bigram.embed.weight),
        id(model.value_embed.embed.weight),
    }
    assert id(model.bigram.proj.weight) in {id(p) for p in groups[2]}


def test_lr_schedule_with_a_fake_clock():
    h = tg.Hyperparameters.from_env({"WARMDOWN_ITERS": "10", "ITERATIONS": "100"})
    # wallclock: 10 ms/step, cap 1000 ms -> the last 100 ms decay linearly
    assert tg.lr_multiplier(50, 500.0, 1000.0, h) == 1.0
    assert tg.lr_multiplier(95, 950.0, 1000.0, h) == pytest.approx(0.5)
    assert tg.lr_multiplier(100, 1000.0, 1000.0, h) == 0.0
    assert (
        tg.lr_multiplier(
            99, 990.0, 1000.0, tg.Hyperparameters.from_env({"WARMDOWN_ITERS": "10", "MIN_LR": "0.2"})
        )
        == 0.2
    )
    # no cap: iteration-based
    assert tg.lr_multiplier(95, 0.0, 0.0, h) == pytest.approx(0.5)
    assert tg.lr_multiplier(10, 0.0, 0.0, h) == 1.0
    # WARMDOWN_FRAC: the last half of the cap (or of the iterations), whatever the step time
    f = tg.Hyperparameters.from_env({"WARMDOWN_FRAC": "0.5", "ITERATIONS": "100", "MIN_LR": "0.1"})
    assert [
        tg.lr_multiplier(s, ms, 1000.0, f) for s, ms in ((1, 10.0), (3, 500.0), (4, 750.0), (5, 990.0))
    ] == pytest.approx([1.0, 1.0, 0.5, 0.1])
    assert (
        tg.lr_multiplier(75, 0.0, 0.0, f) == pytest.approx(0.5) and tg.lr_multiplier(40, 0.0, 0.0, f) == 1.0
    )


def test_short_run_schedule_warns_or_scales(small_data):
    """A run shorter than WARMDOWN_ITERS starts in warmdown (lr_mul < 1 at step 0): the log says so.
    With WARMDOWN_FRAC the LR holds at 1, then decays over the configured fraction of the run."""
    from conftest import hparams

    taper = {"MUON_WD_TAPER_AT": 0.5, "MUON_WD_TAPER_TO": 0.5, "MUON_WD": 0.1}
    for over, warned in (({"WARMDOWN_ITERS": 100}, True), ({"WARMDOWN_FRAC": 0.5, **taper}, False)):
        h = hparams(small_data, ITERATIONS=4, WARMUP_STEPS=0, LATE_QAT_THRESHOLD=0.5, **over)
        lines, muls, wds = [], [], []
        model = tg.GPT(h)
        rt = cpu_runtime()
        real, real_step = tg.lr_multiplier, tg.Muon.step
        tg.lr_multiplier = lambda *a: muls.append(real(*a)) or muls[-1]
        tg.Muon.step = lambda opt: wds.append(opt.param_groups[0]["weight_decay"]) or real_step(opt)
        try:
            tg.train_model(
                model,
                h,
                rt,
                tg.TrainLoader(tg.find_shards(h, "train")[0], rt),
                tg.load_val_tokens(h, rt),
                tg.build_byte_luts(tg.load_tokenizer(h), "cpu"),
                lines.append,
            )
        finally:
            tg.lr_multiplier, tg.Muon.step = real, real_step
        warning = [l for l in lines if l.startswith("warning: the LR warmdown starts at step 0")]
        assert bool(warning) == warned, lines
        if warned:
            assert "lr_mul 0.040, late QAT on at once" in warning[0] and "WARMDOWN_FRAC" in warning[0]
        else:
            assert muls == pytest.approx([1.0, 1.0, 1.0, 0.5])
            assert wds == pytest.approx(
                [0.1, 0.1, 0.1, 0.075]
            )  # step 3 of 4: half-way down the taper to 0.5x


def test_muon_weight_decay_taper():
    h = tg.Hyperparameters.from_env({"MUON_WD_TAPER_AT": "0.7", "MUON_WD_TAPER_TO": "0.5"})
    assert [tg.muon_wd_multiplier(p, h) for p in (0.0, 0.7, 0.85, 1.0, 1.2)] == pytest.approx(
        [1, 1, 0.75, 0.5, 0.5]
    )
    assert tg.muon_wd_multiplier(0.99, tg.Hyperparameters.from_env({})) == 1.0  # off by default
    assert (
        tg.muon_wd_multiplier(1.1, tg.Hyperparameters.from_env({"MUON_WD_TAPER_TO": "0.5"})) == 1.0
    )  # past the cap


def test_ema_and_swa_math_and_export():
    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    h = tg.Hyperparameters.from_env({"EMA_DECAY": "0.5", "SWA_EVERY": "2", "SWA_START_LRMUL": "0.5"})
    avg = tg.WeightAverager(model, h)
    ema, snapshots = 0.0, []
    for step, (w, lr_mul) in enumerate([(1.0, 1.0), (2.0, 0.4), (3.0, 0.3), (4.0, 0.2)], start=1):
        with torch.no_grad():
            model.weight.fill_(w)
        avg.update(step, lr_mul, SILENT)
        ema = 0.5 * ema + 0.5 * w
        if lr_mul < 0.5 and step % 2 == 0:
            snapshots.append(ema)
        assert avg.ema[0].item() == pytest.approx(ema)
    assert avg.swa_count == 2 and snapshots == [1.25, 3.0625]
    label = avg.apply_final(SILENT)
    assert label.startswith("swa(2 snapshots of ema") and model.weight.item() == pytest.approx(
        sum(snapshots) / 2
    )
    # EMA alone is exported when SWA is off
    h2 = tg.Hyperparameters.from_env({"EMA_DECAY": "0.5"})
    avg2 = tg.WeightAverager(model, h2)
    with torch.no_grad():
        model.weight.fill_(10.0)
    avg2.update(1, 1.0, SILENT)
    before = avg2.ema[0].item()
    assert avg2.apply_final(SILENT).startswith("ema") and model.weight.item() == pytest.approx(before)


def test_embedding_weight_decay_is_separate_when_set():
    from test_model import full_model

    for env, expected in (({}, 0.04), ({"EMBED_WD": "0.085"}, 0.085)):
        h = tg.Hyperparameters.from_env({"ADAM_WD": "0.04", **env})
        _, adam = tg.build_optimizers(full_model(), h, cpu_runtime())
        assert [g["weight_decay"] for g in adam.param_groups] == [expected, 0.04]


def test_the_schedule_is_one_value_per_step_from_the_agreed_time():
    """plan_step is the whole schedule: recurrence stages at their fractions, the warmdown, the Muon WD taper,
    the momentum warm-up and late QAT's switch, read off one (step, agreed time) pair."""
    h = tg.Hyperparameters.from_env(
        dict(
            NUM_LAYERS="4",
            VE_LAYERS="",
            LOOP_START="1",
            LOOP_END="2",
            LOOP_REPEATS="2",
            LOOP_ENABLE_AT="0.3,0.6",
            WARMDOWN_FRAC="0.5",
            LATE_QAT_THRESHOLD="0.15",
            MUON_MOMENTUM_WARMUP_STEPS="10",
            MUON_WD_TAPER_AT="0.8",
            MUON_WD_TAPER_TO="0.5",
        )
    )
    table = {
        ms: tg.plan_step(step, ms, 1000.0, h) for step, ms in ((0, 0.0), (5, 300.0), (20, 700.0), (40, 950.0))
    }
    assert [p.stage for p in table.values()] == [0, 1, 2, 2]
    assert [p.lr_mul for p in table.values()] == pytest.approx([1.0, 1.0, 0.6, 0.1])
    assert [p.wd_mul for p in table.values()] == pytest.approx([1.0, 1.0, 1.0, 0.625])
    assert [p.momentum for p in table.values()] == pytest.approx([0.92, 0.955, 0.99, 0.99])
    assert [p.qat for p in table.values()] == [False, False, False, True]
    # without a cap the same schedule runs on the step's share of ITERATIONS
    uncapped = h.replace(iterations=100)
    assert tg.plan_step(60, 123.0, 0.0, uncapped) == tg.plan_step(60, 600.0, 1000.0, uncapped)
