"""configs/*.env: every preset parses, and builds the record's model with its logged parameter count
(exactly, or off by the documented components this script does not have yet)."""

import pytest
import torch

from conftest import REPO, tg

# preset -> (logged model_params, ours - logged, what the difference is; seed-fidelity.md section 1)
PRESETS = {
    "r23": (26_928_220, 0, ""),
    "pr526": (24_634_452, 0, ""),
    "pr691": (26_993_756, 0, ""),
    "pr490": (27_137_221, 0, ""),
    "pr1493": (35_944_536, 16, "the 2x2 lane write-back of 4 layers (+16)"),
    "pr1539_legal": (36_311_132, 1_039, "2 extra skip weights (+1,024), lane mix 16 vs lane merge 1 (+15)"),
    "top_1_0611": (35_945_671, -611, "no sparse attention gates -1,056, lanes -54, SmearGate width +499"),
}


def read_preset(name: str) -> dict:
    env = {}
    for line in (REPO / "configs" / f"{name}.env").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition("=")
            env[key] = value
    return env


def test_every_preset_file_is_listed():
    assert {p.stem for p in (REPO / "configs").glob("*.env")} == set(PRESETS)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_builds_the_logged_model(name):
    logged, delta, why = PRESETS[name]
    env = read_preset(name)
    assert not tg.misspelt_knobs(env) and set(env) <= set(tg.knob_names())
    h = tg.Hyperparameters.from_env(env)
    with torch.device("meta"):  # shapes only: no 36M-parameter initialisation on the CPU
        model = tg.GPT(h)
    assert sum(p.numel() for p in model.parameters()) - logged == delta, why
    header = (REPO / "configs" / f"{name}.env").read_text().split("\n# data")[0]
    assert f"{logged:,}" in header and "Data:" in header  # what it reproduces, on which data, and what it cannot
