"""The open round: what it accepted, how it ends, and the results it records (pure).

Guarded by the engine's lock; the accumulator (the engine's spare theta buffer) is
passed in, so a round never owns model-sized memory of its own.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Set
from dataclasses import dataclass, field

import numpy as np

from fedgrpc.config import RoundConfig
from fedgrpc.engine import aggregate
from fedgrpc.engine.uploads import AcceptedUpdate, Submission, ValGrad
from fedgrpc.errors import DuplicateSubmissionError
from fedgrpc.types import PartyRound, RoundOutcome, RoundResult, SubmitOutcome

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Ending:
    """How the open round ends."""

    outcome: RoundOutcome
    reason: str = ""
    what: str = ""  # the run's failure, if the run stops over it
    stop_run: bool = False  # v_t failed: nothing can be scored; stop at once


@dataclass
class OpenRound:
    """One round between its opening and its close."""

    index: int
    opened_at: float
    deadline: float
    val_grad: ValGrad
    model_digest: str
    weight_ref: float  # sum of the joined parties' (capped) samples at the opening
    count_caps: dict[str, int] = field(default_factory=dict)  # per party (unattested)
    count_cap_late: int | None = None  # the cap of a party joining during the round
    accepted: dict[str, AcceptedUpdate] = field(default_factory=dict)
    folded: int = 0  # updates already in the accumulator
    fold_limit: float = math.inf  # updates up to this norm fold on arrival
    weight_sum: float = 0.0
    closing: bool = False  # decided to close or fail: no update is taken any more
    late: tuple[str, ...] = ()  # joined but not accepted when the close was decided
    keep_buffers: bool = False  # digfl: the rule holds updates in memory to the close
    sampled: frozenset[str] | None = None  # client sampling: the parties asked

    def take(self, sub: Submission, digest: str, acc: np.ndarray) -> SubmitOutcome:
        """Accept a whole update: fold it into ``acc``, or keep it (``digfl``)."""
        label = sub.label
        prev = self.accepted.get(sub.party_id)
        if prev is not None:
            if prev.digest == digest and prev.submission_id == sub.submission_id:
                return SubmitOutcome(
                    True,
                    self.index,
                    f"{label}: already accepted",
                    sub.submission_id,
                    duplicate=True,
                )
            raise DuplicateSubmissionError(
                f"{label}: a different update was already accepted for this round"
            )
        entry = AcceptedUpdate(
            sub.submission_id, digest, sub.num_samples, sub.train_loss, sub.dot,
            sub.norm_sq, weight=sub.weight, weight_samples=sub.weight_samples,
            stale_factor=sub.stale_factor, staleness=sub.staleness,
        )  # fmt: skip
        if sub.weight is None:  # weights only at the close
            if self.keep_buffers:  # digfl holds them; other rules read the spill
                entry.buffer = sub.keep_buffer()
        else:
            self.weight_sum += sub.weight
            if math.sqrt(sub.norm_sq) <= self.fold_limit:
                fold = aggregate.start_fold if self.folded == 0 else aggregate.fold
                fold(acc, sub.update, sub.weight * sub.stale_factor)
                self.folded += 1
                entry.folded = True
            # Else the norm bound may scale it: it is folded at the close, from the
            # spill, once B_t is known.
        self.accepted[sub.party_id] = entry
        log.debug("%s: accepted (%d samples)", label, sub.num_samples)
        return SubmitOutcome(True, self.index, f"{label}: accepted", sub.submission_id)

    def ending(self, cfg: RoundConfig, active: Set[str], now: float) -> Ending | None:
        """Whether (and how) the round ends now, with ``active`` parties waited for."""
        if self.val_grad.done() and self.val_grad.exception() is not None:
            # Nothing can be scored or closed without v_t: stop, naming why.
            return Ending(
                RoundOutcome.FAILED, f"{self.val_grad.exception()}", stop_run=True
            )
        # Close early only with quorum: after a failed round the inactive parties must
        # not let a single resubmission close the retry.
        quorum = len(self.accepted) >= cfg.min_parties
        if self.complete(cfg, active) or (quorum and now >= self.deadline):
            return Ending(RoundOutcome.OK)
        if now >= self.deadline:
            return Ending(
                RoundOutcome.FAILED,
                f"round {self.index}: {len(self.accepted)} of {cfg.min_parties} "
                f"required submissions by the {cfg.round_timeout_s:g} s deadline",
                "quorum lost",
            )
        return None

    def complete(self, cfg: RoundConfig, active: Set[str]) -> bool:
        """Whether the round may close now: quorum, and every party waited for is in.

        O(1) for every upload but the last few (the engine asks on each one).
        """
        if len(self.accepted) < cfg.min_parties:
            return False
        if cfg.buffered:  # FedBuff: a step every buffer_size updates
            return len(self.accepted) >= cfg.buffer_size
        # Sampled: only the parties asked are waited for.
        waited = active if self.sampled is None else active & self.sampled
        # A subset only if no larger.
        return len(waited) <= len(self.accepted) and all(
            p in self.accepted for p in waited
        )

    def result(
        self,
        step: aggregate.Step,
        late: tuple[str, ...],
        before: tuple[float, float],
        after: tuple[float, float],
        now: float,
        val_grad_s: float,
    ) -> RoundResult:
        """The closed round as the ledger records it."""
        return RoundResult(
            round=self.index,
            outcome=RoundOutcome.OK,
            parties=tuple(
                _party_round(p, self.accepted[p], step) for p in sorted(self.accepted)
            ),
            late=late,
            val_loss_before=before[0],
            val_acc_before=before[1],
            val_loss_after=after[0],
            val_acc_after=after[1],
            model_digest=self.model_digest,
            duration_s=now - self.opened_at,
            val_grad_s=val_grad_s,
            aggregate_s=step.seconds,
        )

    def failed(
        self,
        reason: str,
        late: tuple[str, ...],
        before: tuple[float, float],
        now: float,
    ) -> RoundResult:
        """A failed round: nothing applied, the model (and its metrics) unchanged."""
        return RoundResult(
            round=self.index,
            outcome=RoundOutcome.FAILED,
            reason=reason,
            parties=(),
            late=late,
            val_loss_before=before[0],
            val_acc_before=before[1],
            val_loss_after=before[0],
            val_acc_after=before[1],
            model_digest=self.model_digest,
            duration_s=now - self.opened_at,
        )


def _party_round(party: str, entry: AcceptedUpdate, step: aggregate.Step) -> PartyRound:
    return PartyRound(
        party_id=party,
        num_samples=entry.num_samples,
        weight=step.weights[party],
        score=step.scores[party],
        dot=entry.dot,
        update_norm=float(np.sqrt(entry.norm_sq)),
        weight_samples=entry.weight_samples,
        norm_bound=step.bound,
        clip=step.clip[party],
        train_loss=entry.train_loss,
        submission_id=entry.submission_id,
        digest=entry.digest,
    )
