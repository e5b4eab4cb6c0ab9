"""Party processes forked from one parent that has already imported torch.

``fedgrpc simulate`` starts N parties on one machine. As N ``fedgrpc client``
processes each of them imports torch (about 2.7 s of CPU each, 13 s for five on two
cores) before it can join. Here the parent imports the party code once
(:func:`preload`) and forks one process per party: each child is a real, separate
process with its own gRPC channel running the same :func:`run_party` loop as
``fedgrpc client``; it shares the imported modules with its parent copy-on-write.

gRPC is not fork-safe once it has started its threads, so the parent must not have
imported ``grpc`` (:func:`preload` checks it): every child imports it after the fork.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import signal
import sys
import traceback
from pathlib import Path

from fedgrpc.config import ClientConfig

log = logging.getLogger(__name__)

PRELOAD = ("torch", "fedgrpc.learning.inprocess", "fedgrpc.datasets.attacks")
"""What the parent imports before forking: the slow part of a party's start-up."""


def preload() -> None:
    """Import the party's torch code in this process, before :func:`fork_party`.

    Raises:
        RuntimeError: grpc is already imported here (forking would be unsafe).
    """
    if "grpc" in sys.modules:
        raise RuntimeError("grpc is imported: parties cannot be forked safely")
    for name in PRELOAD:
        importlib.import_module(name)


class ForkedParty:
    """A forked party process, with the part of ``subprocess.Popen`` callers use."""

    def __init__(self, pid: int, party_id: str, result_path: Path) -> None:
        self.pid = pid
        self.party_id = party_id
        self.result_path = result_path
        self.returncode: int | None = None
        self.args = f"forked party {party_id} (pid {pid})"

    def poll(self) -> int | None:
        """The exit code once the process has exited, else None."""
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid == self.pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the process to exit (polling; ``timeout`` in seconds)."""
        import subprocess
        import time

        end = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if end is not None and time.monotonic() >= end:
                raise subprocess.TimeoutExpired(self.args, timeout or 0.0)
            time.sleep(0.01)
        assert self.returncode is not None
        return self.returncode

    def _signal(self, signum: int) -> None:
        if self.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signum)

    def terminate(self) -> None:
        """SIGTERM."""
        self._signal(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL."""
        self._signal(signal.SIGKILL)

    def result(self) -> dict[str, object]:
        """The party's result (what ``fedgrpc client`` prints), or its exit code."""
        try:
            out = json.loads(self.result_path.read_text())
        except (OSError, ValueError):
            return {"reason": f"exit {self.returncode}"}
        return out if isinstance(out, dict) else {"reason": f"exit {self.returncode}"}


def fork_party(
    cfg: ClientConfig, log_path: Path, result_path: Path, *, log_level: int
) -> ForkedParty:
    """Fork a process that runs ``cfg``'s party; its output goes to ``log_path``.

    The child writes its result as JSON to ``result_path`` and exits 0 when the run
    completed, 1 when it ended otherwise, 2 on a configuration error.
    """
    result_path.unlink(missing_ok=True)
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        os.close(fd)
        return ForkedParty(pid, cfg.party_id, result_path)
    os._exit(_child(cfg, fd, result_path, log_level))  # never returns to the caller


def _child(cfg: ClientConfig, fd: int, result_path: Path, log_level: int) -> int:
    """The forked party: its own stdio, signals and logging, then the party loop."""
    code = 1
    try:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        root = logging.getLogger()
        for h in list(root.handlers):
            root.removeHandler(h)
        logging.basicConfig(
            level=log_level,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
            stream=sys.stderr,
            force=True,
        )
        from fedgrpc.client.party import run_party  # imports grpc, after the fork
        from fedgrpc.errors import FedGrpcError

        try:
            result = run_party(cfg)
        except FedGrpcError as err:
            log.error("fedgrpc client: error: %s", err)
            return 2
        doc = {
            "party_id": cfg.party_id,
            "rounds_submitted": result.rounds_submitted,
            "rounds_completed": result.rounds_completed,
            "reason": result.reason,
            "train_loss": result.last_train_loss,
        }
        result_path.write_text(json.dumps(doc) + "\n")
        code = 0 if result.reason == "completed" else 1
    except BaseException:  # the child must never return into the parent's code
        traceback.print_exc()
        code = 1
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
    return code
