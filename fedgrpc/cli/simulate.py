"""``fedgrpc simulate``: an aggregator and N parties on loopback, real gRPC.

Parties are processes (``--backend processes``: one each, forked from a parent that
imported torch once) or virtual parties on a few Ray actors (``--backend ray``, see
:mod:`fedgrpc.client.raypool`); either way each runs the ``fedgrpc client`` loop
against the real ``fedgrpc serve``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Protocol

from fedgrpc.cli.options import (
    add_data_options,
    add_training_options,
    quorum_of,
    round_config,
    split_config,
    strategy_args,
)
from fedgrpc.config import (
    SIMULATE_BACKENDS,
    SIMULATE_ROUND,
    SIMULATE_TIMEOUT_S,
    ClientConfig,
    Limits,
    ObserverConfig,
    RayPoolConfig,
    RoundConfig,
    SplitConfig,
)
from fedgrpc.errors import ConfigError, FedGrpcError, RemoteError
from fedgrpc.store.files import atomic_write
from fedgrpc.types import ContributionReport, RunState, RunStatus

if TYPE_CHECKING:
    from fedgrpc.client.raypool import RayParties
    from fedgrpc.client.stub import AggregatorClient
    from fedgrpc.datasets.attacks import Attack
    from fedgrpc.datasets.sources import Dataset

log = logging.getLogger(__name__)

SERVER_EXIT_WAIT_S = 30.0
"""How long the aggregator may take to exit by itself after the run."""

TABLE_TOP = 10
"""With many parties the table lists the best and the worst this many."""


def add_parsers(sub: Any) -> None:
    """Add ``simulate``."""
    p = sub.add_parser(
        "simulate", help="aggregator + N parties on loopback, one command"
    )
    add_data_options(p, defaults=SplitConfig(), holdout_help="20%% of the data")
    add_training_options(p, defaults=SIMULATE_ROUND)
    p.add_argument(
        "--run-dir", type=Path, help="run directory (default runs/sim-YYYYmmdd-HHMMSS)"
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=SIMULATE_TIMEOUT_S,
        help="give up after this many seconds; the aggregator waits this long for "
        "its parties to start, however slowly they come up",
    )
    p.add_argument(
        "--backend",
        choices=SIMULATE_BACKENDS,
        default=SIMULATE_BACKENDS[0],
        help="processes: one process per party (small N); ray: virtual parties "
        "on a few Ray actors, for hundreds or thousands (pip install 'fedgrpc[ray]')",
    )
    p.add_argument(
        "--ray-actors",
        type=int,
        default=RayPoolConfig().actors,
        help="--backend ray: actors (processes) hosting the parties; 0 = one per core",
    )
    p.add_argument(
        "--format",
        choices=["table", "json"],
        default="table",
        help="table: progress and the contribution table on stdout; json: only the "
        "summary (contributions.json) on stdout, progress on stderr",
    )
    p.set_defaults(func=_cmd_simulate)


def _cmd_simulate(a: argparse.Namespace) -> int:
    rcfg = round_config(a, min_parties=quorum_of(a, a.parties), expected=a.parties)
    code = simulate(
        split_config(a),
        rcfg,
        run_dir=a.run_dir,
        timeout_s=a.timeout,
        output_format=a.format,
        quiet=a.quiet,
        backend=a.backend,
        ray_pool=RayPoolConfig(actors=a.ray_actors),
    )
    # Everything is written (atomically, fsynced) and every child reaped: skip the
    # interpreter's teardown, which unloads torch and matplotlib (0.5-2 s measured).
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)


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


class _Proc(Protocol):
    """What simulate needs of a child: a Popen or a ForkedParty."""

    def poll(self) -> int | None: ...
    def wait(self, timeout: float | None = None) -> int: ...
    def terminate(self) -> None: ...
    def kill(self) -> None: ...


def _warm_plot() -> None:
    with contextlib.suppress(Exception):  # the plot itself reports failures
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot


def _preload_parties() -> bool:
    """Import the party code to fork parties from; False if forking is unsafe here."""
    if not hasattr(os, "fork"):
        return False
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported
    os.environ.setdefault("MKL_NUM_THREADS", "1")
    from fedgrpc.client.forked import preload

    try:
        preload()
    except RuntimeError as err:
        log.info("starting party processes instead of forking them: %s", err)
        return False
    return True


def _stop(procs: Sequence[_Proc], grace_s: float = 5.0) -> None:
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
    timeout_s: float = SIMULATE_TIMEOUT_S,
    output_format: str = "table",
    quiet: bool = False,
    backend: str = "processes",
    ray_pool: RayPoolConfig | None = None,
) -> int:
    """Split the data, start the aggregator and the parties, report.

    ``backend`` ``processes`` starts one process per party; ``ray`` hosts them on a
    pool of Ray actors (``ray_pool``). Progress lines go to stdout (stderr with
    ``output_format="json"``, so stdout is only the JSON summary); ``quiet`` drops
    them.

    Raises:
        ConfigError: an unknown backend, or ``ray`` without Ray installed.
    """
    t_start = time.monotonic()
    if backend not in SIMULATE_BACKENDS:
        raise ConfigError(
            f"backend must be one of {', '.join(SIMULATE_BACKENDS)}, got {backend!r}"
        )
    if backend == "ray":
        from fedgrpc.client.raypool import check_ray

        check_ray()  # before any work: a missing Ray says how to install it
    progress = _Progress(
        None if quiet else sys.stderr if output_format == "json" else sys.stdout
    )
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
        join_timeout_s=timeout_s,
        # Processes join all at once, and a Join refused as RESOURCE_EXHAUSTED is
        # not retried; the Ray pool paces its joins below the default cap.
        concurrent_joins=len(parties) if backend == "processes" else 0,
    )
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    log_level = logging.WARNING if quiet else logging.INFO
    # Filled as processes and log files are opened, so `finally` cleans up whatever
    # a failure half-way through the start-up left behind.
    procs: list[_Proc] = []
    logs: list[IO[bytes]] = []
    pool: RayParties | None = None
    try:
        server = _start_server(
            server_cmd, run_dir / "server.log", env=env, procs=procs, logs=logs
        )
        if backend == "ray":
            from fedgrpc.client.raypool import RayParties

            # Ray and its actors start (and import torch) while the aggregator does.
            pool = RayParties(
                ray_pool or RayPoolConfig(), len(parties), run_dir, log_level=log_level
            )
            pool.open()
            fork = False
        else:
            # While the aggregator starts: import the parties' torch code once,
            # here, to fork them from (see fedgrpc.client.forked); else start N
            # processes.
            fork = _preload_parties()
        address = f"localhost:{_wait_for_file(port_file, server, 60.0)}"
        progress.say(
            f"aggregator on {address}, run dir {run_dir}; {_describe(parties)}, "
            f"validation {len(val)} samples; rounds are numbered from 0"
        )
        party_set: _Parties
        if pool is not None:
            from fedgrpc.client.raypool import virtual_parties

            pool.wait_ready()
            pool.start(
                address,
                virtual_parties(
                    {p: f"npz:{data_dir / (p + '.npz')}" for p in parties},
                    _update_attacks(attacks),
                ),
            )
            progress.say(
                f"{len(parties)} virtual parties on {pool.n_actors} Ray actors "
                f"(logs: {run_dir}/ray-actor-*.log)"
            )
            party_set = pool
        else:
            party_set = _ProcessParties(
                _start_clients(
                    list(parties),
                    attacks,
                    address=address,
                    data_dir=data_dir,
                    run_dir=run_dir,
                    env=env,
                    procs=procs,
                    logs=logs,
                    fork=fork,
                    log_level=log_level,
                )
            )
        from fedgrpc.client.stub import AggregatorClient  # grpc: after the forks

        # No fork after this point: load matplotlib for the final plot while the
        # rounds run (about 1 s saved at the end).
        threading.Thread(target=_warm_plot, name="warm-plot", daemon=True).start()

        # Short connect timeout: the aggregator exits at the end of the run (no
        # grace period), and a call caught in its exit retried UNAVAILABLE for the
        # whole timeout (5 s cost a third of 10-party runs 6 s); _watch re-checks
        # whether it exited, and tolerates a live one unreachable for a while.
        observer = AggregatorClient(
            ObserverConfig(server=address, insecure=True, connect_timeout_s=1.0)
        )
        try:
            shown = _watch(
                observer,
                server,
                party_set,
                len(parties),
                progress,
                run_dir=run_dir,
                t_start=t_start,
                timeout_s=timeout_s,
                min_parties=rcfg.min_parties,
            )
        finally:
            observer.close()
        results = party_set.results()
        _wait_server(server, run_dir)
        elapsed = time.monotonic() - t_start
        st, report = _read_run(run_dir / "server")
        _print_rounds(progress, report, shown, st.rounds_total)
        report = _with_attacks(report, attacks)
        _report(report, st, results, elapsed, run_dir, output_format)
        return 0 if st.state is RunState.DONE else 1
    finally:
        _stop(procs)
        if pool is not None:
            pool.close()
        for f in logs:
            f.close()


def _describe(parties: Mapping[str, Dataset]) -> str:
    """``3 parties (party-0=12, ...)``, or only the range of sizes when many."""
    sizes = [len(d) for d in parties.values()]
    if len(parties) <= 10:
        each = ", ".join(f"{p}={n}" for p, n in zip(parties, sizes, strict=True))
        return f"{len(parties)} parties ({each})"
    return f"{len(parties)} parties ({min(sizes)}-{max(sizes)} samples each)"


def _update_attacks(attacks: Mapping[str, Attack]) -> dict[str, str]:
    """The update attacks by party (data attacks are baked into the split files)."""
    return {p: a.spec for p, a in attacks.items() if not a.on_data}


class _Parties(Protocol):
    """A running set of parties, whatever runs them."""

    def failed(self) -> list[str]:
        """Parties that ended other than by completing the run."""
        ...

    def results(self) -> dict[str, dict[str, Any]]:
        """Each party's result once the run is over."""
        ...


class _ProcessParties:
    """Parties that are processes: forked or ``fedgrpc client``."""

    def __init__(self, clients: dict[str, _Proc]) -> None:
        self.clients = clients

    def failed(self) -> list[str]:
        return [p for p, c in self.clients.items() if c.poll() not in (None, 0)]

    def results(self) -> dict[str, dict[str, Any]]:
        return _client_results(self.clients)


def _serve_cmd(
    rcfg: RoundConfig,
    *,
    run_dir: Path,
    data_dir: Path,
    port_file: Path,
    n_parties: int,
    join_timeout_s: float,
    concurrent_joins: int = 0,
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
        # No grace period: this process reads the ledger from disk once it exits.
        "--grace-period",
        "0",
        "--min-parties",
        str(rcfg.min_parties),
        "--expected-parties",
        str(n_parties),
        # A simulation of more parties than the default limits raises them to fit:
        # every party may join, and ``concurrent_joins`` Joins (plus this process's
        # queries) are served at once.
        "--max-parties",
        str(max(Limits().max_parties, n_parties)),
        "--max-concurrent-unary",
        str(max(Limits().max_concurrent_unary, concurrent_joins + 8)),
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
        # Its own parties are waited for however slowly they start (this process
        # watches them and stops the run if they die).
        "--join-timeout",
        repr(max(rcfg.join_timeout_s, join_timeout_s)),
        "--quorum-retries",
        str(rcfg.quorum_retries),
        *strategy_args(rcfg),
    ]


def _start_server(
    cmd: list[str],
    log_path: Path,
    *,
    env: dict[str, str],
    procs: list[_Proc],
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
    procs: list[_Proc],
    logs: list[IO[bytes]],
    fork: bool,
    log_level: int,
) -> dict[str, _Proc]:
    """Start one party process each: forked (``fork``) or ``fedgrpc client``.

    Each process and log file is appended to ``procs`` and ``logs`` as soon as it
    exists, so the caller can clean up after a failure part-way through. A started
    ``fedgrpc client`` prints its result on the piped stdout; a forked party
    writes it to ``<party>.result.json``.
    """
    clients: dict[str, _Proc] = {}
    for pid in party_ids:
        att = attacks.get(pid)
        data = f"npz:{data_dir / (pid + '.npz')}"
        # Data attacks are already baked into the party's split file.
        update_attack = att.spec if att is not None and not att.on_data else ""
        if fork:
            from fedgrpc.client.forked import fork_party

            cfg = ClientConfig(
                server=address,
                party_id=pid,
                data=data,
                insecure=True,
                attack=update_attack,
            )
            clients[pid] = fork_party(
                cfg,
                run_dir / f"{pid}.log",
                run_dir / f"{pid}.result.json",
                log_level=log_level,
            )
            procs.append(clients[pid])
            continue
        cmd = [
            *_fedgrpc_cmd(),
            "client",
            "--insecure",
            "--server",
            address,
            "--party-id",
            pid,
            "--data",
            data,
        ]
        if update_attack:
            cmd += ["--attack", update_attack]
        clog = (run_dir / f"{pid}.log").open("wb")
        logs.append(clog)
        popen = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=clog, env=env)
        clients[pid] = popen
        procs.append(popen)
    return clients


class _Progress:
    """Human progress lines on one stream, or nowhere (``-q``)."""

    def __init__(self, stream: IO[str] | None) -> None:
        self.stream = stream
        self._first: tuple[int, float] | None = None  # (rounds done, when)

    def rounds_seen(self, done: int) -> None:
        """Note the first round seen: the ETA counts from it (start-up excluded)."""
        if self._first is None:
            self._first = (done, time.monotonic())

    def eta(self, done: int, total: int) -> str:
        """``  ETA 3 s``: mean time per round since the first seen, times those left."""
        if self._first is None or done >= total or done <= self._first[0]:
            return ""
        first, t0 = self._first
        per_round = (time.monotonic() - t0) / (done - first)
        return f"  ETA {per_round * (total - done):.0f} s"

    def say(self, line: str) -> None:
        if self.stream is not None:
            print(line, file=self.stream, flush=True)


def _watch(
    observer: AggregatorClient,
    server: subprocess.Popen[bytes],
    parties: _Parties,
    n_parties: int,
    progress: _Progress,
    *,
    run_dir: Path,
    t_start: float,
    timeout_s: float,
    min_parties: int,
) -> int:
    """Poll the aggregator, printing each closed round, until the run finishes.

    Returns:
        How many rounds were printed (the rest are read from the ledger).

    Raises:
        FedGrpcError: the timeout passed, the aggregator died or cannot be reached,
            or more parties failed than the quorum can spare.
    """
    shown = 0
    failing_since = 0.0  # when the current run of failed queries began
    while True:
        if time.monotonic() - t_start > timeout_s:
            raise FedGrpcError(f"simulation did not finish within {timeout_s:g} s")
        if server.poll() is not None:
            if server.returncode in (0, 1):  # the run ended (done or failed)
                return shown
            raise FedGrpcError(
                f"aggregator exited with code {server.returncode}; see "
                f"{run_dir / 'server.log'}"
            )
        try:
            st = observer.status()
            if st.rounds_done > shown:
                report = observer.contributions(None, shown, st.rounds_done - 1)
                shown = _print_rounds(progress, report, shown, st.rounds_total)
        except RemoteError as err:
            # The aggregator exits by itself at the end of the run; a call caught
            # in its shutdown fails (UNAVAILABLE, CANCELLED): see whether it exits.
            with contextlib.suppress(subprocess.TimeoutExpired):
                server.wait(timeout=2.0)
            if server.poll() is not None:
                continue  # decided at the top of the loop
            failing_since = failing_since or time.monotonic()
            if time.monotonic() - failing_since > SERVER_EXIT_WAIT_S:
                raise FedGrpcError(f"cannot query the aggregator: {err}") from None
            log.info("aggregator not answering (%s); asking again", err)
            continue
        failing_since = 0.0
        if st.state.finished:
            return shown
        dead = parties.failed()
        if dead and len(dead) > n_parties - min_parties:
            shown_ids = ", ".join(dead[:10]) + (" ..." if len(dead) > 10 else "")
            raise FedGrpcError(
                f"{len(dead)} parties ({shown_ids}) exited with errors; see their "
                f"logs in {run_dir}"
            )
        time.sleep(0.1)


def _wait_server(server: subprocess.Popen[bytes], run_dir: Path) -> None:
    """Wait for the aggregator to exit by itself after the run (bounded)."""
    try:
        code = server.wait(timeout=SERVER_EXIT_WAIT_S)
    except subprocess.TimeoutExpired:
        log.warning(
            "aggregator still running %g s after the run; stopping it",
            SERVER_EXIT_WAIT_S,
        )
        return
    if code not in (0, 1):
        raise FedGrpcError(
            f"aggregator exited with code {code}; see {run_dir / 'server.log'}"
        )


def _read_run(server_dir: Path) -> tuple[RunStatus, ContributionReport]:
    """The finished run's status and contributions, from its run directory."""
    from fedgrpc.store.ledger import Ledger
    from fedgrpc.store.run_dir import SUMMARY

    with Ledger.open_readonly(server_dir / "ledger.sqlite") as ledger:
        report = ledger.contributions(None, 0, None)
        info = ledger.run_info() or {}
    try:
        summary = json.loads((server_dir / SUMMARY).read_text())
    except (OSError, ValueError) as err:
        raise FedGrpcError(
            f"the aggregator left no readable {server_dir / SUMMARY}: {err}"
        ) from None
    ok = [r for r in report.rounds if r.ok]
    st = RunStatus(
        state=RunState(summary["state"]),
        open_round=int(summary["rounds_done"]),
        rounds_total=int(info.get("config", {}).get("round", {}).get("rounds", 0)),
        rounds_done=int(summary["rounds_done"]),
        val_loss=ok[-1].val_loss_after if ok else float("nan"),
        val_acc=ok[-1].val_acc_after if ok else float("nan"),
        reason=str(summary.get("reason") or ""),
    )
    return st, report


def _client_results(clients: Mapping[str, _Proc]) -> dict[str, dict[str, Any]]:
    """Each party's result (its JSON result line or file), or its exit code."""
    from fedgrpc.client.forked import ForkedParty

    results: dict[str, dict[str, Any]] = {}
    for pid, c in clients.items():
        if isinstance(c, ForkedParty):
            c.wait(timeout=60)
            results[pid] = c.result()
            continue
        assert isinstance(c, subprocess.Popen)
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
    print(report_table(report, top=TABLE_TOP))
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


def _print_rounds(
    progress: _Progress, report: ContributionReport, shown: int, total: int
) -> int:
    """Print the rounds of ``report`` from index ``shown`` on; return the new count."""
    for r in report.rounds:
        if r.round < shown:
            continue
        done = r.round + 1
        progress.rounds_seen(done)
        progress.say(
            f"round {r.round:>3} ({done:>{len(str(total))}}/{total}): "
            f"{r.status:<6} val loss "
            f"{r.val_loss_after:.4f}  acc {r.val_acc_after:.4f}  "
            f"({len(r.parties)} parties, {r.duration_s:.2f} s)"
            f"{progress.eta(done, total)}"
        )
        shown = done
    return shown


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
