"""Aggregation strategies: rules and server optimisers, pure NumPy (docs/strategies.md).

A strategy is an :class:`AggregationRule` (how a round's updates combine, and each
party's part of the result) and a :class:`ServerOptimiser` (how the aggregate becomes
the server's step). The engine applies them and scores every party by the
first-order drop of its part of the applied step. ``--strategy package.module:factory``
names a user's own; the built-ins below use the same protocol.
"""

from fedgrpc.strategies.base import (
    AggregationRule,
    ServerOptimiser,
    Strategy,
    UpdateInfo,
)
from fedgrpc.strategies.optimisers import SGD, Adaptive, AvgM
from fedgrpc.strategies.registry import build_strategy
from fedgrpc.strategies.rules import (
    CoordinateMedian,
    MultiKrum,
    SampleWeighted,
    TrimmedMean,
    Uniform,
    ValidationTrust,
)

__all__ = [
    "SGD",
    "Adaptive",
    "AggregationRule",
    "AvgM",
    "CoordinateMedian",
    "MultiKrum",
    "SampleWeighted",
    "ServerOptimiser",
    "Strategy",
    "TrimmedMean",
    "Uniform",
    "UpdateInfo",
    "ValidationTrust",
    "build_strategy",
]
