"""``simulate``'s two ways to start parties: forked (the CLI) and ``fedgrpc client``."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import grpc  # imported here on purpose: forking after grpc is refused
import pytest

from fedgrpc.cli.simulate import simulate
from fedgrpc.client.forked import ForkedParty, preload
from fedgrpc.config import SIMULATE_ROUND, SplitConfig

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(400)]


def test_simulate_starts_client_processes_when_it_cannot_fork(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert grpc is not None
    with pytest.raises(RuntimeError, match="grpc is imported"):
        preload()
    rcfg = dataclasses.replace(SIMULATE_ROUND, rounds=2, min_parties=3)

    code = simulate(SplitConfig(parties=3), rcfg, run_dir=tmp_path / "sim")

    out = capsys.readouterr().out
    assert code == 0, out
    summary = json.loads((tmp_path / "sim" / "contributions.json").read_text())
    assert summary["state"] == "done" and summary["rounds_done"] == 2
    assert {p["reason"] for p in summary["parties"].values()} == {"completed"}
    # Started as `fedgrpc client` processes: no result files from forked parties.
    assert not list((tmp_path / "sim").glob("*.result.json"))


def test_forked_party_poll_wait_terminate(tmp_path: Path) -> None:
    pid = os.fork()
    if pid == 0:  # a stand-in child: sleeps until signalled
        time.sleep(30)
        os._exit(0)
    child = ForkedParty(pid, "p", tmp_path / "p.result.json")

    assert child.poll() is None
    with pytest.raises(subprocess.TimeoutExpired):
        child.wait(timeout=0.05)
    child.terminate()

    assert child.wait(timeout=10) == -signal.SIGTERM
    assert child.result() == {"reason": f"exit {-signal.SIGTERM}"}
