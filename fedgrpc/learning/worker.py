"""The validation worker process (``--validator process``), and its protocol.

The aggregator side is :mod:`fedgrpc.server.validation`; this module imports torch
only inside :func:`main`, so the aggregator can import the protocol half.

Protocol: JSON lines on stdin/stdout. The first request carries the round config and
the validation data spec; the worker loads data and model, creates the shared regions,
writes theta_0 into ``theta_a`` and replies with the file's path, the tensor specs, the
round config completed from the data and the validation set's digest. Then each
``{"op": "grad"|"eval", "slot": i}`` runs one pass on region ``i`` (``grad`` writes
v_t into the ``grad`` region) and replies with the loss and accuracy, or ``{"error"}``.
EOF on stdin ends the worker. Logs go to stderr (the aggregator's).
"""

from __future__ import annotations

import contextlib
import json
import logging
import mmap
import os
import signal
import sys
import tempfile
from pathlib import Path
from typing import IO, Any

import numpy as np

from fedgrpc.config import round_config_from_json, round_config_to_json
from fedgrpc.errors import ConfigError
from fedgrpc.types import TensorSpec

log = logging.getLogger("fedgrpc.validation_worker")

REGIONS = ("theta_a", "theta_b", "grad", "scratch")
THETA_A, THETA_B, GRAD, SCRATCH = range(len(REGIONS))

TORCH_THREADS = 1
"""Threads of the worker's torch (intra-op; inter-op is 1 too).

One, whatever the machine: a pass runs while the aggregator's own threads receive,
fold and encode on the same cores, and torch's default (one per core) made them
compete. Measured with ``scripts/bench_round.py`` on 2 cores (docs/benchmarks.md):
the 4 x 100 k round with the real passes took 64 % longer with 2 threads, and at
4 x 10 M the passes themselves were no faster with 2."""


def map_regions(fd: int, size: int) -> np.ndarray:
    """Map ``len(REGIONS)`` float32 vectors of ``size`` elements from ``fd``.

    The array keeps the mapping alive (it is the array's base).
    """
    nbytes = max(1, len(REGIONS) * size * 4)
    mm = mmap.mmap(fd, nbytes)
    regions = np.frombuffer(mm, dtype=np.float32, count=len(REGIONS) * size)
    return regions.reshape(len(REGIONS), size)


def specs_to_json(specs: list[TensorSpec]) -> list[dict[str, Any]]:
    """Tensor specs as JSON values."""
    return [{"name": s.name, "dtype": s.dtype, "shape": list(s.shape)} for s in specs]


def specs_from_json(data: list[dict[str, Any]]) -> list[TensorSpec]:
    """Inverse of :func:`specs_to_json`."""
    return [
        TensorSpec(str(d["name"]), str(d["dtype"]), tuple(int(x) for x in d["shape"]))
        for d in data
    ]


def _reply(out: IO[bytes], msg: dict[str, Any]) -> None:
    out.write(json.dumps(msg).encode() + b"\n")
    out.flush()


def _shared_file(
    dirs: list[str], nbytes: int, reserved_regions: int
) -> tuple[int, str]:
    """Create the shared file in the first directory with room for it.

    The regions the engine always touches (theta_a, theta_b, grad) are reserved with
    ``posix_fallocate``: on a small tmpfs (Docker's /dev/shm is 64 MiB) that fails
    here with ENOSPC and the next directory is tried, instead of a SIGBUS later when
    a page cannot be backed. The scratch region stays sparse (rarely used).
    """
    reserve = nbytes // len(REGIONS) * reserved_regions
    errors = []
    for d in dirs:
        try:
            fd, path = tempfile.mkstemp(prefix="fedgrpc-val-", dir=d)
        except OSError as err:
            errors.append(f"{d}: {err.strerror or err}")
            continue
        try:
            os.ftruncate(fd, max(1, nbytes))
            if reserve:
                os.posix_fallocate(fd, 0, reserve)
        except OSError as err:
            os.close(fd)
            os.unlink(path)
            errors.append(f"{d}: {err.strerror or err}")
            log.warning(
                "no room for %.1f MiB of shared buffers in %s (%s); trying the next "
                "directory",
                reserve / 2**20,
                d,
                err.strerror or err,
            )
            continue
        return fd, path
    raise OSError(
        f"cannot reserve {reserve / 2**20:.1f} MiB for the validation worker's shared "
        f"buffers: {'; '.join(errors)}"
    )


def main() -> int:
    """Serve validation passes until stdin closes."""
    # Ctrl-C reaches the whole process group: the aggregator shuts down gracefully
    # and then closes our input, which is how this process ends.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    out = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    sys.stdout = sys.stderr  # stray prints must not corrupt the protocol
    line = sys.stdin.buffer.readline()
    if not line:
        return 0
    init = json.loads(line)
    logging.basicConfig(
        level=int(init.get("log_level", logging.INFO)),
        format="%(asctime)s %(levelname)s validator: %(message)s",
    )
    import torch  # here, not above: the aggregator imports the protocol half

    torch.set_num_threads(TORCH_THREADS)
    torch.set_num_interop_threads(1)  # before any parallel work, or torch refuses
    from fedgrpc.learning.validation import local_validation

    try:
        local = local_validation(
            round_config_from_json(init["round"]),
            str(init["val_data"]),
            int(init["val_count"]),
            None if init["init_model"] is None else Path(init["init_model"]),
        )
    except ConfigError as err:
        _reply(out, {"error": str(err), "kind": "config"})
        return 2
    except Exception as err:  # reported to the aggregator, which fails with it
        log.exception("validation setup failed")
        _reply(out, {"error": f"{type(err).__name__}: {err}"})
        return 1
    size = local.layout.size
    try:
        fd, path = _shared_file(
            [str(d) for d in init["shm_dirs"]], len(REGIONS) * size * 4, GRAD + 1
        )
    except OSError as err:
        _reply(out, {"error": str(err), "kind": "config"})
        return 2
    try:
        regions = map_regions(fd, size)
    finally:
        os.close(fd)
    regions[THETA_A][:] = local.theta0
    _reply(
        out,
        {
            "shm": path,
            "size": size,
            "specs": specs_to_json(local.specs),
            "round": round_config_to_json(local.round_cfg),
            "val_digest": local.val_digest,
            "torch_threads": [torch.get_num_threads(), torch.get_num_interop_threads()],
        },
    )
    validator = local.validator
    for raw in sys.stdin.buffer:
        req = json.loads(raw)
        try:
            slot = int(req["slot"])
            if not 0 <= slot < len(REGIONS) or slot == GRAD:
                raise ValueError(f"bad region {slot}")
            if req["op"] == "grad":
                _, loss, acc = validator.gradient(regions[slot], out=regions[GRAD])
            elif req["op"] == "eval":
                loss, acc = validator.evaluate(regions[slot])
            else:
                raise ValueError(f"unknown op {req['op']!r}")
        except Exception as err:  # reported; the aggregator decides
            log.exception("validation pass failed")
            _reply(out, {"error": f"{type(err).__name__}: {err}"})
            continue
        _reply(out, {"loss": loss, "acc": acc})
    return 0


def _exit_now(code: int) -> None:
    """Exit without the interpreter's teardown.

    Unloading torch and its thread pools took 1-3 s on 2 shared cores, all of it
    spent after the run was over while the aggregator waited to exit. Nothing here
    needs a clean teardown: the shared file is already unlinked, the replies are
    flushed and the aggregator holds every durable result.
    """
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    logging.shutdown()
    os._exit(code)


if __name__ == "__main__":
    _exit_now(main())
