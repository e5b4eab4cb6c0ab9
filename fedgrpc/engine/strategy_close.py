"""The close of a round under a strategy that reads its updates back (DESIGN §4).

Every strategy but plain FedAvg/FedSGD with fixed weights (which folds on arrival)
decides at the close: the round's updates are read back from the spill in blocks of
coordinates, combined by the rule into parts a_{t,i}, stepped by the server optimiser,
and each party scored by the first-order drop of its part of the applied step,
phi_{t,i} = <scale_t * v_t, m_{t,i}> (:mod:`fedgrpc.strategies.base`). RAM is
O(model + parties x block), plus one model-sized vector per party with a first moment
(server momentum: the parties' own momenta, so the carry of past rounds is credited
to whoever put it there).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from fedgrpc.engine.spill import Spill
from fedgrpc.strategies import Strategy, UpdateInfo
from fedgrpc.strategies.base import F32

BLOCK = 1 << 16  # coordinates per block (parties x 256 KiB of float32 read at once)
MOMENTUM_FLOOR = 1e-6  # a party's momentum is forgotten once decayed below this factor


@dataclass
class PartyMoments:
    """Each party's share of the server optimiser's first moment, m_t = sum_i m_{t,i}.

    ``decay[p]`` is beta^(rounds since p last had a part), to forget a party whose
    share has decayed below :data:`MOMENTUM_FLOOR`.
    """

    vectors: dict[str, F32] = field(default_factory=dict)
    decay: dict[str, float] = field(default_factory=dict)

    def state(self) -> dict[str, np.ndarray]:
        """Copies for the checkpoint (``pm:<party>`` and ``pd:<party>``)."""
        out: dict[str, np.ndarray] = {}
        for p, vec in self.vectors.items():
            out[f"pm:{p}"] = vec.copy()
            out[f"pd:{p}"] = np.array([self.decay.get(p, 1.0)], np.float64)
        return out

    def load_state(self, state: Mapping[str, np.ndarray]) -> None:
        """Restore what :meth:`state` returned."""
        self.vectors = {
            k[3:]: np.array(v, np.float32) for k, v in state.items() if k[:3] == "pm:"
        }
        self.decay = {
            k[3:]: float(np.asarray(v)[0]) for k, v in state.items() if k[:3] == "pd:"
        }


@dataclass(frozen=True)
class StrategyStep:
    """What the close produced: reported weights, scores, carry and the timing."""

    weights: dict[str, float]  # linear rules: p_i s_i; coordinate rules: L1 share
    scores: dict[str, float]  # phi_{t,i} of the round's parties
    carry: dict[str, float]  # phi of absent parties' momentum in this step
    seconds: float


def close_with_strategy(
    strategy: Strategy,
    round_index: int,
    infos: Sequence[UpdateInfo],
    stale: Mapping[str, float],
    eta: float,
    v: np.ndarray,
    theta: F32,
    out: F32,
    spill: Spill,
    moments: PartyMoments,
) -> StrategyStep:
    """theta_{t+1} into ``out``, and the parties' scores, reading updates blockwise.

    ``infos`` carries each update's factor f_i = c_i s_i (``stale`` the s_i alone,
    for the reported weights).
    """
    t0 = time.perf_counter()
    rule, opt = strategy.rule, strategy.optimiser
    ids = [u.party for u in infos]
    updates = []
    for p in ids:
        u = spill.read(round_index, p)
        if u is None:
            raise RuntimeError(
                f"round {round_index}: the update of party {p} is missing from the "
                "spill; the round cannot be combined"
            )
        updates.append(u)
    factors = np.array([u.factor for u in infos], np.float32)
    size = theta.size
    v_norm = math.sqrt(float(np.dot(v.astype(np.float64), v.astype(np.float64))))

    def block_of(s: int, e: int) -> F32:
        blk = np.empty((len(ids), e - s), np.float32)
        for i, u in enumerate(updates):
            np.multiply(u[s:e], factors[i], out=blk[i])
        return blk

    distances = None
    if rule.needs_distances:
        gram = np.zeros((len(ids), len(ids)), np.float64)
        for s in range(0, size, BLOCK):
            b64 = block_of(s, min(size, s + BLOCK)).astype(np.float64)
            gram += b64 @ b64.T
        diag = np.diag(gram)
        distances = np.maximum(diag[:, None] + diag[None, :] - 2.0 * gram, 0.0)
    weights = rule.weights(infos, distances, v_norm) if rule.linear else {}
    w_vec = np.array([weights.get(p, 0.0) for p in ids], np.float32)

    opt.begin(size)
    beta, gain = float(opt.beta), float(opt.gain)
    # The parties whose momentum shares this step: the round's, and earlier ones'.
    carried = [p for p in moments.vectors if p not in set(ids)] if beta else []
    for p in ids if beta else ():
        if p not in moments.vectors:
            moments.vectors[p] = np.zeros(size, np.float32)
    scores = dict.fromkeys(ids, 0.0)
    carry = dict.fromkeys(carried, 0.0)
    mass = np.zeros(len(ids), np.float64)
    for s in range(0, size, BLOCK):
        e = min(size, s + BLOCK)
        blk = block_of(s, e)
        parts = blk * w_vec[:, None] if rule.linear else rule.combine_block(blk)
        parts *= np.float32(eta)
        mass += np.abs(parts).sum(axis=1, dtype=np.float64)
        g = parts.sum(axis=0, dtype=np.float32)
        m, scale = opt.step_block(s, g)
        np.subtract(theta[s:e], scale * m, out=out[s:e])
        if not (np.isfinite(m).all() and (scale > 0).all()):
            # The optimiser's state overflowed (an inf second moment would freeze
            # these coordinates for good): a non-finite model fails the round, and
            # the engine restores the state it had.
            out[s:e] = np.nan
        w = (v[s:e] * scale).astype(np.float64)
        if not beta:
            scores_blk = parts.astype(np.float64) @ w * gain
            for i, p in enumerate(ids):
                scores[p] += float(scores_blk[i])
            continue
        for i, p in enumerate(ids):
            mi = moments.vectors[p][s:e]
            mi *= np.float32(beta)
            mi += np.float32(gain) * parts[i]
            scores[p] += float(np.dot(w, mi))
        for p in carried:
            mi = moments.vectors[p][s:e]
            mi *= np.float32(beta)
            carry[p] += float(np.dot(w, mi))
    opt.end_round()
    for p in ids if beta else ():
        moments.decay[p] = 1.0
    for p in carried:
        moments.decay[p] = moments.decay.get(p, 1.0) * beta
        if moments.decay[p] < MOMENTUM_FLOOR:
            del moments.vectors[p], moments.decay[p]
    if rule.linear:
        reported = {p: weights.get(p, 0.0) * stale.get(p, 1.0) for p in ids}
    else:
        total = float(mass.sum())
        reported = {
            p: (float(mass[i]) / total if total > 0 else 0.0) for i, p in enumerate(ids)
        }
    return StrategyStep(reported, scores, carry, time.perf_counter() - t0)
