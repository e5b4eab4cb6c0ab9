"""TLS by default, channel identity, tokens, admin vs party reads: real processes."""

from __future__ import annotations

import json
import re
import signal
import sqlite3
from pathlib import Path

import pytest

from fedgrpc.security.registry import hash_token
from tests.e2e.helpers import (
    child_pids,
    processes,
    read_port,
    run_cli,
    running,
    wait_exit,
    wait_for,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

TRAIN = [
    "--rounds",
    "3",
    "--update-kind",
    "delta",
    "--lr",
    "0.1",
    "--batch-size",
    "32",
    "--model",
    "logreg",
    "--seed",
    "1",
    "--val-count",
    "200",
    "--min-parties",
    "2",
]


def _serve(run_dir: Path, data: Path, port_file: Path, *security: str) -> list[str]:
    """`fedgrpc serve` on localhost with the small training set-up and ``security``."""
    return [
        "serve",
        "--address",
        "localhost:0",
        "--port-file",
        str(port_file),
        "--run-dir",
        str(run_dir),
        "--val-data",
        f"npz:{data / 'val.npz'}",
        "--grace-period",
        "0",
        *security,
        *TRAIN,
    ]


def _split(tmp_path: Path) -> Path:
    out = tmp_path / "data"
    res = run_cli(
        ["split", "--parties", "2", "--val-holdout", "300", "--out", str(out)]
    )
    assert res.returncode == 0, res.stderr
    return out


def test_serve_and_client_refuse_plaintext_without_insecure(tmp_path: Path) -> None:
    serve = run_cli(
        ["serve", "--run-dir", str(tmp_path / "r"), "--address", "localhost:0"]
    )
    client = run_cli(
        ["client", "--server", "localhost:1", "--party-id", "p", "--data", "digits"]
    )

    assert serve.returncode == 2
    assert "--insecure" in serve.stderr and "TLS" in serve.stderr
    assert client.returncode == 2
    assert "--insecure" in client.stderr


def test_mutual_tls_run_identity_from_certificates(tmp_path: Path) -> None:
    data = _split(tmp_path)
    pki = tmp_path / "pki"
    assert run_cli(["certs", "init", str(pki)]).returncode == 0
    for name in ("party-0", "party-1", "operator"):
        res = run_cli(["certs", "issue", str(pki), name])
        assert res.returncode == 0, res.stderr
    parties_file = tmp_path / "parties.toml"
    parties_file.write_text(
        '[[admin]]\nname = "operator"\ncert_name = "operator"\n'
        '[[party]]\nid = "party-0"\n[[party]]\nid = "party-1"\n'
    )
    port_file = tmp_path / "port"
    log = tmp_path / "server.log"

    with processes() as procs:
        server = procs.start(
            _serve(
                tmp_path / "run",
                data,
                port_file,
                "--tls-cert",
                str(pki / "server.pem"),
                "--tls-key",
                str(pki / "server.key"),
                "--tls-ca",
                str(pki / "ca.pem"),
                "--require-client-cert",
                "--parties-file",
                str(parties_file),
                "--keep-serving",
            ),
            log,
        )
        port = read_port(port_file, server, log)
        address = f"localhost:{port}"

        def tls(name: str) -> list[str]:
            return [
                "--tls-ca",
                str(pki / "ca.pem"),
                "--tls-cert",
                str(pki / "parties" / f"{name}.pem"),
                "--tls-key",
                str(pki / "parties" / f"{name}.key"),
            ]

        # A party presenting party-0's certificate but naming party-1 is refused.
        impostor = run_cli(
            [
                "client",
                "--server",
                address,
                "--party-id",
                "party-1",
                "--data",
                f"npz:{data / 'party-0.npz'}",
                *tls("party-0"),
            ]
        )
        assert impostor.returncode == 2
        assert "PERMISSION_DENIED" in impostor.stderr
        assert "party-0" in impostor.stderr and "party-1" in impostor.stderr
        # A client that does not trust the aggregator's CA cannot connect at all.
        other_ca = tmp_path / "other"
        assert run_cli(["certs", "init", str(other_ca)]).returncode == 0
        distrust = run_cli(
            [
                "client",
                "--server",
                address,
                "--party-id",
                "party-0",
                "--data",
                f"npz:{data / 'party-0.npz'}",
                "--tls-ca",
                str(other_ca / "ca.pem"),
                "--connect-timeout",
                "2",
            ]
        )
        assert distrust.returncode == 2
        # A permanent cause is named at once, not retried as UNAVAILABLE.
        assert "not signed by the CA given with --tls-ca" in distrust.stderr

        clients = [
            procs.start(
                [
                    "client",
                    "--server",
                    address,
                    "--party-id",
                    f"party-{i}",
                    "--data",
                    f"npz:{data / f'party-{i}.npz'}",
                    *tls(f"party-{i}"),
                ],
                tmp_path / f"c{i}.log",
            )
            for i in range(2)
        ]
        for i, c in enumerate(clients):
            assert wait_exit(c, 120, tmp_path / f"c{i}.log") == 0

        admin = run_cli(
            ["contributions", "--server", address, "--format", "json", *tls("operator")]
        )
        assert admin.returncode == 0, admin.stderr
        assert set(json.loads(admin.stdout)["totals"]) == {"party-0", "party-1"}
        own = run_cli(
            ["contributions", "--server", address, "--format", "json", *tls("party-0")]
        )
        assert own.returncode == 0, own.stderr
        assert set(json.loads(own.stdout)["totals"]) == {"party-0"}
        other = run_cli(
            [
                "contributions",
                "--server",
                address,
                "--party",
                "party-1",
                *tls("party-0"),
            ]
        )
        assert other.returncode == 2
        assert "PERMISSION_DENIED" in other.stderr

        server.send_signal(signal.SIGTERM)
        assert wait_exit(server, 30, log) == 0


def test_bearer_tokens_over_tls(tmp_path: Path) -> None:
    data = _split(tmp_path)
    pki = tmp_path / "pki"
    assert run_cli(["certs", "init", str(pki)]).returncode == 0
    parties_file = tmp_path / "parties.toml"
    for name in ("party-0", "party-1"):
        res = run_cli(
            [
                "parties",
                "add",
                str(parties_file),
                name,
                "--token-out",
                str(tmp_path / f"{name}.token"),
            ]
        )
        assert res.returncode == 0, res.stderr
    token0 = (tmp_path / "party-0.token").read_text().strip()
    stored = parties_file.read_text()
    assert token0 not in stored and hash_token(token0) in stored
    (tmp_path / "bad.token").write_text("not-a-real-token\n")
    port_file = tmp_path / "port"
    log = tmp_path / "server.log"

    with processes() as procs:
        server = procs.start(
            _serve(
                tmp_path / "run",
                data,
                port_file,
                "--tls-cert",
                str(pki / "server.pem"),
                "--tls-key",
                str(pki / "server.key"),
                "--parties-file",
                str(parties_file),
            ),
            log,
        )
        port = read_port(port_file, server, log)
        common = ["--server", f"localhost:{port}", "--tls-ca", str(pki / "ca.pem")]

        bad = run_cli(
            [
                "client",
                *common,
                "--party-id",
                "party-0",
                "--data",
                "digits",
                "--token-file",
                str(tmp_path / "bad.token"),
            ]
        )
        assert bad.returncode == 2
        assert "UNAUTHENTICATED" in bad.stderr
        missing = run_cli(["status", *common])
        assert missing.returncode == 2
        assert "UNAUTHENTICATED" in missing.stderr

        clients = [
            procs.start(
                [
                    "client",
                    *common,
                    "--party-id",
                    f"party-{i}",
                    "--data",
                    f"npz:{data / f'party-{i}.npz'}",
                    "--token-file",
                    str(tmp_path / f"party-{i}.token"),
                ],
                tmp_path / f"c{i}.log",
            )
            for i in range(2)
        ]
        for i, c in enumerate(clients):
            assert wait_exit(c, 120, tmp_path / f"c{i}.log") == 0
        assert wait_exit(server, 60, log) == 0


def test_sigterm_shuts_down_gracefully_and_saves_open_round(tmp_path: Path) -> None:
    data = _split(tmp_path)
    port_file = tmp_path / "port"
    log = tmp_path / "server.log"
    run_dir = tmp_path / "run"

    with processes() as procs:
        server = procs.start(_serve(run_dir, data, port_file, "--insecure"), log)
        read_port(port_file, server, log)
        wait_for(lambda: "listening" in log.read_text(), 30, "the server to listen")
        # The port is live before the run is set up: wait until the worker is ready.
        wait_for(
            lambda: re.search(r"run \w+ ready", log.read_text()),
            60,
            "the run to be set up",
        )

        workers = child_pids(server.pid, b"fedgrpc.learning.worker")
        assert len(workers) == 1

        server.send_signal(signal.SIGTERM)

        assert wait_exit(server, 30, log) == 128 + signal.SIGTERM
        wait_for(lambda: not running(workers[0]), 15, "the validation worker to exit")
    text = log.read_text()
    assert "shutting down gracefully" in text
    assert f"--resume {run_dir}" in text
    con = sqlite3.connect(f"file:{run_dir / 'ledger.sqlite'}?mode=ro", uri=True)
    try:
        saved = json.loads(
            con.execute("SELECT value FROM state WHERE key = 'open_round'").fetchone()[
                0
            ]
        )
    finally:
        con.close()
    assert saved["round"] == 0 and saved["submitted"] == []
