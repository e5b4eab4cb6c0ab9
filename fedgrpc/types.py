"""Domain types shared by every part (no grpc, no torch)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.floating[Any]]


class UpdateKind(StrEnum):
    """How a party's update is read (DESIGN §3)."""

    GRADIENT = "gradient"  # mean loss gradient at theta_t; step -server_lr*sum p_i g_i
    DELTA = "delta"  # theta_t - theta_local; server steps -sum p_i delta_i


class RunState(StrEnum):
    """Life cycle of a run (``StatusReply.state`` carries the value)."""

    STARTING = "starting"  # listening; validation data and model still loading
    WAITING = "waiting"  # for the first quorum of joins
    TRAINING = "training"
    DONE = "done"
    FAILED = "failed"

    @property
    def finished(self) -> bool:
        """True for DONE and FAILED."""
        return self in (RunState.DONE, RunState.FAILED)


class RoundOutcome(StrEnum):
    """How a round ended."""

    OK = "ok"
    FAILED = "failed"


def round_status_text(outcome: RoundOutcome, reason: str = "") -> str:
    """The status string of the ledger and the wire: ``ok`` or ``failed: <reason>``."""
    if outcome is RoundOutcome.OK:
        return "ok"
    return f"failed: {reason}" if reason else "failed"


def round_status_parse(text: str) -> tuple[RoundOutcome, str]:
    """Inverse of :func:`round_status_text`."""
    if text == "ok":
        return RoundOutcome.OK, ""
    if text.startswith("failed"):
        return RoundOutcome.FAILED, text.removeprefix("failed").removeprefix(": ")
    raise ValueError(f"unknown round status {text!r}")


@dataclass(frozen=True)
class TensorSpec:
    """Name, dtype (NumPy name, e.g. ``"float32"``) and shape of one model tensor."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        """Number of elements."""
        return math.prod(self.shape)  # Python ints: never wraps, unlike np.prod


@dataclass(frozen=True)
class PartyRound:
    """One party's accepted update in one round, as scored and weighted."""

    party_id: str
    num_samples: int
    weight: float  # aggregation weight p_i used in the step
    score: float  # phi_{t,i}, signed first-order validation-loss drop (DESIGN §4)
    dot: float  # <v_t, u_{t,i}>
    update_norm: float  # L2 norm of the update
    train_loss: float
    submission_id: str = ""
    digest: str = ""  # hex XXH3-128 of the update's bytes as sent
    weight_samples: int = 0  # the count p_i derives from: the claim, capped (0 = same)
    norm_bound: float = math.inf  # the round's bound B_t on update norms (inf = none)
    clip: float = 1.0  # c_i = min(1, B_t / update_norm): the scale applied (1 = none)
    dot_next: float = math.nan  # <v_{t+1}, u_{t,i}>, known one round later
    score2: float = math.nan  # digfl-2: eta p_i c_i <(v_t + v_{t+1}) / 2, u_{t,i}>

    @property
    def bounded(self) -> bool:
        """Whether the norm bound scaled this update down."""
        return self.clip < 1.0

    def method_score(self, method: str) -> float:
        """The score under ``digfl-1`` (first order) or ``digfl-2`` (trapezoid)."""
        return self.score2 if method == "digfl-2" else self.score


SCORING_METHODS = ("digfl-1", "digfl-2")
"""``digfl-1``: φ = η p_i c_i ⟨v_t, u⟩. ``digfl-2``: the trapezoid with v_{t+1}."""


@dataclass(frozen=True)
class SecondOrder:
    """The digfl-2 scores of one round, known once v_{t+1} is (DESIGN §4)."""

    round: int
    dots_next: dict[str, float]  # <v_{t+1}, u_{t,i}> (NaN: the update was lost)
    scores: dict[str, float]  # phi2_{t,i}


def with_second_order(result: RoundResult, so: SecondOrder) -> RoundResult:
    """``result`` with its parties' digfl-2 rows filled in from ``so``."""
    return replace(
        result,
        parties=tuple(
            replace(p, dot_next=so.dots_next[p.party_id], score2=so.scores[p.party_id])
            if p.party_id in so.scores
            else p
            for p in result.parties
        ),
    )


@dataclass(frozen=True)
class RoundResult:
    """Everything the ledger records about one closed (or failed) round."""

    round: int
    outcome: RoundOutcome
    parties: tuple[PartyRound, ...]
    late: tuple[str, ...]
    val_loss_before: float
    val_acc_before: float
    val_loss_after: float
    val_acc_after: float
    model_digest: str  # hex digest of theta_t, the model the parties trained on
    reason: str = ""  # why a failed round failed ("" when ok)
    duration_s: float = 0.0
    val_grad_s: float = 0.0
    aggregate_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """Whether the round closed and its step was applied."""
        return self.outcome is RoundOutcome.OK

    @property
    def status(self) -> str:
        """``ok`` or ``failed: <reason>``, as the ledger and the wire spell it."""
        return round_status_text(self.outcome, self.reason)

    @property
    def predicted_drop(self) -> float:
        """Sum of the round's DIG-FL scores: the first-order validation-loss drop.

        Includes the momentum carry of parties absent from the round (``carry``).
        """
        return float(sum(p.score for p in self.parties)) + sum(self.carry.values())

    @property
    def carry(self) -> dict[str, float]:
        """Server momentum: the scores of absent parties' momentum in this step."""
        raw = self.extra.get("carry") or {}
        return {str(p): float(s) for p, s in raw.items()}

    @property
    def sampled(self) -> tuple[str, ...] | None:
        """Client sampling: the parties asked to train (None: every joined party)."""
        raw = self.extra.get("sampled")
        return None if raw is None else tuple(str(p) for p in raw)

    def scores(self, method: str) -> dict[str, float]:
        """Each party's score of the round under ``method``, carry included."""
        out = {p.party_id: p.method_score(method) for p in self.parties}
        for p, c in self.carry.items():
            out[p] = out.get(p, 0.0) + c
        return out

    @property
    def measured_drop(self) -> float:
        """Measured validation-loss drop L_v(theta_t) - L_v(theta_{t+1})."""
        return self.val_loss_before - self.val_loss_after

    def predicted(self, method: str) -> float:
        """Sum of the round's scores under ``method`` (NaN while digfl-2 is pending)."""
        return float(sum(self.scores(method).values()))

    def residual(self, method: str) -> float:
        """r_t = measured drop - the sum of the round's scores under ``method``."""
        return self.measured_drop - self.predicted(method)


@dataclass(frozen=True)
class PartyContribution:
    """One party's cumulative DIG-FL contribution over a range of rounds."""

    party_id: str
    total: float  # sum_t phi_{t,i}, signed
    share: float  # total / sum of all parties' totals
    reference_share: float  # mean over rounds of max(0, phi) normalised per round
    rounds: tuple[PartyRound, ...]  # the party's scored rounds, in round order
    round_indices: tuple[int, ...]  # round number of each entry of ``rounds``
    attack: str = ""
    bounded_rounds: int = 0  # rounds in which the norm bound scaled its update down
    asked_rounds: int = 0  # rounds it was asked to train in (sampled, or joined)
    carry: float = 0.0  # part of ``total`` from its momentum in rounds it was absent

    @property
    def participated(self) -> int:
        """Rounds in which an update of the party was applied."""
        return len(self.rounds)

    @property
    def per_participation(self) -> float:
        """Total / participated: what one of its rounds was worth (NaN if none).

        So a party sampled less often is not ranked lower for that alone.
        """
        return self.total / len(self.rounds) if self.rounds else math.nan

    @property
    def flagged(self) -> bool:
        """Bounded in at least a quarter of its rounds (and more than one)."""
        return self.bounded_rounds >= max(2, len(self.rounds) / 4)


@dataclass(frozen=True)
class ContributionReport:
    """What GetContributions returns: ranked parties plus per-round metrics."""

    run_id: str
    method: str
    parties: tuple[PartyContribution, ...]  # ranked by total, descending
    rounds: tuple[RoundResult, ...]
    rounds_done: int
    pending_rounds: tuple[int, ...] = ()  # digfl-2: rounds whose scores are not in yet
    private: bool = False  # one party's view: nothing derived from the others'
    rows_digest: str = ""  # SHA-256 of the ledger rows of the selected rounds

    def party_view(self, party_id: str) -> ContributionReport:
        """What ``party_id`` may see (DESIGN §5): its own rows and totals only.

        Withheld, because the others' scores could be derived from them: shares and
        reference shares (global denominators), each round's validation losses and
        measured drop, the bound B_t, the others' ids and rows.
        """
        nan = math.nan
        mine = tuple(
            replace(
                pc,
                share=nan,
                reference_share=nan,
                rounds=tuple(replace(p, norm_bound=math.inf) for p in pc.rounds),
            )
            for pc in self.parties
            if pc.party_id == party_id
        )
        rounds = tuple(
            replace(
                r,
                parties=tuple(
                    replace(p, norm_bound=math.inf)
                    for p in r.parties
                    if p.party_id == party_id
                ),
                late=tuple(p for p in r.late if p == party_id),
                extra=_own_extra(r.extra, party_id),
                val_loss_before=nan,
                val_acc_before=nan,
                val_loss_after=nan,
                val_acc_after=nan,
            )
            for r in self.rounds
        )
        return replace(self, parties=mine, rounds=rounds, private=True)


def _own_extra(extra: dict[str, Any], party_id: str) -> dict[str, Any]:
    """A round's extra as ``party_id`` may see it: its own carry and sampling only."""
    out = {k: v for k, v in extra.items() if k == "strategy"}
    if "sampled" in extra:
        out["sampled"] = [p for p in extra["sampled"] if p == party_id]
    carry = (extra.get("carry") or {}).get(party_id)
    if carry is not None:
        out["carry"] = {party_id: carry}
    return out


@dataclass(frozen=True)
class RunStatus:
    """A snapshot of a run's progress (what GetStatus returns)."""

    state: RunState
    open_round: int
    rounds_total: int
    rounds_done: int
    joined: tuple[str, ...] = ()
    submitted: tuple[str, ...] = ()
    late: tuple[str, ...] = ()
    elapsed_s: float = 0.0
    last_round_s: float = 0.0
    val_loss: float = math.nan
    val_acc: float = math.nan
    reason: str = ""
    run_id: str = ""

    def party_view(self, party_id: str) -> RunStatus:
        """What ``party_id`` may see of the run (DESIGN §5), as in ContributionReport.

        No other party's id, and no validation metrics: each round's measured drop
        minus its own score would give the others' total.
        """
        return replace(
            self,
            joined=tuple(p for p in self.joined if p == party_id),
            submitted=tuple(p for p in self.submitted if p == party_id),
            late=tuple(p for p in self.late if p == party_id),
            val_loss=math.nan,
            val_acc=math.nan,
        )


@dataclass(frozen=True)
class SubmitHeader:
    """The first message of an upload: who sends what, for which round."""

    party_id: str
    round: int
    num_samples: int
    train_loss: float
    update_kind: UpdateKind
    submission_id: str = ""
    model_digest: bytes = b""  # digest of the model the update was computed from


@dataclass(frozen=True)
class SubmitOutcome:
    """Result of a finished submission."""

    accepted: bool
    round: int
    message: str
    submission_id: str
    duplicate: bool = False


@dataclass(frozen=True)
class ModelHeader:
    """The header of one model version on the GetModel stream."""

    round: int
    digest: bytes  # XXH3-128 of the tensors' wire bytes, in spec order
    total_bytes: int
    wire_dtype: str = "float32"


@dataclass(frozen=True)
class RoundSkipped:
    """Client sampling: a party is not asked to train in ``round``."""

    round: int
    reason: str = ""


@dataclass(frozen=True)
class TrainingDone:
    """The GetModel stream's final message."""

    rounds_completed: int
    reason: str
