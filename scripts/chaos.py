"""Chaos run: a seeded federation survives random faults and ends like a quiet one.

One `fedgrpc serve` (validation worker process) and N `fedgrpc client` processes on
loopback run a seeded ``--rounds`` federation while a seeded schedule injects, after
random committed rounds: SIGKILLs of the aggregator (restarted with ``--resume``), of
its validation worker (replaced by the aggregator; a second death stops the run
resumably and it is resumed), and of parties (restarted); a disk-full episode (the run
directory sits on a small tmpfs that is filled, then freed; root only); and a
drip-feeding party that holds an upload open with a few bytes per second. The final
model and the ledger must equal an undisturbed in-process run with the same seed.
Prints one JSON line with the faults injected and the verdict.

    python scripts/chaos.py --rounds 20 --seed 7
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
from kill_resume import ENV, FEDGRPC, _committed, _ledger, _wait_port, _wait_ready

from fedgrpc import wire
from fedgrpc.config import RoundConfig
from fedgrpc.datasets.sources import load_dataset
from fedgrpc.learning.inprocess import run_in_process
from fedgrpc.learning.validation import config_for_data
from fedgrpc.proto import aggregator_pb2, aggregator_pb2_grpc
from fedgrpc.store.checkpoint import load_arrays
from fedgrpc.types import UpdateKind

RTOL, ATOL = 1e-4, 1e-5
KINDS = ("aggregator", "worker", "party", "drip")


def _start(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as f:
        return subprocess.Popen(
            [*FEDGRPC, *args], stdout=f, stderr=subprocess.STDOUT, env=ENV
        )


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(c) for c in text.split()]


def _drip(port: int, stop: threading.Event) -> None:
    """Join as ``drip`` and feed the open round's upload 4 bytes every second."""
    with grpc.insecure_channel(f"localhost:{port}") as ch:
        stub = aggregator_pb2_grpc.AggregatorStub(ch)
        submit: grpc.StreamUnaryMultiCallable[bytes, aggregator_pb2.SubmitReply]
        submit = ch.stream_unary(
            "/fedgrpc.v1.Aggregator/SubmitGradient",
            request_serializer=None,
            response_deserializer=aggregator_pb2.SubmitReply.FromString,
        )
        try:
            reply = stub.Join(
                aggregator_pb2.JoinRequest(party_id="drip", num_samples=1), timeout=10
            )
            st = stub.GetStatus(aggregator_pb2.StatusRequest(), timeout=10)
        except grpc.RpcError:
            return
        specs = wire.join_reply_from_proto(reply).specs
        bundle = wire.prepare_bundle(
            (s.name, np.zeros(s.shape, np.float32)) for s in specs
        )
        header = aggregator_pb2.SubmitMessage(
            header=aggregator_pb2.SubmitHeader(
                party_id="drip",
                round=st.open_round,
                num_samples=1,
                update_kind=aggregator_pb2.DELTA,
                submission_id="drip",
            )
        )

        def messages() -> Iterator[bytes]:
            yield header.SerializeToString()
            for msg in bundle.messages(chunk_bytes=4):
                if stop.wait(1.0):
                    return
                yield msg

        # Discarded as too slow, or its round closed: as intended.
        with contextlib.suppress(grpc.RpcError):
            submit(messages(), timeout=120)


class Chaos:
    """The processes of one chaos run and the faults injected into them."""

    def __init__(self, a: argparse.Namespace, work: Path, data: Path, run: Path):
        self.a, self.work, self.data, self.run = a, work, data, run
        self.log = work / "server.log"
        self.port = 0
        self.server: subprocess.Popen[bytes] | None = None
        self.parties: dict[int, subprocess.Popen[bytes]] = {}
        self.faults: dict[str, int] = dict.fromkeys((*KINDS, "disk_full"), 0)
        self.resumes = 0
        self.drips: list[tuple[threading.Thread, threading.Event]] = []

    def flags(self) -> list[str]:
        # Not stored in the ledger: every (re)start passes them.
        return ["--upload-grace", "3", "--upload-min-rate", "20000"]

    def serve(self, resume: bool) -> None:
        port_file = self.work / "port"
        port_file.unlink(missing_ok=True)
        address = f"localhost:{self.port}"
        if resume:
            args = [
                "serve",
                "--insecure",
                "--address",
                address,
                "--resume",
                str(self.run),
            ]
        else:
            args = [
                "serve", "--insecure", "--address", address, "--run-dir",
                str(self.run), "--val-data", f"npz:{self.data / 'val.npz'}",
                "--rounds", str(self.a.rounds), "--update-kind", "delta",
                "--lr", "0.1", "--batch-size", "16", "--model", "mlp",
                "--hidden", "32", "--seed", str(self.a.seed),
                "--min-parties", str(self.a.parties), "--round-timeout",
                str(self.a.round_timeout), "--quorum-retries", "50",
            ]  # fmt: skip
        self.server = _start(
            [*args, "--port-file", str(port_file), *self.flags()], self.log
        )
        self.port = _wait_port(port_file)
        _wait_ready(self.port)

    def party(self, p: int) -> None:
        self.parties[p] = _start(
            [
                "client",
                "--insecure",
                "--server",
                f"localhost:{self.port}",
                "--party-id",
                f"party-{p}",
                "--data",
                f"npz:{self.data / f'party-{p}.npz'}",
                "--connect-timeout",
                "600",
            ],
            self.work / f"party-{p}.log",
        )

    def ensure_server(self) -> None:
        """Resume a run that stopped resumably (exit 1 before the last round)."""
        assert self.server is not None
        if self.server.poll() is not None and _committed(self.run) < self.a.rounds:
            self.resumes += 1
            self.serve(resume=True)

    def inject(self, kind: str, rng: random.Random) -> None:
        assert self.server is not None
        self.faults[kind] += 1
        if kind == "aggregator":
            self.server.send_signal(signal.SIGKILL)
            self.server.wait(timeout=10)
            self.resumes += 1
            self.serve(resume=True)
        elif kind == "worker":
            for child in _children(self.server.pid):
                os.kill(child, signal.SIGKILL)
        elif kind == "party":
            p = rng.randrange(self.a.parties)
            self.parties[p].send_signal(signal.SIGKILL)
            self.parties[p].wait(timeout=10)
            self.party(p)
        elif kind == "drip":
            stop = threading.Event()
            t = threading.Thread(target=_drip, args=(self.port, stop), daemon=True)
            t.start()
            self.drips.append((t, stop))

    def disk_full(self, mnt: Path) -> bool:
        """Fill the run's file system until the run stops naming ENOSPC; free it."""
        assert self.server is not None
        self.faults["disk_full"] += 1
        filler = mnt / "filler"
        with filler.open("wb", buffering=0) as f:
            try:
                while True:
                    f.write(b"\0" * 65536)
            except OSError:
                pass
        try:
            self.server.wait(timeout=4 * self.a.round_timeout + 60)
            named = "ENOSPC" in self.log.read_text(errors="replace")
        except subprocess.TimeoutExpired:
            named = False
        filler.unlink()
        self.ensure_server()
        return named

    def stop(self) -> None:
        for _, ev in self.drips:
            ev.set()
        for proc in [self.server, *self.parties.values()]:
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--parties", type=int, default=3)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--faults", type=int, default=8, help="faults besides disk full")
    ap.add_argument("--round-timeout", type=float, default=20.0)
    a = ap.parse_args()
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="chaos-") as tmp:
        work = Path(tmp)
        data = work / "data"
        subprocess.run(
            [*FEDGRPC, "split", "--parties", str(a.parties), "--val-holdout", "300",
             "--seed", str(a.seed), "--out", str(data)],
            check=True, env=ENV, capture_output=True,
        )  # fmt: skip
        parties = {
            f"party-{p}": load_dataset(f"npz:{data / f'party-{p}.npz'}")
            for p in range(a.parties)
        }
        val = load_dataset(f"npz:{data / 'val.npz'}")
        cfg = config_for_data(
            RoundConfig(
                rounds=a.rounds, min_parties=a.parties, update_kind=UpdateKind.DELTA,
                lr=0.1, batch_size=16, model="mlp", model_hidden=32, seed=a.seed,
            ),
            val,
        )  # fmt: skip
        engine, results = run_in_process(cfg, parties, val)

        mnt = work / "small"
        mnt.mkdir()
        mounted = (
            os.geteuid() == 0
            and subprocess.run(
                ["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mnt)],
                capture_output=True,
                check=False,
            ).returncode
            == 0
        )
        run = mnt / "run"
        chaos = Chaos(a, work, data, run)
        rng = random.Random(a.seed)
        # Each fault fires once its round has been committed; disk full mid-run.
        schedule = sorted(
            (rng.randrange(1, a.rounds - 1), rng.choice(KINDS)) for _ in range(a.faults)
        )
        disk_at = a.rounds // 2 if mounted else -1
        named_enospc = None
        try:
            chaos.serve(resume=False)
            for p in range(a.parties):
                chaos.party(p)
            end = time.monotonic() + 1800
            pending = list(schedule)
            while time.monotonic() < end:
                done = _committed(run)
                if done >= a.rounds:
                    break
                chaos.ensure_server()
                if pending and done >= pending[0][0]:
                    chaos.inject(pending.pop(0)[1], rng)
                elif disk_at >= 0 and done >= disk_at:
                    named_enospc = chaos.disk_full(mnt)
                    disk_at = -1
                time.sleep(0.05)
            assert chaos.server is not None
            server_code = chaos.server.wait(timeout=120)
            party_codes = [p.wait(timeout=300) for p in chaos.parties.values()]
            arrays, _ = load_arrays(run / "final_model.npz")
            got = np.concatenate(
                [arrays[s.name].reshape(-1) for s in engine.layout.specs]
            )
            rounds, scores = _ledger(run)
        finally:
            chaos.stop()
            if mounted:
                subprocess.run(["umount", "-l", str(mnt)], check=False)
    want = {(r.round, p.party_id): p.score for r in results for p in r.parties}
    model_equal = bool(np.allclose(got, engine.theta, rtol=RTOL, atol=ATOL))
    ledger_equal = (
        sorted(rounds) == list(range(a.rounds))
        and all(s == "ok" for s, _ in rounds.values())
        and set(scores) == set(want)
        and all(abs(scores[k] - v) <= 1e-3 * abs(v) + 1e-6 for k, v in want.items())
    )
    row = {
        "rounds": a.rounds,
        "seed": a.seed,
        "faults_injected": chaos.faults,
        "faults_total": sum(chaos.faults.values()),
        "disk_full_named_enospc": named_enospc,
        "resumes": chaos.resumes,
        "server_exit": server_code,
        "party_exits": party_codes,
        "max_abs_model_diff": float(np.max(np.abs(got - engine.theta))),
        "model_equal": model_equal,
        "ledger_equal": ledger_equal,
        "elapsed_s": round(time.monotonic() - t0, 1),
    }
    print(json.dumps(row), flush=True)
    return 0 if model_equal and ledger_equal else 1


if __name__ == "__main__":
    raise SystemExit(main())
