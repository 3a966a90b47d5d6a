"""Error types at Offramp's boundaries. Front ends map them to HTTP / gRPC status codes.

Messages are written for the person who has to act on them: they name the problem
and the fix.
"""
from __future__ import annotations


class OfframpError(Exception):
    """Base class. ``http_status`` / ``grpc_code`` tell front ends how to report it."""

    http_status = 500
    grpc_code = "INTERNAL"
    error_type = "server_error"
    retry_after_s: float | None = None


class ConfigError(OfframpError, ValueError):
    """Bad model directory, split, stage or exit configuration (operator's fix)."""

    http_status = 500
    error_type = "server_error"


class BadRequest(OfframpError, ValueError):
    """The client's request cannot be served as asked (400 / INVALID_ARGUMENT)."""

    http_status = 400
    grpc_code = "INVALID_ARGUMENT"
    error_type = "invalid_request_error"

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class Overloaded(OfframpError):
    """Queues are full; retry later (429 / RESOURCE_EXHAUSTED)."""

    http_status = 429
    grpc_code = "RESOURCE_EXHAUSTED"
    error_type = "rate_limit_error"
    retry_after_s = 1.0


class StageUnavailable(OfframpError):
    """A stage replica died or cannot be reached; retryable (503 / UNAVAILABLE)."""

    http_status = 503
    grpc_code = "UNAVAILABLE"
    error_type = "server_error"
    retry_after_s = 2.0


class DeadlineExceeded(OfframpError):
    """The request ran past its deadline (504 / DEADLINE_EXCEEDED)."""

    http_status = 504
    grpc_code = "DEADLINE_EXCEEDED"
    error_type = "timeout"


class RowFailed(OfframpError):
    """One request's own computation failed deterministically inside a stage (non-finite
    logits, sampling math): that request fails alone - the batch's other rows are served,
    the replica is healthy, and replaying would only fail again (500 / INTERNAL; the
    message is safe to show: it names no internal address)."""

    http_status = 500
    grpc_code = "INTERNAL"
    error_type = "server_error"
    public = True  # front ends show the message instead of the generic one
