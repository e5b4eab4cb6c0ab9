"""Command-line options shared by several commands, and the configs built from them.

Every option's default is read from the config dataclasses (``fedgrpc.config``), never
restated here.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from fedgrpc.config import (
    AGGREGATIONS,
    SERVER_OPTIMISERS,
    WIRE_DTYPES,
    ClientConfig,
    ObserverConfig,
    RoundConfig,
    SplitConfig,
    TlsConfig,
)
from fedgrpc.store.files import read_file
from fedgrpc.types import UpdateKind


def add_training_options(p: argparse.ArgumentParser, *, defaults: RoundConfig) -> None:
    """Round, model and learning-rate options; read back by :func:`round_config`."""
    g = p.add_argument_group("training")
    g.add_argument(
        "--rounds", type=int, default=defaults.rounds, help="training rounds"
    )
    g.add_argument(
        "--update-kind",
        choices=[k.value for k in UpdateKind],
        default=defaults.update_kind.value,
        help="gradient (FedSGD, server lr) or delta (local SGD steps)",
    )
    g.add_argument(
        "--server-lr",
        type=float,
        default=defaults.server_lr,
        help="server step size for gradient updates",
    )
    g.add_argument(
        "--lr", type=float, default=defaults.lr, help="local SGD learning rate"
    )
    g.add_argument(
        "--local-steps",
        type=int,
        default=defaults.local_steps,
        help="local steps per round (delta); 0 = --local-epochs",
    )
    g.add_argument(
        "--local-epochs",
        type=int,
        default=defaults.local_epochs,
        help="local epochs per round when --local-steps is 0 (delta)",
    )
    g.add_argument(
        "--batch-size",
        type=int,
        default=defaults.batch_size,
        help="local mini-batch size; 0 = full local data",
    )
    g.add_argument(
        "--momentum",
        type=float,
        default=defaults.momentum,
        help="local SGD momentum in [0, 1), as torch.optim.SGD (delta updates only; "
        "0 = off) (default: %(default)s)",
    )
    g.add_argument(
        "--weight-decay",
        type=float,
        default=defaults.weight_decay,
        help="local L2 weight decay, as torch.optim.SGD (delta updates only; "
        "0 = off) (default: %(default)s)",
    )
    g.add_argument(
        "--prox-mu",
        type=float,
        default=defaults.prox_mu,
        help="FedProx mu: adds (mu/2)||theta - theta_t||^2 to the local loss, theta_t "
        "the round's global model (delta updates only; 0 = off) (default: %(default)s)",
    )
    g.add_argument(
        "--model",
        default=defaults.model,
        help="logreg, mlp, cnn or package.module:factory",
    )
    g.add_argument(
        "--hidden",
        type=int,
        default=defaults.model_hidden,
        help="hidden width of the built-in mlp and cnn",
    )
    g.add_argument(
        "--seed",
        type=int,
        default=defaults.seed,
        help="run seed: initial model, data split, party RNG streams",
    )
    g.add_argument(
        "--aggregation",
        choices=AGGREGATIONS,
        default=defaults.aggregation,
        help="aggregation rule: samples (n_i / sum n), uniform, digfl (max(0, score); "
        "buffers the round's updates in memory), or the robust median, trimmed-mean, "
        "krum, fltrust (read the round back from disk at the close; "
        "docs/strategies.md) (default: %(default)s)",
    )
    g.add_argument(
        "--wire-dtype",
        choices=WIRE_DTYPES,
        default=defaults.wire_dtype,
        help="dtype of float tensors on the wire (the server aggregates in float32)",
    )
    g.add_argument(
        "--round-timeout",
        type=float,
        default=defaults.round_timeout_s,
        help="seconds before a round closes on quorum (or fails)",
    )
    g.add_argument(
        "--join-timeout",
        type=float,
        default=defaults.join_timeout_s,
        help="seconds to wait for the first quorum of joins before the run fails",
    )
    g.add_argument(
        "--quorum-retries",
        type=int,
        default=defaults.quorum_retries,
        help="times a round that missed quorum is reopened before the run fails",
    )
    g = p.add_argument_group("bounded influence (DESIGN §4)")
    g.add_argument(
        "--norm-bound",
        default=defaults.norm_bound,
        metavar="auto|VALUE|off",
        help="bound on each update's L2 norm, before aggregation and scoring: auto = "
        "--norm-bound-factor x the round's median norm (default: %(default)s)",
    )
    g.add_argument(
        "--norm-bound-factor",
        type=float,
        default=defaults.norm_bound_factor,
        help="k of the auto bound (default: %(default)s)",
    )
    g.add_argument(
        "--claim-cap",
        type=float,
        default=defaults.claim_cap,
        help="an unattested sample count weighs at most this many times the joined "
        "parties' median claim; 0 = no cap (default: %(default)s)",
    )
    add_strategy_options(p, defaults)


# (RoundConfig field, option, type, help) of the strategy options, in help order.
_STRATEGY_OPTIONS: tuple[tuple[str, str, type, str], ...] = (
    ("server_opt", "--server-opt", str, "server optimiser on the aggregated step: "
     "sgd (plain), avgm (FedAvgM), adagrad, adam, yogi"),
    ("server_opt_lr", "--server-opt-lr", float, "server optimiser step size eta_s "
     "(0 = its default: 1 for avgm, 0.03 for adagrad/adam/yogi)"),
    ("server_beta1", "--server-beta1", float, "server momentum / first-moment decay"),
    ("server_beta2", "--server-beta2", float, "second-moment decay (adam, yogi)"),
    ("server_tau", "--server-tau", float, "adaptivity tau (adagrad, adam, yogi)"),
    ("trim_beta", "--trim-beta", float, "trimmed-mean: fraction dropped at each end"),
    ("krum_f", "--krum-f", int, "krum: Byzantine parties tolerated (n >= f + 3)"),
    ("krum_m", "--krum-m", int, "krum: updates averaged (0 = n - f)"),
    ("strategy", "--strategy", str, "a custom strategy, package.module:factory "
     "(called with the RoundConfig, returns a fedgrpc.strategies.Strategy)"),
    ("sample_fraction", "--sample-fraction", float, "client sampling: fraction of "
     "the joined parties asked to train each round"),
    ("sample_count", "--sample-count", int, "client sampling: parties asked per "
     "round (overrides --sample-fraction; 0 = off)"),
    ("sample_min", "--sample-min", int, "client sampling: at least this many per "
     "round (0 = --min-parties)"),
    ("buffer_size", "--buffer-size", int, "FedBuff: a step every K accepted updates, "
     "parties train on whatever version they have (0 = synchronous rounds)"),
    ("max_staleness", "--max-staleness", int, "FedBuff: refuse updates computed on "
     "a model more than this many versions old"),
    ("staleness_exponent", "--staleness-exponent", float, "FedBuff: a stale update "
     "enters as (1 + staleness)^-a times itself"),
)  # fmt: skip


def add_strategy_options(p: argparse.ArgumentParser, defaults: RoundConfig) -> None:
    """Server optimiser, robust-rule, client-sampling and FedBuff options."""
    g = p.add_argument_group("strategy (docs/strategies.md)")
    for name, option, kind, text in _STRATEGY_OPTIONS:
        extra: dict[str, object] = {}
        if name == "server_opt":
            extra["choices"] = SERVER_OPTIMISERS
        g.add_argument(
            option,
            type=kind,
            default=getattr(defaults, name),
            dest=name,
            help=f"{text} (default: %(default)s)",
            **extra,  # type: ignore[arg-type]
        )


def quorum_of(a: argparse.Namespace, parties: int) -> int:
    """The quorum of a run where all ``parties`` take part (``simulate``, ``shapley``).

    Every party, unless rounds ask fewer of them: client sampling's round size, or
    FedBuff's buffer.
    """
    if a.buffer_size:
        return min(parties, int(a.buffer_size))
    sampling = RoundConfig(
        min_parties=1,
        sample_count=a.sample_count,
        sample_fraction=a.sample_fraction,
        sample_min=a.sample_min,
    )
    return sampling.asked_per_round(parties)


def strategy_values(a: argparse.Namespace) -> dict[str, object]:
    """The strategy options as RoundConfig keyword arguments."""
    return {name: getattr(a, name) for name, *_ in _STRATEGY_OPTIONS}


def strategy_args(cfg: RoundConfig) -> list[str]:
    """The strategy options of ``cfg`` as a command line.

    What ``simulate`` passes to its ``fedgrpc serve``; floats as repr() so they
    parse back exactly.
    """
    out: list[str] = []
    for name, option, kind, _ in _STRATEGY_OPTIONS:
        value = getattr(cfg, name)
        out += [option, repr(value) if kind is float else str(value)]
    return out


def round_config(
    a: argparse.Namespace, *, min_parties: int, expected: int
) -> RoundConfig:
    """The RoundConfig of the options :func:`add_training_options` added."""
    return RoundConfig(
        rounds=a.rounds,
        min_parties=min_parties,
        expected_parties=expected,
        update_kind=UpdateKind(a.update_kind),
        server_lr=a.server_lr,
        lr=a.lr,
        local_steps=a.local_steps,
        local_epochs=a.local_epochs,
        batch_size=a.batch_size,
        momentum=a.momentum,
        weight_decay=a.weight_decay,
        prox_mu=a.prox_mu,
        round_timeout_s=a.round_timeout,
        join_timeout_s=a.join_timeout,
        aggregation=a.aggregation,
        quorum_retries=a.quorum_retries,
        seed=a.seed,
        model=a.model,
        model_hidden=a.hidden,
        wire_dtype=a.wire_dtype,
        norm_bound=a.norm_bound,
        norm_bound_factor=a.norm_bound_factor,
        claim_cap=a.claim_cap,
        **strategy_values(a),  # type: ignore[arg-type]
    )


def add_data_options(
    p: argparse.ArgumentParser, *, defaults: SplitConfig, holdout_help: str
) -> None:
    """Data set, partition, hold-out and attack options (``--seed`` is training's)."""
    g = p.add_argument_group("data")
    g.add_argument(
        "--data", default=defaults.data, help="digits, mnist:DIR, npz:FILE, mod:fn"
    )
    g.add_argument(
        "--parties", type=int, default=defaults.parties, help="number of parties"
    )
    g.add_argument(
        "--partition",
        default=defaults.partition,
        help="iid, dirichlet:ALPHA, quantity:ALPHA, shards:K",
    )
    g.add_argument(
        "--val-holdout",
        type=int,
        default=defaults.val_holdout,
        help=f"samples held out for validation (0 = {holdout_help})",
    )
    g.add_argument(
        "--train-count",
        type=int,
        default=defaults.train_count,
        help="use only N training samples (0 = all)",
    )
    g.add_argument(
        "--attack",
        action="append",
        default=list(defaults.attacks),
        metavar="IDX=SPEC",
        help="make party IDX a low-value party (repeatable). SPEC: "
        "label-flip:RATE (label C-1-y on a fraction RATE of its samples), "
        "mix:SRC->DST:WEIGHT (blend images of class SRC into class DST), "
        "random-labels, free-rider (all-zero update), scale:K (update times K), "
        "noise:SIGMA (Gaussian noise on the update); "
        "e.g. 3=label-flip:0.6 1=mix:6->2:0.8 2=free-rider 4=scale:5",
    )


def split_config(a: argparse.Namespace) -> SplitConfig:
    """The SplitConfig of the options :func:`add_data_options` added."""
    return SplitConfig(
        data=a.data,
        parties=a.parties,
        partition=a.partition,
        val_holdout=a.val_holdout,
        train_count=a.train_count,
        attacks=tuple(a.attack),
        seed=a.seed,
    )


def add_tls_client_options(p: argparse.ArgumentParser) -> None:
    """How a party or an observer reaches the aggregator securely."""
    g = p.add_argument_group("security")
    g.add_argument(
        "--insecure", action="store_true", help="plaintext (no TLS): tests only"
    )
    g.add_argument(
        "--tls-ca", type=Path, help="CA certificate that signed the aggregator's"
    )
    g.add_argument(
        "--tls-cert", type=Path, help="this party's certificate (mutual TLS)"
    )
    g.add_argument("--tls-key", type=Path, help="this party's private key (mutual TLS)")
    g.add_argument(
        "--token-file", type=Path, help="file holding this caller's bearer token"
    )
    g.add_argument(
        "--tls-server-name",
        default="",
        help="name to check the aggregator's certificate against (when --server "
        "is an IP or another name than the certificate's)",
    )


def add_timeout_options(p: argparse.ArgumentParser, defaults: ClientConfig) -> None:
    """Per-call deadline and how long to keep trying to reach the aggregator."""
    p.add_argument(
        "--rpc-timeout",
        type=float,
        default=defaults.rpc_timeout_s,
        help="deadline per call (s)",
    )
    p.add_argument(
        "--connect-timeout",
        type=float,
        default=defaults.connect_timeout_s,
        help="give up after this long without reaching the aggregator (s)",
    )


def channel_options(a: argparse.Namespace) -> dict[str, Any]:
    """The ClientConfig fields of the security and timeout options."""
    return {
        "insecure": a.insecure,
        "tls": TlsConfig(cert=a.tls_cert, key=a.tls_key, ca=a.tls_ca),
        "tls_server_name": a.tls_server_name,
        "token": read_token(a.token_file),
        "rpc_timeout_s": a.rpc_timeout,
        "connect_timeout_s": a.connect_timeout,
    }


def observer_config(a: argparse.Namespace) -> ObserverConfig:
    """An ObserverConfig from the security and timeout options."""
    return ObserverConfig(server=a.server, **channel_options(a))


def read_token(path: Path | None) -> str | None:
    """The bearer token in ``path`` (stripped), or None without a file."""
    return read_file(path, "token file").decode().strip() if path else None
