"""Where the aggregator's validation passes run: a worker process (default) or a thread.

The passes (v_t = the validation-loss gradient at theta_t, and the loss after the step;
DESIGN §4) need torch, the model and the validation set. ``--validator process`` keeps
all three out of the aggregator process: a child process
(:mod:`fedgrpc.learning.worker`) loads them, and the two share four model-sized
float32 regions of one memory-mapped file:

    theta_a, theta_b   the engine's two parameter buffers (theta_t and the
                       accumulator that becomes theta_{t+1}); the worker reads them
    grad               v_t, written by the worker, read by the DIG-FL dots
    scratch            a copy of any other vector the engine asks about

so a pass costs a JSON line each way, not a copy of the model. The file lives in
``/dev/shm`` (tmpfs) where there is room (its pages are reserved up front, so a small
tmpfs such as Docker's 64 MiB default makes the worker use the temp directory instead
of crashing later), and is unlinked as soon as both sides mapped it: nothing is left
behind, whichever process dies first. Requests are serialised (one at a
time); a worker that dies makes the next request raise :class:`ValidationWorkerError`,
which fails the round with that message (the run resumes with ``--resume``).

Why: the aggregator's peak memory (issue 4: < 4 x model + 300 MB with 32 parties x 10 M
parameters) cannot include torch's ~170 MiB of imports and a torch copy of the model;
and a user's ``module:factory`` model that crashes takes down the worker, not the
ledger's process.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TypeVar

import numpy as np

from fedgrpc.config import (
    VALIDATORS,
    RoundConfig,
    round_config_from_json,
    round_config_to_json,
)
from fedgrpc.engine import Validator
from fedgrpc.errors import ConfigError, UnavailableError
from fedgrpc.learning.worker import (
    GRAD,
    SCRATCH,
    THETA_A,
    THETA_B,
    map_regions,
    specs_from_json,
)
from fedgrpc.types import TensorSpec

log = logging.getLogger(__name__)

T = TypeVar("T")

START_TIMEOUT_S = 600.0  # loading a large validation set can take a while


class ValidationWorkerError(UnavailableError):
    """The validation worker process failed or exited (the run stops; resumable)."""


class WorkerDiedError(ValidationWorkerError):
    """The worker process is gone (exited or killed): a restart may help."""


@dataclass
class ValidationSetup:
    """What the aggregator needs from its validation side."""

    validator: Validator
    round_cfg: RoundConfig  # input shape and class count taken from the data
    specs: list[TensorSpec]
    theta0: np.ndarray
    val_digest: str
    theta_buffers: tuple[np.ndarray, np.ndarray] | None = None
    close: Callable[[], None] = field(default=lambda: None)
    pid: int | None = None  # the worker process, if any


def open_validation(
    kind: str,
    cfg: RoundConfig,
    val_spec: str,
    val_count: int,
    init_model: Path | None,
    *,
    worker_restarts: int = 0,
) -> ValidationSetup:
    """Build the validation side: in a worker process or in this process.

    ``worker_restarts``: how often a dead worker is replaced before a pass fails.
    """
    if kind == "process":
        return RemoteValidator.start(
            cfg, val_spec, val_count, init_model, restarts=worker_restarts
        ).setup
    if kind != "thread":
        raise ConfigError(f"validator must be one of {VALIDATORS}, got {kind!r}")
    from fedgrpc.learning.validation import local_validation  # torch: this path only

    local = local_validation(cfg, val_spec, val_count, init_model)
    return ValidationSetup(
        local.validator, local.round_cfg, local.specs, local.theta0, local.val_digest
    )


def shm_dirs() -> list[str]:
    """Where the shared regions may live, in order of preference.

    tmpfs if there is one (no disk writes), then the temp directory (page cache; used
    when /dev/shm is too small).
    """
    import tempfile

    dirs = [tempfile.gettempdir()]
    if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
        dirs.insert(0, "/dev/shm")
    return dirs


class RemoteValidator:
    """The :class:`~fedgrpc.engine.Validator` of a validation worker process."""

    def __init__(
        self,
        proc: subprocess.Popen[bytes],
        regions: np.ndarray,
        setup_reply: dict[str, Any],
    ) -> None:
        self._proc = proc
        self._regions = regions
        self._lock = threading.Lock()
        self._closed = False
        self.pid = proc.pid
        self.restarts = 0  # workers replaced so far
        # (intra-op, inter-op) threads of the worker's torch, as it reported them.
        threads = setup_reply.get("torch_threads") or (0, 0)
        self.torch_threads = (int(threads[0]), int(threads[1]))
        self.restarts_left = 0
        self._restart_args: tuple[RoundConfig, str, int, list[str] | None] | None = None
        specs = specs_from_json(setup_reply["specs"])
        grad = regions[GRAD]
        grad.flags.writeable = False  # the worker's output: read-only here
        self._grad = grad
        self.setup = ValidationSetup(
            self,
            round_config_from_json(setup_reply["round"]),
            specs,
            regions[THETA_A],
            str(setup_reply["val_digest"]),
            theta_buffers=(regions[THETA_A], regions[THETA_B]),
            close=self.close,
            pid=proc.pid,
        )

    @classmethod
    def start(
        cls,
        cfg: RoundConfig,
        val_spec: str,
        val_count: int,
        init_model: Path | None,
        *,
        dirs: list[str] | None = None,
        restarts: int = 0,
    ) -> RemoteValidator:
        """Start the worker, wait until it loaded data and model, map the regions.

        ``dirs``: where the shared file may go, first with room wins (default
        :func:`shm_dirs`). ``restarts``: how many times a worker that died is
        replaced by a fresh one (the pass is then retried) before passes fail.
        """
        # The worker imports what this process can (``module:factory`` models and
        # datasets): same interpreter, same import path.
        path = [os.getcwd() if p == "" else p for p in sys.path]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(path))
        proc = subprocess.Popen(
            [sys.executable, "-m", "fedgrpc.learning.worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
        )
        assert proc.stdin is not None and proc.stdout is not None
        try:
            init = {
                "round": round_config_to_json(cfg),
                "val_data": val_spec,
                "val_count": val_count,
                "init_model": None if init_model is None else str(init_model),
                "shm_dirs": shm_dirs() if dirs is None else dirs,
                "log_level": logging.getLogger().getEffectiveLevel(),
            }
            reply = _exchange(proc, proc.stdin, proc.stdout, init, START_TIMEOUT_S)
            if "error" in reply:
                if reply.get("kind") == "config":
                    raise ConfigError(str(reply["error"]))
                raise ValidationWorkerError(
                    f"validation worker failed to start: {reply['error']}"
                )
            shm = str(reply["shm"])
            size = int(reply["size"])
            fd = os.open(shm, os.O_RDWR)
            try:
                regions = map_regions(fd, size)
            finally:
                os.close(fd)
                os.unlink(shm)  # both sides have it mapped: nothing to clean up later
        except BaseException:
            _stop(proc)
            raise
        log.info(
            "validation worker pid %d: %d parameters, validation digest %s, "
            "torch threads %s",
            proc.pid,
            size,
            str(reply["val_digest"])[:12],
            reply.get("torch_threads"),
        )
        validator = cls(proc, regions, reply)
        validator._restart_args = (cfg, val_spec, val_count, dirs)
        validator.restarts_left = restarts
        return validator

    def _restart(self, err: WorkerDiedError) -> bool:
        """Replace a dead worker by a fresh one; False if no restart is left."""
        with self._lock:
            if self._closed or self.restarts_left <= 0 or self._restart_args is None:
                return False
            self.restarts_left -= 1
            log.warning("%s; starting a new validation worker", err)
            cfg, val_spec, val_count, dirs = self._restart_args
            fresh = RemoteValidator.start(cfg, val_spec, val_count, None, dirs=dirs)
            _stop(self._proc)
            # The engine's theta buffers stay in the old (still mapped) regions:
            # the new worker is handed them through its scratch region.
            self._proc, self._regions, self._grad = (
                fresh._proc,
                fresh._regions,
                fresh._grad,
            )
            self.pid = self.setup.pid = fresh.pid
            self.restarts += 1
            log.warning("validation worker restarted: pid %d", self.pid)
            return True

    def _retrying(self, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except WorkerDiedError as err:
            if not self._restart(err):
                raise
            return fn()

    # ------------------------------------------------------------ Validator
    def gradient(self, flat: np.ndarray) -> tuple[np.ndarray, float, float]:
        """v_t at ``flat`` (returned as a read-only view of the shared region)."""

        def once() -> tuple[np.ndarray, float, float]:
            reply = self._call({"op": "grad", "slot": self._slot_of(flat)})
            return self._grad, float(reply["loss"]), float(reply["acc"])

        return self._retrying(once)

    def evaluate(self, flat: np.ndarray) -> tuple[float, float]:
        """Validation loss and accuracy at ``flat``."""

        def once() -> tuple[float, float]:
            reply = self._call({"op": "eval", "slot": self._slot_of(flat)})
            return float(reply["loss"]), float(reply["acc"])

        return self._retrying(once)

    def _slot_of(self, flat: np.ndarray) -> int:
        """The region holding ``flat``; other vectors are copied into scratch first."""
        size = self._regions.shape[1]
        if flat.shape != (size,):
            raise ValueError(
                f"expected a flat vector of {size} elements, got shape {flat.shape}"
            )
        ptr = flat.__array_interface__["data"][0]
        for slot in (THETA_A, THETA_B):
            region = self._regions[slot]
            same = ptr == region.__array_interface__["data"][0]
            if same and flat.dtype == np.float32 and flat.strides == (4,):
                return slot
        np.copyto(self._regions[SCRATCH], flat, casting="same_kind")
        return SCRATCH

    def _call(self, request: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            if self._closed:
                raise ValidationWorkerError("validation worker is closed")
            stdin, stdout = self._proc.stdin, self._proc.stdout
            assert stdin is not None and stdout is not None
            reply = _exchange(self._proc, stdin, stdout, request, None)
        if "error" in reply:
            raise ValidationWorkerError(
                f"validation worker (pid {self.pid}): {reply['error']}"
            )
        return reply

    def close(self) -> None:
        """Stop the worker (EOF on its input, then SIGKILL if it lingers)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            _stop(self._proc)


def _exchange(
    proc: subprocess.Popen[bytes],
    stdin: IO[bytes],
    stdout: IO[bytes],
    request: dict[str, Any],
    timeout_s: float | None,
) -> dict[str, Any]:
    """Send one JSON line, read one back; a dead worker raises with its exit code."""
    try:
        stdin.write(json.dumps(request).encode() + b"\n")
        stdin.flush()
    except (BrokenPipeError, OSError):
        line = b""
    else:
        line = _readline(stdout, timeout_s)
    if not line:
        try:
            code = proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            code = None
        raise WorkerDiedError(
            f"validation worker (pid {proc.pid}) exited with code {code}; "
            "its log is above"
        )
    reply: dict[str, Any] = json.loads(line)
    return reply


def _readline(stdout: IO[bytes], timeout_s: float | None) -> bytes:
    if timeout_s is None:
        return stdout.readline()
    box: list[bytes] = []
    reader = threading.Thread(target=lambda: box.append(stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout_s)
    if reader.is_alive():
        raise ValidationWorkerError(
            f"validation worker did not start within {timeout_s:g} s"
        )
    return box[0]


def _stop(proc: subprocess.Popen[bytes]) -> None:
    for stream in (proc.stdin, proc.stdout):
        if stream is not None:
            with contextlib.suppress(OSError):
                stream.close()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
