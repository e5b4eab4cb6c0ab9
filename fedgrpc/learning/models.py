"""Built-in models, ``module:factory`` models, and named-array parameter access.

Parameters cross every boundary as ``dict[str, np.ndarray]`` keyed by the names of
``model.named_parameters()``, in that order; buffers never travel.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from fedgrpc.errors import ConfigError
from fedgrpc.factories import load_factory
from fedgrpc.types import TensorSpec

log = logging.getLogger(__name__)

BUILTIN_MODELS = ("logreg", "mlp", "cnn")

_NUMPY_DTYPE: dict[torch.dtype, str] = {
    torch.float32: "float32",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.float64: "float64",
    torch.int64: "int64",
    torch.int32: "int32",
    torch.uint8: "uint8",
    torch.bool: "bool",
}


class LogReg(nn.Module):
    """Multinomial logistic regression: flatten, then one linear layer."""

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(in_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits ``(batch, num_classes)``."""
        return self.fc(x.flatten(1))  # type: ignore[no-any-return]


class MLP(nn.Module):
    """Flatten, ``Linear(d, hidden)``, ReLU, ``Linear(hidden, num_classes)``."""

    def __init__(self, in_features: int, hidden: int, num_classes: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits ``(batch, num_classes)``."""
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))  # type: ignore[no-any-return]


class CNN(nn.Module):
    """Two 3x3 conv layers, each ReLU + 2x2 max pool, then a linear head.

    Channels are ``hidden // 4`` and ``hidden // 2`` (16 and 32 for the default 64).
    Pooling rounds up, so small inputs such as digits' 8x8 keep a 2x2 map.
    """

    def __init__(
        self, input_shape: tuple[int, int, int], hidden: int, num_classes: int
    ) -> None:
        super().__init__()
        channels, height, width = input_shape
        c1, c2 = max(1, hidden // 4), max(1, hidden // 2)
        self.conv1 = nn.Conv2d(channels, c1, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, kernel_size=3, padding=1)
        self.pool = nn.MaxPool2d(2, ceil_mode=True)
        h, w = _pooled(_pooled(height)), _pooled(_pooled(width))
        self.fc = nn.Linear(c2 * h * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits ``(batch, num_classes)`` for ``x`` of ``(batch, C, H, W)``."""
        x = self.pool(torch.relu(self.conv1(x)))  # (B, c1, ceil(H/2), ceil(W/2))
        x = self.pool(torch.relu(self.conv2(x)))  # (B, c2, ceil(H/4), ceil(W/4))
        return self.fc(x.flatten(1))  # type: ignore[no-any-return]


def _pooled(size: int) -> int:
    """Output length of a 2x2, stride-2, ``ceil_mode`` max pool."""
    return (size + 1) // 2


def build_model(
    name: str, input_shape: Sequence[int], num_classes: int, hidden: int = 64
) -> nn.Module:
    """Build a built-in model (``logreg``, ``mlp``, ``cnn``) or a user factory's.

    A user model is named ``package.module:factory`` and built as
    ``factory(input_shape=tuple, num_classes=int, hidden=int)``.

    Args:
        name: Built-in name or import string.
        input_shape: Shape of one sample, e.g. ``(1, 8, 8)``.
        num_classes: Number of output logits.
        hidden: Width of the MLP's hidden layer; the CNN's channel scale.

    Raises:
        ConfigError: unknown name, bad shape or sizes, or a factory that fails or does
            not return an ``nn.Module``.
    """
    shape = tuple(int(s) for s in input_shape)
    if not shape or any(s < 1 for s in shape):
        raise ConfigError(f"model {name!r}: input_shape must be positive, got {shape}")
    if num_classes < 1:
        raise ConfigError(
            f"model {name!r}: num_classes must be >= 1, got {num_classes}"
        )
    if hidden < 1:
        raise ConfigError(f"model {name!r}: hidden must be >= 1, got {hidden}")
    in_features = int(np.prod(shape))
    if name == "logreg":
        return LogReg(in_features, num_classes)
    if name == "mlp":
        return MLP(in_features, hidden, num_classes)
    if name == "cnn":
        if len(shape) != 3:
            raise ConfigError(
                f"model 'cnn' needs input_shape (channels, height, width), got {shape}"
            )
        return CNN((shape[0], shape[1], shape[2]), hidden, num_classes)
    if ":" not in name:
        raise ConfigError(
            f"unknown model {name!r}: expected one of {', '.join(BUILTIN_MODELS)} "
            "or 'package.module:factory'"
        )
    factory = load_factory(name, BUILTIN_MODELS)
    try:
        model = factory(input_shape=shape, num_classes=num_classes, hidden=hidden)
    except TypeError as exc:
        raise ConfigError(
            f"model factory {name!r} failed: {exc} (it is called as "
            "factory(input_shape=tuple, num_classes=int, hidden=int))"
        ) from exc
    if not isinstance(model, nn.Module):
        raise ConfigError(
            f"model factory {name!r} returned {type(model).__name__}, "
            "expected a torch.nn.Module"
        )
    return model


def init_params(
    name: str,
    input_shape: Sequence[int],
    num_classes: int,
    hidden: int,
    seed: int,
) -> dict[str, npt.NDArray[np.float32]]:
    """Deterministic initial parameters of a model, as named float32 arrays.

    The model is built under ``torch.manual_seed(seed)`` inside ``fork_rng``, so the
    caller's global torch RNG state is left as it was.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model(name, input_shape, num_classes, hidden)
    return get_params(model)


def model_specs(model: nn.Module) -> list[TensorSpec]:
    """Name, dtype and shape of each parameter (buffers excluded), in model order."""
    return [
        TensorSpec(
            name=name,
            dtype=_NUMPY_DTYPE.get(p.dtype, str(p.dtype).removeprefix("torch.")),
            shape=tuple(p.shape),
        )
        for name, p in model.named_parameters()
    ]


def get_params(model: nn.Module) -> dict[str, npt.NDArray[np.float32]]:
    """C-contiguous float32 copies of the model's parameters, in model order."""
    return {
        name: np.array(
            p.detach().to("cpu", torch.float32).numpy(),
            dtype=np.float32,
            order="C",
            copy=True,
        )
        for name, p in model.named_parameters()
    }


def set_params(model: nn.Module, params: Mapping[str, npt.NDArray[Any]]) -> None:
    """Copy named arrays into the model's parameters (cast to each parameter's dtype).

    Raises:
        ConfigError: a name is missing or unexpected, or a shape differs; nothing is
            written in that case.
    """
    named = dict(model.named_parameters())
    missing = [n for n in named if n not in params]
    extra = [n for n in params if n not in named]
    if missing or extra:
        raise ConfigError(
            f"parameter names differ from the model: missing {missing}, "
            f"unexpected {extra}"
        )
    for name, p in named.items():
        shape = tuple(np.shape(params[name]))
        if shape != tuple(p.shape):
            raise ConfigError(
                f"parameter {name!r}: expected shape {tuple(p.shape)}, got {shape}"
            )
    with torch.no_grad():
        for name, p in named.items():
            a = np.asarray(params[name])
            if a.flags.writeable and a.flags.c_contiguous and a.dtype.isnative:
                p.copy_(torch.from_numpy(a))  # no temporary; copy_ casts
            else:  # torch cannot wrap read-only memory (wire views): copy it
                p.copy_(torch.tensor(a, dtype=p.dtype))
