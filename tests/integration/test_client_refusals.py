"""A party survives a transient refusal of one upload (issue 11 item 13)."""

from __future__ import annotations

import logging
import threading

import numpy as np
import pytest

from fedgrpc.client.party import PartyResult, run_party
from fedgrpc.config import Limits
from fedgrpc.datasets.sources import load_dataset, subset
from tests.conftest import MakeServer, client_config
from tests.integration.test_service import (
    StubFor,
    _held_upload,
    _join,
    _submission,
    _update,
    _wait_for,
)

pytestmark = pytest.mark.integration

_TIMEOUT_S = 20.0


def test_party_skips_a_round_refused_resource_exhausted_and_carries_on(
    make_server: MakeServer, stub_for: StubFor, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="fedgrpc.client")
    limits = Limits(max_inflight_uploads=1, upload_slot_timeout_s=0.3)
    agg = make_server(rounds=2, min_parties=1, round_timeout_s=3.0, limits=limits)
    stub = stub_for(agg)
    _join(stub, "mallory")
    _wait_for("round 0's model", lambda: agg.broadcaster.latest is not None)
    specs = agg.engine.specs
    msgs = _submission("mallory", 0, specs, _update(specs, 3), chunk_bytes=256)
    go = threading.Event()
    held = stub.SubmitGradient.future(
        _held_upload(msgs[:2], msgs[2:], go), timeout=_TIMEOUT_S
    )
    _wait_for("mallory's slot", lambda: agg.engine.uploads.in_flight == 1)
    data = subset(load_dataset("digits"), np.arange(200))
    out: list[PartyResult | BaseException] = []

    def party() -> None:
        try:
            out.append(run_party(client_config(agg, "alice"), data))
        except BaseException as err:
            out.append(err)

    t = threading.Thread(target=party, daemon=True)
    t.start()
    try:
        _wait_for(
            "alice's round-0 upload to be refused",
            lambda: any(
                "round 0 not counted" in r.getMessage() for r in caplog.records
            ),
            timeout_s=_TIMEOUT_S,
        )
    finally:
        go.set()
    assert held.result(timeout=_TIMEOUT_S).accepted
    t.join(timeout=_TIMEOUT_S)

    assert len(out) == 1 and isinstance(out[0], PartyResult), out
    assert out[0].reason == "completed"
    rounds = agg.ledger.rounds()
    assert [sorted(p.party_id for p in r.parties) for r in rounds] == [
        ["mallory"],
        ["alice"],
    ]
    refusal = next(r for r in caplog.records if "round 0 not counted" in r.getMessage())
    assert "RESOURCE_EXHAUSTED" in refusal.getMessage()
