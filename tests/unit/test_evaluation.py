from __future__ import annotations

import argparse
import io
import json
import math
from collections.abc import Mapping
from dataclasses import replace
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest

from fedgrpc.cli.shapley import add_parsers, format_table, progress_bar, run_shapley
from fedgrpc.config import RoundConfig, SplitConfig
from fedgrpc.datasets import split
from fedgrpc.datasets.attacks import Attack, parse_assignments
from fedgrpc.datasets.sources import Dataset
from fedgrpc.errors import ConfigError
from fedgrpc.learning.ground_truth import (
    CoalitionUtility,
    ShapleyReport,
    coalition_utility,
    evaluate,
)
from fedgrpc.scoring import shapley as contribution
from fedgrpc.types import UpdateKind

FLIP = parse_assignments(["2=label-flip:1.0"])
CFG = RoundConfig(
    rounds=5,
    min_parties=3,
    update_kind=UpdateKind.GRADIENT,
    server_lr=1.0,
    batch_size=0,
    model="mlp",
    model_hidden=16,
    seed=0,
)

Parties = tuple[dict[str, Dataset], Dataset]


def _prepare(
    data: str,
    n: int,
    partition: str,
    holdout: int,
    attacks: Mapping[str, Attack],
    seed: int,
    train_count: int = 0,
) -> Parties:
    specs = tuple(f"{k}={a.spec}" for k, a in attacks.items())
    cfg = SplitConfig(
        data=data,
        parties=n,
        partition=partition,
        attacks=specs,
        seed=seed,
        train_count=train_count,
    )
    return split.prepare_parties(cfg, holdout)


@pytest.fixture(scope="module")
def flipped() -> Parties:
    return _prepare("digits", 3, "iid", 360, FLIP, seed=0)


@pytest.fixture(scope="module")
def report(flipped: Parties) -> ShapleyReport:
    parties, val = flipped
    return evaluate(CFG, parties, val, FLIP, method="exact")


@pytest.fixture(scope="module")
def utility(flipped: Parties) -> CoalitionUtility:
    parties, val = flipped
    return coalition_utility(CFG, parties, val, FLIP)


# ------------------------------------------------------------------ prepare_parties


def test_prepare_parties_sizes() -> None:
    parties, val = _prepare("digits", 3, "iid", 360, {}, seed=0)

    assert list(parties) == ["party-0", "party-1", "party-2"]
    assert len(val) == 360
    assert [len(d) for d in parties.values()] == [479, 479, 479]  # 1797 - 360


def test_prepare_parties_train_count_keeps_that_many() -> None:
    parties, val = _prepare("digits", 4, "iid", 360, {}, seed=1, train_count=400)

    assert len(val) == 360
    assert sum(len(d) for d in parties.values()) == 400


def test_prepare_parties_holdout_does_not_depend_on_train_count() -> None:
    _, val_all = _prepare("digits", 2, "iid", 100, {}, seed=3)
    _, val_some = _prepare("digits", 2, "iid", 100, {}, seed=3, train_count=50)

    np.testing.assert_array_equal(val_all.x, val_some.x)


def test_prepare_parties_is_deterministic_per_seed() -> None:
    a, va = _prepare("digits", 3, "dirichlet:0.5", 200, FLIP, seed=5)
    b, vb = _prepare("digits", 3, "dirichlet:0.5", 200, FLIP, seed=5)
    c, _ = _prepare("digits", 3, "dirichlet:0.5", 200, FLIP, seed=6)

    np.testing.assert_array_equal(va.y, vb.y)
    for p in a:
        np.testing.assert_array_equal(a[p].x, b[p].x)
        np.testing.assert_array_equal(a[p].y, b[p].y)
    assert any(len(a[p]) != len(c[p]) or not np.array_equal(a[p].y, c[p].y) for p in a)


@pytest.mark.parametrize("key", ["2", "party-2"])
def test_prepare_parties_applies_data_attack_by_index_or_id(key: str) -> None:
    clean, _ = _prepare("digits", 3, "iid", 360, {}, seed=0)
    attacked, _ = _prepare(
        "digits", 3, "iid", 360, parse_assignments([f"{key}=label-flip:1.0"]), seed=0
    )

    np.testing.assert_array_equal(attacked["party-2"].x, clean["party-2"].x)
    np.testing.assert_array_equal(attacked["party-2"].y, 9 - clean["party-2"].y)
    for p in ("party-0", "party-1"):
        np.testing.assert_array_equal(attacked[p].y, clean[p].y)


def test_prepare_parties_partial_flip_uses_seeded_rng() -> None:
    att = parse_assignments(["1=label-flip:0.5"])
    clean, _ = _prepare("digits", 2, "iid", 360, {}, seed=0)
    a, _ = _prepare("digits", 2, "iid", 360, att, seed=0)
    b, _ = _prepare("digits", 2, "iid", 360, att, seed=0)

    changed = int(np.sum(a["party-1"].y != clean["party-1"].y))
    np.testing.assert_array_equal(a["party-1"].y, b["party-1"].y)
    # half the labels flip; y == 9 - y never holds for digits, so all of them change
    assert changed == round(0.5 * len(clean["party-1"]))


@pytest.mark.parametrize(
    ("items", "match"),
    [(["7=free-rider"], "no such party"), (["1=free-rider", "party-1=scale:2"], "two")],
)
def test_prepare_parties_refuses_bad_attack_keys(items: list[str], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        _prepare("digits", 3, "iid", 360, parse_assignments(items), seed=0)


def test_prepare_parties_refuses_holdout_larger_than_data() -> None:
    with pytest.raises(ConfigError, match="val_holdout"):
        _prepare("digits", 3, "iid", 1797, {}, seed=0)


# ------------------------------------------------------------------ coalition utility


def test_coalition_utility_empty_is_zero_and_cached(utility: CoalitionUtility) -> None:
    s = frozenset({"party-0"})

    first = utility(s)
    trained = len(utility.values)
    second = utility(s)

    assert utility(frozenset()) == (0.0, 0.0)
    assert first == second
    assert len(utility.values) == trained


def test_coalition_utility_grand_equals_full_run(
    utility: CoalitionUtility, report: ShapleyReport
) -> None:
    loss_drop, acc_gain = utility(frozenset(report.parties))

    assert loss_drop == pytest.approx(report.grand_loss_drop, abs=1e-6)
    assert acc_gain == pytest.approx(report.grand_acc_gain, abs=1e-9)


def test_coalition_utility_single_honest_party_learns(
    utility: CoalitionUtility,
) -> None:
    honest, _ = utility(frozenset({"party-0"}))
    flipped, _ = utility(frozenset({"party-2"}))

    assert honest > 0
    assert flipped < honest


# ------------------------------------------------------------------ evaluate


def test_exact_shapley_is_efficient(report: ShapleyReport) -> None:
    assert sum(report.shapley.values()) == pytest.approx(
        report.grand_loss_drop, abs=1e-9
    )
    assert sum(report.shapley_acc.values()) == pytest.approx(
        report.grand_acc_gain, abs=1e-9
    )
    assert report.coalitions_trained == 7


def test_exact_shapley_matches_definition(
    report: ShapleyReport, utility: CoalitionUtility
) -> None:
    n = len(report.parties)
    for i in report.parties:
        others = [p for p in report.parties if p != i]
        phi = 0.0
        for k in range(n):
            w = math.factorial(k) * math.factorial(n - k - 1) / math.factorial(n)
            for combo in combinations(others, k):
                s = frozenset(combo)
                phi += w * (utility(s | {i})[0] - utility(s)[0])
        assert report.shapley[i] == pytest.approx(phi, abs=1e-6)


def test_digfl_correlates_with_exact_shapley(report: ShapleyReport) -> None:
    assert report.pearson > 0.5
    assert report.spearman > 0
    assert report.ranks(report.shapley)["party-2"] == 3
    assert report.ranks(report.digfl)["party-2"] == 3


def test_leave_one_out_uses_full_and_reduced_coalitions(
    report: ShapleyReport, utility: CoalitionUtility
) -> None:
    full = utility(frozenset(report.parties))[0]
    for p in report.parties:
        without = utility(frozenset(report.parties) - {p})[0]
        assert report.loo[p] == pytest.approx(full - without, abs=1e-6)


def test_permutation_estimate_approaches_exact(
    report: ShapleyReport, utility: CoalitionUtility
) -> None:
    scale = max(abs(v) for v in report.shapley.values())

    few = contribution.permutation_shapley(
        report.parties, utility.loss, 5, np.random.default_rng(1)
    )
    many = contribution.permutation_shapley(
        report.parties, utility.loss, 600, np.random.default_rng(1)
    )

    err_many = max(abs(many[p] - report.shapley[p]) for p in report.parties)
    err_few = max(abs(few[p] - report.shapley[p]) for p in report.parties)
    assert err_many < 0.05 * scale
    assert err_many <= err_few + 1e-12


def test_evaluate_permutation_method(flipped: Parties, report: ShapleyReport) -> None:
    parties, val = flipped
    calls: list[tuple[int, int]] = []

    mc = evaluate(
        CFG,
        parties,
        val,
        FLIP,
        method="permutation",
        permutations=300,
        rng_seed=2,
        progress=lambda d, t: calls.append((d, t)),
    )

    assert mc.method == "permutation"
    assert mc.permutations == 300
    for p in mc.parties:
        assert mc.shapley[p] == pytest.approx(
            report.shapley[p], abs=0.1 * abs(report.shapley[p]) + 1e-3
        )
    assert sum(mc.shapley.values()) == pytest.approx(mc.grand_loss_drop, abs=1e-9)
    assert calls[-1][0] == calls[-1][1] == mc.coalitions_trained


def test_evaluate_reports_progress_per_coalition(flipped: Parties) -> None:
    parties, val = flipped
    calls: list[tuple[int, int]] = []

    evaluate(
        CFG,
        parties,
        val,
        FLIP,
        method="exact",
        progress=lambda d, t: calls.append((d, t)),
    )

    assert calls == [(k, 7) for k in range(1, 8)]


def test_evaluate_refuses_unknown_method(flipped: Parties) -> None:
    parties, val = flipped
    with pytest.raises(ConfigError, match="method"):
        evaluate(CFG, parties, val, FLIP, method="bogus")  # type: ignore[arg-type]


def test_report_json_and_table(report: ShapleyReport) -> None:
    doc = report.to_json()
    text = json.dumps(doc, allow_nan=False)
    table = format_table(report)

    assert json.loads(text)["method"] == "exact"
    assert [p["party_id"] for p in doc["parties"]] == report.parties
    assert doc["parties"][2]["attack"] == "label-flip:1.0"
    assert len(doc["coalitions"]) == 7
    assert doc["timing"]["shapley_s"] >= doc["timing"]["digfl_run_s"] > 0
    for p in report.parties:
        assert p in table
    assert "Pearson" in table and "Spearman" in table
    lines = table.splitlines()
    assert len({len(line.split("  ")[0]) for line in lines[2:5]}) == 1  # aligned


def test_report_ratios(report: ShapleyReport) -> None:
    assert report.time_ratio == pytest.approx(report.shapley_s / report.digfl_run_s)
    assert report.digfl_scoring_s > 0
    assert report.scoring_ratio > report.time_ratio


# ------------------------------------------------------------------ progress bar


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_draws_on_tty() -> None:
    out = _Tty()

    progress_bar(12, 63, stream=out, width=10)
    progress_bar(63, 63, stream=out, width=10)

    assert out.getvalue() == (
        "\r[##........] 12/63 coalitions\r[##########] 63/63 coalitions\n"
    )


def test_progress_bar_is_silent_off_tty_unless_forced() -> None:
    quiet, forced = io.StringIO(), io.StringIO()

    progress_bar(1, 2, stream=quiet)
    progress_bar(1, 2, stream=forced, force=True, width=4)

    assert quiet.getvalue() == ""
    assert forced.getvalue() == "\r[##..] 1/2 coalitions"


# ------------------------------------------------------------------ CLI


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="fedgrpc")
    add_parsers(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


def test_cli_shapley_json(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out_file = tmp_path / "sub" / "report.json"
    args = _parse(
        [
            "shapley",
            "--parties",
            "3",
            "--rounds",
            "3",
            "--hidden",
            "8",
            "--attack",
            "1=label-flip:1.0",
            "--server-lr",
            "1.0",
            "--format",
            "json",
            "--output",
            str(out_file),
            "--progress",
            "never",
        ]
    )

    rc = args.func(args)

    assert rc == 0
    doc = json.loads(capsys.readouterr().out)
    assert json.loads(out_file.read_text(encoding="utf-8")) == doc
    assert doc["setup"]["val_holdout"] == 360
    assert doc["config"]["rounds"] == 3
    assert doc["parties"][1]["attack"] == "label-flip:1.0"


def test_cli_shapley_table_and_config_error(capsys: pytest.CaptureFixture[str]) -> None:
    ok = _parse(["shapley", "--parties", "2", "--rounds", "2", "--hidden", "8"])
    bad = _parse(["shapley", "--parties", "2", "--attack", "5=label-flip:1.0"])

    assert run_shapley(ok) == 0
    assert "party-1" in capsys.readouterr().out
    assert run_shapley(bad) == 2
    assert "no such party" in capsys.readouterr().err


@pytest.mark.parametrize(
    "strategy",
    [
        {"server_opt": "adam", "server_opt_lr": 0.05},
        {"aggregation": "median"},
        {"aggregation": "krum", "krum_f": 1},
        {
            "server_opt": "avgm",
            "server_opt_lr": 0.2,
            "sample_count": 2,
            "min_parties": 2,
        },
    ],
    ids=["adam", "median", "krum", "avgm+sampling"],
)
def test_shapley_ground_truth_runs_every_coalition_under_the_strategy(
    flipped: Parties, strategy: dict[str, object]
) -> None:
    parties, val = flipped
    cfg = replace(CFG, **strategy)  # type: ignore[arg-type]
    rep = evaluate(cfg, parties, val, FLIP, method="exact")
    assert rep.coalitions_trained == 7
    assert sum(rep.shapley.values()) == pytest.approx(rep.grand_loss_drop, abs=1e-9)
    # DIG-FL under the strategy: credits (momentum carry included) add up to the
    # first-order drop of the applied steps, close to the measured one here, and
    # the flipper ranks last in both.
    assert sum(rep.digfl.values()) == pytest.approx(rep.grand_loss_drop, rel=0.25)
    assert rep.ranks(rep.shapley)["party-2"] == 3
    assert rep.ranks(rep.digfl)["party-2"] == 3


def test_shapley_ground_truth_refuses_fedbuff(flipped: Parties) -> None:
    parties, val = flipped
    with pytest.raises(ConfigError, match="FedBuff"):
        evaluate(replace(CFG, buffer_size=3), parties, val, FLIP, method="exact")
