from __future__ import annotations

import gzip
import sys
import types
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from fedgrpc.datasets.sources import (
    Dataset,
    load_dataset,
    read_idx,
    save_npz,
    split_holdout,
    subset,
)
from fedgrpc.errors import ConfigError

SHARED_MNIST = Path(__file__).parents[3] / "shared/data/mnist"


def _idx_bytes(arr: npt.NDArray[np.uint8]) -> bytes:
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in arr.shape
    )
    return header + bytes(np.ascontiguousarray(arr, dtype=np.uint8).data)


def _write_idx(path: Path, arr: npt.NDArray[np.uint8]) -> None:
    data = _idx_bytes(arr)
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as fh:
            fh.write(data)
    else:
        path.write_bytes(data)


def _fake_split(
    rng: np.random.Generator, n: int
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.uint8]]:
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n, dtype=np.uint8)
    return images, labels


def test_load_dataset_digits_shape_and_range() -> None:
    ds = load_dataset("digits")

    assert ds.x.shape == (1797, 1, 8, 8)
    assert ds.x.dtype == np.float32
    assert ds.y.dtype == np.int64
    assert ds.input_shape == (1, 8, 8)
    assert len(ds) == 1797
    assert ds.num_classes == 10
    assert ds.x.min() >= 0.0 and ds.x.max() == 1.0
    assert set(np.unique(ds.y)) == set(range(10))


@pytest.mark.skipif(not SHARED_MNIST.is_dir(), reason="shared MNIST not present")
def test_load_dataset_mnist_shared_t10k() -> None:
    ds = load_dataset(f"mnist:{SHARED_MNIST}")

    assert ds.x.shape == (10000, 1, 28, 28)
    assert ds.x.dtype == np.float32
    assert ds.y.dtype == np.int64
    assert ds.num_classes == 10
    assert ds.x.min() >= 0.0 and ds.x.max() <= 1.0
    assert ds.y[:5].tolist() == [7, 2, 1, 0, 4]


def test_load_dataset_mnist_raw_and_gz_train_first(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    train_x, train_y = _fake_split(rng, 7)
    test_x, test_y = _fake_split(rng, 5)
    _write_idx(tmp_path / "train-images-idx3-ubyte", train_x)
    _write_idx(tmp_path / "train-labels-idx1-ubyte", train_y)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", test_x)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", test_y)

    ds = load_dataset(f"mnist:{tmp_path}")

    assert ds.x.shape == (12, 1, 28, 28)
    np.testing.assert_array_equal(ds.y, np.concatenate([train_y, test_y]))
    np.testing.assert_allclose(ds.x[7, 0], test_x[0] / 255.0, rtol=1e-6)
    np.testing.assert_allclose(ds.x[0, 0], train_x[0] / 255.0, rtol=1e-6)


def test_read_idx_bad_magic_raises(tmp_path: Path) -> None:
    path = tmp_path / "bad"
    path.write_bytes(b"\x01\x00\x08\x01" + (3).to_bytes(4, "big") + b"abc")

    with pytest.raises(ConfigError, match="bad magic"):
        read_idx(path, ndim=1)


def test_read_idx_truncated_payload_raises(tmp_path: Path) -> None:
    path = tmp_path / "short"
    path.write_bytes(_idx_bytes(np.zeros((4, 3, 3), dtype=np.uint8))[:-1])

    with pytest.raises(ConfigError, match="35 bytes, expected 36"):
        read_idx(path, ndim=3)


def test_read_idx_wrong_rank_raises(tmp_path: Path) -> None:
    path = tmp_path / "labels"
    _write_idx(path, np.zeros(4, dtype=np.uint8))

    with pytest.raises(ConfigError, match="1 dimensions, expected 3"):
        read_idx(path, ndim=3)


def test_read_idx_wrong_dtype_raises(tmp_path: Path) -> None:
    path = tmp_path / "float"
    path.write_bytes(b"\x00\x00\x0d\x01" + (1).to_bytes(4, "big") + b"\x00" * 4)

    with pytest.raises(ConfigError, match="dtype code 0x0d"):
        read_idx(path, ndim=1)


def test_read_idx_corrupt_gzip_raises(tmp_path: Path) -> None:
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(b"\x1f\x8b not really gzip")

    with pytest.raises(ConfigError, match="cannot read IDX"):
        read_idx(path, ndim=3)


def test_load_dataset_mnist_label_count_mismatch_raises(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    images, labels = _fake_split(rng, 4)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte", images)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", labels[:3])

    with pytest.raises(ConfigError, match=r"4 images.*3 labels"):
        load_dataset(f"mnist:{tmp_path}")


def test_load_dataset_mnist_missing_labels_raises(tmp_path: Path) -> None:
    images, _ = _fake_split(np.random.default_rng(2), 2)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte", images)

    with pytest.raises(ConfigError, match="t10k-labels-idx1-ubyte"):
        load_dataset(f"mnist:{tmp_path}")


def test_load_dataset_mnist_empty_dir_raises(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no MNIST files"):
        load_dataset(f"mnist:{tmp_path}")


def test_save_npz_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    ds = Dataset(
        x=rng.random((6, 2, 3), dtype=np.float32),
        y=np.array([0, 1, 2, 1, 0, 2]),
        num_classes=5,
        name="toy",
    )
    path = tmp_path / "sub" / "toy.npz"

    save_npz(path, ds)
    loaded = load_dataset(f"npz:{path}")

    np.testing.assert_array_equal(loaded.x, ds.x)
    np.testing.assert_array_equal(loaded.y, ds.y)
    assert loaded.num_classes == 5
    assert loaded.y.dtype == np.int64
    assert sorted(p.name for p in path.parent.iterdir()) == ["toy.npz"]


def test_load_dataset_npz_infers_classes_and_casts(tmp_path: Path) -> None:
    path = tmp_path / "plain.npz"
    np.savez(path, x=np.ones((3, 4), dtype=np.float64), y=np.array([0, 3, 1]))

    ds = load_dataset(f"npz:{path}")

    assert ds.num_classes == 4
    assert ds.x.dtype == np.float32
    assert ds.input_shape == (4,)


def test_load_dataset_npz_missing_array_raises(tmp_path: Path) -> None:
    path = tmp_path / "nox.npz"
    np.savez(path, y=np.array([0, 1]))

    with pytest.raises(ConfigError, match="'x' and 'y'"):
        load_dataset(f"npz:{path}")


def test_load_dataset_npz_not_a_zip_raises(tmp_path: Path) -> None:
    path = tmp_path / "junk.npz"
    path.write_bytes(b"definitely not a zip")

    with pytest.raises(ConfigError, match="cannot load"):
        load_dataset(f"npz:{path}")


def test_load_dataset_factory_tuple(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = types.ModuleType("fake_user_data")

    def make() -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
        return np.zeros((4, 3), dtype=np.float32), np.array([0, 1, 2, 1])

    fake.make = make  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "fake_user_data", fake)

    ds = load_dataset("fake_user_data:make")

    assert len(ds) == 4
    assert ds.num_classes == 3
    assert ds.name == "fake_user_data:make"


def test_load_dataset_factory_bad_return_raises(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake = types.ModuleType("fake_user_data2")
    fake.make = lambda: "nope"  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "fake_user_data2", fake)

    with pytest.raises(ConfigError, match="'fake_user_data2:make' returned str"):
        load_dataset("fake_user_data2:make")


@pytest.mark.parametrize("spec", ["mnist", "cifar10", ""])
def test_load_dataset_unknown_spec_raises(spec: str) -> None:
    with pytest.raises(ConfigError, match=f"unknown dataset '{spec}'"):
        load_dataset(spec)


def test_dataset_label_out_of_range_raises() -> None:
    with pytest.raises(ConfigError, match=r"\[0, 2\)"):
        Dataset(
            x=np.zeros((2, 1), np.float32), y=np.array([0, 2]), num_classes=2, name="t"
        )


def test_dataset_length_mismatch_raises() -> None:
    with pytest.raises(ConfigError, match="y must have shape"):
        Dataset(
            x=np.zeros((3, 1), np.float32), y=np.array([0, 1]), num_classes=2, name="t"
        )


def test_subset_selects_in_order() -> None:
    ds = Dataset(
        x=np.arange(5, dtype=np.float32)[:, None],
        y=np.array([0, 1, 0, 1, 0]),
        num_classes=2,
        name="t",
    )

    sub = subset(ds, np.array([4, 1]))

    assert sub.x[:, 0].tolist() == [4.0, 1.0]
    assert sub.y.tolist() == [0, 1]


def test_split_holdout_disjoint_and_deterministic() -> None:
    ds = Dataset(
        x=np.arange(50, dtype=np.float32)[:, None],
        y=np.arange(50) % 3,
        num_classes=3,
        name="t",
    )

    rest, held = split_holdout(ds, 12, np.random.default_rng(5))
    rest2, held2 = split_holdout(ds, 12, np.random.default_rng(5))

    assert (len(rest), len(held)) == (38, 12)
    values = np.concatenate([rest.x[:, 0], held.x[:, 0]])
    assert sorted(values.tolist()) == list(range(50))
    np.testing.assert_array_equal(held.x, held2.x)
    np.testing.assert_array_equal(rest.y, rest2.y)


def test_split_holdout_too_large_raises() -> None:
    ds = Dataset(
        x=np.zeros((3, 1), np.float32), y=np.zeros(3, np.int64), num_classes=1, name="t"
    )

    with pytest.raises(ConfigError, match="holdout"):
        split_holdout(ds, 4, np.random.default_rng(0))
