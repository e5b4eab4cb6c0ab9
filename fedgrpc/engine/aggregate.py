"""Aggregation weights, the weighted fold and the server step (DESIGN §3). Pure NumPy.

A round's step is theta_{t+1} = theta_t - eta * sum_i p_i u_i with p_i = w_i / sum_j w_j
(eta = server lr for gradient updates, 1 for deltas). Strategies plug in here: a
strategy decides the weights w_i (and may rescale the step); the fold and the step stay.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from fedgrpc.config import RoundConfig
from fedgrpc.engine.spill import Spill
from fedgrpc.engine.strategy_close import PartyMoments, close_with_strategy
from fedgrpc.engine.uploads import AcceptedUpdate
from fedgrpc.scoring import bounds, digfl
from fedgrpc.strategies import Strategy, UpdateInfo
from fedgrpc.types import UpdateKind

_FOLD_BLOCK = 1 << 18  # elements per block of the weighted fold (1 MiB of float32)

F32 = npt.NDArray[np.float32]


def buffers_updates(aggregation: str) -> bool:
    """Whether the rule needs every score before any weight: updates wait for the close.

    Only ``digfl`` does; it then holds the round's updates (parties x model size).
    """
    return aggregation == "digfl"


def fixed_weight(aggregation: str, num_samples: int, weight_ref: float) -> float:
    """w_i known when the upload starts (``samples`` and ``uniform``).

    Sample counts are divided by ``weight_ref`` (the joined parties' total when the
    round opened) so the float32 sum stays O(update size) whatever counts are claimed;
    p_i = w_i / sum_j w_j is unchanged.
    """
    if aggregation == "uniform":
        return 1.0
    return num_samples / weight_ref


def round_weights(
    aggregation: str,
    num_samples: Mapping[str, int],
    dots: Mapping[str, float],
    kind: UpdateKind,
    server_lr: float,
) -> dict[str, float]:
    """The normalised weights p_i of a closing round."""
    if aggregation == "uniform":
        return digfl.uniform_weights(num_samples)
    base = digfl.sample_weights(num_samples)
    if aggregation == "digfl":
        pre = digfl.digfl_scores(dots, base, kind, server_lr)
        return digfl.digfl_weights(pre, num_samples)
    return base


def step_size(kind: UpdateKind, server_lr: float) -> float:
    """eta: the server lr for gradients, 1 for deltas."""
    return server_lr if kind == UpdateKind.GRADIENT else 1.0


def fold(acc: F32, update: npt.NDArray[np.float32], weight: float | None) -> None:
    """``acc += weight * update`` in blocks (``None``: already weighted)."""
    if weight is None:
        np.add(acc, update, out=acc)
        return
    w = np.float32(weight)
    tmp = np.empty(min(_FOLD_BLOCK, acc.size), dtype=np.float32)
    for s in range(0, acc.size, _FOLD_BLOCK):
        e = min(acc.size, s + _FOLD_BLOCK)
        t = tmp[: e - s]
        np.multiply(update[s:e], w, out=t)
        acc[s:e] += t


def start_fold(acc: F32, update: npt.NDArray[np.float32], weight: float | None) -> None:
    """The round's first update: write ``weight * update`` into ``acc``, don't add."""
    if weight is None:
        np.copyto(acc, update)
    else:
        np.multiply(update, np.float32(weight), out=acc)


def fold_all(
    acc: F32,
    updates: Sequence[tuple[npt.NDArray[np.float32], float]],
) -> None:
    """``acc = sum_i w_i u_i`` over (update, weight) pairs (at least one)."""
    first, w0 = updates[0]
    start_fold(acc, first, w0)
    for u, w in updates[1:]:
        fold(acc, u, w)


def apply_step(theta: F32, acc: F32, scale: float) -> F32:
    """Theta - scale * acc, written into ``acc`` (returned); theta stays intact.

    Non-finite results are left for the caller to check (over/invalid are silenced).
    """
    with np.errstate(over="ignore", invalid="ignore"):
        np.multiply(acc, np.float32(scale), out=acc)
        return np.subtract(theta, acc, out=acc)


@dataclass(frozen=True)
class Step:
    """A closing round's weights, bound, DIG-FL scores and theta_{t+1}."""

    weights: dict[str, float]  # p_i, summing to 1
    scores: dict[str, float]  # phi_{t,i}
    theta: F32  # theta_{t+1}, in the accumulator's buffer; check it is finite
    seconds: float
    bound: float = math.inf  # B_t
    clip: dict[str, float] = field(default_factory=dict)  # c_i per party
    carry: dict[str, float] = field(default_factory=dict)  # absent parties' momentum
    trapezoid: bool = True  # score_i = coefficient_i <v, u_i>: digfl-2 applies

    def coefficient(self, party: str, cfg: RoundConfig) -> float:
        """Eta p_i c_i: a party's score is this times its inner product with v."""
        return step_size(cfg.update_kind, cfg.server_lr) * (
            self.weights[party] * self.clip.get(party, 1.0)
        )


def close_step(
    cfg: RoundConfig,
    round_index: int,
    accepted: Mapping[str, AcceptedUpdate],
    theta: F32,
    acc: F32,
    weight_sum: float,
    folded: int,
    spill: Spill,
    recycle: Callable[[np.ndarray], None],
    strategy: Strategy | None = None,
    v: np.ndarray | None = None,
    moments: PartyMoments | None = None,
) -> Step:
    """Bound, weights, scores and the step of a round whose updates are in.

    ``acc`` holds sum_i w_i u_i over the ``folded`` updates that were folded on
    arrival (``weight_sum`` = sum_i w_i over all accepted). B_t and the clip factors
    c_i come from the round's norms; the updates not folded yet are read back from
    ``spill`` and folded with w_i c_i, an early-folded update that turns out to be
    over the bound gets a correction w_i (c_i - 1) u_i. A rule that buffers updates
    folds its buffers here with p_i c_i and hands them to ``recycle``.
    theta_{t+1} = theta_t - eta * acc / weight_sum, written into ``acc``.

    Any other strategy (``strategy`` not streaming: a rule deciding at the close, or
    a server optimiser) reads the round back from the spill instead
    (:func:`~fedgrpc.engine.strategy_close.close_with_strategy`, given v_t and the
    parties' momenta). FedBuff's staleness factor s_i multiplies every update.
    """
    t0 = time.perf_counter()
    parties = sorted(accepted)
    norms = {p: math.sqrt(accepted[p].norm_sq) for p in parties}
    bound = bounds.round_bound(norms, cfg.norm_bound, cfg.norm_bound_factor)
    clip = {p: bounds.clip_factor(norms[p], bound) for p in parties}
    n = {p: accepted[p].weight_samples or accepted[p].num_samples for p in parties}
    stale = {p: accepted[p].stale_factor for p in parties}
    eta = step_size(cfg.update_kind, cfg.server_lr)
    if (
        strategy is not None
        and not buffers_updates(cfg.aggregation)
        and not (strategy.streaming)
    ):
        assert v is not None and moments is not None
        infos = [
            UpdateInfo(
                p, n[p], accepted[p].dot, norms[p], clip[p] * stale[p],
                accepted[p].staleness,
            )
            for p in parties
        ]  # fmt: skip
        with np.errstate(over="ignore", invalid="ignore"):  # checked by the caller
            st = close_with_strategy(
                strategy, round_index, infos, stale, eta, v, theta, acc, spill, moments
            )
        return Step(
            st.weights, st.scores, acc, time.perf_counter() - t0, bound, clip,
            carry=st.carry, trapezoid=strategy.trapezoid,
        )  # fmt: skip
    # The scores see the bounded update c_i u_i: <v_t, c_i u_i> = c_i <v_t, u_i>.
    dots = {p: accepted[p].dot * clip[p] for p in parties}
    if strategy is None or buffers_updates(cfg.aggregation):
        weights = round_weights(
            cfg.aggregation, n, dots, cfg.update_kind, cfg.server_lr
        )
    else:  # the streaming rule's own weights: the ones its fixed weights folded with
        infos = [UpdateInfo(p, n[p], accepted[p].dot, norms[p]) for p in parties]
        weights = strategy.rule.weights(infos, None, math.nan)
    # FedBuff: a stale update enters as s_i u_i (s_i = 1 in synchronous rounds).
    weights = {p: w * stale[p] for p, w in weights.items()}
    if buffers_updates(cfg.aggregation):
        pairs = []
        for p in parties:
            buf = accepted[p].buffer
            assert buf is not None
            pairs.append((buf, weights[p] * clip[p]))
        fold_all(acc, pairs)
        for p in parties:
            buf, accepted[p].buffer = accepted[p].buffer, None
            assert buf is not None
            recycle(buf)
        weight_sum = 1.0
    else:
        started = folded > 0
        for p in parties:
            entry = accepted[p]
            if entry.folded and clip[p] == 1.0:
                continue
            assert entry.weight is not None
            u = spill.read(round_index, p)
            if u is None:
                raise RuntimeError(
                    f"round {round_index}: the update of party {p} is missing from "
                    "the spill; the round cannot be folded"
                )
            w = entry.weight * entry.stale_factor
            w *= clip[p] - 1.0 if entry.folded else clip[p]
            if started:
                fold(acc, u, w)
            else:
                start_fold(acc, u, w)
                started = True
    scores = digfl.digfl_scores(dots, weights, cfg.update_kind, cfg.server_lr)
    # In place in the spare buffer: theta_t stays intact for v_t and for anyone
    # holding it until the next round's first fold; no fresh pages per round.
    new_theta = apply_step(theta, acc, eta / weight_sum)
    return Step(weights, scores, new_theta, time.perf_counter() - t0, bound, clip)
