from __future__ import annotations

from typing import Any

import pytest

from fedgrpc.cli.main import main
from fedgrpc.config import RoundConfig, round_config_from_json, round_config_to_json
from fedgrpc.errors import ConfigError
from fedgrpc.types import UpdateKind

DELTA = UpdateKind.DELTA


def test_config_local_optimiser_defaults_are_off() -> None:
    cfg = RoundConfig()

    assert (cfg.momentum, cfg.weight_decay, cfg.prox_mu) == (0.0, 0.0, 0.0)


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("momentum", -0.5, "--momentum must be a finite number >= 0, got -0.5"),
        ("momentum", 1.0, r"--momentum must lie in \[0, 1\), got 1.0"),
        ("momentum", float("nan"), "--momentum must be a finite number >= 0"),
        ("weight_decay", -1e-4, "--weight-decay must be a finite number >= 0"),
        ("weight_decay", float("inf"), "--weight-decay must be a finite number"),
        ("prox_mu", -2.0, "--prox-mu must be a finite number >= 0, got -2.0"),
        ("prox_mu", float("-inf"), "--prox-mu must be a finite number"),
    ],
)
def test_config_bad_local_optimiser_value_refused(
    field: str, value: float, match: str
) -> None:
    kwargs: dict[str, Any] = {field: value}

    with pytest.raises(ConfigError, match=match):
        RoundConfig(update_kind=DELTA, **kwargs)


@pytest.mark.parametrize(
    ("field", "option"),
    [
        ("momentum", "--momentum"),
        ("weight_decay", "--weight-decay"),
        ("prox_mu", "--prox-mu"),
    ],
)
def test_config_local_optimiser_with_gradient_updates_refused(
    field: str, option: str
) -> None:
    kwargs: dict[str, Any] = {field: 0.5}

    with pytest.raises(ConfigError, match=f"^{option} needs --update-kind delta$"):
        RoundConfig(update_kind=UpdateKind.GRADIENT, **kwargs)


def test_config_local_optimiser_round_trips_through_json() -> None:
    cfg = RoundConfig(update_kind=DELTA, momentum=0.9, weight_decay=1e-3, prox_mu=0.1)

    back = round_config_from_json(round_config_to_json(cfg))

    assert back == cfg


def test_config_json_of_an_older_run_has_the_optimiser_off() -> None:
    old = round_config_to_json(RoundConfig(update_kind=DELTA))
    for key in ("momentum", "weight_decay", "prox_mu"):
        del old[key]

    back = round_config_from_json(old)

    assert back == RoundConfig(update_kind=DELTA)


@pytest.mark.parametrize("command", ["serve", "simulate", "shapley"])
def test_config_cli_momentum_without_delta_fails_at_start(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [command, "--update-kind", "gradient", "--momentum", "0.9"]
    if command == "serve":
        argv.append("--insecure")

    rc = main(argv)

    assert rc == 2
    assert "--momentum needs --update-kind delta" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["serve", "simulate", "shapley"])
def test_config_cli_negative_prox_mu_fails_at_start(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [command, "--update-kind", "delta", "--prox-mu", "-0.1"]
    if command == "serve":
        argv.append("--insecure")

    rc = main(argv)

    assert rc == 2
    assert "--prox-mu must be a finite number >= 0, got -0.1" in capsys.readouterr().err


def test_config_cli_options_reach_the_round_config() -> None:
    from fedgrpc.cli.main import build_parser
    from fedgrpc.cli.options import round_config

    a = build_parser().parse_args(
        ["simulate", "--momentum", "0.5", "--weight-decay", "0.01", "--prox-mu", "2"]
    )

    cfg = round_config(a, min_parties=2, expected=2)
    assert (cfg.momentum, cfg.weight_decay, cfg.prox_mu) == (0.5, 0.01, 2.0)
