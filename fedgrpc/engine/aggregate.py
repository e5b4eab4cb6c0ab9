"""Aggregation weights, the weighted fold and the server step (DESIGN §3). Pure NumPy.

A round's step is theta_{t+1} = theta_t - eta * sum_i p_i u_i with p_i = w_i / sum_j w_j
(eta = server lr for gradient updates, 1 for deltas). Strategies plug in here: a
strategy decides the weights w_i (and may rescale the step); the fold and the step stay.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from fedgrpc.config import RoundConfig
from fedgrpc.engine.uploads import AcceptedUpdate
from fedgrpc.scoring import digfl
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
    """A closing round's weights, DIG-FL scores and theta_{t+1}."""

    weights: dict[str, float]  # p_i, summing to 1
    scores: dict[str, float]  # phi_{t,i}
    theta: F32  # theta_{t+1}, in the accumulator's buffer; check it is finite
    seconds: float


def close_step(
    cfg: RoundConfig,
    accepted: Mapping[str, AcceptedUpdate],
    theta: F32,
    acc: F32,
    weight_sum: float,
    recycle: Callable[[np.ndarray], None],
) -> Step:
    """Weights, scores and the step of a round whose updates are in.

    ``acc`` already holds sum_i w_i u_i (``weight_sum`` = sum_i w_i), except under a
    rule that buffers updates, whose buffers are folded here and handed to
    ``recycle``. theta_{t+1} = theta_t - eta * acc / weight_sum, written into ``acc``.
    """
    t0 = time.perf_counter()
    parties = sorted(accepted)
    n = {p: accepted[p].num_samples for p in parties}
    dots = {p: accepted[p].dot for p in parties}
    weights = round_weights(cfg.aggregation, n, dots, cfg.update_kind, cfg.server_lr)
    if buffers_updates(cfg.aggregation):
        pairs = []
        for p in parties:
            buf = accepted[p].buffer
            assert buf is not None
            pairs.append((buf, weights[p]))
        fold_all(acc, pairs)
        for p in parties:
            buf, accepted[p].buffer = accepted[p].buffer, None
            assert buf is not None
            recycle(buf)
        weight_sum = 1.0
    scores = digfl.digfl_scores(dots, weights, cfg.update_kind, cfg.server_lr)
    # In place in the spare buffer: theta_t stays intact for v_t and for anyone
    # holding it until the next round's first fold; no fresh pages per round.
    eta = step_size(cfg.update_kind, cfg.server_lr)
    new_theta = apply_step(theta, acc, eta / weight_sum)
    return Step(weights, scores, new_theta, time.perf_counter() - t0)
