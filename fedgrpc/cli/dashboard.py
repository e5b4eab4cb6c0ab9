"""The live contributions dashboard: a read-only web page over a run's ledger.

``fedgrpc dashboard --run-dir DIR`` (or ``fedgrpc serve --dashboard-address``) serves

* ``/``: one self-contained HTML page (``dashboard.html``, shipped in the package: no
  CDN, no network), which polls the API every few seconds and redraws;
* ``/api/report``: the run as JSON: status, per-round validation loss and accuracy,
  each party's cumulative contribution under both methods and per-round scores,
  failed and low-fidelity rounds, flagged parties and (``?amount=``) payouts.

The ledger is opened read-only per request, so the page follows a run while the
aggregator writes it. With a parties file, the API needs an admin's bearer token
(``Authorization: Bearer ...``; the page takes it from ``#token=...`` in its URL) like
``GetContributions`` for every party; without one it only listens on loopback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import threading
import urllib.parse
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any

from fedgrpc.config import check_address
from fedgrpc.errors import ConfigError, FedGrpcError
from fedgrpc.security.registry import PartyRegistry

log = logging.getLogger(__name__)

LOOPBACK = ("localhost", "127.0.0.1", "::1", "[::1]")


def run_json(run_dir: Path, amount: float | None, rule: str) -> dict[str, Any]:
    """Everything the page shows, from the run directory's ledger."""
    from fedgrpc.cli.observe import _ledger_path, offline_status
    from fedgrpc.cli.reports import low_fidelity_rounds, payout_doc, report_json
    from fedgrpc.store.ledger import Ledger

    path = _ledger_path(run_dir)
    status = offline_status(path.parent)
    with Ledger.open_readonly(path) as ledger:
        first = ledger.contributions(method="digfl-1")
        second = ledger.contributions(method="digfl-2")
    doc = report_json(first)
    doc["status"] = _finite(status)
    doc["totals_digfl2"] = {pc.party_id: pc.total for pc in second.parties}
    doc["pending_digfl2"] = list(second.pending_rounds)
    doc["low_fidelity_rounds"] = low_fidelity_rounds(first)
    doc["failed_rounds"] = [
        {"round": r.round, "status": r.status} for r in first.rounds if not r.ok
    ]
    doc["payout"] = None if amount is None else payout_doc(second, amount, rule)
    return _finite(doc)  # type: ignore[no-any-return]


def _finite(obj: Any) -> Any:
    """NaN and inf become null (JSON has neither)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


class Dashboard:
    """The HTTP server of the dashboard, on its own thread.

    Args:
        run_dir: the run directory (or simulate's, whose ledger is in ``server/``).
        address: ``host:port`` (port 0 = any free port).
        registry: parties file; when given the API needs an admin token.
    """

    def __init__(
        self, run_dir: Path, address: str, registry: PartyRegistry | None
    ) -> None:
        check_address(address)
        host, _, port_text = address.rpartition(":")
        port = int(port_text)
        if registry is None and host not in LOOPBACK:
            raise ConfigError(
                f"dashboard on {address} without a parties file would show every "
                "party's contributions to anyone: listen on localhost or pass "
                "--parties-file (the API then needs an admin token)"
            )
        self.run_dir = Path(run_dir)
        self.registry = registry
        page = resources.files("fedgrpc.cli").joinpath("dashboard.html")
        self._page = page.read_bytes()
        handler = self._handler()
        self._server = ThreadingHTTPServer((host.strip("[]"), port), handler)
        self._server.daemon_threads = True
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="dashboard", daemon=True
        )

    def start(self) -> int:
        """Serve in the background; returns the port."""
        self._thread.start()
        log.info("dashboard at http://localhost:%d/", self.port)
        return self.port

    def stop(self) -> None:
        """Stop serving."""
        self._server.shutdown()
        self._server.server_close()

    def _allowed(self, header: str | None) -> bool:
        if self.registry is None:
            return True
        scheme, _, token = (header or "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            return False
        ident = self.registry.authenticate_token(token.strip())
        return ident is not None and ident.is_admin

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        dash = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                log.debug("dashboard: " + format, *args)

            def do_GET(self) -> None:
                url = urllib.parse.urlsplit(self.path)
                if url.path in ("/", "/index.html"):
                    self._send(HTTPStatus.OK, dash._page, "text/html; charset=utf-8")
                    return
                if url.path != "/api/report":
                    self._error(HTTPStatus.NOT_FOUND, f"no page {url.path}")
                    return
                if not dash._allowed(self.headers.get("Authorization")):
                    self._error(
                        HTTPStatus.UNAUTHORIZED,
                        "an admin's bearer token is needed (open the page as "
                        "http://HOST:PORT/#token=YOUR_ADMIN_TOKEN)",
                    )
                    return
                query = urllib.parse.parse_qs(url.query)
                try:
                    amount = float(query["amount"][0]) if "amount" in query else None
                    rule = query.get("rule", ["positive-share"])[0]
                    doc = run_json(dash.run_dir, amount, rule)
                except (FedGrpcError, ValueError, OSError) as e:
                    self._error(HTTPStatus.SERVICE_UNAVAILABLE, str(e))
                    return
                body = json.dumps(doc).encode()
                self._send(HTTPStatus.OK, body, "application/json")

            def _error(self, status: HTTPStatus, message: str) -> None:
                body = json.dumps({"error": message}).encode()
                self._send(status, body, "application/json")

            def _send(self, status: HTTPStatus, body: bytes, kind: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(body)

        return Handler


def add_parsers(sub: Any) -> None:
    """Add ``dashboard``."""
    p = sub.add_parser(
        "dashboard",
        help="a live web page of a run's progress, contributions and payouts",
        description=__doc__.splitlines()[0],
    )
    p.add_argument(
        "--run-dir", type=Path, required=True, help="the run directory to show"
    )
    p.add_argument(
        "--address",
        default="localhost:8050",
        help="host:port to listen on; port 0 = any free port (default: %(default)s)",
    )
    p.add_argument(
        "--parties-file",
        type=Path,
        help="the run's parties file: the page then needs an admin token",
    )
    p.add_argument("--port-file", type=Path, help="write the bound port here")
    p.set_defaults(func=_cmd_dashboard)


def start_dashboard(
    run_dir: Path,
    address: str,
    parties_file: Path | None,
    port_file: Path | None = None,
) -> Dashboard:
    """Build and start a dashboard; write its port to ``port_file``."""
    registry = PartyRegistry.load(parties_file) if parties_file else None
    dash = Dashboard(run_dir, address, registry)
    port = dash.start()
    if port_file is not None:
        from fedgrpc.store.files import atomic_write

        atomic_write(port_file, f"{port}\n".encode())
    return dash


def _cmd_dashboard(a: argparse.Namespace) -> int:
    import signal

    dash = start_dashboard(a.run_dir, a.address, a.parties_file, a.port_file)
    print(f"dashboard: http://localhost:{dash.port}/  (Ctrl-C to stop)", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with contextlib.suppress(KeyboardInterrupt):
        stop.wait()
    dash.stop()
    return 0
