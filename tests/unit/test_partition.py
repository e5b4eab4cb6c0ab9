from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest

from fedgrpc.datasets import partition
from fedgrpc.errors import ConfigError

N_CLASSES = 10


def _labels(n: int = 1000, seed: int = 0) -> npt.NDArray[np.int64]:
    return np.random.default_rng(seed).integers(0, N_CLASSES, size=n)


def _assert_disjoint_cover(parts: list[npt.NDArray[np.int64]], n: int) -> None:
    everything = np.concatenate(parts)
    assert everything.dtype == np.int64
    assert len(everything) == n
    np.testing.assert_array_equal(np.sort(everything), np.arange(n))


def _skew(labels: npt.NDArray[np.int64], parts: list[npt.NDArray[np.int64]]) -> float:
    """Mean total-variation distance of party label histograms from the global one."""
    global_hist = np.bincount(labels, minlength=N_CLASSES) / len(labels)
    tvs = [
        0.5
        * np.abs(
            np.bincount(labels[p], minlength=N_CLASSES) / len(p) - global_hist
        ).sum()
        for p in parts
    ]
    return float(np.mean(tvs))


def _all_specs() -> list[str]:
    return ["iid", "dirichlet:0.3", "quantity:0.5", "shards:2"]


def test_iid_sizes_differ_by_at_most_one() -> None:
    parts = partition.iid(1003, 10, np.random.default_rng(0))

    sizes = [len(p) for p in parts]

    assert max(sizes) - min(sizes) <= 1
    _assert_disjoint_cover(parts, 1003)


@pytest.mark.parametrize("spec", _all_specs())
def test_partition_disjoint_cover(spec: str) -> None:
    labels = _labels()

    parts = partition.partition(spec, labels, 8, np.random.default_rng(1))

    assert len(parts) == 8
    assert all(len(p) >= 1 for p in parts)
    _assert_disjoint_cover(parts, len(labels))


@pytest.mark.parametrize("spec", _all_specs())
def test_partition_deterministic_for_seed(spec: str) -> None:
    labels = _labels()

    a = partition.partition(spec, labels, 6, np.random.default_rng(7))
    b = partition.partition(spec, labels, 6, np.random.default_rng(7))
    c = partition.partition(spec, labels, 6, np.random.default_rng(8))

    for pa, pb in zip(a, b, strict=True):
        np.testing.assert_array_equal(pa, pb)
    assert any(not np.array_equal(pa, pc) for pa, pc in zip(a, c, strict=True))


def test_dirichlet_small_alpha_skews_labels() -> None:
    labels = _labels(2000)
    rng = np.random.default_rng(2)

    skewed = partition.dirichlet(labels, 10, alpha=0.1, rng=rng)
    near_iid = partition.dirichlet(labels, 10, alpha=1000.0, rng=rng)
    uniform = partition.iid(len(labels), 10, rng)

    assert _skew(labels, skewed) > 0.5
    assert _skew(labels, near_iid) < 0.15
    assert _skew(labels, uniform) < 0.15


def test_dirichlet_min_size_respected() -> None:
    labels = _labels(500)

    parts = partition.dirichlet(
        labels, 5, alpha=0.5, rng=np.random.default_rng(3), min_size=40
    )

    assert min(len(p) for p in parts) >= 40
    _assert_disjoint_cover(parts, 500)


def test_dirichlet_impossible_min_size_raises() -> None:
    with pytest.raises(ConfigError, match="cannot give 5 parties"):
        partition.dirichlet(_labels(20), 5, 0.5, np.random.default_rng(0), min_size=5)


def test_quantity_small_alpha_skews_sizes_keeps_min() -> None:
    parts = partition.quantity(1000, 10, 0.2, np.random.default_rng(4), min_size=5)

    sizes = np.array([len(p) for p in parts])

    assert sizes.min() >= 5
    assert sizes.max() > 3 * np.median(sizes)
    _assert_disjoint_cover(parts, 1000)


def test_shards_limit_classes_per_party() -> None:
    labels = np.repeat(np.arange(N_CLASSES), 100)

    parts = partition.shards(labels, 10, 2, np.random.default_rng(5))

    assert [len(p) for p in parts] == [100] * 10
    assert all(len(np.unique(labels[p])) <= 2 for p in parts)
    _assert_disjoint_cover(parts, 1000)


@pytest.mark.parametrize(
    "spec", ["", "dirichlet", "dirichlet:abc", "shards:1.5", "iid:3", "zipf:2"]
)
def test_partition_bad_spec_raises(spec: str) -> None:
    with pytest.raises(ConfigError, match=f"'{spec}'.*expected 'iid'"):
        partition.partition(spec, _labels(100), 4, np.random.default_rng(0))


@pytest.mark.parametrize("alpha", [0.0, -1.0, float("nan"), float("inf")])
def test_dirichlet_bad_alpha_raises(alpha: float) -> None:
    with pytest.raises(ConfigError, match="alpha"):
        partition.dirichlet(_labels(100), 4, alpha, np.random.default_rng(0))


def test_iid_more_parties_than_samples_raises() -> None:
    with pytest.raises(ConfigError, match="3 samples cannot give 4 parties"):
        partition.iid(3, 4, np.random.default_rng(0))
