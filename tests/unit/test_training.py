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
