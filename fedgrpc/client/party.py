"""The party loop: join, follow the model stream, train locally, submit, repeat."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from fedgrpc.client.stub import AggregatorClient, ModelVersion
from fedgrpc.config import ClientConfig, RoundConfig
from fedgrpc.datasets.attacks import Attack, claimed_samples, parse_attack
from fedgrpc.datasets.sources import Dataset, load_dataset
from fedgrpc.errors import ConfigError, ErrorCode, RemoteError
from fedgrpc.learning.inprocess import LocalTrainer
from fedgrpc.types import RoundSkipped, TrainingDone

log = logging.getLogger(__name__)

# Status codes after which the party gives the round up and follows the stream.
_SKIP_ROUND = {
    ErrorCode.FAILED_PRECONDITION,
    ErrorCode.ALREADY_EXISTS,
    # Transient: every upload slot busy, or the upload discarded as too slow.
    ErrorCode.RESOURCE_EXHAUSTED,
}
# Refusals that may be transient (a restarted aggregator, a round that changed
# under the upload) but would repeat forever if they are not: the party skips the
# round, and gives up after ClientConfig.max_refused_rounds of them in a row.
_SKIP_A_FEW = {ErrorCode.INVALID_ARGUMENT}
# Status codes after which the party reconnects (stream broken or expired).
_RECONNECT = {
    ErrorCode.UNAVAILABLE,
    ErrorCode.DEADLINE_EXCEEDED,
    ErrorCode.CANCELLED,
    ErrorCode.INTERNAL,
    ErrorCode.UNKNOWN,
}


@dataclass(frozen=True)
class PartyResult:
    """How a party's run ended."""

    rounds_submitted: int
    rounds_completed: int
    reason: str
    last_train_loss: float


def run_party(
    cfg: ClientConfig,
    data: Dataset | None = None,
    *,
    connect: Callable[[ClientConfig], AggregatorClient] = AggregatorClient,
) -> PartyResult:
    """Take part in a run until the aggregator says training is over.

    ``connect`` opens the party's connection; a simulation hosting many parties in
    one process passes a subclass that paces their joins.
    """
    data = data if data is not None else load_dataset(cfg.data)
    attack = parse_attack(cfg.attack)
    claimed = claimed_samples(attack, len(data))
    with connect(cfg) as client:
        # Check the data fits the run before joining: a party that joins and then
        # cannot train would make every round wait out its deadline for it.
        _check_fits(cfg, data, client.join(claimed, check_only=True).config)
        joined = client.join(claimed)
        rcfg = joined.config
        _check_fits(cfg, data, rcfg)
        trainer = LocalTrainer(rcfg, client.specs, f"party {cfg.party_id}", cfg.threads)
        log.info(
            "party %s joined run %s at round %d (%d samples)",
            cfg.party_id,
            joined.run_id,
            joined.open_round,
            claimed,
        )
        stream_timeout = 2 * rcfg.round_timeout_s + 60.0
        next_round = joined.open_round
        submitted = 0
        refused = [0]  # consecutive rounds refused as invalid
        last_loss = float("nan")
        while True:
            try:
                for item in client.models(next_round, stream_timeout):
                    if isinstance(item, TrainingDone):
                        log.info(
                            "party %s: training over after %d rounds (%s)",
                            cfg.party_id,
                            item.rounds_completed,
                            item.reason,
                        )
                        return PartyResult(
                            submitted, item.rounds_completed, item.reason, last_loss
                        )
                    if isinstance(item, RoundSkipped):  # not sampled: sit it out
                        log.info("party %s: %s", cfg.party_id, item.reason)
                        next_round = item.round + 1
                        continue
                    last_loss = (
                        _train_and_submit(
                            client, item, trainer, data, cfg, attack, refused
                        )
                        or last_loss
                    )
                    submitted += 1
                    next_round = item.round + 1
                # The stream ended without the done message: reopen it.
            except RemoteError as err:
                if err.code not in _RECONNECT:
                    raise
                log.warning(
                    "party %s: stream lost (%s); reconnecting", cfg.party_id, err
                )
                time.sleep(cfg.backoff_initial_s)
                client.join(claimed)  # the aggregator may have restarted
                next_round = 0  # ask for the current model, whichever round it is


def _check_fits(cfg: ClientConfig, data: Dataset, rcfg: RoundConfig) -> None:
    """Raise ConfigError naming the shapes unless ``data`` fits the run's model."""
    if tuple(data.x.shape[1:]) != rcfg.input_shape:
        raise ConfigError(
            f"party {cfg.party_id}: local samples have shape "
            f"{list(data.x.shape[1:])}; "
            f"the run's model expects {list(rcfg.input_shape)}"
        )
    top = int(np.max(data.y)) if len(data.y) else -1
    if top >= rcfg.num_classes or (len(data.y) and int(np.min(data.y)) < 0):
        raise ConfigError(
            f"party {cfg.party_id}: local labels range over "
            f"[{int(np.min(data.y))}, {top}]; the run's model has "
            f"{rcfg.num_classes} classes (0-{rcfg.num_classes - 1})"
        )


def _train_and_submit(
    client: AggregatorClient,
    item: ModelVersion,
    trainer: LocalTrainer,
    data: Dataset,
    cfg: ClientConfig,
    attack: Attack | None,
    refused: list[int],
) -> float | None:
    t0 = time.perf_counter()
    update, loss = trainer.train(item.flat, data, cfg.party_id, item.round, attack)
    train_s = time.perf_counter() - t0
    try:
        outcome = client.submit(
            item.round,
            update,
            claimed_samples(attack, len(data)),
            train_loss=loss,
            kind=trainer.cfg.update_kind,
            model_digest=item.digest,
        )
    except RemoteError as err:
        if err.code in _SKIP_A_FEW:
            refused[0] += 1
            if refused[0] >= cfg.max_refused_rounds:
                raise RemoteError(
                    f"party {cfg.party_id}: {refused[0]} rounds in a row refused as "
                    f"invalid; giving up. Last: {err}",
                    code=err.code,
                ) from None
        if err.code in _SKIP_ROUND | _SKIP_A_FEW:
            log.warning(
                "party %s: round %d not counted (will try the next): %s",
                cfg.party_id,
                item.round,
                err,
            )
            return None
        raise
    refused[0] = 0
    log.info(
        "party %s round %d: loss %.4f, trained %.2f s, %s",
        cfg.party_id,
        item.round,
        loss,
        train_s,
        outcome.message,
    )
    return float(loss) if np.isfinite(loss) else None
