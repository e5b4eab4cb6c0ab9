"""The aggregator's heart, pure (no grpc, no torch): rounds, uploads, aggregation."""

from fedgrpc.engine.parties import PartyInfo
from fedgrpc.engine.rounds import RoundEngine, Validator, submit_arrays
from fedgrpc.engine.uploads import Resend, Submission, UploadPool
from fedgrpc.types import SubmitOutcome

__all__ = [
    "PartyInfo",
    "Resend",
    "RoundEngine",
    "Submission",
    "SubmitOutcome",
    "UploadPool",
    "Validator",
    "submit_arrays",
]
