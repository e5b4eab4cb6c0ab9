"""Pieces shared by the aggregator, the client stubs and in-process runs (no grpc).

Keeping one code path for "how a party trains in round t" and "how the server validates"
is what makes a gRPC run reproduce an in-process run of the same seed.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fedgrpc.checkpoint import load_arrays
from fedgrpc.config import RoundConfig
from fedgrpc.datasets.attacks import Attack, apply_update_attack
from fedgrpc.datasets.sources import Dataset, load_dataset, subset
from fedgrpc.engine import RoundEngine, RunState, submit_arrays
from fedgrpc.errors import ConfigError
from fedgrpc.layout import FlatLayout
from fedgrpc.models import build_model, init_params, model_specs
from fedgrpc.training import Evaluator, local_update
from fedgrpc.types import RoundResult, TensorSpec

log = logging.getLogger(__name__)


def party_rng(seed: int, party_id: str, round_index: int) -> np.random.Generator:
    """A party's RNG in a round: a function of (run seed, party id, round) only."""
    pid = int.from_bytes(hashlib.sha256(party_id.encode()).digest()[:8], "little")
    return np.random.default_rng([seed, pid, round_index])


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
        arrays, _ = load_arrays(init_model)
        try:
            theta0 = layout.flatten(
                {k: v.astype(np.float32) for k, v in arrays.items()}
            )
        except Exception as err:
            raise ConfigError(f"--init-model {init_model}: {err}") from None
    else:
        params = init_params(
            cfg.model, cfg.input_shape, cfg.num_classes, cfg.model_hidden, cfg.seed
        )
        theta0 = layout.flatten(params)
    return ModelSetup(model, specs, layout, theta0)


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
    """Load the validation set, build the model and theta_0, wrap the evaluator.

    Used by the aggregator in-process (``--validator thread``) and by the validation
    worker process (``--validator process``): one code path for both.
    """
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


def train_round(
    model: nn.Module,
    layout: FlatLayout,
    theta: np.ndarray,
    data: Dataset,
    cfg: RoundConfig,
    party_id: str,
    round_index: int,
    attack: Attack | None = None,
) -> tuple[dict[str, np.ndarray], float]:
    """One party's update from theta_t: local training, then any simulated attack."""
    rng = party_rng(cfg.seed, party_id, round_index)
    update, loss = local_update(
        model,
        layout.views(theta),
        data.x,
        data.y,
        kind=cfg.update_kind,
        lr=cfg.lr,
        local_steps=cfg.local_steps,
        local_epochs=cfg.local_epochs,
        batch_size=cfg.batch_size,
        rng=rng,
    )
    if attack is not None:
        update = apply_update_attack(attack, update, rng)
    return update, loss


def run_in_process(
    cfg: RoundConfig,
    parties: Mapping[str, Dataset],
    val: Dataset,
    *,
    attacks: Mapping[str, Attack] | None = None,
    theta0: np.ndarray | None = None,
    on_round: Callable[[RoundResult], None] | None = None,
    threads: int = 1,
) -> tuple[RoundEngine, list[RoundResult]]:
    """Run the same engine and training without any network (DESIGN §4 oracle).

    Returns the finished engine (``engine.theta`` is the final model) and the round
    results.
    """
    torch.set_num_threads(threads)
    setup = setup_model(cfg)
    start = setup.theta0 if theta0 is None else theta0
    validator = FlatValidator(Evaluator(setup.model, val.x, val.y), setup.layout)
    results: list[RoundResult] = []

    def commit(result: RoundResult, _theta: np.ndarray) -> None:
        results.append(result)
        if on_round is not None:
            on_round(result)

    engine = RoundEngine(
        cfg, setup.specs, start, validator, on_commit=commit, max_in_flight=1
    )
    # A separate module for party training keeps the validator's model untouched.
    party_model = build_model(
        cfg.model, cfg.input_shape, cfg.num_classes, cfg.model_hidden
    )
    for pid, ds in parties.items():
        engine.join(pid, len(ds))
    engine.tick()
    attacks = attacks or {}
    while not engine.finished:
        t = engine.open_round
        theta = engine.theta
        for pid in sorted(parties):
            update, loss = train_round(
                party_model,
                setup.layout,
                theta,
                parties[pid],
                cfg,
                pid,
                t,
                attacks.get(pid),
            )
            submit_arrays(
                engine,
                pid,
                t,
                len(parties[pid]),
                update,
                train_loss=loss,
                submission_id=f"{pid}:{t}",
            )
        engine.tick()
    if engine.state != RunState.DONE:
        raise ConfigError(f"in-process run failed: {engine.reason}")
    return engine, results
