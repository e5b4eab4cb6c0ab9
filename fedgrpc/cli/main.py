"""`fedgrpc serve|client|simulate|split|contributions|status|certs|parties|shapley`.

The only place that reads argv: each command module adds its parser and builds typed
configs from the parsed options. Building the parser imports no torch, scikit-learn,
matplotlib or grpc: each command imports what it needs when it runs.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

import fedgrpc
from fedgrpc.cli import (
    admin,
    configfile,
    dashboard,
    data,
    export,
    observe,
    run,
    shapley,
    simulate,
)
from fedgrpc.errors import FedGrpcError

log = logging.getLogger("fedgrpc")

COMMANDS = (run, simulate, data, observe, dashboard, admin, shapley, export, configfile)
"""Command modules, in help order; each has ``add_parsers(subparsers)``."""


class HelpFormatter(argparse.HelpFormatter):
    """Shows every option's default after its help text."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            "%(default)" in text
            or default is None
            or default is argparse.SUPPRESS
            or isinstance(default, bool)
            or action.nargs == 0
            or not action.option_strings
        ):
            return text
        if isinstance(default, list | tuple) and not default:
            return text
        return f"{text} (default: %(default)s)"


def _add_verbosity(parser: argparse.ArgumentParser, *, top: bool) -> None:
    # SUPPRESS below the top level: a subcommand's unset option must not overwrite
    # the value given before the command (``fedgrpc -q simulate``).
    parser.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0 if top else argparse.SUPPRESS,
        help="more log output (-vv: debug)",
    )
    parser.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        default=False if top else argparse.SUPPRESS,
        help="only warnings, errors and the command's result (no progress lines)",
    )


def _leaf_parsers(
    parser: argparse.ArgumentParser,
) -> list[argparse.ArgumentParser]:
    """Every parser below ``parser`` that runs a command (has no subcommands)."""
    subs = [
        a
        for a in parser._actions  # argparse keeps no public list of subparsers
        if isinstance(a, argparse._SubParsersAction)
    ]
    if not subs:
        return [parser]
    return [leaf for s in subs for p in s.choices.values() for leaf in _leaf_parsers(p)]


def all_parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """``parser`` and every parser below it."""
    out = [parser]
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            for p in a.choices.values():
                out += all_parsers(p)
    return out


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser."""
    parser = argparse.ArgumentParser(
        prog="fedgrpc",
        description="Federated learning over gRPC with DIG-FL contributions.",
    )
    parser.add_argument("--version", action="version", version=fedgrpc.__version__)
    _add_verbosity(parser, top=True)
    sub = parser.add_subparsers(dest="command", required=True)
    for module in COMMANDS:
        module.add_parsers(sub)
    for name in configfile.CONFIG_COMMANDS:
        command = configfile.command_parser(parser, name)
        assert command is not None
        configfile.add_config_option(command)
    configfile.bind_parser_builder(parser, build_parser)
    for leaf in _leaf_parsers(parser):
        _add_verbosity(leaf, top=False)
    for p in all_parsers(parser):
        p.formatter_class = HelpFormatter
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse ``argv`` (default ``sys.argv[1:]``), a ``--config`` file included.

    Raises:
        ConfigError: the config file is unreadable or has a bad key or value.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    configfile.apply_config_file(parser, argv)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fedgrpc`` console script."""
    try:
        args = parse_args(argv)
    except FedGrpcError as err:
        print(f"fedgrpc: error: {err}", file=sys.stderr)
        return 2
    # gRPC's C core logs INFO lines (``I1201 ... ssl_transport_security.cc``) to
    # stderr by default, mixed into ours; its errors reach us as status codes
    # anyway. Set before grpc is imported; an explicit GRPC_VERBOSITY wins, and the
    # processes we start inherit it.
    os.environ.setdefault("GRPC_VERBOSITY", "INFO" if args.verbose > 1 else "ERROR")
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
    except BrokenPipeError:  # `fedgrpc ... | head`: the reader has gone
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # no second error at exit's flush
        return 141


if __name__ == "__main__":
    raise SystemExit(main())
