"""scripts/bench_scale.py end to end at tiny N: real serve, real driver processes.

The load driver is what issue 14's round times are measured with, so a driver that
silently drops parties, rounds or errors would make those figures wrong. Each run
here starts the real ``fedgrpc serve`` and two driver processes, and the rows it
writes (``--json-out``) must show every party through every round, no failed call,
and the aggregator running this tree's code.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.helpers import ENV

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(90)]

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "bench_scale.py"
ROUNDS = 3  # the fewest the script measures (round 1 of 0..2)


def _script(tmp_path: Path, script: Path, *args: str) -> str:
    """Run a benchmark script to its end; its stdout."""
    proc = subprocess.run(
        [sys.executable, str(script), *args],
        capture_output=True,
        text=True,
        timeout=80,
        env=ENV,
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def _bench(tmp_path: Path, *args: str) -> list[dict[str, Any]]:
    out = tmp_path / "rows.jsonl"
    _script(
        tmp_path,
        SCRIPT,
        "--rounds",
        str(ROUNDS),
        "--params",
        "2000",
        "--drivers",
        "2",
        "--code",
        "new=.",
        "--timeout",
        "60",
        "--json-out",
        str(out),
        *args,
    )
    return [json.loads(line) for line in out.read_text().splitlines()]


def _assert_sane(row: dict[str, Any], n: int, driver: str) -> None:
    assert row["driver"] == driver
    assert row["parties"] == n
    assert row["errors"] == {}, row["first_error"]
    assert row["rounds_complete"] == ROUNDS
    assert row["finished"] == n
    assert row["exit_code"] == 0
    assert row["served_by"] == str(REPO / "fedgrpc" / "__init__.py")
    assert row["fedgrpc"] == row["served_by"]  # the drivers ran this tree too
    assert 0 < row["round_s"] < 10
    assert math.isfinite(row["payload_mb_s"])
    assert row["driver_cpu_s"] > 0


@pytest.mark.parametrize(
    ("driver", "parties"), [("aio", [2, 5]), ("threads", [4])], ids=["aio", "threads"]
)
def test_bench_scale_every_party_finishes_every_round(
    tmp_path: Path, driver: str, parties: list[int]
) -> None:
    rows = _bench(
        tmp_path, "--parties", ",".join(map(str, parties)), "--driver", driver
    )

    assert [r["parties"] for r in rows] == parties
    for row in rows:
        _assert_sane(row, row["parties"], driver)
        assert row["asked_per_round"] == row["parties"]


def test_bench_scale_aio_driver_sits_out_rounds_it_is_not_sampled_for(
    tmp_path: Path,
) -> None:
    rows = _bench(
        tmp_path,
        "--parties",
        "4",
        "--serve-arg=--sample-count=2",
        "--serve-arg=--min-parties=2",
        "--trace-dir",
        str(tmp_path / "trace"),
    )

    (row,) = rows
    _assert_sane(row, 4, "aio")  # the default driver
    assert row["asked_per_round"] == 2
    # The memory trace: the aggregator's RSS over time, and every round's receipts
    # within the sampled span.
    trace = json.loads((tmp_path / "trace" / "new-4.json").read_text())
    times = [t for t, _, _ in trace["samples"]]
    assert times == sorted(times) and len(times) > 5
    assert max(rss for _, rss, _ in trace["samples"]) == row["rss_mib"]
    assert sorted(trace["rounds"], key=int) == [str(t) for t in range(ROUNDS)]
    for lo, hi in trace["rounds"].values():
        assert times[0] <= lo <= hi <= times[-1]


def test_bench_grpc_floor_runs_every_round_and_prints_its_costs(
    tmp_path: Path,
) -> None:
    # The floor the Scale section compares fedgrpc's round with: the same traffic
    # through a bare grpc.aio server. A run that lost rounds would print no time.
    stdout = _script(
        tmp_path,
        REPO / "scripts" / "bench_grpc_floor.py",
        "--parties",
        "3",
        "--rounds",
        "4",
        "--params",
        "1000",
        "--drivers",
        "2",
        "--server-option=grpc.experimental.tcp_max_read_buffer_size=65536",
    )

    rows = [
        json.loads(line)
        for line in stdout.splitlines()
        if line.startswith("{") and '"grpc_floor"' in line
    ]
    (row,) = rows
    assert row["parties"] == 3
    assert 0 < row["round_s"] < 10
    # CPU is read in clock ticks (10 ms): a tiny run may round to zero.
    assert row["server_cpu_s_per_round"] >= 0
    assert row["client_cpu_s_per_round"] >= 0
    assert row["server_ms_per_party_round"] >= 0
    assert row["server_rss_mib"] > 10  # a Python process with grpc loaded
    assert row["server_options"] == "grpc.experimental.tcp_max_read_buffer_size=65536"
    assert "| 3 |" in stdout  # the table
