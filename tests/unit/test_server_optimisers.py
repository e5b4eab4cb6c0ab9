"""Server optimisers against an independent float64 transcription of Reddi et al. 2021.

The reference below is written from the paper (Algorithm 2, "Adaptive Federated
Optimization", ICLR 2021) and Hsu et al. 2019 (FedAvgM), not from the code under
test. The paper's update is x_{t+1} = x_t + eta Delta-ish with Delta_t the mean model
change; fedgrpc steps *down* a pseudo-gradient g_t = -Delta_t, so every sign below is
the paper's with Delta_t = -g_t (the second moments only see g_t^2, the same).
"""

from __future__ import annotations

import io
import re
from typing import Any

import numpy as np
import pytest

from fedgrpc.config import RoundConfig
from fedgrpc.errors import ConfigError
from fedgrpc.strategies import SGD, Adaptive, AvgM, ServerOptimiser, Strategy
from fedgrpc.strategies.registry import DEFAULT_OPT_LR, build_optimiser, build_strategy

SIZE = 23
BLOCKS = ((0, 5), (5, 6), (6, 17), (17, SIZE))  # uneven, one of a single coordinate


class Reference:
    """Algorithm 2 of Reddi et al. (and FedAvgM) in float64, one whole vector a round.

    m_{-1} = 0, v_{-1} = tau^2 (the paper's "v_{-1} >= tau^2", at its bound).
    """

    def __init__(
        self, kind: str, lr: float, b1: float, b2: float, tau: float, size: int
    ) -> None:
        self.kind, self.lr, self.b1, self.b2, self.tau = kind, lr, b1, b2, tau
        self.m = np.zeros(size)
        self.v = np.full(size, tau * tau)

    def step(self, g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(m_t, scale_t) with theta_{t+1} = theta_t - scale_t * m_t."""
        g = g.astype(np.float64)
        delta = -g  # the paper's Delta_t
        if self.kind == "sgd":
            return g.copy(), np.ones_like(g)
        if self.kind == "avgm":
            # Hsu et al.: v <- beta v + Delta w;  w <- w - lr v (here in -Delta terms).
            self.m = self.b1 * self.m + g
            return self.m.copy(), np.full_like(g, self.lr)
        # m_t = b1 m_{t-1} + (1 - b1) Delta_t, stored as -m (our sign).
        self.m = self.b1 * self.m + (1.0 - self.b1) * g
        d2 = delta * delta
        if self.kind == "adagrad":
            self.v = self.v + d2
        elif self.kind == "adam":
            self.v = self.b2 * self.v + (1.0 - self.b2) * d2
        elif self.kind == "yogi":
            self.v = self.v - (1.0 - self.b2) * d2 * np.sign(self.v - d2)
        else:
            raise AssertionError(self.kind)
        # x_{t+1} = x_t + eta m_t / (sqrt(v_t) + tau)
        return self.m.copy(), self.lr / (np.sqrt(self.v) + self.tau)


def _make(kind: str, lr: float, b1: float, b2: float, tau: float) -> ServerOptimiser:
    if kind == "sgd":
        return SGD()
    if kind == "avgm":
        return AvgM(lr=lr, beta=b1)
    return Adaptive(lr=lr, beta=b1, kind=kind, beta2=b2, tau=tau)


def _step(opt: ServerOptimiser, theta: np.ndarray, g: np.ndarray) -> np.ndarray:
    """One round through the protocol, block by block: theta_{t+1} (float32)."""
    out = np.empty_like(theta)
    for s, e in BLOCKS:
        m, scale = opt.step_block(s, g[s:e])
        assert m.dtype == np.float32 and scale.dtype == np.float32
        assert m.shape == scale.shape == (e - s,)
        out[s:e] = theta[s:e] - scale * m
    opt.end_round()
    return out


def _gradients(seed: int, rounds: int) -> list[np.ndarray]:
    """Random pseudo-gradients of varying scale (some coordinates near zero)."""
    rng = np.random.default_rng(seed)
    scales = np.exp(rng.uniform(-4, 1, size=SIZE))
    return [(rng.normal(size=SIZE) * scales).astype(np.float32) for _ in range(rounds)]


KINDS = ("sgd", "avgm", "adagrad", "adam", "yogi")
HYPER = (
    # lr, beta1, beta2, tau
    (0.1, 0.9, 0.99, 1e-3),
    (1.0, 0.5, 0.9, 0.05),
    (0.03, 0.0, 0.5, 1e-2),
)


@pytest.mark.parametrize("hyper", HYPER)
@pytest.mark.parametrize("kind", KINDS)
def test_optimiser_matches_reddi_algorithm_2(
    kind: str, hyper: tuple[float, float, float, float]
) -> None:
    lr, b1, b2, tau = hyper
    opt = _make(kind, lr, b1, b2, tau)
    ref = Reference(kind, lr, b1, b2, tau, SIZE)
    theta = np.random.default_rng(7).normal(size=SIZE).astype(np.float32)
    theta_ref = theta.astype(np.float64)
    opt.begin(SIZE)

    for t, g in enumerate(_gradients(11, 6)):
        m_ref, scale_ref = ref.step(g)
        theta_ref = theta_ref - scale_ref * m_ref
        # Check the returned moment and scale of every block, then the step.
        probe = _make(kind, lr, b1, b2, tau)
        probe.begin(SIZE)
        probe.load_state(opt.state())
        for s, e in BLOCKS:
            m, scale = probe.step_block(s, g[s:e])
            np.testing.assert_allclose(m, m_ref[s:e], rtol=2e-5, atol=1e-9)
            np.testing.assert_allclose(scale, scale_ref[s:e], rtol=2e-5)
        theta = _step(opt, theta, g)

        np.testing.assert_allclose(
            theta, theta_ref, rtol=1e-4, atol=1e-6, err_msg=f"round {t}"
        )
    if kind != "sgd":
        assert opt.state()["steps"].tolist() == [6]


def test_optimiser_adaptive_first_step_is_hand_computed() -> None:
    # One coordinate, by hand: g = 2, b1 = 0.5, b2 = 0.75, tau = 0.5, lr = 0.25.
    # m = 0.5 * 0 + 0.5 * 2 = 1; v_{-1} = 0.25.
    #   adagrad: v = 0.25 + 4 = 4.25;   adam: v = 0.75 * 0.25 + 0.25 * 4 = 1.1875;
    #   yogi:    v = 0.25 - 0.25 * 4 * sign(0.25 - 4) = 1.25.
    g = np.array([2.0], np.float32)
    for kind, v in (("adagrad", 4.25), ("adam", 1.1875), ("yogi", 1.25)):
        opt = Adaptive(lr=0.25, beta=0.5, kind=kind, beta2=0.75, tau=0.5)
        opt.begin(1)

        m, scale = opt.step_block(0, g)

        assert m.tolist() == [1.0]
        assert scale[0] == pytest.approx(0.25 / (np.sqrt(v) + 0.5), rel=1e-6)
        assert opt.state()["v"][0] == pytest.approx(v, rel=1e-7)


def test_optimiser_avgm_is_momentum_on_the_step_hand_computed() -> None:
    opt = AvgM(lr=0.5, beta=0.5)
    opt.begin(1)

    steps = []
    for g in (4.0, 4.0, -8.0):
        m, scale = opt.step_block(0, np.array([g], np.float32))
        steps.append(float(scale[0] * m[0]))
        opt.end_round()

    # m: 4, 0.5*4 + 4 = 6, 0.5*6 - 8 = -5; step lr * m.
    assert steps == [2.0, 3.0, -2.5]
    assert opt.gain == 1.0


def test_optimiser_gain_and_beta_describe_the_first_moment() -> None:
    # The engine splits m_t = beta m_{t-1} + gain g_t over parties: the attributes
    # must say what step_block does.
    for kind in ("avgm", "adagrad", "adam", "yogi"):
        opt = _make(kind, 0.1, 0.75, 0.9, 1e-3)
        opt.begin(1)
        opt.step_block(0, np.array([1.0], np.float32))
        opt.end_round()

        m, _ = opt.step_block(0, np.array([2.0], np.float32))

        want = opt.beta * opt.gain * 1.0 + opt.gain * 2.0
        assert float(m[0]) == pytest.approx(want, rel=1e-6), kind
    assert Adaptive(beta=0.75).gain == 0.25


@pytest.mark.parametrize("kind", KINDS)
def test_optimiser_state_resumes_bit_for_bit(kind: str) -> None:
    gs = _gradients(3, 5)
    whole = _make(kind, 0.1, 0.9, 0.99, 1e-3)
    whole.begin(SIZE)
    theta_whole = np.ones(SIZE, np.float32)
    for g in gs:
        theta_whole = _step(whole, theta_whole, g)

    first = _make(kind, 0.1, 0.9, 0.99, 1e-3)
    first.begin(SIZE)
    theta = np.ones(SIZE, np.float32)
    for g in gs[:2]:
        theta = _step(first, theta, g)
    saved = first.state()
    # Through .npz bytes as a checkpoint would, without pickle.
    buf = io.BytesIO()
    np.savez(buf, allow_pickle=False, **saved)
    buf.seek(0)
    with np.load(buf, allow_pickle=False) as z:
        loaded = {k: z[k] for k in z.files}
    first.step_block(0, np.full(SIZE, 1e3, np.float32))  # the copy is not a view
    second = _make(kind, 0.1, 0.9, 0.99, 1e-3)
    second.load_state(loaded)
    second.begin(SIZE)  # after load: must not reset what was loaded
    for g in gs[2:]:
        theta = _step(second, theta, g)

    np.testing.assert_array_equal(theta, theta_whole)
    for k, v in whole.state().items():
        np.testing.assert_array_equal(second.state()[k], v, err_msg=k)


def test_optimiser_begin_is_idempotent() -> None:
    opt = Adaptive(lr=0.1, beta=0.9, kind="adam")
    opt.begin(SIZE)
    opt.step_block(0, np.ones(SIZE, np.float32))
    before = opt.state()

    opt.begin(SIZE)

    for k, v in before.items():
        np.testing.assert_array_equal(opt.state()[k], v)


def test_optimiser_yogi_second_moment_moves_towards_g2_both_ways() -> None:
    # Yogi's additive update: v grows when v < g^2 and shrinks when v > g^2, by
    # (1 - b2) g^2 each time (Zaheer et al. 2018, as used by Reddi et al.).
    opt = Adaptive(lr=0.1, beta=0.0, kind="yogi", beta2=0.5, tau=1.0)
    opt.begin(2)
    # v_{-1} = tau^2 = 1: coordinate 0 has g^2 = 4 > 1, coordinate 1 g^2 = 0.25 < 1.
    opt.step_block(0, np.array([2.0, 0.5], np.float32))

    np.testing.assert_allclose(opt.state()["v"], [1 + 0.5 * 4, 1 - 0.5 * 0.25])


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"kind": "nadam"}, "unknown adaptive optimiser 'nadam'"),
        ({"beta2": 1.0}, "beta2 must be in [0, 1)"),
        ({"beta2": -0.1}, "beta2 must be in [0, 1)"),
        ({"tau": 0.0}, "tau must be > 0"),
        ({"lr": 0.0}, "lr must be > 0"),
        ({"lr": float("nan")}, "lr must be > 0"),
        ({"beta": 1.0}, "beta1 (momentum) must be in [0, 1)"),
    ],
)
def test_optimiser_adaptive_refuses_bad_hyper_parameters(
    kw: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        Adaptive(**kw)


def test_optimiser_avgm_refuses_bad_momentum() -> None:
    with pytest.raises(ConfigError, match=r"avgm: beta1 \(momentum\) must be in"):
        AvgM(beta=1.5)


def _cfg(**kw: Any) -> RoundConfig:
    return RoundConfig(rounds=1, norm_bound="off", claim_cap=0.0, **kw)


def test_optimiser_built_from_config() -> None:
    adam = build_optimiser(
        _cfg(server_opt="adam", server_beta1=0.8, server_beta2=0.95, server_tau=0.01)
    )
    avgm = build_optimiser(_cfg(server_opt="avgm", server_opt_lr=0.7))

    assert isinstance(adam, Adaptive)
    assert (adam.kind, adam.lr, adam.beta, adam.beta2, adam.tau) == (
        "adam",
        DEFAULT_OPT_LR["adam"],
        0.8,
        0.95,
        0.01,
    )
    assert adam.gain == pytest.approx(0.2)
    assert isinstance(avgm, AvgM)
    assert (avgm.lr, avgm.beta, avgm.gain) == (0.7, 0.9, 1.0)
    assert isinstance(build_optimiser(_cfg()), SGD)


@pytest.mark.parametrize(
    ("server_opt", "aggregation", "name", "streaming"),
    [
        ("sgd", "samples", "samples", True),
        ("sgd", "uniform", "uniform", True),
        ("avgm", "samples", "samples+avgm", False),
        ("yogi", "uniform", "uniform+yogi", False),
        ("sgd", "median", "median", False),
        ("adagrad", "trimmed-mean", "trimmed-mean+adagrad", False),
        ("sgd", "fltrust", "fltrust", False),
    ],
)
def test_optimiser_strategy_name_and_streaming(
    server_opt: str, aggregation: str, name: str, streaming: bool
) -> None:
    strategy = build_strategy(_cfg(server_opt=server_opt, aggregation=aggregation))

    assert isinstance(strategy, Strategy)
    assert strategy.name == name
    assert strategy.streaming is streaming
