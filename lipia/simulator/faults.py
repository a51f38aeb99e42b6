"""Faults armed through the control API, and the JSON that arms them.

Each fault group fires for the next `times` pushes (or calls), or until cleared when `times` is
omitted. `POST /simulator/faults` replaces the groups it names (`null` clears one); the whole body
is validated before anything changes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, Literal, TypeVar, cast

T = TypeVar("T")

CallbackMode = Literal["normal", "drop", "duplicate", "delay", "before_response"]
PushMode = Literal["error", "reset_after_accept"]
PendingShape = Literal["500", "4999"]
CALLBACK_MODES: tuple[CallbackMode, ...] = ("normal", "drop", "duplicate", "delay", "before_response")
PUSH_MODES: tuple[PushMode, ...] = ("error", "reset_after_accept")
PENDING_SHAPES: tuple[PendingShape, ...] = ("500", "4999")

MAX_SECONDS = 3600.0
MAX_DUPLICATES = 50

# Daraja's words (errorMessage) for its gateway errors, used when none is given.
DEFAULT_ERROR_CODE = "500.003.02"
KNOWN_ERROR_MESSAGES = {
    "500.003.02": "Error Occurred: Spike Arrest Violation",
    "500.003.03": "Quota Violation",
    "500.003.1001": "Internal Server Error",
}


class FaultError(ValueError):
    """A control-API body that cannot be applied; the message says which value is wrong."""


@dataclass(frozen=True, slots=True)
class CallbackFault:
    mode: CallbackMode = "normal"
    count: int = 1  # deliveries made (duplicate: all at once)
    delay_seconds: float = 0.0  # extra wait after the customer acted, before delivering


@dataclass(frozen=True, slots=True)
class ErrorFault:
    status: int
    error_code: str
    error_message: str


@dataclass(frozen=True, slots=True)
class PushFault:
    mode: PushMode
    error: ErrorFault | None = None  # set for mode "error"


@dataclass(frozen=True, slots=True)
class QueryFault:
    lag_seconds: float = 0.0  # keep answering "being processed" this long after the customer acted
    contradict: bool = False  # answer the opposite of what happened
    # How "still processing" looks: the 500.001.1001 error envelope, or an HTTP 200 answer with
    # ResultCode 4999 (some Daraja eras answer a pending query that way).
    pending_shape: PendingShape = "500"


@dataclass(slots=True)
class Armed(Generic[T]):
    fault: T
    remaining: int | None  # None: until cleared

    def take(self) -> T | None:
        if self.remaining is None:
            return self.fault
        if self.remaining <= 0:
            return None
        self.remaining -= 1
        return self.fault


GROUPS = ("callback", "push", "query", "query_error", "oauth_error", "token_ttl_seconds")


class Faults:
    """The faults currently armed. Taking a fault consumes one of its `times`."""

    callback: Armed[CallbackFault] | None
    push: Armed[PushFault] | None
    query: Armed[QueryFault] | None
    query_error: Armed[ErrorFault] | None
    oauth_error: Armed[ErrorFault] | None
    token_ttl_seconds: float | None

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self.callback = self.push = self.query = None
        self.query_error = self.oauth_error = None
        self.token_ttl_seconds = None

    def take_callback(self) -> CallbackFault:
        taken = self.callback.take() if self.callback else None
        return taken or CallbackFault()

    def take_push(self) -> PushFault | None:
        return self.push.take() if self.push else None

    def take_query(self) -> QueryFault:
        taken = self.query.take() if self.query else None
        return taken or QueryFault()

    def take_query_error(self) -> ErrorFault | None:
        return self.query_error.take() if self.query_error else None

    def take_oauth_error(self) -> ErrorFault | None:
        return self.oauth_error.take() if self.oauth_error else None

    def update(self, body: object) -> None:
        """Apply a `POST /simulator/faults` body, all or nothing."""
        data = _object(body, "body")
        _only(data, GROUPS, "body")
        parsed: dict[str, Any] = {}
        for key, value in data.items():
            if value is None:
                parsed[key] = None
            elif key == "token_ttl_seconds":
                parsed[key] = _seconds(value, key, positive=True)
            else:
                parsed[key] = _PARSERS[key](_object(value, key))
        for key, value in parsed.items():
            setattr(self, key, value)

    def to_json(self) -> dict[str, Any]:
        return {
            "callback": _armed_json(self.callback, _callback_json),
            "push": _armed_json(self.push, _push_json),
            "query": _armed_json(self.query, _query_json),
            "query_error": _armed_json(self.query_error, _error_json),
            "oauth_error": _armed_json(self.oauth_error, _error_json),
            "token_ttl_seconds": self.token_ttl_seconds,
        }


def _armed_json(armed: Armed[T] | None, dump: Callable[[T], dict[str, Any]]) -> dict[str, Any] | None:
    if armed is None or armed.remaining == 0:
        return None
    return {**dump(armed.fault), "times": armed.remaining}


def _callback_json(fault: CallbackFault) -> dict[str, Any]:
    return {"mode": fault.mode, "count": fault.count, "delay_seconds": fault.delay_seconds}


def _error_json(fault: ErrorFault) -> dict[str, Any]:
    return {"status": fault.status, "error_code": fault.error_code, "error_message": fault.error_message}


def _push_json(fault: PushFault) -> dict[str, Any]:
    return {"mode": fault.mode, **(_error_json(fault.error) if fault.error else {})}


def _query_json(fault: QueryFault) -> dict[str, Any]:
    return {
        "lag_seconds": fault.lag_seconds,
        "contradict": fault.contradict,
        "pending_shape": fault.pending_shape,
    }


# -- parsing -------------------------------------------------------------------------------------


def _object(value: object, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise FaultError(f"{where} must be a JSON object")
    return cast(dict[str, Any], value)


def _only(data: dict[str, Any], allowed: tuple[str, ...], where: str) -> None:
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise FaultError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(allowed)}")


def _seconds(value: object, where: str, *, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise FaultError(f"{where} must be a number of seconds")
    if value < 0 or (positive and value == 0) or value > MAX_SECONDS:
        bound = "> 0" if positive else ">= 0"
        raise FaultError(f"{where} must be {bound} and <= {MAX_SECONDS:g}")
    return float(value)


def _int(value: object, where: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise FaultError(f"{where} must be an integer from {low} to {high}")
    return value


def _times(data: dict[str, Any], where: str) -> int | None:
    value = data.get("times")
    return None if value is None else _int(value, f"{where}.times", 1, 1_000_000)


def _choice(value: object, where: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise FaultError(f"{where} must be one of {', '.join(choices)}")
    return value


def _parse_error(data: dict[str, Any], where: str) -> ErrorFault:
    status = _int(data.get("status", 500), f"{where}.status", 400, 599)
    code = data.get("error_code", DEFAULT_ERROR_CODE)
    if not isinstance(code, str) or not 1 <= len(code) <= 64:
        raise FaultError(f"{where}.error_code must be a string of 1 to 64 characters")
    message = data.get("error_message", KNOWN_ERROR_MESSAGES.get(code, "Error Occurred"))
    if not isinstance(message, str) or len(message) > 500:
        raise FaultError(f"{where}.error_message must be a string of at most 500 characters")
    return ErrorFault(status, code, message)


def _parse_error_group(data: dict[str, Any], where: str) -> Armed[ErrorFault]:
    _only(data, ("status", "error_code", "error_message", "times"), where)
    return Armed(_parse_error(data, where), _times(data, where))


def _parse_callback(data: dict[str, Any]) -> Armed[CallbackFault]:
    _only(data, ("mode", "count", "delay_seconds", "times"), "callback")
    mode = cast(CallbackMode, _choice(data.get("mode", "normal"), "callback.mode", CALLBACK_MODES))
    if "count" in data and mode != "duplicate":
        raise FaultError("callback.count only applies to mode duplicate")
    if "delay_seconds" in data and mode not in {"delay", "duplicate", "normal"}:
        raise FaultError(f"callback.delay_seconds does not apply to mode {mode}")
    if mode == "delay" and "delay_seconds" not in data:
        raise FaultError("callback mode delay needs delay_seconds")
    count = _int(data.get("count", 2), "callback.count", 2, MAX_DUPLICATES) if mode == "duplicate" else 1
    delay = _seconds(data.get("delay_seconds", 0.0), "callback.delay_seconds")
    return Armed(CallbackFault(mode, count, delay), _times(data, "callback"))


def _parse_push(data: dict[str, Any]) -> Armed[PushFault]:
    mode = cast(PushMode, _choice(data.get("mode"), "push.mode", PUSH_MODES))
    if mode == "reset_after_accept":
        _only(data, ("mode", "times"), "push (mode reset_after_accept)")
        return Armed(PushFault(mode), _times(data, "push"))
    _only(data, ("mode", "status", "error_code", "error_message", "times"), "push")
    return Armed(PushFault(mode, _parse_error(data, "push")), _times(data, "push"))


def _parse_query(data: dict[str, Any]) -> Armed[QueryFault]:
    _only(data, ("lag_seconds", "contradict", "pending_shape", "times"), "query")
    lag = _seconds(data.get("lag_seconds", 0.0), "query.lag_seconds")
    contradict = data.get("contradict", False)
    if not isinstance(contradict, bool):
        raise FaultError("query.contradict must be true or false")
    shape = cast(
        PendingShape, _choice(data.get("pending_shape", "500"), "query.pending_shape", PENDING_SHAPES)
    )
    return Armed(QueryFault(lag, contradict, shape), _times(data, "query"))


_PARSERS: dict[str, Callable[[dict[str, Any]], Armed[Any]]] = {
    "callback": _parse_callback,
    "push": _parse_push,
    "query": _parse_query,
    "query_error": lambda data: _parse_error_group(data, "query_error"),
    "oauth_error": lambda data: _parse_error_group(data, "oauth_error"),
}
