from __future__ import annotations

import sys
import types
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from fedgrpc.errors import ConfigError
from fedgrpc.factories import load_factory
from fedgrpc.learning.models import (
    build_model,
    get_params,
    init_params,
    model_specs,
    set_params,
)
from fedgrpc.types import TensorSpec


@pytest.mark.parametrize("name", ["logreg", "mlp", "cnn"])
@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 28, 28)])
def test_build_model_builtin_gives_logits(name: str, shape: tuple[int, ...]) -> None:
    model = build_model(name, shape, num_classes=10, hidden=16)

    out = model(torch.zeros((3, *shape)))

    assert out.shape == (3, 10)


def test_build_model_mlp_has_hidden_width() -> None:
    model = build_model("mlp", (1, 8, 8), num_classes=10, hidden=32)

    shapes = {s.name: s.shape for s in model_specs(model)}

    assert shapes == {
        "fc1.weight": (32, 64),
        "fc1.bias": (32,),
        "fc2.weight": (10, 32),
        "fc2.bias": (10,),
    }


def test_build_model_unknown_name_raises() -> None:
    with pytest.raises(ConfigError, match="'resnet9000'"):
        build_model("resnet9000", (1, 8, 8), 10)


def test_build_model_cnn_needs_three_dims() -> None:
    with pytest.raises(ConfigError, match="cnn"):
        build_model("cnn", (64,), 10)


def test_build_model_factory_called_with_keywords(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[dict[str, Any]] = []

    def factory(**kwargs: Any) -> nn.Module:
        calls.append(kwargs)
        return nn.Linear(4, kwargs["num_classes"])

    fake = types.ModuleType("fake_user_models")
    fake.make = factory  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "fake_user_models", fake)

    model = build_model("fake_user_models:make", [1, 2, 2], num_classes=3, hidden=7)

    assert isinstance(model, nn.Linear)
    assert calls == [{"input_shape": (1, 2, 2), "num_classes": 3, "hidden": 7}]


def test_build_model_factory_not_a_module_raises() -> None:
    with pytest.raises(ConfigError, match=r"'builtins:dict'.*nn\.Module"):
        build_model("builtins:dict", (1, 8, 8), 10)


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("no_such_pkg_xyz.mod:f", "cannot import module 'no_such_pkg_xyz.mod'"),
        ("math:nope", "no attribute 'nope'"),
        ("math:pi", "not a callable"),
        ("math", "expected 'package.module:factory'"),
        (":f", "expected 'package.module:factory'"),
        ("math:", "expected 'package.module:factory'"),
    ],
)
def test_load_factory_bad_spec_raises(spec: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_factory(spec)


def test_load_factory_dotted_attribute() -> None:
    assert load_factory("pathlib:Path.cwd") == Path.cwd
    assert load_factory("torch.nn:Identity") is nn.Identity


def test_init_params_deterministic_float32_contiguous() -> None:
    a = init_params("mlp", (1, 8, 8), 10, 16, seed=3)
    b = init_params("mlp", (1, 8, 8), 10, 16, seed=3)
    c = init_params("mlp", (1, 8, 8), 10, 16, seed=4)

    assert list(a) == ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
    for name in a:
        assert a[name].dtype == np.float32
        assert a[name].flags.c_contiguous
        np.testing.assert_array_equal(a[name], b[name])
    assert not np.array_equal(a["fc1.weight"], c["fc1.weight"])


def test_init_params_leaves_global_torch_rng_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)

    init_params("cnn", (1, 8, 8), 10, 16, seed=0)
    actual = torch.rand(4)

    assert torch.equal(actual, expected)


def test_model_specs_parameters_only() -> None:
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))

    specs = model_specs(model)

    assert specs == [
        TensorSpec("0.weight", "float32", (2, 3)),
        TensorSpec("0.bias", "float32", (2,)),
        TensorSpec("1.weight", "float32", (2,)),
        TensorSpec("1.bias", "float32", (2,)),
    ]


def test_get_params_returns_copies() -> None:
    model = build_model("logreg", (1, 2, 2), 3)

    params = get_params(model)
    params["fc.bias"][:] = 42.0

    assert not np.any(get_params(model)["fc.bias"] == 42.0)


def test_set_params_round_trip_accepts_read_only_arrays() -> None:
    model = build_model("mlp", (1, 8, 8), 10, 8)
    params = init_params("mlp", (1, 8, 8), 10, 8, seed=9)
    for a in params.values():
        a.flags.writeable = False

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        set_params(model, params)

    for name, a in get_params(model).items():
        np.testing.assert_array_equal(a, params[name])


def test_set_params_missing_name_raises() -> None:
    model = build_model("logreg", (1, 2, 2), 3)
    params = get_params(model)
    del params["fc.bias"]

    with pytest.raises(ConfigError, match=r"missing \['fc.bias'\]"):
        set_params(model, params)


def test_set_params_extra_name_raises() -> None:
    model = build_model("logreg", (1, 2, 2), 3)
    params = get_params(model)
    params["fc.extra"] = np.zeros(1, dtype=np.float32)

    with pytest.raises(ConfigError, match=r"unexpected \['fc.extra'\]"):
        set_params(model, params)


def test_set_params_wrong_shape_raises_and_writes_nothing() -> None:
    model = build_model("logreg", (1, 2, 2), 3)
    before = get_params(model)
    params = {k: np.ones_like(v) for k, v in before.items()}
    params["fc.bias"] = np.zeros(4, dtype=np.float32)

    with pytest.raises(ConfigError, match=r"'fc.bias'.*\(3,\).*\(4,\)"):
        set_params(model, params)

    np.testing.assert_array_equal(get_params(model)["fc.weight"], before["fc.weight"])
