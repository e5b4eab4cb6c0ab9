"""The dashboard's HTTP API without a browser: refusals and a starting run."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from fedgrpc.cli.dashboard import Dashboard
from fedgrpc.errors import ConfigError


def _get(port: int, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_dashboard_refuses_a_public_address_without_a_parties_file(
    tmp_path: Path,
) -> None:
    with pytest.raises(ConfigError, match="without a parties file would show every"):
        Dashboard(tmp_path, "0.0.0.0:0", None)


def test_dashboard_serves_its_page_and_503_before_the_ledger_exists(
    tmp_path: Path,
) -> None:
    dash = Dashboard(tmp_path / "run", "localhost:0", None)
    port = dash.start()
    try:
        page = _get(port, "/")
        api = _get(port, "/api/report")
        missing = _get(port, "/nope")
    finally:
        dash.stop()

    assert page[0] == 200 and b"/api/report" in page[1] and b"http" not in page[1]
    assert api[0] == 503 and "no ledger in" in json.loads(api[1])["error"]
    assert missing[0] == 404
