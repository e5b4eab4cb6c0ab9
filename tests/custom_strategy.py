"""A user's strategy for the ``--strategy package.module:factory`` tests.

Geometric-median-free "keep the k smallest updates" rule: a linear rule that averages
the updates whose norms are at most the round's median, stepped by FedAvgM.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from fedgrpc.config import RoundConfig
from fedgrpc.strategies import AvgM, Strategy, UpdateInfo
from fedgrpc.strategies.base import F64


@dataclass(frozen=True)
class SmallHalf:
    """p_i = 1/k over the k updates with the smallest bounded norms (k = ceil(n/2))."""

    name: str = "small-half"
    linear: bool = True
    needs_distances: bool = False

    def fixed_weight(self, samples: int, weight_ref: float) -> float | None:
        return None

    def weights(
        self, infos: Sequence[UpdateInfo], distances: F64 | None, v_norm: float
    ) -> dict[str, float]:
        k = (len(infos) + 1) // 2
        keep = {
            u.party
            for u in sorted(infos, key=lambda u: (u.norm * u.factor, u.party))[:k]
        }
        return {u.party: (1.0 / k if u.party in keep else 0.0) for u in infos}

    def combine_block(self, block):  # type: ignore[no-untyped-def]
        raise TypeError("linear")


def make(cfg: RoundConfig) -> Strategy:
    """The factory ``--strategy tests.custom_strategy:make`` names."""
    return Strategy(SmallHalf(), AvgM(lr=1.0, beta=0.5))


def not_a_strategy(cfg: RoundConfig) -> object:
    """A factory returning the wrong thing."""
    return 42
