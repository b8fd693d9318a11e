"""Typed, picklable errors: each maps to one HTTP status and one gRPC status code.

User and configuration mistakes raise these; ``assert`` is kept for internal invariants.
They live at the package root because every floor (core, models, serving) raises them.
"""

from __future__ import annotations


class ViaSDError(Exception):
    """Base of every error via-sd-ray raises on purpose."""

    http_status = 500
    grpc_code = "INTERNAL"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __reduce__(self):  # keep the message when Ray pickles the error across processes
        return (type(self), (self.message,))


class InvalidRequest(ViaSDError):
    """A request field is missing, of the wrong type or out of range."""

    http_status = 400
    grpc_code = "INVALID_ARGUMENT"


class ConfigError(ViaSDError):
    """A configuration file or argument is invalid; the message names field, expected and received."""

    http_status = 400
    grpc_code = "INVALID_ARGUMENT"


class ModelNotFound(ViaSDError):
    """The requested model is not served here."""

    http_status = 404
    grpc_code = "NOT_FOUND"


class Overloaded(ViaSDError):
    """The system is at capacity; retry later."""

    http_status = 429
    grpc_code = "RESOURCE_EXHAUSTED"


class Unauthenticated(ViaSDError):
    http_status = 401
    grpc_code = "UNAUTHENTICATED"


class TierUnavailable(ViaSDError):
    """A tier could not serve a call even after retries; the generation can be retried."""

    http_status = 503
    grpc_code = "UNAVAILABLE"


def check_range(field: str, value, low=None, high=None, *, low_open=False, high_open=False, kind=(int, float)):
    """Raise ``InvalidRequest`` naming ``field`` unless ``value`` is a number inside the given range."""
    if isinstance(value, bool) or not isinstance(value, kind):
        names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise InvalidRequest(f"{field}: expected {names}, received {value!r}")
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        lo = "(-inf" if low is None else f"{'(' if low_open else '['}{low}"
        hi = "inf)" if high is None else f"{high}{')' if high_open else ']'}"
        raise InvalidRequest(f"{field}: expected a value in {lo}, {hi}, received {value!r}")
    return value
