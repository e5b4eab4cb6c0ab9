"""Every conversion between domain types and protobuf messages, in pairs (DESIGN §2).

``x_to_proto`` builds the message, ``x_from_proto`` reads it back; each pair is
round-trip tested. Proto3 has no presence for scalars: a zero read back means "not
set", and the defaults then come from the config dataclasses, never from here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fedgrpc.config import RoundConfig
from fedgrpc.errors import InvalidUpdateError
from fedgrpc.proto import aggregator_pb2, tensor_pb2
from fedgrpc.types import (
    ContributionReport,
    ModelHeader,
    PartyContribution,
    PartyRound,
    RoundResult,
    RoundSkipped,
    RunState,
    RunStatus,
    SubmitHeader,
    SubmitOutcome,
    TensorSpec,
    TrainingDone,
    UpdateKind,
    round_status_parse,
)
from fedgrpc.wire.tensors import dtype_from_proto, dtype_to_proto, itemsize

_ROUND = RoundConfig()  # the defaults of fields a TrainingConfig leaves unset

MAX_ID_CHARS = 256
"""Longest party id the decoder passes on: the registry's rule (1-64 of
[A-Za-z0-9_.-]) is checked after it, with the id quoted in the refusal; beyond this
length the refusal does not quote it."""
MAX_SUBMISSION_ID_CHARS = 128
"""Longest submission id (the client's own are ``party:round:16 hex``, <= 90)."""
MAX_VERSION_CHARS = 64
"""Longest client version string."""
MAX_DIGEST_BYTES = 64
"""Longest model digest in an upload header (XXH3-128 digests have 16)."""
MAX_FILTER_IDS = 4096
"""Most party ids one GetContributions filter may name."""


def bounded(value: str, limit: int, what: str, rule: str = "") -> str:
    """``value`` if it has at most ``limit`` characters; else INVALID_ARGUMENT.

    The refusal never echoes the value (it may be megabytes long); it states
    ``rule``, or the limit.
    """
    if len(value) > limit:
        raise InvalidUpdateError(
            f"{what} has {len(value)} characters; " + (rule or f"the limit is {limit}")
        )
    return value


_ID_RULE = "need 1-64 of [A-Za-z0-9_.-]"


_KIND_TO_PROTO = {
    UpdateKind.GRADIENT: aggregator_pb2.GRADIENT,
    UpdateKind.DELTA: aggregator_pb2.DELTA,
}
_KIND_FROM_PROTO: dict[int, UpdateKind] = {int(v): k for k, v in _KIND_TO_PROTO.items()}


# ----------------------------------------------------------------------- basics
def update_kind_to_proto(kind: UpdateKind) -> aggregator_pb2.UpdateKind.ValueType:
    """Proto enum of an update kind."""
    return _KIND_TO_PROTO[kind]


def update_kind_from_proto(value: int) -> UpdateKind | None:
    """Update kind of a proto enum value; None when unset or unknown."""
    return _KIND_FROM_PROTO.get(int(value))


def wire_dtype_from_proto(value: int) -> str:
    """The float wire dtype of a ``DType`` field; float32 when unset."""
    return dtype_from_proto(value) if value else "float32"


def spec_to_proto(spec: TensorSpec) -> tensor_pb2.TensorSpec:
    """Proto of a TensorSpec."""
    return tensor_pb2.TensorSpec(
        name=spec.name, dtype=dtype_to_proto(spec.dtype), shape=list(spec.shape)
    )


def spec_from_proto(msg: tensor_pb2.TensorSpec) -> TensorSpec:
    """TensorSpec of a proto, checked."""
    if any(d < 0 for d in msg.shape):
        raise InvalidUpdateError(
            f"tensor {msg.name!r} has a negative dimension {list(msg.shape)}"
        )
    dtype = dtype_from_proto(msg.dtype)
    # Even an empty tensor (a zero dimension) cannot have others no array can address.
    if math.prod(d for d in msg.shape if d) * itemsize(dtype) >= 2**63:
        raise InvalidUpdateError(
            f"tensor {msg.name!r} declares shape {list(msg.shape)}: too large to "
            "address"
        )
    return TensorSpec(msg.name, dtype, tuple(int(d) for d in msg.shape))


def training_config_to_proto(cfg: RoundConfig) -> aggregator_pb2.TrainingConfig:
    """What a party needs of the run's RoundConfig."""
    return aggregator_pb2.TrainingConfig(
        rounds=cfg.rounds,
        update_kind=update_kind_to_proto(cfg.update_kind),
        lr=cfg.lr,
        server_lr=cfg.server_lr,
        local_steps=cfg.local_steps,
        local_epochs=cfg.local_epochs,
        batch_size=cfg.batch_size,
        model=cfg.model,
        model_hidden=cfg.model_hidden,
        seed=cfg.seed,
        wire_dtype=dtype_to_proto(cfg.wire_dtype),
        input_shape=list(cfg.input_shape),
        num_classes=cfg.num_classes,
        round_timeout_s=cfg.round_timeout_s,
        momentum=cfg.momentum,
        weight_decay=cfg.weight_decay,
        prox_mu=cfg.prox_mu,
    )


def training_config_from_proto(tc: aggregator_pb2.TrainingConfig) -> RoundConfig:
    """The RoundConfig a party trains by, from the aggregator's TrainingConfig."""
    return RoundConfig(
        rounds=tc.rounds or _ROUND.rounds,
        update_kind=update_kind_from_proto(tc.update_kind) or _ROUND.update_kind,
        lr=tc.lr or _ROUND.lr,
        server_lr=tc.server_lr or _ROUND.server_lr,
        local_steps=tc.local_steps,
        local_epochs=tc.local_epochs or _ROUND.local_epochs,
        batch_size=tc.batch_size,
        model=tc.model or _ROUND.model,
        model_hidden=tc.model_hidden or _ROUND.model_hidden,
        seed=tc.seed,
        wire_dtype=wire_dtype_from_proto(tc.wire_dtype),
        input_shape=tuple(int(d) for d in tc.input_shape) or _ROUND.input_shape,
        num_classes=tc.num_classes or _ROUND.num_classes,
        round_timeout_s=tc.round_timeout_s or _ROUND.round_timeout_s,
        # 0 means off, so unset and 0 agree; RoundConfig refuses bad values.
        momentum=tc.momentum,
        weight_decay=tc.weight_decay,
        prox_mu=tc.prox_mu,
    )


# ------------------------------------------------------------------------- Join
@dataclass(frozen=True)
class JoinInfo:
    """What a party learns at Join: the run, its model and how to train."""

    run_id: str
    specs: tuple[TensorSpec, ...]
    config: RoundConfig
    open_round: int
    party_id: str


def join_request_to_proto(
    party_id: str, num_samples: int, client_version: str, *, check_only: bool = False
) -> aggregator_pb2.JoinRequest:
    """A JoinRequest (``check_only``: ask for spec and config without joining)."""
    return aggregator_pb2.JoinRequest(
        party_id=party_id,
        num_samples=num_samples,
        client_version=client_version,
        check_only=check_only,
    )


def join_is_check_only(msg: aggregator_pb2.JoinRequest) -> bool:
    """Whether a JoinRequest only asks for the spec and config."""
    return bool(msg.check_only)


def join_request_from_proto(msg: aggregator_pb2.JoinRequest) -> tuple[str, int, str]:
    """(party id, samples, client version) of a JoinRequest (lengths bounded)."""
    return (
        bounded(msg.party_id, MAX_ID_CHARS, "party id", _ID_RULE),
        int(msg.num_samples),
        bounded(msg.client_version, MAX_VERSION_CHARS, "client version"),
    )


def join_reply_to_proto(info: JoinInfo) -> aggregator_pb2.JoinReply:
    """A JoinReply."""
    return aggregator_pb2.JoinReply(
        run_id=info.run_id,
        config=training_config_to_proto(info.config),
        model_spec=tensor_pb2.TensorBundleSpec(
            tensors=[spec_to_proto(s) for s in info.specs]
        ),
        open_round=info.open_round,
        party_id=info.party_id,
    )


def join_reply_from_proto(msg: aggregator_pb2.JoinReply) -> JoinInfo:
    """The JoinInfo of a JoinReply (specs checked)."""
    return JoinInfo(
        run_id=msg.run_id,
        specs=tuple(spec_from_proto(s) for s in msg.model_spec.tensors),
        config=training_config_from_proto(msg.config),
        open_round=int(msg.open_round),
        party_id=msg.party_id,
    )


# ----------------------------------------------------------------- model stream
def get_model_request_to_proto(
    party_id: str, from_round: int
) -> aggregator_pb2.GetModelRequest:
    """A GetModelRequest: the stream of models from ``from_round`` on."""
    return aggregator_pb2.GetModelRequest(party_id=party_id, from_round=from_round)


def get_model_request_from_proto(
    msg: aggregator_pb2.GetModelRequest,
) -> tuple[str, int]:
    """(party id, first round wanted) of a GetModelRequest."""
    return msg.party_id, int(msg.from_round)


def model_header_to_proto(header: ModelHeader) -> aggregator_pb2.ModelMessage:
    """The header message of a model version."""
    return aggregator_pb2.ModelMessage(
        header=aggregator_pb2.ModelHeader(
            round=header.round,
            version=header.round,
            digest=header.digest,
            total_bytes=header.total_bytes,
            wire_dtype=dtype_to_proto(header.wire_dtype),
        )
    )


def model_header_from_proto(msg: aggregator_pb2.ModelHeader) -> ModelHeader:
    """The ModelHeader of a header message."""
    return ModelHeader(
        round=int(msg.round),
        digest=bytes(msg.digest),
        total_bytes=int(msg.total_bytes),
        wire_dtype=wire_dtype_from_proto(msg.wire_dtype),
    )


def model_end_to_proto(digest: bytes) -> aggregator_pb2.ModelMessage:
    """The end marker of a model version."""
    return aggregator_pb2.ModelMessage(end=aggregator_pb2.ModelEnd(digest=digest))


def model_end_from_proto(msg: aggregator_pb2.ModelEnd) -> bytes:
    """The digest an end marker repeats."""
    return bytes(msg.digest)


def training_done_to_proto(done: TrainingDone) -> aggregator_pb2.ModelMessage:
    """The stream's final message."""
    return aggregator_pb2.ModelMessage(
        done=aggregator_pb2.TrainingDone(
            rounds_completed=done.rounds_completed, reason=done.reason
        )
    )


def training_done_from_proto(msg: aggregator_pb2.TrainingDone) -> TrainingDone:
    """The TrainingDone of a done message."""
    return TrainingDone(int(msg.rounds_completed), msg.reason)


def round_skipped_to_proto(skip: RoundSkipped) -> aggregator_pb2.ModelMessage:
    """A skipped message (client sampling: the party sits the round out)."""
    return aggregator_pb2.ModelMessage(
        skipped=aggregator_pb2.RoundSkipped(round=skip.round, reason=skip.reason)
    )


def round_skipped_from_proto(msg: aggregator_pb2.RoundSkipped) -> RoundSkipped:
    """The RoundSkipped of a skipped message."""
    return RoundSkipped(int(msg.round), msg.reason)


# ------------------------------------------------------------------- submission
def submit_header_to_proto(header: SubmitHeader) -> aggregator_pb2.SubmitMessage:
    """The first message of an upload."""
    return aggregator_pb2.SubmitMessage(
        header=aggregator_pb2.SubmitHeader(
            party_id=header.party_id,
            round=header.round,
            num_samples=header.num_samples,
            train_loss=header.train_loss,
            update_kind=update_kind_to_proto(header.update_kind),
            submission_id=header.submission_id,
            model_digest=header.model_digest,
        )
    )


def submit_header_from_proto(msg: aggregator_pb2.SubmitHeader) -> SubmitHeader:
    """The SubmitHeader of a header message (an unset kind is INVALID_ARGUMENT)."""
    bounded(msg.party_id, MAX_ID_CHARS, "party id", _ID_RULE)
    bounded(
        msg.submission_id,
        MAX_SUBMISSION_ID_CHARS,
        f"party {msg.party_id}, round {msg.round}: submission id",
    )
    if len(msg.model_digest) > MAX_DIGEST_BYTES:
        raise InvalidUpdateError(
            f"party {msg.party_id}, round {msg.round}: model digest has "
            f"{len(msg.model_digest)} bytes; the limit is {MAX_DIGEST_BYTES}"
        )
    kind = update_kind_from_proto(msg.update_kind)
    if kind is None:
        raise InvalidUpdateError(
            f"party {msg.party_id}, round {msg.round}: update kind is unset or unknown"
        )
    return SubmitHeader(
        party_id=msg.party_id,
        round=int(msg.round),
        num_samples=int(msg.num_samples),
        train_loss=float(msg.train_loss),
        update_kind=kind,
        submission_id=msg.submission_id,
        model_digest=bytes(msg.model_digest),
    )


def submit_trailer_to_proto(digest: bytes) -> aggregator_pb2.SubmitMessage:
    """The last message of an upload."""
    return aggregator_pb2.SubmitMessage(
        trailer=aggregator_pb2.SubmitTrailer(digest=digest)
    )


def submit_trailer_from_proto(msg: aggregator_pb2.SubmitTrailer) -> bytes:
    """The digest a trailer carries."""
    return bytes(msg.digest)


def submit_reply_to_proto(
    outcome: SubmitOutcome, bytes_received: int
) -> aggregator_pb2.SubmitReply:
    """The reply to an upload."""
    return aggregator_pb2.SubmitReply(
        accepted=outcome.accepted,
        message=outcome.message,
        round=outcome.round,
        submission_id=outcome.submission_id,
        bytes_received=bytes_received,
    )


def submit_reply_from_proto(
    msg: aggregator_pb2.SubmitReply,
) -> tuple[SubmitOutcome, int]:
    """(outcome, bytes received) of a SubmitReply; ``duplicate`` is not on the wire."""
    outcome = SubmitOutcome(
        bool(msg.accepted), int(msg.round), msg.message, msg.submission_id
    )
    return outcome, int(msg.bytes_received)


# ---------------------------------------------------------------- contributions
def contributions_request_to_proto(
    party_ids: Sequence[str] | None,
    from_round: int,
    to_round: int | None,
    method: str = "digfl-1",
) -> aggregator_pb2.ContributionsRequest:
    """A ContributionsRequest (``None`` party ids: every party visible)."""
    return aggregator_pb2.ContributionsRequest(
        party_ids=list(party_ids or ()),
        from_round=from_round,
        to_round=to_round or 0,
        has_to_round=to_round is not None,
        method=method,
    )


def contributions_request_from_proto(
    msg: aggregator_pb2.ContributionsRequest,
) -> tuple[list[str] | None, int, int | None, str]:
    """(party ids or None, from round, to round or None, method) of a request."""
    to_round = int(msg.to_round) if msg.has_to_round else None
    ids = list(msg.party_ids)
    if len(ids) > MAX_FILTER_IDS:
        raise InvalidUpdateError(
            f"the filter names {len(ids)} party ids; the limit is {MAX_FILTER_IDS}"
        )
    for pid in ids:
        bounded(pid, MAX_ID_CHARS, "party id in the filter", _ID_RULE)
    method = msg.method or "digfl-1"
    return ids or None, int(msg.from_round), to_round, method


def report_to_proto(
    report: ContributionReport, *, viewer: str | None = None
) -> aggregator_pb2.ContributionsReply:
    """Encode a ContributionReport; for a ``viewer`` party, only its part of rounds."""
    reply = aggregator_pb2.ContributionsReply(
        run_id=report.run_id,
        method=report.method,
        rounds_done=report.rounds_done,
        pending_rounds=list(report.pending_rounds),
        private_view=report.private,
        rows_digest=report.rows_digest,
    )
    for pc in report.parties:
        msg = reply.parties.add(
            party_id=pc.party_id,
            total=pc.total,
            share=pc.share,
            reference_share=pc.reference_share,
            attack=pc.attack,
            bounded_rounds=pc.bounded_rounds,
            asked_rounds=pc.asked_rounds,
            carry=pc.carry,
        )
        for t, pr in zip(pc.round_indices, pc.rounds, strict=True):
            msg.rounds.add(
                round=t,
                score=pr.score,
                weight=pr.weight,
                num_samples=pr.num_samples,
                update_norm=pr.update_norm,
                train_loss=pr.train_loss,
                weight_samples=pr.weight_samples,
                clip=pr.clip,
                score_2=pr.score2,
                norm_bound=0.0 if math.isinf(pr.norm_bound) else pr.norm_bound,
            )
    for r in report.rounds:
        # A party sees only its own part of each round: other parties' ids, and a round
        # total from which others' scores could be derived, are for admins.
        seen = [p for p in r.parties if viewer is None or p.party_id == viewer]
        carry = {p: c for p, c in r.carry.items() if viewer is None or p == viewer}
        reply.rounds.add(
            round=r.round,
            status=r.status,
            val_loss_before=r.val_loss_before,
            val_acc_before=r.val_acc_before,
            val_loss_after=r.val_loss_after,
            val_acc_after=r.val_acc_after,
            predicted_drop=sum(p.score for p in seen) + sum(carry.values()),
            predicted_drop_2=sum(p.score2 for p in seen) + sum(carry.values()),
            sampled=[p for p in r.sampled or () if viewer is None or p == viewer],
            carry=carry,
            strategy=str(r.extra.get("strategy", "")),
            measured_drop=r.measured_drop,
            submitted=[p.party_id for p in seen],
            late=[p for p in r.late if viewer is None or p == viewer],
            duration_s=r.duration_s,
            val_grad_s=r.val_grad_s,
            aggregate_s=r.aggregate_s,
        )
    return reply


def report_from_proto(reply: aggregator_pb2.ContributionsReply) -> ContributionReport:
    """Decode a ContributionsReply into the domain report.

    What the wire does not carry reads back empty: each round's ``model_digest``,
    and each PartyRound's ``dot`` (NaN), ``submission_id`` and ``digest``.
    """
    parties = []
    for pc in reply.parties:
        rounds = tuple(
            PartyRound(
                party_id=pc.party_id,
                num_samples=int(r.num_samples),
                weight=r.weight,
                score=r.score,
                dot=math.nan,
                update_norm=r.update_norm,
                train_loss=r.train_loss,
                weight_samples=int(r.weight_samples),
                norm_bound=r.norm_bound if r.norm_bound > 0 else math.inf,
                clip=r.clip,
                score2=r.score_2,
            )
            for r in pc.rounds
        )
        parties.append(
            PartyContribution(
                party_id=pc.party_id,
                total=pc.total,
                share=pc.share,
                reference_share=pc.reference_share,
                rounds=rounds,
                round_indices=tuple(int(r.round) for r in pc.rounds),
                attack=pc.attack,
                bounded_rounds=int(pc.bounded_rounds),
                asked_rounds=int(pc.asked_rounds),
                carry=pc.carry,
            )
        )
    by_round: dict[int, list[PartyRound]] = {}
    for p in parties:
        for t, pr in zip(p.round_indices, p.rounds, strict=True):
            by_round.setdefault(t, []).append(pr)
    results = []
    for r in reply.rounds:
        outcome, reason = round_status_parse(r.status)
        order = {pid: i for i, pid in enumerate(r.submitted)}
        members = sorted(
            (pr for pr in by_round.get(int(r.round), []) if pr.party_id in order),
            key=lambda pr: order[pr.party_id],
        )
        results.append(
            RoundResult(
                round=int(r.round),
                outcome=outcome,
                reason=reason,
                parties=tuple(members),
                late=tuple(r.late),
                val_loss_before=r.val_loss_before,
                val_acc_before=r.val_acc_before,
                val_loss_after=r.val_loss_after,
                val_acc_after=r.val_acc_after,
                model_digest="",
                duration_s=r.duration_s,
                val_grad_s=r.val_grad_s,
                aggregate_s=r.aggregate_s,
                extra=_round_extra(r),
            )
        )
    return ContributionReport(
        run_id=reply.run_id,
        method=reply.method,
        parties=tuple(parties),
        rounds=tuple(results),
        rounds_done=int(reply.rounds_done),
        pending_rounds=tuple(int(t) for t in reply.pending_rounds),
        private=reply.private_view,
        rows_digest=reply.rows_digest,
    )


# ----------------------------------------------------------------------- status
def status_to_proto(st: RunStatus) -> aggregator_pb2.StatusReply:
    """A StatusReply."""
    return aggregator_pb2.StatusReply(
        run_id=st.run_id,
        state=st.state.value,
        open_round=st.open_round,
        rounds_total=st.rounds_total,
        rounds_done=st.rounds_done,
        joined=list(st.joined),
        submitted=list(st.submitted),
        late=list(st.late),
        elapsed_s=st.elapsed_s,
        last_round_s=st.last_round_s,
        val_loss=st.val_loss,
        val_acc=st.val_acc,
        reason=st.reason,
    )


def status_from_proto(msg: aggregator_pb2.StatusReply) -> RunStatus:
    """The RunStatus of a StatusReply (an unknown state is INVALID_ARGUMENT)."""
    try:
        state = RunState(msg.state)
    except ValueError:
        raise InvalidUpdateError(f"unknown run state {msg.state!r}") from None
    return RunStatus(
        state=state,
        open_round=int(msg.open_round),
        rounds_total=int(msg.rounds_total),
        rounds_done=int(msg.rounds_done),
        joined=tuple(msg.joined),
        submitted=tuple(msg.submitted),
        late=tuple(msg.late),
        elapsed_s=msg.elapsed_s,
        last_round_s=msg.last_round_s,
        val_loss=msg.val_loss,
        val_acc=msg.val_acc,
        reason=msg.reason,
        run_id=msg.run_id,
    )


def _round_extra(r: aggregator_pb2.RoundMetrics) -> dict[str, Any]:
    """What RoundResult.extra holds of a round's strategy, sampling and carry."""
    extra: dict[str, Any] = {}
    if r.strategy:
        extra["strategy"] = r.strategy
    if r.sampled:
        extra["sampled"] = list(r.sampled)
    if r.carry:
        extra["carry"] = dict(sorted(r.carry.items()))
    return extra
