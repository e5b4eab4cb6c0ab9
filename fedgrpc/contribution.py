"""DIG-FL contribution scoring and its ground-truth helpers (DESIGN §4). Pure NumPy.

Per round t the server computes the validation gradient v_t = ∇L_v(θ_t) once. A party's
update u_{t,i} (a gradient, or a delta Δ_{t,i} = θ_t - θ_local) then scores

    φ_{t,i} = η · p_i · ⟨v_t, u_{t,i}⟩   (gradient updates, η = server lr)
    φ_{t,i} =     p_i · ⟨v_t, Δ_{t,i}⟩   (delta updates)

which is the first-order drop in validation loss caused by party i's part of the step.
Scores are signed: a party that pushes the model uphill on L_v scores negative.

The inner products are streamed: :class:`StreamingScore` folds an upload chunk by chunk,
so the server never holds more than one chunk of a party's update for scoring.

The Shapley, leave-one-out and correlation helpers are for evaluation (the ``shapley``
CLI command), where the utility of a coalition comes from retraining it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from itertools import combinations
from typing import Any

import numpy as np
import numpy.typing as npt

from fedgrpc.errors import InvalidUpdateError
from fedgrpc.types import FloatArray, UpdateKind

log = logging.getLogger(__name__)

Utility = Callable[[frozenset[str]], float]
"""Value of a coalition of parties, e.g. L_v(θ_0) - L_v(θ_T^S)."""

MAX_EXACT_PLAYERS = 20
"""exact_shapley evaluates 2^n coalitions; refuse more players than this."""

_BLOCK = 1 << 18  # elements cast to float64 at a time (2 MiB), bounds temporaries


def _dot64(a: npt.NDArray[Any], b: npt.NDArray[Any]) -> float:
    """Inner product of two equally long 1-D arrays, accumulated in float64."""
    total = 0.0
    for start in range(0, a.size, _BLOCK):
        stop = start + _BLOCK
        total += float(
            np.dot(
                a[start:stop].astype(np.float64, copy=False),
                b[start:stop].astype(np.float64, copy=False),
            )
        )
    return total


# ------------------------------------------------------------------------------------
# Scores and weights


def digfl_scores(
    dots: Mapping[str, float],
    weights: Mapping[str, float],
    kind: UpdateKind,
    server_lr: float,
) -> dict[str, float]:
    """Per-round DIG-FL scores φ_{t,i} from the inner products ⟨v_t, u_{t,i}⟩.

    Args:
        dots: ⟨v_t, u_{t,i}⟩ per party.
        weights: Aggregation weight p_i per party; must cover every party in ``dots``.
        kind: ``gradient`` scales by ``server_lr``; ``delta`` does not.
        server_lr: Server step size η (used for gradient updates only).

    Returns:
        φ_{t,i} per party, signed and unclipped, in the order of ``dots``.

    Raises:
        ValueError: A party in ``dots`` has no weight.
    """
    missing = [p for p in dots if p not in weights]
    if missing:
        raise ValueError(f"no aggregation weight for parties {missing}")
    # DIG-FL first-order drop: the gradient step is θ - η Σ p_i g_i,
    # the delta step θ - Σ p_i Δ_i.
    scale = float(server_lr) if UpdateKind(kind) is UpdateKind.GRADIENT else 1.0
    return {p: scale * float(weights[p]) * float(d) for p, d in dots.items()}


def sample_weights(num_samples: Mapping[str, int]) -> dict[str, float]:
    """Sample-proportional weights p_i = n_i / Σ_j n_j (DESIGN §3).

    Raises:
        ValueError: A negative count, or counts that sum to zero.
    """
    if not num_samples:
        return {}
    negative = {p: n for p, n in num_samples.items() if n < 0}
    if negative:
        raise ValueError(f"negative sample counts: {negative}")
    total = sum(int(n) for n in num_samples.values())
    if total <= 0:
        raise ValueError(f"sample counts sum to 0 for parties {sorted(num_samples)}")
    return {p: int(n) / total for p, n in num_samples.items()}


def uniform_weights(party_ids: Iterable[str]) -> dict[str, float]:
    """Equal weights 1/n for every party."""
    ids = list(dict.fromkeys(party_ids))
    return {p: 1.0 / len(ids) for p in ids}


def digfl_weights(
    scores: Mapping[str, float], num_samples: Mapping[str, int]
) -> dict[str, float]:
    """DIG-FL reweighting ω_i ∝ max(0, φ_i), normalised to sum 1.

    Non-finite scores count as 0. When no party has a positive score the round falls
    back to sample weights over the parties in ``scores``.

    Args:
        scores: φ_{t,i} per party.
        num_samples: n_i per party; must cover every party in ``scores``.

    Returns:
        Weights per party in ``scores``, summing to 1 (empty for no parties).
    """
    positive = {
        p: (s if math.isfinite(s) and s > 0.0 else 0.0) for p, s in scores.items()
    }
    total = sum(positive.values())
    if total > 0.0:
        return {p: s / total for p, s in positive.items()}
    if scores:
        log.info(
            "digfl weights: no positive score among %d parties; sample weights",
            len(scores),
        )
    return sample_weights({p: num_samples[p] for p in scores})


# ------------------------------------------------------------------------------------
# Inner products, whole or streamed


def dot_chunked(v: FloatArray, u_chunk: FloatArray, offset: int) -> float:
    """⟨v[offset : offset + u_chunk.size], u_chunk⟩ in float64.

    Args:
        v: Flat validation gradient (all model tensors concatenated in spec order).
        u_chunk: A piece of a party's update; flattened in C order.
        offset: Element offset of the chunk's first element in the flat vector.

    Raises:
        InvalidUpdateError: The chunk does not fit inside ``v``.
    """
    flat_v = np.asarray(v).reshape(-1)
    chunk = np.asarray(u_chunk).reshape(-1)
    if offset < 0 or offset + chunk.size > flat_v.size:
        raise InvalidUpdateError(
            f"chunk of {chunk.size} elements at offset {offset} is outside the "
            f"{flat_v.size}-element model"
        )
    return _dot64(flat_v[offset : offset + chunk.size], chunk)


class StreamingScore:
    """Accumulate ⟨v, u⟩ and ‖u‖² over the chunks of one party's upload.

    Chunks may arrive in any order; each element must be sent exactly once (the wire
    layer checks offsets). The sums are float64, so a streamed update equals the
    whole-tensor computation up to float64 rounding. A chunk holding NaN or ±inf is
    flagged and left out of the sums, so the engine can reject the update by name.
    """

    def __init__(self, v: FloatArray) -> None:
        """Start a score against the flat validation gradient ``v``.

        Raises:
            ValueError: ``v`` is not floating point or holds non-finite values.
        """
        flat = np.asarray(v).reshape(-1)
        if not np.issubdtype(flat.dtype, np.floating):
            raise ValueError(
                f"validation gradient must be floating point, got {flat.dtype}"
            )
        if not np.isfinite(flat).all():
            raise ValueError("validation gradient holds non-finite values")
        self._v = flat  # (n_params,)
        self._dot = 0.0
        self._sq_norm = 0.0
        self._elements = 0
        self._nonfinite_offset: int | None = None

    def add(self, offset: int, chunk: FloatArray) -> bool:
        """Fold one chunk starting at flat element ``offset``.

        Returns:
            True if the chunk was finite; False if it held NaN/inf (and was not summed).

        Raises:
            InvalidUpdateError: The chunk does not fit inside the model.
        """
        flat = np.asarray(chunk).reshape(-1)
        if offset < 0 or offset + flat.size > self._v.size:
            raise InvalidUpdateError(
                f"chunk of {flat.size} elements at offset {offset} is outside the "
                f"{self._v.size}-element model"
            )
        self._elements += flat.size
        sq = _dot64(flat, flat)
        # A NaN/inf element makes sq non-finite; so does float64 overflow (also bad).
        if not math.isfinite(sq):
            if self._nonfinite_offset is None:
                self._nonfinite_offset = offset
            return False
        self._sq_norm += sq
        self._dot += _dot64(self._v[offset : offset + flat.size], flat)
        return True

    @property
    def dot(self) -> float:
        """⟨v, u⟩ over the chunks folded so far."""
        return self._dot

    @property
    def sq_norm(self) -> float:
        """‖u‖² over the chunks folded so far."""
        return self._sq_norm

    @property
    def norm(self) -> float:
        """‖u‖ over the chunks folded so far."""
        return math.sqrt(self._sq_norm)

    @property
    def elements(self) -> int:
        """Elements received so far (finite or not)."""
        return self._elements

    @property
    def complete(self) -> bool:
        """Whether as many elements arrived as the model has."""
        return self._elements == self._v.size

    @property
    def finite(self) -> bool:
        """Whether every chunk so far was finite."""
        return self._nonfinite_offset is None

    @property
    def nonfinite_offset(self) -> int | None:
        """Flat offset of the first non-finite chunk, or None."""
        return self._nonfinite_offset


# ------------------------------------------------------------------------------------
# Aggregating scores over rounds


def totals(per_round: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Cumulative score Σ_t φ_{t,i} per party (the DIG-FL Shapley estimate)."""
    out: dict[str, float] = {}
    for scores in per_round:
        for p, s in scores.items():
            out[p] = out.get(p, 0.0) + float(s)
    return out


def shares(totals: Mapping[str, float]) -> dict[str, float]:
    """Signed shares total_i / Σ_j total_j; all 0 when the sum is 0."""
    denom = sum(totals.values())
    if denom == 0.0:
        return dict.fromkeys(totals, 0.0)
    return {p: t / denom for p, t in totals.items()}


def reference_shares(per_round: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Reference DIG-FL form: per round max(0, φ) normalised to 1, averaged over rounds.

    A round in which no party scored positive contributes nothing and is left out of
    the average, so the shares sum to 1 whenever any round had a positive score (else
    all 0).
    A party missing from a round scores 0 there.
    """
    parties = list(dict.fromkeys(p for scores in per_round for p in scores))
    out = dict.fromkeys(parties, 0.0)
    counted = 0
    for scores in per_round:
        positive = {p: max(0.0, s) for p, s in scores.items() if math.isfinite(s)}
        denom = sum(positive.values())
        if denom <= 0.0:
            continue
        counted += 1
        for p, s in positive.items():
            out[p] += s / denom
    if counted:
        out = {p: s / counted for p, s in out.items()}
    return out


# ------------------------------------------------------------------------------------
# Ground truth: Shapley values from coalition utilities


def _check_players(players: Sequence[str]) -> list[str]:
    names = list(players)
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate players in {names}")
    return names


def exact_shapley(players: Sequence[str], utility: Utility) -> dict[str, float]:
    """Exact Shapley values by enumerating every coalition (2^n utility calls).

    φ_i = Σ_{S ⊆ N - {i}} |S|!(n-|S|-1)!/n! · (v(S | {i}) - v(S)), with v(∅) taken
    from ``utility(frozenset())``; no clipping.

    Raises:
        ValueError: Duplicate players, or more than MAX_EXACT_PLAYERS.
    """
    names = _check_players(players)
    n = len(names)
    if n > MAX_EXACT_PLAYERS:
        raise ValueError(f"exact Shapley over {n} players needs 2^{n} coalitions")
    value: dict[frozenset[str], float] = {}
    for size in range(n + 1):
        for combo in combinations(names, size):
            s = frozenset(combo)
            value[s] = float(utility(s))
    weight = [
        math.factorial(k) * math.factorial(n - k - 1) / math.factorial(n)
        for k in range(n)
    ]
    out: dict[str, float] = {}
    for i in names:
        others = [p for p in names if p != i]
        phi = 0.0
        for size in range(n):
            for combo in combinations(others, size):
                s = frozenset(combo)
                phi += weight[size] * (value[s | {i}] - value[s])
        out[i] = phi
    return out


def permutation_shapley(
    players: Sequence[str],
    utility: Utility,
    n_permutations: int,
    rng: np.random.Generator,
) -> dict[str, float]:
    """Monte Carlo Shapley estimate: mean marginal value over random orderings.

    Utility values are cached per coalition, so repeated prefixes cost nothing.

    Args:
        players: Party ids.
        utility: Coalition value.
        n_permutations: Random orderings to average over (>= 1).
        rng: Source of the orderings.

    Raises:
        ValueError: Duplicate players or ``n_permutations < 1``.
    """
    names = _check_players(players)
    if n_permutations < 1:
        raise ValueError(f"n_permutations must be >= 1, got {n_permutations}")
    cache: dict[frozenset[str], float] = {}

    def v(s: frozenset[str]) -> float:
        if s not in cache:
            cache[s] = float(utility(s))
        return cache[s]

    sums = dict.fromkeys(names, 0.0)
    for _ in range(n_permutations):
        coalition: frozenset[str] = frozenset()
        before = v(coalition)
        for idx in rng.permutation(len(names)):
            p = names[int(idx)]
            coalition = coalition | {p}
            after = v(coalition)
            sums[p] += after - before
            before = after
    return {p: s / n_permutations for p, s in sums.items()}


def leave_one_out(players: Sequence[str], utility: Utility) -> dict[str, float]:
    """Leave-one-out value v(N) - v(N - {i}) per party."""
    names = _check_players(players)
    everyone = frozenset(names)
    full = float(utility(everyone))
    return {p: full - float(utility(everyone - {p})) for p in names}


# ------------------------------------------------------------------------------------
# Correlations


def _paired(
    a: Sequence[float], b: Sequence[float]
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    x = np.asarray(a, dtype=np.float64).reshape(-1)
    y = np.asarray(b, dtype=np.float64).reshape(-1)
    if x.size != y.size:
        raise ValueError(f"length mismatch: {x.size} vs {y.size}")
    if x.size < 2:
        raise ValueError("correlation needs at least 2 pairs")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("correlation inputs must be finite")
    return x, y


def pearson(a: Sequence[float], b: Sequence[float]) -> float:
    """Pearson correlation; NaN when either side is constant.

    Raises:
        ValueError: Different lengths, fewer than 2 pairs, or non-finite values.
    """
    x, y = _paired(a, b)
    dx = x - x.mean()
    dy = y - y.mean()
    denom = math.sqrt(float(np.dot(dx, dx)) * float(np.dot(dy, dy)))
    if denom == 0.0:
        return math.nan
    return max(-1.0, min(1.0, float(np.dot(dx, dy)) / denom))


def _ranks(x: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """1-based ranks, ties sharing the mean of the positions they span."""
    order = np.argsort(x, kind="stable")
    ordered = x[order]
    starts_group = np.concatenate(([True], ordered[1:] != ordered[:-1]))
    group = np.cumsum(starts_group) - 1  # group index of each sorted position
    starts = np.flatnonzero(starts_group)
    stops = np.append(starts[1:], x.size)  # exclusive
    mean_rank = (starts + stops + 1) / 2.0  # mean of 1-based positions start+1 .. stop
    ranks = np.empty(x.size, dtype=np.float64)
    ranks[order] = mean_rank[group]
    return ranks


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation: Pearson on average ranks; NaN if a side is constant.

    Raises:
        ValueError: Different lengths, fewer than 2 pairs, or non-finite values.
    """
    x, y = _paired(a, b)
    rx = _ranks(x)
    ry = _ranks(y)
    return pearson(rx.tolist(), ry.tolist())
