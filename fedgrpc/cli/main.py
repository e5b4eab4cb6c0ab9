"""`fedgrpc serve|client|simulate|split|contributions|status|certs|parties|shapley`.

The only place that reads argv: each command module adds its parser and builds typed
configs from the parsed options. Building the parser imports no torch, scikit-learn,
matplotlib or grpc: each command imports what it needs when it runs.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

import fedgrpc
from fedgrpc.cli import admin, data, observe, run, shapley, simulate
from fedgrpc.errors import FedGrpcError

log = logging.getLogger("fedgrpc")

COMMANDS = (run, simulate, data, observe, admin, shapley)
"""Command modules, in help order; each has ``add_parsers(subparsers)``."""


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
    for module in COMMANDS:
        module.add_parsers(sub)
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
