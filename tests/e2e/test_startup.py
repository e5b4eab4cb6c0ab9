"""``fedgrpc serve`` listens before its run is set up, and says so.

The port answers while the validation worker is still loading (GetStatus: starting,
health NOT_SERVING); a party that joins early waits for the run, or hears UNAVAILABLE
naming why within its deadline; once the run is ready it joins. A set-up that fails
answers RPCs with its cause, and ends ``fedgrpc serve`` (exit 2) naming it.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fedgrpc.config import RoundConfig, ServerConfig
from fedgrpc.proto import aggregator_pb2, aggregator_pb2_grpc
from fedgrpc.server.app import Aggregator
from tests.e2e.gated_data import GATE_ENV
from tests.e2e.helpers import ENV, Procs, processes, read_port, wait_exit

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]


def _serve(
    procs: Procs, tmp_path: Path, val_data: str
) -> tuple[subprocess.Popen[bytes], Path]:
    port_file = tmp_path / "port"
    env = dict(ENV, **{GATE_ENV: str(tmp_path / "gate")})
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    args = [
        "serve", "--insecure", "--address", "localhost:0",
        "--port-file", str(port_file), "--run-dir", str(tmp_path / "run"),
        "--val-data", val_data, "--model", "logreg",
        "--rounds", "1", "--min-parties", "1", "--join-timeout", "600",
    ]  # fmt: skip
    proc = procs.start(
        args, tmp_path / "serve.log", console=True, env=env, cwd=tmp_path
    )
    return proc, port_file


def _health(channel: grpc.Channel) -> int:
    reply = health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service=""), timeout=5
    )
    return int(reply.status)


def test_startup_port_answers_while_the_run_is_set_up(tmp_path: Path) -> None:
    with processes() as procs:
        proc, port_file = _serve(procs, tmp_path, "tests.e2e.gated_data:digits")
        port = read_port(port_file, proc, tmp_path / "serve.log")
        with grpc.insecure_channel(f"localhost:{port}") as ch:
            stub = aggregator_pb2_grpc.AggregatorStub(ch)
            status = stub.GetStatus(aggregator_pb2.StatusRequest(), timeout=5)
            health = _health(ch)
            with pytest.raises(grpc.RpcError) as early:
                stub.Join(
                    aggregator_pb2.JoinRequest(party_id="p0", num_samples=5), timeout=1
                )

            (tmp_path / "gate").touch()
            joined = stub.Join(
                aggregator_pb2.JoinRequest(party_id="p0", num_samples=5), timeout=60
            )
            ready = _health(ch)
            after = stub.GetStatus(aggregator_pb2.StatusRequest(), timeout=5)

    assert status.state == "starting"
    assert health == health_pb2.HealthCheckResponse.NOT_SERVING
    assert early.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "is starting" in (early.value.details() or "")
    assert [t.name for t in joined.model_spec.tensors] == ["fc.weight", "fc.bias"]
    assert ready == health_pb2.HealthCheckResponse.SERVING
    assert after.state in ("waiting", "training")
    assert "p0" in after.joined


def test_startup_failure_is_named_to_callers_and_in_the_exit(tmp_path: Path) -> None:
    with processes() as procs:
        proc, port_file = _serve(procs, tmp_path, "tests.e2e.gated_data:broken")
        wait_exit(proc, 120, tmp_path / "serve.log")
    log = (tmp_path / "serve.log").read_text()

    assert proc.returncode == 2, log[-3000:]
    assert "the validation share is not mounted" in log
    assert port_file.is_file()  # it listened before the set-up failed


def test_startup_failure_answers_rpcs_with_the_cause(tmp_path: Path) -> None:
    cfg = ServerConfig(
        round=RoundConfig(rounds=1, model="logreg"),
        address="localhost:0",
        run_dir=tmp_path / "run",
        val_data="tests.e2e.gated_data:broken",
        insecure=True,
        validator="thread",
    )
    agg = Aggregator(cfg)
    try:
        with pytest.raises(RuntimeError, match="not mounted"):
            agg.start()
        with grpc.insecure_channel(f"localhost:{agg.port}") as ch:
            stub = aggregator_pb2_grpc.AggregatorStub(ch)
            status = stub.GetStatus(aggregator_pb2.StatusRequest(), timeout=5)
            with pytest.raises(grpc.RpcError) as join:
                stub.Join(
                    aggregator_pb2.JoinRequest(party_id="p0", num_samples=5), timeout=5
                )
    finally:
        agg.shutdown(grace_s=0.1, save_open_round=False)

    assert status.state == "failed"
    assert "not mounted" in status.reason
    assert join.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "failed to start: the validation share is not mounted" in (
        join.value.details() or ""
    )
