"""``fedgrpc contributions`` and ``fedgrpc status``: read a run, live or offline."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from fedgrpc.cli.options import (
    add_timeout_options,
    add_tls_client_options,
    observer_config,
)
from fedgrpc.config import ObserverConfig
from fedgrpc.errors import ConfigError, NotFoundError
from fedgrpc.scoring.payouts import PAYOUT_RULES
from fedgrpc.types import SCORING_METHODS, ContributionReport, RunState, RunStatus

_OBSERVER = ObserverConfig(server="", insecure=True)
SIMULATE_SERVER_DIR = "server"
"""Where ``fedgrpc simulate`` keeps the aggregator's run directory inside its own."""


def add_parsers(sub: Any) -> None:
    """Add ``contributions`` and ``status``."""
    p = _observer_parser(sub, "contributions", "DIG-FL contribution ledger")
    p.add_argument(
        "--format",
        choices=["table", "json", "csv"],
        default="table",
        help="table (ranked parties), json (every round and score) or csv (one row "
        "per round and party)",
    )
    p.add_argument("--plot", type=Path, help="write a PNG plot of contributions")
    p.add_argument("--party", action="append", default=[], help="only these parties")
    p.add_argument(
        "--from-round",
        type=int,
        default=0,
        help="first round to include (rounds are numbered from 0)",
    )
    p.add_argument(
        "--to-round", type=int, help="last round to include (default: the latest)"
    )
    p.add_argument(
        "--method",
        choices=SCORING_METHODS,
        default="digfl-1",
        help="digfl-1: first order (default); digfl-2: trapezoid credits that add up "
        "to the measured drop, one round late",
    )
    p.add_argument(
        "--payout",
        type=float,
        metavar="AMOUNT",
        help="split AMOUNT by the totals (in cents, adding up exactly); parties with "
        "a negative total get 0 and are listed as harmful",
    )
    p.add_argument(
        "--rule",
        choices=PAYOUT_RULES,
        default="positive-share",
        help="payout rule (default: %(default)s)",
    )
    p.add_argument(
        "--payout-out",
        type=Path,
        metavar="FILE",
        help="also write the payout to FILE (.json or .csv)",
    )
    p.set_defaults(func=_cmd_contributions)
    p = _observer_parser(sub, "status", "progress of a run")
    p.add_argument(
        "--format",
        choices=["table", "json"],
        default="table",
        help="table (one field a line) or json",
    )
    p.set_defaults(func=_cmd_status)


def _observer_parser(sub: Any, name: str, help_text: str) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = sub.add_parser(name, help=help_text)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--server", help="aggregator HOST:PORT")
    src.add_argument("--run-dir", type=Path, help="read the ledger of a run directory")
    add_tls_client_options(p)
    add_timeout_options(p, _OBSERVER)
    return p


def _ledger_path(run_dir: Path) -> Path:
    """The ledger of a ``serve`` run directory or of a ``simulate`` one (server/)."""
    from fedgrpc.store.ledger import LEDGER_FILE

    candidates = [run_dir / LEDGER_FILE, run_dir / SIMULATE_SERVER_DIR / LEDGER_FILE]
    for path in candidates:
        if path.is_file():
            return path
    raise NotFoundError(
        f"no ledger in {run_dir}: neither {candidates[0]} nor {candidates[1]} exists"
    )


def load_report(a: argparse.Namespace) -> ContributionReport:
    """ContributionReport from --run-dir (offline) or --server (GetContributions)."""
    if a.run_dir is not None:
        from fedgrpc.store.ledger import Ledger

        with Ledger.open_readonly(_ledger_path(a.run_dir)) as ledger:
            return ledger.contributions(
                a.party or None, a.from_round, a.to_round, a.method
            )
    from fedgrpc.client.stub import AggregatorClient

    with AggregatorClient(observer_config(a)) as client:
        return client.contributions(a.party or None, a.from_round, a.to_round, a.method)


def _cmd_contributions(a: argparse.Namespace) -> int:
    from fedgrpc.cli.reports import report_csv, report_json, report_table

    report = load_report(a)
    if a.payout is not None:
        return _payout(a, report)
    if a.format == "json":
        print(json.dumps(report_json(report), indent=2))
    elif a.format == "csv":
        print(report_csv(report), end="")
    else:
        print(report_table(report))
    if a.plot is not None:
        from fedgrpc.cli.plots import plot_contributions  # matplotlib: only to plot

        plot_contributions(report, a.plot)
        print(f"plot written to {a.plot}", file=sys.stderr)
    return 0


def _payout(a: argparse.Namespace, report: ContributionReport) -> int:
    from fedgrpc.cli.reports import payout_csv, payout_doc, payout_table

    if report.private:
        raise ConfigError(
            "a payout needs every party's totals; this credential sees only its own "
            "(use an admin credential or --run-dir)"
        )
    try:
        doc = payout_doc(report, a.payout, a.rule)
    except ValueError as e:
        raise ConfigError(f"--payout: {e}") from None
    if a.format == "json":
        print(json.dumps(doc, indent=2))
    elif a.format == "csv":
        print(payout_csv(doc), end="")
    else:
        print(payout_table(doc))
    if a.payout_out is not None:
        from fedgrpc.store.files import atomic_write

        text = (
            payout_csv(doc)
            if a.payout_out.suffix.lower() == ".csv"
            else json.dumps(doc, indent=2) + "\n"
        )
        atomic_write(a.payout_out, text.encode())
        print(f"payout written to {a.payout_out}", file=sys.stderr)
    return 0


def status_fields(status: RunStatus) -> dict[str, Any]:
    """A RunStatus as the JSON fields ``fedgrpc status`` prints (online or offline)."""
    st = {f.name: getattr(status, f.name) for f in dataclasses.fields(status)}
    st["state"] = status.state.value
    return {k: list(v) if isinstance(v, tuple) else v for k, v in st.items()}


def offline_status(run_dir: Path) -> dict[str, Any]:
    """The same fields as GetStatus, from a run directory's ledger and summary.

    ``state`` comes from the summary the aggregator writes when a run ends; a run
    without one is ``unfinished`` (still running, or stopped: resume it). Fields only
    a live aggregator knows (who submitted to the open round) are empty.
    """
    from fedgrpc.store.ledger import Ledger
    from fedgrpc.store.run_dir import SUMMARY

    ledger_path = _ledger_path(run_dir)
    with Ledger.open_readonly(ledger_path) as ledger:
        info = ledger.run_info() or {}
        rounds = ledger.rounds()
        joined = tuple(str(p["party_id"]) for p in ledger.parties())
    summary: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        summary = json.loads((ledger_path.parent / SUMMARY).read_text())
    ok = [r for r in rounds if r.ok]
    done = len(ok)
    fields = status_fields(
        RunStatus(
            state=RunState.DONE,  # replaced below
            open_round=rounds[-1].round + 1 if rounds else 0,
            rounds_total=int(info.get("config", {}).get("round", {}).get("rounds", 0)),
            rounds_done=done,
            joined=joined,
            late=rounds[-1].late if rounds else (),
            elapsed_s=sum(r.duration_s for r in rounds),
            last_round_s=rounds[-1].duration_s if rounds else 0.0,
            val_loss=ok[-1].val_loss_after if ok else float("nan"),
            val_acc=ok[-1].val_acc_after if ok else float("nan"),
            reason=str(summary.get("reason") or ""),
            run_id=str(info.get("run_id", "")),
        )
    )
    fields["state"] = str(summary.get("state") or "unfinished")
    return fields


def _cmd_status(a: argparse.Namespace) -> int:
    st: dict[str, Any]
    if a.run_dir is not None:
        st = offline_status(a.run_dir)
    else:
        from fedgrpc.client.stub import AggregatorClient

        with AggregatorClient(observer_config(a)) as client:
            st = status_fields(client.status())
    if a.format == "json":
        print(json.dumps(st, indent=2))
    else:
        for k, v in st.items():
            print(f"{k:>14}: {v}")
    return 0
