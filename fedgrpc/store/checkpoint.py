"""Model checkpoints: ``.npz`` written atomically (temp, fsync, rename), checksummed.

The archive is the one ``np.savez`` writes (stored zip entries ``NAME.npy``, each with
its CRC-32; any ``np.load(..., allow_pickle=False)`` reads it), but written straight
from the arrays' memory: no ``tobytes`` copy of each 16 MiB piece. :func:`save_arrays`
hashes the bytes (SHA-256, on a helper thread) as they go by and writes the
``.sha256`` sidecar; :func:`write_arrays` leaves the hash for later (:func:`seal`), so
a round's checkpoint costs its write and fsync before the next model is published and
its hash after (docs/faults.md, "What a round's commit makes durable").
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from collections.abc import Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from numpy.lib import format as npy_format

from fedgrpc.errors import ConfigError
from fedgrpc.store.files import atomic_file, atomic_write

_WRITE_BLOCK = 4 << 20  # bytes per write (and per hash step) of an array's data


def save_arrays(
    path: Path, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any] | None = None
) -> str:
    """Save arrays (and JSON metadata) as ``.npz`` atomically; return its SHA-256 hex.

    A sidecar ``<path>.sha256`` holds the checksum so a torn or edited file is detected.
    The arrays must not change until this returns: their memory is written and
    hashed as it is, without a copy.
    """
    digest = _write(path, arrays, meta, hashing=True)
    assert digest is not None
    write_sidecar(path, digest)
    return digest


def write_arrays(
    path: Path, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any] | None = None
) -> None:
    """Save arrays as :func:`save_arrays` does, fsynced and renamed, but unhashed.

    Until :func:`seal` runs, only the zip's CRC-32s check the file when it is read.
    """
    _write(path, arrays, meta, hashing=False)


def seal(path: Path) -> str:
    """SHA-256 of a written checkpoint as it is on disk; writes its sidecar too."""
    digest = _file_sha256(path)
    write_sidecar(path, digest)
    return digest


def _write(
    path: Path,
    arrays: Mapping[str, np.ndarray],
    meta: Mapping[str, Any] | None,
    *,
    hashing: bool,
) -> str | None:
    payload = dict(arrays)
    if meta is not None:
        payload["__meta__"] = np.frombuffer(
            json.dumps(dict(meta), sort_keys=True).encode(), dtype=np.uint8
        )
    bad = [k for k, v in payload.items() if np.asarray(v).dtype.hasobject]
    if bad:
        raise ConfigError(f"cannot save object arrays {bad}: they would be pickled")
    with atomic_file(path) as f:
        # Hashed as it is written (no second pass over the file): the writer cannot
        # seek, so zipfile streams and never rewrites earlier bytes.
        out = _HashingWriter(f, hashing=hashing)
        try:
            with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
                for name, value in payload.items():
                    _write_npy(zf, name, np.asarray(value))
            return out.hexdigest() if hashing else None
        finally:
            out.close()


def write_sidecar(path: Path, digest: str) -> None:
    """Write ``<path>.sha256`` (atomically)."""
    atomic_write(path.with_name(path.name + ".sha256"), (digest + "\n").encode())


def _write_npy(zf: zipfile.ZipFile, name: str, arr: np.ndarray) -> None:
    """One ``NAME.npy`` entry, as ``np.savez`` writes it, from the array's memory."""
    if not arr.flags.c_contiguous:  # (ascontiguousarray would make 0-d arrays 1-d)
        arr = arr.copy(order="C")
    header = npy_format.header_data_from_array_1_0(arr)
    with zf.open(f"{name}.npy", "w", force_zip64=True) as entry:
        try:
            npy_format.write_array_header_1_0(entry, header)
        except ValueError:  # a header too long for format 1.0 (many dimensions)
            npy_format.write_array_header_2_0(entry, header)
        for block in _blocks(arr):
            entry.write(block)


def _blocks(arr: np.ndarray) -> Iterator[memoryview]:
    """The array's bytes as read-only views of at most ``_WRITE_BLOCK`` bytes."""
    if arr.nbytes == 0:
        return
    raw = arr.reshape(-1).view(np.uint8).data
    for s in range(0, raw.nbytes, _WRITE_BLOCK):
        yield raw[s : s + _WRITE_BLOCK]


def load_arrays(
    path: Path,
    *,
    expected_sha256: str | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Load a checkpoint written by :func:`save_arrays`, verifying its checksum.

    The checksum comes from ``expected_sha256`` or else the sidecar file, if present.
    """
    if not path.is_file():
        raise ConfigError(f"checkpoint {path} does not exist")
    digest = _file_sha256(path)
    side = path.with_name(path.name + ".sha256")
    want = expected_sha256 or (side.read_text().strip() if side.is_file() else None)
    if want is not None and want != digest:
        raise ConfigError(f"checkpoint {path} is corrupt: sha256 {digest} != {want}")
    # Never allow_pickle: a checkpoint may come from someone else.
    try:
        loaded = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as err:
        raise ConfigError(f"cannot read checkpoint {path}: {err}") from None
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise ConfigError(f"checkpoint {path} is not an .npz archive")
    try:
        with loaded as z:
            arrays = {k: z[k] for k in z.files if k != "__meta__"}
            raw = bytes(z["__meta__"]) if "__meta__" in z.files else b"{}"
            meta = json.loads(raw.decode())
    except (ValueError, OSError, KeyError, EOFError, zipfile.BadZipFile) as err:
        raise ConfigError(f"cannot read checkpoint {path}: {err}") from None
    return arrays, meta


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


class _HashingWriter:
    """A write-only, forward-only file that SHA-256s what passes through it.

    The hash runs on a helper thread, in write order, while this thread goes on
    writing (hashlib and file writes release the GIL): a 40 MB checkpoint costs
    about the write instead of write + hash. Blocks are hashed from the caller's
    memory: it must stay unchanged until :meth:`hexdigest` returns. Without
    ``hashing`` it only writes and counts.
    """

    def __init__(self, f: BinaryIO, *, hashing: bool = True) -> None:
        self._f = f
        self._h = hashlib.sha256()
        self._pos = 0
        self._pool = (
            ThreadPoolExecutor(1, thread_name_prefix="ckpt-sha256") if hashing else None
        )
        self._pending: list[Future[None]] = []

    def write(self, data: bytes | bytearray | memoryview) -> int:
        # zipfile's own header buffers may be reused: copy those (they are small).
        block = data if isinstance(data, bytes | memoryview) else bytes(data)
        if self._pool is not None:
            self._pending.append(self._pool.submit(self._h.update, block))  # in order
        n = self._f.write(block)
        self._pos += n
        return n

    def tell(self) -> int:
        return self._pos

    def read(self, _n: int = -1) -> bytes:  # np.savez tells files from paths by this
        raise io.UnsupportedOperation("write-only")

    def flush(self) -> None:
        self._f.flush()

    def hexdigest(self) -> str:
        for fut in self._pending:
            fut.result()
        self._pending.clear()
        return self._h.hexdigest()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
