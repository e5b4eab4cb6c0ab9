"""``fedgrpc simulate`` with the processes and the Ray backend, interleaved, vs N.

For each N (and each rep) the backends run one after the other, so both see the same
machine. Per run, from outside through ``python -m fedgrpc``:

* ``wall_s``: launch to exit;
* ``startup_s``: launch to the aggregator's "round 0 open" (its log's timestamp): the
  split, the aggregator, Ray and its actors or the forks, and every party's Join;
* ``round_s``: the median round duration (the aggregator's "round N closed" lines);
* ``cpu_s``: CPU seconds (user + system) of the aggregator, the parties (forked
  processes or Ray actors, with the ``simulate`` process), the validation worker and
  Ray's own processes, sampled from ``/proc``;
* ``val_acc``, ``state``; the 1-minute load average before and after.

One JSON line per run, then a summary table. The processes backend is skipped above
``--max-processes`` parties (one process each).

    python scripts/bench_backends.py --parties 10,100,1000 --rounds 5
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench_common import proc_cpu_s

ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
ROUND0 = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) .*round 0 open", re.M)
CLOSED = re.compile(r"round \d+ closed: .*, ([\d.]+) s$", re.M)


def _stamp(text: str) -> float:
    return dt.datetime.strptime(text, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def _kind(cmd: str) -> str:
    """Which part of a simulation a process is, by its command line."""
    if " serve " in cmd:
        return "aggregator"
    if "fedgrpc.learning.worker" in cmd:
        return "validation"
    if "ray::PartyHost" in cmd or " simulate " in cmd or " client " in cmd:
        return "parties"  # forked parties keep simulate's command line
    return "ray"  # raylet, gcs_server, idle workers, agents


class CpuSampler:
    """CPU seconds of a process tree, by part, sampled from /proc every 0.2 s.

    Each process counts with the largest user+system time seen for it; a process
    that lives less than a period is missed (none of the parts does).
    """

    def __init__(self, root: int) -> None:
        self.root = root
        self.seen: dict[int, tuple[str, float]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _tree(self) -> set[int]:
        parents = {}
        for d in Path("/proc").iterdir():
            if d.name.isdigit():
                with contextlib.suppress(OSError, IndexError, ValueError):
                    stat = (d / "stat").read_text().rsplit(")", 1)[1].split()
                    parents[int(d.name)] = int(stat[1])
        tree, todo = {self.root}, [self.root]
        while todo:
            pid = todo.pop()
            kids = [c for c, pp in parents.items() if pp == pid and c not in tree]
            tree.update(kids)
            todo += kids
        return tree

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            for pid in self._tree():
                try:
                    cpu = proc_cpu_s(pid)
                    cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
                except OSError:
                    continue
                kind = _kind(" " + cmd.replace(b"\0", b" ").decode(errors="replace"))
                # The last specific kind wins: a zombie's command line is empty, and
                # a child seen before its exec still has its parent's.
                was, prev = self.seen.get(pid, (kind, 0.0))
                self.seen[pid] = (kind if kind != "ray" else was, max(cpu, prev))

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join()
        out: dict[str, float] = {}
        for kind, cpu in self.seen.values():
            out[kind] = out.get(kind, 0.0) + cpu
        return {k: round(v, 1) for k, v in sorted(out.items())}


def run_once(
    backend: str, n: int, rounds: int, timeout_s: float, actors: int = 0
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "sim"
        cmd = [sys.executable, "-m", "fedgrpc", "simulate", "--backend", backend]
        cmd += ["--parties", str(n), "--rounds", str(rounds), "--format", "json"]
        cmd += ["-q", "--run-dir", str(run_dir)]
        if backend == "ray" and actors:
            cmd += ["--ray-actors", str(actors)]
        load0 = os.getloadavg()[0]
        t0_wall = time.time()
        t0 = time.monotonic()
        # cwd: the temporary directory, so no checkout there can shadow the package.
        proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=ENV,
            cwd=tmp,
        )
        sampler = CpuSampler(proc.pid)
        try:
            stdout, stderr = proc.communicate(timeout=timeout_s)
        finally:
            proc.kill()
            cpu = sampler.stop()
        wall = time.monotonic() - t0
        out: dict[str, Any] = {
            "backend": backend,
            "parties": n,
            "actors": actors if backend == "ray" else None,
            "rounds": rounds,
            "exit": proc.returncode,
            "cpu_s": cpu,
            "wall_s": round(wall, 2),
            "load_before": round(load0, 2),
            "load_after": round(os.getloadavg()[0], 2),
        }
        log = run_dir / "server.log"
        text = log.read_text() if log.is_file() else ""
        m = ROUND0.search(text)
        out["startup_s"] = round(_stamp(m.group(1)) - t0_wall, 2) if m else None
        durations = [float(d) for d in CLOSED.findall(text)]
        out["round_s"] = round(statistics.median(durations), 2) if durations else None
        try:
            summary = json.loads(stdout)
        except ValueError:
            out["error"] = (stderr or stdout)[-500:]
            return out
        out.update(
            state=summary["state"],
            rounds_done=summary["rounds_done"],
            val_acc=round(summary["val_acc"], 4),
        )
        return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parties", default="10,100,1000")
    ap.add_argument("--backends", default="processes,ray")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--max-processes", type=int, default=100)
    ap.add_argument("--timeout", type=float, default=900.0)
    ap.add_argument(
        "--ray-actors", default="0", help="comma-separated; 0 = one per core"
    )
    a = ap.parse_args()
    print(
        json.dumps(
            {
                "machine": platform.platform(),
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            }
        ),
        flush=True,
    )
    rows = []
    for n in (int(x) for x in a.parties.split(",")):
        for _ in range(a.reps):
            for backend in a.backends.split(","):
                if backend == "processes" and n > a.max_processes:
                    continue
                pools = a.ray_actors.split(",") if backend == "ray" else ["0"]
                for actors in (int(k) for k in pools):
                    row = run_once(backend, n, a.rounds, a.timeout, actors)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    print()
    print(
        "| N | backend | wall s | start-up s | round s | acc | CPU s (aggregator / "
        "parties / validation / ray) | load before/after |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['parties']} | {r['backend']}"
            + (f" ({r['actors']} actors)" if r["actors"] else "")
            + f" | {r['wall_s']} | {r['startup_s']} | "
            f"{r.get('round_s')} | {r.get('val_acc')} | "
            + " / ".join(
                str(r["cpu_s"].get(k, 0))
                for k in ("aggregator", "parties", "validation", "ray")
            )
            + f" | {r['load_before']}/{r['load_after']} |"
        )
    return 0 if all(r["exit"] == 0 for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
