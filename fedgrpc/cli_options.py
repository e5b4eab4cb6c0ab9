"""Command-line options shared by the commands that set up data and training."""

from __future__ import annotations

import argparse

from fedgrpc.config import RoundConfig
from fedgrpc.types import UpdateKind


def add_training_options(p: argparse.ArgumentParser, *, defaults: RoundConfig) -> None:
    """Round, model and learning-rate options; read back by :func:`round_config`."""
    g = p.add_argument_group("training")
    g.add_argument("--rounds", type=int, default=defaults.rounds)
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
    g.add_argument("--local-epochs", type=int, default=defaults.local_epochs)
    g.add_argument(
        "--batch-size",
        type=int,
        default=defaults.batch_size,
        help="local mini-batch size; 0 = full local data",
    )
    g.add_argument(
        "--model",
        default=defaults.model,
        help="logreg, mlp, cnn or package.module:factory",
    )
    g.add_argument("--hidden", type=int, default=defaults.model_hidden)
    g.add_argument("--seed", type=int, default=defaults.seed)
    g.add_argument(
        "--aggregation",
        choices=["samples", "uniform", "digfl"],
        default=defaults.aggregation,
    )
    g.add_argument(
        "--wire-dtype", choices=["float32", "float16", "bfloat16"], default="float32"
    )
    g.add_argument(
        "--round-timeout",
        type=float,
        default=defaults.round_timeout_s,
        help="seconds before a round closes on quorum (or fails)",
    )
    g.add_argument("--join-timeout", type=float, default=defaults.join_timeout_s)
    g.add_argument("--quorum-retries", type=int, default=0)


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
        round_timeout_s=a.round_timeout,
        join_timeout_s=a.join_timeout,
        aggregation=a.aggregation,
        quorum_retries=a.quorum_retries,
        seed=a.seed,
        model=a.model,
        model_hidden=a.hidden,
        wire_dtype=a.wire_dtype,
    )


def add_data_options(p: argparse.ArgumentParser, *, parties: int) -> None:
    """Data set, partition, hold-out and attack options."""
    g = p.add_argument_group("data")
    g.add_argument(
        "--data", default="digits", help="digits, mnist:DIR, npz:FILE, mod:fn"
    )
    g.add_argument("--parties", type=int, default=parties)
    g.add_argument(
        "--partition",
        default="iid",
        help="iid, dirichlet:ALPHA, quantity:ALPHA, shards:K",
    )
    g.add_argument(
        "--val-holdout",
        type=int,
        default=0,
        help="samples held out for validation (0 = the command's default: 20%% of "
        "the data for split and simulate; 360 for digits, else 2000, for shapley)",
    )
    g.add_argument(
        "--train-count",
        type=int,
        default=0,
        help="use only N training samples (0 = all)",
    )
    g.add_argument(
        "--attack",
        action="append",
        default=[],
        metavar="IDX=SPEC",
        help="e.g. 3=label-flip:0.6, 1=mix:6->2:0.8, 2=free-rider, 4=scale:5",
    )
