"""How a party trains in round t, and whole runs without a network (no grpc).

The client stub and in-process runs share :class:`LocalTrainer`, and the aggregator and
in-process runs share :mod:`fedgrpc.learning.validation`: that is what makes a gRPC run
reproduce an in-process run of the same seed.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from fedgrpc.config import RoundConfig
from fedgrpc.datasets.attacks import Attack, apply_update_attack, claimed_samples
from fedgrpc.datasets.sources import Dataset
from fedgrpc.engine import RoundEngine, submit_arrays
from fedgrpc.errors import ConfigError
from fedgrpc.layout import FlatLayout
from fedgrpc.learning.models import build_model, model_specs
from fedgrpc.learning.training import Evaluator, local_update
from fedgrpc.learning.validation import FlatValidator, setup_model
from fedgrpc.types import (
    RoundResult,
    RunState,
    SecondOrder,
    TensorSpec,
    with_second_order,
)

log = logging.getLogger(__name__)


def party_rng(seed: int, party_id: str, round_index: int) -> np.random.Generator:
    """A party's RNG in a round: a function of (run seed, party id, round) only."""
    pid = int.from_bytes(hashlib.sha256(party_id.encode()).digest()[:8], "little")
    return np.random.default_rng([seed, pid, round_index])


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
        momentum=cfg.momentum,
        weight_decay=cfg.weight_decay,
        prox_mu=cfg.prox_mu,
    )
    if attack is not None:
        update = apply_update_attack(attack, update, rng)
    return update, loss


class LocalTrainer:
    """The parties' local model, built once, trained from each global theta_t.

    What the client stub needs of torch, kept here: the party loop deals in NumPy.
    In-process runs train every party with one trainer (a module separate from the
    validator's, so validation never sees a party's weights).

    Raises:
        ConfigError: the local model's tensors differ from the aggregator's ``specs``.
    """

    def __init__(
        self,
        cfg: RoundConfig,
        specs: Sequence[TensorSpec],
        owner: str,
        threads: int = 1,
    ) -> None:
        torch.set_num_threads(threads)
        self.cfg = cfg
        self.model = build_model(
            cfg.model, cfg.input_shape, cfg.num_classes, cfg.model_hidden
        )
        if tuple(model_specs(self.model)) != tuple(specs):
            raise ConfigError(
                f"{owner}: local model {cfg.model!r} does not match the "
                "aggregator's model spec"
            )
        self.layout = FlatLayout.of(specs)

    def train(
        self,
        theta: np.ndarray,
        data: Dataset,
        party_id: str,
        round_index: int,
        attack: Attack | None = None,
    ) -> tuple[dict[str, np.ndarray], float]:
        """A party's update from theta_t in round ``round_index``."""
        return train_round(
            self.model,
            self.layout,
            theta,
            data,
            self.cfg,
            party_id,
            round_index,
            attack,
        )


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

    Every party answers every round it is asked in, at once: a FedBuff run
    (``buffer_size``) is refused, its staleness being a matter of timing.

    Returns the finished engine (``engine.theta`` is the final model) and the round
    results.
    """
    if cfg.buffered:
        raise ConfigError(
            "FedBuff (--buffer-size) depends on when updates arrive; an in-process "
            "run has no timing to reproduce (measure it over gRPC: fedgrpc simulate)"
        )
    setup = setup_model(cfg)
    trainer = LocalTrainer(cfg, setup.specs, "in-process run", threads)
    start = setup.theta0 if theta0 is None else theta0
    validator = FlatValidator(Evaluator(setup.model, val.x, val.y), setup.layout)
    results: list[RoundResult] = []

    def commit(result: RoundResult, _theta: np.ndarray) -> None:
        results.append(result)
        if on_round is not None:
            on_round(result)

    def second_order(so: SecondOrder) -> None:
        # The round's rows gain their digfl-2 scores (the ledger does the same).
        i = next(k for k, r in enumerate(results) if r.round == so.round)
        results[i] = with_second_order(results[i], so)

    engine = RoundEngine(
        cfg,
        setup.specs,
        start,
        validator,
        on_commit=commit,
        on_second_order=second_order,
        max_in_flight=1,
    )
    attacks = attacks or {}
    claims = {p: claimed_samples(attacks.get(p), len(ds)) for p, ds in parties.items()}
    for pid in parties:
        engine.join(pid, claims[pid])
    engine.tick()
    while not engine.finished:
        t = engine.open_round
        theta = engine.theta
        for pid in sorted(parties):
            if not engine.sampled(pid, t):  # client sampling: sits the round out
                continue
            update, loss = trainer.train(theta, parties[pid], pid, t, attacks.get(pid))
            submit_arrays(
                engine,
                pid,
                t,
                claims[pid],
                update,
                train_loss=loss,
                submission_id=f"{pid}:{t}",
            )
        engine.tick()
    if engine.state != RunState.DONE:
        raise ConfigError(f"in-process run failed: {engine.reason}")
    return engine, results
