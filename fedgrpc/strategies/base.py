"""The strategy protocol: an aggregation rule and a server optimiser (pure NumPy).

A round's step (DESIGN §3-4, docs/strategies.md) is

    a_t     = R(f_1 u_1, ..., f_n u_n)     the rule's aggregate of the bounded,
                                           staleness-scaled updates (f_i = c_i s_i)
    g_t     = eta * a_t                    the pseudo-gradient (eta = server lr for
                                           gradients, 1 for deltas)
    m_t     = beta * m_{t-1} + gain * g_t  the optimiser's first moment
    theta_{t+1} = theta_t - scale_t * m_t  scale_t: a coordinate-wise step size

Every built-in server optimiser (plain SGD, FedAvgM, FedAdagrad, FedAdam, FedYogi) has
this shape. A rule splits its aggregate into per-party parts, a_t = sum_i a_{t,i}; the
first moment splits the same way, m_{t,i} = beta m_{t-1,i} + gain eta a_{t,i}, so the
applied step splits exactly into parties' parts s_{t,i} = scale_t * m_{t,i}, and
party i's DIG-FL score is the first-order drop of its part,

    phi_{t,i} = <v_t, s_{t,i}> = <scale_t * v_t, m_{t,i}>,
    sum_i phi_{t,i} = <v_t, s_t>.

``scale_t`` is frozen at its round-t value (the optimiser's linearisation at that
round: how an adaptive rule's second moment reacts to the parts is not attributed).

Rules come in two kinds. A *linear* rule's aggregate is a weighted sum,
a_t = sum_i p_i f_i u_i, with weights from what the round knows of each update
(counts, <v_t, u_i>, norms and, for rules that ask, the pairwise distances): its part
is a_{t,i} = p_i f_i u_i. A *coordinate-wise* rule (median, trimmed mean) computes
each coordinate from the n values there and says which values it used: its part of
coordinate j is the share of a_t[j] taken from party i's value.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]


@dataclass(frozen=True)
class UpdateInfo:
    """What the round knows of one accepted update when it closes."""

    party: str
    samples: int  # the count its weight may use (the claim, capped)
    dot: float  # <v_t, u_i> of the raw update
    norm: float  # ||u_i|| of the raw update
    factor: float = 1.0  # f_i = c_i s_i: the update enters every rule as f_i u_i
    staleness: int = 0  # rounds between the model it was computed on and this one


@runtime_checkable
class AggregationRule(Protocol):
    """How a round's updates combine into one aggregate, and each party's part of it.

    Attributes:
        name: how the ledger and reports name the rule.
        linear: the aggregate is sum_i p_i f_i u_i with ``weights``; otherwise
            ``combine_block`` computes it coordinate by coordinate.
        needs_distances: ``weights`` wants the pairwise squared distances between the
            scaled updates (one extra read of the round's updates).
    """

    @property
    def name(self) -> str:
        """The rule's name."""
        ...

    @property
    def linear(self) -> bool:
        """Whether it has weights (else blocks)."""
        ...

    @property
    def needs_distances(self) -> bool:
        """Whether ``weights`` wants the pairwise distances."""
        ...

    def fixed_weight(self, samples: int, weight_ref: float) -> float | None:
        """w_i when it is known as the upload starts, else None.

        A weight folds the update on arrival and nothing is read back; None: the
        rule decides at the close.
        """
        ...

    def weights(
        self,
        infos: Sequence[UpdateInfo],
        distances: F64 | None,
        v_norm: float,
    ) -> dict[str, float]:
        """Linear rules: p_i for every update (summing to 1, or all 0: no step).

        ``distances[i, j]`` = ||f_i u_i - f_j u_j||^2 in the order of ``infos``
        (only when ``needs_distances``); ``v_norm`` = ||v_t||.
        """
        ...

    def combine_block(self, block: F32) -> F32:
        """Coordinate-wise rules: parties' parts of one block of coordinates.

        ``block`` is (n, b): row i holds f_i u_i there. Returns (n, b) parts whose
        column sums are the aggregate's coordinates.
        """
        ...


@runtime_checkable
class ServerOptimiser(Protocol):
    """The server's step from the pseudo-gradient g_t (see the module docstring).

    Attributes:
        name: how the ledger and reports name the optimiser.
        beta: first-moment decay (0: no momentum, m_t = gain g_t).
        gain: weight of g_t in the first moment.
    """

    @property
    def name(self) -> str:
        """The optimiser's name."""
        ...

    @property
    def beta(self) -> float:
        """First-moment decay."""
        ...

    @property
    def gain(self) -> float:
        """Weight of g_t in the first moment."""
        ...

    def begin(self, size: int) -> None:
        """Allocate the state for a model of ``size`` elements (idempotent)."""
        ...

    def step_block(self, start: int, g: F32) -> tuple[F32, F32]:
        """Advance the state over coordinates [start, start + len(g)).

        Returns (m_t, scale_t) of the block: theta_{t+1} = theta_t - scale_t * m_t.
        Called once per block per round, blocks in order, covering the model.
        """
        ...

    def end_round(self) -> None:
        """The round's step is applied (counters advance)."""
        ...

    def state(self) -> dict[str, np.ndarray]:
        """Everything a resumed run needs to continue identically (copies)."""
        ...

    def load_state(self, state: Mapping[str, np.ndarray]) -> None:
        """Restore what :meth:`state` returned."""
        ...


@dataclass(frozen=True)
class Strategy:
    """A rule and an optimiser: what ``--strategy`` names."""

    rule: AggregationRule
    optimiser: ServerOptimiser

    @property
    def name(self) -> str:
        """``rule`` or ``rule+optimiser`` (the optimiser omitted when plain SGD)."""
        if self.optimiser.name == "sgd":
            return self.rule.name
        return f"{self.rule.name}+{self.optimiser.name}"

    @property
    def streaming(self) -> bool:
        """Plain: weights fixed at the upload's start and plain SGD.

        Updates fold on arrival and nothing is read back at the close (the O(model)
        default path).
        """
        return (
            self.rule.linear
            and not self.rule.needs_distances
            and self.rule.fixed_weight(1, 1.0) is not None
            and self.optimiser.beta == 0.0
            and self.optimiser.name == "sgd"
        )

    @property
    def trapezoid(self) -> bool:
        """Each party's part of the step is eta p_i f_i u_i (linear rule, plain SGD).

        Its digfl-2 trapezoid score then applies; otherwise digfl-2 = digfl-1.
        """
        return (
            self.rule.linear
            and self.optimiser.name == "sgd"
            and self.optimiser.beta == 0.0
        )
