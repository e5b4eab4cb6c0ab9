from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest
import torch

from fedgrpc.datasets.sources import load_dataset, subset
from fedgrpc.errors import ConfigError
from fedgrpc.learning.models import build_model, get_params, init_params
from fedgrpc.learning.training import Evaluator, local_update
from fedgrpc.types import UpdateKind

Arrays = dict[str, npt.NDArray[np.float32]]
SHAPE = (1, 2, 2)
N_CLASSES = 3


def _tiny(
    n: int = 12, seed: int = 0
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64], Arrays]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, *SHAPE)).astype(np.float32)
    y = rng.integers(0, N_CLASSES, size=n)
    params = init_params("logreg", SHAPE, N_CLASSES, 8, seed=seed)
    return x, y, params


def _np_loss(
    w: npt.NDArray[np.float64],
    b: npt.NDArray[np.float64],
    x: npt.NDArray[np.float32],
    y: npt.NDArray[np.int64],
) -> float:
    """Float64 NumPy oracle: mean softmax cross-entropy of a linear model."""
    logits = x.reshape(len(x), -1).astype(np.float64) @ w.T + b  # (n, classes)
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return float(-log_probs[np.arange(len(y)), y].mean())


def _finite_difference(
    params: Arrays, x: npt.NDArray[np.float32], y: npt.NDArray[np.int64]
) -> Arrays:
    w = params["fc.weight"].astype(np.float64)
    b = params["fc.bias"].astype(np.float64)
    eps = 1e-6
    grads: Arrays = {}
    for name, base in (("fc.weight", w), ("fc.bias", b)):
        g = np.zeros_like(base)
        for i in np.ndindex(base.shape):
            plus, minus = base.copy(), base.copy()
            plus[i] += eps
            minus[i] -= eps
            args_p = (plus, b) if name == "fc.weight" else (w, plus)
            args_m = (minus, b) if name == "fc.weight" else (w, minus)
            g[i] = (_np_loss(*args_p, x, y) - _np_loss(*args_m, x, y)) / (2 * eps)
        grads[name] = g.astype(np.float32)
    return grads


def _update(
    model: torch.nn.Module,
    params: Arrays,
    x: npt.NDArray[np.float32],
    y: npt.NDArray[np.int64],
    kind: UpdateKind,
    *,
    seed: int = 0,
    lr: float = 0.1,
    local_steps: int = 0,
    local_epochs: int = 1,
    batch_size: int = 0,
) -> tuple[Arrays, float]:
    return local_update(
        model,
        params,
        x,
        y,
        kind=kind,
        lr=lr,
        local_steps=local_steps,
        local_epochs=local_epochs,
        batch_size=batch_size,
        rng=np.random.default_rng(seed),
    )


def test_local_update_gradient_matches_finite_difference() -> None:
    x, y, params = _tiny()
    model = build_model("logreg", SHAPE, N_CLASSES)

    grads, loss = _update(model, params, x, y, UpdateKind.GRADIENT)

    expected = _finite_difference(params, x, y)
    w, b = (params[k].astype(np.float64) for k in ("fc.weight", "fc.bias"))
    assert loss == pytest.approx(_np_loss(w, b, x, y), rel=1e-5)
    assert list(grads) == ["fc.weight", "fc.bias"]
    for name in grads:
        assert grads[name].dtype == np.float32
        np.testing.assert_allclose(grads[name], expected[name], atol=1e-5)


def test_local_update_gradient_minibatch_uses_rng_draw() -> None:
    x, y, params = _tiny(n=20)
    model = build_model("logreg", SHAPE, N_CLASSES)
    chosen = np.random.default_rng(11).choice(20, size=5, replace=False)

    grads, _ = _update(model, params, x, y, UpdateKind.GRADIENT, seed=11, batch_size=5)
    full_on_batch, _ = _update(model, params, x[chosen], y[chosen], UpdateKind.GRADIENT)

    for name in grads:
        np.testing.assert_allclose(grads[name], full_on_batch[name], atol=1e-6)


def test_local_update_batch_larger_than_data_is_full_batch() -> None:
    x, y, params = _tiny()
    model = build_model("logreg", SHAPE, N_CLASSES)

    big, _ = _update(model, params, x, y, UpdateKind.GRADIENT, batch_size=1000)
    full, _ = _update(model, params, x, y, UpdateKind.GRADIENT, batch_size=0)

    for name in big:
        np.testing.assert_array_equal(big[name], full[name])


def test_local_update_delta_one_full_step_is_lr_times_gradient() -> None:
    x, y, params = _tiny()
    model = build_model("logreg", SHAPE, N_CLASSES)

    grads, g_loss = _update(model, params, x, y, UpdateKind.GRADIENT)
    delta, d_loss = _update(
        model, params, x, y, UpdateKind.DELTA, lr=0.3, local_steps=1
    )

    assert d_loss == pytest.approx(g_loss)
    for name in grads:
        np.testing.assert_allclose(delta[name], 0.3 * grads[name], atol=1e-6)


def test_local_update_delta_lowers_training_loss() -> None:
    ds = subset(load_dataset("digits"), np.arange(300))
    model = build_model("mlp", ds.input_shape, 10, 32)
    params = init_params("mlp", ds.input_shape, 10, 32, seed=0)
    evaluator = Evaluator(build_model("mlp", ds.input_shape, 10, 32), ds.x, ds.y)

    delta, _ = _update(
        model,
        params,
        ds.x,
        ds.y,
        UpdateKind.DELTA,
        lr=0.5,
        local_epochs=3,
        batch_size=32,
    )
    trained = {k: params[k] - delta[k] for k in params}

    loss_before, acc_before = evaluator.evaluate(params)
    loss_after, acc_after = evaluator.evaluate(trained)
    assert loss_after < 0.7 * loss_before
    assert acc_after > acc_before
    for name, value in get_params(model).items():
        np.testing.assert_allclose(value, trained[name], atol=1e-6)


def test_local_update_delta_deterministic_for_seed() -> None:
    x, y, params = _tiny(n=40)
    model = build_model("logreg", SHAPE, N_CLASSES)
    delta = UpdateKind.DELTA

    a, loss_a = _update(model, params, x, y, delta, seed=5, local_steps=7, batch_size=6)
    b, loss_b = _update(model, params, x, y, delta, seed=5, local_steps=7, batch_size=6)
    c, _ = _update(model, params, x, y, delta, seed=6, local_steps=7, batch_size=6)

    assert loss_a == loss_b
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])
    assert not np.array_equal(a["fc.weight"], c["fc.weight"])


def test_local_update_steps_continue_past_one_epoch() -> None:
    x, y, params = _tiny(n=10)
    model = build_model("logreg", SHAPE, N_CLASSES)

    one_epoch, _ = _update(
        model, params, x, y, UpdateKind.DELTA, local_epochs=1, batch_size=4
    )
    seven_steps, loss = _update(
        model, params, x, y, UpdateKind.DELTA, local_steps=7, batch_size=4
    )

    assert np.isfinite(loss)
    assert np.abs(seven_steps["fc.weight"]).sum() > np.abs(one_epoch["fc.weight"]).sum()


@pytest.mark.parametrize(
    ("lr", "local_epochs", "batch_size", "match"),
    [
        (0.0, 1, 0, "lr must be positive"),
        (0.1, 0, 0, "local_epochs >= 1"),
        (0.1, 1, -1, "batch_size"),
    ],
)
def test_local_update_bad_hyperparameters_raise(
    lr: float, local_epochs: int, batch_size: int, match: str
) -> None:
    x, y, params = _tiny()
    model = build_model("logreg", SHAPE, N_CLASSES)

    with pytest.raises(ConfigError, match=match):
        _update(
            model,
            params,
            x,
            y,
            UpdateKind.DELTA,
            lr=lr,
            local_epochs=local_epochs,
            batch_size=batch_size,
        )


def _np_grad(
    w: npt.NDArray[np.float64],
    b: npt.NDArray[np.float64],
    x: npt.NDArray[np.float32],
    y: npt.NDArray[np.int64],
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Float64 NumPy oracle: gradient of the mean softmax cross-entropy (W, b)."""
    flat = x.reshape(len(x), -1).astype(np.float64)  # (n, features)
    logits = flat @ w.T + b  # (n, classes)
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    p[np.arange(len(y)), y] -= 1.0  # dL/dlogits * n
    return p.T @ flat / len(y), p.mean(axis=0)


def _np_local_sgd(
    params: Arrays,
    x: npt.NDArray[np.float32],
    y: npt.NDArray[np.int64],
    *,
    lr: float,
    steps: int,
    momentum: float,
    weight_decay: float,
    prox_mu: float,
) -> dict[str, npt.NDArray[np.float64]]:
    """Full-batch SGD on L + (mu/2)||theta - theta_t||^2, torch.optim.SGD's rules."""
    theta_t = {k: v.astype(np.float64) for k, v in params.items()}
    theta = {k: v.copy() for k, v in theta_t.items()}
    buf: dict[str, npt.NDArray[np.float64]] = {}
    for step in range(steps):
        gw, gb = _np_grad(theta["fc.weight"], theta["fc.bias"], x, y)
        for name, g in (("fc.weight", gw), ("fc.bias", gb)):
            d = g + prox_mu * (theta[name] - theta_t[name]) + weight_decay * theta[name]
            buf[name] = d if step == 0 else momentum * buf[name] + d
            theta[name] = theta[name] - lr * buf[name]
    return {k: theta_t[k] - theta[k] for k in theta}  # Delta = theta_t - theta_local


def test_np_grad_oracle_matches_finite_difference() -> None:
    x, y, params = _tiny()

    gw, gb = _np_grad(
        params["fc.weight"].astype(np.float64),
        params["fc.bias"].astype(np.float64),
        x,
        y,
    )

    fd = _finite_difference(params, x, y)
    np.testing.assert_allclose(gw, fd["fc.weight"], atol=1e-6)
    np.testing.assert_allclose(gb, fd["fc.bias"], atol=1e-6)


@pytest.mark.parametrize(
    ("momentum", "weight_decay", "prox_mu"),
    [(0.9, 0.0, 0.0), (0.0, 0.05, 0.0), (0.0, 0.0, 2.0), (0.5, 0.01, 0.7)],
)
def test_local_update_delta_optimiser_matches_numpy_steps(
    momentum: float, weight_decay: float, prox_mu: float
) -> None:
    x, y, params = _tiny(n=20)
    model = build_model("logreg", SHAPE, N_CLASSES)
    expected = _np_local_sgd(
        params,
        x,
        y,
        lr=0.4,
        steps=3,
        momentum=momentum,
        weight_decay=weight_decay,
        prox_mu=prox_mu,
    )
    plain = _np_local_sgd(
        params, x, y, lr=0.4, steps=3, momentum=0.0, weight_decay=0.0, prox_mu=0.0
    )

    delta, _ = local_update(
        model,
        params,
        x,
        y,
        kind=UpdateKind.DELTA,
        lr=0.4,
        local_steps=3,
        local_epochs=1,
        batch_size=0,
        rng=np.random.default_rng(0),
        momentum=momentum,
        weight_decay=weight_decay,
        prox_mu=prox_mu,
    )

    for name in expected:
        np.testing.assert_allclose(delta[name], expected[name], rtol=1e-5, atol=1e-6)
        # The option changes the step by far more than the tolerance.
        assert np.abs(expected[name] - plain[name]).max() > 1e-3


def test_local_update_delta_momentum_and_decay_match_torch_sgd() -> None:
    x, y, params = _tiny(n=20)
    model = build_model("logreg", SHAPE, N_CLASSES)
    ref = build_model("logreg", SHAPE, N_CLASSES)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            p.copy_(torch.from_numpy(params[name]))
    opt = torch.optim.SGD(ref.parameters(), lr=0.3, momentum=0.8, weight_decay=0.02)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(4):
        loss = torch.nn.functional.cross_entropy(ref(xt), yt)
        plist = list(ref.parameters())
        for p, g in zip(plist, torch.autograd.grad(loss, plist), strict=True):
            p.grad = g
        opt.step()

    delta, _ = local_update(
        model,
        params,
        x,
        y,
        kind=UpdateKind.DELTA,
        lr=0.3,
        local_steps=4,
        local_epochs=1,
        batch_size=0,
        rng=np.random.default_rng(0),
        momentum=0.8,
        weight_decay=0.02,
    )

    for name, p in ref.named_parameters():
        np.testing.assert_allclose(
            delta[name], params[name] - p.detach().numpy(), rtol=1e-5, atol=1e-6
        )


def test_local_update_delta_prox_pulls_towards_global_model() -> None:
    x, y, params = _tiny(n=40)
    model = build_model("logreg", SHAPE, N_CLASSES)

    norms = []
    for mu in (0.0, 1.0, 10.0):
        delta, _ = local_update(
            model,
            params,
            x,
            y,
            kind=UpdateKind.DELTA,
            lr=0.05,
            local_steps=12,
            local_epochs=1,
            batch_size=8,
            rng=np.random.default_rng(3),
            prox_mu=mu,
        )
        norms.append(float(np.sqrt(sum(np.sum(d**2) for d in delta.values()))))

    assert norms[0] > norms[1] > norms[2] > 0


def test_local_update_optimiser_on_gradient_update_refused() -> None:
    x, y, params = _tiny()
    model = build_model("logreg", SHAPE, N_CLASSES)

    with pytest.raises(ConfigError, match="delta updates only"):
        local_update(
            model,
            params,
            x,
            y,
            kind=UpdateKind.GRADIENT,
            lr=0.1,
            local_steps=0,
            local_epochs=1,
            batch_size=0,
            rng=np.random.default_rng(0),
            momentum=0.9,
        )


@pytest.mark.parametrize(
    ("option", "value", "match"),
    [
        ("momentum", 1.0, r"momentum must lie in \[0, 1\)"),
        ("momentum", -0.1, "momentum must be a finite number >= 0"),
        ("weight_decay", float("nan"), "weight_decay must be a finite number"),
        ("prox_mu", float("inf"), "prox_mu must be a finite number"),
    ],
)
def test_local_update_bad_optimiser_values_raise(
    option: str, value: float, match: str
) -> None:
    x, y, params = _tiny()
    model = build_model("logreg", SHAPE, N_CLASSES)
    kwargs = {option: value}

    with pytest.raises(ConfigError, match=match):
        local_update(
            model,
            params,
            x,
            y,
            kind=UpdateKind.DELTA,
            lr=0.1,
            local_steps=1,
            local_epochs=1,
            batch_size=0,
            rng=np.random.default_rng(0),
            **kwargs,
        )


@pytest.mark.parametrize("batch_size", [1, 7, 64, 4096])
def test_evaluator_gradient_is_mean_for_any_batch_size(batch_size: int) -> None:
    x, y, params = _tiny(n=50)
    full, full_loss = _update(
        build_model("logreg", SHAPE, N_CLASSES), params, x, y, UpdateKind.GRADIENT
    )
    evaluator = Evaluator(build_model("logreg", SHAPE, N_CLASSES), x, y, batch_size)

    grads, loss, acc = evaluator.gradient(params)

    assert loss == pytest.approx(full_loss, rel=1e-6)
    assert (loss, acc) == pytest.approx(evaluator.evaluate(params), rel=1e-6)
    for name in full:
        assert grads[name].dtype == np.float32
        np.testing.assert_allclose(grads[name], full[name], atol=1e-6)


def test_evaluator_evaluate_matches_manual_accuracy() -> None:
    x, y, params = _tiny(n=30)
    model = build_model("logreg", SHAPE, N_CLASSES)
    evaluator = Evaluator(model, x, y, batch_size=4)
    w, b = params["fc.weight"], params["fc.bias"]
    predicted = (x.reshape(30, -1) @ w.T + b).argmax(axis=1)

    loss, acc = evaluator.evaluate(params)

    assert acc == pytest.approx(float((predicted == y).mean()))
    assert loss == pytest.approx(
        _np_loss(w.astype(np.float64), b.astype(np.float64), x, y), rel=1e-5
    )


def test_evaluator_digest_stable_and_data_sensitive() -> None:
    x, y, _ = _tiny()
    model = build_model("logreg", SHAPE, N_CLASSES)
    y2 = y.copy()
    y2[0] = (y2[0] + 1) % N_CLASSES

    first = Evaluator(model, x, y).digest()
    second = Evaluator(model, x.copy(), y.copy()).digest()
    other = Evaluator(model, x, y2).digest()

    assert first == second
    assert first != other
    assert len(first) == 64


def test_evaluator_empty_set_raises() -> None:
    model = build_model("logreg", SHAPE, N_CLASSES)

    with pytest.raises(ConfigError, match="validation set"):
        Evaluator(
            model, np.zeros((0, *SHAPE), dtype=np.float32), np.zeros(0, dtype=np.int64)
        )
