"""Payouts: cents that add up, harmful parties, the payout document and the CLI."""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import pytest

from fedgrpc.cli import observe
from fedgrpc.cli.main import main
from fedgrpc.cli.reports import payout_csv, payout_doc, payout_table
from fedgrpc.errors import ConfigError
from fedgrpc.scoring.payouts import PAYOUT_RULES, Payout, payouts
from fedgrpc.store.ledger import LEDGER_FILE, Ledger
from fedgrpc.types import (
    ContributionReport,
    PartyRound,
    RoundOutcome,
    RoundResult,
    SecondOrder,
)

REPO = Path(__file__).resolve().parents[2]
CONSOLE = Path(sys.executable).parent / "fedgrpc"


def _cents(rows: list[Payout]) -> dict[str, int]:
    return {p.party_id: round(p.amount * 100) for p in rows}


# ------------------------------------------------------------------- the rules
def test_payouts_cents_add_up_over_three_equal_parties() -> None:
    rows = payouts({"b": 1.0, "a": 1.0, "c": 1.0}, 100.0, "positive-share")

    assert _cents(rows) == {"a": 3334, "b": 3333, "c": 3333}  # the odd cent by id
    assert sum(_cents(rows).values()) == 10000
    assert [p.party_id for p in rows] == ["a", "b", "c"]
    assert all(p.share == pytest.approx(1 / 3) for p in rows)
    assert not any(p.harmful for p in rows)


@pytest.mark.parametrize("amount", [0.01, 0.07, 1.0, 99.99, 1000.0, 123456.78])
def test_payouts_cents_always_add_up(amount: float) -> None:
    totals = {"a": 0.37, "b": 0.11, "c": 0.0523, "d": 1e-9, "e": 0.29}

    rows = payouts(totals, amount, "positive-share")

    assert sum(_cents(rows).values()) == round(amount * 100)
    for p in rows:  # each within a cent of its exact share
        assert abs(p.amount - amount * p.share) < 0.01 + 1e-9


def test_payouts_proportional_to_positive_totals() -> None:
    rows = payouts({"a": 3.0, "b": 1.0}, 10.0, "positive-share")

    assert [(p.party_id, p.amount, p.share) for p in rows] == [
        ("a", 7.5, 0.75),
        ("b", 2.5, 0.25),
    ]


def test_payouts_negative_totals_get_nothing_and_are_harmful() -> None:
    rows = payouts(
        {"a": 0.3, "bad": -0.5, "b": 0.1, "zero": 0.0}, 100.0, PAYOUT_RULES[0]
    )

    by_id = {p.party_id: p for p in rows}
    assert by_id["bad"].amount == 0.0
    assert by_id["bad"].harmful
    assert by_id["bad"].share == 0.0
    assert by_id["bad"].total == -0.5
    assert (by_id["zero"].amount, by_id["zero"].harmful) == (0.0, False)
    assert _cents(rows) == {"a": 7500, "b": 2500, "bad": 0, "zero": 0}
    assert [p.party_id for p in rows] == ["a", "b", "zero", "bad"]


def test_payouts_all_negative_pays_nobody() -> None:
    rows = payouts({"a": -0.1, "b": -0.2}, 50.0, "positive-share")
    equal = payouts({"a": -0.1, "b": -0.2}, 50.0, "equal-positive")

    for result in (rows, equal):
        assert [(p.amount, p.share, p.harmful) for p in result] == [
            (0.0, 0.0, True),
            (0.0, 0.0, True),
        ]


def test_payouts_equal_positive_rule() -> None:
    rows = payouts(
        {"a": 5.0, "b": 0.001, "c": -1.0, "d": 0.0, "e": math.nan},
        10.0,
        "equal-positive",
    )

    by_id = {p.party_id: p for p in rows}
    assert (by_id["a"].amount, by_id["b"].amount) == (5.0, 5.0)
    assert (by_id["a"].share, by_id["b"].share) == (0.5, 0.5)
    assert [by_id[p].amount for p in "cde"] == [0.0, 0.0, 0.0]
    assert [by_id[p].harmful for p in "cde"] == [True, False, False]
    assert math.isnan(by_id["e"].total)  # an unknown total is reported, not paid
    assert sum(_cents(rows).values()) == 1000


def test_payouts_equal_positive_odd_cents() -> None:
    rows = payouts({"x": 1.0, "y": 2.0, "z": 3.0}, 0.1, "equal-positive")

    assert _cents(rows) == {"x": 4, "y": 3, "z": 3}


def test_payouts_zero_amount_and_no_parties() -> None:
    assert _cents(payouts({"a": 1.0}, 0.0, "positive-share")) == {"a": 0}
    assert payouts({}, 10.0, "positive-share") == []


@pytest.mark.parametrize(
    ("amount", "rule", "message"),
    [
        (-1.0, "positive-share", "payout amount must be a finite number >= 0, got -1"),
        (math.nan, "positive-share", "payout amount must be a finite number >= 0"),
        (math.inf, "equal-positive", "payout amount must be a finite number >= 0"),
        (10.0, "winner-takes-all", "unknown payout rule 'winner-takes-all'; choose"),
    ],
)
def test_payouts_bad_amount_or_rule(amount: float, rule: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        payouts({"a": 1.0}, amount, rule)


# --------------------------------------------------------- a real ledger, CLI
def _party(pid: str, score: float, t: int) -> PartyRound:
    return PartyRound(
        party_id=pid,
        num_samples=10,
        weight=1 / 3,
        score=score,
        dot=3 * score,
        update_norm=1.0,
        train_loss=0.5,
        submission_id=f"{pid}:{t}",
        digest="cd" * 16,
    )


def _result(t: int, scores: Mapping[str, float], ok: bool = True) -> RoundResult:
    return RoundResult(
        round=t,
        outcome=RoundOutcome.OK if ok else RoundOutcome.FAILED,
        reason="" if ok else "quorum lost",
        parties=tuple(_party(p, s, t) for p, s in scores.items()) if ok else (),
        late=(),
        val_loss_before=2.0 - t,
        val_acc_before=0.2,
        val_loss_after=1.8 - t,
        val_acc_after=0.3,
        model_digest=f"m{t}",
    )


SCORES = [
    {"alice": 0.2, "bob": 0.1, "mallory": -0.05},
    {"alice": 0.1, "bob": 0.1, "mallory": -0.02},
]


def _ledger_dir(tmp_path: Path, *, score2: bool = False) -> Path:
    run_dir = tmp_path / "run"
    with Ledger(run_dir / LEDGER_FILE) as led:
        led.start_run("run-pay", {"rounds": 3}, "val")
        for p in SCORES[0]:
            led.upsert_party(p, 10)
        for t, s in enumerate(SCORES):
            led.record_round(_result(t, s))
        led.record_round(_result(2, {}, ok=False))
        if score2:
            led.record_second_order(
                SecondOrder(
                    0,
                    dict.fromkeys(SCORES[0], 1.0),
                    {"alice": 0.3, "bob": 0.1, "mallory": 0.1},
                )
            )
    return run_dir


def _report(run_dir: Path, method: str = "digfl-1", **kw: int) -> ContributionReport:
    with Ledger.open_readonly(run_dir / LEDGER_FILE) as led:
        return led.contributions(method=method, **kw)  # type: ignore[arg-type]


def _digest(run_dir: Path, from_round: int = 0) -> str:
    with Ledger.open_readonly(run_dir / LEDGER_FILE) as led:
        return led.rows_digest(from_round)


def test_payouts_doc_quotes_what_rederives_it(tmp_path: Path) -> None:
    run_dir = _ledger_dir(tmp_path)
    report = _report(run_dir)

    doc = payout_doc(report, 1000.0, "positive-share")

    assert (doc["run_id"], doc["method"], doc["rule"], doc["amount"]) == (
        "run-pay",
        "digfl-1",
        "positive-share",
        1000.0,
    )
    assert doc["rounds"] == [0, 1]  # the failed round 2 pays nothing
    assert doc["ledger_rows_sha256"] == _digest(run_dir)
    assert len(doc["ledger_rows_sha256"]) == 64
    amounts = {p["party_id"]: p["amount"] for p in doc["parties"]}
    assert amounts == {"alice": 600.0, "bob": 400.0, "mallory": 0.0}
    assert doc["harmful"] == ["mallory"]
    assert [p["total"] for p in doc["parties"]] == pytest.approx([0.3, 0.2, -0.07])
    table = payout_table(doc)
    assert (
        "payout 1000.00 · run run-pay · digfl-1 · positive-share · rounds 0-1 (2)"
        in (table)
    )
    assert "mallory" in table and "harmful" in table


def test_payouts_doc_digfl_2_leaves_out_pending_rounds(tmp_path: Path) -> None:
    run_dir = _ledger_dir(tmp_path, score2=True)

    doc = payout_doc(_report(run_dir, "digfl-2"), 10.0, "positive-share")

    assert doc["method"] == "digfl-2"
    assert doc["rounds"] == [0]  # round 1's digfl-2 is not recorded yet
    assert {p["party_id"]: p["amount"] for p in doc["parties"]} == {
        "alice": 6.0,
        "bob": 2.0,
        "mallory": 2.0,
    }
    assert doc["harmful"] == []


def test_payouts_digest_follows_the_round_range(tmp_path: Path) -> None:
    run_dir = _ledger_dir(tmp_path)

    doc = payout_doc(_report(run_dir, from_round=1), 10.0, "positive-share")

    assert doc["rounds"] == [1]
    assert doc["ledger_rows_sha256"] == _digest(run_dir, 1)
    assert doc["ledger_rows_sha256"] != _digest(run_dir, 0)


def test_payouts_cli_writes_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = _ledger_dir(tmp_path)
    out = tmp_path / "payout.json"

    code = main(
        [
            "contributions",
            "--run-dir",
            str(run_dir),
            "--payout",
            "1000",
            "--payout-out",
            str(out),
        ]
    )

    captured = capsys.readouterr()
    assert code == 0, captured.err
    doc = json.loads(out.read_text())
    assert doc == payout_doc(_report(run_dir), 1000.0, "positive-share")
    assert doc["ledger_rows_sha256"] == _digest(run_dir)
    assert sum(round(p["amount"] * 100) for p in doc["parties"]) == 100000
    assert "payout 1000.00 · run run-pay" in captured.out
    assert f"payout written to {out}" in captured.err


def test_payouts_cli_writes_csv_with_rule_and_method(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = _ledger_dir(tmp_path)
    out = tmp_path / "payout.csv"

    code = main(
        [
            "contributions",
            "--run-dir",
            str(run_dir),
            "--payout",
            "99.99",
            "--rule",
            "equal-positive",
            "--format",
            "json",
            "--payout-out",
            str(out),
        ]
    )

    captured = capsys.readouterr()
    assert code == 0, captured.err
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    assert [
        (r["party_id"], r["amount"], r["harmful"], r["rule"], r["rounds"]) for r in rows
    ] == [
        ("alice", "50.00", "0", "equal-positive", "0 1"),
        ("bob", "49.99", "0", "equal-positive", "0 1"),
        ("mallory", "0.00", "1", "equal-positive", "0 1"),
    ]
    assert {r["ledger_rows_sha256"] for r in rows} == {_digest(run_dir)}
    assert {(r["run_id"], r["method"]) for r in rows} == {("run-pay", "digfl-1")}
    printed = json.loads(captured.out)  # --format json prints the document
    assert printed["rule"] == "equal-positive"
    assert printed["amount"] == 99.99


def test_payouts_console_script_digfl_2_csv(tmp_path: Path) -> None:
    run_dir = _ledger_dir(tmp_path, score2=True)
    out = tmp_path / "p.csv"

    proc = subprocess.run(
        [
            str(CONSOLE),
            "contributions",
            "--run-dir",
            str(run_dir),
            "--method",
            "digfl-2",
            "--payout",
            "10",
            "--payout-out",
            str(out),
            "--format",
            "csv",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=REPO,
        check=False,
    )

    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == out.read_text()
    rows = list(csv.DictReader(io.StringIO(proc.stdout)))
    assert [(r["party_id"], r["amount"], r["method"], r["rounds"]) for r in rows] == [
        ("alice", "6.00", "digfl-2", "0"),
        ("bob", "2.00", "digfl-2", "0"),
        ("mallory", "2.00", "digfl-2", "0"),
    ]


def test_payouts_cli_bad_amount_is_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = _ledger_dir(tmp_path)
    out = tmp_path / "never.json"

    code = main(
        [
            "contributions",
            "--run-dir",
            str(run_dir),
            "--payout=-5",
            "--payout-out",
            str(out),
        ]
    )

    assert code == 2
    err = capsys.readouterr().err
    assert (
        "fedgrpc contributions: error: --payout: payout amount must be a finite "
        "number >= 0, got -5.0"
    ) in err
    assert not out.exists()


def test_payouts_cli_unknown_rule_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as info:
        main(
            [
                "contributions",
                "--run-dir",
                str(tmp_path),
                "--payout",
                "5",
                "--rule",
                "most-loyal",
            ]
        )

    assert info.value.code == 2


def test_payouts_private_view_refuses_payout(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    private = _report(_ledger_dir(tmp_path)).party_view("alice")
    monkeypatch.setattr(observe, "load_report", lambda a: private)
    out = tmp_path / "never.json"

    code = main(
        [
            "contributions",
            "--server",
            "localhost:1",
            "--insecure",
            "--payout",
            "10",
            "--payout-out",
            str(out),
        ]
    )

    assert private.private
    assert code == 2
    err = capsys.readouterr().err
    assert "a payout needs every party's totals" in err
    assert "use an admin credential or --run-dir" in err
    assert not out.exists()


def test_payouts_private_view_refused_before_any_output(tmp_path: Path) -> None:
    private = _report(_ledger_dir(tmp_path)).party_view("bob")
    args = argparse.Namespace(payout=1.0, rule="positive-share", format="table")

    with pytest.raises(ConfigError, match="a payout needs every party's totals"):
        observe._payout(args, private)


def test_payouts_csv_has_one_row_per_party(tmp_path: Path) -> None:
    doc = payout_doc(_report(_ledger_dir(tmp_path)), 3.0, "positive-share")

    rows = list(csv.reader(io.StringIO(payout_csv(doc))))

    assert rows[0] == [
        "run_id",
        "method",
        "rule",
        "rounds",
        "ledger_rows_sha256",
        "party_id",
        "total",
        "share",
        "amount",
        "harmful",
    ]
    assert [r[5] for r in rows[1:]] == ["alice", "bob", "mallory"]
    assert sum(round(float(r[8]) * 100) for r in rows[1:]) == 300
