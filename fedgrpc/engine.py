"""The synchronous FedSGD round engine (DESIGN §3-4). No grpc, no torch.

The engine holds the global parameters as one flat float32 vector, the party registry
and the open round. Updates arrive through :class:`Submission` objects chunk by chunk:
each chunk is checked for non-finite values and folded into the party's DIG-FL inner
product with the validation gradient v_t as it arrives; the party's update is buffered
only while its own stream is in flight, and is added to the round's weighted sum only
once the whole stream has arrived and validated (nothing is ever half-applied). A
bounded number of uploads may be in flight at once, so server memory is O(model size),
not O(parties x model size), except with ``aggregation="digfl"``, whose weights need
every score before any update can be folded: it keeps the round's updates until the
round closes (parties x model size).

Threading: every public method is safe to call from any thread. The owner calls
:meth:`tick` (and :meth:`wait`) from one driver thread; rounds close inside
:meth:`tick`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from fedgrpc import contribution
from fedgrpc.config import RoundConfig
from fedgrpc.errors import (
    DuplicateSubmissionError,
    FedGrpcError,
    InvalidUpdateError,
    LimitError,
    StaleRoundError,
    UnknownPartyError,
)
from fedgrpc.layout import FlatLayout, update_digest
from fedgrpc.types import PartyRound, RoundResult, TensorSpec, UpdateKind

log = logging.getLogger(__name__)

_FOLD_BLOCK = 1 << 18  # elements per block of the weighted fold (1 MiB of float32)


class Validator(Protocol):
    """Server-side validation on flat parameter vectors."""

    def gradient(self, flat: np.ndarray) -> tuple[np.ndarray, float, float]:
        """Mean validation-loss gradient at ``flat`` (float32), loss and accuracy."""
        ...

    def evaluate(self, flat: np.ndarray) -> tuple[float, float]:
        """Validation loss and accuracy at ``flat``."""
        ...


class RunState(StrEnum):
    """Life cycle of a run."""

    WAITING = "waiting"  # for the first quorum of joins
    TRAINING = "training"
    DONE = "done"
    FAILED = "failed"


@dataclass
class PartyInfo:
    """What the engine knows of a joined party."""

    party_id: str
    num_samples: int
    active: bool = True  # counted when deciding whether every party has submitted
    joined_at: float = 0.0
    last_seen: float = 0.0


@dataclass
class _Accepted:
    submission_id: str
    digest: str
    num_samples: int
    train_loss: float
    dot: float
    norm_sq: float
    buffer: np.ndarray | None = None  # only with digfl aggregation


@dataclass
class _Round:
    index: int
    opened_at: float
    deadline: float
    val_grad: Future[tuple[np.ndarray, float, float]]
    model_digest: str
    accepted: dict[str, _Accepted] = field(default_factory=dict)
    weight_ref: float = 1.0  # sum of the joined parties' samples when the round opened
    acc: npt.NDArray[np.float32] | None = None  # sum of weight_i * u_i
    weight_sum: float = 0.0


@dataclass(frozen=True)
class SubmitOutcome:
    """Result of a finished submission."""

    accepted: bool
    round: int
    message: str
    submission_id: str
    duplicate: bool = False


class _DoneFuture(Future[tuple[np.ndarray, float, float]]):
    def __init__(self, value: tuple[np.ndarray, float, float]) -> None:
        super().__init__()
        self.set_result(value)


class Submission:
    """One party's update for one round, received piece by piece.

    Call :meth:`add` for each piece (in any order the caller has validated), then
    :meth:`finish` with the stream's digest, or :meth:`abort` on any failure. Pieces go
    into a private buffer; the shared round state changes only in :meth:`finish`.
    """

    def __init__(
        self,
        engine: RoundEngine,
        rnd: _Round,
        party_id: str,
        num_samples: int,
        train_loss: float,
        submission_id: str,
        resend_of: _Accepted | None,
    ) -> None:
        self._engine = engine
        self._round = rnd
        self.party_id = party_id
        self.round = rnd.index
        self._num_samples = num_samples
        self._train_loss = train_loss
        self.submission_id = submission_id
        self._resend_of = resend_of
        self._dot = 0.0
        self._norm_sq = 0.0
        self._closed = False
        self._kept = False
        self._expired = False
        self._unscored: list[
            tuple[int, int]
        ] = []  # ranges received before v_t was ready
        self._v: np.ndarray | None = None
        self._buffer: np.ndarray | None = (
            None  # taken with an upload slot at the first piece
        )
        self._lock = threading.Lock()  # add() vs. expiry by the driver thread
        self._slot_timeout_s = 60.0
        self.last_activity = engine._clock()
        self._label = f"party {party_id}, round {rnd.index}"
        # With a fixed weight (not digfl) the buffer holds weight * update, scaled
        # while copying: the fold at finish is then a single add. The products are
        # the same float32 roundings as scaling at the fold.
        self._weight = engine._fixed_weight(rnd, num_samples)
        self._scale: np.float32 | None = (
            None
            if engine.cfg.aggregation == "digfl" or resend_of is not None
            else np.float32(self._weight)
        )

    def reserve(self) -> None:
        """Take the upload slot and buffer now, before any piece is read.

        The gRPC servicer calls this right after the header: an upload waiting for a
        slot then holds nothing but its header, and HTTP/2 flow control keeps its
        data on the sender, instead of a received 1 MiB chunk per waiting stream.
        (A resend of an accepted submission needs no slot.)
        """
        if self._resend_of is None and self._buffer is None and not self._closed:
            self._buffer = self._engine._acquire_upload(self, self._slot_timeout_s)

    def add(self, tensor_index: int, elem_offset: int, values: np.ndarray) -> None:
        """Take 1-D float32 ``values`` for a tensor, starting at ``elem_offset``."""
        if self._closed:
            raise self._closed_error()
        layout = self._engine.layout
        spec = layout.specs[tensor_index]
        if elem_offset + values.size > spec.numel:
            raise InvalidUpdateError(
                f"{self._label}: tensor {spec.name!r} overflows at element "
                f"{elem_offset}"
            )
        start = layout.offsets[tensor_index] + elem_offset
        end = start + values.size
        if self._resend_of is not None:  # a resend: only its digest matters
            return
        if self._buffer is None:
            self._buffer = self._engine._acquire_upload(self, self._slot_timeout_s)
        if self._v is None and self._round.val_grad.done():
            self._v = self._round.val_grad.result()[0]
        with self._lock:
            if self._closed:
                raise self._closed_error()
            self.last_activity = self._engine._clock()
            self._add(spec.name, start, end, elem_offset, values)

    def _closed_error(self) -> FedGrpcError:
        if self._expired:
            return LimitError(
                f"{self._label}: upload idle for more than "
                f"{self._engine.upload_idle_s:g} s; it was discarded"
            )
        return InvalidUpdateError(f"{self._label}: submission already closed")

    def expire(self) -> None:
        """Discard an upload that stopped sending (called by the driver thread)."""
        self._expired = True
        self.abort()

    def _add(
        self, name: str, start: int, end: int, elem_offset: int, values: np.ndarray
    ) -> None:
        assert self._buffer is not None
        if values.dtype != np.float32:
            values = values.astype(np.float32)
        # Non-finite check folded into the norm: ||x||^2 is finite iff every x is
        # finite, unless finite values overflow float32 squares; then look element-wise.
        with np.errstate(over="ignore"):  # overflow is handled just below
            nsq = float(np.dot(values, values))
        if not np.isfinite(nsq):
            bad = ~np.isfinite(values)
            if bad.any():
                first = int(np.flatnonzero(bad)[0]) + elem_offset
                raise InvalidUpdateError(
                    f"{self._label}: tensor {name!r} has a non-finite value "
                    f"({values[first - elem_offset]}) at element {first}"
                )
            nsq = float(np.dot(values.astype(np.float64), values.astype(np.float64)))
        # DIG-FL: <v_t, u_i> accumulated chunk by chunk: a float32 BLAS dot per chunk
        # (fast), summed across chunks in float64. Different chunkings agree to ~1e-5
        # relative, far inside the scores' own first-order error.
        self._norm_sq += nsq
        if self._scale is None:
            self._buffer[start:end] = values
        else:
            np.multiply(values, self._scale, out=self._buffer[start:end])
        if self._v is None:
            # v_t is still being computed: keep streaming, score this range later from
            # the buffer rather than stall the upload (and its sender) on v_t.
            self._unscored.append((start, end))
        else:
            self._score_pending()
            self._dot += float(np.dot(self._v[start:end], values))

    def _score_pending(self) -> None:
        assert self._v is not None and self._buffer is not None
        dot = 0.0
        for s, e in self._unscored:
            dot += float(np.dot(self._v[s:e], self._buffer[s:e]))
        self._dot += dot if self._scale is None else dot / float(self._scale)
        self._unscored.clear()

    def finish(self, digest: str) -> SubmitOutcome:
        """Fold the update into the round (the caller has checked completeness)."""
        with self._lock:
            if self._closed:
                raise LimitError(
                    f"{self._label}: upload was discarded (idle or closed)"
                )
            self._closed = True
        if self._buffer is None and self._resend_of is None:
            # An update with no elements at all (a model of empty tensors).
            self._buffer = self._engine._acquire_upload(self, self._slot_timeout_s)
        if self._unscored:
            self._v = self._round.val_grad.result()[0]  # wait for v_t only now
            self._score_pending()
        try:
            return self._engine._finish(self, digest)
        finally:
            self._release()

    def abort(self) -> None:
        """Discard everything received; the round is untouched."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._engine._abort(self)
        self._release()

    def _release(self) -> None:
        with self._lock:
            buf, self._buffer = self._buffer, None
        self._engine._uploads.discard(self)
        if buf is None:
            return
        if self._kept:  # digfl: the round keeps the buffer until it closes
            self._engine._slots.release()
        else:
            self._engine._return_buffer(buf)


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
        theta_buffers: two model-sized float32 vectors the engine alternates between:
            one holds theta_t, the other accumulates the round's weighted sum and
            becomes theta_{t+1} at the close (allocated here when ``None``). So
            ``engine.theta`` (theta_t) stays intact through round t, until round t+1
            folds its first update; copy it to keep it longer.
        upload_idle_s: an upload that sends nothing for this long is discarded and its
            slot released, so stalled or hostile streams cannot starve the others.
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
        max_in_flight: int = 4,
        max_parties: int = 1024,
        upload_idle_s: float = 60.0,
        theta_buffers: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> None:
        self.cfg = cfg
        self.layout = FlatLayout.of(specs)
        if init_flat.shape != (self.layout.size,):
            raise InvalidUpdateError(
                f"initial model has {init_flat.size} elements; specs need "
                f"{self.layout.size}"
            )
        if theta_buffers is None:
            theta_buffers = (
                np.empty(self.layout.size, dtype=np.float32),
                np.empty(self.layout.size, dtype=np.float32),
            )
        for buf in theta_buffers:
            if buf.shape != (self.layout.size,) or buf.dtype != np.float32:
                raise InvalidUpdateError(
                    f"theta buffers must be float32 vectors of {self.layout.size}"
                )
        np.copyto(theta_buffers[0], init_flat, casting="same_kind")
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
        self._slots = threading.BoundedSemaphore(max_in_flight)
        self._pool: list[np.ndarray] = []
        self._max_in_flight = max_in_flight
        self.upload_idle_s = upload_idle_s
        self._uploads: set[Submission] = set()
        self._max_parties = max_parties
        self.parties: dict[str, PartyInfo] = {}
        self.state = RunState.WAITING
        self.reason = ""
        self.round_index = start_round
        self.rounds_done = start_round
        self.results: list[RoundResult] = []
        self._round: _Round | None = None
        self._retries = 0
        self._history: dict[tuple[int, str], _Accepted] = {}
        self._started_at = clock()
        self._join_deadline = self._started_at + cfg.join_timeout_s
        self.last_round_s = 0.0
        self.val_loss = float("nan")
        self.val_acc = float("nan")
        self.late: tuple[str, ...] = ()
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

    def submitted(self) -> list[str]:
        """Parties whose update for the open round was accepted."""
        with self._lock:
            return sorted(self._round.accepted) if self._round else []

    @property
    def finished(self) -> bool:
        """True once the run is DONE or FAILED."""
        return self.state in (RunState.DONE, RunState.FAILED)

    # ---------------------------------------------------------------- parties
    def join(self, party_id: str, num_samples: int) -> PartyInfo:
        """Register (or re-register) a party; it counts from the open round on."""
        if num_samples <= 0:
            raise InvalidUpdateError(
                f"party {party_id} declared {num_samples} samples; need > 0"
            )
        with self._lock:
            now = self._clock()
            info = self.parties.get(party_id)
            changed = info is None or info.num_samples != num_samples
            if info is None:
                if len(self.parties) >= self._max_parties:
                    raise LimitError(
                        f"party {party_id} cannot join: {self._max_parties} parties "
                        "already"
                    )
                info = PartyInfo(party_id, num_samples, joined_at=now)
                self.parties[party_id] = info
                log.info("party %s joined with %d samples", party_id, num_samples)
            info.num_samples = num_samples
            info.active = True
            info.last_seen = now
            if changed and self._on_join is not None:
                self._on_join(party_id, num_samples)
            self._changed.notify_all()
            return info

    def touch(self, party_id: str) -> None:
        """Mark a joined party as alive (it reconnected); it is waited for again."""
        with self._lock:
            info = self.parties.get(party_id)
            if info is not None:
                info.active = True
                info.last_seen = self._clock()

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
        slot_timeout_s: float | None = None,
    ) -> Submission:
        """Start receiving one update; refuse wrong round, unknown party, duplicates."""
        label = f"party {party_id}, round {round_index}"
        if num_samples <= 0:
            raise InvalidUpdateError(
                f"{label}: num_samples must be > 0, got {num_samples}"
            )
        if update_kind is not None and update_kind != self.cfg.update_kind:
            raise InvalidUpdateError(
                f"{label}: update kind {update_kind.value}; this run expects "
                f"{self.cfg.update_kind.value}"
            )
        if not np.isfinite(train_loss) and not np.isnan(train_loss):
            raise InvalidUpdateError(f"{label}: train loss {train_loss} is not finite")
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
                    f"{info.num_samples} declared at Join; Join again to change it"
                )
            info.active = True
            info.last_seen = self._clock()
            past = self._history.get((round_index, party_id))
            if (
                past is not None
                and submission_id
                and past.submission_id == submission_id
            ):
                return Submission(
                    self,
                    self._closed_round_stub(round_index),
                    party_id,
                    num_samples,
                    train_loss,
                    submission_id,
                    resend_of=past,
                )
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
            if round_index != rnd.index:
                when = "past" if round_index < rnd.index else "future"
                raise StaleRoundError(
                    f"{label}: {when} round; open round is {rnd.index}"
                )
            prev = rnd.accepted.get(party_id)
            if prev is not None and prev.submission_id != submission_id:
                raise DuplicateSubmissionError(
                    f"{label}: an update ({prev.submission_id or 'no id'}) was already "
                    "accepted; resend it with the same submission id or wait for "
                    f"round {rnd.index + 1}"
                )
            if prev is not None:
                return Submission(
                    self,
                    rnd,
                    party_id,
                    num_samples,
                    train_loss,
                    submission_id,
                    resend_of=prev,
                )
            sub = Submission(
                self, rnd, party_id, num_samples, train_loss, submission_id, None
            )
            sub._slot_timeout_s = 60.0 if slot_timeout_s is None else slot_timeout_s
            return sub

    def _acquire_upload(self, sub: Submission, timeout_s: float) -> np.ndarray:
        """An upload slot and a model-size buffer (waits while all slots are busy)."""
        if not self._slots.acquire(timeout=timeout_s):
            raise LimitError(
                f"party {sub.party_id}, round {sub.round}: {self._max_in_flight} "
                f"uploads in flight for {timeout_s:g} s; try again"
            )
        sub.last_activity = self._clock()
        self._uploads.add(sub)
        with self._lock:
            if self._pool:
                return self._pool.pop()
        return np.empty(self.layout.size, dtype=np.float32)

    def _closed_round_stub(self, index: int) -> _Round:
        return _Round(
            index, 0.0, 0.0, _DoneFuture((np.zeros(0, np.float32), 0.0, 0.0)), ""
        )

    def _return_buffer(self, buf: np.ndarray) -> None:
        with self._lock:
            self._recycle(buf)
        self._slots.release()

    def _recycle(self, buf: np.ndarray) -> None:
        # Keep at most max_in_flight spare buffers: fresh pages cost, but so does
        # hoarding.
        if len(self._pool) < self._max_in_flight:
            self._pool.append(buf)

    def _abort(self, sub: Submission) -> None:
        if sub._resend_of is None:
            log.info("party %s round %d: upload discarded", sub.party_id, sub.round)

    def _expire_idle_uploads(self, now: float) -> None:
        for sub in list(self._uploads):
            if now - sub.last_activity > self.upload_idle_s:
                log.warning(
                    "party %s round %d: upload idle for %.0f s; discarded",
                    sub.party_id,
                    sub.round,
                    now - sub.last_activity,
                )
                sub.expire()

    def _finish(self, sub: Submission, digest: str) -> SubmitOutcome:
        label = f"party {sub.party_id}, round {sub.round}"
        if sub._resend_of is not None:
            if sub._resend_of.digest != digest:
                raise DuplicateSubmissionError(
                    f"{label}: submission {sub.submission_id!r} was already accepted "
                    "with different bytes"
                )
            return SubmitOutcome(
                True,
                sub.round,
                f"{label}: already accepted (identical resend)",
                sub.submission_id,
                duplicate=True,
            )
        with self._lock:
            rnd = self._round
            if rnd is None or rnd.index != sub.round or self.state != RunState.TRAINING:
                raise StaleRoundError(
                    f"{label}: the round closed while the update was in flight; open "
                    f"round is {self.round_index}"
                )
            prev = rnd.accepted.get(sub.party_id)
            if prev is not None:
                if prev.digest == digest and prev.submission_id == sub.submission_id:
                    return SubmitOutcome(
                        True,
                        sub.round,
                        f"{label}: already accepted",
                        sub.submission_id,
                        duplicate=True,
                    )
                raise DuplicateSubmissionError(
                    f"{label}: a different update was already accepted for this round"
                )
            assert sub._buffer is not None
            entry = _Accepted(
                sub.submission_id,
                digest,
                sub._num_samples,
                sub._train_loss,
                sub._dot,
                sub._norm_sq,
            )
            if self.cfg.aggregation == "digfl":
                entry.buffer = sub._buffer
                sub._kept = True
            else:
                assert sub._scale is not None  # the buffer holds w * update
                self._fold(rnd, sub._buffer, None)
                rnd.weight_sum += sub._weight
            rnd.accepted[sub.party_id] = entry
            self._history[(rnd.index, sub.party_id)] = entry
            log.debug("%s: accepted (%d samples)", label, sub._num_samples)
            self._changed.notify_all()
            return SubmitOutcome(
                True, rnd.index, f"{label}: accepted", sub.submission_id
            )

    def _fixed_weight(self, rnd: _Round, num_samples: int) -> float:
        # Scaled by the joined parties' total so the float32 sum stays O(update size)
        # whatever sample counts are claimed; p_i = w_i / sum_j w_j is unchanged.
        if self.cfg.aggregation == "uniform":
            return 1.0
        return num_samples / rnd.weight_ref

    def _fold(self, rnd: _Round, update: np.ndarray, weight: float | None) -> None:
        """Add weight * update to the accumulator (``None``: already weighted)."""
        if rnd.acc is None:  # the first update of the round: write, don't add
            rnd.acc = self._spare
            if weight is None:
                np.copyto(rnd.acc, update)
            else:
                np.multiply(update, np.float32(weight), out=rnd.acc)
            return
        acc = rnd.acc
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

    # ----------------------------------------------------------------- rounds
    def wait(self, timeout_s: float) -> None:
        """Block until a join or submission changes something, or for ``timeout_s``."""
        with self._changed:
            self._changed.wait(timeout_s)

    def tick(self) -> None:
        """State machine step: start; close rounds on completion or deadline; fail."""
        with self._lock:
            now = self._clock()
            if self._uploads:
                self._expire_idle_uploads(now)
            if self.state == RunState.WAITING:
                if len(self.parties) >= self.cfg.start_parties:
                    self.state = RunState.TRAINING
                    self._open_round(now)
                elif now >= self._join_deadline:
                    self._fail(
                        f"only {len(self.parties)} of {self.cfg.start_parties} parties "
                        f"joined within {self.cfg.join_timeout_s:g} s"
                    )
                return
            if self.state != RunState.TRAINING or self._round is None:
                return
            rnd = self._round
            if rnd.val_grad.done() and rnd.val_grad.exception() is not None:
                # Nothing can be scored or closed without v_t: stop, naming why.
                err = rnd.val_grad.exception()
                self._round = None
                self._finish_run(RunState.FAILED, f"failed: {err}")
                return
            active = {p for p, i in self.parties.items() if i.active}
            # Close early only with quorum: after a failed round the inactive parties
            # must not let a single resubmission close the retry.
            quorum = len(rnd.accepted) >= self.cfg.min_parties
            all_in = quorum and active <= set(rnd.accepted)
            if all_in or (
                now >= rnd.deadline and len(rnd.accepted) >= self.cfg.min_parties
            ):
                self._close_round(now)
            elif now >= rnd.deadline:
                self._round_failed(
                    now,
                    f"round {rnd.index}: {len(rnd.accepted)} of {self.cfg.min_parties} "
                    f"required submissions by the {self.cfg.round_timeout_s:g} s "
                    "deadline",
                    what="quorum lost",
                )

    def _open_round(self, now: float) -> None:
        theta = self.theta
        digest = update_digest(theta)  # XXH3-128: ~1 ms, where SHA-256 cost 25 ms/40 MB
        if self._executor is None:
            fut: Future[tuple[np.ndarray, float, float]] = _DoneFuture(
                self._validator.gradient(theta)
            )
        else:
            # v_t is computed while the parties train; theta is never modified in place.
            fut = self._executor.submit(self._validator.gradient, theta)
        self._round = _Round(
            self.round_index, now, now + self.cfg.round_timeout_s, fut, digest
        )
        self._round.weight_ref = float(
            sum(i.num_samples for i in self.parties.values()) or 1
        )
        if self._on_publish is not None:
            self._on_publish(self.round_index, theta)
        log.info("round %d open", self.round_index)
        self._changed.notify_all()

    def _close_round(self, now: float) -> None:
        rnd = self._round
        assert rnd is not None
        t0 = time.perf_counter()
        v, loss_before, acc_before = rnd.val_grad.result()
        val_grad_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        parties = sorted(rnd.accepted)
        n = {p: rnd.accepted[p].num_samples for p in parties}
        dots = {p: rnd.accepted[p].dot for p in parties}
        if self.cfg.aggregation == "digfl":
            base = contribution.sample_weights(n)
            pre = contribution.digfl_scores(
                dots, base, self.cfg.update_kind, self.cfg.server_lr
            )
            weights = contribution.digfl_weights(pre, n)
            rnd.acc = None
            for p in parties:
                buf = rnd.accepted[p].buffer
                assert buf is not None
                self._fold(rnd, buf, weights[p])
                rnd.accepted[p].buffer = None
                self._recycle(buf)
            rnd.weight_sum = 1.0
        elif self.cfg.aggregation == "uniform":
            weights = contribution.uniform_weights(parties)
        else:
            weights = contribution.sample_weights(n)
        scores = contribution.digfl_scores(
            dots, weights, self.cfg.update_kind, self.cfg.server_lr
        )
        step = (
            self.cfg.server_lr if self.cfg.update_kind == UpdateKind.GRADIENT else 1.0
        )
        assert rnd.acc is not None
        # theta_{t+1} = theta_t - step * sum_i p_i u_i, with p_i = w_i / sum_j w_j.
        scale = np.float32(step / rnd.weight_sum)
        # In place in the spare buffer: theta_t stays intact for v_t and for anyone
        # holding it until the next round's first fold; no fresh pages per round.
        with np.errstate(over="ignore", invalid="ignore"):  # checked just below
            np.multiply(rnd.acc, scale, out=rnd.acc)
            new_theta = np.subtract(self.theta, rnd.acc, out=rnd.acc)
        aggregate_s = time.perf_counter() - t1
        if not np.isfinite(new_theta).all():
            self._round_failed(
                now,
                f"round {rnd.index}: the aggregated model is not finite (updates "
                "too large); nothing was applied",
                what="aggregation failed",
            )
            return
        loss_after, acc_after = self._validator.evaluate(new_theta)
        late = tuple(
            sorted(p for p, i in self.parties.items() if p not in rnd.accepted)
        )
        for p in late:
            self.parties[p].active = False
        result = RoundResult(
            round=rnd.index,
            status="ok",
            parties=tuple(
                PartyRound(
                    party_id=p,
                    num_samples=n[p],
                    weight=weights[p],
                    score=scores[p],
                    dot=dots[p],
                    update_norm=float(np.sqrt(rnd.accepted[p].norm_sq)),
                    train_loss=rnd.accepted[p].train_loss,
                    submission_id=rnd.accepted[p].submission_id,
                    digest=rnd.accepted[p].digest,
                )
                for p in parties
            ),
            late=late,
            val_loss_before=loss_before,
            val_acc_before=acc_before,
            val_loss_after=loss_after,
            val_acc_after=acc_after,
            model_digest=rnd.model_digest,
            duration_s=now - rnd.opened_at,
            val_grad_s=val_grad_s,
            aggregate_s=aggregate_s,
        )
        self._commit(result, new_theta)
        self._spare, self.theta = self.theta, new_theta
        self.val_loss, self.val_acc = loss_after, acc_after
        self.late = late
        self.last_round_s = result.duration_s
        self._retries = 0
        self._prune_history(rnd.index)
        log.info(
            "round %d closed: %d parties, val loss %.4f -> %.4f, acc %.3f, %.2f s",
            rnd.index,
            len(parties),
            loss_before,
            loss_after,
            acc_after,
            result.duration_s,
        )
        del v
        self.round_index += 1
        self.rounds_done += 1
        self._round = None
        if self.round_index >= self.cfg.rounds:
            self._finish_run(RunState.DONE, "completed")
        else:
            self._open_round(self._clock())

    def _commit(self, result: RoundResult, theta_next: np.ndarray) -> None:
        self.results.append(result)
        if self._on_commit is not None:
            self._on_commit(result, theta_next)

    def _prune_history(self, closed: int) -> None:
        # Keep two rounds of accepted digests so resends after a close still get their
        # OK.
        for key in [k for k in self._history if k[0] < closed - 1]:
            del self._history[key]

    def _round_failed(self, now: float, reason: str, *, what: str) -> None:
        """Record the open round as failed; retry it or stop the run (DESIGN §3)."""
        rnd = self._round
        assert rnd is not None
        loss_before, acc_before = (float("nan"), float("nan"))
        if rnd.val_grad.done() and rnd.val_grad.exception() is None:
            _, loss_before, acc_before = rnd.val_grad.result()
        late = tuple(sorted(p for p in self.parties if p not in rnd.accepted))
        for p in late:
            self.parties[p].active = False
        result = RoundResult(
            round=rnd.index,
            status=f"failed: {reason}",
            parties=(),
            late=late,
            val_loss_before=loss_before,
            val_acc_before=acc_before,
            val_loss_after=loss_before,
            val_acc_after=acc_before,
            model_digest=rnd.model_digest,
            duration_s=now - rnd.opened_at,
            extra={"attempt": self._retries},
        )
        # Discard what the round received: it will not be applied.
        for entry in rnd.accepted.values():
            if entry.buffer is not None:
                self._recycle(entry.buffer)
                entry.buffer = None
        for key in [k for k in self._history if k[0] == rnd.index]:
            del self._history[key]
        self._commit(result, self.theta)
        log.warning("%s", reason)
        self._round = None
        if self._retries < self.cfg.quorum_retries:
            self._retries += 1
            log.warning(
                "retrying round %d (%d of %d)",
                rnd.index,
                self._retries,
                self.cfg.quorum_retries,
            )
            self._open_round(self._clock())
        else:
            self._fail(f"{what}: {reason}")

    def _fail(self, reason: str) -> None:
        self._finish_run(RunState.FAILED, reason)

    def _finish_run(self, state: RunState, reason: str) -> None:
        self.state = state
        self.reason = reason
        if state == RunState.FAILED:
            log.error("run failed: %s", reason)
        else:
            log.info("run done after %d rounds", self.rounds_done)
        if self._on_finish is not None:
            self._on_finish(state, reason)
        self._changed.notify_all()

    def stop(self, reason: str = "stopped") -> None:
        """End the run now (operator request); the open round is not applied."""
        with self._lock:
            if not self.finished:
                self._round = None
                self._finish_run(
                    RunState.FAILED if reason != "completed" else RunState.DONE, reason
                )

    def status(self) -> dict[str, Any]:
        """A snapshot for GetStatus."""
        with self._lock:
            return {
                "state": self.state.value,
                "open_round": self.round_index,
                "rounds_total": self.cfg.rounds,
                "rounds_done": self.rounds_done,
                "joined": sorted(self.parties),
                "submitted": sorted(self._round.accepted) if self._round else [],
                "late": list(self.late),
                "elapsed_s": self._clock() - self._started_at,
                "last_round_s": self.last_round_s,
                "val_loss": self.val_loss,
                "val_acc": self.val_acc,
                "reason": self.reason,
            }


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
