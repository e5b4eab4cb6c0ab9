"""Prometheus metrics, scraped from a real ``fedgrpc serve`` over HTTP."""

from __future__ import annotations

import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from fedgrpc.client.stub import AggregatorClient
from fedgrpc.config import ClientConfig
from fedgrpc.errors import RemoteError
from fedgrpc.types import UpdateKind
from tests.e2e.helpers import party_args, processes, read_port, split_digits, wait_exit

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(400)]


def _scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_metrics_scraped_from_a_live_run(tmp_path: Path) -> None:
    data = split_digits(tmp_path, 2)
    port_file, metrics_file = tmp_path / "port", tmp_path / "metrics_port"
    log = tmp_path / "serve.log"
    with processes() as procs:
        server = procs.start(
            [
                "serve",
                "--insecure",
                "--address",
                "localhost:0",
                "--port-file",
                str(port_file),
                "--run-dir",
                str(tmp_path / "run"),
                "--val-data",
                f"npz:{data / 'val.npz'}",
                "--min-parties",
                "2",
                "--rounds",
                "3",
                "--model",
                "logreg",
                "--grace-period",
                "60",
                "--metrics-address",
                "127.0.0.1:0",
                "--metrics-port-file",
                str(metrics_file),
            ],
            log,
        )
        port = read_port(port_file, server, log)
        mport = read_port(metrics_file, server, log)
        before = _scrape(mport)
        clients = [
            procs.start(
                party_args(f"localhost:{port}", i, data), tmp_path / f"c{i}.log"
            )
            for i in range(2)
        ]
        for i, c in enumerate(clients):
            assert wait_exit(c, 180, tmp_path / f"c{i}.log") == 0
        # A refused upload: training is over (FAILED_PRECONDITION).
        with AggregatorClient(
            ClientConfig(
                server=f"localhost:{port}",
                party_id="late-party",
                data="",
                insecure=True,
            )
        ) as client:
            client.join(1)
            with pytest.raises(RemoteError) as refused:
                update = {s.name: np.zeros(s.shape, np.float32) for s in client.specs}
                client.submit(0, update, 1, train_loss=0.0, kind=UpdateKind.GRADIENT)
        # The refusal reaches the party before the server's handler counts it.
        reason = refused.value.code.name
        bad = (("outcome", "refused"), ("reason", reason))
        deadline = time.monotonic() + 30
        after = _scrape(mport)
        while ("fedgrpc_submissions_total", bad) not in after and (
            time.monotonic() < deadline
        ):
            time.sleep(0.1)
            after = _scrape(mport)
        server.terminate()
        assert wait_exit(server, 30, log) == 0

    assert before[("fedgrpc_rounds_done", ())] == 0
    assert after[("fedgrpc_rounds_total", (("outcome", "ok"),))] == 3
    assert after[("fedgrpc_rounds_done", ())] == 3
    assert after[("fedgrpc_round_seconds_count", ())] == 3
    phase = (("phase", "validation"),)
    assert after[("fedgrpc_round_phase_seconds_count", phase)] == 3
    assert after[("fedgrpc_round_phase_seconds_sum", phase)] > 0
    ok = (("outcome", "accepted"), ("reason", ""))
    assert after[("fedgrpc_submissions_total", ok)] == 6
    assert after[("fedgrpc_submissions_total", bad)] == 1
    # 650 float32 parameters per upload and per model version, plus framing.
    assert (
        after[("fedgrpc_bytes_received_total", (("rpc", "SubmitGradient"),))] > 6 * 2600
    )
    assert after[("fedgrpc_bytes_sent_total", (("rpc", "GetModel"),))] > 2 * 3 * 2600
    assert after[("fedgrpc_parties_joined", ())] == 3  # the two and late-party
    assert after[("fedgrpc_upload_slots_in_use", ())] == 0
    assert after[("fedgrpc_upload_slots", ())] == 2
    assert 0 < after[("fedgrpc_validation_accuracy", ())] <= 1
