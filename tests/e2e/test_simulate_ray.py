"""``simulate --backend ray``: virtual parties on Ray actors, real aggregator.

The tests that need Ray skip when it is missing (CI installs the ``ray`` extra, and
``.ci/run`` checks that it did); the missing-Ray error is tested everywhere.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.e2e.helpers import ENV, final_model, run_cli

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

needs_ray = pytest.mark.skipif(
    importlib.util.find_spec("ray") is None,
    reason="Ray is not installed: pip install 'fedgrpc[ray]' (CI installs it)",
)

N_PARTIES = 24  # more than 2 x TABLE_TOP + 1: the table is summarised
ROUNDS = 2
ARGS = ["--parties", str(N_PARTIES), "--rounds", str(ROUNDS), "--seed", "3"]
ARGS += ["--attack", "5=label-flip:1.0", "--attack", "9=scale:-1"]


def _offline_prefix() -> list[str]:
    """A command prefix that runs its command without a network (loopback only).

    ``unshare -n``: a new network namespace holding only ``lo``. Empty where that is
    not permitted (an unprivileged container); the run then has the network.
    """
    probe = ["unshare", "-n", "sh", "-c", "ip link set lo up"]
    try:
        ok = subprocess.run(probe, capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        ok = False
    return (
        ["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$0" "$@"']
        if ok
        else []
    )


@pytest.fixture(scope="module")
def ray_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    run_dir = tmp_path_factory.mktemp("ray") / "sim"
    # Without a network where possible: Ray must need nothing from outside.
    res = subprocess.run(
        [*_offline_prefix(), sys.executable, "-m", "fedgrpc", "simulate", "--backend",
         "ray", "--ray-actors", "2", *ARGS, "--run-dir", str(run_dir)],
        capture_output=True,
        text=True,
        timeout=240,
        env=ENV,
        check=False,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    return run_dir, res.stdout


@needs_ray
def test_simulate_ray_runs_real_parties_and_prints_summarised_table(
    ray_run: tuple[Path, str],
) -> None:
    run_dir, out = ray_run

    summary = json.loads((run_dir / "contributions.json").read_text())
    assert summary["state"] == "done" and summary["rounds_done"] == ROUNDS
    assert len(summary["parties"]) == N_PARTIES
    assert {p["reason"] for p in summary["parties"].values()} == {"completed"}
    assert {p["rounds_submitted"] for p in summary["parties"].values()} == {ROUNDS}
    # The parties ran in two Ray actors, each hosting half of them, and joined the
    # real aggregator over gRPC (its ledger has every one).
    logs = sorted(run_dir.glob("ray-actor-*.log"))
    assert len(logs) == 2
    joined = [
        set(re.findall(r"party (party-\d+) joined run", p.read_text())) for p in logs
    ]
    assert [len(j) for j in joined] == [N_PARTIES // 2] * 2
    assert joined[0] | joined[1] == {f"party-{i}" for i in range(N_PARTIES)}
    assert "24 virtual parties on 2 Ray actors" in out
    assert "final validation accuracy" in out
    # Top 10 and bottom 10 with their ranks, the 4 between counted; the
    # sign-flipped update ranks last.
    rows = re.findall(r"^ *(\d+)  (party-\d+) ", out, flags=re.M)
    assert [int(r) for r, _ in rows] == [*range(1, 11), *range(15, 25)]
    assert "4 parties ranked 11-14 not shown" in out
    assert rows[-1][1] == "party-9"


@needs_ray
def test_simulate_ray_final_model_matches_processes_backend(
    ray_run: tuple[Path, str], tmp_path: Path
) -> None:
    run_dir, _ = ray_run

    res = run_cli(
        ["simulate", "--backend", "processes", *ARGS, "--run-dir",
         str(tmp_path / "sim")],
        timeout_s=240,
    )  # fmt: skip

    assert res.returncode == 0, res.stdout + res.stderr
    want = final_model(tmp_path / "sim" / "server")
    got = final_model(run_dir / "server")
    assert set(got) == set(want)
    # Same parties, data, seeds and updates, but not bitwise: the aggregator's
    # float32 fold adds them in arrival order, which differs from run to run. Two
    # runs of the processes backend differ as much (docs/benchmarks.md: ~400 of 4,810
    # parameters by at most 1.5e-8 after 5 rounds).
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-7)
    ours = json.loads((run_dir / "contributions.json").read_text())["totals"]
    theirs = json.loads((tmp_path / "sim" / "contributions.json").read_text())
    assert ours.keys() == theirs["totals"].keys()
    for pid, total in theirs["totals"].items():
        assert ours[pid] == pytest.approx(total, rel=1e-5, abs=1e-9)


_LISTENERS = r"""
import json, os, sys
from pathlib import Path
from fedgrpc.client.raypool import RayParties
from fedgrpc.config import RayPoolConfig

def tree(root):
    parents = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                parents[int(d.name)] = int(
                    (d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except OSError:
                pass
    found, todo = {root}, [root]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parents.items() if pp == p and c not in found]
        found.update(kids)
        todo += kids
    return found

def sockets(pids):
    inodes = set()
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:["):
                    inodes.add(link[8:-1])
        except OSError:
            pass
    return inodes

def bound(inodes):
    out = []
    for proto, listen in (("tcp", "0A"), ("tcp6", "0A"), ("udp", "07"),
                          ("udp6", "07")):
        for line in Path(f"/proc/net/{proto}").read_text().splitlines()[1:]:
            f = line.split()
            if f[3] == listen and f[9] in inodes:
                out.append((proto, f[1].split(":")[0]))
    return out

pool = RayParties(RayPoolConfig(actors=1), 1, Path(sys.argv[1]))
try:
    pool.open()
    pids = pool.wait_ready()
    procs = tree(os.getpid())
    print(json.dumps({"actors": pids, "procs": len(procs),
                      "bound": bound(sockets(procs))}))
finally:
    pool.close()
"""

LOOPBACK = {
    "0100007F",  # 127.0.0.1 (little-endian hex)
    "00000000000000000000000001000000",  # ::1
    "0000000000000000FFFF00000100007F",  # ::ffff:127.0.0.1
}


@needs_ray
def test_ray_pool_listens_on_loopback_only(tmp_path: Path) -> None:
    res = subprocess.run(
        [sys.executable, "-c", _LISTENERS, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=180,
        env=ENV,
        check=False,
    )

    assert res.returncode == 0, res.stderr
    found = json.loads(res.stdout.strip().splitlines()[-1])
    assert len(found["actors"]) == 1
    # GCS, raylet, workers and agents all listen somewhere: on loopback only.
    assert len(found["bound"]) >= 4, found
    assert {addr for _, addr in found["bound"]} <= LOOPBACK, found
    assert "Token authentication" not in res.stderr


def test_simulate_ray_without_ray_says_how_to_install(tmp_path: Path) -> None:
    # `ray` hidden as if not installed: None in sys.modules makes `import ray` fail.
    code = (
        "import sys; sys.modules['ray'] = None\n"
        "from fedgrpc.cli.main import main\n"
        "raise SystemExit(main(sys.argv[1:]))\n"
    )
    run_dir = tmp_path / "sim"

    res = subprocess.run(
        [sys.executable, "-c", code, "simulate", "--backend", "ray", "--run-dir",
         str(run_dir)],
        capture_output=True,
        text=True,
        timeout=60,
        env=ENV,
        check=False,
    )  # fmt: skip

    assert res.returncode == 2, res.stdout + res.stderr
    assert "--backend ray needs Ray, which is not installed" in res.stderr
    assert "pip install 'fedgrpc[ray]'" in res.stderr
    assert not run_dir.exists()  # refused before any work
