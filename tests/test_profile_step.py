"""tools/profile_step.py profiles an unmodified script's training steps, and bench_anchor reads both sides."""

import json
import subprocess
import sys

from conftest import PY, REPO

sys.path.insert(0, str(REPO / "tools"))
import bench_anchor  # noqa: E402

TRAINING = """
import torch
model = torch.nn.Linear(64, 64)
adam = torch.optim.AdamW(model.parameters(), lr=1e-3)
sgd = torch.optim.SGD([torch.nn.Parameter(torch.zeros(3))], lr=0.1)
for step in range({steps}):
    model(torch.randn(32, 64)).square().mean().backward()
    adam.step()
    sgd.step()  # a second optimizer per step: the first one that steps counts the steps
    adam.zero_grad()
print("TRAINING ENDED")
"""


def profile(tmp_path, steps, **env):
    script = tmp_path / "train.py"
    script.write_text(TRAINING.format(steps=steps))
    full_env = {"PATH": "/usr/bin:/bin", "RUN_ID": "toy", "PROFILE_OUT": str(tmp_path / "out"), **env}
    return subprocess.run(
        [PY, str(REPO / "tools" / "profile_step.py"), str(script)],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_profiles_the_steps_then_stops_the_script(tmp_path):
    run = profile(tmp_path, 100, PROFILE_WAIT="4", PROFILE_ACTIVE="3")
    assert run.returncode == 0, run.stderr
    assert "TRAINING ENDED" not in run.stdout  # stopped after the profiled steps
    summary = json.loads((tmp_path / "out" / "toy.json").read_text())
    assert summary["active"] == 3
    ops = summary["ops"]
    matmul = [name for name in ops if name in ("aten::addmm", "aten::mm")]
    assert matmul, sorted(ops)
    # one forward matmul per step (the backward adds more): calls are counted per profiled step
    assert ops["aten::addmm"]["calls_per_step"] == 1.0
    assert summary["self_ms_per_step"] > 0
    assert summary["unprofiled_wall_ms_per_step"] > 0


def test_a_script_that_ends_early_is_an_error(tmp_path):
    run = profile(tmp_path, 5, PROFILE_WAIT="4", PROFILE_ACTIVE="3")
    assert run.returncode != 0
    assert "ended after 5 steps" in run.stderr
    assert "TRAINING ENDED" in run.stdout


def test_profile_table_puts_both_sides_side_by_side(tmp_path):
    def write(side, seed, mm, wall):
        ops = {"aten::mm": {"self_ms_per_step": mm, "calls_per_step": 4}}
        ops["aten::mul"] = {"self_ms_per_step": 1.0, "calls_per_step": 9}
        summary = dict(ops=ops, self_ms_per_step=mm + 1.0, unprofiled_wall_ms_per_step=wall)
        (tmp_path / f"sbs_{side}_{seed}.json").write_text(json.dumps(summary))

    write("r23", 1, 10.0, 20.0)
    write("r23", 2, 12.0, 22.0)
    write("ours", 1, 9.0, 19.0)
    text = bench_anchor.profile_table(tmp_path, 5)
    lines = text.splitlines()
    assert lines[1].split()[:4] == ["aten::mm", "11.0", "9.0", "-2.0"]  # the mean over the record's seeds
    assert lines[2].split()[:4] == ["aten::mul", "1.0", "1.0", "+0.0"]
    assert lines[-1].split()[-3:] == ["21.0", "19.0", "-2.0"]
    (tmp_path / "sbs_ours_1.json").unlink()
    assert bench_anchor.profile_table(tmp_path, 5).startswith("no profiles of both sides")
