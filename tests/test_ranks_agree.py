"""Ranks that agree: every decision that gates a collective, sizes a tensor in one or changes the training
schedule is made from values all ranks agree on. Each rank here runs its own clock (an offset and a rate of
its own, as eight machines' host clocks and loads differ); the runs must take the same decisions on every
rank, with bitwise-equal weights, and never hang (run_distributed's hard timeout fails a hang)."""

import re
import sys
import time

import pytest
import torch
import torch.distributed as dist

from conftest import SILENT, cpu_runtime, hparams, run_distributed, tg


class ListLog(tg.Log):
    """Every rank's log lines, kept (tg.Log writes rank 0's only)."""

    def __init__(self):
        super().__init__(None)
        self.lines = []

    def __call__(self, msg: str, console: bool = True) -> None:
        self.lines.append(msg)


def skewed_clock(rank: int, world: int):
    """Rank r's host clock: its own offset, and a rate from 1 to 2 across the ranks."""
    rate, offset, start = 1.0 + rank / max(world - 1, 1), 1000.0 * rank, time.perf_counter()
    return lambda: offset + rate * (time.perf_counter() - start)


def skewed_runtime(rank: int, world: int, h: tg.Hyperparameters) -> tg.Runtime:
    rt = cpu_runtime(rank, world)
    rt.micro_batches = h.micro_batches(world)
    rt.time = skewed_clock(rank, world)
    tg.now = rt.time  # code that reads the module's own clock sees the rank's skew too
    return rt


def lines_with(log: ListLog, *keys: str) -> list[str]:
    return [line for line in log.lines if line.startswith(keys)]


def train_skewed(rank, world, data, cap_s):
    """A run whose recurrence stage, warmdown, late QAT and stop all switch on wallclock time."""
    h = hparams(
        data,
        ITERATIONS=400,
        MAX_WALLCLOCK_SECONDS=cap_s,
        WARMDOWN_FRAC=0.5,
        WARMDOWN_ITERS=0,
        LOOP_START=1,
        LOOP_END=1,
        LOOP_REPEATS=1,
        LOOP_ENABLE_AT=0.3,
        LATE_QAT_THRESHOLD=0.5,
        WARMUP_STEPS=0,
        TRAIN_LOG_EVERY=1000,
        TRAIN_BATCH_TOKENS=64 * world,
        TRAIN_MICRO_BATCHES=world,
        NUM_LAYERS=2,
        VE_LAYERS="1",
        XSA_LAST_N=1,
    )
    rt = skewed_runtime(rank, world, h)
    torch.manual_seed(0)
    model = tg.GPT(h)
    luts = tg.build_byte_luts(tg.load_tokenizer(h), "cpu")
    log = ListLog()
    loader = tg.TrainLoader(tg.find_shards(h, "train")[0], rt)
    info = tg.train_model(model, h, rt, loader, tg.load_val_tokens(h, rt), luts, log)
    decisions = lines_with(log, "recurrence:", "late_qat:", "stopping_early:")
    decisions = [line.split(" train_time:")[0] for line in decisions]  # the log's own times differ by rank
    return decisions, info.stats.steps, model.state_dict()


@pytest.mark.parametrize("world, cap_s", [(2, 4.0), (8, 10.0)])
def test_skewed_clocks_switch_the_schedule_on_the_same_step(small_data, tmp_path, world, cap_s):
    """The stage switch, late QAT and the stop fall between the ranks' clocks: every rank takes them on the
    same step (read from the agreed, slowest rank's time) and ends with bitwise-equal weights."""
    results = run_distributed(train_skewed, world, tmp_path, small_data, cap_s, timeout=240)
    decisions, steps, state = results[0]
    assert any(line.startswith("recurrence:stage 1") for line in decisions), decisions
    assert any(line.startswith("late_qat:enabled") for line in decisions), decisions
    for other_decisions, other_steps, other_state in results[1:]:
        assert other_decisions == decisions and other_steps == steps
        assert all(torch.equal(state[k], other_state[k]) for k in state)


def eval_skewed(rank, world, data, mode, budget_s):
    """The timed eval (run_evaluations) of an untrained model under a budget that must cut TTT."""
    over = dict(TTT_MODE=mode, EVAL_BUDGET_SECONDS=budget_s, EVAL_SLIDING=0)
    if mode == "chunk":  # the sliding pass first: ranks whose clocks disagree see it take different times
        over.update(
            TTT_CHUNK_TOKENS=512, TTT_EPOCHS=3, TTT_BATCH_SEQS=4, VAL_MAX_TOKENS=8 * 512, EVAL_SLIDING=1
        )
    else:
        over.update(
            TTT_DOCS_PER_BATCH=2,
            TTT_LORA_CHUNK=32,
            TTT_PHASE_DOCS=12,
            TTT_PHASES=3,
            TTT_BATCH_SEQS=4,
            VAL_MAX_TOKENS=6000,
        )
    h = hparams(data, NUM_LAYERS=2, VE_LAYERS="1", XSA_LAST_N=1, **over)
    rt = skewed_runtime(rank, world, h)
    torch.manual_seed(0)
    model = tg.GPT(h)
    luts = tg.build_byte_luts(tg.load_tokenizer(h), "cpu")
    log = ListLog()
    ev = tg.run_evaluations(model, h, rt, tg.load_val_tokens(h, rt), luts, log)
    info = ev["ttt"]
    decisions = {k: v for k, v in info.items() if k not in ("adapted",)}  # adapted: rank-local batches
    passes = sorted(ev["results"])  # the sliding pass runs or gives way to TTT's (sliding_fits): agreed too
    kept = lines_with(log, "ttt_phase:", "ttt_budget:", "sliding_window:")
    return decisions, passes, [re.split(" at | after ", line)[0] for line in kept]


@pytest.mark.parametrize("world", [2, 8])
@pytest.mark.parametrize("mode, budget_s", [("chunk", 0.5), ("phased", 4.0)])
def test_skewed_clocks_take_the_same_ttt_decisions(small_data, tmp_path, world, mode, budget_s):
    """Chunk TTT's epochs per chunk, phased LoRA TTT's global-SGD phases and whether the sliding pass runs
    (chunk mode) gate all-reduces: under a budget that must cut them and clocks that disagree, every rank takes
    the same decisions and finishes."""
    results = run_distributed(eval_skewed, world, tmp_path, small_data, mode, budget_s, timeout=300)
    decisions, _, lines = results[0]
    if mode == "chunk":  # the budget bit: only chunk 1 (nothing measured yet) takes every epoch
        assert decisions["trained"] < decisions["planned"], decisions
    for other in results[1:]:
        assert other == results[0]


def long_wait(rank, world):
    """Rank 0 works alone for longer than the process group's timeout while the others wait."""
    short = dist.new_group(backend="gloo", timeout=__import__("datetime").timedelta(seconds=2))
    rt = cpu_runtime(rank, world)
    waiting = rt.long_wait_group()
    if rank == 0:
        time.sleep(4)
    dist.barrier(group=waiting)  # outlasts the 2-s timeout the other groups have
    late = None
    if rank == 0:
        time.sleep(4)
    try:
        dist.barrier(group=short)
    except RuntimeError as e:
        late = str(e)[:80]
    return late


def test_the_export_wait_outlasts_the_process_group_timeout(tmp_path):
    """The ranks that wait while rank 0 exports wait in a group of their own with a long timeout: a plain
    barrier in a group with a 2-s timeout fails the same wait (the check that this test can fail)."""
    results = run_distributed(long_wait, 2, tmp_path, timeout=60)
    assert results[1] is not None  # the short group's barrier timed out on the waiting rank


def count_host_syncs(data, iterations, monkeypatch):
    """Host syncs (Runtime.sync/clock/reduce, Tensor.item/tolist) that train_gpt.py's own code makes during
    a CPU training run (torch's CPU AdamW reads its step counts on the host; CUDA's fused AdamW does not)."""
    counts = [0]

    def counted(fn):
        def wrapper(*args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            counts[0] += caller == tg.__file__
            return fn(*args, **kwargs)

        return wrapper

    for cls, name in [(tg.Runtime, "sync"), (tg.Runtime, "reduce"), (torch.Tensor, "item")]:
        monkeypatch.setattr(cls, name, counted(getattr(cls, name)))
    monkeypatch.setattr(torch.Tensor, "tolist", counted(torch.Tensor.tolist))
    h = hparams(
        data,
        ITERATIONS=iterations,
        WARMUP_STEPS=0,
        TRAIN_LOG_EVERY=1000,
        MAX_WALLCLOCK_SECONDS=600,
        WARMDOWN_FRAC=0.5,
        NUM_LAYERS=2,
        VE_LAYERS="1",
        XSA_LAST_N=1,
        EMA_DECAY=0.9,
    )
    rt = cpu_runtime()
    torch.manual_seed(0)
    model = tg.GPT(h)
    luts = tg.build_byte_luts(tg.load_tokenizer(h), "cpu")
    loader = tg.TrainLoader(tg.find_shards(h, "train")[0], rt)
    val = tg.load_val_tokens(h, rt)
    before = counts[0]
    tg.train_model(model, h, rt, loader, val, luts, SILENT)
    return counts[0] - before


def test_no_host_sync_per_training_step(small_data, monkeypatch):
    """Steady-state steps (past the ten logged ones) wait for nothing on the host: a run of 30 steps syncs
    exactly as often as one of 15. The agreed clock's read of the step before is not a sync of this step's
    work (on CUDA it waits on an event recorded a step earlier)."""
    assert count_host_syncs(small_data, 30, monkeypatch) == count_host_syncs(small_data, 15, monkeypatch)
