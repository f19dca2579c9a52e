"""Scoring: every target exactly once, causal (C1), score before update (C3), TTT budget guard."""

import numpy as np
import pytest
import torch

from conftest import SILENT, cpu_runtime, hparams, run_distributed, tg


@pytest.mark.parametrize(
    "n, L, stride, chunk",
    [
        (1000, 64, 16, 0),
        (1000, 64, 64, 0),
        (1001, 64, 32, 256),
        (64, 64, 8, 0),
        (5000, 128, 48, 480),
        (300, 64, 16, 32),
        (777, 100, 1, 100),
    ],
)
def test_every_target_scored_exactly_once(n, L, stride, chunk):
    w = tg.plan_windows(n, L, stride, chunk)
    start, lo, hi = w.T
    assert lo[0] == 0 and hi[-1] == n and (lo[1:] == hi[:-1]).all() and (hi > lo).all()
    assert (start >= 0).all() and (start + L <= n).all() and (lo >= start).all() and (hi <= start + L).all()
    # left context: at least L - stride tokens, or everything before the target
    assert ((lo - start) >= np.minimum(lo, L - stride)).all()
    if chunk:
        assert ((lo // chunk) == ((hi - 1) // chunk)).all()  # no window straddles a TTT chunk
    for world in (1, 2, 3, 8):
        shares = [tg.rank_share(w, cpu_runtime(r, world)) for r in range(world)]
        assert np.array_equal(np.concatenate(shares), w)


def test_scored_count_equals_val_targets(small_data):
    h = hparams(small_data, VAL_MAX_TOKENS=0)
    rt = cpu_runtime()
    tokens = tg.load_val_tokens(h, rt)
    luts = tg.build_byte_luts(tg.load_tokenizer(h), "cpu")

    def fake(x, y):
        return torch.zeros(x.shape)

    for stride in (64, 17):
        assert int(tg.evaluate(fake, tokens, 64, stride, 16, luts, rt)[2]) == tokens.numel() - 1


def tiny_setup(data, seed=0, **over):
    h = hparams(data, **over)
    torch.manual_seed(seed)
    model = tg.GPT(h)
    with torch.no_grad():  # a non-trivial untrained model: no identity-initialized branch
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    rt = cpu_runtime()
    luts = tg.build_byte_luts(tg.load_tokenizer(h), "cpu")
    return h, model, rt, tg.load_val_tokens(h, rt), luts


class Recorder:
    def __init__(self):
        self.events, self.scores = [], {}

    def __call__(self, kind, idx, nll):
        self.events.append((kind, idx.flatten().tolist()))
        if kind == "score":
            for i, v in zip(idx.tolist(), nll.tolist()):
                assert i not in self.scores, "scored twice"
                self.scores[i] = v


def sliding_scores(model, tokens, h, rt, luts):
    rec = Recorder()
    w = tg.plan_windows(tokens.numel() - 1, h.eval_len, h.eval.eval_stride)
    tg.score_windows(tg.EvalContext(h, rt, luts, observer=rec), model.token_nll, tokens, w, h.eval_len, 8)
    return rec.scores


def ttt_scores(model, tokens, h, rt, luts):
    rec = Recorder()
    totals, info = tg.eval_ttt(tg.EvalContext(h, rt, luts, SILENT, rec), model, tokens, 1e9)
    return rec, totals, info


def test_c1_sliding_scores_do_not_see_the_future(small_data):
    h, model, rt, tokens, luts = tiny_setup(small_data, VAL_MAX_TOKENS=1500)
    p = 700
    before = sliding_scores(model, tokens, h, rt, luts)
    changed = tokens.clone()
    changed[p + 1 :] = torch.randint(2, 500, changed[p + 1 :].shape, dtype=changed.dtype)
    after = sliding_scores(model, changed, h, rt, luts)
    assert len(before) == tokens.numel() - 1
    assert all(after[j] == before[j] for j in range(p))  # targets 0..p-1 are tokens 1..p: bit-identical
    assert any(after[j] != before[j] for j in range(p, len(before)))


def test_c1_and_c3_in_ttt_across_chunks(small_data):
    h, model, rt, tokens, luts = tiny_setup(
        small_data, VAL_MAX_TOKENS=3000, TTT_EPOCHS=2, TTT_LR=0.05, TTT_BATCH_SEQS=4
    )
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rec, _, info = ttt_scores(model, tokens, h, rt, luts)
    assert info["chunks"] == 3 and len(rec.scores) == tokens.numel() - 1
    # C3: every target handed to the optimizer was already scored
    scored = set()
    trained = 0
    for kind, idx in rec.events:
        if kind == "score":
            scored.update(idx)
        else:
            assert set(idx) <= scored
            trained += len(idx)
    assert trained == 2 * 2 * 1024  # 2 epochs of chunks 0 and 1; the last chunk is never trained on
    # C1: with TTT between chunks, a change after token p still leaves every score before p identical
    p = 1500  # inside chunk 1: its update reaches chunk 2 only
    model.load_state_dict(state)
    changed = tokens.clone()
    changed[p + 1 :] = torch.randint(2, 500, changed[p + 1 :].shape, dtype=changed.dtype)
    rec2, _, _ = ttt_scores(model, changed, h, rt, luts)
    assert all(rec2.scores[j] == rec.scores[j] for j in range(p))
    assert any(rec2.scores[j] != rec.scores[j] for j in range(2048, 2999))  # chunk 2 saw other updates


def test_ttt_with_zero_epochs_is_sliding_eval(small_data):
    h, model, rt, tokens, luts = tiny_setup(small_data, VAL_MAX_TOKENS=3000, TTT_EPOCHS=0)
    sliding = tg.evaluate(model.token_nll, tokens, h.eval_len, h.eval.eval_stride, 8, luts, rt)
    totals, _ = tg.eval_ttt(tg.EvalContext(h, rt, luts, SILENT), model, tokens, 1e9)
    assert torch.equal(totals[1:], sliding[1:])
    assert torch.allclose(totals, sliding, rtol=1e-10)


def ttt_rank(rank, world, data):
    # SGD is linear in the gradients, so it checks the rank-averaged gradients strictly (AdamW's
    # normalization would turn float rounding in near-zero gradients into visible updates)
    h, model, _, tokens, luts = tiny_setup(
        data, VAL_MAX_TOKENS=3000, TTT_EPOCHS=2, TTT_LR=0.05, TTT_BATCH_SEQS=3
    )
    totals, _ = tg.eval_ttt(tg.EvalContext(h, cpu_runtime(rank, world), luts, SILENT), model, tokens, 1e9)
    return totals, [p.detach().clone() for p in model.parameters()]


def test_ttt_on_two_ranks_equals_one(tmp_path, small_data):
    single, params = ttt_rank(0, 1, small_data)
    for totals, ps in run_distributed(ttt_rank, 2, tmp_path, small_data):
        assert torch.allclose(totals, single, rtol=1e-6)
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(ps, params))
    assert not torch.allclose(params[0], tiny_setup(small_data)[1].tok_emb.weight)  # TTT changed the weights


def test_ttt_lowers_bpb_of_a_trained_model(small_data):
    h = hparams(
        small_data,
        ITERATIONS=80,
        WARMDOWN_ITERS=20,
        VAL_MAX_TOKENS=6144,
        TTT_CHUNK_TOKENS=1024,
        TTT_EPOCHS=2,
        TTT_LR=0.01,
        EMA_DECAY=0,
        LATE_QAT_THRESHOLD=0,
        WARMUP_STEPS=0,
    )
    rt = cpu_runtime()
    torch.manual_seed(0)
    model = tg.GPT(h)
    luts = tg.build_byte_luts(tg.load_tokenizer(h), "cpu")
    tokens = tg.load_val_tokens(h, rt)
    tg.train_model(model, h, rt, tg.TrainLoader(tg.find_shards(h, "train")[0], rt), tokens, luts, SILENT)
    _, sliding = tg.loss_and_bpb(
        tg.evaluate(model.token_nll, tokens, h.eval_len, h.eval.eval_stride, 8, luts, rt)
    )
    _, ttt = tg.loss_and_bpb(tg.eval_ttt(tg.EvalContext(h, rt, luts, SILENT), model, tokens, 1e9)[0])
    assert sliding < 3.5 and ttt < sliding - 0.003


class FakeClock:
    """The runtime's clock (Runtime.time) for the TTT budget guard: time advances only through the eval's
    observer, by a cost per scored batch and per trained micro-batch (plus one-offs), each times the
    machine's slowdown in that chunk, so guard tests need no wall-clock margins."""

    def __init__(self, score_s=2.0, train_s=1.0, one_off_s=0.0, chunk_tokens=256, slowdown=lambda chunk: 1.0):
        self.t, self.score_s, self.train_s, self.one_off_s, self.C = (
            0.0,
            score_s,
            train_s,
            one_off_s,
            chunk_tokens,
        )
        self.slowdown, self.chunk = slowdown, 0
        self.epochs_by_chunk = {}

    def __call__(self):
        return self.t

    def observe(self, kind, idx, nll):
        self.t += self.one_off_s  # the first event of the pass: a compile, a cold cache
        self.one_off_s = 0.0
        if kind == "score":
            self.chunk = int(idx.min()) // self.C
            self.t += self.score_s * self.slowdown(self.chunk)
        else:
            chunk = int(idx.min()) // self.C
            self.epochs_by_chunk[chunk] = self.epochs_by_chunk.get(chunk, 0) + 1
            cost = self.train_s(chunk) if callable(self.train_s) else self.train_s
            self.t += cost * self.slowdown(chunk)


def guarded_ttt(data, monkeypatch, clock, budget, **over):
    """32 chunks of 256 targets: 1 scored batch (2 s) per chunk, 1 training micro-batch per epoch."""
    h, model, rt, tokens, luts = tiny_setup(
        data, VAL_MAX_TOKENS=32 * 256, TTT_CHUNK_TOKENS=256, TTT_EPOCHS=3, **over
    )
    rt.time = clock
    _, info = tg.eval_ttt(tg.EvalContext(h, rt, luts, SILENT, clock.observe), model, tokens, budget)
    assert info["chunks"] == 32 and info["planned"] == 31 * 3
    assert info["trained"] == sum(clock.epochs_by_chunk.values())
    return info


def test_budget_guard_ignores_a_one_off_in_chunk_1(small_data, monkeypatch):
    """64 s of scoring + 93 s of training fit a 200-s budget even after a 30-s stall in chunk 1; the
    old guard averaged the stall into every later chunk and cut epochs."""
    clock = FakeClock(one_off_s=30.0)
    info = guarded_ttt(small_data, monkeypatch, clock, budget=200.0)
    assert info["trained"] == info["planned"] and not info["epoch_changes"]
    assert clock.t == pytest.approx(30 + 64 + 93)


def test_budget_guard_cuts_what_cannot_fit_and_ends_in_time(small_data, monkeypatch):
    """Scoring alone takes 64 s: a 100-s budget leaves room for about 34 of the 93 chunk-epochs; the guard
    reserves the rest's scoring at a pessimistic rate, so it trains somewhat fewer and ends inside."""
    clock = FakeClock()
    info = guarded_ttt(small_data, monkeypatch, clock, budget=100.0)
    assert clock.t <= 100.0
    assert info["epoch_changes"] and 24 <= info["trained"] <= 34


def test_budget_guard_ends_inside_its_budget_through_a_4x_slowdown(small_data, monkeypatch):
    """The machine runs 4x slower in chunks 13-20 of 32 (scoring and training), as under a neighbour's load:
    the guard sees it in the first slow chunk's scoring, stops adapting while it lasts, and the pass still
    ends inside its budget; once the machine is fast again it trains again."""
    clock = FakeClock(slowdown=lambda chunk: 4.0 if 12 <= chunk < 20 else 1.0)
    info = guarded_ttt(small_data, monkeypatch, clock, budget=160.0)
    assert clock.t <= 160.0, (clock.t, clock.epochs_by_chunk)
    assert sum(clock.epochs_by_chunk.get(c, 0) for c in range(22, 31)) >= 9, clock.epochs_by_chunk
    assert info["trained"] >= 30


def test_budget_guard_trains_again_after_cutting_to_zero(small_data, monkeypatch):
    """Epochs are slow in chunks 2-4 (20 s, 5 s, 20 s), then fast (1 s): the guard cuts to 0 epochs, and once
    its estimate fits again it sees the speed-up and trains again to the end."""
    clock = FakeClock(train_s=lambda chunk: {1: 20.0, 2: 5.0, 3: 20.0}.get(chunk, 1.0))
    guarded_ttt(small_data, monkeypatch, clock, budget=170.0)
    assert clock.t <= 170.0
    starved = min(c for c in range(1, 31) if c not in clock.epochs_by_chunk)
    assert sum(clock.epochs_by_chunk.get(c, 0) for c in range(starved, 31)) >= 10, clock.epochs_by_chunk


def test_budget_guard_probes_a_stale_estimate_only_with_room_for_two():
    """No epoch fits at the highest recent ratio (10 s an epoch) for PROBE_EVERY chunks: one epoch is probed
    once twice its cost at the fastest ratio measured (2.5 s) fits, never with less room."""
    guard = tg.TTTBudgetGuard(max_epochs=3, n_chunks=40, budget_s=1000.0)
    score = 1.0 / (1 + guard.SLACK)  # scoring measured so that its pessimistic estimate is 1 s
    guard.score_s += [(1, score), (2, score)]
    guard.take_epoch_sample(1, 2.5 * score)  # ratio 2.5
    guard.take_epoch_sample(2, 10 * score)  # ratio 10: the recent estimate
    assert guard.fit(chunk=5, left_s=9.0, rest=20, score_s=1.0) == 0  # too soon to probe
    assert guard.fit(chunk=12, left_s=4.9, rest=20, score_s=1.0) == 0  # room for less than two
    assert guard.fit(chunk=12, left_s=5.0, rest=20, score_s=1.0) == 1 and guard.probes == 1


def test_ttt_adamw_takes_its_own_beta2(small_data, monkeypatch):
    seen = []
    real = torch.optim.AdamW
    monkeypatch.setattr(
        torch.optim, "AdamW", lambda params, **kw: seen.append(kw["betas"]) or real(params, **kw)
    )
    for over, betas in (({}, (0.9, 0.95)), ({"TTT_BETA2": 0.999}, (0.9, 0.999))):
        h, model, rt, tokens, luts = tiny_setup(
            small_data, VAL_MAX_TOKENS=2048, TTT_OPTIMIZER="adamw", **over
        )
        tg.eval_ttt(tg.EvalContext(h, rt, luts, SILENT), model, tokens, 1e9)
        assert seen[-1] == betas


@pytest.mark.parametrize(
    "roundtrip_s, ttt, sliding",
    [(1.0, True, True), (3.0, True, False), (3.0, False, True)],
)
def test_the_sliding_pass_gives_way_to_ttts_when_both_cannot_fit(
    small_data, monkeypatch, roundtrip_s, ttt, sliding
):
    """A 10-s eval whose round trip takes 1 or 3 s (a loaded machine): the sliding pass (a diagnostic beside TTT,
    whose pass scores the same windows) would take ~2x that (EVAL_SEQ_LEN/EVAL_STRIDE windows per target), and TTT's
    scoring as much again. At 1 s both fit; at 3 s the sliding pass is skipped and TTT still gives the final
    score. Without TTT the sliding score is the final one and always runs."""
    h, model, rt, tokens, luts = tiny_setup(
        small_data, VAL_MAX_TOKENS=1024, EVAL_BUDGET_SECONDS=10, TTT_ENABLED=int(ttt), TTT_EPOCHS=1
    )
    clock = [0.0]
    rt.time = lambda: clock[0]
    evaluate = tg.evaluate

    def timed(score_fn, val, L, stride, *rest):
        clock[0] += roundtrip_s * L / stride
        return evaluate(score_fn, val, L, stride, *rest)

    monkeypatch.setattr(tg, "evaluate", timed)
    lines = []
    ev = tg.run_evaluations(model, h, rt, tokens, luts, lines.append)
    assert ("sliding" in ev["results"]) == sliding and ev["final"] == ("ttt" if ttt else "sliding")
    assert any(line.startswith("sliding_window: skipped (budget)") for line in lines) != sliding
