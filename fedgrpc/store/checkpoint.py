"""Model checkpoints: ``.npz`` written atomically (temp, fsync, rename), checksummed."""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from fedgrpc.errors import ConfigError
from fedgrpc.store.files import atomic_file, atomic_write


def save_arrays(
    path: Path, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any] | None = None
) -> str:
    """Save arrays (and JSON metadata) as ``.npz`` atomically; return its SHA-256 hex.

    A sidecar ``<path>.sha256`` holds the checksum so a torn or edited file is detected.
    """
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
        out = _HashingWriter(f)
        try:
            np.savez(out, allow_pickle=False, **payload)
            digest = out.hexdigest()
        finally:
            out.close()
    atomic_write(path.with_name(path.name + ".sha256"), (digest + "\n").encode())
    return digest


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
    about the write instead of write + hash.
    """

    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self._h = hashlib.sha256()
        self._pos = 0
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="ckpt-sha256")
        self._pending: list[Future[None]] = []

    def write(self, data: bytes | bytearray | memoryview) -> int:
        block = data if isinstance(data, bytes) else bytes(data)  # immutable
        self._pending.append(self._pool.submit(self._h.update, block))  # in order
        self._pos += self._f.write(block)
        return len(block)

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
        self._pool.shutdown(cancel_futures=True)
