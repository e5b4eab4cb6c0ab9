"""``fedgrpc serve`` (the aggregator) and ``fedgrpc client`` (a party)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from fedgrpc.cli.options import (
    add_timeout_options,
    add_tls_client_options,
    add_training_options,
    channel_options,
    round_config,
)
from fedgrpc.config import (
    VALIDATORS,
    ClientConfig,
    Limits,
    RoundConfig,
    ServerConfig,
    TlsConfig,
)
from fedgrpc.errors import ConfigError

_SERVER = ServerConfig(insecure=True)  # defaults only
_ROUND = RoundConfig()
_LIMITS = Limits()
_CLIENT = ClientConfig(server="", party_id="", data="", insecure=True)


def add_parsers(sub: Any) -> None:
    """Add ``serve`` and ``client``."""
    _serve_parser(sub)
    _client_parser(sub)


def _serve_parser(sub: Any) -> None:
    p = sub.add_parser("serve", help="run the aggregator")
    p.add_argument(
        "--address",
        default=_SERVER.address,
        help="host:port to listen on (port 0 = any free port)",
    )
    p.add_argument(
        "--run-dir",
        type=Path,
        default=_SERVER.run_dir,
        help="directory for the ledger, checkpoints, final model and summary",
    )
    p.add_argument(
        "--resume",
        type=Path,
        metavar="RUN_DIR",
        help="continue the run in RUN_DIR from its last committed round",
    )
    p.add_argument(
        "--val-data",
        help="the server's validation set (required for a new run): digits (the "
        "bundled scikit-learn digits), mnist:DIR, npz:FILE, mod:fn",
    )
    p.add_argument(
        "--val-count",
        type=int,
        default=_SERVER.val_count,
        help="use the first N samples only (0 = all)",
    )
    p.add_argument("--min-parties", type=int, default=_ROUND.min_parties, help="quorum")
    p.add_argument(
        "--expected-parties",
        type=int,
        default=_ROUND.expected_parties,
        help="parties to wait for before round 0 (0 = --min-parties)",
    )
    p.add_argument("--init-model", type=Path, help="start from these weights (.npz)")
    p.add_argument(
        "--validator",
        choices=VALIDATORS,
        default=_SERVER.validator,
        help="where the validation passes (v_t, loss after the step) run: a worker "
        "process sharing the model through memory, which keeps torch and the "
        "validation set out of the aggregator (default), or a thread of the aggregator",
    )
    p.add_argument("--port-file", type=Path, help="write the bound port here")
    p.add_argument(
        "--publish-to-parties",
        action="store_true",
        help="let parties see shares, round metrics and other party ids (by default "
        "a party sees only its own rows)",
    )
    p.add_argument(
        "--metrics-address",
        metavar="HOST:PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics (port 0 = any; "
        "default: no metrics endpoint)",
    )
    p.add_argument("--metrics-port-file", type=Path, help="write the metrics port here")
    p.add_argument(
        "--dashboard-address",
        metavar="HOST:PORT",
        help="serve the live contributions dashboard at http://HOST:PORT/ (admin "
        "token from the parties file; without one, loopback only; default: none)",
    )
    p.add_argument(
        "--dashboard-port-file", type=Path, help="write the dashboard's port here"
    )
    p.add_argument(
        "--keep-serving",
        action="store_true",
        help="after the last round keep answering queries until SIGTERM "
        "(an unbounded --grace-period)",
    )
    p.add_argument(
        "--grace-period",
        type=float,
        default=_SERVER.grace_period_s,
        metavar="S",
        help="after the last round (or when resuming a finished run) keep answering "
        "status/contributions queries and telling reconnecting parties that "
        "training is done for S seconds, then exit; 0 = exit as soon as the "
        "connected parties have their done message",
    )
    add_training_options(p, defaults=_ROUND)
    _add_security_options(p)
    _add_limit_options(p)
    p.set_defaults(func=_cmd_serve)


def _add_security_options(p: argparse.ArgumentParser) -> None:
    """The ``security`` group: TLS, mutual TLS and the parties file."""
    g = p.add_argument_group("security")
    g.add_argument(
        "--insecure", action="store_true", help="plaintext (no TLS): tests only"
    )
    g.add_argument("--tls-cert", type=Path, help="the aggregator's certificate (PEM)")
    g.add_argument("--tls-key", type=Path, help="its private key (PEM)")
    g.add_argument(
        "--tls-ca", type=Path, help="CA for client certificates (mutual TLS)"
    )
    g.add_argument(
        "--require-client-cert",
        action="store_true",
        help="mutual TLS: party identity from its certificate",
    )
    g.add_argument("--parties-file", type=Path, help="TOML file of parties and tokens")
    g.add_argument(
        "--open-enrolment",
        action="store_true",
        help="TLS without a parties file or client certificates: anyone may join as "
        "any party id (refused unless given; no contributions are served)",
    )


def _add_limit_options(p: argparse.ArgumentParser) -> None:
    """The ``limits`` group: what one party may make the aggregator hold or wait on."""
    g = p.add_argument_group("limits")
    g.add_argument(
        "--max-chunk-bytes",
        type=int,
        default=_LIMITS.max_chunk_bytes,
        help="largest data field of one upload chunk (bytes)",
    )
    g.add_argument(
        "--max-tensor-bytes",
        type=int,
        default=_LIMITS.max_tensor_bytes,
        help="largest single tensor of an upload (bytes)",
    )
    g.add_argument(
        "--max-submission-bytes",
        type=int,
        default=_LIMITS.max_submission_bytes,
        help="largest whole upload (bytes)",
    )
    g.add_argument(
        "--max-streams-per-party",
        type=int,
        default=_LIMITS.max_streams_per_party,
        help="concurrent uploads one party may hold open",
    )
    g.add_argument(
        "--max-parties",
        type=int,
        default=_LIMITS.max_parties,
        help="parties that may join",
    )
    g.add_argument(
        "--max-inflight-uploads",
        type=int,
        default=_LIMITS.max_inflight_uploads,
        help="uploads buffered at once (memory: this many model-sized buffers)",
    )
    g.add_argument(
        "--upload-slot-timeout",
        type=float,
        default=_LIMITS.upload_slot_timeout_s,
        help="seconds an upload waits for a free slot before RESOURCE_EXHAUSTED",
    )
    g.add_argument(
        "--upload-idle",
        type=float,
        default=_LIMITS.upload_idle_s,
        help="seconds without data after which an upload is discarded",
    )
    g.add_argument(
        "--upload-min-rate",
        type=float,
        default=_LIMITS.upload_min_rate_bytes_s,
        help="bytes/s an upload must average after --upload-grace; sets each "
        "upload's overall deadline (grace + model bytes / rate)",
    )
    g.add_argument(
        "--upload-grace",
        type=float,
        default=_LIMITS.upload_grace_s,
        help="seconds an upload has before its rate is judged (and to send its header)",
    )
    g.add_argument(
        "--max-concurrent-streams",
        type=int,
        default=_LIMITS.max_concurrent_streams,
        help="GetModel and SubmitGradient streams open at once, server-wide "
        "(0 = 2 x --max-parties + 8)",
    )
    g.add_argument(
        "--max-concurrent-unary",
        type=int,
        default=_LIMITS.max_concurrent_unary,
        help="unary calls in progress at once, server-wide",
    )
    g.add_argument(
        "--max-unary-per-identity",
        type=int,
        default=_LIMITS.max_unary_per_identity,
        help="unary calls of one method one caller may have in progress",
    )


def _cmd_serve(a: argparse.Namespace) -> int:
    from fedgrpc.server.app import serve

    cfg = ServerConfig(
        round=round_config(a, min_parties=a.min_parties, expected=a.expected_parties),
        address=a.address,
        run_dir=a.resume or a.run_dir,
        val_data=a.val_data or _SERVER.val_data,
        val_count=a.val_count,
        insecure=a.insecure,
        tls=TlsConfig(
            cert=a.tls_cert,
            key=a.tls_key,
            ca=a.tls_ca,
            require_client_cert=a.require_client_cert,
        ),
        parties_file=a.parties_file,
        open_enrolment=a.open_enrolment,
        limits=Limits(
            max_chunk_bytes=a.max_chunk_bytes,
            max_tensor_bytes=a.max_tensor_bytes,
            max_submission_bytes=a.max_submission_bytes,
            max_streams_per_party=a.max_streams_per_party,
            max_parties=a.max_parties,
            max_inflight_uploads=a.max_inflight_uploads,
            upload_slot_timeout_s=a.upload_slot_timeout,
            upload_idle_s=a.upload_idle,
            upload_min_rate_bytes_s=a.upload_min_rate,
            upload_grace_s=a.upload_grace,
            max_concurrent_streams=a.max_concurrent_streams,
            max_concurrent_unary=a.max_concurrent_unary,
            max_unary_per_identity=a.max_unary_per_identity,
        ),
        port_file=a.port_file,
        keep_serving=a.keep_serving,
        publish_to_parties=a.publish_to_parties,
        grace_period_s=a.grace_period,
        metrics_address=a.metrics_address,
        metrics_port_file=a.metrics_port_file,
        init_model=a.init_model,
        resume=a.resume is not None,
        validator=a.validator,
    )
    if a.val_data is None and a.resume is None:
        # Scoring on a data set the operator never chose would be silently wrong.
        raise ConfigError(
            "no validation data: pass --val-data (digits for the bundled scikit-learn "
            "digits, mnist:DIR, npz:FILE or module:factory)"
        )
    if a.dashboard_address is not None:
        from fedgrpc.cli.dashboard import start_dashboard

        # Reads the ledger from the run directory, like `fedgrpc dashboard`; admin
        # tokens from the parties file guard it.
        start_dashboard(
            cfg.run_dir, a.dashboard_address, a.parties_file, a.dashboard_port_file
        )
    return serve(cfg)


def _client_parser(sub: Any) -> None:
    p = sub.add_parser("client", help="run a party (client stub)")
    p.add_argument("--server", required=True, help="aggregator HOST:PORT")
    p.add_argument(
        "--party-id",
        required=True,
        help="this party's id (must match its certificate or token when used)",
    )
    p.add_argument("--data", required=True, help="digits, mnist:DIR, npz:FILE, mod:fn")
    add_timeout_options(p, _CLIENT)
    p.add_argument(
        "--attack", default=_CLIENT.attack, help="simulated update attack (evaluation)"
    )
    p.add_argument("--threads", type=int, default=_CLIENT.threads, help="torch threads")
    add_tls_client_options(p)
    p.set_defaults(func=_cmd_client)


def _cmd_client(a: argparse.Namespace) -> int:
    from fedgrpc.client.party import run_party

    cfg = ClientConfig(
        server=a.server,
        party_id=a.party_id,
        data=a.data,
        attack=a.attack,
        threads=a.threads,
        **channel_options(a),
    )
    result = run_party(cfg)
    print(
        json.dumps(
            {
                "party_id": a.party_id,
                "rounds_submitted": result.rounds_submitted,
                "rounds_completed": result.rounds_completed,
                "reason": result.reason,
                "train_loss": result.last_train_loss,
            }
        )
    )
    return 0 if result.reason == "completed" else 1
