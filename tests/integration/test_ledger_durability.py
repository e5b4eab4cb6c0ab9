"""The ledger reaches its database file every round, resume cross-checks it against
the checkpoints on disk, and ``fedgrpc backup`` copies a live run (issue 11 item 8)."""

from __future__ import annotations

import math
import shutil
import sqlite3
from pathlib import Path

import pytest

from fedgrpc.cli.main import main
from fedgrpc.engine.spill import DirSpill
from fedgrpc.errors import ConfigError
from fedgrpc.store.ledger import Ledger
from fedgrpc.store.run_dir import RESUME_KEY
from fedgrpc.types import RunState
from tests.conftest import MakeServer
from tests.integration.test_resumable_failures import _drive
from tests.integration.test_service import StubFor, _join, _update, _wait_for

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


def test_checkpoint_hash_follows_the_publication_and_resume_seals_it(
    make_server: MakeServer, stub_for: StubFor, tmp_path: Path
) -> None:
    run, copy = tmp_path / "run", tmp_path / "copy"
    agg = make_server(run_dir=run, rounds=4)
    _join(stub_for(agg), "alice")
    _drive(agg, stub_for, range(2))
    ckpts = run / "checkpoints"

    def pointer() -> dict[str, object]:
        state: dict[str, object] = agg.ledger.get_state(RESUME_KEY) or {}
        return state

    _wait_for(
        "round 2's checkpoint sealed",
        lambda: (
            pointer().get("next_round") == 2
            and bool(pointer().get("checkpoint_sha256"))
        ),
    )
    listed = sorted(p.name for p in ckpts.iterdir())
    sealed = pointer()
    agg.shutdown(grace_s=0.1, save_open_round=False)
    # As a kill after the commit, before the hash, leaves the newest checkpoint:
    (ckpts / "round-000002.npz.sha256").unlink()
    with Ledger(run / "ledger.sqlite") as ledger:
        ledger.set_state(RESUME_KEY, sealed | {"checkpoint_sha256": None})
    code = main(["backup", str(run), str(copy)])
    with Ledger(copy / "ledger.sqlite") as ledger:
        copied = ledger.get_state(RESUME_KEY)

    resumed = make_server(run_dir=run, server={"resume": True}, rounds=4)
    restored = (ckpts / "round-000002.npz.sha256").read_text().strip()
    state = resumed.ledger.get_state(RESUME_KEY)
    rounds_done = resumed.engine.rounds_done
    resumed.shutdown(grace_s=0.1, save_open_round=False)

    # Pruned after the publication: the newest two remain, each with its sidecar.
    assert listed == [
        "round-000001.npz",
        "round-000001.npz.sha256",
        "round-000002.npz",
        "round-000002.npz.sha256",
    ]
    assert rounds_done == 2
    assert state == sealed  # the resumed run sealed the pointer again
    assert restored == sealed["checkpoint_sha256"]
    assert code == 0
    assert copied == sealed  # the backup seals its copy
    backed_up = copy / "checkpoints" / "round-000002.npz.sha256"
    assert backed_up.read_text().strip() == restored


def _score2(run: Path, rounds: range) -> dict[int, list[float]]:
    """Per round: each party's digfl-2 score and <v_{t+1}, u>, in party order."""
    with Ledger.open_readonly(run / "ledger.sqlite") as ledger:
        rows = ledger.rounds(rounds.start, rounds.stop - 1)
    return {
        r.round: [x for p in r.parties for x in (p.score2, p.dot_next)] for r in rows
    }


@pytest.mark.parametrize("checkpoint_kept", [True, False])
def test_resume_scores_the_two_rounds_a_kill_left_without_digfl2(
    make_server: MakeServer, stub_for: StubFor, tmp_path: Path, checkpoint_kept: bool
) -> None:
    # The close does not wait for digfl-2 jobs: a kill can leave the last two
    # committed rounds without digfl-2 scores, their updates in the spill. Made here
    # from a run that scored them, so the resumed scores have a reference.
    run = tmp_path / "run"
    agg = make_server(run_dir=run, rounds=5)
    _join(stub_for(agg), "alice")
    _drive(agg, stub_for, range(3))
    _wait_for(
        "digfl-2 of rounds 0-2",
        lambda: all(
            math.isfinite(x) for r in _score2(run, range(3)).values() for x in r
        ),
    )
    reference = _score2(run, range(1, 3))
    first_order = {
        r.round: [p.score for p in r.parties] for r in agg.ledger.rounds(1, 1)
    }
    layout = agg.layout
    agg.shutdown(grace_s=0.1, save_open_round=False)
    con = sqlite3.connect(run / "ledger.sqlite")
    with con:
        con.execute(
            "UPDATE party_rounds SET score2 = NULL, dot_next = NULL WHERE round >= 1"
        )
    con.close()
    spill = DirSpill(run / "spill")
    for r in (1, 2):
        flat = layout.flatten(_update(agg.engine.specs, 100 + r))
        spill.commit(spill.stage(r, "alice", flat))
    spill.close()
    if not checkpoint_kept:  # a run restored from a backup has only the newest
        (run / "checkpoints" / "round-000002.npz").unlink()

    resumed = make_server(run_dir=run, server={"resume": True}, rounds=5)
    at_start = _score2(run, range(1, 2))
    _wait_for(
        "digfl-2 of round 2",
        lambda: all(math.isfinite(x) for x in _score2(run, range(2, 3))[2]),
    )
    after = _score2(run, range(1, 3))
    spilled = sorted(p.name for p in (run / "spill").iterdir())
    resumed.shutdown(grace_s=0.1, save_open_round=False)

    assert resumed.engine.rounds_done == 3
    if checkpoint_kept:
        # Round 1 is scored at start-up, from v at the checkpoint of round 2.
        assert at_start[1] == pytest.approx(reference[1], rel=1e-6)
    else:
        s2, dot_next = at_start[1]
        assert s2 == pytest.approx(first_order[1][0]) and math.isnan(dot_next)
    assert after[2] == pytest.approx(reference[2], rel=1e-6)
    assert "round-000001" not in spilled and "round-000002" not in spilled
