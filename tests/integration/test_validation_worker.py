"""The validation worker process: same numbers as in-process, no torch in the server."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from fedgrpc.client.party import run_party
from fedgrpc.config import RoundConfig, ServerConfig, round_config_to_json
from fedgrpc.datasets.sources import load_dataset, subset
from fedgrpc.errors import ConfigError
from fedgrpc.learning.validation import local_validation
from fedgrpc.server.app import Aggregator
from fedgrpc.server.validation import (
    RemoteValidator,
    ValidationWorkerError,
    open_validation,
    shm_dirs,
)
from fedgrpc.store.ledger import LEDGER_FILE, Ledger
from fedgrpc.types import RunState
from tests.conftest import MakeServer, client_config
from tests.e2e.helpers import child_pids, running

WORKER_CMD = b"fedgrpc.learning.worker"  # in the worker's command line
CFG = RoundConfig(rounds=2, min_parties=1, model="mlp", model_hidden=16, seed=7)


@pytest.fixture
def remote() -> Iterator[RemoteValidator]:
    rv = RemoteValidator.start(CFG, "digits", 300, None)
    yield rv
    rv.close()


def _shm_files() -> set[str]:
    return {f for f in os.listdir(shm_dirs()[0]) if f.startswith("fedgrpc-val-")}


def test_worker_matches_in_process_validation(remote: RemoteValidator) -> None:
    local = local_validation(CFG, "digits", 300, None)
    setup = remote.setup
    assert setup.specs == local.specs
    assert setup.round_cfg == local.round_cfg
    assert setup.val_digest == local.val_digest
    np.testing.assert_array_equal(setup.theta0, local.theta0)
    assert setup.theta_buffers is not None
    theta_a, theta_b = setup.theta_buffers
    rng = np.random.default_rng(0)
    theta_b[:] = local.theta0 + 0.05 * rng.standard_normal(local.theta0.size).astype(
        np.float32
    )
    foreign = theta_b.copy() * 0.5  # not a shared buffer: goes through scratch
    for flat in (theta_a, theta_b, foreign):
        v, loss, acc = remote.gradient(flat)
        v_ref, loss_ref, acc_ref = local.validator.gradient(flat.copy())
        np.testing.assert_allclose(v, v_ref, rtol=1e-6, atol=1e-9)
        assert loss == pytest.approx(loss_ref, rel=1e-6)
        assert acc == acc_ref
        assert remote.evaluate(flat) == pytest.approx(
            local.validator.evaluate(flat.copy()), rel=1e-6
        )
    assert not v.flags.writeable  # the worker's output region is read-only here


def test_worker_torch_uses_one_thread_whatever_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The worker sets its threads itself: nobody has to remember OMP_NUM_THREADS,
    # and a value left in the environment does not change them.
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    rv = RemoteValidator.start(CFG, "digits", 300, None)
    try:
        threads = rv.torch_threads
        flat = rv.setup.theta0.copy()
        rv.gradient(flat)  # a pass works with them
    finally:
        rv.close()

    assert threads == (1, 1)


def test_shared_file_is_unlinked_and_worker_exits_on_close() -> None:
    before = _shm_files()
    rv = RemoteValidator.start(CFG, "digits", 100, None)
    try:
        assert _shm_files() == before  # mapped by both, unlinked at once
        assert Path(f"/proc/{rv.pid}").exists()
    finally:
        rv.close()
    deadline = time.monotonic() + 10
    while Path(f"/proc/{rv.pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not Path(f"/proc/{rv.pid}").exists()


def test_worker_config_error_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="nope"):
        open_validation("process", CFG, "npz:/nope/missing.npz", 0, None)
    with pytest.raises(ConfigError, match="validator must be one of"):
        open_validation("gpu", CFG, "digits", 0, None)


def test_dead_worker_raises_a_named_error(remote: RemoteValidator) -> None:
    os.kill(remote.pid, signal.SIGKILL)
    theta = remote.setup.theta0
    with pytest.raises(ValidationWorkerError, match=r"exited with code -9"):
        remote.gradient(theta)
    with pytest.raises(ValidationWorkerError):  # and keeps saying so
        remote.evaluate(theta)


def test_process_and_thread_validators_give_the_same_run(
    make_server: MakeServer, tmp_path: Path
) -> None:
    data = load_dataset("digits")
    parts = [subset(data, np.arange(i, 400, 2)) for i in range(2)]
    finals = {}
    for kind in ("process", "thread"):
        agg = make_server(
            server={"validator": kind},
            run_dir=tmp_path / kind,
            rounds=3,
            min_parties=2,
            expected_parties=2,
            model="mlp",
            model_hidden=16,
            update_kind="delta",
            local_steps=2,
        )
        threads = [
            threading.Thread(
                target=run_party,
                args=(client_config(agg, f"p{i}"), parts[i]),
            )
            for i in range(2)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert agg.wait(60) and agg.engine.state == RunState.DONE, agg.engine.reason
        finals[kind] = (
            agg.engine.theta.copy(),
            [
                (r.val_loss_before, r.val_loss_after, [p.score for p in r.parties])
                for r in agg.ledger.rounds()
            ],
        )
    np.testing.assert_allclose(finals["process"][0], finals["thread"][0], rtol=1e-6)
    for a, b in zip(finals["process"][1], finals["thread"][1], strict=True):
        np.testing.assert_allclose(a[0:2], b[0:2], rtol=1e-6)
        np.testing.assert_allclose(a[2], b[2], rtol=1e-5, atol=1e-9)


def test_killed_worker_stops_the_run_with_its_reason(
    make_server: MakeServer,
) -> None:
    agg = make_server(
        server={"validator": "process", "worker_restarts": 0}, rounds=3, min_parties=1
    )
    assert agg.validation is not None
    pid = agg.validation.pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    agg.engine.join("p0", 10)  # opens round 0: v_0 is requested from the dead worker
    assert agg.wait(30)
    assert agg.engine.state == RunState.FAILED
    assert "validation worker" in agg.engine.reason
    assert "exited with code -9" in agg.engine.reason


def _aggregator_script(run_dir: Path, then: str) -> str:
    """A Python program that builds an insecure Aggregator (worker validator), then
    runs ``then``."""
    return textwrap.dedent(
        f"""
        import sys, time
        from pathlib import Path
        from fedgrpc.config import RoundConfig, ServerConfig
        from fedgrpc.server.app import Aggregator
        cfg = ServerConfig(
            round=RoundConfig(rounds=1, model="logreg"),
            address="localhost:0",
            run_dir=Path({str(run_dir)!r}),
            insecure=True,
        )
        agg = Aggregator(cfg)
        """
    ) + textwrap.dedent(then)


def test_aggregator_process_does_not_import_torch(tmp_path: Path) -> None:
    script = _aggregator_script(
        tmp_path / "run",
        """
        agg.start()
        print("torch" in sys.modules, "sklearn" in sys.modules, agg.validation.pid)
        agg.shutdown(grace_s=0.1, save_open_round=False)
        """,
    )
    out = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout.split()
    assert out[:2] == ["False", "False"]
    assert int(out[2]) > 0


def test_server_config_rejects_unknown_validator() -> None:
    with pytest.raises(ConfigError, match="validator must be one of"):
        ServerConfig(insecure=True, validator="gpu")


def _worker_children() -> list[int]:
    return child_pids(os.getpid(), WORKER_CMD)


def _no_worker_children() -> bool:
    deadline = time.monotonic() + 10
    while _worker_children() and time.monotonic() < deadline:
        time.sleep(0.05)
    return _worker_children() == []


def test_aggregator_start_failure_stops_the_worker(tmp_path: Path) -> None:
    """A failure after the worker started (here: --resume of a run without a
    committed checkpoint) stops it; a bad parties file fails before one starts."""
    bad_parties = ServerConfig(
        round=RoundConfig(rounds=1, model="mlp"),
        address="localhost:0",
        run_dir=tmp_path / "run",
        insecure=True,
        parties_file=tmp_path / "missing.toml",
    )
    with pytest.raises(ConfigError, match=r"missing\.toml"):
        Aggregator(bad_parties)
    assert _no_worker_children()

    run_dir = tmp_path / "resume"
    run_dir.mkdir()
    ledger = Ledger(run_dir / LEDGER_FILE)
    config = {
        "round": round_config_to_json(RoundConfig(rounds=1, model="mlp")),
        "val_data": "digits",
        "val_count": 100,
    }
    ledger.start_run("norun", config, "digest")  # no resume pointer committed
    ledger.close()
    agg = Aggregator(
        ServerConfig(address="localhost:0", run_dir=run_dir, insecure=True, resume=True)
    )
    try:
        with pytest.raises(ConfigError, match="no committed checkpoint"):
            agg.start()
        assert agg.validation is not None and agg.validation.pid  # it had started
        assert _no_worker_children()  # and start() stopped it, not just shutdown()
    finally:
        agg.shutdown(grace_s=0.1, save_open_round=False)
    assert _no_worker_children()


def test_worker_exits_when_the_aggregator_is_killed(tmp_path: Path) -> None:
    script = _aggregator_script(
        tmp_path / "run",
        """
        agg.start()
        print(agg.validation.pid, flush=True)
        time.sleep(600)
        """,
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        worker = int(proc.stdout.readline())
        assert Path(f"/proc/{worker}").exists()
        proc.kill()  # SIGKILL: no clean-up code runs in the aggregator
        proc.wait(timeout=10)
        deadline = time.monotonic() + 15
        while running(worker) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not running(worker), "validation worker outlived its aggregator"
    finally:
        proc.kill()


def test_shared_file_falls_back_to_the_next_directory(tmp_path: Path) -> None:
    rv = RemoteValidator.start(
        CFG, "digits", 100, None, dirs=[str(tmp_path / "missing"), str(tmp_path)]
    )
    try:
        theta = rv.setup.theta0
        assert np.isfinite(rv.gradient(theta)[1])
        assert list(tmp_path.iterdir()) == []  # unlinked once mapped
    finally:
        rv.close()


def test_no_room_for_the_shared_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"cannot reserve .* shared buffers"):
        RemoteValidator.start(CFG, "digits", 100, None, dirs=[str(tmp_path / "no")])


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_too_small_tmpfs_falls_back_instead_of_crashing(tmp_path: Path) -> None:
    """Docker's /dev/shm is 64 MiB: a model that does not fit must not SIGBUS."""
    tiny, disk = tmp_path / "tiny", tmp_path / "disk"
    tiny.mkdir()
    disk.mkdir()
    mount = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(tiny)],
        capture_output=True,
        text=True,
    )
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mount.stderr.strip()}")
    try:
        big = RoundConfig(rounds=1, model="mlp", model_hidden=2048)  # 0.6 MB/region
        rv = RemoteValidator.start(
            big, "digits", 100, None, dirs=[str(tiny), str(disk)]
        )
        try:
            v, loss, _ = rv.gradient(rv.setup.theta0)
            assert np.isfinite(loss) and np.isfinite(v).all()
            assert list(tiny.iterdir()) == [] and list(disk.iterdir()) == []
        finally:
            rv.close()
    finally:
        subprocess.run(["umount", str(tiny)], check=False)
