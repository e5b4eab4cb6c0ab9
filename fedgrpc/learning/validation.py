"""The server's validation side in torch: theta_0, and passes on flat vectors.

Used by the aggregator in-process (``--validator thread``), by the validation worker
process (``--validator process``, :mod:`fedgrpc.learning.worker`) and by in-process
runs: one code path for all three.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from torch import nn

from fedgrpc.config import RoundConfig
from fedgrpc.datasets.sources import Dataset, load_dataset, subset
from fedgrpc.errors import ConfigError
from fedgrpc.layout import FlatLayout
from fedgrpc.learning.models import build_model, init_params, model_specs
from fedgrpc.learning.training import Evaluator
from fedgrpc.store.checkpoint import load_arrays
from fedgrpc.types import TensorSpec


def config_for_data(cfg: RoundConfig, data: Dataset) -> RoundConfig:
    """``cfg`` with input shape and class count taken from a data set."""
    return replace(
        cfg, input_shape=tuple(data.x.shape[1:]), num_classes=data.num_classes
    )


class FlatValidator:
    """Adapts :class:`Evaluator` (named arrays) to the engine's flat vectors."""

    def __init__(self, evaluator: Evaluator, layout: FlatLayout) -> None:
        self._evaluator = evaluator
        self._layout = layout

    def gradient(
        self, flat: np.ndarray, out: np.ndarray | None = None
    ) -> tuple[np.ndarray, float, float]:
        """Mean validation gradient at ``flat``, loss and accuracy.

        The gradient is a flat float32 vector, written into ``out`` if given.
        """
        grads, loss, acc = self._evaluator.gradient(self._layout.views(flat))
        return self._layout.flatten(grads, out=out), loss, acc

    def evaluate(self, flat: np.ndarray) -> tuple[float, float]:
        """Validation loss and accuracy at ``flat``."""
        return self._evaluator.evaluate(self._layout.views(flat))


@dataclass
class ModelSetup:
    """A model, its tensor layout and its initial parameters theta_0."""

    model: nn.Module
    specs: list[TensorSpec]
    layout: FlatLayout
    theta0: np.ndarray


def setup_model(cfg: RoundConfig, init_model: Path | None = None) -> ModelSetup:
    """Build the model of ``cfg`` and theta_0 (seeded, or read from ``init_model``)."""
    model = build_model(cfg.model, cfg.input_shape, cfg.num_classes, cfg.model_hidden)
    specs = model_specs(model)
    layout = FlatLayout.of(specs)
    if init_model is not None:
        try:
            arrays, _ = load_arrays(init_model)
        except ConfigError as err:
            raise ConfigError(f"--init-model {init_model}: {err}") from None
        try:
            theta0 = layout.flatten(
                {k: _init_tensor(init_model, k, v) for k, v in arrays.items()}
            )
        except ConfigError:
            raise
        except Exception as err:
            raise ConfigError(
                f"--init-model {init_model}: {err} (model {cfg.model!r} for inputs "
                f"{list(cfg.input_shape)} and {cfg.num_classes} classes)"
            ) from None
    else:
        params = init_params(
            cfg.model, cfg.input_shape, cfg.num_classes, cfg.model_hidden, cfg.seed
        )
        theta0 = layout.flatten(params)
    return ModelSetup(model, specs, layout, theta0)


def _init_tensor(path: Path, name: str, value: np.ndarray) -> np.ndarray:
    """One tensor of ``--init-model`` as float32; refuse complex or non-finite ones.

    Round 0 would otherwise open on a model whose validation pass fails.
    """
    if np.iscomplexobj(value) or not (
        np.issubdtype(value.dtype, np.floating)
        or np.issubdtype(value.dtype, np.integer)
    ):
        raise ConfigError(
            f"--init-model {path}: tensor {name!r} has dtype {value.dtype}; need real "
            "numbers (float or int)"
        )
    with np.errstate(over="ignore"):  # float64 beyond float32 becomes inf: refused
        out = value.astype(np.float32)
    bad = ~np.isfinite(out)
    if bad.any():
        first = np.unravel_index(int(np.flatnonzero(bad)[0]), out.shape)
        raise ConfigError(
            f"--init-model {path}: tensor {name!r} has {int(bad.sum())} non-finite "
            f"values (NaN, Inf, or beyond float32), the first at index "
            f"{tuple(int(i) for i in first)}: {value[first]}"
        )
    return out


@dataclass
class LocalValidation:
    """The server's validation side, built in the process that runs the passes."""

    validator: FlatValidator
    round_cfg: RoundConfig  # input shape and class count taken from the data
    specs: list[TensorSpec]
    layout: FlatLayout
    theta0: np.ndarray
    val_digest: str


def local_validation(
    cfg: RoundConfig, val_spec: str, val_count: int, init_model: Path | None
) -> LocalValidation:
    """Load the validation set, build the model and theta_0, wrap the evaluator."""
    val = load_dataset(val_spec)
    if val_count:
        val = subset(val, np.arange(min(val_count, len(val))))
    rcfg = config_for_data(cfg, val)
    setup = setup_model(rcfg, init_model)
    evaluator = Evaluator(setup.model, val.x, val.y)
    return LocalValidation(
        FlatValidator(evaluator, setup.layout),
        rcfg,
        setup.specs,
        setup.layout,
        setup.theta0,
        evaluator.digest(),
    )
