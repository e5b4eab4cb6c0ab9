"""Cutting a data set into a validation set and party data sets; writing a split.

The single place that turns (data, partition, attacks, seed) into party data, so
``simulate``, ``split`` and ``shapley`` agree on who holds what. Typed: it takes a
:class:`~fedgrpc.config.SplitConfig`, never an argparse namespace.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedgrpc.config import SplitConfig
from fedgrpc.datasets import partition
from fedgrpc.datasets.attacks import Attack, apply_data_attack, parse_assignments
from fedgrpc.datasets.sources import (
    Dataset,
    load_dataset,
    save_npz,
    split_holdout,
    subset,
)
from fedgrpc.errors import ConfigError
from fedgrpc.store.files import atomic_write

log = logging.getLogger(__name__)

PARTY_PREFIX = "party-"

# Independent RNG streams per purpose, so e.g. changing train_count keeps the holdout.
_STREAM_HOLDOUT = 0
_STREAM_TRAIN_COUNT = 1
_STREAM_PARTITION = 2
_STREAM_ATTACK = 3

MANIFEST = "manifest.json"
VALIDATION_FILE = "val.npz"


def party_ids(n_parties: int) -> list[str]:
    """Party ids ``party-0 .. party-{n-1}``."""
    return [f"{PARTY_PREFIX}{i}" for i in range(n_parties)]


def resolve_attacks(
    attacks: Mapping[str, Attack], ids: Sequence[str]
) -> dict[str, Attack]:
    """Key attacks by party id; a key may be an id (``party-3``) or an index (``3``).

    Raises:
        ConfigError: a key naming no party, or one party given two attacks.
    """
    known = set(ids)
    out: dict[str, Attack] = {}
    for key, attack in attacks.items():
        k = key.strip()
        if k in known:
            pid = k
        elif k.isdigit() and f"{PARTY_PREFIX}{int(k)}" in known:
            pid = f"{PARTY_PREFIX}{int(k)}"
        else:
            raise ConfigError(
                f"attack {key}={attack.spec}: no such party; parties are "
                f"{_id_range(ids)} (or their indices)"
            )
        if pid in out:
            raise ConfigError(
                f"party {pid} is given two attacks: {out[pid].spec!r} "
                f"and {attack.spec!r}"
            )
        out[pid] = attack
    return out


def _id_range(ids: Sequence[str]) -> str:
    return f"{ids[0]}..{ids[-1]}" if len(ids) > 2 else ", ".join(ids)


def prepare_parties(
    split: SplitConfig, holdout: int | None = None
) -> tuple[dict[str, Dataset], Dataset]:
    """Load a data set and cut it into a validation set and attacked party data sets.

    The single place that turns (data, partition, attacks, seed) into party data, so
    ``simulate``, ``split`` and ``shapley`` agree on who holds what. Steps, each with
    its own RNG stream derived from ``seed``:

    1. hold out ``holdout`` random samples as the server's validation set;
    2. if ``train_count`` > 0, keep that many random training samples (original order);
    3. partition the rest among ``party-0 .. party-{n-1}`` by ``split.partition``;
    4. apply each party's data attack with an RNG derived from (seed, party index).

    Args:
        split: data set, parties, partition, attacks (keyed by party index ``3`` or
            id ``party-3``; update attacks are left for training) and seed.
        holdout: validation samples to hold out; default
            :meth:`SplitConfig.holdout_for` of the data set's size.

    Returns:
        ``(parties, val)``: party id -> data set (in id order), and the validation set.

    Raises:
        ConfigError: bad sizes or specs, or an attack for an unknown party.
    """
    n_parties, seed, train_count = split.parties, split.seed, split.train_count
    ids = party_ids(n_parties)
    by_party = resolve_attacks(parse_assignments(split.attacks), ids)
    data = load_dataset(split.data)
    val_holdout = split.holdout_for(len(data)) if holdout is None else holdout
    if val_holdout < 1:
        raise ConfigError(f"val_holdout must be >= 1, got {val_holdout}")
    if val_holdout >= len(data):
        raise ConfigError(
            f"val_holdout {val_holdout} leaves no training data: {data.name!r} has "
            f"{len(data)} samples"
        )
    train, val = split_holdout(data, val_holdout, _stream(seed, _STREAM_HOLDOUT))
    if train_count:
        if train_count > len(train):
            raise ConfigError(
                f"train_count {train_count} exceeds the {len(train)} samples left "
                f"after holding out {val_holdout} of {data.name!r}"
            )
        keep = _stream(seed, _STREAM_TRAIN_COUNT).choice(
            len(train), size=train_count, replace=False
        )
        train = subset(train, np.sort(keep))
    parts = partition.partition(
        split.partition, train.y, n_parties, _stream(seed, _STREAM_PARTITION)
    )
    parties = {
        pid: _attacked(subset(train, idx), by_party.get(pid), seed, index)
        for index, (pid, idx) in enumerate(zip(ids, parts, strict=True))
    }
    log.info(
        "%s: %d validation samples, %d parties (%s) with %s samples",
        data.name,
        len(val),
        n_parties,
        split.partition,
        [len(d) for d in parties.values()],
    )
    return parties, val


def load_parties(
    party_data: Mapping[str, str],
    val_data: str,
    attacks: Mapping[str, Attack] | None = None,
    seed: int = 0,
) -> tuple[dict[str, Dataset], Dataset]:
    """Each party's own data set and an explicit validation set, checked to fit.

    The counterpart of :func:`prepare_parties` for data that is already cut: nothing
    is split or partitioned. Data attacks (keyed by party id) are applied as there,
    with an RNG derived from (seed, the party's position in ``party_data``).

    Args:
        party_data: Party id -> data spec (``npz:FILE`` with arrays ``x`` and ``y``,
            or any other :func:`~fedgrpc.datasets.sources.load_dataset` spec).
        val_data: The validation set's spec.
        attacks: Attacks by party id (update attacks are left for training).
        seed: Seed of the data attacks' RNG streams.

    Returns:
        ``(parties, val)``, parties in the order given. Every set carries the largest
        class count of all of them, so one model fits every label.

    Raises:
        ConfigError: no parties, a file that cannot be loaded or lacks ``x``/``y``, an
            empty data set, samples whose shape differs from the validation set's, or
            an attack for an unknown party.
    """
    if not party_data:
        raise ConfigError("no party data sets given")
    ids = list(party_data)
    by_party = resolve_attacks(attacks or {}, ids)
    val = _load(val_data, "validation set")
    if len(val) == 0:
        raise ConfigError(f"validation set {val_data!r} holds no samples")
    loaded: dict[str, Dataset] = {}
    for pid, spec in party_data.items():
        ds = _load(spec, f"party {pid}")
        if len(ds) == 0:
            raise ConfigError(f"party {pid}: {spec!r} holds no samples")
        if ds.input_shape != val.input_shape:
            raise ConfigError(
                f"party {pid}: samples in {spec!r} have shape {list(ds.input_shape)}; "
                f"the validation set {val_data!r} has {list(val.input_shape)}"
            )
        loaded[pid] = ds
    classes = max([val.num_classes, *(d.num_classes for d in loaded.values())])
    val = _with_classes(val, classes)
    parties = {
        pid: _attacked(_with_classes(ds, classes), by_party.get(pid), seed, index)
        for index, (pid, ds) in enumerate(loaded.items())
    }
    log.info(
        "%s: %d validation samples, %d parties with %s samples, %d classes",
        val_data,
        len(val),
        len(parties),
        [len(d) for d in parties.values()],
        classes,
    )
    return parties, val


def _load(spec: str, whose: str) -> Dataset:
    try:
        return load_dataset(spec)
    except ConfigError as err:
        raise ConfigError(f"{whose}: {err}") from None


def _with_classes(ds: Dataset, classes: int) -> Dataset:
    if ds.num_classes == classes:
        return ds
    return Dataset(x=ds.x, y=ds.y, num_classes=classes, name=ds.name)


def _attacked(ds: Dataset, attack: Attack | None, seed: int, index: int) -> Dataset:
    """``ds`` after its party's data attack, if it has one (RNG: seed, index)."""
    if attack is None or not attack.on_data:
        return ds
    x, y = apply_data_attack(
        attack, ds.x, ds.y, ds.num_classes, _stream(seed, _STREAM_ATTACK, index)
    )
    return Dataset(x=x, y=y, num_classes=ds.num_classes, name=ds.name)


def _stream(seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng([seed, *key])


def write_split(
    out: Path,
    split: SplitConfig,
    parties: Mapping[str, Dataset],
    val: Dataset,
) -> dict[str, Any]:
    """Write each party's .npz, the validation set and ``manifest.json`` atomically.

    The manifest records data, partition, seed and each party's attack, so that an
    evaluation can be reproduced.
    """
    attacks = resolve_attacks(parse_assignments(split.attacks), list(parties))
    manifest: dict[str, Any] = {
        "data": split.data,
        "partition": split.partition,
        "seed": split.seed,
        "validation": {"file": VALIDATION_FILE, "samples": len(val)},
        "parties": [],
    }
    save_npz(out / VALIDATION_FILE, val)
    for pid, ds in parties.items():
        save_npz(out / f"{pid}.npz", ds)
        att = attacks.get(pid)
        manifest["parties"].append(
            {
                "party_id": pid,
                "file": f"{pid}.npz",
                "samples": len(ds),
                "attack": att.spec if att else "",
            }
        )
    atomic_write(out / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())
    return manifest
