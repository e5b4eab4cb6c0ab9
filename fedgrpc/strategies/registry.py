"""The strategy a run uses, built from its configuration (or a user's factory)."""

from __future__ import annotations

from fedgrpc.config import RoundConfig
from fedgrpc.errors import ConfigError
from fedgrpc.factories import load_factory
from fedgrpc.strategies.base import AggregationRule, ServerOptimiser, Strategy
from fedgrpc.strategies.optimisers import SGD, Adaptive, AvgM
from fedgrpc.strategies.rules import (
    CoordinateMedian,
    MultiKrum,
    SampleWeighted,
    TrimmedMean,
    Uniform,
    ValidationTrust,
)

DEFAULT_OPT_LR = {"avgm": 1.0, "adagrad": 0.03, "adam": 0.03, "yogi": 0.03}
"""eta_s when ``server_opt_lr`` is 0 (chosen by scripts/bench_strategies.py)."""

FLOWER_NAMES = {
    "FedAvg": "--aggregation samples (with --update-kind delta)",
    "FedSGD": "--aggregation samples (with --update-kind gradient)",
    "FedAvgM": "--server-opt avgm",
    "FedAdagrad": "--server-opt adagrad",
    "FedAdam": "--server-opt adam",
    "FedYogi": "--server-opt yogi",
    "FedProx": "--prox-mu MU (with --update-kind delta)",
    "FedMedian": "--aggregation median",
    "FedTrimmedAvg": "--aggregation trimmed-mean --trim-beta B",
    "Krum / MultiKrum": "--aggregation krum --krum-f F [--krum-m M]",
    "FLTrust": "--aggregation fltrust",
    "FedBuff": "--buffer-size K [--max-staleness S]",
}
"""Where a Flower (or NVFlare) user finds each strategy (docs/strategies.md)."""


def build_rule(cfg: RoundConfig) -> AggregationRule:
    """The built-in rule named by ``cfg.aggregation`` (``digfl`` included)."""
    name = cfg.aggregation
    if name in ("samples", "digfl"):
        return SampleWeighted()
    if name == "uniform":
        return Uniform()
    if name == "median":
        return CoordinateMedian()
    if name == "trimmed-mean":
        return TrimmedMean(cfg.trim_beta)
    if name == "krum":
        return MultiKrum(cfg.krum_f, cfg.krum_m)
    if name == "fltrust":
        return ValidationTrust()
    raise ConfigError(f"unknown aggregation {name!r}")


def build_optimiser(cfg: RoundConfig) -> ServerOptimiser:
    """The built-in server optimiser named by ``cfg.server_opt``."""
    name = cfg.server_opt
    if name == "sgd":
        return SGD()
    lr = cfg.server_opt_lr or DEFAULT_OPT_LR[name]
    if name == "avgm":
        return AvgM(lr=lr, beta=cfg.server_beta1)
    beta1 = cfg.server_beta1
    return Adaptive(
        lr=lr, beta=beta1, kind=name, beta2=cfg.server_beta2, tau=cfg.server_tau
    )


def build_strategy(cfg: RoundConfig) -> Strategy:
    """The run's strategy: ``cfg.strategy``'s factory, or the built-in one.

    A factory is called with the RoundConfig and must return a
    :class:`~fedgrpc.strategies.base.Strategy` (its rule and optimiser may be built-in
    ones: fedgrpc.strategies exports them).

    Raises:
        ConfigError: the factory cannot be loaded, fails, or returns something else.
    """
    if not cfg.strategy:
        return Strategy(build_rule(cfg), build_optimiser(cfg))
    factory = load_factory(cfg.strategy)
    try:
        made = factory(cfg)
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(f"strategy {cfg.strategy!r} failed: {e}") from e
    if not isinstance(made, Strategy):
        raise ConfigError(
            f"strategy {cfg.strategy!r} returned a {type(made).__name__}, not a "
            "fedgrpc.strategies.Strategy"
        )
    for part, proto in (
        (made.rule, AggregationRule),
        (made.optimiser, ServerOptimiser),
    ):
        if not isinstance(part, proto):
            raise ConfigError(
                f"strategy {cfg.strategy!r}: its {proto.__name__} "
                f"({type(part).__name__}) lacks part of the protocol"
            )
    return made
