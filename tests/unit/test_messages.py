"""Round trips of every domain <-> proto conversion pair in fedgrpc.wire.messages.

Each value goes to its message, through serialized bytes (what the wire carries), and
back; it must come back equal. A last test checks that no pair in the module is left
out of this file.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import pytest
from google.protobuf.message import Message

from fedgrpc import wire
from fedgrpc.config import RoundConfig
from fedgrpc.errors import ConfigError, InvalidUpdateError
from fedgrpc.proto import aggregator_pb2, tensor_pb2
from fedgrpc.types import (
    ContributionReport,
    ModelHeader,
    PartyContribution,
    PartyRound,
    RoundOutcome,
    RoundResult,
    RoundSkipped,
    RunState,
    RunStatus,
    SubmitHeader,
    SubmitOutcome,
    TensorSpec,
    TrainingDone,
    UpdateKind,
)
from fedgrpc.wire import messages


def _via_bytes(msg: Message) -> Any:
    return type(msg).FromString(msg.SerializeToString())


CFG = RoundConfig(
    rounds=7,
    min_parties=1,
    update_kind=UpdateKind.DELTA,
    server_lr=0.25,
    lr=0.125,
    local_steps=3,
    local_epochs=2,
    batch_size=16,
    model="mlp",
    model_hidden=32,
    input_shape=(1, 28, 28),
    num_classes=10,
    seed=5,
    wire_dtype="bfloat16",
    round_timeout_s=12.5,
    momentum=0.875,
    weight_decay=0.0625,
    prox_mu=0.5,
)


def _report() -> ContributionReport:
    a0 = PartyRound("a", 10, 0.25, 0.5, 2.0, 3.0, 0.7, "a:0", "d0")
    b0 = PartyRound("b", 30, 0.75, -0.25, -0.5, 1.5, 0.9, "b:0", "d1")
    a2 = PartyRound("a", 10, 1.0, 0.125, 0.25, 0.5, 0.6, "a:2", "d2")
    rounds = (
        RoundResult(0, RoundOutcome.OK, (a0, b0), (), 2.3, 0.1, 2.0, 0.3, "m0",
                    duration_s=1.5, val_grad_s=0.25, aggregate_s=0.125),
        RoundResult(1, RoundOutcome.FAILED, (), ("a", "b"), 2.0, 0.3, 2.0, 0.3, "m1",
                    reason="round 1: 0 of 2 required submissions"),
        RoundResult(2, RoundOutcome.OK, (a2,), ("b",), 2.0, 0.3, 1.75, 0.5, "m2",
                    extra={"strategy": "median+avgm", "sampled": ["a", "b"],
                           "carry": {"b": -0.0625}}),
    )  # fmt: skip
    parties = (
        PartyContribution("a", 0.625, 2.5, 0.75, (a0, a2), (0, 2), "label-flip:0.2",
                          asked_rounds=2),
        PartyContribution("b", -0.25, -1.5, 0.25, (b0,), (0,), asked_rounds=2,
                          carry=-0.0625),
    )  # fmt: skip
    return ContributionReport("run1", "digfl-1", parties, rounds, 3)


def _unsent(report: ContributionReport) -> ContributionReport:
    """What the wire does not carry, blanked as report_from_proto reads it back."""

    def party_round(p: PartyRound) -> PartyRound:
        return dataclasses.replace(p, dot=math.nan, submission_id="", digest="")

    return dataclasses.replace(
        report,
        parties=tuple(
            dataclasses.replace(pc, rounds=tuple(party_round(p) for p in pc.rounds))
            for pc in report.parties
        ),
        rounds=tuple(
            dataclasses.replace(
                r, model_digest="", parties=tuple(party_round(p) for p in r.parties)
            )
            for r in report.rounds
        ),
    )


def _same(a: Any, b: Any) -> bool:
    """Equality that takes NaN as equal to NaN (recursively through dataclasses)."""
    if dataclasses.is_dataclass(a) and not isinstance(a, type):
        return type(a) is type(b) and all(
            _same(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a)
        )
    if isinstance(a, tuple | list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    return bool(a == b)


# ------------------------------------------------------------------- the pairs
def test_messages_update_kind_round_trip() -> None:
    for kind in UpdateKind:
        assert wire.update_kind_from_proto(wire.update_kind_to_proto(kind)) is kind
    assert wire.update_kind_from_proto(0) is None
    assert wire.update_kind_from_proto(99) is None


def test_messages_spec_round_trip() -> None:
    for spec in (
        TensorSpec("w", "float32", (3, 4)),
        TensorSpec("scalar", "int64", ()),
        TensorSpec("empty", "bool", (0, 2)),
    ):
        assert wire.spec_from_proto(_via_bytes(wire.spec_to_proto(spec))) == spec


def test_messages_spec_negative_dimension_refused() -> None:
    msg = tensor_pb2.TensorSpec(name="w", dtype=tensor_pb2.FLOAT32, shape=[2, -1])

    with pytest.raises(InvalidUpdateError, match="negative dimension"):
        wire.spec_from_proto(msg)


def test_messages_spec_unaddressable_shape_refused() -> None:
    msg = tensor_pb2.TensorSpec(name="w", dtype=tensor_pb2.FLOAT32, shape=[0, 2**62])

    with pytest.raises(InvalidUpdateError, match="too large to address"):
        wire.spec_from_proto(msg)


def test_messages_training_config_round_trip_keeps_what_parties_need() -> None:
    back = wire.training_config_from_proto(
        _via_bytes(wire.training_config_to_proto(CFG))
    )

    # Quorum and aggregation are the server's business: not on the wire.
    party_view = dataclasses.replace(
        CFG,
        min_parties=back.min_parties,
        expected_parties=back.expected_parties,
        aggregation=back.aggregation,
        join_timeout_s=back.join_timeout_s,
        quorum_retries=back.quorum_retries,
    )
    assert back == party_view


def test_messages_training_config_unset_fields_take_the_config_defaults() -> None:
    back = wire.training_config_from_proto(aggregator_pb2.TrainingConfig())

    assert back == RoundConfig(local_steps=0, batch_size=0, seed=0)


def test_messages_training_config_bad_optimiser_values_refused() -> None:
    tc = wire.training_config_to_proto(CFG)
    tc.momentum = 1.5

    with pytest.raises(ConfigError, match=r"--momentum must lie in \[0, 1\)"):
        wire.training_config_from_proto(_via_bytes(tc))


def test_messages_join_request_round_trip() -> None:
    msg = _via_bytes(wire.join_request_to_proto("p3", 120, "0.1.0"))

    assert wire.join_request_from_proto(msg) == ("p3", 120, "0.1.0")


def test_messages_join_reply_round_trip() -> None:
    specs = (TensorSpec("w", "float32", (2, 3)), TensorSpec("b", "float32", (3,)))
    # The config as a party reads it back (server-only fields at their defaults).
    cfg = wire.training_config_from_proto(wire.training_config_to_proto(CFG))
    info = wire.JoinInfo("run1", specs, cfg, 4, "p1")

    assert (
        wire.join_reply_from_proto(_via_bytes(wire.join_reply_to_proto(info))) == info
    )


def test_messages_get_model_request_round_trip() -> None:
    msg = _via_bytes(wire.get_model_request_to_proto("p1", 7))

    assert wire.get_model_request_from_proto(msg) == ("p1", 7)


def test_messages_model_header_end_and_done_round_trip() -> None:
    header = ModelHeader(3, b"\x01" * 16, 4096, "float16")
    done = TrainingDone(9, "completed")

    h = _via_bytes(wire.model_header_to_proto(header))
    e = _via_bytes(wire.model_end_to_proto(b"\x02" * 16))
    d = _via_bytes(wire.training_done_to_proto(done))

    assert h.WhichOneof("kind") == "header"
    assert wire.model_header_from_proto(h.header) == header
    assert wire.model_end_from_proto(e.end) == b"\x02" * 16
    assert wire.training_done_from_proto(d.done) == done


def test_messages_submit_header_and_trailer_round_trip() -> None:
    header = SubmitHeader("p2", 5, 64, 0.5, UpdateKind.GRADIENT, "p2:5", b"\x03" * 16)

    h = _via_bytes(wire.submit_header_to_proto(header))
    t = _via_bytes(wire.submit_trailer_to_proto(b"\x04" * 16))

    assert wire.submit_header_from_proto(h.header) == header
    assert wire.submit_trailer_from_proto(t.trailer) == b"\x04" * 16


def test_messages_submit_header_without_kind_refused() -> None:
    msg = aggregator_pb2.SubmitHeader(party_id="p2", round=1, num_samples=3)

    with pytest.raises(InvalidUpdateError, match="party p2, round 1: update kind"):
        wire.submit_header_from_proto(msg)


def test_messages_submit_reply_round_trip() -> None:
    outcome = SubmitOutcome(True, 4, "party p, round 4: accepted", "p:4")

    back = wire.submit_reply_from_proto(
        _via_bytes(wire.submit_reply_to_proto(outcome, 1234))
    )

    assert back == (outcome, 1234)


def test_messages_contributions_request_round_trip() -> None:
    cases: list[tuple[list[str] | None, int, int | None, str]] = [
        (None, 0, None, "digfl-1"),
        (["a", "b"], 2, 5, "digfl-2"),
        (["a"], 0, 0, "digfl-1"),
    ]
    for args in cases:
        msg = _via_bytes(wire.contributions_request_to_proto(*args))
        assert wire.contributions_request_from_proto(msg) == args


def test_messages_report_round_trip() -> None:
    report = _report()

    msg = _via_bytes(wire.report_to_proto(report))
    back = wire.report_from_proto(msg)

    assert _same(back, _unsent(report))
    # And the decoded report encodes to the very same bytes.
    again = wire.report_to_proto(back).SerializeToString()
    assert again == wire.report_to_proto(report).SerializeToString()
    assert [r.status for r in back.rounds] == [
        "ok",
        "failed: round 1: 0 of 2 required submissions",
        "ok",
    ]


def test_messages_report_for_a_party_shows_only_its_part() -> None:
    msg = wire.report_to_proto(_report(), viewer="a")

    first = msg.rounds[0]
    assert list(first.submitted) == ["a"]
    assert first.predicted_drop == pytest.approx(0.5)  # a's score alone, not a+b
    assert list(msg.rounds[1].late) == ["a"]
    # Nor the others' sampling or momentum carry.
    assert list(msg.rounds[2].sampled) == ["a"]
    assert dict(msg.rounds[2].carry) == {}
    assert msg.rounds[2].predicted_drop == pytest.approx(0.125)
    b_view = wire.report_to_proto(_report(), viewer="b")
    assert dict(b_view.rounds[2].carry) == {"b": -0.0625}
    assert b_view.rounds[2].predicted_drop == pytest.approx(-0.0625)


def test_messages_round_skipped_round_trip() -> None:
    skip = RoundSkipped(7, "not sampled for round 7")
    msg = _via_bytes(wire.round_skipped_to_proto(skip))
    assert msg.WhichOneof("kind") == "skipped"
    assert wire.round_skipped_from_proto(msg.skipped) == skip


def test_messages_status_round_trip() -> None:
    st = RunStatus(
        state=RunState.TRAINING,
        open_round=3,
        rounds_total=10,
        rounds_done=3,
        joined=("a", "b"),
        submitted=("a",),
        late=("b",),
        elapsed_s=12.5,
        last_round_s=0.75,
        val_loss=1.25,
        val_acc=0.5,
        reason="",
        run_id="run1",
    )

    assert wire.status_from_proto(_via_bytes(wire.status_to_proto(st))) == st
    for state in RunState:
        back = wire.status_from_proto(
            wire.status_to_proto(dataclasses.replace(st, state=state, reason="why"))
        )
        assert (back.state, back.reason) == (state, "why")


def test_messages_status_unknown_state_refused() -> None:
    with pytest.raises(InvalidUpdateError, match="unknown run state 'dancing'"):
        wire.status_from_proto(aggregator_pb2.StatusReply(state="dancing"))


# -------------------------------------------------------------- completeness
PAIRS_TESTED = {
    "update_kind": test_messages_update_kind_round_trip,
    "spec": test_messages_spec_round_trip,
    "training_config": test_messages_training_config_round_trip_keeps_what_parties_need,
    "join_request": test_messages_join_request_round_trip,
    "join_reply": test_messages_join_reply_round_trip,
    "get_model_request": test_messages_get_model_request_round_trip,
    "model_header": test_messages_model_header_end_and_done_round_trip,
    "model_end": test_messages_model_header_end_and_done_round_trip,
    "training_done": test_messages_model_header_end_and_done_round_trip,
    "round_skipped": test_messages_round_skipped_round_trip,
    "submit_header": test_messages_submit_header_and_trailer_round_trip,
    "submit_trailer": test_messages_submit_header_and_trailer_round_trip,
    "submit_reply": test_messages_submit_reply_round_trip,
    "contributions_request": test_messages_contributions_request_round_trip,
    "report": test_messages_report_round_trip,
    "status": test_messages_status_round_trip,
}


def test_messages_every_pair_is_round_trip_tested() -> None:
    names = {
        n
        for n in dir(messages)
        if getattr(getattr(messages, n), "__module__", "") == messages.__name__
    }
    to = {n.removesuffix("_to_proto") for n in names if n.endswith("_to_proto")}
    back = {n.removesuffix("_from_proto") for n in names if n.endswith("_from_proto")}
    tested: dict[str, Callable[[], None]] = PAIRS_TESTED

    assert to == back - {"wire_dtype"}, "every conversion comes as a pair"
    assert to == set(tested)
