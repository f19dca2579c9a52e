"""Scoring: every target exactly once, causal (C1), score before update (C3), TTT budget guard."""

import time

import numpy as np
import pytest
import torch

from conftest import SILENT, cpu_runtime, hparams, run_distributed, tg


@pytest.mark.parametrize("n, L, stride, chunk", [(1000, 64, 16, 0), (1000, 64, 64, 0), (1001, 64, 32, 256),
                                                 (64, 64, 8, 0), (5000, 128, 48, 480), (300, 64, 16, 32),
                                                 (777, 100, 1, 100)])
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
    fake = lambda x, y: torch.zeros(x.shape)
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
    w = tg.plan_windows(tokens.numel() - 1, h.eval_len, h.eval_stride)
    tg.score_windows(model.token_nll, tokens, w, h.eval_len, 8, luts, rt, rec)
    return rec.scores


def ttt_scores(model, tokens, h, rt, luts):
    rec = Recorder()
    totals, info = tg.eval_ttt(model, tokens, h, rt, luts, SILENT, 1e9, rec)
    return rec, totals, info


def test_c1_sliding_scores_do_not_see_the_future(small_data):
    h, model, rt, tokens, luts = tiny_setup(small_data, VAL_MAX_TOKENS=1500)
    p = 700
    before = sliding_scores(model, tokens, h, rt, luts)
    changed = tokens.clone()
    changed[p + 1:] = torch.randint(2, 500, changed[p + 1:].shape, dtype=changed.dtype)
    after = sliding_scores(model, changed, h, rt, luts)
    assert len(before) == tokens.numel() - 1
    assert all(after[j] == before[j] for j in range(p))  # targets 0..p-1 are tokens 1..p: bit-identical
    assert any(after[j] != before[j] for j in range(p, len(before)))


def test_c1_and_c3_in_ttt_across_chunks(small_data):
    h, model, rt, tokens, luts = tiny_setup(small_data, VAL_MAX_TOKENS=3000, TTT_EPOCHS=2, TTT_LR=0.05,
                                            TTT_BATCH_SEQS=4)
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
    changed[p + 1:] = torch.randint(2, 500, changed[p + 1:].shape, dtype=changed.dtype)
    rec2, _, _ = ttt_scores(model, changed, h, rt, luts)
    assert all(rec2.scores[j] == rec.scores[j] for j in range(p))
    assert any(rec2.scores[j] != rec.scores[j] for j in range(2048, 2999))  # chunk 2 saw other updates


def test_ttt_with_zero_epochs_is_sliding_eval(small_data):
    h, model, rt, tokens, luts = tiny_setup(small_data, VAL_MAX_TOKENS=3000, TTT_EPOCHS=0)
    sliding = tg.evaluate(model.token_nll, tokens, h.eval_len, h.eval_stride, 8, luts, rt)
    totals, _ = tg.eval_ttt(model, tokens, h, rt, luts, SILENT, 1e9)
    assert torch.equal(totals[1:], sliding[1:])
    assert torch.allclose(totals, sliding, rtol=1e-10)


def ttt_rank(rank, world, data):
    # SGD is linear in the gradients, so it checks the rank-averaged gradients strictly (AdamW's
    # normalization would turn float rounding in near-zero gradients into visible updates)
    h, model, _, tokens, luts = tiny_setup(data, VAL_MAX_TOKENS=3000, TTT_EPOCHS=2, TTT_LR=0.05, TTT_BATCH_SEQS=3)
    totals, _ = tg.eval_ttt(model, tokens, h, cpu_runtime(rank, world), luts, SILENT, 1e9)
    return totals, [p.detach().clone() for p in model.parameters()]


def test_ttt_on_two_ranks_equals_one(tmp_path, small_data):
    single, params = ttt_rank(0, 1, small_data)
    for totals, ps in run_distributed(ttt_rank, 2, tmp_path, small_data):
        assert torch.allclose(totals, single, rtol=1e-6)
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(ps, params))
    assert not torch.allclose(params[0], tiny_setup(small_data)[1].tok_emb.weight)  # TTT changed the weights


def test_ttt_lowers_bpb_of_a_trained_model(small_data):
    h = hparams(small_data, ITERATIONS=80, WARMDOWN_ITERS=20, VAL_MAX_TOKENS=6144, TTT_CHUNK_TOKENS=1024,
                TTT_EPOCHS=2, TTT_LR=0.01, EMA_DECAY=0, LATE_QAT_THRESHOLD=0, WARMUP_STEPS=0)
    rt = cpu_runtime()
    torch.manual_seed(0)
    model = tg.GPT(h)
    luts = tg.build_byte_luts(tg.load_tokenizer(h), "cpu")
    tokens = tg.load_val_tokens(h, rt)
    tg.train_model(model, h, rt, tg.TrainLoader(tg.find_shards(h, "train")[0], rt), tokens, luts, SILENT)
    _, sliding = tg.loss_and_bpb(tg.evaluate(model.token_nll, tokens, h.eval_len, h.eval_stride, 8, luts, rt))
    _, ttt = tg.loss_and_bpb(tg.eval_ttt(model, tokens, h, rt, luts, SILENT, 1e9)[0])
    assert sliding < 3.5 and ttt < sliding - 0.003


def test_budget_guard_cuts_epochs_and_finishes_in_budget(small_data):
    h, model, rt, tokens, luts = tiny_setup(small_data, VAL_MAX_TOKENS=16384, TTT_EPOCHS=0)
    t = time.perf_counter()
    tg.eval_ttt(model, tokens, h, rt, luts, SILENT, 1e9)
    scoring = time.perf_counter() - t
    budget = 2.5 * scoring
    h = hparams(small_data, VAL_MAX_TOKENS=16384, TTT_EPOCHS=6)
    t = time.perf_counter()
    _, info = tg.eval_ttt(model, tokens, h, rt, luts, SILENT, budget)
    elapsed = time.perf_counter() - t
    assert info["epoch_cuts"] and info["epoch_cuts"][0][1] == 6 and info["final_epochs"] < 6
    assert elapsed <= budget, (elapsed, budget, info)


def test_compiled_ttt_compiles_once_not_per_chunk(small_data):
    """Weights mutate between chunks; the compiled scoring and training graphs must be reused."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    h, model, _, tokens, luts = tiny_setup(small_data, VAL_MAX_TOKENS=8192, TTT_EPOCHS=1, TTT_BATCH_SEQS=16)
    rt = tg.Runtime(0, 1, 0, torch.device("cpu"), True)
    tg.eval_ttt(model, tokens[: 2 * 1024 + 1], h, rt, luts, SILENT, 1e9)  # compiles: 2 chunks, one trained
    graphs = counters["stats"]["unique_graphs"]
    _, info = tg.eval_ttt(model, tokens, h, rt, luts, SILENT, 1e9)  # 8 chunks, 7 trained
    assert info["chunks"] == 8 and counters["stats"]["unique_graphs"] == graphs
