#!/usr/bin/env python3
"""Profile the training steps of any train_gpt.py-style script, unmodified, with torch.profiler.

  python3 tools/profile_step.py train_gpt.py                  # this project's script, env as for a run
  PROFILE_OUT=/tmp/prof python3 tools/profile_step.py OTHER.py # any script that steps torch optimizers

The script runs in this process as `__main__`. A step is one call of the first optimizer that steps (a global
optimizer hook sees every torch.optim.Optimizer subclass, so neither script needs a line of profiling code):
the profiler skips PROFILE_WAIT steps (compile, first-touch allocation, warm caches), then records
PROFILE_ACTIVE steps, prints the top ops by self CPU time and exits, without the script's evaluation or
export. The JSON (PROFILE_OUT/RUN_ID.json) has, per op, its self CPU ms per step and call count per step,
and the wall ms/step of the unprofiled steps after the first two (the profiler's own overhead is not in
them). tools/bench_anchor.py --profile runs it on both sides of the side by side with the record's code.
CPU timings swing with the machine's load: compare two profiles taken back to back, never one against a
figure from another day.
"""

import json
import os
import runpy
import sys
import time
from pathlib import Path

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook


class StepProfiler:
    """Counts training steps on the first optimizer that steps and drives the profiler's schedule."""

    def __init__(self, wait: int, active: int, out: Path | None, top: int):
        self.wait = wait
        self.active = active
        self.out = out
        self.top = top
        self.leader = None
        self.steps = 0
        self.stamps = []  # wall time at the end of each unprofiled step
        schedule = torch.profiler.schedule(wait=wait, warmup=1, active=active, repeat=1)
        self.prof = torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CPU], schedule=schedule
        )

    def hook(self, optimizer, args, kwargs) -> None:
        if self.leader is None:
            self.leader = id(optimizer)
        if id(optimizer) != self.leader:
            return
        self.steps += 1
        if self.steps <= self.wait:
            self.stamps.append(time.perf_counter())
        self.prof.step()
        if self.steps == self.wait + 1 + self.active:
            self.prof.stop()
            self.report()
            raise SystemExit(0)  # the profile is all this run is for: no evaluation, no export

    def unprofiled_ms(self) -> float:
        """Mean wall ms of the unprofiled steps after the first two (compile and warm caches excluded)."""
        stamps = self.stamps[2:]
        if len(stamps) < 2:
            return float("nan")
        return 1000.0 * (stamps[-1] - stamps[0]) / (len(stamps) - 1)

    def report(self) -> None:
        events = self.prof.key_averages()
        print(events.table(sort_by="self_cpu_time_total", row_limit=self.top), flush=True)
        ops = {
            e.key: {
                "self_ms_per_step": e.self_cpu_time_total / 1000.0 / self.active,
                "calls_per_step": e.count / self.active,
            }
            for e in events
        }
        total = sum(op["self_ms_per_step"] for op in ops.values())
        wall = self.unprofiled_ms()
        print(
            f"profile: {self.active} steps, self CPU {total:.1f} ms/step, unprofiled wall {wall:.1f} ms/step"
        )
        if self.out is not None:
            self.out.mkdir(parents=True, exist_ok=True)
            path = self.out / f"{os.environ.get('RUN_ID', 'profile')}.json"
            summary = {
                "script": sys.argv[0],
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
                "wait": self.wait,
                "active": self.active,
                "self_ms_per_step": total,
                "unprofiled_wall_ms_per_step": wall,
                "ops": ops,
            }
            path.write_text(json.dumps(summary, indent=1) + "\n")
            print(f"profile: wrote {path}", flush=True)


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit("usage: profile_step.py SCRIPT [ARGS...] (env: PROFILE_WAIT, PROFILE_ACTIVE, PROFILE_OUT)")
    script = Path(sys.argv[1])
    if not script.is_file():
        sys.exit(f"profile_step.py: {script} not found")
    wait = int(os.environ.get("PROFILE_WAIT", "6"))
    active = int(os.environ.get("PROFILE_ACTIVE", "5"))
    out = os.environ.get("PROFILE_OUT")
    if wait < 4 or active < 1:
        sys.exit(
            "profile_step.py: PROFILE_WAIT must be >= 4 (two warm-up steps, two timed) and PROFILE_ACTIVE >= 1"
        )
    profiler = StepProfiler(
        wait, active, Path(out) if out else None, int(os.environ.get("PROFILE_TOP", "25"))
    )
    register_optimizer_step_post_hook(profiler.hook)
    profiler.prof.start()
    sys.argv = sys.argv[1:]
    sys.path.insert(0, str(script.resolve().parent))
    runpy.run_path(str(script), run_name="__main__")
    sys.exit(f"profile_step.py: {script} ended after {profiler.steps} steps, before the profile's window")


if __name__ == "__main__":
    main()
