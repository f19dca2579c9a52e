"""Document-aware scoring and LoRA TTT: documents partitioned, each target scored once, adapters reset
per document, only scored targets learned from (never a document's last chunk), phases only on fully
scored documents, the zero-adapter forward equal to the scoring forward, ranks, the budget guard."""

import numpy as np
import pytest
import torch

from conftest import SILENT, cpu_runtime, run_distributed, tg
from test_eval import Recorder, sliding_scores, tiny_setup

# 5 documents of 1913, 1475, 1296, 222 and 94 tokens: 3 batches of 2, phases before batches 1 and 2
LORA = dict(
    VAL_MAX_TOKENS=5000,
    TTT_MODE="lora",
    TTT_LORA_RANK=4,
    TTT_LORA_CHUNK=32,
    TTT_DOCS_PER_BATCH=2,
    TTT_LORA_LR=0.01,
    TTT_PHASE_DOCS=4,
    TTT_PHASES=2,
    TTT_LR=0.01,
    TTT_BATCH_SEQS=4,
)


def lora_run(data, tokens=None, world=(0, 1), budget=1e9, **over):
    h, model, rt, val, luts = tiny_setup(data, **{**LORA, **over})
    rt = cpu_runtime(*world)
    model.requires_grad_(False)
    adapters = tg.LoRAAdapters.for_run(model, h)
    rec = Recorder()
    ctx = tg.EvalContext(h, rt, luts, SILENT, rec)
    totals, info = tg.eval_ttt_lora(ctx, model, adapters, val if tokens is None else tokens, budget)
    return h, val, rec, totals, info


def doc_of(tokens, n):
    """Document index (in stream order) of every input position 0..n-1."""
    return np.cumsum(tokens[:n].numpy() == tg.BOS_ID) - 1


def test_documents_partition_the_targets_longest_first(small_data):
    h, _, _, tokens, _ = tiny_setup(small_data, **LORA)
    docs = tg.documents(tokens, 5000)
    assert tokens[0] == tg.BOS_ID and len(docs) == int((tokens[:5000] == tg.BOS_ID).sum()) == 5
    assert (np.diff(docs[:, 1]) <= 0).all() and docs[:, 1].sum() == 5000
    cover = np.zeros(5000, int)
    for s, n in docs:
        cover[s : s + n] += 1
        assert tokens[s] == tg.BOS_ID and (tokens[s + 1 : s + n] != tg.BOS_ID).all()
    assert (cover == 1).all()
    assert (
        tg.lora_widths(h) == [32, 64]
        and tg.lora_widths(tg.Hyperparameters().replace(ttt_lora_chunk=48)) == [64, 128, 256, 512, 1024, 2048]
        and tg.lora_widths(tg.Hyperparameters().replace(eval_seq_len=2560))
        == [64, 128, 256, 512, 1024, 2048, 2560]
    )


def test_zero_adapters_leave_the_scoring_forward_exact(small_data):
    """A fresh adapter adds exactly zero: the TTT forward equals the plain scoring forward bit for bit
    (a record scored 1.908 when its TTT forward lacked a gate); a trained one changes it."""
    h, model, _, tokens, _ = tiny_setup(small_data, **LORA, DOC_ATTENTION=1)
    adapters = tg.LoRAAdapters(model, 3, 4, 0)
    x, y = tokens[:192].view(3, 64).long(), tokens[1:193].view(3, 64).long()
    x[1, 30] = tg.BOS_ID
    with torch.no_grad():
        plain = model.token_nll(x, y)
        adapters.reset(5)
        adapters.attach(True)
        adapted = model.token_nll(x, y)
        adapters.groups[0][0][1][1].normal_()  # document 1's adapter on the first matrix
        moved = model.token_nll(x, y)
    assert torch.equal(plain, adapted)
    assert (
        torch.equal(moved[0], plain[0])
        and torch.equal(moved[2], plain[2])
        and not torch.allclose(moved[1], plain[1])
    )


def check_legal(rec, tokens, docs, n):
    """Every target scored once; each training event only on targets already scored, inside one
    document, never its last chunk (LoRA) -- or, in a phase, only documents scored to the end."""
    assert sorted(rec.scores) == list(range(n))
    doc = doc_of(tokens, n)
    length = np.bincount(doc)
    scored = np.zeros(len(length), int)
    lora_steps = phase_steps = 0
    for kind, idx in rec.events:
        if kind == "score":
            np.add.at(scored, doc[idx], 1)
            continue
        d = np.unique(doc[idx])
        if (
            len(idx) <= 2 * 32
        ):  # a LoRA step (TTT_DOCS_PER_BATCH x TTT_LORA_CHUNK at most): the chunks just scored, no last chunk
            lora_steps += 1
            assert (scored[d] < length[d]).all()
        else:  # a global-SGD phase step: documents scored to the end
            phase_steps += 1
            assert (scored[d] == length[d]).all()
    return lora_steps, phase_steps


def test_lora_ttt_is_legal_and_documents_are_independent(small_data):
    h, tokens, rec, totals, info = lora_run(small_data)
    n = tokens.numel() - 1
    lora_steps, phase_steps = check_legal(rec, tokens, tg.documents(tokens, n), n)
    assert lora_steps > 20 and phase_steps == 0 and info["adapted"] == info["batches"]
    assert int(totals[2]) == n
    # a change inside one document moves its later scores and nothing else (adapters reset per document)
    doc = doc_of(tokens, n)
    target = int(np.bincount(doc).argmax())  # the longest document: adapted over several chunks
    positions = np.flatnonzero(doc == target)
    p = int(positions[len(positions) // 2])
    changed = tokens.clone()
    changed[p] = (int(changed[p]) + 17) % 400 + 2
    _, _, rec2, _, _ = lora_run(small_data, changed)
    same = [j for j in range(n) if rec2.scores[j] == rec.scores[j]]
    assert set(range(n)) - set(same) <= set(positions[positions >= p - 1])
    assert any(rec2.scores[j] != rec.scores[j] for j in positions[positions > p + 16])  # learned from it


def test_warm_start_a_carries_a_row_from_document_to_document_legally(small_data):
    """TTT_LORA_WARM_A (#1787): each row keeps its A for the next batch's document in that row (B reset). A change
    in the longest document (batch 0, row 0) then reaches the later documents of row 0 (1,296 and 94 tokens), only
    from their second chunk on (B = 0 makes a first chunk blind to A), and never row 1's; still every target once."""
    h, tokens, rec, totals, info = lora_run(small_data, TTT_LORA_WARM_A=1)
    n = tokens.numel() - 1
    docs = tg.documents(tokens, n)
    check_legal(rec, tokens, docs, n)
    doc, order = (
        doc_of(tokens, n),
        {int(s): i for i, (s, _) in enumerate(docs)},
    )  # stream start -> rank by length
    rank = np.array([order[int(np.flatnonzero(doc == d)[0])] for d in range(doc.max() + 1)])[
        doc
    ]  # per position
    positions = np.flatnonzero(rank == 0)
    p = int(positions[len(positions) // 2])
    changed = tokens.clone()
    changed[p] = (int(changed[p]) + 17) % 400 + 2
    _, _, rec2, _, _ = lora_run(small_data, changed, TTT_LORA_WARM_A=1)
    moved = {j for j in range(n) if rec2.scores[j] != rec.scores[j]}
    row0_later = np.flatnonzero((rank == 2) | (rank == 4))
    assert moved <= set(positions[positions >= p - 1]) | set(row0_later) and moved & set(row0_later)
    first_chunk = [j for j in row0_later if j - int(np.flatnonzero(rank == rank[j])[0]) < 32]
    assert not moved & set(first_chunk)


def test_phased_ttt_trains_base_weights_only_on_fully_scored_documents(small_data):
    h, tokens, rec, totals, info = lora_run(small_data, TTT_MODE="phased")
    n = tokens.numel() - 1
    lora_steps, phase_steps = check_legal(rec, tokens, tg.documents(tokens, n), n)
    assert info["phases"] == info["planned_phases"] == 2 and phase_steps >= 2 and lora_steps > 20
    _, _, _, lora_totals, _ = lora_run(small_data)
    assert not torch.equal(totals, lora_totals)  # the phases changed later documents' scores


def test_lora_ttt_without_adaptation_is_document_scoring(small_data):
    """With a learning rate of 0 LoRA TTT scores each document alone: the sliding evaluator with document
    attention gives the same scores wherever its window starts inside the target's document."""
    _, tokens, rec, _, _ = lora_run(small_data, TTT_LORA_LR=0.0, DOC_ATTENTION=1)
    h, model, rt, _, luts = tiny_setup(small_data, **LORA, DOC_ATTENTION=1)
    slide = sliding_scores(model, tokens, h, rt, luts)
    n = tokens.numel() - 1
    doc = doc_of(tokens, n)
    first = {d: j for j, d in reversed(list(enumerate(doc)))}
    # windows of EVAL_SEQ_LEN with stride EVAL_STRIDE: a target whose document starts inside its window
    near = [j for j in range(n) if j - first[doc[j]] < h.eval_len - h.eval.eval_stride]
    assert len(near) == 5 * 32
    assert max(abs(rec.scores[j] - slide[j]) for j in near) < 1e-4


def lora_rank(rank, world, data):
    _, tokens, rec, totals, info = lora_run(data, world=(rank, world), TTT_MODE="phased")
    return totals, rec.scores, info


def test_phased_lora_ttt_on_two_ranks_equals_one(tmp_path, small_data):
    single, scores, info = lora_rank(0, 1, small_data)
    results = run_distributed(lora_rank, 2, tmp_path, small_data)
    merged = {}
    for totals, s, i in results:
        assert torch.allclose(totals, single, rtol=1e-6) and i["phases"] == info["phases"] == 2
        assert not set(merged) & set(s)  # every target scored by exactly one rank
        merged.update(s)
    assert sorted(merged) == sorted(scores)
    # Adam (beta1 0) turns float-order differences of the phases' all-reduced gradients into visible ones
    assert max(abs(merged[j] - scores[j]) for j in scores) < 1e-2


def test_lora_budget_guard_stops_adapting_and_phases_when_time_runs_out(small_data):
    _, tokens, rec, totals, info = lora_run(small_data, TTT_MODE="phased", budget=0.0)
    n = tokens.numel() - 1
    assert info["adapted"] == 0 and info["phases"] == 0 and int(totals[2]) == n and len(rec.scores) == n
    guard = tg.LoRABudget(100.0)
    guard.rates += [1e-3, 1e-3, 1e-3]
    assert guard.rate() == pytest.approx(1.25e-3)  # the slowest recent batch, plus SLACK
    assert guard.fits(40.0 + 40_000 * guard.rate()) and not guard.fits(40.0 + 60_000 * guard.rate())
    assert guard.fits(40.0, 40_000) and not guard.fits(50.0, 40_000)  # a phase at the LoRA rate ...
    guard.sgd_rate = 1e-4
    assert guard.fits(60.0, 300_000)  # ... or at the last phase's
    guard.rates.append(2e-3)  # a slow batch: what remains is planned at its rate
    assert not guard.fits(40.0 + 40_000 * guard.rate())


@pytest.mark.parametrize("mode", ["lora", "phased"])
def test_rows_per_pass_bound_a_pass_and_change_no_score(small_data, mode):
    """TTT_LORA_ROWS_PER_PASS=1: each document goes through its own forward and backward (what bounds LoRA TTT's
    memory), with weight decay on the adapters and A kept: the same scores, events and phases as all rows in one
    pass. A group without a learning row still takes its (zero-gradient) decay step, as in one pass of all rows."""
    over = dict(TTT_MODE=mode, TTT_LORA_WD=0.5, TTT_LORA_WARM_A=1)
    _, _, rec_all, all_rows, info_all = lora_run(small_data, **over)
    _, _, rec_one, one_row, info_one = lora_run(small_data, **over, TTT_LORA_ROWS_PER_PASS=1)
    assert info_one == info_all and info_all["adapted"] == 3
    assert torch.allclose(one_row, all_rows, rtol=1e-12, atol=1e-9)
    assert rec_one.events == rec_all.events and rec_one.scores.keys() == rec_all.scores.keys()
    assert np.allclose([rec_one.scores[i] for i in rec_all.scores], list(rec_all.scores.values()), atol=1e-5)
    with pytest.raises(tg.ConfigError, match="TTT_LORA_ROWS_PER_PASS=3 must divide TTT_DOCS_PER_BATCH=4"):
        tg.Hyperparameters.from_env({"TTT_DOCS_PER_BATCH": "4", "TTT_LORA_ROWS_PER_PASS": "3"}).validate()


@pytest.mark.parametrize("budget", [1e9, 0.0])
def test_a_pass_that_learns_nothing_scores_under_inference_mode(small_data, monkeypatch, budget):
    """A group of rows with nothing to learn (a document's last chunk, one row per pass; or every batch
    unadapted, budget 0) runs its forward under inference mode, which saves no activations; a pass that learns
    runs with grad. The scores are those of every pass under grad, bit for bit."""
    over = dict(TTT_LORA_ROWS_PER_PASS=1, budget=budget)
    grad_mode = tg.lora_grad_mode
    token_nll = tg.GPT.token_nll
    monkeypatch.setattr(tg, "lora_grad_mode", lambda learning: torch.enable_grad())
    _, _, rec_grad, with_grad, info_grad = lora_run(small_data, **over)  # every pass under grad
    asked = []
    modes = []

    def recorded_grad_mode(learning):
        asked.append(learning)
        return grad_mode(learning)

    def recorded_token_nll(self, x, y):
        modes.append((torch.is_inference_mode_enabled(), torch.is_grad_enabled()))
        return token_nll(self, x, y)

    monkeypatch.setattr(tg, "lora_grad_mode", recorded_grad_mode)
    monkeypatch.setattr(tg.GPT, "token_nll", recorded_token_nll)
    _, _, rec, totals, info = lora_run(small_data, **over)
    assert len(asked) == len(modes) > 0
    assert modes == [(not learning, learning) for learning in asked]
    assert (False in asked) and (True in asked) == (budget > 0)
    assert info == info_grad and rec.events == rec_grad.events
    assert torch.equal(totals, with_grad)


def test_compiled_phased_lora_ttt_compiles_nothing_inside_the_timed_eval(small_data, monkeypatch):
    """Compiled, with document attention: the warm-up on random tokens builds the scoring graph, the LoRA
    width with adapters (forward and backward, and the inference-mode forward of a pass that learns nothing; one
    width keeps this affordable) and the phases' training
    graph; the timed eval, two phases included, then builds none (dynamo's graphs: aot_eager spares the C++ builds)."""
    monkeypatch.setattr(torch._dynamo.config, "cache_size_limit", 32)  # as setup_runtime sets it
    h, model, _, tokens, luts = tiny_setup(
        small_data,
        **{**LORA, "TTT_MODE": "phased", "TTT_LORA_CHUNK": 64, "TTT_LORA_ROWS_PER_PASS": 1},
        DOC_ATTENTION=1,
        EVAL_SLIDING=0,
        NUM_LAYERS=2,
        VE_LAYERS=1,
        XSA_LAST_N=1,
    )
    ev = tg.run_evaluations(
        model, h, tg.Runtime(0, 1, 0, torch.device("cpu"), True, backend="aot_eager"), tokens, luts, SILENT
    )
    assert ev["compiled_inside"] == 0 and ev["ttt"]["phases"] == 2 and ev["results"]["ttt"]["scored"] == 5000


def test_lora_alpha_is_the_adapter_scale_and_weight_decay_is_decoupled():
    """TTT_LORA_ALPHA: Adam on x A B with lora_optimizer's groups equals Adam on x A B * alpha/rank (B from 0,
    decoupled weight decay on both), step for step; without the scale, it would not."""
    h = tg.Hyperparameters.from_env(
        {"TTT_LORA_RANK": "4", "TTT_LORA_ALPHA": "10", "TTT_LORA_LR": "0.01", "TTT_LORA_WD": "0.5"}
    )
    torch.manual_seed(0)
    x, target, a0 = torch.randn(16, 8), torch.randn(16, 6), torch.randn(8, 4)
    ours = [a0.clone().requires_grad_(), torch.zeros(4, 6, requires_grad=True)]
    scaled = [a0.clone().requires_grad_(), torch.zeros(4, 6, requires_grad=True)]
    plain = torch.optim.AdamW(scaled, lr=0.01, betas=(0.0, 0.95), weight_decay=0.5)
    opt = tg.lora_optimizer(ours, h)
    for _ in range(5):
        for o, (a, b), s in ((opt, ours, 1.0), (plain, scaled, 2.5)):
            o.zero_grad()
            (x @ a @ b * s - target).square().mean().backward()
            o.step()
        assert torch.allclose(x @ ours[0] @ ours[1], x @ scaled[0] @ scaled[1] * 2.5, atol=1e-5)
    assert not torch.allclose(x @ ours[0] @ ours[1], x @ scaled[0] @ scaled[1], atol=1e-3)
    assert ours[0].norm() < a0.norm()  # decayed
