"""Process helpers for e2e tests: every wait has a timeout, children die in finally."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from fedgrpc.checkpoint import load_arrays
from fedgrpc.datasets.sources import Dataset, load_dataset

FEDGRPC = [sys.executable, "-m", "fedgrpc"]
ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def run_cli(
    args: Sequence[str], *, timeout_s: float = 300, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``fedgrpc ARGS`` to completion (killed at the timeout)."""
    return subprocess.run(
        [*FEDGRPC, *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env=ENV,
        cwd=cwd,
        check=False,
    )


class Procs:
    """Started processes, all killed on exit."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, args: Sequence[str], log: Path) -> subprocess.Popen[bytes]:
        f = log.open("ab")
        p = subprocess.Popen(
            [*FEDGRPC, *args], stdout=f, stderr=subprocess.STDOUT, env=ENV
        )
        f.close()
        self.procs.append(p)
        return p

    def kill_all(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
        for p in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=10)


@contextmanager
def processes() -> Iterator[Procs]:
    """A process group for a test; everything is killed at the end."""
    procs = Procs()
    try:
        yield procs
    finally:
        procs.kill_all()


def wait_for(
    predicate: Callable[[], object], timeout_s: float, what: str, poll_s: float = 0.05
) -> None:
    """Poll ``predicate()`` until true; fail the test after ``timeout_s``."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")


def wait_exit(p: subprocess.Popen[bytes], timeout_s: float, log: Path) -> int:
    """Wait for a process; on timeout fail with the tail of its log."""
    try:
        return p.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired as exc:
        tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
        raise AssertionError(
            f"process {p.args!r} did not exit in {timeout_s:g} s:\n{tail}"
        ) from exc


def read_port(port_file: Path, proc: subprocess.Popen[bytes], log: Path) -> int:
    """The port a server wrote to its port file."""

    def ready() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"server exited early:\n{log.read_text()[-3000:]}")
        return port_file.is_file() and bool(port_file.read_text().strip())

    wait_for(ready, 60, "the server's port file")
    return int(port_file.read_text().strip())


def load_parties(data_dir: Path, n: int) -> tuple[dict[str, Dataset], Dataset]:
    """Party data sets and validation set written by ``fedgrpc split``/``simulate``."""
    parties = {
        f"party-{i}": load_dataset(f"npz:{data_dir / f'party-{i}.npz'}")
        for i in range(n)
    }
    return parties, load_dataset(f"npz:{data_dir / 'val.npz'}")


def final_model(run_dir: Path) -> dict[str, np.ndarray]:
    """The aggregator's final model file."""
    arrays, _ = load_arrays(run_dir / "final_model.npz")
    return arrays
