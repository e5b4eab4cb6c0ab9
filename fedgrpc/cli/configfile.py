"""``--config run.toml`` for ``serve``, ``client``, ``simulate``; ``config show``.

A config file holds the same keys as the command's long options, without the dashes
(``rounds = 30``, ``update-kind = "delta"``; ``update_kind`` works too). Values keep
their TOML types: numbers, strings, booleans for switches (``insecure = true``) and
arrays for repeatable options (``attack = ["3=label-flip:0.6"]``). Options given on
the command line override the file; a key that is not an option of the command is an
error naming it. ``fedgrpc config show COMMAND [--config FILE] [OPTIONS]`` prints the
effective configuration as TOML, each value with where it came from.
"""

from __future__ import annotations

import argparse
import json
import tomllib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fedgrpc.errors import ConfigError

CONFIG_COMMANDS = ("serve", "client", "simulate")
"""Commands that take ``--config``."""
_NOT_KEYS = {"help", "config", "verbose", "quiet"}
_UNSET = object()


def add_config_option(p: argparse.ArgumentParser) -> None:
    """``--config FILE`` (read before the other options; see the module docstring)."""
    p.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="TOML file with the same keys as the long options (flags override it; "
        "`fedgrpc config show` prints the result)",
    )


def _keyed_actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Config key -> the option's action, for every long option of ``parser``."""
    out: dict[str, argparse.Action] = {}
    for a in parser._actions:  # argparse has no public list of a parser's actions
        longs = [o for o in a.option_strings if o.startswith("--")]
        if not longs:
            continue
        key = longs[0][2:]
        if key not in _NOT_KEYS:
            out[key] = a
    return out


def _convert(key: str, action: argparse.Action, value: Any, path: Path) -> Any:
    """A TOML value as the option would have parsed it; ConfigError if it cannot."""
    where = f"{path}: key {key!r}"
    if action.nargs == 0:  # switches: store_true
        if not isinstance(value, bool):
            raise ConfigError(f"{where} is a switch: use true or false, not {value!r}")
        return value
    if isinstance(action, argparse._AppendAction):
        if not isinstance(value, list):
            raise ConfigError(f"{where} is repeatable: give an array, e.g. [{value!r}]")
        return [_one(where, action, v) for v in value]
    return _one(where, action, value)


def _one(where: str, action: argparse.Action, value: Any) -> Any:
    if isinstance(value, dict | list | bool):
        raise ConfigError(f"{where}: expected a single value, got {value!r}")
    kind = action.type
    if kind is int:
        if not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        converted: Any = value
    elif kind is float:
        if not isinstance(value, int | float):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        converted = float(value)
    elif not isinstance(value, str):
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    elif callable(kind):
        try:
            converted = kind(value)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"{where}: bad value {value!r} ({err})") from None
    else:
        converted = value
    if action.choices is not None and converted not in action.choices:
        allowed = ", ".join(map(str, action.choices))
        raise ConfigError(f"{where}: {converted!r} is not one of {allowed}")
    return converted


def load_config(path: Path, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """The file's values keyed by option ``dest``; ConfigError naming a bad key."""
    try:
        doc = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err.strerror}") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"config file {path} is not valid TOML: {err}") from None
    actions = _keyed_actions(parser)
    out: dict[str, Any] = {}
    for raw_key, value in doc.items():
        key = raw_key.replace("_", "-")
        action = actions.get(key)
        if action is None:
            raise ConfigError(
                f"{path}: unknown key {raw_key!r} for `{parser.prog}` "
                f"(keys are its long options: {', '.join(sorted(actions))})"
            )
        out[action.dest] = _convert(raw_key, action, value, Path(path))
    return out


def _config_path(argv: Sequence[str]) -> Path | None:
    """The value of ``--config`` in ``argv`` (either form), if any."""
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            return Path(argv[i + 1])
        if arg.startswith("--config="):
            return Path(arg.split("=", 1)[1])
    return None


def command_parser(
    parser: argparse.ArgumentParser, command: str
) -> argparse.ArgumentParser | None:
    """The subparser of a top-level ``command``."""
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            found = a.choices.get(command)
            return found if isinstance(found, argparse.ArgumentParser) else None
    return None


def _command_of(parser: argparse.ArgumentParser, argv: Sequence[str]) -> str | None:
    names = set()
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            names = set(a.choices)
    return next((arg for arg in argv if arg in names), None)


def apply_config_file(parser: argparse.ArgumentParser, argv: Sequence[str]) -> None:
    """Make a ``--config`` file's values the defaults of its command's parser."""
    command = _command_of(parser, argv)
    if command not in CONFIG_COMMANDS:
        return
    path = _config_path(argv[list(argv).index(command) :])
    sub = command_parser(parser, command)
    if path is None or sub is None:
        return
    values = load_config(path, sub)
    for a in sub._actions:
        if a.dest not in values:
            continue
        a.required = False  # given by the file
        given = any(
            arg == o or arg.startswith(o + "=")
            for arg in argv
            for o in a.option_strings
        )
        if given and isinstance(a, argparse._AppendAction):
            del values[a.dest]  # the command line's list replaces the file's
    sub.set_defaults(**values)


def effective(
    sub: argparse.ArgumentParser, argv: Sequence[str]
) -> list[tuple[str, Any, str]]:
    """(key, value, source) of every option of ``sub`` for ``argv``.

    Source is ``command line``, ``config FILE`` or ``default``.
    """
    path = _config_path(argv)
    from_file = load_config(path, sub) if path is not None else {}
    actions = _keyed_actions(sub)
    probe = argparse.Namespace(**{a.dest: _UNSET for a in actions.values()})
    for a in actions.values():
        a.required = False  # show what is missing as "not set" instead of failing
    sub.set_defaults(**from_file)
    given = sub.parse_args(list(argv), namespace=probe)
    full = sub.parse_args(list(argv))
    out = []
    for key, a in actions.items():
        if getattr(given, a.dest) is not _UNSET:
            source = "command line"
        elif a.dest in from_file:
            source = f"config {path}"
        else:
            source = "default"
        out.append((key, getattr(full, a.dest), source))
    return out


def _toml_value(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        items = [_toml_value(v) for v in value]
        return "[" + ", ".join(i for i in items if i is not None) + "]"
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string


def show(rows: list[tuple[str, Any, str]], fmt: str) -> str:
    """The effective configuration as TOML with source comments, or as JSON."""
    if fmt == "json":
        return json.dumps(
            {
                k: {
                    "value": str(v) if isinstance(v, Path) else v,
                    "source": src,
                }
                for k, v, src in rows
            },
            indent=2,
        )
    width = max(len(k) for k, _, _ in rows)
    lines = []
    for key, value, source in rows:
        text = _toml_value(value)
        if text is None:
            lines.append(f"# {key:<{width}}   (not set)  # {source}")
        else:
            lines.append(f"{key:<{width}} = {text}  # {source}")
    return "\n".join(lines)


def add_parsers(sub: Any) -> None:
    """Add ``config show``."""
    p = sub.add_parser("config", help="the effective configuration of a command")
    csub = p.add_subparsers(dest="config_cmd", required=True)
    show_p = csub.add_parser(
        "show",
        help="print COMMAND's effective configuration (TOML) and where each value "
        "came from: command line, config file or default",
    )
    show_p.add_argument("target", choices=CONFIG_COMMANDS, help="the command")
    show_p.add_argument(
        "--format",
        choices=["toml", "json"],
        default="toml",
        help="toml (usable as a --config file) or json",
    )
    show_p.add_argument(
        "args",
        nargs=argparse.REMAINDER,
        help="the command's options as you would pass them (--config FILE ...)",
    )
    show_p.set_defaults(func=_cmd_show)


def bind_parser_builder(
    parser: argparse.ArgumentParser, build: Callable[[], argparse.ArgumentParser]
) -> None:
    """Give ``config show`` the function that builds the whole parser (no cycle)."""
    config = command_parser(parser, "config")
    assert config is not None
    for a in config._actions:
        if isinstance(a, argparse._SubParsersAction):
            a.choices["show"].set_defaults(build_parser=build)


def _cmd_show(a: argparse.Namespace) -> int:
    sub = command_parser(a.build_parser(), a.target)
    assert sub is not None
    print(show(effective(sub, a.args), a.format))
    return 0
