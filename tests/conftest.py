"""Shared fixtures: a real aggregator on localhost:0 and raw channels to it."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from fedgrpc.config import ClientConfig, Limits, RoundConfig, ServerConfig
from fedgrpc.proto import aggregator_pb2_grpc
from fedgrpc.server.app import Aggregator

REPO = Path(__file__).resolve().parents[1]
MNIST_DIR = REPO.parent / "shared" / "data" / "mnist"

MakeServer = Callable[..., Aggregator]

_SERVER_DEFAULTS: dict[str, Any] = {"validator": "thread", "insecure": True}


@pytest.fixture
def make_server(tmp_path: Path) -> Iterator[MakeServer]:
    """Start real aggregators (insecure, digits validation) on localhost:0."""
    started: list[Aggregator] = []

    def make(
        *,
        run_dir: Path | None = None,
        limits: Limits | None = None,
        server: dict[str, Any] | None = None,
        **round_kw: Any,
    ) -> Aggregator:
        kw: dict[str, Any] = {
            "rounds": 3,
            "min_parties": 1,
            "round_timeout_s": 30.0,
            "join_timeout_s": 30.0,
            "model": "logreg",
        }
        kw.update(round_kw)
        cfg = ServerConfig(
            round=RoundConfig(**kw),
            address="localhost:0",
            run_dir=run_dir or tmp_path / f"run{len(started)}",
            val_data="digits",
            val_count=200,
            limits=limits or Limits(),
            # In-process validation keeps each test's start-up short; the worker
            # process (the serve default) has its own tests and runs in every e2e test.
            **(_SERVER_DEFAULTS | (server or {})),
        )
        agg = Aggregator(cfg)
        started.append(agg)  # shut down at teardown even if start() raises
        agg.start()
        return agg

    yield make
    for agg in started:
        agg.shutdown(grace_s=0.2, save_open_round=False)


@pytest.fixture
def stub_for() -> Iterator[Callable[[Aggregator], aggregator_pb2_grpc.AggregatorStub]]:
    """A raw generated stub on an insecure channel to a server (closed at teardown)."""
    channels: list[grpc.Channel] = []

    def make(agg: Aggregator) -> aggregator_pb2_grpc.AggregatorStub:
        ch = grpc.insecure_channel(f"localhost:{agg.port}")
        channels.append(ch)
        return aggregator_pb2_grpc.AggregatorStub(ch)

    yield make
    for ch in channels:
        ch.close()


def client_config(agg: Aggregator, party_id: str, **kw: Any) -> ClientConfig:
    """An insecure ClientConfig pointing at ``agg``."""
    base = ClientConfig(
        server=f"localhost:{agg.port}",
        party_id=party_id,
        data="digits",
        insecure=True,
        rpc_timeout_s=30.0,
        connect_timeout_s=10.0,
    )
    return dataclasses.replace(base, **kw)
