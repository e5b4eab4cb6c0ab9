from __future__ import annotations

import json
import math
import os
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedgrpc.errors import ConfigError, FedGrpcError
from fedgrpc.store.ledger import LEDGER_FILE, Ledger
from fedgrpc.types import PartyRound, RoundOutcome, RoundResult

REPO_ROOT = Path(__file__).resolve().parents[2]


def _last_round(led: Ledger) -> int | None:
    """The last recorded round, or None (what the deleted ``last_round()`` gave)."""
    return max((r.round for r in led.rounds()), default=None)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


def _party(pid: str, score: float, n: int = 10) -> PartyRound:
    return PartyRound(
        party_id=pid,
        num_samples=n,
        weight=0.5,
        score=score,
        dot=score * 4,
        update_norm=1.25,
        train_loss=0.7,
        submission_id=f"{pid}-sub",
        digest="ab" * 32,
    )


def _round(
    t: int,
    scores: dict[str, float],
    outcome: RoundOutcome = RoundOutcome.OK,
    reason: str = "",
) -> RoundResult:
    return RoundResult(
        round=t,
        outcome=outcome,
        reason=reason,
        parties=tuple(_party(p, s) for p, s in scores.items()),
        late=("late-party",) if t % 2 else (),
        val_loss_before=2.0 - 0.1 * t,
        val_acc_before=0.1 * t,
        val_loss_after=1.9 - 0.1 * t,
        val_acc_after=0.1 * t + 0.05,
        model_digest=f"model-{t}",
        duration_s=1.5,
        val_grad_s=0.25,
        aggregate_s=0.125,
        extra={"note": f"round {t}", "sizes": [1, 2]},
    )


ROUNDS = [
    _round(0, {"a": 0.3, "b": 0.1, "c": -0.2}),
    _round(1, {"a": 0.2, "b": 0.2, "c": -0.1}),
    _round(2, {"a": 0.1, "b": 0.4}),
    _round(3, {"a": 0.05, "c": 0.05}),
]


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    with Ledger(tmp_path / LEDGER_FILE, clock=FakeClock()) as led:
        led.start_run("run-1", {"rounds": 4, "run_dir": tmp_path}, "val-digest")
        for pid, attack in (("a", ""), ("b", ""), ("c", "label-flip:0.8")):
            led.upsert_party(pid, 10, attack)
        yield led


def test_ledger_round_trip(ledger: Ledger) -> None:
    for r in ROUNDS:
        ledger.record_round(r)

    got = ledger.rounds()

    assert got == ROUNDS
    assert _last_round(ledger) == 3
    assert ledger.rounds(1, 2) == ROUNDS[1:3]
    assert ledger.rounds(from_round=3) == ROUNDS[3:]


def test_ledger_nan_round_trips_as_nan(ledger: Ledger) -> None:
    r = RoundResult(
        round=0,
        outcome=RoundOutcome.FAILED,
        reason="quorum 1 of 2",
        parties=(),
        late=("a", "b"),
        val_loss_before=1.0,
        val_acc_before=0.5,
        val_loss_after=math.nan,
        val_acc_after=math.nan,
        model_digest="m",
    )

    ledger.record_round(r)
    got = ledger.rounds()[0]

    assert math.isnan(got.val_loss_after)
    assert math.isnan(got.val_acc_after)
    assert got.late == ("a", "b")
    assert got.status == r.status


def test_ledger_record_round_is_one_transaction(ledger: Ledger) -> None:
    ledger.record_round(ROUNDS[0], state={"next_round": 1})
    broken = RoundResult(
        round=1,
        outcome=RoundOutcome.OK,
        parties=(_party("a", 0.1), _party("a", 0.2)),  # same party twice: PK violation
        late=(),
        val_loss_before=1.0,
        val_acc_before=0.5,
        val_loss_after=0.9,
        val_acc_after=0.6,
        model_digest="m1",
    )

    with pytest.raises(sqlite3.IntegrityError):
        ledger.record_round(broken, state={"next_round": 2, "other": "x"})

    assert _last_round(ledger) == 0
    assert ledger.rounds() == [ROUNDS[0]]
    assert ledger.get_state("next_round") == 1
    assert ledger.get_state("other") is None
    ledger.record_round(ROUNDS[1], state={"next_round": 2})
    assert _last_round(ledger) == 1


def test_ledger_record_round_rolls_back_on_check_constraint(ledger: Ledger) -> None:
    bad = RoundResult(
        round=0,
        outcome=RoundOutcome.OK,
        parties=(_party("a", 0.1), _party("b", 0.1, n=-5)),
        late=(),
        val_loss_before=1.0,
        val_acc_before=0.5,
        val_loss_after=0.9,
        val_acc_after=0.6,
        model_digest="m",
    )

    with pytest.raises(sqlite3.IntegrityError):
        ledger.record_round(bad, state={"k": 1})

    assert ledger.rounds() == []
    assert _last_round(ledger) is None
    assert ledger.get_state("k") is None


def test_ledger_record_round_unserialisable_state_commits_nothing(
    ledger: Ledger,
) -> None:
    with pytest.raises(TypeError):
        ledger.record_round(ROUNDS[0], state={"k": object()})

    assert _last_round(ledger) is None


def test_ledger_rerecord_identical_is_noop_and_different_raises(ledger: Ledger) -> None:
    ledger.record_round(ROUNDS[0])

    ledger.record_round(ROUNDS[0])
    with pytest.raises(FedGrpcError, match="round 0 is already recorded") as err:
        ledger.record_round(_round(0, {"a": 9.0}))

    assert err.value.code == "ALREADY_EXISTS"
    assert ledger.rounds() == [ROUNDS[0]]


def test_ledger_failed_round_may_be_superseded(ledger: Ledger) -> None:
    ledger.record_round(
        _round(0, {"a": 0.5}, outcome=RoundOutcome.FAILED, reason="quorum 1 of 2")
    )

    ledger.record_round(ROUNDS[0])

    assert ledger.rounds() == [ROUNDS[0]]


def test_ledger_survives_close_and_reopen(tmp_path: Path) -> None:
    with Ledger(tmp_path) as led:
        led.start_run("run-1", {"lr": 0.5}, "vd", method="digfl", method_version="2")
        led.upsert_party("a", 12, "free-rider")
        for r in ROUNDS[:2]:
            led.record_round(r, state={"next_round": r.round + 1})
        led.set_state("model_path", "ckpt/round-1.npz")

    with Ledger(tmp_path / LEDGER_FILE) as led:
        led.start_run("run-1", {"lr": 0.5}, "vd")  # resume: keeps the row
        info = led.run_info()
        assert info is not None
        assert info["config"] == {"lr": 0.5}
        assert (info["method"], info["method_version"]) == ("digfl", "2")
        assert led.rounds() == ROUNDS[:2]
        assert led.get_state("next_round") == 2
        assert led.get_state("model_path") == "ckpt/round-1.npz"
        assert led.get_state("missing", default=7) == 7
        assert led.parties()[0]["attack"] == "free-rider"
        with pytest.raises(ConfigError, match="run-2"):
            led.start_run("run-2", {}, "vd")


def test_ledger_start_run_stores_paths_as_strings(
    ledger: Ledger, tmp_path: Path
) -> None:
    info = ledger.run_info()

    assert info is not None
    assert info["run_id"] == "run-1"
    assert info["config"] == {"rounds": 4, "run_dir": str(tmp_path)}
    assert info["validation_digest"] == "val-digest"


def test_ledger_upsert_party_keeps_joined_at(ledger: Ledger) -> None:
    before = {p["party_id"]: p for p in ledger.parties()}

    ledger.upsert_party("a", 99, "scaled:10")
    after = {p["party_id"]: p for p in ledger.parties()}

    assert after["a"]["joined_at"] == before["a"]["joined_at"]
    assert after["a"]["last_seen"] > before["a"]["last_seen"]
    assert after["a"]["num_samples"] == 99
    assert after["a"]["attack"] == "scaled:10"
    assert [p["party_id"] for p in ledger.parties()] == ["a", "b", "c"]


def test_ledger_contributions_totals_shares_and_ranking(ledger: Ledger) -> None:
    for r in ROUNDS:
        ledger.record_round(r)

    report = ledger.contributions()

    assert report.run_id == "run-1"
    assert report.method == "digfl-1"
    assert report.rounds_done == 4
    assert [p.party_id for p in report.parties] == ["b", "a", "c"]
    by_id = {p.party_id: p for p in report.parties}
    assert by_id["a"].total == pytest.approx(0.65)
    assert by_id["b"].total == pytest.approx(0.7)
    assert by_id["a"].share == pytest.approx(0.65 / 1.1)
    assert by_id["c"].total == pytest.approx(-0.25)
    assert sum(p.share for p in report.parties) == pytest.approx(1.0)
    assert sum(p.reference_share for p in report.parties) == pytest.approx(1.0)
    assert by_id["c"].round_indices == (0, 1, 3)
    assert by_id["c"].attack == "label-flip:0.8"
    assert [r.round for r in report.rounds] == [0, 1, 2, 3]


def test_ledger_contributions_rank_by_total_descending(ledger: Ledger) -> None:
    ledger.record_round(_round(0, {"a": 0.1, "b": 0.5, "c": 0.3}))

    report = ledger.contributions()

    assert [p.party_id for p in report.parties] == ["b", "c", "a"]


def test_ledger_contributions_filter_by_party_and_round_range(ledger: Ledger) -> None:
    for r in ROUNDS:
        ledger.record_round(r)

    report = ledger.contributions(party_ids=["b"], from_round=1, to_round=2)

    assert [p.party_id for p in report.parties] == ["b"]
    b = report.parties[0]
    assert b.total == pytest.approx(0.6)
    assert b.round_indices == (1, 2)
    # Rounds 1-2 totals: a 0.3, b 0.6, c -0.1 -> b's share of the whole is 0.6 / 0.8.
    assert b.share == pytest.approx(0.75)
    assert [r.round for r in report.rounds] == [1, 2]
    assert report.rounds_done == 4


def test_ledger_contributions_skip_failed_rounds(ledger: Ledger) -> None:
    ledger.record_round(_round(0, {"a": 1.0, "b": 1.0}))
    ledger.record_round(
        _round(1, {"a": 5.0}, outcome=RoundOutcome.FAILED, reason="quorum 1 of 2")
    )

    report = ledger.contributions()

    by_id = {p.party_id: p for p in report.parties}
    assert by_id["a"].total == pytest.approx(1.0)
    assert by_id["a"].round_indices == (0,)
    assert by_id["c"].total == 0.0
    assert len(report.rounds) == 2


def test_ledger_contributions_without_run_or_rounds(tmp_path: Path) -> None:
    with Ledger(tmp_path) as led:
        report = led.contributions()

    assert report.run_id == ""
    assert report.parties == ()
    assert report.rounds_done == 0


def test_ledger_wal_mode_is_on(ledger: Ledger, tmp_path: Path) -> None:
    other = sqlite3.connect(tmp_path / LEDGER_FILE)
    try:
        mode = other.execute("PRAGMA journal_mode").fetchone()[0]
    finally:
        other.close()

    assert mode == "wal"
    assert ledger.journal_mode() == "wal"


def test_ledger_readonly_sees_writer_commits(ledger: Ledger, tmp_path: Path) -> None:
    ledger.record_round(ROUNDS[0])
    reader = Ledger.open_readonly(tmp_path)
    try:
        assert _last_round(reader) == 0

        ledger.record_round(ROUNDS[1])

        assert reader.rounds() == ROUNDS[:2]
        assert reader.contributions().rounds_done == 2
        with pytest.raises(FedGrpcError, match="read-only"):
            reader.set_state("k", 1)
    finally:
        reader.close()


_READER = """
import json, sys
from pathlib import Path
from fedgrpc.store.ledger import Ledger
with Ledger.open_readonly(Path(sys.argv[1])) as led:
    report = led.contributions()
    last = max((r.round for r in led.rounds()), default=None)
    print(json.dumps({"last": last, "run": report.run_id,
                      "parties": [p.party_id for p in report.parties]}))
"""


def test_ledger_readonly_from_another_process_while_writer_open(
    ledger: Ledger, tmp_path: Path
) -> None:
    for r in ROUNDS[:3]:
        ledger.record_round(r)

    out = subprocess.run(
        [sys.executable, "-c", _READER, str(tmp_path / LEDGER_FILE)],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )

    got = json.loads(out.stdout)
    assert got == {"last": 2, "run": "run-1", "parties": ["b", "a", "c"]}
    ledger.record_round(ROUNDS[3])
    assert _last_round(ledger) == 3


def test_ledger_readonly_after_writer_closed(tmp_path: Path) -> None:
    with Ledger(tmp_path) as led:
        led.record_round(ROUNDS[0])

    with Ledger.open_readonly(tmp_path / LEDGER_FILE) as reader:
        assert reader.rounds() == [ROUNDS[0]]


def test_ledger_readonly_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no ledger"):
        Ledger.open_readonly(tmp_path / "nope.sqlite")


def test_ledger_concurrent_writers_threads(ledger: Ledger) -> None:
    errors: list[BaseException] = []

    def work(t: int) -> None:
        try:
            ledger.upsert_party(f"p{t}", t + 1)
            ledger.record_round(_round(t, {f"p{t}": 0.1}), state={f"k{t}": t})
            ledger.contributions()
        except BaseException as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=30)

    assert errors == []
    assert [r.round for r in ledger.rounds()] == list(range(8))
    assert ledger.get_state("k5") == 5
