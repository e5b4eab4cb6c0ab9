"""`fedgrpc serve|client|simulate|split|contributions|status|certs|parties|shapley`.

The only module that reads argv; it builds typed configs and passes them down.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import fedgrpc
from fedgrpc.cli_options import add_data_options, add_training_options, round_config
from fedgrpc.config import ClientConfig, Limits, RoundConfig, ServerConfig, TlsConfig
from fedgrpc.errors import FedGrpcError
from fedgrpc.types import UpdateKind

log = logging.getLogger("fedgrpc")


# --------------------------------------------------------------------- options
def _add_tls_client_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("security")
    g.add_argument(
        "--insecure", action="store_true", help="plaintext (no TLS): tests only"
    )
    g.add_argument(
        "--tls-ca", type=Path, help="CA certificate that signed the aggregator's"
    )
    g.add_argument(
        "--tls-cert", type=Path, help="this party's certificate (mutual TLS)"
    )
    g.add_argument("--tls-key", type=Path, help="this party's private key (mutual TLS)")
    g.add_argument(
        "--token-file", type=Path, help="file holding this caller's bearer token"
    )


def _client_config(
    a: argparse.Namespace, party_id: str = "observer", data: str = ""
) -> ClientConfig:
    token = a.token_file.read_text().strip() if a.token_file else None
    return ClientConfig(
        server=a.server,
        party_id=party_id,
        data=data,
        insecure=a.insecure,
        tls=TlsConfig(cert=a.tls_cert, key=a.tls_key, ca=a.tls_ca),
        token=token,
        rpc_timeout_s=getattr(a, "rpc_timeout", 30.0),
        connect_timeout_s=getattr(a, "connect_timeout", 60.0),
        attack=getattr(a, "attack", "") or "",
        threads=getattr(a, "threads", 1),
    )


# ----------------------------------------------------------------------- serve
def _serve_parser(sub: Any) -> None:
    p = sub.add_parser("serve", help="run the aggregator")
    p.add_argument(
        "--address",
        default="localhost:50051",
        help="host:port to listen on (port 0 = any free port)",
    )
    p.add_argument("--run-dir", type=Path, default=Path("runs/latest"))
    p.add_argument(
        "--resume",
        type=Path,
        metavar="RUN_DIR",
        help="continue the run in RUN_DIR from its last committed round",
    )
    p.add_argument(
        "--val-data", default="digits", help="digits, mnist:DIR, npz:FILE, mod:fn"
    )
    p.add_argument(
        "--val-count", type=int, default=0, help="use the first N samples only"
    )
    p.add_argument("--min-parties", type=int, default=2, help="quorum")
    p.add_argument(
        "--expected-parties",
        type=int,
        default=0,
        help="parties to wait for before round 0 (default: --min-parties)",
    )
    p.add_argument("--init-model", type=Path, help="start from these weights (.npz)")
    p.add_argument(
        "--validator",
        choices=("process", "thread"),
        default="process",
        help="where the validation passes (v_t, loss after the step) run: a worker "
        "process sharing the model through memory, which keeps torch and the "
        "validation set out of the aggregator (default), or a thread of the aggregator",
    )
    p.add_argument("--port-file", type=Path, help="write the bound port here")
    p.add_argument(
        "--keep-serving",
        action="store_true",
        help="after the last round keep answering queries until SIGTERM",
    )
    add_training_options(p, defaults=RoundConfig())
    g = p.add_argument_group("security")
    g.add_argument(
        "--insecure", action="store_true", help="plaintext (no TLS): tests only"
    )
    g.add_argument("--tls-cert", type=Path)
    g.add_argument("--tls-key", type=Path)
    g.add_argument(
        "--tls-ca", type=Path, help="CA for client certificates (mutual TLS)"
    )
    g.add_argument(
        "--require-client-cert",
        action="store_true",
        help="mutual TLS: party identity from its certificate",
    )
    g.add_argument("--parties-file", type=Path, help="TOML file of parties and tokens")
    lim = Limits()
    g = p.add_argument_group("limits")
    g.add_argument("--max-chunk-bytes", type=int, default=lim.max_chunk_bytes)
    g.add_argument("--max-tensor-bytes", type=int, default=lim.max_tensor_bytes)
    g.add_argument("--max-submission-bytes", type=int, default=lim.max_submission_bytes)
    g.add_argument(
        "--max-streams-per-party", type=int, default=lim.max_streams_per_party
    )
    g.add_argument("--max-parties", type=int, default=lim.max_parties)
    g.add_argument(
        "--max-inflight-uploads",
        type=int,
        default=lim.max_inflight_uploads,
        help="uploads buffered at once (memory: this many model-sized buffers)",
    )
    p.set_defaults(func=_cmd_serve)


def _cmd_serve(a: argparse.Namespace) -> int:
    from fedgrpc.server.app import serve

    run_dir = a.resume or a.run_dir
    cfg = ServerConfig(
        round=round_config(a, min_parties=a.min_parties, expected=a.expected_parties),
        address=a.address,
        run_dir=run_dir,
        val_data=a.val_data,
        val_count=a.val_count,
        insecure=a.insecure,
        tls=TlsConfig(
            cert=a.tls_cert,
            key=a.tls_key,
            ca=a.tls_ca,
            require_client_cert=a.require_client_cert,
        ),
        parties_file=a.parties_file,
        limits=Limits(
            a.max_chunk_bytes,
            a.max_tensor_bytes,
            a.max_submission_bytes,
            a.max_streams_per_party,
            a.max_parties,
            a.max_inflight_uploads,
        ),
        port_file=a.port_file,
        keep_serving=a.keep_serving,
        init_model=a.init_model,
        resume=a.resume is not None,
        validator=a.validator,
    )
    return serve(cfg)


# ---------------------------------------------------------------------- client
def _client_parser(sub: Any) -> None:
    p = sub.add_parser("client", help="run a party (client stub)")
    p.add_argument("--server", required=True, help="aggregator HOST:PORT")
    p.add_argument("--party-id", required=True)
    p.add_argument("--data", required=True, help="digits, mnist:DIR, npz:FILE, mod:fn")
    p.add_argument(
        "--rpc-timeout", type=float, default=60.0, help="deadline per call (s)"
    )
    p.add_argument(
        "--connect-timeout",
        type=float,
        default=300.0,
        help="give up after this long without reaching the aggregator (s)",
    )
    p.add_argument(
        "--attack", default="", help="simulated update attack (evaluation only)"
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    _add_tls_client_options(p)
    p.set_defaults(func=_cmd_client)


def _cmd_client(a: argparse.Namespace) -> int:
    from fedgrpc.client.party import run_party

    result = run_party(_client_config(a, a.party_id, a.data))
    print(
        json.dumps(
            {
                "party_id": a.party_id,
                "rounds_submitted": result.rounds_submitted,
                "rounds_completed": result.rounds_completed,
                "reason": result.reason,
                "train_loss": result.last_train_loss,
            }
        )
    )
    return 0 if result.reason == "completed" else 1


# ----------------------------------------------------------------------- split
def _prepare(a: argparse.Namespace) -> tuple[dict[str, Any], Any, dict[str, Any]]:
    from fedgrpc.datasets.attacks import parse_assignments
    from fedgrpc.datasets.sources import load_dataset
    from fedgrpc.evaluation import prepare_parties

    attacks = parse_assignments(a.attack)
    holdout = a.val_holdout or max(1, len(load_dataset(a.data)) // 5)
    parties, val = prepare_parties(
        a.data, a.parties, a.partition, holdout, attacks, a.seed, a.train_count
    )
    by_id: dict[str, Any] = {}
    for key, att in attacks.items():
        pid = key if key.startswith("party-") else f"party-{key}"
        by_id[pid] = att
    return parties, val, by_id


def _split_parser(sub: Any) -> None:
    p = sub.add_parser(
        "split", help="write each party's partition and the validation set"
    )
    add_data_options(p, parties=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.set_defaults(func=_cmd_split)


def write_split(
    out: Path,
    a: argparse.Namespace,
    parties: dict[str, Any],
    val: Any,
    attacks: dict[str, Any],
) -> dict[str, Any]:
    """Write each party's .npz, the validation set and manifest.json.

    The manifest records data, partition, seed and each party's attack, so that an
    evaluation can be reproduced.
    """
    from fedgrpc.datasets.sources import save_npz

    out.mkdir(parents=True, exist_ok=True)
    manifest: dict[str, Any] = {
        "data": a.data,
        "partition": a.partition,
        "seed": a.seed,
        "validation": {"file": "val.npz", "samples": len(val)},
        "parties": [],
    }
    save_npz(out / "val.npz", val)
    for pid, ds in parties.items():
        save_npz(out / f"{pid}.npz", ds)
        att = attacks.get(pid)
        manifest["parties"].append(
            {
                "party_id": pid,
                "file": f"{pid}.npz",
                "samples": len(ds),
                "attack": att.spec if att else "",
            }
        )
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _cmd_split(a: argparse.Namespace) -> int:
    parties, val, attacks = _prepare(a)
    manifest = write_split(a.out, a, parties, val, attacks)
    for entry in manifest["parties"]:
        attack = f" (attack {entry['attack']})" if entry["attack"] else ""
        print(
            f"{entry['party_id']}: {entry['samples']} samples -> "
            f"{a.out / entry['file']}{attack}"
        )
    print(f"validation: {len(val)} samples -> {a.out / 'val.npz'}")
    return 0


# -------------------------------------------------------------------- simulate
def _simulate_parser(sub: Any) -> None:
    p = sub.add_parser(
        "simulate", help="aggregator + N client processes on loopback, one command"
    )
    add_data_options(p, parties=5)
    defaults = RoundConfig(
        rounds=15,
        update_kind=UpdateKind.DELTA,
        lr=0.1,
        batch_size=16,
        round_timeout_s=60.0,
        join_timeout_s=60.0,
    )
    add_training_options(p, defaults=defaults)
    p.add_argument(
        "--run-dir", type=Path, help="run directory (default runs/sim-YYYYmmdd-HHMMSS)"
    )
    p.add_argument("--timeout", type=float, default=1800.0, help="give up after (s)")
    p.add_argument("--format", choices=["table", "json"], default="table")
    p.set_defaults(func=_cmd_simulate)


def _cmd_simulate(a: argparse.Namespace) -> int:
    from fedgrpc.simulate import simulate

    return simulate(
        a, _prepare, round_config(a, min_parties=a.parties, expected=a.parties)
    )


# --------------------------------------------------------------- contributions
def _observer_parser(sub: Any, name: str, help_text: str) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = sub.add_parser(name, help=help_text)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--server", help="aggregator HOST:PORT")
    src.add_argument("--run-dir", type=Path, help="read the ledger of a run directory")
    _add_tls_client_options(p)
    return p


def _contributions_parser(sub: Any) -> None:
    p = _observer_parser(sub, "contributions", "DIG-FL contribution ledger")
    p.add_argument("--format", choices=["table", "json", "csv"], default="table")
    p.add_argument("--plot", type=Path, help="write a PNG plot of contributions")
    p.add_argument("--party", action="append", default=[], help="only these parties")
    p.add_argument("--from-round", type=int, default=0)
    p.add_argument("--to-round", type=int)
    p.set_defaults(func=_cmd_contributions)


def load_report(a: argparse.Namespace) -> Any:
    """ContributionReport from --run-dir (offline) or --server (GetContributions)."""
    if a.run_dir is not None:
        from fedgrpc.ledger import LEDGER_FILE, Ledger

        path = a.run_dir / LEDGER_FILE
        if not path.is_file():
            raise FedGrpcError(f"no ledger at {path}", code="NOT_FOUND")
        with Ledger.open_readonly(path) as ledger:
            return ledger.contributions(a.party or None, a.from_round, a.to_round)
    from fedgrpc.client.stub import AggregatorClient
    from fedgrpc.reports import report_from_proto

    with AggregatorClient(_client_config(a)) as client:
        return report_from_proto(
            client.contributions(a.party or None, a.from_round, a.to_round)
        )


def _cmd_contributions(a: argparse.Namespace) -> int:
    from fedgrpc.reports import report_csv, report_json, report_table

    report = load_report(a)
    if a.format == "json":
        print(json.dumps(report_json(report), indent=2))
    elif a.format == "csv":
        print(report_csv(report), end="")
    else:
        print(report_table(report))
    if a.plot is not None:
        from fedgrpc.plot import plot_contributions

        plot_contributions(report, a.plot)
        print(f"plot written to {a.plot}", file=sys.stderr)
    return 0


def _status_parser(sub: Any) -> None:
    p = _observer_parser(sub, "status", "progress of a run")
    p.add_argument("--format", choices=["table", "json"], default="table")
    p.set_defaults(func=_cmd_status)


def _cmd_status(a: argparse.Namespace) -> int:
    if a.run_dir is not None:
        from fedgrpc.ledger import LEDGER_FILE, Ledger

        with Ledger.open_readonly(a.run_dir / LEDGER_FILE) as ledger:
            info = ledger.run_info() or {}
            rounds = ledger.rounds()
            st: dict[str, Any] = {
                "run_id": info.get("run_id", ""),
                "rounds_done": len(rounds),
                "rounds_total": info.get("config", {}).get("round", {}).get("rounds"),
                "val_acc": rounds[-1].val_acc_after if rounds else None,
                "val_loss": rounds[-1].val_loss_after if rounds else None,
                "last_status": rounds[-1].status if rounds else None,
            }
    else:
        from google.protobuf.json_format import MessageToDict

        from fedgrpc.client.stub import AggregatorClient

        with AggregatorClient(_client_config(a)) as client:
            st = MessageToDict(
                client.status(),
                preserving_proto_field_name=True,
                always_print_fields_with_no_presence=True,
            )
    if a.format == "json":
        print(json.dumps(st, indent=2))
    else:
        for k, v in st.items():
            print(f"{k:>14}: {v}")
    return 0


# ------------------------------------------------------------- certs & parties
def _certs_parser(sub: Any) -> None:
    p = sub.add_parser("certs", help="create a CA and certificates")
    csub = p.add_subparsers(dest="certs_cmd", required=True)
    i = csub.add_parser(
        "init", help="create a CA and the aggregator's certificate in DIR"
    )
    i.add_argument("dir", type=Path)
    i.add_argument(
        "--name",
        action="append",
        default=[],
        help="server DNS name or IP (repeatable; default localhost, 127.0.0.1, ::1)",
    )
    i.add_argument("--force", action="store_true")
    i.set_defaults(func=_cmd_certs_init)
    s = csub.add_parser(
        "issue", help="issue a party certificate whose name is PARTY_ID"
    )
    s.add_argument("dir", type=Path)
    s.add_argument("party_id")
    s.set_defaults(func=_cmd_certs_issue)


def _cmd_certs_init(a: argparse.Namespace) -> int:
    from fedgrpc.security import init_ca

    names = a.name or ["localhost", "127.0.0.1", "::1"]
    for k, v in init_ca(a.dir, server_names=names, force=a.force).items():
        print(f"{k}: {v}")
    return 0


def _cmd_certs_issue(a: argparse.Namespace) -> int:
    from fedgrpc.security import issue_party_cert

    for k, v in issue_party_cert(a.dir, a.party_id).items():
        print(f"{k}: {v}")
    return 0


def _parties_parser(sub: Any) -> None:
    p = sub.add_parser("parties", help="manage the aggregator's parties file")
    psub = p.add_subparsers(dest="parties_cmd", required=True)
    add = psub.add_parser(
        "add", help="add a party (or admin) and print its new token once"
    )
    add.add_argument("file", type=Path)
    add.add_argument("party_id")
    add.add_argument("--admin", action="store_true")
    add.add_argument(
        "--token-out", type=Path, help="write the token to this file (0600)"
    )
    add.set_defaults(func=_cmd_parties_add)


def _cmd_parties_add(a: argparse.Namespace) -> int:
    from fedgrpc.security import add_party

    token = add_party(a.file, a.party_id, admin=a.admin)
    if a.token_out:
        fd = os.open(a.token_out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")
        print(f"token for {a.party_id} written to {a.token_out}")
    else:
        print(token)
    return 0


# ------------------------------------------------------------------------ main
def build_parser() -> argparse.ArgumentParser:
    """The full argument parser."""
    parser = argparse.ArgumentParser(
        prog="fedgrpc",
        description="Federated learning over gRPC with DIG-FL contributions.",
    )
    parser.add_argument("--version", action="version", version=fedgrpc.__version__)
    parser.add_argument("-v", "--verbose", action="count", default=0)
    parser.add_argument("-q", "--quiet", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    _serve_parser(sub)
    _client_parser(sub)
    _simulate_parser(sub)
    _split_parser(sub)
    _contributions_parser(sub)
    _status_parser(sub)
    _certs_parser(sub)
    _parties_parser(sub)
    from fedgrpc.evaluation_cli import add_shapley_parser

    add_shapley_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fedgrpc`` console script."""
    args = build_parser().parse_args(argv)
    # Long-running services log progress; interactive commands print their own output.
    chatty = args.command in ("serve", "client")
    if args.quiet:
        level = logging.WARNING
    elif args.verbose > 1:
        level = logging.DEBUG
    else:
        level = logging.INFO if chatty or args.verbose else logging.WARNING
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return int(args.func(args))
    except FedGrpcError as err:
        print(f"fedgrpc {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
