"""digfl-2: the trapezoid scores of a round, computed once v_{t+1} exists (DESIGN §4).

φ2_{t,i} = η p_i c_i ⟨(v_t + v_{t+1}) / 2, u_{t,i}⟩. ⟨v_t, u_{t,i}⟩ was accumulated
while the update streamed in; ⟨v_{t+1}, u_{t,i}⟩ needs the update again, so the round's
updates stay in the spill until the next round's validation gradient v_{t+1} is
computed (while the parties train) and one blocked pass reads each back. Summed over
parties, the trapezoid tracks the measured drop L_v(θ_t) - L_v(θ_{t+1}) to third order,
where the first-order sum is off at second order.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

from fedgrpc.engine.spill import Spill, blocked_dot
from fedgrpc.types import RoundResult, SecondOrder, UpdateKind

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PendingSecond:
    """A closed round waiting for v_{t+1}: each party's η p_i c_i and ⟨v_t, u_i⟩."""

    round: int
    coef: dict[str, float]  # eta p_i c_i
    dots: dict[str, float]  # <v_t, u_{t,i}> of the raw update
    fixed: dict[str, float] | None = None
    """A strategy whose parts are not eta p_i c_i u_i (a coordinate-wise rule, a
    server optimiser): digfl-2 is its digfl-1 score, nothing is read back."""

    @classmethod
    def of(
        cls,
        result: RoundResult,
        server_lr: float,
        kind: UpdateKind,
        trapezoid: bool = True,
    ) -> PendingSecond:
        """From a committed round (what a resumed run reads back from the ledger).

        ``trapezoid`` False: the run's strategy scores parts that are not
        eta p_i c_i u_i, so digfl-2 is the recorded digfl-1 score.
        """
        if not trapezoid:
            return cls(
                result.round,
                {},
                {},
                fixed={p.party_id: p.score for p in result.parties},
            )
        eta = server_lr if UpdateKind(kind) is UpdateKind.GRADIENT else 1.0
        return cls(
            result.round,
            {p.party_id: eta * p.weight * p.clip for p in result.parties},
            {p.party_id: p.dot for p in result.parties},
        )

    def compute(self, v_next: np.ndarray, spill: Spill) -> SecondOrder:
        """The round's digfl-2 scores.

        A party whose spilled update is gone (a resumed run whose spill did not
        survive) keeps its first-order score as its digfl-2 score, with
        ``dots_next`` NaN saying so; the round is then scored, not pending forever.
        """
        if self.fixed is not None:
            return SecondOrder(
                self.round, dict.fromkeys(self.fixed, math.nan), dict(self.fixed)
            )
        dots_next: dict[str, float] = {}
        scores: dict[str, float] = {}
        for p, coef in self.coef.items():
            u = spill.read(self.round, p)
            if u is None:
                log.warning(
                    "round %d: the update of party %s is gone; its digfl-2 score is "
                    "its digfl-1 score",
                    self.round,
                    p,
                )
                dots_next[p] = math.nan
                scores[p] = coef * self.dots[p]
                continue
            d = blocked_dot(v_next, u)
            dots_next[p] = d
            scores[p] = coef * 0.5 * (self.dots[p] + d)  # trapezoid rule
        return SecondOrder(self.round, dots_next, scores)
