"""Uploads in flight: the slot and buffer pool, and one party's submission (pure).

An update arrives through a :class:`Submission` piece by piece: each piece is checked
for non-finite values and folded into the party's DIG-FL inner product with the
validation gradient v_t as it arrives, and copied into a model-sized buffer that only
this upload owns. The round state
changes only when :meth:`Submission.finish` hands the whole, validated update to the
engine (nothing is ever half-applied).

:class:`UploadPool` bounds how many uploads hold a buffer at once, so server memory is
O(slots x model size) rather than O(parties x model size), keeps spare buffers for
reuse (fresh pages cost), and discards uploads that stopped sending.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from fedgrpc.errors import (
    DuplicateSubmissionError,
    FedGrpcError,
    InvalidUpdateError,
    LimitError,
    StaleRoundError,
)
from fedgrpc.layout import FlatLayout
from fedgrpc.types import SubmitOutcome

log = logging.getLogger(__name__)

ValGrad = Future[tuple[np.ndarray, float, float]]
"""v_t = the validation-loss gradient at theta_t, with the loss and accuracy there."""


@dataclass
class AcceptedUpdate:
    """What a round keeps of an accepted update (its bytes are folded or buffered)."""

    submission_id: str
    digest: str
    num_samples: int
    train_loss: float
    dot: float  # <v_t, u_i>
    norm_sq: float  # ||u_i||^2
    weight: float | None = None  # w_i when fixed at the start; None: set at the close
    weight_samples: int = 0  # the count w_i derives from (the claim, maybe capped)
    folded: bool = False  # in the accumulator already (with weight w_i, unbounded)
    buffer: np.ndarray | None = None  # the update itself, only while a rule needs it
    stale_factor: float = 1.0  # FedBuff: s_i = (1 + staleness)^-a, 1 when in sync
    staleness: int = 0  # versions between the model it was computed on and its round


class Acceptor(Protocol):
    """Where a finished submission goes: the round engine."""

    def accept(self, sub: Submission, digest: str) -> SubmitOutcome:
        """Fold (or keep) the whole update; refuse it if its round is gone."""
        ...

    def accepts_now(self) -> bool:
        """Whether :meth:`accept` would take an update without waiting.

        (For the disk, or for a version that is closing.)
        """
        ...


class UploadPool:
    """Upload slots, their model-sized buffers, and expiry of uploads in flight.

    Args:
        size: elements of one buffer (the model's).
        slots: uploads that may hold a buffer at once.
        idle_s: an upload that sends nothing for this long is discarded, so stalled
            or hostile streams cannot starve the others.
        clock: monotonic seconds.
        min_rate_bytes_s: after ``grace_s`` with its slot, an upload must have
            delivered at least this many bytes per second since: a drip-feeding
            stream (a few bytes per idle period) cannot keep its slot. Its overall
            deadline follows: ``grace_s + wire_bytes / min_rate_bytes_s``.
        grace_s: the time an upload gets before its rate is judged.
        wire_itemsize: bytes per element on the wire (4 for float32, 2 for the
            16-bit wire dtypes); the rate counts wire bytes.
    """

    def __init__(
        self,
        size: int,
        slots: int,
        idle_s: float,
        clock: Callable[[], float],
        *,
        min_rate_bytes_s: float = 0.0,
        grace_s: float = 0.0,
        wire_itemsize: int = 4,
    ) -> None:
        self.size = size
        self.slots = slots
        self.idle_s = idle_s
        self.min_rate_bytes_s = min_rate_bytes_s
        self.grace_s = grace_s
        self.wire_itemsize = wire_itemsize
        self._clock = clock
        self._lock = threading.Lock()
        self._freed = threading.Condition(self._lock)
        self._spare: list[np.ndarray] = []
        self._uploads: set[Submission] = set()

    @property
    def deadline_s(self) -> float:
        """The longest one whole upload may hold a slot (s); inf without a rate."""
        if self.min_rate_bytes_s <= 0:
            return float("inf")
        return self.grace_s + self.size * self.wire_itemsize / self.min_rate_bytes_s

    def acquire(
        self, upload: Submission, timeout_s: float, share: int | None = None
    ) -> np.ndarray:
        """A slot and a buffer for ``upload`` (waits while every slot is busy).

        Args:
            upload: the upload that needs a slot.
            timeout_s: how long to wait for one.
            share: the most slots one party may hold at once (its share of the
                pool; None = all), so one party cannot take every slot.
        """
        cap = self.slots if share is None else max(1, min(share, self.slots))
        # Real time, like the semaphore this replaced: the wait is a thread's.
        end = time.monotonic() + timeout_s
        with self._freed:
            while True:
                held = sum(1 for u in self._uploads if u.party_id == upload.party_id)
                if len(self._uploads) < self.slots and held < cap:
                    break
                left = end - time.monotonic()
                if left <= 0:
                    if held >= cap:
                        raise LimitError(
                            f"{upload.label}: the party already holds {held} of the "
                            f"{self.slots} upload slots (its share is {cap}) for "
                            f"{timeout_s:g} s; try again"
                        )
                    raise LimitError(
                        f"{upload.label}: {self.slots} uploads in flight for "
                        f"{timeout_s:g} s; try again"
                    )
                self._freed.wait(left)
            upload.last_activity = upload.slot_since = self._clock()
            self._uploads.add(upload)
            if self._spare:
                return self._spare.pop()
        return np.empty(self.size, dtype=np.float32)

    def release(self, upload: Submission, buffer: np.ndarray | None) -> None:
        """End ``upload``'s hold: its slot, and its buffer unless the round kept it."""
        with self._freed:
            if upload not in self._uploads:
                return
            self._uploads.discard(upload)
            if buffer is not None:
                self._keep_spare(buffer)
            self._freed.notify_all()

    def recycle(self, buffer: np.ndarray) -> None:
        """Take back a buffer a round kept (digfl) once the round is done with it."""
        with self._lock:
            self._keep_spare(buffer)

    def _keep_spare(self, buffer: np.ndarray) -> None:
        # At most one spare per slot: fresh pages cost, but so does hoarding.
        if len(self._spare) < self.slots:
            self._spare.append(buffer)

    def expire_idle(self, now: float) -> None:
        """Discard every upload idle for ``idle_s`` or slower than the minimum rate."""
        with self._lock:
            uploads = list(self._uploads)
        for upload in uploads:
            why = self._overdue(upload, now)
            if why:
                log.warning("%s: %s; discarded", upload.label, why)
                upload.expire(why)

    def _overdue(self, upload: Submission, now: float) -> str:
        """Why ``upload`` must go now, or "" if it may keep its slot."""
        idle = now - upload.last_activity
        if idle > self.idle_s:
            return f"upload idle for {idle:.0f} s (limit {self.idle_s:g} s)"
        if self.min_rate_bytes_s <= 0:
            return ""
        held = now - upload.slot_since
        if held > self.deadline_s:
            return (
                f"upload not finished after {held:.0f} s (deadline "
                f"{self.deadline_s:.0f} s for {self.size * self.wire_itemsize} bytes)"
            )
        owed = self.min_rate_bytes_s * (held - self.grace_s)
        got = upload.elements_received * self.wire_itemsize
        if owed > 0 and got < owed:
            return (
                f"upload too slow: {got} bytes in {held:.0f} s; the minimum is "
                f"{self.min_rate_bytes_s:g} B/s after {self.grace_s:g} s"
            )
        return ""

    def abort_round(self, round_index: int) -> int:
        """Discard every upload in flight for ``round_index`` (it closed); count."""
        with self._lock:
            doomed = [u for u in self._uploads if u.round == round_index]
        for upload in doomed:
            upload.expire("the round closed while the update was in flight", stale=True)
        return len(doomed)

    @property
    def in_flight(self) -> int:
        """Uploads holding a slot now."""
        with self._lock:
            return len(self._uploads)

    def held_by(self, party_id: str) -> int:
        """Slots ``party_id`` holds now."""
        with self._lock:
            return sum(1 for u in self._uploads if u.party_id == party_id)


class Submission:
    """One party's update for one round, received piece by piece.

    Call :meth:`reserve` (optional), :meth:`add` for each piece in the order the caller
    validated, then :meth:`finish` with the stream's digest, or :meth:`abort` on any
    failure. Pieces go into a private buffer; the round changes only in
    :meth:`finish`, through the engine's :meth:`Acceptor.accept`.

    Args:
        acceptor: the engine that takes the finished update.
        pool: where the upload's slot and buffer come from.
        layout: the model's flat layout.
        round_index: the round the update is for.
        val_grad: that round's v_t, possibly still being computed.
        party_id, num_samples, train_loss, submission_id: from the upload's header.
        weight: the aggregation weight w_i when it is known up front, else None
            (``digfl``: the update is buffered until the round closes).
        slot_timeout_s: how long to wait for an upload slot.
        clock: monotonic seconds.
        weight_samples: the count w_i derives from (the claim capped, DESIGN §4).
        share: the most upload slots this party may hold at once (None = all).
    """

    def __init__(
        self,
        acceptor: Acceptor,
        pool: UploadPool,
        layout: FlatLayout,
        round_index: int,
        val_grad: ValGrad,
        party_id: str,
        num_samples: int,
        train_loss: float,
        submission_id: str,
        weight: float | None,
        slot_timeout_s: float,
        clock: Callable[[], float],
        weight_samples: int = 0,
        share: int | None = None,
    ) -> None:
        self._acceptor = acceptor
        self._pool = pool
        self._layout = layout
        self._val_grad = val_grad
        self._clock = clock
        self._slot_timeout_s = slot_timeout_s
        self.party_id = party_id
        self.round = round_index
        self.num_samples = num_samples
        self.train_loss = train_loss
        self.submission_id = submission_id
        self.weight = weight
        self.weight_samples = weight_samples or num_samples
        self.stale_factor = 1.0  # FedBuff: set by the engine for a stale update
        self.staleness = 0
        self.label = f"party {party_id}, round {round_index}"
        self.last_activity = clock()
        self.slot_since = self.last_activity
        self.elements_received = 0
        self._share = share
        self._expiry = ""
        self._stale = False
        self.on_expire: Callable[[str], None] | None = None
        """Called (from the driver thread) when the upload is discarded for being
        idle, too slow or too late: the servicer frees the stream's thread."""
        self._dot = 0.0
        self._norm_sq = 0.0
        self._closed = False
        self._expired = False
        self._kept = False
        self._unscored: list[tuple[int, int]] = []  # ranges received before v_t
        self._v: np.ndarray | None = None
        self._buffer: np.ndarray | None = None  # taken with the upload slot
        self._lock = threading.Lock()  # add() vs. expiry by the driver thread

    # -------------------------------------------------------------- receiving
    def reserve(self) -> None:
        """Take the upload slot and buffer now, before any piece is read.

        The gRPC servicer calls this right after the header: an upload waiting for a
        slot then holds nothing but its header, and HTTP/2 flow control keeps its
        data on the sender, instead of a received 1 MiB chunk per waiting stream.
        """
        if not self._closed:
            self._ensure_buffer()

    def _ensure_buffer(self) -> None:
        if self._buffer is None:
            self._buffer = self._pool.acquire(self, self._slot_timeout_s, self._share)

    def add(self, tensor_index: int, elem_offset: int, values: np.ndarray) -> None:
        """Take 1-D float32 ``values`` for a tensor, starting at ``elem_offset``."""
        if self._closed:
            raise self._closed_error()
        start, end, name = _place(
            self._layout, self.label, tensor_index, elem_offset, values
        )
        self._ensure_buffer()
        if self._v is None and self._val_grad.done():
            self._v = self._val_grad.result()[0]
        with self._lock:
            if self._closed:
                raise self._closed_error()
            self.last_activity = self._clock()
            self.elements_received += values.size
            self._add(name, start, end, elem_offset, values)

    def _add(
        self, name: str, start: int, end: int, elem_offset: int, values: np.ndarray
    ) -> None:
        buf = self._buffer
        assert buf is not None
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
                    f"{self.label}: tensor {name!r} has a non-finite value "
                    f"({values[first - elem_offset]}) at element {first}"
                )
            nsq = float(np.dot(values.astype(np.float64), values.astype(np.float64)))
        self._norm_sq += nsq
        # The raw update: the norm bound, known only at the close, may still scale it.
        buf[start:end] = values
        if self._v is None:
            # v_t is still being computed: keep streaming, score this range later from
            # the buffer rather than stall the upload (and its sender) on v_t.
            self._unscored.append((start, end))
        else:
            self._score_pending()
            # DIG-FL <v_t, u_i>, chunk by chunk: a float32 BLAS dot per chunk, summed
            # in float64. Different chunkings agree to ~1e-5 relative, far inside the
            # scores' own first-order error.
            self._dot += float(np.dot(self._v[start:end], values))

    def _score_pending(self) -> None:
        assert self._v is not None and self._buffer is not None
        dot = 0.0
        for s, e in self._unscored:
            dot += float(np.dot(self._v[s:e], self._buffer[s:e]))
        self._dot += dot
        self._unscored.clear()

    # ---------------------------------------------------------------- the end
    def finishes_now(self) -> bool:
        """Whether :meth:`finish` would not wait.

        v_t is known (or not needed) and the engine takes the update at once. The
        servicer then finishes a small update on its event loop instead of handing
        it to a thread: at 500 parties that hop cost a fifth of the aggregator's CPU
        (issue 14).
        """
        return (
            not self._unscored or self._val_grad.done()
        ) and self._acceptor.accepts_now()

    def finish(self, digest: str) -> SubmitOutcome:
        """Hand the whole update to the engine (the caller checked completeness)."""
        with self._lock:
            if self._closed:
                if self._expired:
                    raise self._closed_error()
                raise LimitError(f"{self.label}: upload was discarded (idle or closed)")
            self._closed = True
        try:
            self._ensure_buffer()  # an update with no elements (empty tensors only)
            if self._unscored:
                self._v = self._val_grad.result()[0]  # wait for v_t only now
                self._score_pending()
            return self._acceptor.accept(self, digest)
        finally:
            self._release()

    def abort(self) -> None:
        """Discard everything received; the round is untouched."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        log.info("%s: upload discarded", self.label)
        self._release()

    def expire(self, why: str = "", *, stale: bool = False) -> None:
        """Discard an upload that is idle, too slow, or whose round closed.

        With ``stale`` (the round closed) the sender hears FAILED_PRECONDITION.
        """
        with self._lock:
            if self._closed:
                return
            self._expired = True
            self._stale = stale
            self._expiry = why or f"upload idle for more than {self._pool.idle_s:g} s"
        self.abort()
        if self.on_expire is not None:
            self.on_expire(self._expiry)

    def check_open(self) -> None:
        """Raise why the upload was discarded, if it was (idle, slow, round closed)."""
        if self._expired:
            raise self._closed_error()

    def _closed_error(self) -> FedGrpcError:
        if self._expired and self._stale:
            return StaleRoundError(f"{self.label}: {self._expiry}; it was discarded")
        if self._expired:
            return LimitError(f"{self.label}: {self._expiry}; it was discarded")
        return InvalidUpdateError(f"{self.label}: submission already closed")

    def _release(self) -> None:
        with self._lock:
            buf, self._buffer = self._buffer, None
        self._pool.release(self, None if self._kept else buf)

    def rebind(
        self, round_index: int, staleness: int, factor: float, dot: float
    ) -> None:
        """FedBuff: the version the update was for closed while it streamed in.

        It counts in ``round_index`` instead, ``staleness`` versions after the model
        it was computed on, scored against that round's v (``dot``, recomputed from
        the whole update by the engine).
        """
        self.round = round_index
        self.staleness = staleness
        self.stale_factor = factor
        self._dot = dot
        self.label = f"party {self.party_id}, round {round_index}"

    # ------------------------------------------- what the engine reads at accept
    @property
    def dot(self) -> float:
        """<v_t, u_i> over the whole update (complete once finish() runs)."""
        return self._dot

    @property
    def norm_sq(self) -> float:
        """||u_i||^2 over the whole update."""
        return self._norm_sq

    @property
    def update(self) -> np.ndarray:
        """The buffer: the whole raw update (valid inside accept() only)."""
        assert self._buffer is not None, "only valid inside accept()"
        return self._buffer

    def keep_buffer(self) -> np.ndarray:
        """Give the buffer to the round (``digfl``); it returns through recycle()."""
        self._kept = True
        return self.update


class Resend:
    """A resend of an update already accepted: only its digest is checked.

    The same interface as :class:`Submission`, without a slot or a buffer: an exact
    resend gets the same OK, different bytes under the same id ALREADY_EXISTS.
    """

    def __init__(
        self,
        layout: FlatLayout,
        round_index: int,
        party_id: str,
        submission_id: str,
        accepted: AcceptedUpdate,
    ) -> None:
        self._layout = layout
        self._accepted = accepted
        self.party_id = party_id
        self.round = round_index
        self.submission_id = submission_id
        self.label = f"party {party_id}, round {round_index}"

    def reserve(self) -> None:
        """Nothing to reserve."""

    def add(self, tensor_index: int, elem_offset: int, values: np.ndarray) -> None:
        """Check the piece fits the model; its values are not needed."""
        _place(self._layout, self.label, tensor_index, elem_offset, values)

    def finishes_now(self) -> bool:
        """A digest comparison: never waits."""
        return True

    def finish(self, digest: str) -> SubmitOutcome:
        """OK if the bytes match the accepted update's."""
        if self._accepted.digest != digest:
            raise DuplicateSubmissionError(
                f"{self.label}: submission {self.submission_id!r} was already "
                "accepted with different bytes"
            )
        return SubmitOutcome(
            True,
            self.round,
            f"{self.label}: already accepted (identical resend)",
            self.submission_id,
            duplicate=True,
        )

    def abort(self) -> None:
        """Nothing to discard."""

    def check_open(self) -> None:
        """A resend holds nothing that could be discarded."""


Upload = Submission | Resend


def _place(
    layout: FlatLayout,
    label: str,
    tensor_index: int,
    elem_offset: int,
    values: np.ndarray,
) -> tuple[int, int, str]:
    """Flat [start, end) of a piece of tensor ``tensor_index``, and the tensor name."""
    spec = layout.specs[tensor_index]
    if elem_offset + values.size > spec.numel:
        raise InvalidUpdateError(
            f"{label}: tensor {spec.name!r} overflows at element {elem_offset}"
        )
    start = layout.offsets[tensor_index] + elem_offset
    return start, start + values.size, spec.name
