"""Data sources: scikit-learn digits, MNIST IDX files, ``.npz`` files, import strings.

Every loader returns a :class:`Dataset` with ``x`` float32 ``(N, *input_shape)``
(scaled to ``[0, 1]`` for digits and MNIST) and ``y`` int64 ``(N,)``. Nothing here
unpickles: ``.npz`` files are loaded with ``allow_pickle=False``.
"""

from __future__ import annotations

import gzip
import importlib.util
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from fedgrpc.errors import ConfigError
from fedgrpc.factories import load_factory
from fedgrpc.store.files import atomic_file

log = logging.getLogger(__name__)

SPEC_SYNTAX = "'digits', 'mnist:DIR', 'npz:FILE' or 'package.module:factory'"

# IDX header: two zero bytes, a dtype code, the number of dimensions, then one
# big-endian uint32 per dimension. MNIST uses only code 0x08 (unsigned byte).
_IDX_UBYTE = 0x08
_MNIST_SPLITS = ("train", "t10k")  # concatenated in this order
_MNIST_CLASSES = 10
DIGITS_CSV = "datasets/data/digits.csv.gz"
"""scikit-learn's bundled digits, relative to its package directory."""


@dataclass(frozen=True, eq=False)
class Dataset:
    """A labelled data set held in memory.

    ``__post_init__`` casts ``x`` to C-contiguous float32 and ``y`` to int64 and checks
    that shapes agree and every label lies in ``[0, num_classes)``.
    """

    x: npt.NDArray[np.float32]  # (N, *input_shape)
    y: npt.NDArray[np.int64]  # (N,)
    num_classes: int
    name: str

    def __post_init__(self) -> None:
        x = np.ascontiguousarray(self.x, dtype=np.float32)
        y = np.asarray(self.y)
        integral = np.issubdtype(y.dtype, np.integer)
        if y.size and not integral and not np.array_equal(y, np.round(y)):
            raise ConfigError(f"dataset {self.name!r}: labels must be integers")
        y = np.ascontiguousarray(y, dtype=np.int64)
        if x.ndim < 2:
            raise ConfigError(
                f"dataset {self.name!r}: x must be (N, *input_shape), got {x.shape}"
            )
        if y.shape != (x.shape[0],):
            raise ConfigError(
                f"dataset {self.name!r}: y must have shape ({x.shape[0]},), "
                f"got {y.shape}"
            )
        if self.num_classes < 1:
            raise ConfigError(
                f"dataset {self.name!r}: num_classes must be >= 1, "
                f"got {self.num_classes}"
            )
        if y.size and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
            raise ConfigError(
                f"dataset {self.name!r}: labels must lie in [0, {self.num_classes}), "
                f"got [{int(y.min())}, {int(y.max())}]"
            )
        object.__setattr__(self, "x", x)
        object.__setattr__(self, "y", y)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one sample."""
        return tuple(int(s) for s in self.x.shape[1:])

    def __len__(self) -> int:
        return int(self.x.shape[0])


def load_dataset(spec: str) -> Dataset:
    """Load a data set from its spec string.

    Args:
        spec: ``digits`` (scikit-learn's bundled 8x8 digits, no download),
            ``mnist:DIR`` (IDX files, raw or ``.gz``: ``train-*`` then ``t10k-*``,
            whichever are present), ``npz:FILE`` (arrays ``x``, ``y`` and optionally
            ``num_classes``) or ``package.module:factory`` (a callable taking no
            arguments and returning a :class:`Dataset` or an ``(x, y)`` tuple).

    Raises:
        ConfigError: unknown spec, missing or malformed files; the message names
            the spec.
    """
    spec = spec.strip()
    if spec == "digits":
        return _load_digits()
    if spec.startswith("mnist:"):
        return load_mnist(Path(spec.removeprefix("mnist:")), name=spec)
    if spec.startswith("npz:"):
        return _load_npz(Path(spec.removeprefix("npz:")), name=spec)
    if ":" in spec:
        return _load_factory_dataset(spec)
    raise ConfigError(f"unknown dataset {spec!r}: expected {SPEC_SYNTAX}")


def _load_digits() -> Dataset:
    """Scikit-learn's 1797 8x8 digits as ``(1797, 1, 8, 8)`` in ``[0, 1]``."""
    raw = _digits_csv()
    if raw is not None:
        data, target = raw
    else:
        # Imported here: scikit-learn takes ~2 s to import; only this fallback needs it.
        from sklearn.datasets import load_digits

        bunch = load_digits()
        data, target = np.asarray(bunch.data), np.asarray(bunch.target)
    x = (np.asarray(data, dtype=np.float32) / 16.0).reshape(-1, 1, 8, 8)
    return Dataset(x=x, y=target, num_classes=10, name="digits")


def _digits_csv() -> tuple[npt.NDArray[np.float64], npt.NDArray[np.int64]] | None:
    """The digits straight from scikit-learn's bundled CSV, without importing it.

    ``load_digits`` reads the same file (64 pixel columns, then the label); reading
    it here saves the ~2 s import of scikit-learn. None if the file is not there.
    """
    spec = importlib.util.find_spec("sklearn")  # locates, does not import
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / DIGITS_CSV
    try:
        with gzip.open(path, "rt") as f:
            table = np.loadtxt(f, delimiter=",", dtype=np.float64, ndmin=2)
    except (OSError, ValueError):
        return None
    if table.shape != (1797, 65):
        return None
    return table[:, :-1], table[:, -1].astype(np.int64)


def load_mnist(directory: Path, name: str = "") -> Dataset:
    """Load MNIST from the IDX files in ``directory`` (train first, then t10k).

    Each split is used when its images file (``<split>-images-idx3-ubyte`` or the same
    with ``.gz``) is present; its labels file must then be present too.

    Raises:
        ConfigError: no split found, a labels file missing, or a malformed IDX file.
    """
    name = name or f"mnist:{directory}"
    if not directory.is_dir():
        raise ConfigError(f"dataset {name!r}: {directory} is not a directory")
    xs: list[npt.NDArray[np.uint8]] = []
    ys: list[npt.NDArray[np.uint8]] = []
    for split in _MNIST_SPLITS:
        images_path = _find_idx(directory, f"{split}-images-idx3-ubyte")
        if images_path is None:
            continue
        labels_path = _find_idx(directory, f"{split}-labels-idx1-ubyte")
        if labels_path is None:
            raise ConfigError(
                f"dataset {name!r}: found {images_path.name} but no "
                f"{split}-labels-idx1-ubyte[.gz] in {directory}"
            )
        images = read_idx(images_path, ndim=3)  # (n, rows, cols)
        labels = read_idx(labels_path, ndim=1)  # (n,)
        if labels.shape[0] != images.shape[0]:
            raise ConfigError(
                f"dataset {name!r}: {images_path.name} has {images.shape[0]} images "
                f"but {labels_path.name} has {labels.shape[0]} labels"
            )
        log.debug("mnist %s: %d images from %s", split, images.shape[0], images_path)
        xs.append(images)
        ys.append(labels)
    if not xs:
        raise ConfigError(
            f"dataset {name!r}: no MNIST files in {directory}: expected "
            "train-images-idx3-ubyte[.gz] and/or t10k-images-idx3-ubyte[.gz] "
            "with their labels files"
        )
    if len({x.shape[1:] for x in xs}) > 1:
        raise ConfigError(f"dataset {name!r}: splits have different image sizes")
    images = np.concatenate(xs)  # (N, rows, cols)
    labels = np.concatenate(ys)  # (N,)
    if labels.size and int(labels.max()) >= _MNIST_CLASSES:
        raise ConfigError(
            f"dataset {name!r}: label {int(labels.max())} is not a digit (0-9)"
        )
    x = (images.astype(np.float32) / 255.0)[:, None, :, :]  # (N, 1, rows, cols)
    y = labels.astype(np.int64)
    return Dataset(x=x, y=y, num_classes=_MNIST_CLASSES, name=name)


def _find_idx(directory: Path, stem: str) -> Path | None:
    """The raw or gzipped IDX file ``stem`` in ``directory``, raw preferred."""
    for candidate in (directory / stem, directory / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def read_idx(path: Path, ndim: int) -> npt.NDArray[np.uint8]:
    """Read an unsigned-byte IDX file (raw, or gzip when the name ends in ``.gz``).

    Args:
        path: The file.
        ndim: The number of dimensions the file must declare.

    Raises:
        ConfigError: unreadable file, bad magic number, wrong dtype or rank, or a
            payload whose length differs from the product of the declared sizes.
    """
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as fh:
                data = fh.read()
        else:
            data = path.read_bytes()
    except (OSError, EOFError) as exc:
        raise ConfigError(f"cannot read IDX file {path}: {exc}") from exc
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ConfigError(f"{path}: not an IDX file (bad magic number)")
    if data[2] != _IDX_UBYTE:
        raise ConfigError(
            f"{path}: IDX dtype code {data[2]:#04x}, expected {_IDX_UBYTE:#04x} "
            "(unsigned byte)"
        )
    if data[3] != ndim:
        raise ConfigError(f"{path}: IDX file has {data[3]} dimensions, expected {ndim}")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ConfigError(f"{path}: IDX header truncated")
    dims = tuple(
        int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)
    )
    expected = math.prod(dims)  # Python ints: huge declared dimensions cannot wrap
    if len(data) - header != expected:
        raise ConfigError(
            f"{path}: IDX payload is {len(data) - header} bytes, expected "
            f"{expected} for shape {dims}"
        )
    # uint8 payload: a buffer-protocol view of the bytes is the array, no decoding.
    payload = np.asarray(memoryview(data)[header:], dtype=np.uint8)
    return payload.reshape(dims)


def _load_npz(path: Path, name: str) -> Dataset:
    """Arrays ``x``, ``y`` and optional ``num_classes`` from an ``.npz`` file."""
    try:
        # Never allow_pickle: this file may come from someone else.
        with np.load(path, allow_pickle=False) as npz:
            keys = set(npz.files)
            if not {"x", "y"} <= keys:
                raise ConfigError(
                    f"dataset {name!r}: {path} must hold arrays 'x' and 'y', "
                    f"has {sorted(keys)}"
                )
            x = np.asarray(npz["x"])
            y = np.asarray(npz["y"])
            stored_classes = (
                np.asarray(npz["num_classes"]) if "num_classes" in keys else None
            )
    except ConfigError:
        raise
    except (OSError, ValueError) as exc:
        raise ConfigError(f"dataset {name!r}: cannot load {path}: {exc}") from exc
    if stored_classes is not None:
        if stored_classes.size != 1:
            raise ConfigError(f"dataset {name!r}: num_classes must be a scalar")
        num_classes = int(stored_classes.reshape(()))
    else:
        num_classes = _infer_classes(y, name)
    return Dataset(x=x, y=y, num_classes=num_classes, name=name)


def _infer_classes(y: npt.NDArray[Any], name: str) -> int:
    """``max(y) + 1``; a data set without labels has no class count to infer."""
    if y.size == 0:
        raise ConfigError(f"dataset {name!r}: no labels to infer num_classes from")
    return int(np.max(y)) + 1


def _load_factory_dataset(spec: str) -> Dataset:
    """Call a ``package.module:factory`` and accept a Dataset or an ``(x, y)`` pair."""
    result = load_factory(spec, ("digits", "mnist:DIR", "npz:FILE"))()
    if isinstance(result, Dataset):
        return result
    if isinstance(result, tuple) and len(result) == 2:
        x, y = (np.asarray(a) for a in result)
        return Dataset(x=x, y=y, num_classes=_infer_classes(y, spec), name=spec)
    raise ConfigError(
        f"dataset factory {spec!r} returned {type(result).__name__}, "
        "expected a Dataset or an (x, y) tuple"
    )


def subset(ds: Dataset, idx: npt.NDArray[np.integer[Any]]) -> Dataset:
    """The samples of ``ds`` at integer positions ``idx`` (copied), in that order."""
    idx = np.asarray(idx)
    if idx.size and not np.issubdtype(idx.dtype, np.integer):
        raise ConfigError(f"subset indices must be integers, got {idx.dtype}")
    idx = idx.astype(np.int64, copy=False)
    return Dataset(x=ds.x[idx], y=ds.y[idx], num_classes=ds.num_classes, name=ds.name)


def split_holdout(
    ds: Dataset, holdout: int, rng: np.random.Generator
) -> tuple[Dataset, Dataset]:
    """Split off ``holdout`` random samples, e.g. a server validation set.

    Returns:
        ``(rest, holdout)``; each keeps the original sample order.
    """
    if not 0 <= holdout <= len(ds):
        raise ConfigError(
            f"holdout must lie in [0, {len(ds)}] for {ds.name!r}, got {holdout}"
        )
    perm = rng.permutation(len(ds))
    held = np.sort(perm[:holdout])
    rest = np.sort(perm[holdout:])
    return subset(ds, rest), subset(ds, held)


def save_npz(path: Path | str, ds: Dataset) -> None:
    """Write ``x``, ``y`` and ``num_classes`` to ``path`` atomically."""
    with atomic_file(Path(path)) as fh:
        np.savez(fh, x=ds.x, y=ds.y, num_classes=np.int64(ds.num_classes))
