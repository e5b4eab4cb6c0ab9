"""End to end: `fedgrpc serve` + `fedgrpc client` processes, simulate, kill/resume."""

from __future__ import annotations

import dataclasses
import json
import re
import signal
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from fedgrpc.config import RoundConfig
from fedgrpc.learning.inprocess import run_in_process
from fedgrpc.learning.validation import config_for_data
from fedgrpc.types import RunStatus, UpdateKind
from tests.e2e.helpers import (
    final_model,
    load_parties,
    party_args,
    processes,
    read_port,
    reference_run,
    run_cli,
    seeded_serve_args,
    split_digits,
    wait_exit,
    wait_for,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

N_PARTIES = 3


def _ledger_rounds(run_dir: Path) -> list[tuple[int, str]]:
    path = run_dir / "ledger.sqlite"
    if not path.exists():
        return []
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
    try:
        return [
            (int(r), str(s))
            for r, s in con.execute("SELECT round, status FROM rounds ORDER BY round")
        ]
    except sqlite3.OperationalError:
        return []
    finally:
        con.close()


def _scores(run_dir: Path) -> dict[tuple[int, str], float]:
    con = sqlite3.connect(f"file:{run_dir / 'ledger.sqlite'}?mode=ro", uri=True)
    try:
        return {
            (int(r), str(p)): float(s)
            for r, p, s in con.execute(
                "SELECT round, party_id, score FROM party_rounds"
            )
        }
    finally:
        con.close()


def test_serve_and_clients_match_in_process_run(tmp_path: Path) -> None:
    data = split_digits(tmp_path, N_PARTIES, "--attack", "2=label-flip:0.9")
    run_dir = tmp_path / "run"
    port_file = tmp_path / "port"

    with processes() as procs:
        server = procs.start(
            seeded_serve_args(run_dir, data, port_file),
            tmp_path / "server.log",
        )
        port = read_port(port_file, server, tmp_path / "server.log")
        clients = [
            procs.start(
                party_args(f"localhost:{port}", i, data), tmp_path / f"c{i}.log"
            )
            for i in range(N_PARTIES)
        ]
        for i, c in enumerate(clients):
            assert wait_exit(c, 120, tmp_path / f"c{i}.log") == 0
        assert wait_exit(server, 60, tmp_path / "server.log") == 0

    engine, results = reference_run(data, N_PARTIES)
    got = final_model(run_dir)
    want = dict(engine.layout.iter_arrays(engine.theta))
    assert set(got) == set(want)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-4, atol=1e-5)
    scores = _scores(run_dir)
    expected = {(r.round, p.party_id): p.score for r in results for p in r.parties}
    assert set(scores) == set(expected)
    for key, value in expected.items():
        assert scores[key] == pytest.approx(value, rel=1e-3, abs=1e-6)
    # The heavily flipped party ranks last.
    totals = {q: sum(s for (_, p), s in scores.items() if p == q) for _, q in scores}
    assert min(totals, key=totals.__getitem__) == "party-2"


def test_simulate_default_reaches_accuracy_and_reports(tmp_path: Path) -> None:
    run_dir = tmp_path / "sim"

    res = run_cli(["simulate", "--run-dir", str(run_dir)], timeout_s=240)

    assert res.returncode == 0, res.stdout + res.stderr
    summary = json.loads((run_dir / "contributions.json").read_text())
    assert summary["state"] == "done"
    assert summary["val_acc"] >= 0.90
    assert len(summary["totals"]) == 5
    assert "final validation accuracy" in res.stdout
    assert "round  14 (15/15): ok" in res.stdout  # rounds from 0, as in the ledger
    # Progress with an ETA on every round line but the last.
    assert re.search(r"round +\d+ \( ?\d+/15\): ok .* ETA \d+ s", res.stdout)
    assert not re.search(r"\(15/15\).*ETA", res.stdout)
    assert "I1201" not in res.stderr and "ssl_transport_security" not in res.stderr
    assert (run_dir / "contributions.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Contributions read back over GetContributions equal the in-process values.
    parties, val = load_parties(run_dir / "data", 5)
    cfg = RoundConfig(
        rounds=15,
        min_parties=5,
        update_kind=UpdateKind.DELTA,
        lr=0.1,
        batch_size=16,
        round_timeout_s=60.0,
    )
    _, results = run_in_process(config_for_data(cfg, val), parties, val)
    for r in results:
        entry = summary["rounds"][r.round]
        for p in r.parties:
            assert entry["scores"][p.party_id] == pytest.approx(
                p.score, rel=1e-3, abs=1e-6
            )


def test_aggregator_killed_and_resumed_finishes_like_uninterrupted_run(
    tmp_path: Path,
) -> None:
    data = split_digits(tmp_path, N_PARTIES, "--attack", "2=label-flip:0.9")
    run_dir = tmp_path / "run"
    port_file = tmp_path / "port"
    log = tmp_path / "server.log"

    with processes() as procs:
        server = procs.start(seeded_serve_args(run_dir, data, port_file), log)
        port = read_port(port_file, server, log)
        clients = [
            procs.start(
                party_args(f"localhost:{port}", i, data), tmp_path / f"c{i}.log"
            )
            for i in range(N_PARTIES)
        ]
        # Poll fast: rounds take ~50 ms here, and the kill must land mid-run.
        wait_for(
            lambda: len(_ledger_rounds(run_dir)) >= 2,
            60,
            "two committed rounds",
            poll_s=0.002,
        )
        server.send_signal(signal.SIGKILL)
        server.wait(timeout=10)
        committed = len(_ledger_rounds(run_dir))
        resumed = procs.start(
            [
                "serve",
                "--insecure",
                "--address",
                f"localhost:{port}",
                "--resume",
                str(run_dir),
                "--grace-period",
                "0",
            ],
            log,
        )
        for i, c in enumerate(clients):
            assert wait_exit(c, 120, tmp_path / f"c{i}.log") == 0
        assert wait_exit(resumed, 60, log) == 0

    assert 2 <= committed < 6
    assert _ledger_rounds(run_dir) == [(r, "ok") for r in range(6)]
    engine, results = reference_run(data, N_PARTIES)
    got = final_model(run_dir)
    for name, want in engine.layout.iter_arrays(engine.theta):
        np.testing.assert_allclose(got[name], want, rtol=1e-4, atol=1e-5)
    scores = _scores(run_dir)
    for r in results:
        for p in r.parties:
            assert scores[(r.round, p.party_id)] == pytest.approx(
                p.score, rel=1e-3, abs=1e-6
            )


def test_simulate_json_is_only_json_and_quiet_drops_progress(tmp_path: Path) -> None:
    run_dir = tmp_path / "sim"

    res = run_cli(
        ["simulate", "--run-dir", str(run_dir), "--rounds", "2", "--format", "json"]
    )
    quiet = run_cli(
        ["simulate", "-q", "--run-dir", str(tmp_path / "q"), "--rounds", "2"]
    )
    csv = run_cli(["contributions", "--run-dir", str(run_dir), "--format", "csv"])
    offline = run_cli(["status", "--run-dir", str(run_dir), "--format", "json"])

    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)  # the whole of stdout is the JSON summary
    assert summary["state"] == "done" and summary["rounds_done"] == 2
    assert [r["round"] for r in summary["rounds"]] == [0, 1]
    assert "round   0 (1/2): ok" in res.stderr  # progress still shown, on stderr
    assert quiet.returncode == 0, quiet.stderr
    assert "round   0" not in quiet.stdout + quiet.stderr
    assert "aggregator on" not in quiet.stdout
    assert "final validation accuracy" in quiet.stdout
    # simulate's run directory works where the ledger is expected (it is in server/).
    assert csv.returncode == 0, csv.stderr
    assert csv.stdout.splitlines()[1].startswith("0,party-0,")
    assert offline.returncode == 0, offline.stderr
    st = json.loads(offline.stdout)
    assert st["state"] == "done" and st["rounds_done"] == 2
    assert set(st) == {f.name for f in dataclasses.fields(RunStatus)}
