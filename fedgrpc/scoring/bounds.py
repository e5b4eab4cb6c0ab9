"""Bounded influence: the per-round norm bound and the sample-count cap (DESIGN §4).

Pure NumPy-free arithmetic on the few scalars a round knows about each update (its
norm and its claimed count), so the engine can apply the rules while streaming.

Every party controls two things the step and its DIG-FL score are linear in: the
magnitude of its update and the sample count it claims. Both are bounded here.

* **Norm bound.** ``auto``: B_t = k x the median of the round's non-zero update norms
  (zero updates, free riders, are left out so they cannot pull the bound to 0). An
  update with ||u_i|| > B_t is scaled by c_i = B_t / ||u_i|| before aggregation and
  scoring; c_i = 1 otherwise. A fixed VALUE bounds every round by that number; ``off``
  never bounds.
* **Claim cap.** A count attested by the operator's parties file is a hard ceiling (the
  Join is refused above it). Unattested claims are capped for weighting at
  ``factor`` x the median claim of the *other* joined parties, so one party inflating
  its count gains at most that factor of weight over a typical party, while honest
  skew up to the factor is kept (attest larger counts in the parties file).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping

from fedgrpc.config import parse_norm_bound


def round_bound(norms: Mapping[str, float], rule: str, factor: float) -> float:
    """B_t for a round whose accepted updates have these L2 norms (inf = no bound)."""
    fixed = parse_norm_bound(rule)
    if fixed is not None:
        return fixed
    nonzero = [n for n in norms.values() if n > 0.0 and math.isfinite(n)]
    if not nonzero:
        return math.inf
    return factor * float(statistics.median(nonzero))


def clip_factor(norm: float, bound: float) -> float:
    """c_i = min(1, B / ||u_i||): the scale applied to an update (1 = untouched)."""
    if not norm > bound:  # also for inf bounds and zero norms
        return 1.0
    return bound / norm


def early_fold_limit(previous_bound: float, rule: str) -> float:
    """Updates up to this norm may be folded on arrival, before B_t is known.

    With a fixed bound (or none) that is the bound itself. Under ``auto`` it is the
    previous round's bound (0 in the first round: everything waits for the close).
    Medians move little between rounds, so an early-folded update is rarely over B_t;
    when it is, its correction w_i (c_i - 1) u_i subtracts a vector of about B_t's
    size, never a huge one (huge updates always wait for the close).
    """
    fixed = parse_norm_bound(rule)
    if fixed is not None:
        return fixed
    if not math.isfinite(previous_bound):
        return 0.0
    return previous_bound


def count_caps(
    claims: Mapping[str, int], factor: float
) -> tuple[dict[str, int], int | None]:
    """Per-party caps on unattested claims: ``factor`` x the others' median claim.

    The median is over the *other* joined parties, so an inflated claim never lifts
    its own cap. Returns the per-party caps and the cap of a party that joins later
    (``factor`` x the median of every current claim); ``({}, None)`` when the cap is
    off or nobody has joined. A party alone has no cap. Attested parties are not
    capped: their claim was checked against the operator's count at Join.
    """
    if factor <= 0 or not claims:
        return {}, None
    ids = list(claims)
    order = sorted(range(len(ids)), key=lambda i: claims[ids[i]])
    values = [claims[ids[i]] for i in order]  # sorted claims
    n = len(values)

    def cap(median: float) -> int:
        return max(1, math.floor(factor * median))

    caps: dict[str, int] = {}
    if n > 1:
        m = n - 1  # the others
        for j, i in enumerate(order):
            # Median of ``values`` without position j: positions (m-1)//2 and m//2 of
            # the remaining list map back past j by one.
            lo, hi = (m - 1) // 2, m // 2
            a = values[lo if lo < j else lo + 1]
            b = values[hi if hi < j else hi + 1]
            caps[ids[i]] = cap((a + b) / 2)
    return caps, cap(float(statistics.median(values)))


def weight_count(num_samples: int, cap: int | None, attested: bool) -> int:
    """The count a party's weight derives from: its claim, capped unless attested."""
    if cap is None or attested:
        return int(num_samples)
    return min(int(num_samples), cap)
