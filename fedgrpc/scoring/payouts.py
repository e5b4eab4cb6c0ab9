"""Payouts: splitting an amount by contribution totals, re-derivable from the ledger.

A payout is a pure function of the ledger rows it used (quoted by their SHA-256),
the scoring method, the rounds and the rule, so a payer can re-derive it later and a
party can check it. Amounts are allocated in integer cents (largest remainder), so
they add up to the amount exactly. A party whose total is negative gets nothing and is
listed as harmful.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

PAYOUT_RULES = ("positive-share", "equal-positive")
"""``positive-share``: amount x max(0, total_i) / sum_j max(0, total_j).
``equal-positive``: the amount split equally among the parties with a positive total."""


@dataclass(frozen=True)
class Payout:
    """One party's payment."""

    party_id: str
    total: float  # its contribution total under the method
    share: float  # fraction of the amount paid to it
    amount: float  # in the amount's unit, rounded to cents
    harmful: bool  # total < 0: paid nothing


def payouts(totals: Mapping[str, float], amount: float, rule: str) -> list[Payout]:
    """Split ``amount`` by ``rule``; ranked by amount, then total, then id.

    Raises:
        ValueError: an unknown rule, or an amount that is negative or not finite.
    """
    if rule not in PAYOUT_RULES:
        raise ValueError(f"unknown payout rule {rule!r}; choose one of {PAYOUT_RULES}")
    if not math.isfinite(amount) or amount < 0:
        raise ValueError(f"payout amount must be a finite number >= 0, got {amount}")
    finite = {p: (t if math.isfinite(t) else 0.0) for p, t in totals.items()}
    if rule == "positive-share":
        weights = {p: max(0.0, t) for p, t in finite.items()}
    else:
        weights = {p: 1.0 if t > 0 else 0.0 for p, t in finite.items()}
    denom = sum(weights.values())
    cents = round(amount * 100)
    paid = (
        _largest_remainder(weights, cents) if denom > 0 else dict.fromkeys(weights, 0)
    )
    out = [
        Payout(
            party_id=p,
            total=totals[p],
            share=(weights[p] / denom) if denom > 0 else 0.0,
            amount=paid[p] / 100,
            harmful=finite[p] < 0,
        )
        for p in totals
    ]
    out.sort(key=lambda x: (-x.amount, -x.total, x.party_id))
    return out


def _largest_remainder(weights: Mapping[str, float], cents: int) -> dict[str, int]:
    """Integer cents proportional to ``weights`` that sum to ``cents`` exactly."""
    denom = sum(weights.values())
    exact = {p: cents * w / denom for p, w in weights.items()}
    paid = {p: math.floor(x) for p, x in exact.items()}
    left = cents - sum(paid.values())
    # Ties broken by id, so the allocation is deterministic.
    order = sorted(
        (p for p in exact if weights[p] > 0), key=lambda p: (-(exact[p] - paid[p]), p)
    )
    for p in order[:left]:
        paid[p] += 1
    return paid
