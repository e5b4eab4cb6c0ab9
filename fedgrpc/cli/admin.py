"""``fedgrpc certs init|issue`` and ``fedgrpc parties add``: identities of a run."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def add_parsers(sub: Any) -> None:
    """Add ``certs`` and ``parties``."""
    p = sub.add_parser("certs", help="create a CA and certificates")
    csub = p.add_subparsers(dest="certs_cmd", required=True)
    i = csub.add_parser(
        "init", help="create a CA and the aggregator's certificate in DIR"
    )
    i.add_argument("dir", type=Path, help="directory for the CA (created 0700)")
    i.add_argument(
        "--name",
        action="append",
        default=[],
        help="a DNS name or IP address the aggregator is reached by (repeatable); "
        "added to localhost, 127.0.0.1 and ::1, the first --name becomes the CN",
    )
    i.add_argument(
        "--no-default-names",
        action="store_true",
        help="do not add localhost, 127.0.0.1 and ::1 (needs --name)",
    )
    i.add_argument(
        "--force",
        action="store_true",
        help="replace an existing CA; every certificate in DIR/parties/ is re-issued "
        "by the new CA (ship the new files to their owners)",
    )
    i.add_argument(
        "--format",
        choices=["text", "json"],
        default="text",
        help="text (one line per item) or json",
    )
    i.set_defaults(func=_cmd_certs_init)
    s = csub.add_parser(
        "issue", help="issue a party certificate whose name is PARTY_ID"
    )
    s.add_argument("dir", type=Path, help="the CA directory made by certs init")
    s.add_argument("party_id", help="the certificate's name (party or admin id)")
    s.add_argument(
        "--force",
        action="store_true",
        help="replace this party's existing certificate and key",
    )
    s.add_argument(
        "--format",
        choices=["text", "json"],
        default="text",
        help="text (one line per item) or json",
    )
    s.set_defaults(func=_cmd_certs_issue)

    b = sub.add_parser(
        "backup",
        help="consistent online copy of a run directory (ledger via SQLite's backup "
        "API, then the checkpoint it points to and the final model)",
    )
    b.add_argument("run_dir", type=Path, help="the run directory to copy")
    b.add_argument("dest", type=Path, help="where to write the copy (a new directory)")
    b.set_defaults(func=_cmd_backup)

    p = sub.add_parser("parties", help="manage the aggregator's parties file")
    psub = p.add_subparsers(dest="parties_cmd", required=True)
    add = psub.add_parser(
        "add", help="add a party (or admin) and print its new token once"
    )
    add.add_argument(
        "file", type=Path, help="the parties file (TOML; created if missing)"
    )
    add.add_argument("party_id", help="the new party's (or admin's) id")
    add.add_argument(
        "--admin",
        action="store_true",
        help="an admin (reads every party's contributions) instead of a party",
    )
    add.add_argument(
        "--token-out", type=Path, help="write the token to this file (0600)"
    )
    add.add_argument(
        "--format",
        choices=["text", "json"],
        default="text",
        help="text (one line per item) or json",
    )
    add.set_defaults(func=_cmd_parties_add)
    rm = psub.add_parser(
        "remove", help="remove a party (or admin) from the parties file"
    )
    rm.add_argument("file", type=Path, help="the parties file (TOML)")
    rm.add_argument("party_id", help="the party's (or admin's) id")
    rm.add_argument(
        "--admin", action="store_true", help="remove an admin instead of a party"
    )
    rm.set_defaults(func=_cmd_parties_remove)
    ev = psub.add_parser(
        "evict",
        help="bar party ids from a run (stop the aggregator first; takes effect "
        "at --resume): they leave the registry and cannot join again",
    )
    ev.add_argument("run_dir", type=Path, help="the stopped run's directory")
    ev.add_argument("party_ids", nargs="+", help="the ids to bar")
    ev.set_defaults(func=_cmd_parties_evict)


def _cmd_certs_init(a: argparse.Namespace) -> int:
    from fedgrpc.errors import ConfigError
    from fedgrpc.security.pki import (
        DEFAULT_SERVER_NAMES,
        init_ca,
        issue_party_cert,
        issued_party_ids,
    )

    if a.no_default_names and not a.name:
        raise ConfigError("--no-default-names needs at least one --name")
    defaults = [] if a.no_default_names else list(DEFAULT_SERVER_NAMES)
    names = list(dict.fromkeys([*a.name, *defaults]))  # first --name is the CN
    reissue = issued_party_ids(a.dir) if a.force else []
    paths = init_ca(a.dir, server_names=names, force=a.force)
    reissued = [issue_party_cert(a.dir, p, force=True) for p in reissue]
    if a.format == "json":
        doc = {k: str(v) for k, v in paths.items()}
        print(
            json.dumps(
                {
                    **doc,
                    "server_names": names,
                    "reissued": [{k: str(v) for k, v in r.items()} for r in reissued],
                },
                indent=2,
            )
        )
        return 0
    for k, v in paths.items():
        print(f"{k}: {v}")
    print(f"server names: {', '.join(names)}")
    for r in reissued:
        print(f"re-issued by the new CA: {r['cert']} {r['key']}")
    return 0


def _cmd_certs_issue(a: argparse.Namespace) -> int:
    from fedgrpc.security.pki import issue_party_cert

    paths = issue_party_cert(a.dir, a.party_id, force=a.force)
    if a.format == "json":
        print(json.dumps({k: str(v) for k, v in paths.items()}, indent=2))
        return 0
    for k, v in paths.items():
        print(f"{k}: {v}")
    return 0


def _cmd_parties_add(a: argparse.Namespace) -> int:
    from fedgrpc.security.registry import add_party
    from fedgrpc.store.files import atomic_write

    token = add_party(a.file, a.party_id, admin=a.admin)
    if a.token_out:
        atomic_write(a.token_out, (token + "\n").encode(), mode=0o600)
    if a.format == "json":
        doc = {"id": a.party_id, "admin": a.admin, "parties_file": str(a.file)}
        if a.token_out:
            doc["token_file"] = str(a.token_out)
        else:
            doc["token"] = token
        print(json.dumps(doc, indent=2))
    elif a.token_out:
        print(f"token for {a.party_id} written to {a.token_out}")
    else:
        print(token)
    return 0


def _cmd_parties_remove(a: argparse.Namespace) -> int:
    from fedgrpc.security.registry import remove_party

    remove_party(a.file, a.party_id, admin=a.admin)
    print(f"removed {'admin' if a.admin else 'party'} {a.party_id} from {a.file}")
    return 0


def _cmd_parties_evict(a: argparse.Namespace) -> int:
    from fedgrpc.errors import ConfigError
    from fedgrpc.store.ledger import Ledger
    from fedgrpc.store.run_dir import RunDir

    path = RunDir(a.run_dir).ledger_path
    if not path.is_file():
        raise ConfigError(f"no run in {a.run_dir} (no {path.name})")
    with Ledger(path) as ledger:
        found = ledger.evict_parties(a.party_ids)
    for pid in a.party_ids:
        what = "evicted" if pid in found else "barred (was not registered)"
        print(f"{pid}: {what}")
    return 0


def _cmd_backup(a: argparse.Namespace) -> int:
    from fedgrpc.errors import ConfigError
    from fedgrpc.store.ledger import Ledger
    from fedgrpc.store.run_dir import RunDir

    run = RunDir(a.run_dir)
    if not run.ledger_path.is_file():
        raise ConfigError(f"no run in {a.run_dir} (no {run.ledger_path.name})")
    with Ledger.open_readonly(run.ledger_path) as ledger:  # the run may be live
        written = run.backup(ledger, a.dest)
    for path in written:
        print(path)
    return 0
