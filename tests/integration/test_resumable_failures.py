"""Failures that --resume fixes stop the run loudly and leave the parties waiting.

Issue 11 items 5 (the run directory fills up) and 6 (the validation worker dies):
the run stops naming the cause, no "training over" is sent, a dead worker is
replaced once, and after the fix ``--resume`` finishes like an undisturbed run.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pytest

from fedgrpc.client.party import run_party
from fedgrpc.datasets.sources import load_dataset, subset
from fedgrpc.proto import aggregator_pb2
from fedgrpc.server.app import Aggregator
from fedgrpc.types import RunState
from tests.conftest import MakeServer, client_config
from tests.integration.test_service import (
    StubFor,
    _join,
    _submission,
    _update,
    _wait_for,
)

pytestmark = pytest.mark.integration

_TIMEOUT_S = 20.0
_ROUNDS = 5


def _drive(
    agg: Aggregator,
    stub_for: StubFor,
    rounds: range,
    before: Callable[[int], None] = lambda r: None,
) -> None:
    """alice submits a fixed update per round; wait for each round to close."""
    stub = stub_for(agg)
    specs = agg.engine.specs
    for r in rounds:
        _wait_for(
            f"round {r}'s model",
            lambda r=r: (
                (agg.broadcaster.latest is not None)  # type: ignore[misc]
                and agg.broadcaster.latest.round == r
            ),
        )
        before(r)
        msgs = _submission("alice", r, specs, _update(specs, 100 + r), sid=f"a{r}")
        try:
            assert stub.SubmitGradient(iter(msgs), timeout=_TIMEOUT_S).accepted
        except grpc.RpcError as err:
            # The disk filled before the update could be stored (the spill): the
            # upload is refused UNAVAILABLE, naming the cause, and the run stops.
            assert err.code() == grpc.StatusCode.UNAVAILABLE, err.details()
            assert "No space left" in (err.details() or ""), err.details()
        _wait_for(
            f"round {r} to end",
            lambda r=r: agg.engine.rounds_done > r or agg.engine.finished,  # type: ignore[misc]
        )


def _fill(directory: Path) -> Path:
    """Write a file until the file system is full; return it."""
    filler = directory / "filler"
    with filler.open("wb", buffering=0) as f:  # unbuffered: close cannot fail
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError as err:
            assert err.errno == errno.ENOSPC
    return filler


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_disk_full_stops_named_parties_wait_and_resume_finishes_identically(
    make_server: MakeServer, stub_for: StubFor, tmp_path: Path
) -> None:
    ref = make_server(run_dir=tmp_path / "ref", rounds=_ROUNDS)
    _join(stub_for(ref), "alice")
    _drive(ref, stub_for, range(_ROUNDS))
    assert ref.wait(_TIMEOUT_S) and ref.engine.state == RunState.DONE

    mnt = tmp_path / "small"
    mnt.mkdir()
    mount = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mount.stderr.strip()}")
    try:
        run = mnt / "run"
        agg = make_server(run_dir=run, rounds=_ROUNDS)
        stub = stub_for(agg)
        _join(stub, "alice")
        waiting = stub.GetModel(
            aggregator_pb2.GetModelRequest(party_id="alice", from_round=_ROUNDS),
            timeout=_TIMEOUT_S,
        )
        fillers: list[Path] = []
        _drive(
            agg,
            stub_for,
            range(3),
            before=lambda r: fillers.append(_fill(mnt)) if r == 2 else None,
        )
        assert agg.wait(_TIMEOUT_S)

        state, failure = agg.engine.state, agg.failure
        agg.shutdown(grace_s=0.2, save_open_round=False)
        with pytest.raises(grpc.RpcError) as info:
            list(waiting)  # no "training over": the stream ends UNAVAILABLE
        for f in fillers:
            f.unlink()
        resumed = make_server(run_dir=run, server={"resume": True}, rounds=_ROUNDS)
        start = resumed.engine.rounds_done
        _drive(resumed, stub_for, range(start, _ROUNDS))
        assert resumed.wait(_TIMEOUT_S)
        final_state = resumed.engine.state
        theta, ref_theta = resumed.engine.theta.copy(), ref.engine.theta.copy()
        rows = [
            (r.round, r.status, [p.score for p in r.parties])
            for r in resumed.ledger.rounds()
        ]
        ref_rows = [
            (r.round, r.status, [p.score for p in r.parties])
            for r in ref.ledger.rounds()
        ]
        resumed.shutdown(grace_s=0.2, save_open_round=False)
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)

    assert state == RunState.FAILED
    assert "ENOSPC" in failure and str(mnt) in failure, failure
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert start == 2
    assert final_state == RunState.DONE
    np.testing.assert_array_equal(theta, ref_theta)
    assert rows == ref_rows


def _party_thread(agg: Aggregator, out: list[object]) -> threading.Thread:
    data = subset(load_dataset("digits"), np.arange(200))

    def go() -> None:
        try:
            out.append(run_party(client_config(agg, "p0"), data))
        except BaseException as err:
            out.append(err)

    return threading.Thread(target=go, daemon=True)


def test_dead_validation_worker_is_restarted_once_and_the_run_completes(
    make_server: MakeServer,
) -> None:
    agg = make_server(server={"validator": "process"}, rounds=2, min_parties=1)
    assert agg.validation is not None and agg.validation.pid is not None
    first = agg.validation.pid
    os.kill(first, signal.SIGKILL)
    out: list[object] = []
    t = _party_thread(agg, out)

    t.start()
    t.join(timeout=120)

    assert agg.wait(30) and agg.engine.state == RunState.DONE, agg.engine.reason
    assert agg.validation.pid not in (None, first)
    assert getattr(out[0], "reason", out) == "completed"


def test_worker_dead_beyond_its_restarts_stops_the_run_without_done(
    make_server: MakeServer, stub_for: StubFor
) -> None:
    agg = make_server(
        server={"validator": "process", "worker_restarts": 0}, rounds=3, min_parties=1
    )
    assert agg.validation is not None and agg.validation.pid is not None
    stub = stub_for(agg)
    waiting = stub.GetModel(
        aggregator_pb2.GetModelRequest(party_id="p0", from_round=1),
        timeout=_TIMEOUT_S,
    )
    os.kill(agg.validation.pid, signal.SIGKILL)
    _join(stub, "p0")  # opens round 0: v_0 is asked of the dead worker

    assert agg.wait(30)
    assert agg.engine.state == RunState.FAILED
    assert "exited with code -9" in agg.failure
    assert not agg.succeeded
    agg.shutdown(grace_s=0.2, save_open_round=False)
    with pytest.raises(grpc.RpcError) as info:
        list(waiting)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
