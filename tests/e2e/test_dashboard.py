"""The live dashboard, in a real headless browser (Debian's chromium), on a real run.

`fedgrpc serve --dashboard-address` with a parties file (admin and party tokens), three
`fedgrpc client` processes (one scaling its update x20), then chromium loads the page
with the admin token and we check what it renders: the run's state and accuracy, every
party, the bounded party flagged, the payout. A screenshot is kept in the test's tmp
dir. Without the token the API answers 401; a party's token is not enough.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.e2e.helpers import party_args, processes, read_port, run_cli, split_digits
from tests.e2e.helpers import wait_exit as wait_exit_

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(400)]

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _api(port: int, token: str | None) -> tuple[int, dict[str, object]]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/api/report?amount=1000")
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _chromium(url: str, *args: str) -> str:
    assert CHROMIUM is not None
    out = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
         "--virtual-time-budget=8000", "--window-size=1200,900", *args, url],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


@pytest.mark.skipif(
    CHROMIUM is None,
    reason="no chromium on PATH (apt-get install chromium; .ci/run installs it)",
)
def test_dashboard_in_a_real_browser_shows_a_live_run(tmp_path: Path) -> None:
    data = split_digits(tmp_path, 3)
    parties = tmp_path / "parties.toml"
    tokens = {}
    for who in ("operator", "party-0", "party-1", "party-2"):
        out = tmp_path / f"{who}.token"
        extra = ["--admin"] if who == "operator" else []
        res = run_cli(["parties", "add", str(parties), who, "--token-out", str(out),
                       *extra])  # fmt: skip
        assert res.returncode == 0, res.stderr
        tokens[who] = out.read_text().strip()
    port_file, dash_file = tmp_path / "port", tmp_path / "dash_port"
    log = tmp_path / "serve.log"
    with processes() as procs:
        server = procs.start(
            ["serve", "--insecure", "--address", "localhost:0",
             "--port-file", str(port_file), "--run-dir", str(tmp_path / "run"),
             "--val-data", f"npz:{data / 'val.npz'}", "--min-parties", "3",
             "--rounds", "6", "--model", "logreg", "--parties-file", str(parties),
             "--grace-period", "120", "--dashboard-address", "localhost:0",
             "--dashboard-port-file", str(dash_file)],
            log,
        )  # fmt: skip
        port = read_port(port_file, server, log)
        dport = read_port(dash_file, server, log)
        clients = []
        for i in range(3):
            args = party_args(f"localhost:{port}", i, data)
            args += ["--token-file", str(tmp_path / f"party-{i}.token")]
            if i == 2:
                args += ["--attack", "scale:20"]
            clients.append(procs.start(args, tmp_path / f"c{i}.log"))
        for i, c in enumerate(clients):
            assert wait_exit_(c, 240, tmp_path / f"c{i}.log") == 0

        anonymous = _api(dport, None)
        as_party = _api(dport, tokens["party-0"])
        status, doc = _api(dport, tokens["operator"])
        url = f"http://localhost:{dport}/#token={tokens['operator']}&amount=1000"
        dom = _chromium(url, "--dump-dom")
        shot = tmp_path / "dashboard.png"
        _chromium(url, f"--screenshot={shot}")
        server.terminate()
        assert wait_exit_(server, 60, log) == 0

    assert anonymous[0] == 401 and "admin" in str(anonymous[1]["error"])
    assert as_party[0] == 401
    assert status == 200
    assert doc["flagged"] == ["party-2"], doc["bounded_rounds"]
    assert 'data-loaded="1"' in dom, dom[-2000:]
    assert ">done<" in dom
    assert "6 of 6" in dom
    for p in ("party-0", "party-1", "party-2"):
        assert f"<td>{p}" in dom
    assert (
        "Flagged (norm-bounded in at least a quarter of their rounds): party-2" in dom
    )
    payout = doc["payout"]
    assert isinstance(payout, dict)
    assert abs(sum(p["amount"] for p in payout["parties"]) - 1000) < 1e-9
    for p in payout["parties"]:
        assert f"{p['amount']:.2f}" in dom
    assert "1000.00 split by digfl-2" in dom
    assert shot.stat().st_size > 10_000  # a rendered page, kept for a person to look at
