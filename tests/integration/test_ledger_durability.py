"""The ledger reaches its database file every round, resume cross-checks it against
the checkpoints on disk, and ``fedgrpc backup`` copies a live run (issue 11 item 8)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from fedgrpc.cli.main import main
from fedgrpc.errors import ConfigError
from fedgrpc.store.ledger import Ledger
from fedgrpc.store.run_dir import RESUME_KEY
from fedgrpc.types import RunState
from tests.conftest import MakeServer
from tests.integration.test_resumable_failures import _drive
from tests.integration.test_service import StubFor, _join

pytestmark = pytest.mark.integration


def _rounds_in_db_file_alone(run: Path, tmp_path: Path) -> int:
    """Rounds a copy of ledger.sqlite *without* its WAL holds."""
    lone = tmp_path / "lone"
    lone.mkdir(exist_ok=True)
    shutil.copy2(run / "ledger.sqlite", lone / "ledger.sqlite")
    with Ledger(lone / "ledger.sqlite") as ledger:
        return len(ledger.rounds())


def test_every_round_reaches_the_database_file(
    make_server: MakeServer, stub_for: StubFor, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    agg = make_server(run_dir=run, rounds=4)
    _join(stub_for(agg), "alice")

    _drive(agg, stub_for, range(2))

    assert not agg.engine.finished  # still running: nothing was closed cleanly
    assert _rounds_in_db_file_alone(run, tmp_path) == 2


def _finished_run(make_server: MakeServer, stub_for: StubFor, run: Path) -> None:
    agg = make_server(run_dir=run, rounds=4)
    _join(stub_for(agg), "alice")
    _drive(agg, stub_for, range(4))
    assert agg.wait(10) and agg.engine.state == RunState.DONE
    agg.shutdown(grace_s=0.1, save_open_round=False)


def test_resume_refuses_a_pointer_to_a_missing_checkpoint(
    make_server: MakeServer, stub_for: StubFor, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    _finished_run(make_server, stub_for, run)
    with Ledger(run / "ledger.sqlite") as ledger:
        state = ledger.get_state(RESUME_KEY)
        ledger.set_state(
            RESUME_KEY, state | {"next_round": 1, "checkpoint": "round-000001.npz"}
        )

    with pytest.raises(ConfigError) as info:
        make_server(run_dir=run, server={"resume": True}, rounds=4)

    text = str(info.value)
    assert "names checkpoints/round-000001.npz, which is missing" in text
    assert "on disk: round-000003.npz, round-000004.npz" in text


def test_resume_refuses_a_ledger_that_lost_rounds(
    make_server: MakeServer, stub_for: StubFor, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    _finished_run(make_server, stub_for, run)
    with Ledger(run / "ledger.sqlite") as ledger:
        state = ledger.get_state(RESUME_KEY)
        # A ledger two rounds behind its checkpoints, as a lost WAL leaves it.
        shutil.copy2(
            run / "checkpoints" / "round-000003.npz",
            run / "checkpoints" / "round-000002.npz",
        )
        ledger.set_state(
            RESUME_KEY, state | {"next_round": 2, "checkpoint": "round-000002.npz"}
        )

    with pytest.raises(ConfigError) as info:
        make_server(run_dir=run, server={"resume": True}, rounds=4)

    assert (
        "round-000004.npz is newer than the ledger's resume pointer (round 2)"
        in str(info.value)
    )


def test_backup_of_a_live_run_resumes_elsewhere(
    make_server: MakeServer, stub_for: StubFor, tmp_path: Path
) -> None:
    run, copy = tmp_path / "run", tmp_path / "copy"
    agg = make_server(run_dir=run, rounds=4)
    _join(stub_for(agg), "alice")
    _drive(agg, stub_for, range(2))

    code = main(["backup", str(run), str(copy)])  # while the aggregator runs
    agg.shutdown(grace_s=0.1, save_open_round=False)
    resumed = make_server(run_dir=copy, server={"resume": True}, rounds=4)

    assert code == 0
    assert resumed.engine.rounds_done == 2
    assert [r.round for r in resumed.ledger.rounds()] == [0, 1]
    _drive(resumed, stub_for, range(2, 4))
    assert resumed.wait(10) and resumed.engine.state == RunState.DONE
