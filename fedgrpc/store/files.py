"""Atomic file writes: temp file alongside, fsync, rename, fsync the directory.

The one way fedgrpc writes a file that must never be seen half-written: checkpoints,
data splits, certificates and keys, tokens, reports. A crash leaves either the old
file or the new one, and the rename itself survives power loss.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from fedgrpc.errors import ConfigError


@contextmanager
def atomic_file(path: Path, mode: int | None = None) -> Iterator[BinaryIO]:
    """A binary file that replaces ``path`` when the block ends without error.

    The temp file is created 0600 and only then set to ``mode`` (if given), so a
    private key is never readable by others, not even for an instant. On an error
    the temp file is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        if mode is not None:
            os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write(path: Path, data: bytes, mode: int | None = None) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_file`)."""
    with atomic_file(path, mode) as f:
        f.write(data)


def fsync_dir(directory: Path) -> None:
    """Make a rename or a new file in ``directory`` durable."""
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def private_dir(directory: Path) -> None:
    """Create ``directory`` (0700 when new); an existing one keeps its mode.

    Raises:
        ConfigError: it cannot be created.
    """
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create directory {directory}: {e}") from e


def read_file(path: Path, what: str) -> bytes:
    """The bytes of an operator-given file; ConfigError naming ``what`` if not."""
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read {what} {path}: {e}") from e
