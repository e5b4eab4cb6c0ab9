"""DIG-FL contribution scores and aggregation weights (DESIGN §4). Pure NumPy.

Per round t the server computes the validation gradient v_t = ∇L_v(θ_t) once. A party's
update u_{t,i} (a gradient, or a delta Δ_{t,i} = θ_t - θ_local) then scores

    φ_{t,i} = η · p_i · ⟨v_t, u_{t,i}⟩   (gradient updates, η = server lr)
    φ_{t,i} =     p_i · ⟨v_t, Δ_{t,i}⟩   (delta updates)

which is the first-order drop in validation loss caused by party i's part of the step.
Scores are signed: a party that pushes the model uphill on L_v scores negative. The
inner products themselves are accumulated chunk by chunk as each upload streams in
(:class:`fedgrpc.engine.uploads.Submission`); this module turns them into scores,
weights and totals.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence

from fedgrpc.types import UpdateKind

log = logging.getLogger(__name__)


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
