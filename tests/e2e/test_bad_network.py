"""End to end over a bad network: latency, a bandwidth cap, connections cut mid-stream.

The aggregator and three parties run as separate processes; the parties reach the
aggregator through ``tests.netfault.proxy``. The run must finish, and its final model
must equal an in-process run with the same seed and the same party data (DESIGN §3:
nothing is ever half-applied, an exact resend is acknowledged, a reconnecting party gets
the current model).

The second variant puts the aggregator and the parties in two network namespaces joined
by a veth pair with a ``tbf`` qdisc on the party side. It needs root and ``ip netns``;
it only ever uses loopback and the 10.213.X.0/30 addresses it creates.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from tests.e2e.helpers import (
    ENV,
    FEDGRPC,
    Procs,
    final_model,
    party_args,
    processes,
    read_port,
    reference_run,
    seeded_serve_args,
    split_digits,
    wait_exit,
    wait_for,
)
from tests.netfault.proxy import start_proxy

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

REPO = Path(__file__).resolve().parents[2]
N_PARTIES = 3
LATENCY_S = 0.1
RATE_BYTES_S = 2_000_000
# A party's connection carries ~16 KB per round (model down, update up, HTTP/2 framing):
# thresholds in this range cut connections mid-run, never only at the very end.
CUT_RANGE = (3_000, 30_000)
MAX_CUTS = 6
MIN_CUTS = 3
PROXY_SEED = 11
# No proxy variables: gRPC would honour them, and traffic must stay on our addresses.
NET_ENV = {
    **{k: v for k, v in ENV.items() if "proxy" not in k.lower()},
    "PYTHONPATH": str(REPO),
}


def _assert_matches_in_process(run_dir: Path, data: Path) -> None:
    engine, _ = reference_run(data, N_PARTIES)
    got = final_model(run_dir)
    want = dict(engine.layout.iter_arrays(engine.theta))
    assert set(got) == set(want)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-4, atol=1e-5)


def _spawn(
    procs: Procs, argv: Sequence[str], log: Path, netns: str | None = None
) -> subprocess.Popen[bytes]:
    """Start ``argv`` (inside ``netns`` when given); killed by ``procs`` at the end."""
    prefix = ["ip", "netns", "exec", netns] if netns else []
    with log.open("ab") as f:
        p = subprocess.Popen(
            [*prefix, *argv],
            stdout=f,
            stderr=subprocess.STDOUT,
            env=NET_ENV,
            cwd=REPO,
        )
    procs.procs.append(p)
    return p


def _logs(tmp_path: Path) -> str:
    return "\n".join(
        f"--- {p.name}\n{p.read_text(errors='replace')[-2000:]}"
        for p in sorted(tmp_path.glob("*.log"))
    )


def _wait_clients(clients: list[subprocess.Popen[bytes]], tmp_path: Path) -> None:
    for i, c in enumerate(clients):
        rc = wait_exit(c, 180, tmp_path / f"c{i}.log")
        assert rc == 0, f"party-{i} exited {rc}:\n{_logs(tmp_path)}"


# ------------------------------------------------------------------- loopback
def test_bad_loopback_network_run_matches_clean_in_process_run(
    tmp_path: Path,
) -> None:
    data = split_digits(tmp_path, N_PARTIES)
    run_dir = tmp_path / "run"
    port_file = tmp_path / "port"
    slog = tmp_path / "server.log"
    t0 = time.monotonic()

    with processes() as procs:
        server = _spawn(
            procs,
            [
                *FEDGRPC,
                *seeded_serve_args(run_dir, data, port_file, "127.0.0.1:0"),
            ],
            slog,
        )
        port = read_port(port_file, server, slog)
        with start_proxy(
            ("127.0.0.1", port),
            latency_s=LATENCY_S,
            rate_bytes_s=RATE_BYTES_S,
            max_cuts=MAX_CUTS,
            cut_range=CUT_RANGE,
            seed=PROXY_SEED,
        ) as proxy:
            clients = [
                _spawn(
                    procs,
                    [*FEDGRPC, *party_args(f"127.0.0.1:{proxy.port}", i, data)],
                    tmp_path / f"c{i}.log",
                )
                for i in range(N_PARTIES)
            ]
            _wait_clients(clients, tmp_path)
            assert wait_exit(server, 60, slog) == 0, _logs(tmp_path)
            stats = proxy.stats()

    print(f"loopback run: {time.monotonic() - t0:.1f} s, proxy {stats}")  # noqa: T201
    assert stats["cuts"] >= MIN_CUTS, stats
    _assert_matches_in_process(run_dir, data)


# ---------------------------------------------------------- network namespaces
def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(
        ["ip", *args], capture_output=True, text=True, timeout=30, check=False
    )
    if check and res.returncode != 0:
        raise AssertionError(f"`ip {' '.join(args)}` failed: {res.stderr.strip()}")
    return res


@contextmanager
def _namespaces() -> Iterator[tuple[str, str, str, str]]:
    """Two fresh namespaces joined by a veth pair.

    Yields (agg namespace, party namespace, aggregator address, party-side device).
    Skips the test when namespaces cannot be made here; all is deleted at the end.
    """
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    if shutil.which("ip") is None:
        pytest.skip("the `ip` command (iproute2) is not installed")
    sfx = f"{random.randrange(16**5):05x}"
    octet = random.randrange(256)
    ns_agg, ns_party = f"fg{sfx}-agg", f"fg{sfx}-party"
    veth_agg, veth_party = f"fg{sfx}a", f"fg{sfx}p"
    agg_ip, party_ip = f"10.213.{octet}.1", f"10.213.{octet}.2"
    made: list[str] = []
    try:
        res = _ip("netns", "add", ns_agg, check=False)
        if res.returncode != 0:
            pytest.skip(
                f"`ip netns add {ns_agg}` failed (rc {res.returncode}): "
                f"{res.stderr.strip()}"
            )
        made.append(ns_agg)
        _ip("netns", "add", ns_party)
        made.append(ns_party)
        _ip("link", "add", veth_agg, "type", "veth", "peer", "name", veth_party)
        _ip("link", "set", veth_agg, "netns", ns_agg)
        _ip("link", "set", veth_party, "netns", ns_party)
        for ns, dev, addr in (
            (ns_agg, veth_agg, agg_ip),
            (ns_party, veth_party, party_ip),
        ):
            _ip("-n", ns, "addr", "add", f"{addr}/30", "dev", dev)
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "link", "set", dev, "up")
        # Only loopback and 10.213.X.0/30 are reachable: no default route, no other
        # address, so no traffic can leave the two namespaces.
        for ns in (ns_agg, ns_party):
            routes = _ip("-n", ns, "route", "show").stdout.strip().splitlines()
            assert routes == [routes[0]] and routes[0].startswith(
                f"10.213.{octet}.0/30 "
            ), routes
            assert _ip("-n", ns, "route", "get", "1.1.1.1", check=False).returncode != 0
        yield ns_agg, ns_party, agg_ip, veth_party
    finally:
        for ns in made:
            _ip("netns", "del", ns, check=False)
        # Only still there if the test failed before moving it into a namespace.
        if _ip("link", "show", veth_agg, check=False).returncode == 0:
            _ip("link", "del", veth_agg, check=False)


def _tbf(ns_party: str, dev: str) -> bool:
    """A token bucket filter on the party side of the veth; False without `tc`."""
    if shutil.which("tc") is None:
        warnings.warn(
            "`tc` is not installed: running the namespace variant without the tbf "
            "qdisc (nothing was installed)",
            stacklevel=2,
        )
        return False
    res = subprocess.run(
        [
            "ip",
            "netns",
            "exec",
            ns_party,
            "tc",
            "qdisc",
            "add",
            "dev",
            dev,
            "root",
            "tbf",
            "rate",
            "20mbit",
            "burst",
            "32kbit",
            "latency",
            "50ms",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert res.returncode == 0, f"tc qdisc add failed: {res.stderr.strip()}"
    return True


def _read_stats(path: Path) -> dict[str, object]:
    try:
        out: dict[str, object] = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return out


def test_bad_namespaced_network_run_matches_clean_in_process_run(
    tmp_path: Path,
) -> None:
    data = split_digits(tmp_path, N_PARTIES)
    run_dir = tmp_path / "run"
    port_file = tmp_path / "port"
    proxy_port_file = tmp_path / "proxy-port"
    stats_file = tmp_path / "proxy-stats.json"
    slog, plog = tmp_path / "server.log", tmp_path / "proxy.log"
    t0 = time.monotonic()

    with _namespaces() as (ns_agg, ns_party, agg_ip, dev), processes() as procs:
        shaped = _tbf(ns_party, dev)
        server = _spawn(
            procs,
            [
                *FEDGRPC,
                *seeded_serve_args(run_dir, data, port_file, f"{agg_ip}:0"),
            ],
            slog,
            ns_agg,
        )
        port = read_port(port_file, server, slog)
        proxy = _spawn(
            procs,
            [
                sys.executable,
                "-m",
                "tests.netfault.proxy",
                "--listen",
                "127.0.0.1:0",
                "--upstream",
                f"{agg_ip}:{port}",
                "--latency-ms",
                str(LATENCY_S * 1000),
                "--rate",
                str(RATE_BYTES_S),
                "--cuts",
                str(MAX_CUTS),
                "--cut-min",
                str(CUT_RANGE[0]),
                "--cut-max",
                str(CUT_RANGE[1]),
                "--seed",
                str(PROXY_SEED),
                "--port-file",
                str(proxy_port_file),
                "--stats-file",
                str(stats_file),
                "--max-seconds",
                "230",
            ],
            plog,
            ns_party,
        )
        wait_for(
            lambda: proxy_port_file.is_file() or proxy.poll() is not None,
            30,
            "the proxy's port file",
        )
        assert proxy.poll() is None, plog.read_text()
        proxy_port = int(proxy_port_file.read_text())
        clients = [
            _spawn(
                procs,
                [*FEDGRPC, *party_args(f"127.0.0.1:{proxy_port}", i, data)],
                tmp_path / f"c{i}.log",
                ns_party,
            )
            for i in range(N_PARTIES)
        ]
        _wait_clients(clients, tmp_path)
        assert wait_exit(server, 60, slog) == 0, _logs(tmp_path)
        proxy.send_signal(signal.SIGTERM)
        assert wait_exit(proxy, 20, plog) == 0
        stats = _read_stats(stats_file)

    print(  # noqa: T201
        f"netns run (tbf {'on' if shaped else 'off'}): {time.monotonic() - t0:.1f} s, "
        f"proxy {stats}"
    )
    cuts = stats.get("cuts")
    assert isinstance(cuts, int) and cuts >= MIN_CUTS, stats
    _assert_matches_in_process(run_dir, data)
    assert not any(ns in _ip("netns", "list").stdout for ns in (ns_agg, ns_party)), (
        "namespaces left behind"
    )
