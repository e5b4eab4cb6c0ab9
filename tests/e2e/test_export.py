"""``fedgrpc export``: files that ``load_state_dict`` accepts, read by other tools."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from fedgrpc.datasets.sources import load_dataset
from fedgrpc.learning.models import build_model
from tests.e2e.helpers import final_model, run_cli

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(400)]


@pytest.fixture(scope="module")
def sim_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("export") / "sim"
    res = run_cli(
        ["simulate", "-q", "--run-dir", str(run_dir), "--rounds", "3", "--hidden", "16"]
    )
    assert res.returncode == 0, res.stdout + res.stderr
    return run_dir


def _rebuilt(desc_path: Path) -> torch.nn.Module:
    desc = json.loads(desc_path.read_text())
    return build_model(
        desc["model"], desc["input_shape"], desc["num_classes"], desc["hidden"]
    )


def _accuracy(model: torch.nn.Module, data: Path) -> float:
    val = load_dataset(f"npz:{data}")
    with torch.no_grad():
        pred = model(torch.from_numpy(val.x)).argmax(dim=1).numpy()
    return float(np.mean(pred == val.y))


@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_export_final_model_loads_strictly_and_scores_like_the_run(
    sim_dir: Path, fmt: str
) -> None:
    out = sim_dir / f"m.{fmt}"

    res = run_cli(["export", str(sim_dir), "--format", fmt, "--out", str(out)])

    assert res.returncode == 0, res.stderr
    desc = json.loads((sim_dir / f"m.{fmt}.json").read_text())
    assert desc["model"] == "mlp" and desc["hidden"] == 16
    assert desc["input_shape"] == [1, 8, 8] and desc["num_classes"] == 10
    if fmt == "safetensors":
        state = load_file(str(out))  # the reference reader, not ours
        with safe_open(str(out), framework="pt") as f:
            assert json.loads(f.metadata()["input_shape"]) == [1, 8, 8]
    else:
        state = torch.load(out, weights_only=True)
    model = _rebuilt(sim_dir / f"m.{fmt}.json")
    model.load_state_dict(state, strict=True)
    for name, arr in final_model(sim_dir / "server").items():
        np.testing.assert_array_equal(state[name].numpy(), arr)
    summary = json.loads((sim_dir / "contributions.json").read_text())
    acc = _accuracy(model, sim_dir / "data" / "val.npz")
    assert acc == pytest.approx(summary["val_acc"], abs=1e-9)


def test_export_round_checkpoint_and_pruned_round_named(sim_dir: Path) -> None:
    ok = run_cli(["export", str(sim_dir / "server"), "--round", "1"])
    pruned = run_cli(["export", str(sim_dir), "--round", "0"])
    missing = run_cli(["export", str(sim_dir / "nope")])

    assert ok.returncode == 0, ok.stderr
    written = Path(json.loads(ok.stdout)["written"])
    assert written.name == "model-round-1.safetensors"
    state = load_file(str(written))
    _rebuilt(written.with_name(written.name + ".json")).load_state_dict(state)
    assert pruned.returncode == 2
    assert "after round 0" in pruned.stderr and "kept: after round 1" in pruned.stderr
    assert missing.returncode == 2 and "not a run directory" in missing.stderr
