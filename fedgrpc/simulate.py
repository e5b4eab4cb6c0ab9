"""`fedgrpc simulate`: one aggregator and N client processes on loopback, real gRPC."""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedgrpc.config import ClientConfig, RoundConfig
from fedgrpc.errors import FedGrpcError, RemoteError

log = logging.getLogger(__name__)


def _fedgrpc_cmd() -> list[str]:
    return [sys.executable, "-m", "fedgrpc"]


def _wait_for_file(path: Path, proc: subprocess.Popen[bytes], timeout_s: float) -> str:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if path.is_file() and path.read_text().strip():
            return path.read_text().strip()
        if proc.poll() is not None:
            raise FedGrpcError(
                f"aggregator exited with code {proc.returncode} before listening; "
                f"see {path.parent / 'server.log'}"
            )
        time.sleep(0.05)
    raise FedGrpcError(f"aggregator did not start listening within {timeout_s:g} s")


def _stop(procs: list[subprocess.Popen[bytes]], grace_s: float = 5.0) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    end = time.monotonic() + grace_s
    for p in procs:
        try:
            p.wait(timeout=max(0.1, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def simulate(
    a: argparse.Namespace,
    prepare: Callable[[argparse.Namespace], tuple[dict[str, Any], Any, dict[str, Any]]],
    rcfg: RoundConfig,
) -> int:
    """Split the data, start the aggregator and one client process per party, report."""
    from fedgrpc.client.stub import AggregatorClient
    from fedgrpc.reports import report_from_proto, report_json, report_table

    run_dir: Path = a.run_dir or Path("runs") / time.strftime("sim-%Y%m%d-%H%M%S")
    run_dir.mkdir(parents=True, exist_ok=True)
    data_dir = run_dir / "data"
    parties, val, attacks = prepare(a)
    from fedgrpc.cli import write_split

    write_split(data_dir, a, parties, val, attacks)  # manifest records the attacks
    port_file = run_dir / "port"
    port_file.unlink(missing_ok=True)
    server_cmd = [
        *_fedgrpc_cmd(),
        "serve",
        "--insecure",
        "--address",
        "localhost:0",
        "--port-file",
        str(port_file),
        "--run-dir",
        str(run_dir / "server"),
        "--val-data",
        f"npz:{data_dir / 'val.npz'}",
        "--keep-serving",
        "--min-parties",
        str(rcfg.min_parties),
        "--expected-parties",
        str(len(parties)),
        "--rounds",
        str(rcfg.rounds),
        "--update-kind",
        rcfg.update_kind.value,
        "--server-lr",
        repr(rcfg.server_lr),
        "--lr",
        repr(rcfg.lr),
        "--local-steps",
        str(rcfg.local_steps),
        "--local-epochs",
        str(rcfg.local_epochs),
        "--batch-size",
        str(rcfg.batch_size),
        "--model",
        rcfg.model,
        "--hidden",
        str(rcfg.model_hidden),
        "--seed",
        str(rcfg.seed),
        "--aggregation",
        rcfg.aggregation,
        "--wire-dtype",
        rcfg.wire_dtype,
        "--round-timeout",
        repr(rcfg.round_timeout_s),
        "--join-timeout",
        repr(rcfg.join_timeout_s),
        "--quorum-retries",
        str(rcfg.quorum_retries),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    procs: list[subprocess.Popen[bytes]] = []
    logs = []
    t_start = time.monotonic()
    try:
        slog = (run_dir / "server.log").open("wb")
        logs.append(slog)
        server = subprocess.Popen(
            server_cmd, stdout=slog, stderr=subprocess.STDOUT, env=env
        )
        procs.append(server)
        port = _wait_for_file(port_file, server, 60.0)
        address = f"localhost:{port}"
        print(
            f"aggregator on {address}, run dir {run_dir}; {len(parties)} parties "
            f"({', '.join(f'{p}={len(d)}' for p, d in parties.items())}), "
            f"validation {len(val)} samples",
            flush=True,
        )
        clients: dict[str, subprocess.Popen[bytes]] = {}
        for pid in parties:
            att = attacks.get(pid)
            cmd = [
                *_fedgrpc_cmd(),
                "client",
                "--insecure",
                "--server",
                address,
                "--party-id",
                pid,
                "--data",
                f"npz:{data_dir / (pid + '.npz')}",
                "--connect-timeout",
                "60",
            ]
            if att is not None and not att.on_data:
                cmd += ["--attack", att.spec]
            clog = (run_dir / f"{pid}.log").open("wb")
            logs.append(clog)
            clients[pid] = subprocess.Popen(
                cmd, stdout=subprocess.PIPE, stderr=clog, env=env
            )
            procs.append(clients[pid])
        observer = AggregatorClient(
            ClientConfig(
                server=address,
                party_id="observer",
                data="",
                insecure=True,
                connect_timeout_s=30.0,
            )
        )
        shown = 0
        while True:
            if time.monotonic() - t_start > a.timeout:
                raise FedGrpcError(f"simulation did not finish within {a.timeout:g} s")
            if server.poll() is not None:
                raise FedGrpcError(
                    f"aggregator exited with code {server.returncode}; see "
                    f"{run_dir / 'server.log'}"
                )
            try:
                st = observer.status()
            except RemoteError as err:
                raise FedGrpcError(f"cannot query the aggregator: {err}") from None
            if st.rounds_done > shown:
                _print_rounds(observer, shown, st.rounds_done, st.rounds_total)
                shown = st.rounds_done
            if st.state in ("done", "failed"):
                break
            dead = [p for p, c in clients.items() if c.poll() not in (None, 0)]
            if dead and len(dead) > len(parties) - rcfg.min_parties:
                raise FedGrpcError(
                    f"parties {dead} exited with errors; see their logs in {run_dir}"
                )
            time.sleep(0.2)
        results: dict[str, dict[str, Any]] = {}
        for pid, c in clients.items():
            out, _ = c.communicate(timeout=60)
            line = out.decode().strip().splitlines()[-1:] if out else []
            results[pid] = (
                json.loads(line[0]) if line else {"reason": f"exit {c.returncode}"}
            )
        report = report_from_proto(observer.contributions())
        observer.close()
        report = _with_attacks(report, attacks)
        elapsed = time.monotonic() - t_start
        summary = report_json(report)
        summary.update(
            state=st.state,
            rounds_done=st.rounds_done,
            val_acc=st.val_acc,
            val_loss=st.val_loss,
            elapsed_s=elapsed,
            parties=results,
        )
        (run_dir / "contributions.json").write_text(
            json.dumps(summary, indent=2) + "\n"
        )
        try:
            from fedgrpc.plot import plot_contributions

            plot_contributions(report, run_dir / "contributions.png")
        except Exception as err:  # a plot must never fail the run
            log.warning("could not write the plot: %s", err)
        if a.format == "json":
            print(json.dumps(summary, indent=2))
        else:
            print()
            print(report_table(report))
            print()
            print(
                f"{st.state}: {st.rounds_done} rounds in {elapsed:.1f} s "
                f"({elapsed / max(1, st.rounds_done):.2f} s/round incl. start-up); "
                f"final validation accuracy {st.val_acc:.4f}"
            )
            print(
                f"plot: {run_dir / 'contributions.png'}  ledger: "
                f"{run_dir / 'server' / 'ledger.sqlite'}"
            )
        return 0 if st.state == "done" else 1
    finally:
        _stop(procs)
        for f in logs:
            f.close()


def _print_rounds(observer: Any, first: int, done: int, total: int) -> None:
    """Print the metrics of rounds [first, done) as recorded in the ledger."""
    reply = observer.contributions(["-"], first, done - 1)
    for r in reply.rounds:
        print(
            f"round {r.round + 1:>3}/{total}: {r.status:<6} val loss "
            f"{r.val_loss_after:.4f}  acc {r.val_acc_after:.4f}  "
            f"({len(r.submitted)} parties, {r.duration_s:.2f} s)",
            flush=True,
        )


def _with_attacks(report: Any, attacks: dict[str, Any]) -> Any:
    from dataclasses import replace

    parties = tuple(
        replace(p, attack=attacks[p.party_id].spec) if p.party_id in attacks else p
        for p in report.parties
    )
    return replace(report, parties=parties)
