"""Domain exceptions and the status codes they map to (no grpc import).

Every fedgrpc error carries an :class:`ErrorCode`, named like the gRPC status it
becomes at the edge: the servicer aborts with ``grpc.StatusCode[err.code.name]`` and
the client stub turns a failed call back into a :class:`RemoteError` with the same
code, so callers compare ``err.code is ErrorCode.UNAVAILABLE`` without importing grpc.
"""

from __future__ import annotations

from enum import StrEnum


class ErrorCode(StrEnum):
    """The gRPC status codes, by name (``grpc.StatusCode[code.name]`` at the edge)."""

    OK = "OK"
    CANCELLED = "CANCELLED"
    UNKNOWN = "UNKNOWN"
    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    NOT_FOUND = "NOT_FOUND"
    ALREADY_EXISTS = "ALREADY_EXISTS"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    ABORTED = "ABORTED"
    OUT_OF_RANGE = "OUT_OF_RANGE"
    UNIMPLEMENTED = "UNIMPLEMENTED"
    INTERNAL = "INTERNAL"
    UNAVAILABLE = "UNAVAILABLE"
    DATA_LOSS = "DATA_LOSS"
    UNAUTHENTICATED = "UNAUTHENTICATED"

    @classmethod
    def of(cls, name: str) -> ErrorCode:
        """The code called ``name``; UNKNOWN for a name gRPC does not define."""
        try:
            return cls(name)
        except ValueError:
            return cls.UNKNOWN


class FedGrpcError(Exception):
    """Base class of every fedgrpc error; ``code`` is the status it maps to."""

    code: ErrorCode = ErrorCode.INTERNAL

    def __init__(self, message: str, *, code: ErrorCode | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class InvalidUpdateError(FedGrpcError):
    """Malformed input: bad bytes, wrong names, dtypes or shapes, non-finite values."""

    code = ErrorCode.INVALID_ARGUMENT


class StaleRoundError(FedGrpcError):
    """Wrong, past or future round, or training already over."""

    code = ErrorCode.FAILED_PRECONDITION


class DuplicateSubmissionError(FedGrpcError):
    """A second, different submission for a round that already has one."""

    code = ErrorCode.ALREADY_EXISTS


class PreconditionError(FedGrpcError):
    """A request that conflicts with the run's state (e.g. changing a fixed count)."""

    code = ErrorCode.FAILED_PRECONDITION


class UnknownPartyError(FedGrpcError):
    """A party that has not joined."""

    code = ErrorCode.FAILED_PRECONDITION


class AuthError(FedGrpcError):
    """Missing or unknown credentials."""

    code = ErrorCode.UNAUTHENTICATED


class ForbiddenError(FedGrpcError):
    """Authenticated, but acting for someone else or reading what is not yours."""

    code = ErrorCode.PERMISSION_DENIED


class LimitError(FedGrpcError):
    """A declared or actual size above a configured limit."""

    code = ErrorCode.RESOURCE_EXHAUSTED


class ConfigError(FedGrpcError):
    """Invalid configuration or arguments."""

    code = ErrorCode.INVALID_ARGUMENT


class NotFoundError(FedGrpcError):
    """A file or record that should exist does not (e.g. no ledger in a run dir)."""

    code = ErrorCode.NOT_FOUND


class UnavailableError(FedGrpcError):
    """A part the run needs is not there (yet): starting up, or a worker died."""

    code = ErrorCode.UNAVAILABLE


class RemoteError(FedGrpcError):
    """An RPC failed; ``code`` is its gRPC status."""


class ConnectionSetupError(FedGrpcError):
    """A connection that can never work as configured (TLS names, CA, mode)."""

    code = ErrorCode.FAILED_PRECONDITION
