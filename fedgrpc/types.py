"""Domain types shared by the pure modules (no grpc, no torch)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, NewType

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.floating[Any]]
PartyId = NewType("PartyId", str)


class UpdateKind(StrEnum):
    """How a party's update is read (DESIGN §3)."""

    GRADIENT = "gradient"  # mean loss gradient at theta_t; step -server_lr*sum p_i g_i
    DELTA = "delta"  # theta_t - theta_local; server steps -sum p_i delta_i


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
    digest: str = ""  # hex SHA-256 of the update's bytes as sent


@dataclass(frozen=True)
class RoundResult:
    """Everything the ledger records about one closed (or failed) round."""

    round: int
    status: str  # "ok" or "failed: <reason>"
    parties: tuple[PartyRound, ...]
    late: tuple[str, ...]
    val_loss_before: float
    val_acc_before: float
    val_loss_after: float
    val_acc_after: float
    model_digest: str  # hex digest of theta_t, the model the parties trained on
    duration_s: float = 0.0
    val_grad_s: float = 0.0
    aggregate_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def predicted_drop(self) -> float:
        """Sum of the round's DIG-FL scores: the first-order validation-loss drop."""
        return float(sum(p.score for p in self.parties))

    @property
    def measured_drop(self) -> float:
        """Measured validation-loss drop L_v(theta_t) - L_v(theta_{t+1})."""
        return self.val_loss_before - self.val_loss_after


@dataclass(frozen=True)
class PartyContribution:
    """One party's cumulative DIG-FL contribution over a range of rounds."""

    party_id: str
    total: float  # sum_t phi_{t,i}, signed
    share: float  # total / sum of all parties' totals
    reference_share: float  # mean over rounds of max(0, phi) normalised per round
    rounds: tuple[
        PartyRound, ...
    ]  # PartyRound.round_index via ContributionReport.rounds order
    round_indices: tuple[int, ...]  # round number of each entry of ``rounds``
    attack: str = ""


@dataclass(frozen=True)
class ContributionReport:
    """What GetContributions returns: ranked parties plus per-round metrics."""

    run_id: str
    method: str
    parties: tuple[PartyContribution, ...]  # ranked by total, descending
    rounds: tuple[RoundResult, ...]
    rounds_done: int
