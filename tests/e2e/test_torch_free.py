"""The aggregator and the operator's commands run without torch (the console script).

``fedgrpc serve`` keeps torch, the model and the validation set in its validation
worker; the aggregator process itself must map no torch library. The commands an
operator or payer runs (``--version``, ``certs``, ``contributions --run-dir``) must not
import torch, scikit-learn or matplotlib at all; ``--plot`` is the one that may load
matplotlib.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fedgrpc.store.ledger import Ledger
from fedgrpc.types import PartyRound, RoundOutcome, RoundResult
from tests.e2e.helpers import (
    CONSOLE_SCRIPT,
    ENV,
    child_pids,
    processes,
    read_port,
    wait_for,
)

pytestmark = pytest.mark.e2e

FEDGRPC = CONSOLE_SCRIPT
HEAVY = ("torch", "sklearn", "matplotlib")


def _mapped(pid: int, package: str) -> list[str]:
    """Files of an installed package (``site-packages/<pkg>/...``) a process maps."""
    maps = Path(f"/proc/{pid}/maps").read_text().splitlines()
    paths = {line.split()[-1] for line in maps if len(line.split()) > 5}
    return sorted(p for p in paths if f"/{package}/" in p and "-packages/" in p)


def _serving(port: int) -> bool:
    with grpc.insecure_channel(f"localhost:{port}") as ch:
        try:
            reply = health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=1.0
            )
        except grpc.RpcError:
            return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def test_torch_free_serve_maps_no_torch_but_its_worker_does(tmp_path: Path) -> None:
    port_file, log = tmp_path / "port", tmp_path / "serve.log"
    args = [
        "serve", "--insecure", "--address", "localhost:0", "--port-file",
        str(port_file), "--run-dir", str(tmp_path / "run"), "--rounds", "1",
        "--min-parties", "1", "--join-timeout", "600", "--val-data", "digits",
    ]  # fmt: skip
    with processes() as procs:
        proc = procs.start(args, log, console=True)
        port = read_port(port_file, proc, log)
        wait_for(lambda: _serving(port), 120, "health SERVING (worker ready)")

        torch_in_server = _mapped(proc.pid, "torch")
        sklearn_in_server = _mapped(proc.pid, "sklearn")
        workers = child_pids(proc.pid)
        torch_in_worker = [p for w in workers for p in _mapped(w, "torch")]

    assert torch_in_server == [], torch_in_server
    assert sklearn_in_server == [], sklearn_in_server
    assert len(workers) == 1
    assert torch_in_worker != []  # the probe sees torch where it is


def _imported(
    args: list[str], cwd: Path
) -> tuple[set[str], subprocess.CompletedProcess[str]]:
    """Top-level packages the console script imports for ``args`` (-X importtime)."""
    with FEDGRPC.open() as f:
        python = f.readline().removeprefix("#!").strip()
    done = subprocess.run(
        [python, "-X", "importtime", str(FEDGRPC), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=ENV,
        cwd=cwd,
        check=False,
    )
    names = set()
    for line in done.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            names.add(line.rsplit("|", 1)[1].strip().split(".")[0])
    return names, done


@pytest.fixture(scope="module")
def ledger_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run directory whose ledger holds one scored round."""
    run = tmp_path_factory.mktemp("run")
    with Ledger(run) as ledger:
        ledger.start_run("r1", {"round": {"rounds": 1}}, "digest")
        ledger.upsert_party("p0", 10)
        ledger.record_round(
            RoundResult(
                round=0,
                outcome=RoundOutcome.OK,
                parties=(PartyRound("p0", 10, 1.0, 0.5, 0.5, 1.0, 0.1),),
                late=(),
                val_loss_before=2.0,
                val_acc_before=0.1,
                val_loss_after=1.5,
                val_acc_after=0.4,
                model_digest="m",
            )
        )
    return run


@pytest.mark.parametrize(
    "command",
    [
        ["--version"],
        ["certs", "init", "{tmp}/pki"],
        ["contributions", "--run-dir", "{run}", "--format", "json"],
        ["status", "--run-dir", "{run}"],
    ],
)
def test_torch_free_operator_commands_import_no_heavy_package(
    command: list[str], tmp_path: Path, ledger_run: Path
) -> None:
    args = [a.format(tmp=tmp_path, run=ledger_run) for a in command]

    names, done = _imported(args, tmp_path)

    assert done.returncode == 0, done.stderr[-2000:]
    assert "fedgrpc" in names  # the probe sees the package's own imports
    assert sorted(names & set(HEAVY)) == []


def test_torch_free_plot_is_the_one_that_loads_matplotlib(
    tmp_path: Path, ledger_run: Path
) -> None:
    png = tmp_path / "c.png"

    names, done = _imported(
        ["contributions", "--run-dir", str(ledger_run), "--plot", str(png)], tmp_path
    )

    assert done.returncode == 0, done.stderr[-2000:]
    assert png.stat().st_size > 0
    assert "matplotlib" in names
    assert "torch" not in names
