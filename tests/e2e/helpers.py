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

from fedgrpc.config import RoundConfig
from fedgrpc.datasets.sources import Dataset, load_dataset
from fedgrpc.engine import RoundEngine
from fedgrpc.learning.inprocess import run_in_process
from fedgrpc.learning.validation import config_for_data
from fedgrpc.store.checkpoint import load_arrays
from fedgrpc.types import RoundResult, UpdateKind

FEDGRPC = [sys.executable, "-m", "fedgrpc"]
CONSOLE_SCRIPT = Path(sys.executable).parent / "fedgrpc"  # as installed by pip
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

    def start(
        self,
        args: Sequence[str],
        log: Path,
        *,
        console: bool = False,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> subprocess.Popen[bytes]:
        """``fedgrpc ARGS`` (``python -m``, or the console script with ``console``)."""
        cmd = [str(CONSOLE_SCRIPT)] if console else FEDGRPC
        f = log.open("ab")
        p = subprocess.Popen(
            [*cmd, *args],
            stdout=f,
            stderr=subprocess.STDOUT,
            env=ENV if env is None else env,
            cwd=cwd,
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


def _proc_stat(pid: int | str) -> tuple[str, int] | None:
    """(state, parent pid) of a process from /proc, or None if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return fields[0], int(fields[1])


def running(pid: int) -> bool:
    """True while ``pid`` exists and has not exited (a zombie has)."""
    st = _proc_stat(pid)
    return st is not None and st[0] != "Z"


def child_pids(parent: int, cmd_contains: bytes = b"") -> list[int]:
    """Running children of ``parent`` whose command line contains ``cmd_contains``."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        st = _proc_stat(entry.name)
        if st is None or st[0] == "Z" or st[1] != parent:
            continue
        try:
            cmd = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if cmd_contains in cmd:
            out.append(int(entry.name))
    return out


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


# The seeded run the multi-process tests share; its gRPC result must equal the
# in-process reference run.
SEEDED_TRAIN = [
    "--rounds",
    "6",
    "--update-kind",
    "delta",
    "--lr",
    "0.1",
    "--batch-size",
    "16",
    "--model",
    "mlp",
    "--hidden",
    "32",
    "--seed",
    "7",
]


def seeded_round_cfg(n_parties: int, rounds: int = 6) -> RoundConfig:
    """The RoundConfig of SEEDED_TRAIN, for the in-process reference run."""
    return RoundConfig(
        rounds=rounds,
        min_parties=n_parties,
        update_kind=UpdateKind.DELTA,
        lr=0.1,
        batch_size=16,
        model="mlp",
        model_hidden=32,
        seed=7,
    )


def split_digits(tmp_path: Path, n_parties: int, *extra: str) -> Path:
    """`fedgrpc split` of digits into ``n_parties`` (seed 7, 300 held out)."""
    out = tmp_path / "data"
    res = run_cli(
        [
            "split",
            "--data",
            "digits",
            "--parties",
            str(n_parties),
            "--val-holdout",
            "300",
            "--seed",
            "7",
            "--out",
            str(out),
            *extra,
        ]
    )
    assert res.returncode == 0, res.stderr
    return out


def reference_run(data: Path, n_parties: int) -> tuple[RoundEngine, list[RoundResult]]:
    """The in-process run of SEEDED_TRAIN on the parties ``split_digits`` wrote."""
    parties, val = load_parties(data, n_parties)
    return run_in_process(
        config_for_data(seeded_round_cfg(n_parties), val), parties, val
    )


def seeded_serve_args(
    run_dir: Path,
    data: Path,
    port_file: Path,
    address: str = "localhost:0",
    n_parties: int = 3,
) -> list[str]:
    """`fedgrpc serve` arguments for the seeded run on ``split_digits`` data."""
    return [
        "serve",
        "--insecure",
        "--address",
        address,
        "--port-file",
        str(port_file),
        "--run-dir",
        str(run_dir),
        "--val-data",
        f"npz:{data / 'val.npz'}",
        "--min-parties",
        str(n_parties),
        "--round-timeout",
        "60",
        "--grace-period",
        "0",
        *SEEDED_TRAIN,
    ]


def party_args(server: str, i: int, data: Path) -> list[str]:
    """`fedgrpc client` arguments for party ``i`` of ``split_digits`` data."""
    return [
        "client",
        "--insecure",
        "--server",
        server,
        "--party-id",
        f"party-{i}",
        "--data",
        f"npz:{data / f'party-{i}.npz'}",
        "--connect-timeout",
        "60",
    ]
