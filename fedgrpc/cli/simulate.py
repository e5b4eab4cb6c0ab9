"""``fedgrpc simulate``: an aggregator and N client processes on loopback, real gRPC."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from fedgrpc.cli.options import (
    add_data_options,
    add_training_options,
    round_config,
    split_config,
)
from fedgrpc.config import SIMULATE_ROUND, ObserverConfig, RoundConfig, SplitConfig
from fedgrpc.errors import FedGrpcError, RemoteError
from fedgrpc.store.files import atomic_write
from fedgrpc.types import ContributionReport, RunState, RunStatus

if TYPE_CHECKING:
    from fedgrpc.client.stub import AggregatorClient
    from fedgrpc.datasets.attacks import Attack

log = logging.getLogger(__name__)


def add_parsers(sub: Any) -> None:
    """Add ``simulate``."""
    p = sub.add_parser(
        "simulate", help="aggregator + N client processes on loopback, one command"
    )
    add_data_options(p, defaults=SplitConfig(), holdout_help="20%% of the data")
    add_training_options(p, defaults=SIMULATE_ROUND)
    p.add_argument(
        "--run-dir", type=Path, help="run directory (default runs/sim-YYYYmmdd-HHMMSS)"
    )
    p.add_argument("--timeout", type=float, default=1800.0, help="give up after (s)")
    p.add_argument("--format", choices=["table", "json"], default="table")
    p.set_defaults(func=_cmd_simulate)


def _cmd_simulate(a: argparse.Namespace) -> int:
    rcfg = round_config(a, min_parties=a.parties, expected=a.parties)
    return simulate(
        split_config(a),
        rcfg,
        run_dir=a.run_dir,
        timeout_s=a.timeout,
        output_format=a.format,
    )


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
    split: SplitConfig,
    rcfg: RoundConfig,
    *,
    run_dir: Path | None = None,
    timeout_s: float = 1800.0,
    output_format: str = "table",
) -> int:
    """Split the data, start the aggregator and one client process per party, report."""
    from fedgrpc.client.stub import AggregatorClient
    from fedgrpc.datasets.attacks import parse_assignments
    from fedgrpc.datasets.split import prepare_parties, resolve_attacks, write_split

    run_dir = run_dir or Path("runs") / time.strftime("sim-%Y%m%d-%H%M%S")
    run_dir.mkdir(parents=True, exist_ok=True)
    data_dir = run_dir / "data"
    parties, val = prepare_parties(split)
    attacks = resolve_attacks(parse_assignments(split.attacks), list(parties))
    write_split(data_dir, split, parties, val)  # the manifest records the attacks
    port_file = run_dir / "port"
    port_file.unlink(missing_ok=True)
    server_cmd = _serve_cmd(
        rcfg,
        run_dir=run_dir,
        data_dir=data_dir,
        port_file=port_file,
        n_parties=len(parties),
    )
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    # Filled as processes and log files are opened, so `finally` cleans up whatever
    # a failure half-way through the start-up left behind.
    procs: list[subprocess.Popen[bytes]] = []
    logs: list[IO[bytes]] = []
    t_start = time.monotonic()
    try:
        server = _start_server(
            server_cmd, run_dir / "server.log", env=env, procs=procs, logs=logs
        )
        address = f"localhost:{_wait_for_file(port_file, server, 60.0)}"
        print(
            f"aggregator on {address}, run dir {run_dir}; {len(parties)} parties "
            f"({', '.join(f'{p}={len(d)}' for p, d in parties.items())}), "
            f"validation {len(val)} samples",
            flush=True,
        )
        clients = _start_clients(
            list(parties),
            attacks,
            address=address,
            data_dir=data_dir,
            run_dir=run_dir,
            env=env,
            procs=procs,
            logs=logs,
        )
        observer = AggregatorClient(ObserverConfig(server=address, insecure=True))
        st = _watch(
            observer,
            server,
            clients,
            run_dir=run_dir,
            t_start=t_start,
            timeout_s=timeout_s,
            min_parties=rcfg.min_parties,
        )
        results = _client_results(clients)
        report = observer.contributions()
        observer.close()
        report = _with_attacks(report, attacks)
        elapsed = time.monotonic() - t_start
        _report(report, st, results, elapsed, run_dir, output_format)
        return 0 if st.state is RunState.DONE else 1
    finally:
        _stop(procs)
        for f in logs:
            f.close()


def _serve_cmd(
    rcfg: RoundConfig,
    *,
    run_dir: Path,
    data_dir: Path,
    port_file: Path,
    n_parties: int,
) -> list[str]:
    """The ``fedgrpc serve`` command line that runs ``rcfg`` for ``n_parties``."""
    # repr() for floats: the child must parse back exactly the value we hold.
    return [
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
        str(n_parties),
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
        "--momentum",
        repr(rcfg.momentum),
        "--weight-decay",
        repr(rcfg.weight_decay),
        "--prox-mu",
        repr(rcfg.prox_mu),
        "--norm-bound",
        rcfg.norm_bound,
        "--norm-bound-factor",
        repr(rcfg.norm_bound_factor),
        "--claim-cap",
        repr(rcfg.claim_cap),
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


def _start_server(
    cmd: list[str],
    log_path: Path,
    *,
    env: dict[str, str],
    procs: list[subprocess.Popen[bytes]],
    logs: list[IO[bytes]],
) -> subprocess.Popen[bytes]:
    """Start the aggregator with stdout and stderr going to ``log_path``.

    The process and log file are appended to ``procs`` and ``logs`` for the caller
    to clean up.
    """
    slog = log_path.open("wb")
    logs.append(slog)
    server = subprocess.Popen(cmd, stdout=slog, stderr=subprocess.STDOUT, env=env)
    procs.append(server)
    return server


def _start_clients(
    party_ids: list[str],
    attacks: Mapping[str, Attack],
    *,
    address: str,
    data_dir: Path,
    run_dir: Path,
    env: dict[str, str],
    procs: list[subprocess.Popen[bytes]],
    logs: list[IO[bytes]],
) -> dict[str, subprocess.Popen[bytes]]:
    """Start one ``fedgrpc client`` per party; stdout is piped for its result line.

    Each process and log file is appended to ``procs`` and ``logs`` as soon as it
    exists, so the caller can clean up after a failure part-way through.
    """
    clients: dict[str, subprocess.Popen[bytes]] = {}
    for pid in party_ids:
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
        ]
        # Data attacks are already baked into the party's split file.
        if att is not None and not att.on_data:
            cmd += ["--attack", att.spec]
        clog = (run_dir / f"{pid}.log").open("wb")
        logs.append(clog)
        clients[pid] = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=clog, env=env
        )
        procs.append(clients[pid])
    return clients


def _watch(
    observer: AggregatorClient,
    server: subprocess.Popen[bytes],
    clients: Mapping[str, subprocess.Popen[bytes]],
    *,
    run_dir: Path,
    t_start: float,
    timeout_s: float,
    min_parties: int,
) -> RunStatus:
    """Poll the aggregator, printing each closed round, until the run finishes.

    Raises:
        FedGrpcError: the timeout passed, the aggregator died or cannot be reached,
            or more parties failed than the quorum can spare.
    """
    shown = 0
    while True:
        if time.monotonic() - t_start > timeout_s:
            raise FedGrpcError(f"simulation did not finish within {timeout_s:g} s")
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
        if st.state.finished:
            return st
        dead = [p for p, c in clients.items() if c.poll() not in (None, 0)]
        if dead and len(dead) > len(clients) - min_parties:
            raise FedGrpcError(
                f"parties {dead} exited with errors; see their logs in {run_dir}"
            )
        time.sleep(0.2)


def _client_results(
    clients: Mapping[str, subprocess.Popen[bytes]],
) -> dict[str, dict[str, Any]]:
    """Each client's last stdout line (its JSON result), or its exit code."""
    results: dict[str, dict[str, Any]] = {}
    for pid, c in clients.items():
        out, _ = c.communicate(timeout=60)
        line = out.decode().strip().splitlines()[-1:] if out else []
        results[pid] = (
            json.loads(line[0]) if line else {"reason": f"exit {c.returncode}"}
        )
    return results


def _report(
    report: ContributionReport,
    st: RunStatus,
    results: dict[str, dict[str, Any]],
    elapsed: float,
    run_dir: Path,
    output_format: str,
) -> None:
    """Write contributions.json and the plot to ``run_dir``, then print the report."""
    from fedgrpc.cli.reports import report_json, report_table

    summary = report_json(report)
    summary.update(
        state=st.state.value,
        rounds_done=st.rounds_done,
        val_acc=st.val_acc,
        val_loss=st.val_loss,
        elapsed_s=elapsed,
        parties=results,
    )
    atomic_write(
        run_dir / "contributions.json",
        (json.dumps(summary, indent=2) + "\n").encode(),
    )
    try:
        from fedgrpc.cli.plots import plot_contributions

        plot_contributions(report, run_dir / "contributions.png")
    except Exception as err:  # a plot must never fail the run
        log.warning("could not write the plot: %s", err)
    if output_format == "json":
        print(json.dumps(summary, indent=2))
        return
    print()
    print(report_table(report))
    print()
    print(
        f"{st.state.value}: {st.rounds_done} rounds in {elapsed:.1f} s "
        f"({elapsed / max(1, st.rounds_done):.2f} s/round incl. start-up); "
        f"final validation accuracy {st.val_acc:.4f}"
    )
    print(
        f"plot: {run_dir / 'contributions.png'}  ledger: "
        f"{run_dir / 'server' / 'ledger.sqlite'}"
    )


def _print_rounds(observer: Any, first: int, done: int, total: int) -> None:
    """Print the metrics of rounds [first, done) as recorded in the ledger."""
    report: ContributionReport = observer.contributions(None, first, done - 1)
    for r in report.rounds:
        print(
            f"round {r.round + 1:>3}/{total}: {r.status:<6} val loss "
            f"{r.val_loss_after:.4f}  acc {r.val_acc_after:.4f}  "
            f"({len(r.parties)} parties, {r.duration_s:.2f} s)",
            flush=True,
        )


def _with_attacks(
    report: ContributionReport, attacks: dict[str, Any]
) -> ContributionReport:
    parties = tuple(
        dataclasses.replace(p, attack=attacks[p.party_id].spec)
        if p.party_id in attacks
        else p
        for p in report.parties
    )
    return dataclasses.replace(report, parties=parties)
