"""`fedgrpc shapley` on parties' own .npz files, a given validation set and θ_0."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from torch import nn

from fedgrpc.cli.main import main
from fedgrpc.config import RoundConfig
from fedgrpc.datasets.attacks import parse_assignments
from fedgrpc.datasets.sources import Dataset, load_dataset, save_npz, subset
from fedgrpc.datasets.split import load_parties
from fedgrpc.errors import ConfigError
from fedgrpc.learning.inprocess import run_in_process
from fedgrpc.learning.models import build_model, init_params
from fedgrpc.learning.training import Evaluator
from fedgrpc.learning.validation import config_for_data, setup_model
from fedgrpc.store.checkpoint import save_arrays

SHAPE = (1, 8, 8)


@pytest.fixture(scope="module")
def digits() -> Dataset:
    return load_dataset("digits")


def _write(path: Path, ds: Dataset, *, classes: bool = True) -> str:
    if classes:
        save_npz(path, ds)
    else:  # only x and y, as a user may write it; classes inferred from the labels
        np.savez(path, x=ds.x, y=ds.y)
    return f"npz:{path}"


def _files(tmp_path: Path, digits: Dataset) -> tuple[dict[str, str], str]:
    """alice 160 and bob 90 clean samples, carol 160 with labels shifted by 3."""
    carol = subset(digits, np.arange(450, 610))
    shifted = Dataset(x=carol.x, y=(carol.y + 3) % 10, num_classes=10, name="carol")
    parties = {
        "alice": _write(tmp_path / "alice.npz", subset(digits, np.arange(200, 360))),
        "bob": _write(
            tmp_path / "bob.npz", subset(digits, np.arange(360, 450)), classes=False
        ),
        "carol": _write(tmp_path / "carol.npz", shifted),
    }
    val = _write(tmp_path / "val.npz", subset(digits, np.arange(200)))
    return parties, val


def _shapley(argv: list[str], capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    rc = main(
        [
            "shapley",
            "--model",
            "logreg",
            "--rounds",
            "3",
            "--format",
            "json",
            "--progress",
            "never",
            *argv,
        ]
    )
    out = capsys.readouterr()
    assert rc == 0, out.err
    doc: dict[str, Any] = json.loads(out.out)
    return doc


def _party_args(parties: dict[str, str], val: str) -> list[str]:
    args = [
        a for pid, spec in parties.items() for a in ("--party-data", f"{pid}={spec}")
    ]
    return [*args, "--val-data", val]


# ------------------------------------------------------------------ load_parties
def test_load_parties_keeps_order_data_and_one_class_count(
    tmp_path: Path, digits: Dataset
) -> None:
    few = subset(digits, np.flatnonzero(digits.y < 4)[:30])  # labels 0..3 only
    specs = {
        "zed": _write(tmp_path / "zed.npz", few, classes=False),
        "amy": _write(tmp_path / "amy.npz", subset(digits, np.arange(40))),
    }
    val_spec = _write(tmp_path / "val.npz", subset(digits, np.arange(40, 90)))

    parties, val = load_parties(specs, val_spec)

    assert list(parties) == ["zed", "amy"]
    np.testing.assert_array_equal(parties["zed"].x, few.x)
    np.testing.assert_array_equal(parties["zed"].y, few.y)
    assert len(val) == 50
    # zed's file alone would say 4 classes: one model must fit every label.
    assert {d.num_classes for d in (*parties.values(), val)} == {10}


def test_load_parties_shape_mismatch_names_the_party(
    tmp_path: Path, digits: Dataset
) -> None:
    flat = Dataset(
        x=digits.x[:20].reshape(20, 64), y=digits.y[:20], num_classes=10, name="flat"
    )
    specs = {
        "ok": _write(tmp_path / "ok.npz", subset(digits, np.arange(20))),
        "flat": _write(tmp_path / "flat.npz", flat),
    }
    val_spec = _write(tmp_path / "val.npz", subset(digits, np.arange(20, 40)))

    with pytest.raises(
        ConfigError,
        match=r"party flat: samples in .*flat\.npz' have "
        r"shape \[64\]; the validation set .* has \[1, 8, 8\]",
    ):
        load_parties(specs, val_spec)


def test_load_parties_file_without_y_refused(tmp_path: Path, digits: Dataset) -> None:
    np.savez(tmp_path / "noy.npz", x=digits.x[:10])
    val_spec = _write(tmp_path / "val.npz", subset(digits, np.arange(20)))

    with pytest.raises(
        ConfigError,
        match=r"party p: .*must hold arrays 'x' and 'y', "
        r"has \['x'\]",
    ):
        load_parties({"p": f"npz:{tmp_path / 'noy.npz'}"}, val_spec)
    with pytest.raises(ConfigError, match=r"validation set: .*must hold arrays"):
        load_parties({"p": val_spec}, f"npz:{tmp_path / 'noy.npz'}")


def test_load_parties_empty_file_refused(tmp_path: Path, digits: Dataset) -> None:
    np.savez(
        tmp_path / "empty.npz",
        x=np.zeros((0, *SHAPE), np.float32),
        y=np.zeros(0, np.int64),
        num_classes=np.int64(10),
    )
    val_spec = _write(tmp_path / "val.npz", subset(digits, np.arange(20)))

    with pytest.raises(ConfigError, match=r"party e: .*empty\.npz' holds no samples"):
        load_parties({"e": f"npz:{tmp_path / 'empty.npz'}"}, val_spec)


def test_load_parties_applies_data_attacks_by_id(
    tmp_path: Path, digits: Dataset
) -> None:
    specs = {
        "a": _write(tmp_path / "a.npz", subset(digits, np.arange(50))),
        "b": _write(tmp_path / "b.npz", subset(digits, np.arange(50, 100))),
    }
    val_spec = _write(tmp_path / "val.npz", subset(digits, np.arange(100, 150)))

    parties, _ = load_parties(specs, val_spec, parse_assignments(["b=label-flip:1.0"]))

    np.testing.assert_array_equal(parties["a"].y, digits.y[:50])
    assert np.all(parties["b"].y != digits.y[50:100])
    with pytest.raises(ConfigError, match="no such party"):
        load_parties(specs, val_spec, parse_assignments(["c=label-flip:1.0"]))


# ------------------------------------------------------------------ the command
def test_cli_shapley_on_party_files(
    tmp_path: Path, digits: Dataset, capsys: pytest.CaptureFixture[str]
) -> None:
    parties, val = _files(tmp_path, digits)

    doc = _shapley(_party_args(parties, val), capsys)

    rows = {p["party_id"]: p for p in doc["parties"]}
    assert list(rows) == ["alice", "bob", "carol"]
    assert [rows[p]["samples"] for p in rows] == [160, 90, 160]
    assert doc["coalitions_trained"] == 7
    assert doc["setup"]["party_data"] == parties
    assert doc["setup"]["val_data"] == val
    assert doc["setup"]["init_model"] is None
    assert "partition" not in doc["setup"]
    # Efficiency of exact Shapley, and the shifted labels cost carol her value.
    shapley = {p: r["shapley"] for p, r in rows.items()}
    assert sum(shapley.values()) == pytest.approx(doc["grand"]["loss_drop"], abs=1e-6)
    assert shapley["carol"] < 0 < min(shapley["alice"], shapley["bob"])
    assert rows["carol"]["digfl"] < min(rows["alice"]["digfl"], rows["bob"]["digfl"])
    # The validation set is the given file: L_v(θ_0) of the seeded logreg on it.
    v = load_dataset(val)
    seeded = init_params("logreg", SHAPE, 10, 64, seed=0)
    loss0, _ = Evaluator(build_model("logreg", SHAPE, 10), v.x, v.y).evaluate(seeded)
    assert doc["grand"]["val_loss0"] == pytest.approx(loss0, rel=1e-6)


def test_cli_shapley_init_model_is_every_coalitions_start(
    tmp_path: Path, digits: Dataset, capsys: pytest.CaptureFixture[str]
) -> None:
    parties, val = _files(tmp_path, digits)
    del parties["carol"]
    start = init_params("logreg", SHAPE, 10, 64, seed=11)
    start = {k: 3.0 * v for k, v in start.items()}  # far from the seeded θ_0
    save_arrays(tmp_path / "start.npz", start)

    seeded = _shapley(_party_args(parties, val), capsys)
    given = _shapley(
        [*_party_args(parties, val), "--init-model", str(tmp_path / "start.npz")],
        capsys,
    )

    v = load_dataset(val)
    loss0, acc0 = Evaluator(build_model("logreg", SHAPE, 10), v.x, v.y).evaluate(start)
    assert given["grand"]["val_loss0"] == pytest.approx(loss0, rel=1e-6)
    assert given["grand"]["val_acc0"] == pytest.approx(acc0)
    assert abs(given["grand"]["val_loss0"] - seeded["grand"]["val_loss0"]) > 0.1
    assert given["setup"]["init_model"] == str(tmp_path / "start.npz")
    # Every coalition trains from that start: alice alone, rerun independently.
    cfg = config_for_data(
        RoundConfig(rounds=3, model="logreg", min_parties=1, expected_parties=1), v
    )
    theta0 = setup_model(cfg).layout.flatten(start)
    _, results = run_in_process(
        cfg, {"alice": load_dataset(parties["alice"])}, v, theta0=theta0
    )
    alone = next(c for c in given["coalitions"] if c["parties"] == ["alice"])
    assert alone["loss_drop"] == pytest.approx(
        loss0 - results[-1].val_loss_after, rel=1e-5, abs=1e-7
    )
    assert given["grand"]["final_val_loss"] == pytest.approx(
        loss0 - given["grand"]["loss_drop"], abs=1e-6
    )


def test_cli_shapley_init_model_also_starts_a_split_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    start = init_params("logreg", SHAPE, 10, 64, seed=5)
    save_arrays(tmp_path / "start.npz", start)

    doc = _shapley(
        ["--parties", "2", "--init-model", str(tmp_path / "start.npz")], capsys
    )

    assert doc["setup"]["init_model"] == str(tmp_path / "start.npz")
    assert doc["setup"]["partition"] == "iid"


def test_cli_shapley_init_model_that_does_not_fit_refused(
    tmp_path: Path, digits: Dataset, capsys: pytest.CaptureFixture[str]
) -> None:
    parties, val = _files(tmp_path, digits)
    save_arrays(tmp_path / "small.npz", init_params("logreg", (1, 4, 4), 10, 64, 0))

    rc = main(
        [
            "shapley",
            "--model",
            "logreg",
            *_party_args(parties, val),
            "--init-model",
            str(tmp_path / "small.npz"),
        ]
    )

    assert rc == 2
    err = capsys.readouterr().err
    assert "--init-model" in err and "small.npz" in err
    assert "tensor 'fc.weight' has shape [10, 16]; expected [10, 64]" in err
    assert "inputs [1, 8, 8] and 10 classes" in err


def fixed_width_model(
    input_shape: tuple[int, ...], num_classes: int, hidden: int
) -> nn.Module:
    """A user model that takes 10 features whatever the data: it cannot fit 8x8."""
    return nn.Sequential(nn.Flatten(), nn.Linear(10, num_classes))


def test_cli_shapley_model_that_does_not_fit_the_data_refused(
    tmp_path: Path, digits: Dataset, capsys: pytest.CaptureFixture[str]
) -> None:
    parties, val = _files(tmp_path, digits)

    rc = main(
        [
            "shapley",
            "--model",
            f"{__name__}:fixed_width_model",
            *_party_args(parties, val),
        ]
    )

    assert rc == 2
    err = capsys.readouterr().err
    assert "does not fit the data (inputs [1, 8, 8], 10 classes)" in err


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--party-data", "a=npz:a.npz"], "--party-data needs --val-data"),
        (["--val-data", "npz:v.npz"], "--val-data needs --party-data"),
        (["--party-data", "a", "--val-data", "npz:v.npz"], "expected ID=npz:FILE"),
        (["--party-data", "a=", "--val-data", "npz:v.npz"], "expected ID=npz:FILE"),
        (
            ["--party-data", "a b=npz:a.npz", "--val-data", "npz:v.npz"],
            "party id 'a b' is invalid",
        ),
        (
            [
                "--party-data",
                "a=npz:a.npz",
                "--party-data",
                "a=npz:b.npz",
                "--val-data",
                "npz:v.npz",
            ],
            "party a is given twice",
        ),
        (
            [
                "--party-data",
                "a=npz:a.npz",
                "--val-data",
                "npz:v.npz",
                "--parties",
                "3",
            ],
            "--parties splits --data",
        ),
        (
            [
                "--party-data",
                "a=npz:a.npz",
                "--val-data",
                "npz:v.npz",
                "--partition",
                "dirichlet:0.5",
            ],
            "--partition splits --data",
        ),
        (
            [
                "--party-data",
                "a=npz:a.npz",
                "--val-data",
                "npz:v.npz",
                "--data",
                "mnist:x",
            ],
            "--data splits --data",
        ),
    ],
)
def test_cli_shapley_own_data_option_errors(
    extra: list[str], match: str, capsys: pytest.CaptureFixture[str]
) -> None:
    rc = main(["shapley", *extra])

    assert rc == 2
    assert match in capsys.readouterr().err
