"""``fedgrpc contributions`` and ``fedgrpc status``: read a run, live or offline."""

from __future__ import annotations

import argparse
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
from fedgrpc.types import SCORING_METHODS, ContributionReport

_OBSERVER = ObserverConfig(server="", insecure=True)


def add_parsers(sub: Any) -> None:
    """Add ``contributions`` and ``status``."""
    p = _observer_parser(sub, "contributions", "DIG-FL contribution ledger")
    p.add_argument("--format", choices=["table", "json", "csv"], default="table")
    p.add_argument("--plot", type=Path, help="write a PNG plot of contributions")
    p.add_argument("--party", action="append", default=[], help="only these parties")
    p.add_argument("--from-round", type=int, default=0)
    p.add_argument("--to-round", type=int)
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
    p.add_argument("--format", choices=["table", "json"], default="table")
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
    from fedgrpc.store.ledger import LEDGER_FILE

    path = run_dir / LEDGER_FILE
    if not path.is_file():
        raise NotFoundError(f"no ledger at {path}")
    return path


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


def _cmd_status(a: argparse.Namespace) -> int:
    st: dict[str, Any]
    if a.run_dir is not None:
        from fedgrpc.store.ledger import Ledger

        with Ledger.open_readonly(_ledger_path(a.run_dir)) as ledger:
            info = ledger.run_info() or {}
            rounds = ledger.rounds()
        st = {
            "run_id": info.get("run_id", ""),
            "rounds_done": len(rounds),
            "rounds_total": info.get("config", {}).get("round", {}).get("rounds"),
            "val_acc": rounds[-1].val_acc_after if rounds else None,
            "val_loss": rounds[-1].val_loss_after if rounds else None,
            "last_status": rounds[-1].status if rounds else None,
        }
    else:
        from fedgrpc.client.stub import AggregatorClient

        with AggregatorClient(observer_config(a)) as client:
            status = client.status()
        st = {f.name: getattr(status, f.name) for f in dataclasses.fields(status)}
        st["state"] = status.state.value
        st = {k: list(v) if isinstance(v, tuple) else v for k, v in st.items()}
    if a.format == "json":
        print(json.dumps(st, indent=2))
    else:
        for k, v in st.items():
            print(f"{k:>14}: {v}")
    return 0
