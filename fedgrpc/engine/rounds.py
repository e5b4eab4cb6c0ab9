"""The synchronous FedSGD round engine (DESIGN §3-4). No grpc, no torch.

The engine holds the global parameters as one flat float32 vector, the party registry
and the open round. Updates arrive through :class:`~fedgrpc.engine.uploads.Submission`
objects and are added to the round's weighted sum only once whole and validated. With
``aggregation="digfl"`` the weights need every score before any update can be folded,
so the round keeps its updates until it closes (parties x model size).

Threading: every public method is safe to call from any thread. The owner calls
:meth:`tick` (and :meth:`wait`) from one driver thread; rounds close inside
:meth:`tick`. The engine lock is held only for bookkeeping: waiting for v_t, the step,
the validation pass, the commit (checkpoint and ledger fsync) and publishing the next
model all run outside it, so ``join``, ``status`` and uploads never wait for them. A
closing round refuses new updates; its commit happens before the next model is
published.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor, Future
from typing import Protocol

import numpy as np

from fedgrpc.config import Limits, RoundConfig
from fedgrpc.engine import aggregate
from fedgrpc.engine.parties import PartyTable
from fedgrpc.engine.round_state import Ending, OpenRound
from fedgrpc.engine.second_order import PendingSecond, SecondOrderJobs
from fedgrpc.engine.spill import MemorySpill, Spill, blocked_dot
from fedgrpc.engine.strategy_close import PartyMoments
from fedgrpc.engine.uploads import (
    AcceptedUpdate,
    Resend,
    Submission,
    UploadPool,
    ValGrad,
)
from fedgrpc.errors import (
    DuplicateSubmissionError,
    InvalidUpdateError,
    StaleRoundError,
    UnavailableError,
    UnknownPartyError,
)
from fedgrpc.layout import FlatLayout, update_digest
from fedgrpc.scoring import bounds
from fedgrpc.strategies import Strategy, build_strategy
from fedgrpc.types import (
    RoundOutcome,
    RoundResult,
    RunState,
    RunStatus,
    SecondOrder,
    SubmitOutcome,
    TensorSpec,
    UpdateKind,
)

log = logging.getLogger(__name__)

_LIMITS = Limits()  # the defaults of the engine's limits


class Validator(Protocol):
    """Server-side validation on flat parameter vectors."""

    def gradient(self, flat: np.ndarray) -> tuple[np.ndarray, float, float]:
        """Mean validation-loss gradient at ``flat`` (float32), loss and accuracy."""
        ...

    def evaluate(self, flat: np.ndarray) -> tuple[float, float]:
        """Validation loss and accuracy at ``flat``."""
        ...


class RoundEngine:
    """Synchronous FedSGD: joins, rounds, weighted aggregation and DIG-FL scores.

    Args:
        cfg: round configuration.
        specs: the model's tensors (all float32), in canonical order.
        init_flat: initial parameters theta_0 as one flat float32 vector.
        validator: validation loss/accuracy/gradient on flat vectors.
        executor: where to compute v_t while parties train; ``None`` computes it inline.
        on_commit: called with each closed round's result and theta_{t+1} *before* the
            next model is published (the ledger commits here).
        on_publish: called with (round, theta_round) to publish a model to the parties;
            theta_round is one of the engine's two buffers: encode or copy it now.
        on_finish: called once with the final state (DONE or FAILED) and a reason.
        on_join: called with (party, num_samples) when a party first joins or changes
            its sample count (the ledger records the registry here).
        clock: monotonic seconds.
        start_round: first round (a resumed run continues from its last committed
            round).
        max_in_flight: uploads buffered at once (each holds one model-sized buffer).
        max_parties: parties that may join.
        upload_idle_s: an upload that sends nothing for this long is discarded.
        spill: where accepted updates wait for the close (norm bound) and for
            v_{t+1} (digfl-2); in memory when ``None``.
        on_second_order: called with a round's digfl-2 scores once they are computed
            (after v_{t+1}, while the next round runs), at the latest before the
            commit of the round two after it (or at the end of the run).
        pending_second: a resumed run's last committed round still waiting for
            its digfl-2 scores.
        second_order_executor: where the digfl-2 jobs run (default: ``executor``);
            a thread of their own keeps a slow job from delaying the next v_t.
        max_samples: the largest sample count a party may claim.
        strategy: the aggregation rule and server optimiser (built from ``cfg``
            when ``None``); its state is :meth:`strategy_state`.
        upload_min_rate_bytes_s: after ``upload_grace_s`` an upload slower than this
            (on average) is discarded, which also bounds its overall time.
        upload_grace_s: time an upload gets before its rate is judged.
        theta_buffers: two model-sized float32 vectors the engine alternates between:
            one holds theta_t, the other accumulates the round's weighted sum and
            becomes theta_{t+1} at the close (allocated here when ``None``). So
            ``engine.theta`` (theta_t) stays intact through round t, until round t+1
            folds its first update; copy it to keep it longer.
    """

    def __init__(
        self,
        cfg: RoundConfig,
        specs: Sequence[TensorSpec],
        init_flat: np.ndarray,
        validator: Validator,
        *,
        executor: Executor | None = None,
        on_commit: Callable[[RoundResult, np.ndarray], None] | None = None,
        on_publish: Callable[[int, np.ndarray], object] | None = None,
        on_finish: Callable[[RunState, str], None] | None = None,
        on_join: Callable[[str, int], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        start_round: int = 0,
        max_in_flight: int = _LIMITS.max_inflight_uploads,
        max_parties: int = _LIMITS.max_parties,
        upload_idle_s: float = _LIMITS.upload_idle_s,
        upload_min_rate_bytes_s: float = _LIMITS.upload_min_rate_bytes_s,
        upload_grace_s: float = _LIMITS.upload_grace_s,
        theta_buffers: tuple[np.ndarray, np.ndarray] | None = None,
        spill: Spill | None = None,
        on_second_order: Callable[[SecondOrder], None] | None = None,
        pending_second: PendingSecond | None = None,
        max_samples: int = _LIMITS.max_num_samples,
        strategy: Strategy | None = None,
        second_order_executor: Executor | None = None,
    ) -> None:
        self.cfg = cfg
        self.strategy = strategy if strategy is not None else build_strategy(cfg)
        # Each party's share of the server optimiser's momentum (DESIGN §4).
        self.moments = PartyMoments()
        self.layout = FlatLayout.of(specs)
        theta_buffers = _theta_buffers(self.layout.size, init_flat, theta_buffers)
        self.theta = theta_buffers[0]  # theta_t
        self._spare = theta_buffers[1]  # the accumulator, then theta_{t+1}
        self._validator = validator
        self._executor = executor
        self._on_commit = on_commit
        self._on_publish = on_publish
        self._on_finish = on_finish
        self._on_join = on_join
        self._clock = clock
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self.uploads = UploadPool(
            self.layout.size,
            max_in_flight,
            upload_idle_s,
            clock,
            min_rate_bytes_s=upload_min_rate_bytes_s,
            grace_s=upload_grace_s,
            wire_itemsize=4 if cfg.wire_dtype == "float32" else 2,
        )
        self.parties = PartyTable(max_parties, clock, max_samples)
        self.spill: Spill = spill if spill is not None else MemorySpill()
        # digfl-2 of the closed rounds, from their close to the ledger.
        self._digfl2 = SecondOrderJobs(
            self.spill,
            second_order_executor or executor,
            on_second_order,
            pending_second,
        )
        self._last_bound = math.inf  # B of the last closed round (early-fold limit)
        self.state = RunState.WAITING
        self.reason = ""
        self.round_index = start_round
        self.rounds_done = start_round
        self._round: OpenRound | None = None
        self._sampled: dict[int, frozenset[str] | None] = {}  # the last two rounds'
        self._retries = 0
        # Accepted digests of the last two rounds: resends after a close get their OK.
        self._history: dict[tuple[int, str], AcceptedUpdate] = {}
        self._started_at = clock()
        self._finished_at: float | None = None  # elapsed_s stops counting here
        self._join_deadline = self._started_at + cfg.join_timeout_s
        self._last_round_s = 0.0
        self._val_loss = float("nan")
        self._val_acc = float("nan")
        self._late: tuple[str, ...] = ()
        # Set under the lock, carried out by _run_effects once it is released.
        self._pending_publish: tuple[int, np.ndarray] | None = None
        self._finish_pending = False
        self.stop_error: BaseException | None = None
        # An upload that could not be written to the spill (disk full): the next
        # tick raises it, and the owner stops the run naming it.
        self.storage_error: OSError | None = None
        """What stopped the run from outside the rounds' own logic, if anything."""
        if start_round >= cfg.rounds:
            self.state = RunState.DONE
            self.reason = "completed"

    # ---------------------------------------------------------------- queries
    @property
    def specs(self) -> tuple[TensorSpec, ...]:
        """The model's tensor specs."""
        return self.layout.specs

    @property
    def open_round(self) -> int:
        """Index of the open round (or of the next round while waiting)."""
        return self.round_index

    @property
    def finished(self) -> bool:
        """True once the run is DONE or FAILED."""
        return self.state.finished

    def status(self) -> RunStatus:
        """A snapshot for GetStatus (never waits for a round's close)."""
        with self._lock:
            return RunStatus(
                state=self.state,
                open_round=self.round_index,
                rounds_total=self.cfg.rounds,
                rounds_done=self.rounds_done,
                joined=self.parties.ids(),
                submitted=tuple(sorted(self._round.accepted)) if self._round else (),
                late=self._late,
                elapsed_s=(self._finished_at or self._clock()) - self._started_at,
                last_round_s=self._last_round_s,
                val_loss=self._val_loss,
                val_acc=self._val_acc,
                reason=self.reason,
            )

    # ---------------------------------------------------------------- parties
    def join(
        self, party_id: str, num_samples: int, attested: int | None = None
    ) -> None:
        """Register (or re-register) a party; it counts from the open round on.

        ``attested``: the operator's count for the party (a claim above is refused).
        A refused join changes nothing.
        """
        with self._lock:
            changed = self.parties.join(party_id, num_samples, attested)
            self._changed.notify_all()
        # Outside the lock: the ledger's fsync must not hold up other joins.
        if changed and self._on_join is not None:
            self._on_join(party_id, num_samples)

    def touch(self, party_id: str) -> None:
        """Mark a joined party as alive (it reconnected); it is waited for again."""
        with self._lock:
            info = self.parties.get(party_id)
            if info is not None:
                self.parties.seen(info)

    # ------------------------------------------------------------ submissions
    def begin_submission(
        self,
        party_id: str,
        round_index: int,
        num_samples: int,
        *,
        train_loss: float = float("nan"),
        update_kind: UpdateKind | None = None,
        submission_id: str = "",
        slot_timeout_s: float = _LIMITS.upload_slot_timeout_s,
    ) -> Submission | Resend:
        """Start receiving one update; refuse wrong round, unknown party, duplicates."""
        label = f"party {party_id}, round {round_index}"
        _check_header(label, num_samples, train_loss, update_kind, self.cfg)
        with self._lock:
            info = self.parties.get(party_id)
            if info is None:
                raise UnknownPartyError(
                    f"party {party_id} has not joined; call Join first"
                )
            if num_samples != info.num_samples:
                # The weight must be the count the registry (and the ledger) holds.
                raise InvalidUpdateError(
                    f"{label}: num_samples {num_samples} differs from the "
                    f"{info.num_samples} declared at Join (fixed for the run)"
                )
            self.parties.seen(info)
            past = self._history.get((round_index, party_id))
            if (
                past is not None
                and submission_id
                and past.submission_id == submission_id
            ):
                return Resend(self.layout, round_index, party_id, submission_id, past)
            if past is not None and self.cfg.buffered:
                # FedBuff: one update per model version a party trained on; the same
                # work replayed into later versions under new ids is not new work.
                raise DuplicateSubmissionError(
                    f"{label}: an update computed on version {round_index} "
                    f"({past.submission_id or 'no id'}) was already accepted; train "
                    "on the current version"
                )
            rnd, staleness = self._open_for_updates(label, round_index, party_id)
            prev = rnd.accepted.get(party_id)
            if prev is not None:
                if prev.submission_id != submission_id:
                    raise DuplicateSubmissionError(
                        f"{label}: an update ({prev.submission_id or 'no id'}) was "
                        "already accepted; resend it with the same submission id or "
                        f"wait for round {rnd.index + 1}"
                    )
                return Resend(self.layout, rnd.index, party_id, submission_id, prev)
            counted = bounds.weight_count(
                num_samples,
                rnd.count_caps.get(party_id, rnd.count_cap_late),
                info.attested is not None,
            )
            # One party holds at most its share of the slots, so a stalled or
            # drip-feeding party never locks the honest ones out.
            share = max(1, self.uploads.slots // max(1, len(self.parties.active())))
            weight = (
                None
                if aggregate.buffers_updates(self.cfg.aggregation)
                or not self.strategy.streaming
                else self.strategy.rule.fixed_weight(counted, rnd.weight_ref)
            )
            sub = Submission(
                self,
                self.uploads,
                self.layout,
                rnd.index,
                rnd.val_grad,
                party_id,
                num_samples,
                train_loss,
                submission_id,
                weight,
                slot_timeout_s,
                self._clock,
                counted,
                share,
            )
            if staleness:
                sub.staleness = staleness
                sub.stale_factor = (1.0 + staleness) ** -self.cfg.staleness_exponent
            return sub

    def _open_for_updates(
        self, label: str, round_index: int, party_id: str
    ) -> tuple[OpenRound, int]:
        """The open round if it takes this update, and the update's staleness.

        In synchronous rounds ``round_index`` must be the open round (and, with client
        sampling, the party one of those asked); with FedBuff it may be up to
        ``max_staleness`` versions old.
        """
        if self.state == RunState.DONE:
            raise StaleRoundError(
                f"{label}: training is over after {self.rounds_done} rounds"
            )
        if self.state == RunState.FAILED:
            raise StaleRoundError(f"{label}: the run failed ({self.reason})")
        rnd = self._round
        if rnd is None or self.state != RunState.TRAINING:
            raise StaleRoundError(
                f"{label}: no round is open yet (waiting for parties); the next is "
                f"{self.round_index}"
            )
        staleness = rnd.index - round_index
        if self.cfg.buffered and 0 < staleness <= self.cfg.max_staleness:
            pass  # FedBuff: applied to the open version, weighted by its staleness
        elif staleness:
            when = "past" if round_index < rnd.index else "future"
            limit = (
                f" (more than --max-staleness {self.cfg.max_staleness} versions old)"
                if self.cfg.buffered and staleness > 0
                else ""
            )
            raise StaleRoundError(
                f"{label}: {when} round{limit}; open round is {rnd.index}"
            )
        if rnd.closing and not self.cfg.buffered:  # FedBuff: it follows (accept)
            raise StaleRoundError(
                f"{label}: round {rnd.index} is closing; the next round is "
                f"{rnd.index + 1}"
            )
        if rnd.sampled is not None and party_id not in rnd.sampled:
            raise StaleRoundError(
                f"{label}: party {party_id} was not sampled for round {rnd.index} "
                f"({len(rnd.sampled)} of {len(self.parties)} parties were); it is "
                "asked again in a later round"
            )
        return rnd, staleness

    def accept(self, sub: Submission, digest: str) -> SubmitOutcome:
        """Take a whole, validated update into its round (called by ``finish``)."""
        if self.cfg.buffered:
            self._follow_versions(sub)
        # Outside the lock: the copy to the spill is the size of the model. It becomes
        # the party's stored update only if the round takes it (under the lock).
        try:
            staged = self.spill.stage(sub.round, sub.party_id, sub.update)
        except OSError as err:
            # Disk full or gone: nothing of this round can be stored. The driver's
            # next tick stops the run with this cause (resumable, DESIGN §6).
            self.storage_error = err
            raise UnavailableError(
                f"{sub.label}: the aggregator cannot store the update ({err}); the "
                "run stops and will be resumed"
            ) from err
        committed = False
        try:
            with self._lock:
                rnd = self._round
                if (
                    rnd is None
                    or rnd.index != sub.round
                    or rnd.closing
                    or self.finished
                ):
                    raise StaleRoundError(
                        f"{sub.label}: the round closed while the update was in "
                        f"flight; open round is {self.round_index}"
                    )
                known = sub.party_id in rnd.accepted
                outcome = rnd.take(sub, digest, self._spare)
                if not known:  # an identical resend keeps the stored update
                    self.spill.commit(staged)
                    committed = True
                # Keyed by the round the party trained on: its resend names that one.
                base = rnd.index - sub.staleness
                self._history[(base, sub.party_id)] = rnd.accepted[sub.party_id]
                if rnd.complete(self.cfg, self.parties.active()):
                    # Wake the driver to close now. Otherwise it looks again within
                    # its poll (deadlines): a wake-up per upload cost a thread
                    # switch each at 1,000 parties.
                    self._changed.notify_all()
                return outcome
        finally:
            if not committed:
                self.spill.discard(staged)

    def accepts_now(self) -> bool:
        """Whether :meth:`accept` takes an update without waiting.

        The spill has a free buffer, and no FedBuff version can be closing under it.
        """
        return not self.cfg.buffered and self.spill.has_room()

    def _follow_versions(self, sub: Submission) -> None:
        """FedBuff: move an upload whose version closed meanwhile to the open one.

        A slow party's update then still counts, as FedBuff intends: staleness one
        more, scored against the open version's v (one pass over the update).
        Beyond ``max_staleness`` it stays where it was and is refused.
        """
        with self._lock:
            # A version closing now opens the next in well under a round's timeout.
            self._changed.wait_for(
                lambda: self._round is None or not self._round.closing,
                timeout=self.cfg.round_timeout_s,
            )
            rnd = self._round
            if rnd is None or rnd.index == sub.round or rnd.closing:
                return
            staleness = rnd.index - (sub.round - sub.staleness)
            if staleness > self.cfg.max_staleness:
                return
            index, val_grad = rnd.index, rnd.val_grad
        dot = blocked_dot(val_grad.result()[0], sub.update)  # outside the lock
        factor = (1.0 + staleness) ** -self.cfg.staleness_exponent
        sub.rebind(index, staleness, factor, dot)

    # ----------------------------------------------------------------- rounds
    def wait(self, timeout_s: float) -> None:
        """Block until a join or submission changes something, or for ``timeout_s``."""
        with self._changed:
            self._changed.wait(timeout_s)

    def tick(self) -> None:
        """State machine step: start; close rounds on completion or deadline; fail.

        Decisions are taken under the engine lock; the work they lead to (the close,
        the commit, publishing) runs after it is released.
        """
        if self.storage_error is not None:
            raise self.storage_error
        if self.spill.error is not None:  # a background write failed (disk full)
            raise self.spill.error
        self._digfl2.collect()  # the digfl-2 jobs done since the last tick
        self.uploads.expire_idle(self._clock())
        with self._lock:
            now = self._clock()
            ending = self._step(now)
        if ending is None:
            self._run_effects()
        else:
            # Uploads still streaming into the closing round can no longer count:
            # free their slots for the next round now. (FedBuff: they count in the
            # next version instead.)
            dropped = (
                0 if self.cfg.buffered else self.uploads.abort_round(ending[0].index)
            )
            if dropped:
                log.info(
                    "round %d closing: %d uploads in flight discarded",
                    ending[0].index,
                    dropped,
                )
            self._conclude(*ending, now)

    def _step(self, now: float) -> tuple[OpenRound, Ending] | None:
        """Start or fail the run, or decide the open round ends (under the lock)."""
        if self.state == RunState.WAITING:
            if len(self.parties) >= self.cfg.start_parties:
                self.state = RunState.TRAINING
                self._pending_publish = self._open_round(now)
            elif now >= self._join_deadline:
                self._set_finished(
                    RunState.FAILED,
                    f"only {len(self.parties)} of {self.cfg.start_parties} parties "
                    f"joined within {self.cfg.join_timeout_s:g} s",
                )
            return None
        rnd = self._round
        if self.state != RunState.TRAINING or rnd is None or rnd.closing:
            return None
        decision = rnd.ending(self.cfg, self.parties.active(), now)
        if decision is None:
            return None
        rnd.closing = True
        # Who missed the round, as of now: a party joining while it closes is not;
        # nor is one that was not sampled, nor (FedBuff) one still training.
        asked = self.parties.ids() if rnd.sampled is None else sorted(rnd.sampled)
        rnd.late = (
            ()
            if self.cfg.buffered
            else tuple(p for p in asked if p not in rnd.accepted)
        )
        return rnd, decision

    def _conclude(self, rnd: OpenRound, ending: Ending, now: float) -> None:
        """Close, commit and advance, or record the failure (outside the lock)."""
        reason, what = ending.reason, ending.what
        if ending.stop_run:
            if rnd.val_grad.done() and rnd.val_grad.exception() is not None:
                # Not the round's fault (e.g. the validation worker died): the
                # owner may treat the stop as resumable.
                self.stop_error = rnd.val_grad.exception()
            with self._lock:
                self._round = None
                self._set_finished(RunState.FAILED, f"failed: {reason}")
            self._run_effects()
            return
        if ending.outcome is RoundOutcome.OK:
            result, new_theta, pending = self._close(rnd, now)
            if result.ok and pending is not None:
                # The close does not wait for round t-1's digfl-2 job (it may still be
                # reading the spill): the ledger may hold round t before it, never
                # before round t-2's.
                self._digfl2.collect(through=rnd.index - 2)
                self._commit(result, new_theta)
                self._digfl2.closed(pending)
                if rnd.index + 1 >= self.cfg.rounds:
                    # The last round: one extra gradient pass at theta_T for digfl-2.
                    self._digfl2.final(self._final_gradient(new_theta))
                self._last_bound = (
                    result.parties[0].norm_bound if result.parties else math.inf
                )
                with self._lock:
                    self._advance(rnd, result, new_theta)
                self._run_effects()
                return
            reason, what = result.reason, "aggregation failed"
        self._round_failed(rnd, now, reason, what)

    def _final_gradient(self, theta: np.ndarray) -> np.ndarray | None:
        """v_T = grad L_v(theta_T), or None (logged) when the pass fails."""
        try:
            return self._validator.gradient(theta)[0]
        except Exception as e:  # the model is committed; only digfl-2 is lost
            log.warning(
                "final validation gradient failed (%s): no digfl-2 for the last round",
                e,
            )
            return None

    def _close(
        self, rnd: OpenRound, now: float
    ) -> tuple[RoundResult, np.ndarray, PendingSecond | None]:
        """The step and the validation pass of a closing round (outside the lock)."""
        t0 = time.perf_counter()
        v_t, loss_before, acc_before = rnd.val_grad.result()
        val_grad_s = time.perf_counter() - t0
        # A failed step must leave the optimiser's state (and the parties' momenta)
        # as they were: the retry starts from them again.
        saved = None if self.strategy.streaming else self.strategy_state()
        step = aggregate.close_step(
            self.cfg,
            rnd.index,
            rnd.accepted,
            self.theta,
            self._spare,
            rnd.weight_sum,
            rnd.folded,
            self.spill,
            self.uploads.recycle,
            self.strategy,
            v_t,
            self.moments,
        )
        late, before = rnd.late, (loss_before, acc_before)
        if not np.isfinite(step.theta).all():
            reason = (
                f"round {rnd.index}: the aggregated model is not finite (updates too "
                "large); nothing was applied"
            )
            if saved is not None:
                self.load_strategy_state(saved)
            return rnd.failed(reason, late, before, now), self.theta, None
        after = self._validator.evaluate(step.theta)
        if step.trapezoid:
            pending = PendingSecond(
                rnd.index,
                {p: step.coefficient(p, self.cfg) for p in rnd.accepted},
                {p: e.dot for p, e in rnd.accepted.items()},
            )
        else:  # a party's part is not c <v, u_i>: digfl-2 = digfl-1 (DESIGN §4)
            pending = PendingSecond(rnd.index, {}, {}, fixed=dict(step.scores))
        result = rnd.result(step, late, before, after, now, val_grad_s)
        result.extra.update(self._round_extra(rnd, step))
        return result, step.theta, pending

    def _round_extra(self, rnd: OpenRound, step: aggregate.Step) -> dict[str, object]:
        """What the ledger keeps of a round beyond its rows.

        The strategy, the sampled parties, FedBuff staleness and the momentum carry
        of absent parties.
        """
        extra: dict[str, object] = {}
        # digfl reweights the samples rule's step: its own name, not the rule's.
        name = "digfl" if self.cfg.aggregation == "digfl" else self.strategy.name
        if name != "samples":
            extra["strategy"] = name
        if rnd.sampled is not None:
            extra["sampled"] = sorted(rnd.sampled)
        stale = {p: e.staleness for p, e in rnd.accepted.items() if e.staleness}
        if stale:
            extra["staleness"] = dict(sorted(stale.items()))
        if step.carry:
            extra["carry"] = dict(sorted(step.carry.items()))
        return extra

    # -------------------------------------------------------- strategy state
    def strategy_state(self) -> dict[str, np.ndarray]:
        """The server optimiser's state and the parties' momenta (copies).

        For the checkpoint of the round just committed; empty for plain strategies.
        """
        state = {f"opt:{k}": v for k, v in self.strategy.optimiser.state().items()}
        state.update(self.moments.state())
        return state

    def load_strategy_state(self, state: Mapping[str, np.ndarray]) -> None:
        """Restore :meth:`strategy_state` (a resumed run, or a failed step)."""
        opt = {k[4:]: v for k, v in state.items() if k.startswith("opt:")}
        if opt:
            self.strategy.optimiser.load_state(opt)
        self.moments.load_state(state)

    def _advance(
        self, rnd: OpenRound, result: RoundResult, new_theta: np.ndarray
    ) -> None:
        """After the commit (under the lock): theta_{t+1} is current; open round t+1."""
        self.parties.deactivate(result.late)
        self._spare, self.theta = self.theta, new_theta
        self._val_loss, self._val_acc = result.val_loss_after, result.val_acc_after
        self._late = result.late
        self._last_round_s = result.duration_s
        self._retries = 0
        # FedBuff: a resend may name a model up to max_staleness versions older.
        horizon = rnd.index - 1 - (self.cfg.max_staleness if self.cfg.buffered else 0)
        for key in [k for k in self._history if k[0] < horizon]:
            del self._history[key]
        log.info(
            "round %d closed: %d parties, val loss %.4f -> %.4f, acc %.3f, %.2f s",
            rnd.index,
            len(result.parties),
            result.val_loss_before,
            result.val_loss_after,
            result.val_acc_after,
            result.duration_s,
        )
        self.round_index += 1
        self.rounds_done += 1
        self._round = None
        if self.finished:  # stopped while the round closed: the commit stands
            return
        if self.round_index >= self.cfg.rounds:
            self._set_finished(RunState.DONE, "completed")
        else:
            self._pending_publish = self._open_round(self._clock())

    def _commit(self, result: RoundResult, theta_next: np.ndarray) -> None:
        if self.spill.error is not None:
            # A write of this round's updates may have failed: stop uncommitted, as
            # a refused upload did; --resume reopens the round.
            raise self.spill.error
        if self._on_commit is not None:
            self._on_commit(result, theta_next)

    def _round_failed(self, rnd: OpenRound, now: float, reason: str, what: str) -> None:
        """Record the open round as failed; retry it or stop the run (DESIGN §3)."""
        loss_before, acc_before = (float("nan"), float("nan"))
        if rnd.val_grad.done() and rnd.val_grad.exception() is None:
            _, loss_before, acc_before = rnd.val_grad.result()
        late = rnd.late
        with self._lock:
            self.parties.deactivate(late)
            # Discard what the round received: it will not be applied.
            for entry in rnd.accepted.values():
                if entry.buffer is not None:
                    self.uploads.recycle(entry.buffer)
                    entry.buffer = None
            gone = {id(e) for e in rnd.accepted.values()}
            for key in [k for k, e in self._history.items() if id(e) in gone]:
                del self._history[key]
        result = rnd.failed(reason, late, (loss_before, acc_before), now)
        result.extra["attempt"] = self._retries
        self._digfl2.collect()  # a retry opens with the same theta: its job stands
        self.spill.drop(rnd.index)  # what the round received is not applied
        self._commit(result, self.theta)
        log.warning("%s", reason)
        with self._lock:
            self._round = None
            if not self.finished:
                if self._retries < self.cfg.quorum_retries:
                    self._retries += 1
                    log.warning(
                        "retrying round %d (%d of %d)",
                        rnd.index,
                        self._retries,
                        self.cfg.quorum_retries,
                    )
                    self._pending_publish = self._open_round(self._clock())
                else:
                    self._set_finished(RunState.FAILED, f"{what}: {reason}")
        self._run_effects()

    def _open_round(self, now: float) -> tuple[int, np.ndarray]:
        """Open round ``round_index`` (under the lock); returns what to publish."""
        theta = self.theta
        digest = update_digest(theta)  # XXH3-128: ~1 ms, where SHA-256 cost 25 ms/40 MB
        if self._executor is None:
            fut: ValGrad = Future()
            fut.set_result(self._validator.gradient(theta))
        else:
            # v_t is computed while the parties train; theta is never modified in place.
            fut = self._executor.submit(self._validator.gradient, theta)
        self._start_second_order(fut)
        claims, attested = self.parties.claims(), self.parties.attested()
        caps, late_cap = bounds.count_caps(claims, self.cfg.claim_cap)
        counted = sum(
            bounds.weight_count(n, caps.get(p), p in attested)
            for p, n in claims.items()
        )
        self._round = OpenRound(
            self.round_index,
            now,
            now + self.cfg.round_timeout_s,
            fut,
            digest,
            float(counted or 1),
            count_caps=caps,
            count_cap_late=late_cap,
            fold_limit=bounds.early_fold_limit(self._last_bound, self.cfg.norm_bound),
            keep_buffers=aggregate.buffers_updates(self.cfg.aggregation),
            sampled=self._sample() if self.cfg.sampling else None,
        )
        self._sampled = {
            r: s for r, s in self._sampled.items() if r >= self.round_index - 1
        }
        self._sampled[self.round_index] = self._round.sampled
        log.info("round %d open", self.round_index)
        self._changed.notify_all()
        return self.round_index, theta

    def _sample(self) -> frozenset[str]:
        """Client sampling: the parties asked to train in the opening round.

        Seeded by (seed, round, attempt): the same joined parties give the same
        subsets in every run. Drawn from the active parties first (a party that
        missed its last round is asked only when too few others are).
        """
        cfg, ids = self.cfg, self.parties.ids()
        want = cfg.asked_per_round(len(ids))
        active = set(self.parties.active())
        rng = np.random.default_rng([cfg.seed, self.round_index, self._retries])
        first = sorted(p for p in ids if p in active)
        rest = sorted(p for p in ids if p not in active)
        order = [first[i] for i in rng.permutation(len(first))]
        order += [rest[i] for i in rng.permutation(len(rest))]
        return frozenset(order[:want])

    def sampled(self, party_id: str, round_index: int) -> bool:
        """Whether ``party_id`` is asked to train in ``round_index``.

        Always True without client sampling; False for a round not open any more.
        """
        with self._lock:
            if not self.cfg.sampling:
                return True
            chosen = self._sampled.get(round_index)
            return chosen is not None and party_id in chosen

    # ------------------------------------------------------------ digfl-2
    def _start_second_order(self, val_grad: ValGrad) -> None:
        """Once v_{t+1} (``val_grad``) exists, score the last closed round (digfl-2)."""
        self._digfl2.start(val_grad)

    def _set_finished(self, state: RunState, reason: str) -> None:
        """Record the end of the run (under the lock); on_finish runs after it."""
        self.state = state
        self.reason = reason
        self._finished_at = self._clock()
        if state == RunState.FAILED:
            log.error("run failed: %s", reason)
        else:
            log.info("run done after %d rounds", self.rounds_done)
        self._finish_pending = True
        self._changed.notify_all()

    def _run_effects(self) -> None:
        """Publish the opened round or report the end, outside the lock, in order."""
        with self._lock:
            publish, self._pending_publish = self._pending_publish, None
            finish, self._finish_pending = self._finish_pending, False
            state, reason = self.state, self.reason
        if publish is not None and self._on_publish is not None:
            self._on_publish(*publish)
        if finish and self._on_finish is not None:
            self._on_finish(state, reason)

    def stop(self, reason: str = "stopped") -> None:
        """End the run now (operator request); the open round is not applied."""
        with self._lock:
            if self.finished:
                return
            self._round = None
            self._set_finished(
                RunState.FAILED if reason != "completed" else RunState.DONE, reason
            )
        self._run_effects()


def _theta_buffers(
    size: int,
    init_flat: np.ndarray,
    given: tuple[np.ndarray, np.ndarray] | None,
) -> tuple[np.ndarray, np.ndarray]:
    """The two theta buffers, checked (or allocated), the first holding theta_0."""
    if init_flat.shape != (size,):
        raise InvalidUpdateError(
            f"initial model has {init_flat.size} elements; specs need {size}"
        )
    pair = given or (np.empty(size, np.float32), np.empty(size, np.float32))
    for buf in pair:
        if buf.shape != (size,) or buf.dtype != np.float32:
            raise InvalidUpdateError(f"theta buffers must be float32 vectors of {size}")
    np.copyto(pair[0], init_flat, casting="same_kind")
    return pair


def _check_header(
    label: str,
    num_samples: int,
    train_loss: float,
    update_kind: UpdateKind | None,
    cfg: RoundConfig,
) -> None:
    if num_samples <= 0:
        raise InvalidUpdateError(f"{label}: num_samples must be > 0, got {num_samples}")
    if update_kind is not None and update_kind != cfg.update_kind:
        raise InvalidUpdateError(
            f"{label}: update kind {update_kind.value}; this run expects "
            f"{cfg.update_kind.value}"
        )
    if not np.isfinite(train_loss) and not np.isnan(train_loss):
        raise InvalidUpdateError(f"{label}: train loss {train_loss} is not finite")


def submit_arrays(
    engine: RoundEngine,
    party_id: str,
    round_index: int,
    num_samples: int,
    update: Mapping[str, np.ndarray],
    *,
    train_loss: float = float("nan"),
    submission_id: str = "",
) -> SubmitOutcome:
    """Submit a whole in-memory update (the in-process path: simulation, tests)."""
    flat = engine.layout.flatten(update)
    sub = engine.begin_submission(
        party_id,
        round_index,
        num_samples,
        train_loss=train_loss,
        submission_id=submission_id,
    )
    try:
        for i, off in enumerate(engine.layout.offsets):
            n = engine.layout.specs[i].numel
            sub.add(i, 0, flat[off : off + n])
        return sub.finish(update_digest(flat))
    except BaseException:
        sub.abort()
        raise
