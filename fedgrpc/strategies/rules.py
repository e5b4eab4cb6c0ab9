"""Built-in aggregation rules (pure NumPy; see :mod:`fedgrpc.strategies.base`).

Memory: ``samples`` and ``uniform`` fold each update as it arrives (O(model)). The
others decide at the close, from every update of the round: the updates are read back
from the spill (disk, parties x model) in blocks, so RAM stays O(model + parties x
block). ``krum`` reads the round twice (distances, then the fold); ``fltrust`` and
``digfl-trust`` need only what each upload already measured (<v_t, u_i>, ||u_i||).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from fedgrpc.errors import ConfigError
from fedgrpc.strategies.base import F32, F64, UpdateInfo

log = logging.getLogger(__name__)


def _normalised(raw: dict[str, float]) -> dict[str, float]:
    total = sum(raw.values())
    if not total > 0.0:
        return dict.fromkeys(raw, 0.0)
    return {p: w / total for p, w in raw.items()}


class _Linear:
    linear = True
    needs_distances = False

    def combine_block(self, block: F32) -> F32:  # pragma: no cover - not called
        raise TypeError(f"{self} is linear: it has weights, not blocks")


@dataclass(frozen=True)
class SampleWeighted(_Linear):
    """FedAvg / FedSGD: p_i = n_i / sum_j n_j (counts capped, DESIGN §4)."""

    name: str = "samples"

    def fixed_weight(self, samples: int, weight_ref: float) -> float | None:
        """n_i over the joined total: known as the upload starts."""
        return samples / weight_ref

    def weights(
        self, infos: Sequence[UpdateInfo], distances: F64 | None, v_norm: float
    ) -> dict[str, float]:
        """Sample-proportional weights."""
        return _normalised({u.party: float(u.samples) for u in infos})


@dataclass(frozen=True)
class Uniform(_Linear):
    """p_i = 1/n."""

    name: str = "uniform"

    def fixed_weight(self, samples: int, weight_ref: float) -> float | None:
        """1 for everyone."""
        return 1.0

    def weights(
        self, infos: Sequence[UpdateInfo], distances: F64 | None, v_norm: float
    ) -> dict[str, float]:
        """Equal weights."""
        return _normalised({u.party: 1.0 for u in infos})


@dataclass(frozen=True)
class MultiKrum(_Linear):
    """Multi-Krum (Blanchard et al. 2017): the mean of the m most central updates.

    Each update's Krum score is the sum of its squared distances to its n - f - 2
    nearest neighbours (f = the Byzantine parties tolerated); the m lowest scores
    (ties: party id) are averaged with equal weights. Krum needs n >= f + 3: a
    round with fewer updates tolerates only f' = n - 3 of them (and averages every
    update when n <= 2), so small coalitions (``fedgrpc shapley``) still have a value.
    """

    f: int = 1
    m: int = 0  # 0: n - f
    name: str = "krum"
    needs_distances: bool = True

    def __post_init__(self) -> None:
        if self.f < 0 or self.m < 0:
            raise ConfigError(f"krum f and m must be >= 0, got f={self.f} m={self.m}")

    def fixed_weight(self, samples: int, weight_ref: float) -> float | None:
        """Decided at the close."""
        return None

    def weights(
        self, infos: Sequence[UpdateInfo], distances: F64 | None, v_norm: float
    ) -> dict[str, float]:
        """1/m for the m selected updates, 0 for the others."""
        n = len(infos)
        if distances is None or distances.shape != (n, n):
            raise ValueError("krum needs the (n, n) pairwise distances")
        f = max(0, min(self.f, n - 3))
        if f < self.f:
            log.warning(
                "krum: %d updates tolerate only f=%d of the f=%d asked (n >= f + 3)",
                n,
                f,
                self.f,
            )
        if n <= 2:
            return {u.party: 1.0 / n for u in infos}
        k = n - f - 2
        scores = []
        for i, info in enumerate(infos):
            others = np.delete(distances[i], i)
            scores.append((float(np.sort(others)[:k].sum()), info.party))
        m = self.m or n - f
        chosen = {p for _, p in sorted(scores)[: min(m, n)]}
        return {
            u.party: (1.0 / len(chosen) if u.party in chosen else 0.0) for u in infos
        }


@dataclass(frozen=True)
class ValidationTrust(_Linear):
    """Trust from the server's own validation gradient, in the spirit of FLTrust.

    FLTrust (Cao et al. 2021) trusts an update by the positive part of its cosine with
    an update the server computes on clean data. Here that reference is v_t, which
    the server has anyway for scoring: TS_i = max(0, cos(u_i, v_t)), and
    p_i = TS_i n_i / sum_j TS_j n_j. Every update is already norm-bounded (f_i), so
    FLTrust's own rescaling to the reference's norm is left to the bound. An update
    pointing away from descent on the validation data gets weight 0; when none
    points towards it, the round makes no step.
    """

    name: str = "fltrust"

    def fixed_weight(self, samples: int, weight_ref: float) -> float | None:
        """Decided at the close (the cosines need the whole update)."""
        return None

    def weights(
        self, infos: Sequence[UpdateInfo], distances: F64 | None, v_norm: float
    ) -> dict[str, float]:
        """Trust-weighted sample weights."""
        raw = {}
        for u in infos:
            cos = u.dot / (u.norm * v_norm) if u.norm > 0 and v_norm > 0 else 0.0
            raw[u.party] = max(0.0, cos) * u.samples if math.isfinite(cos) else 0.0
        return _normalised(raw)


@dataclass(frozen=True)
class CoordinateMedian:
    """Coordinate-wise median (Yin et al. 2018).

    Coordinate j of the aggregate is the median of the n values there. Its part goes
    to the parties whose values it is made of: for odd n the middle value, for even n
    half to each of the two middle values; parties tied at a used value share that
    value's part equally (so all-equal inputs split evenly).
    """

    name: str = "median"
    linear: bool = False
    needs_distances: bool = False

    def fixed_weight(self, samples: int, weight_ref: float) -> float | None:
        """Decided at the close."""
        return None

    def weights(
        self, infos: Sequence[UpdateInfo], distances: F64 | None, v_norm: float
    ) -> dict[str, float]:  # pragma: no cover - not called
        """Not linear: see :meth:`combine_block`."""
        raise TypeError("median is coordinate-wise: it has blocks, not weights")

    def combine_block(self, block: F32) -> F32:
        """Median parts of (n, b) values."""
        n = block.shape[0]
        s = np.sort(block, axis=0)
        lo, hi = s[(n - 1) // 2], s[n // 2]
        return _used_values(block, [(lo, 0.5), (hi, 0.5)]).astype(np.float32)


@dataclass(frozen=True)
class TrimmedMean:
    """Coordinate-wise trimmed mean: drop the k = floor(beta n) smallest and largest.

    Coordinate j is the mean of the n - 2k middle values; each kept value carries
    1/(n - 2k) of it. Parties tied at a trimming boundary share the kept copies of
    that value equally.
    """

    beta: float = 0.1
    name: str = "trimmed-mean"
    linear: bool = False
    needs_distances: bool = False

    def __post_init__(self) -> None:
        if not 0.0 <= self.beta < 0.5:
            raise ConfigError(f"trimmed-mean beta must be in [0, 0.5), got {self.beta}")

    def fixed_weight(self, samples: int, weight_ref: float) -> float | None:
        """Decided at the close."""
        return None

    def weights(
        self, infos: Sequence[UpdateInfo], distances: F64 | None, v_norm: float
    ) -> dict[str, float]:  # pragma: no cover - not called
        """Not linear: see :meth:`combine_block`."""
        raise TypeError("trimmed-mean is coordinate-wise: it has blocks, not weights")

    def trimmed(self, n: int) -> int:
        """k: values dropped at each end for n updates."""
        return math.floor(self.beta * n + 1e-9)  # 0.29 * 100 is 28.99...

    def combine_block(self, block: F32) -> F32:
        """Trimmed-mean parts of (n, b) values."""
        n = block.shape[0]
        k = self.trimmed(n)
        kept = n - 2 * k
        s = np.sort(block, axis=0)
        lo, hi = s[k], s[n - k - 1]
        window = s[k : n - k]
        inside = (block > lo) & (block < hi)
        parts = np.where(inside, block.astype(np.float64) / kept, 0.0)
        # Boundary values: of all the copies of lo (hi), the kept ones are used.
        w_lo = (window == lo).sum(axis=0) / kept
        w_hi = np.where(lo == hi, 0.0, (window == hi).sum(axis=0) / kept)
        return (parts + _used_values(block, [(lo, w_lo), (hi, w_hi)])).astype(
            np.float32
        )


def _used_values(
    block: F32, used: list[tuple[F32, float | npt.NDArray[np.float64]]]
) -> F64:
    """Parts of (n, b) ``block`` for an aggregate sum_k w_k value_k (per column).

    Each value_k's weight w_k (a scalar or one per column) is split equally over
    the rows equal to it; a value listed twice (lo == hi) gets both weights.
    """
    parts = np.zeros(block.shape, dtype=np.float64)
    for value, w in used:
        same = block == value
        copies = same.sum(axis=0)
        share = np.divide(w, copies, out=np.zeros(copies.shape), where=copies > 0)
        parts += np.where(same, block * share, 0.0)
    return parts
