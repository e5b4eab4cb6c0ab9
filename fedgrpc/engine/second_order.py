"""digfl-2: the trapezoid scores of a round, computed once v_{t+1} exists (DESIGN §4).

φ2_{t,i} = η p_i c_i ⟨(v_t + v_{t+1}) / 2, u_{t,i}⟩. ⟨v_t, u_{t,i}⟩ was accumulated
while the update streamed in; ⟨v_{t+1}, u_{t,i}⟩ needs the update again, so the round's
updates stay in the spill until the next round's validation gradient v_{t+1} is
computed (while the parties train) and one blocked pass reads each back. Summed over
parties, the trapezoid tracks the measured drop L_v(θ_t) - L_v(θ_{t+1}) to third order,
where the first-order sum is off at second order.

:class:`SecondOrderJobs` carries a round from its close to the ledger: its job starts
when the next round opens and is recorded once done, in round order, without the
close of the next round waiting for it. The ledger may hold round t before round
t-1's digfl-2 (at most one round behind: the commit of round t+1 waits for it), so a
resumed run may find the last two rounds without digfl-2 (``fedgrpc.server.app``).
"""

from __future__ import annotations

import logging
import math
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor, Future
from dataclasses import dataclass

import numpy as np

from fedgrpc.engine.spill import Spill
from fedgrpc.engine.uploads import ValGrad
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
            return self.first_order()
        dots_next: dict[str, float] = {}
        scores: dict[str, float] = {}
        for p, coef in self.coef.items():
            d = spill.dot(self.round, p, v_next)
            if d is None:
                log.warning(
                    "round %d: the update of party %s is gone; its digfl-2 score is "
                    "its digfl-1 score",
                    self.round,
                    p,
                )
                dots_next[p] = math.nan
                scores[p] = coef * self.dots[p]
                continue
            dots_next[p] = d
            scores[p] = coef * 0.5 * (self.dots[p] + d)  # trapezoid rule
        return SecondOrder(self.round, dots_next, scores)

    def first_order(self) -> SecondOrder:
        """The fallback without v_{t+1}: digfl-1 scores, ``dots_next`` NaN."""
        if self.fixed is not None:
            return SecondOrder(
                self.round, dict.fromkeys(self.fixed, math.nan), dict(self.fixed)
            )
        return SecondOrder(
            self.round,
            dict.fromkeys(self.coef, math.nan),
            {p: c * self.dots[p] for p, c in self.coef.items()},
        )


class SecondOrderJobs:
    """The digfl-2 scores of closed rounds, from the close to the ledger.

    A job computes a round's scores once v_{t+1} exists, records them and drops the
    round's spill, all on the executor's thread (one job at a time, in round order):
    the driver thread only collects finished jobs, so no ledger write of digfl-2
    lands between two rounds.

    Args:
        spill: where the rounds' updates wait; a round's is dropped once recorded.
        executor: where the jobs run; ``None`` runs them inline when they start.
        on_record: records a round's scores (the ledger).
        waiting: a resumed run's last committed round still waiting for v_{t+1}.
    """

    def __init__(
        self,
        spill: Spill,
        executor: Executor | None,
        on_record: Callable[[SecondOrder], None] | None,
        waiting: PendingSecond | None = None,
    ) -> None:
        self._spill = spill
        self._executor = executor
        self._on_record = on_record
        self._waiting = waiting
        self._running: deque[tuple[int, Future[None]]] = deque()
        self._lock = threading.RLock()

    def closed(self, pending: PendingSecond) -> None:
        """Round ``pending.round`` was committed: it waits for v_{t+1}."""
        with self._lock:
            self._waiting = pending

    def start(self, val_grad: ValGrad) -> None:
        """The next round opened and asked for v_{t+1}: run the waiting job after it.

        A retried round opens again with the same theta: nothing is waiting then.
        """
        with self._lock:
            pending, self._waiting = self._waiting, None
            if pending is None:
                return

            def job() -> None:
                try:
                    so = pending.compute(val_grad.result()[0], self._spill)
                except Exception as e:  # the round stays without digfl-2 scores
                    log.warning("round %d: digfl-2 scores lost: %s", pending.round, e)
                else:
                    self._record(so)  # a ledger error surfaces in collect()
                self._spill.drop(pending.round)

            if self._executor is None:
                fut: Future[None] = Future()
                try:
                    job()
                    fut.set_result(None)
                except Exception as e:
                    fut.set_exception(e)
            else:
                fut = self._executor.submit(job)
            self._running.append((pending.round, fut))

    def _record(self, so: SecondOrder) -> None:
        if self._on_record is not None:
            self._on_record(so)

    def collect(self, *, through: int | None = None, wait: bool = False) -> None:
        """Forget the finished jobs, oldest first; raise a job's recording error.

        Args:
            through: wait for the jobs of rounds up to this one (the bound that keeps
                the ledger at most one round behind).
            wait: wait for every started job.
        """
        with self._lock:
            while self._running:
                rnd, fut = self._running[0]
                must = wait or (through is not None and rnd <= through)
                if not fut.done() and not must:
                    return
                self._running.popleft()
                fut.result()  # the ledger refused the scores: the owner stops

    def final(self, v_next: np.ndarray | None) -> None:
        """After the last round: every job done, the waiting one from ``v_next``.

        ``v_next`` None (the extra pass failed): the last round gets no digfl-2.
        """
        with self._lock:
            self.collect(wait=True)
            pending, self._waiting = self._waiting, None
            if pending is None or v_next is None:
                return
            self._record(pending.compute(v_next, self._spill))
            self._spill.drop(pending.round)
