"""Server optimisers on the pseudo-gradient. Pure NumPy.

Reddi et al., "Adaptive Federated Optimization", ICLR 2021; Hsu et al. 2019 for FedAvgM.

Each is ``theta_{t+1} = theta_t - scale_t * m_t`` with m_t = beta m_{t-1} + gain g_t
(:mod:`fedgrpc.strategies.base`), where g_t is the plain step (eta sum_i p_i u_i):

* ``sgd``:     m_t = g_t, scale 1 (plain FedAvg / FedSGD);
* ``avgm``:    m_t = beta m_{t-1} + g_t, scale eta_s (server momentum);
* ``adagrad``: m_t = b1 m_{t-1} + (1-b1) g_t, v_t = v_{t-1} + g_t^2;
* ``adam``:    v_t = b2 v_{t-1} + (1-b2) g_t^2;
* ``yogi``:    v_t = v_{t-1} - (1-b2) g_t^2 sign(v_{t-1} - g_t^2);
  with scale eta_s / (sqrt(v_t) + tau) for the three adaptive ones (no bias
  correction, as in the paper's Algorithm 2; v_{-1} = tau^2 as its initialisation).

State (m, v: one model-sized float32 vector each) is returned by ``state`` for the
checkpoint, so a resumed run continues identically.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from fedgrpc.errors import ConfigError
from fedgrpc.strategies.base import F32


@dataclass
class SGD:
    """The plain step: theta_{t+1} = theta_t - g_t. No state."""

    name: str = "sgd"
    beta: float = 0.0
    gain: float = 1.0

    def begin(self, size: int) -> None:
        """Nothing to allocate."""

    def step_block(self, start: int, g: F32) -> tuple[F32, F32]:
        """M = g, scale 1."""
        return g, np.ones_like(g)

    def end_round(self) -> None:
        """Nothing to advance."""

    def state(self) -> dict[str, np.ndarray]:
        """No state."""
        return {}

    def load_state(self, state: Mapping[str, np.ndarray]) -> None:
        """No state."""


@dataclass
class _Stateful:
    lr: float = 1.0
    beta: float = 0.9
    gain: float = 1.0
    name: str = ""
    m: F32 = field(default_factory=lambda: np.zeros(0, np.float32), repr=False)
    steps: int = 0

    def begin(self, size: int) -> None:
        if self.m.size != size:
            self.m = np.zeros(size, np.float32)

    def _moment(self, start: int, g: F32) -> F32:
        m = self.m[start : start + g.size]
        m *= np.float32(self.beta)
        m += np.float32(self.gain) * g
        return m

    def end_round(self) -> None:
        self.steps += 1

    def state(self) -> dict[str, np.ndarray]:
        return {"m": self.m.copy(), "steps": np.array([self.steps], np.int64)}

    def load_state(self, state: Mapping[str, np.ndarray]) -> None:
        self.m = np.array(state["m"], dtype=np.float32)
        self.steps = int(np.asarray(state["steps"])[0])


@dataclass
class AvgM(_Stateful):
    """FedAvgM: server momentum, m_t = beta m_{t-1} + g_t, theta -= lr m_t."""

    name: str = "avgm"

    def __post_init__(self) -> None:
        _check(self.name, self.lr, self.beta)
        self.gain = 1.0

    def step_block(self, start: int, g: F32) -> tuple[F32, F32]:
        """Momentum, constant scale."""
        return self._moment(start, g), np.full_like(g, self.lr)


@dataclass
class Adaptive(_Stateful):
    """FedAdagrad, FedAdam and FedYogi (``kind``): scale lr / (sqrt(v) + tau)."""

    kind: str = "adam"
    beta2: float = 0.99
    tau: float = 1e-3
    v: F32 = field(default_factory=lambda: np.zeros(0, np.float32), repr=False)

    def __post_init__(self) -> None:
        if self.kind not in ("adagrad", "adam", "yogi"):
            raise ConfigError(f"unknown adaptive optimiser {self.kind!r}")
        self.name = self.kind
        _check(self.name, self.lr, self.beta)
        if not 0.0 <= self.beta2 < 1.0:
            raise ConfigError(f"{self.name}: beta2 must be in [0, 1), got {self.beta2}")
        if not self.tau > 0:
            raise ConfigError(f"{self.name}: tau must be > 0, got {self.tau}")
        self.gain = 1.0 - self.beta

    def begin(self, size: int) -> None:
        """M = 0 and v = tau^2 for a model of ``size`` elements."""
        if self.m.size != size:
            self.m = np.zeros(size, np.float32)
        if self.v.size != size:
            self.v = np.full(size, self.tau**2, np.float32)

    def step_block(self, start: int, g: F32) -> tuple[F32, F32]:
        """Both moments, then the adaptive scale."""
        m = self._moment(start, g)
        v = self.v[start : start + g.size]
        g2 = np.square(g, dtype=np.float32)
        b2 = np.float32(self.beta2)
        if self.kind == "adagrad":
            v += g2
        elif self.kind == "adam":
            v *= b2
            v += (np.float32(1.0) - b2) * g2
        else:  # yogi
            v -= (np.float32(1.0) - b2) * g2 * np.sign(v - g2)
        scale = np.float32(self.lr) / (np.sqrt(v) + np.float32(self.tau))
        return m, scale.astype(np.float32, copy=False)

    def state(self) -> dict[str, np.ndarray]:
        """m, v and the step count."""
        return {**super().state(), "v": self.v.copy()}

    def load_state(self, state: Mapping[str, np.ndarray]) -> None:
        """Restore m, v and the step count."""
        super().load_state(state)
        self.v = np.array(state["v"], dtype=np.float32)


def _check(name: str, lr: float, beta: float) -> None:
    if not (np.isfinite(lr) and lr > 0):
        raise ConfigError(f"{name}: server optimiser lr must be > 0, got {lr}")
    if not 0.0 <= beta < 1.0:
        raise ConfigError(f"{name}: beta1 (momentum) must be in [0, 1), got {beta}")
