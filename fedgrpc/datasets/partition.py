"""Seeded partitioners: split sample indices among parties.

Every function returns one sorted int64 index array per party; together they cover
``range(n)`` exactly once. All randomness comes from the ``rng`` argument, so the same
seed gives the same partition.
"""

from __future__ import annotations

import logging
import math
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt

from fedgrpc.errors import ConfigError

log = logging.getLogger(__name__)

IndexArray = npt.NDArray[np.int64]

SPEC_SYNTAX = "'iid', 'dirichlet:ALPHA', 'quantity:ALPHA' or 'shards:K'"
MAX_TRIES = 1000

_Num = TypeVar("_Num", int, float)


def iid(n: int, n_parties: int, rng: np.random.Generator) -> list[IndexArray]:
    """Uniformly random split; party sizes differ by at most one.

    Args:
        n: Number of samples.
        n_parties: Number of parties; at most ``n``.
        rng: Source of the random permutation.
    """
    _check_parties(n, n_parties, min_size=1)
    perm = rng.permutation(n)
    return [np.sort(part).astype(np.int64) for part in np.array_split(perm, n_parties)]


def dirichlet(
    labels: npt.NDArray[np.integer[Any]],
    n_parties: int,
    alpha: float,
    rng: np.random.Generator,
    min_size: int = 1,
) -> list[IndexArray]:
    """Label-skewed split: each class is divided among parties by Dir(alpha) shares.

    Implementation based on Bayesian Nonparametric Federated Learning of Neural
    Networks (Yurochkin et al., 2019, https://arxiv.org/abs/1905.12022), as in Flower's
    ``DirichletPartitioner`` without its self-balancing.

    For every class k, the class's samples are shuffled and cut into ``n_parties``
    runs whose lengths follow proportions ``p_k ~ Dir(alpha * 1)``. Small ``alpha``
    (e.g. 0.1) gives each party few classes; large ``alpha`` (e.g. 100) approaches an
    IID split. If a party ends up with fewer than ``min_size`` samples, all classes are
    drawn again (the proportions change, ``alpha`` stays), up to ``MAX_TRIES`` times.

    Args:
        labels: Label of each sample, shape ``(n,)``.
        n_parties: Number of parties.
        alpha: Dirichlet concentration, > 0.
        rng: Source of the shuffles and proportions.
        min_size: Fewest samples any party may get.

    Returns:
        One sorted index array per party.

    Raises:
        ConfigError: bad arguments, or ``min_size`` not met after ``MAX_TRIES`` draws
            (raise ``alpha`` or lower ``min_size``).
    """
    labels = np.asarray(labels)
    _check_alpha(alpha)
    _check_parties(len(labels), n_parties, min_size)
    by_class = [np.flatnonzero(labels == k) for k in np.unique(labels)]
    for attempt in range(1, MAX_TRIES + 1):
        parts: list[list[IndexArray]] = [[] for _ in range(n_parties)]
        for members in by_class:
            members = rng.permutation(members)
            shares = rng.dirichlet(np.full(n_parties, alpha))  # (n_parties,)
            cuts = (np.cumsum(shares)[:-1] * len(members)).astype(np.int64)
            for party, run in enumerate(np.split(members, cuts)):
                parts[party].append(run)
        out = [np.sort(np.concatenate(p)).astype(np.int64) for p in parts]
        smallest = min(len(p) for p in out)
        if smallest >= min_size:
            log.debug("dirichlet(alpha=%s): accepted draw %d", alpha, attempt)
            return out
    raise ConfigError(
        f"dirichlet partition: no draw in {MAX_TRIES} gave every one of {n_parties} "
        f"parties >= {min_size} samples with alpha={alpha}; raise alpha or lower "
        "min_size"
    )


def quantity(
    n: int,
    n_parties: int,
    alpha: float,
    rng: np.random.Generator,
    min_size: int = 1,
) -> list[IndexArray]:
    """Quantity-skewed split: party sizes follow Dir(alpha) proportions, labels IID.

    Each party first gets ``min_size`` samples; the remaining ``n - n_parties *
    min_size`` are dealt by a multinomial draw with proportions ``p ~ Dir(alpha * 1)``.
    Small ``alpha`` makes a few parties hold most of the data. Which samples go where is
    a uniform random permutation.

    Args:
        n: Number of samples.
        n_parties: Number of parties.
        alpha: Dirichlet concentration, > 0.
        rng: Source of the proportions, counts and permutation.
        min_size: Fewest samples any party gets.

    Returns:
        One sorted index array per party.
    """
    _check_alpha(alpha)
    _check_parties(n, n_parties, min_size)
    shares = rng.dirichlet(np.full(n_parties, alpha))  # (n_parties,)
    sizes = min_size + rng.multinomial(n - n_parties * min_size, shares)
    perm = rng.permutation(n)
    runs = np.split(perm, np.cumsum(sizes)[:-1])
    return [np.sort(run).astype(np.int64) for run in runs]


def shards(
    labels: npt.NDArray[np.integer[Any]],
    n_parties: int,
    shards_per_party: int,
    rng: np.random.Generator,
) -> list[IndexArray]:
    """Pathological non-IID split of McMahan et al. (2017): sort by label, deal shards.

    Samples are sorted by label (ties in random order), cut into ``n_parties *
    shards_per_party`` contiguous shards of near-equal size, and each party gets
    ``shards_per_party`` random shards, so it sees about that many classes.

    Args:
        labels: Label of each sample, shape ``(n,)``.
        n_parties: Number of parties.
        shards_per_party: Shards each party gets, >= 1.
        rng: Source of the tie order and shard assignment.
    """
    labels = np.asarray(labels)
    if shards_per_party < 1:
        raise ConfigError(f"shards_per_party must be >= 1, got {shards_per_party}")
    n_shards = n_parties * shards_per_party
    _check_parties(len(labels), n_parties, min_size=1)
    if n_shards > len(labels):
        raise ConfigError(
            f"shards partition: {n_shards} shards need >= {n_shards} samples, "
            f"have {len(labels)}"
        )
    perm = rng.permutation(len(labels))
    by_label = perm[
        np.argsort(labels[perm], kind="stable")
    ]  # label-sorted, ties random
    pieces = np.array_split(by_label, n_shards)
    order = rng.permutation(n_shards)
    return [
        np.sort(
            np.concatenate(
                [
                    pieces[s]
                    for s in order[i * shards_per_party : (i + 1) * shards_per_party]
                ]
            )
        ).astype(np.int64)
        for i in range(n_parties)
    ]


def partition(
    spec: str,
    labels: npt.NDArray[np.integer[Any]],
    n_parties: int,
    rng: np.random.Generator,
) -> list[IndexArray]:
    """Split by a spec: ``iid``, ``dirichlet:ALPHA``, ``quantity:ALPHA``, ``shards:K``.

    ``dirichlet`` and ``quantity`` use ``min_size=1``.

    Raises:
        ConfigError: unknown or malformed spec (the message names it and the syntax).
    """
    labels = np.asarray(labels)
    kind, sep, arg = spec.strip().partition(":")
    if kind == "iid" and not sep:
        return iid(len(labels), n_parties, rng)
    if kind in ("dirichlet", "quantity") and sep:
        alpha = _parse_number(spec, arg, float)
        if kind == "dirichlet":
            return dirichlet(labels, n_parties, alpha, rng)
        return quantity(len(labels), n_parties, alpha, rng)
    if kind == "shards" and sep:
        return shards(labels, n_parties, _parse_number(spec, arg, int), rng)
    raise ConfigError(f"unknown partition {spec!r}: expected {SPEC_SYNTAX}")


def _parse_number(spec: str, text: str, kind: type[_Num]) -> _Num:
    """Parse the numeric argument of a partition spec, naming the spec on failure."""
    try:
        value = kind(text.strip())
    except ValueError:
        raise ConfigError(
            f"bad partition {spec!r}: {text!r} is not a {kind.__name__}; "
            f"expected {SPEC_SYNTAX}"
        ) from None
    return value


def _check_alpha(alpha: float) -> None:
    if not (math.isfinite(alpha) and alpha > 0):
        raise ConfigError(f"Dirichlet alpha must be finite and > 0, got {alpha}")


def _check_parties(n: int, n_parties: int, min_size: int) -> None:
    if n_parties < 1:
        raise ConfigError(f"need at least one party, got {n_parties}")
    if min_size < 0:
        raise ConfigError(f"min_size must be >= 0, got {min_size}")
    if n < n_parties * max(min_size, 1):
        raise ConfigError(
            f"{n} samples cannot give {n_parties} parties "
            f"{max(min_size, 1)} sample(s) each"
        )
