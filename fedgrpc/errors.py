"""Domain exceptions. The servicer maps each class to a gRPC status (STATUS_FOR)."""

from __future__ import annotations


class FedGrpcError(Exception):
    """Base class of every fedgrpc error; ``code`` names the gRPC status it maps to."""

    code: str = "INTERNAL"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class InvalidUpdateError(FedGrpcError):
    """Malformed input: bad bytes, wrong names, dtypes or shapes, non-finite values."""

    code = "INVALID_ARGUMENT"


class StaleRoundError(FedGrpcError):
    """Wrong, past or future round, or training already over."""

    code = "FAILED_PRECONDITION"


class DuplicateSubmissionError(FedGrpcError):
    """A second, different submission for a round that already has one."""

    code = "ALREADY_EXISTS"


class UnknownPartyError(FedGrpcError):
    """A party that has not joined."""

    code = "FAILED_PRECONDITION"


class AuthError(FedGrpcError):
    """Missing or unknown credentials."""

    code = "UNAUTHENTICATED"


class ForbiddenError(FedGrpcError):
    """Authenticated, but acting for someone else or reading what is not yours."""

    code = "PERMISSION_DENIED"


class LimitError(FedGrpcError):
    """A declared or actual size above a configured limit."""

    code = "RESOURCE_EXHAUSTED"


class ConfigError(FedGrpcError):
    """Invalid configuration or arguments."""

    code = "INVALID_ARGUMENT"


class RunFailedError(FedGrpcError):
    """The run ended without completing (quorum lost, no parties joined in time)."""

    code = "FAILED_PRECONDITION"


class RemoteError(FedGrpcError):
    """An RPC failed; ``code`` is the gRPC status name, e.g. ``"UNAVAILABLE"``."""
