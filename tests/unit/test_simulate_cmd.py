"""simulate's aggregator command line: the limits it raises for its own parties."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from fedgrpc.cli.main import build_parser
from fedgrpc.cli.simulate import _serve_cmd
from fedgrpc.config import SIMULATE_ROUND, Limits


def _serve_args(n_parties: int, concurrent_joins: int) -> argparse.Namespace:
    cmd = _serve_cmd(
        SIMULATE_ROUND,
        run_dir=Path("r"),
        data_dir=Path("d"),
        port_file=Path("p"),
        n_parties=n_parties,
        join_timeout_s=60.0,
        concurrent_joins=concurrent_joins,
    )
    assert cmd[1:3] == ["-m", "fedgrpc"]
    return build_parser().parse_args(cmd[3:])  # the real `serve` parser


@pytest.mark.parametrize(
    ("n", "joins", "max_parties", "unary"),
    [
        (5, 5, Limits().max_parties, Limits().max_concurrent_unary),
        # 100 processes join at once: a refused Join is not retried.
        (100, 100, Limits().max_parties, 108),
        # The Ray pool paces its joins: the default cap; more parties than 1024.
        (2000, 0, 2000, Limits().max_concurrent_unary),
    ],
)
def test_simulate_serve_cmd_raises_the_limits_its_parties_need(
    n: int, joins: int, max_parties: int, unary: int
) -> None:
    a = _serve_args(n, joins)

    assert a.max_parties == max_parties
    assert a.max_concurrent_unary == unary
    assert a.expected_parties == n
