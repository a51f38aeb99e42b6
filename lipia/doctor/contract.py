"""The seed's contract, as the frontend reads it (the checklist's sections 2-4 and 8).

The frontend looks at ``status``, ``ResultCode``, ``result_code``, ``payment_status``,
``data.status``, ``data.ResultCode``, ``data.result_code``, in that order; the first one present
decides. It knows a few success values and a few failure values; anything else means "poll
again", so a final state spelt any other way leaves the customer's screen polling for ever.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

# Where the frontend looks, in order (section 2).
FIELDS: tuple[tuple[str, ...], ...] = (
    ("status",),
    ("ResultCode",),
    ("result_code",),
    ("payment_status",),
    ("data", "status"),
    ("data", "ResultCode"),
    ("data", "result_code"),
)
# Section 3 and 4: the only values the frontend acts on.
SUCCESS_VALUES = frozenset({"completed", "success", "SUCCESS", "paid", "PAID", "0", 0})
FAILURE_VALUES = frozenset({"failed", "FAILED", "cancelled", "CANCELED", "insufficient_funds", "1", 1})
# Values that honestly mean "not decided yet" (the frontend polls on, as it should).
PENDING_VALUES = frozenset(
    {"pending", "PENDING", "processing", "PROCESSING", "initiated", "in_progress", "queued", "waiting"}
)

Verdict = Literal["success", "failure", "pending", "unknown"]


@dataclass(frozen=True)
class Reading:
    """What the frontend makes of one status answer."""

    field: str | None  # the field that decided, e.g. "status" or "data.ResultCode"; None: none present
    value: Any
    verdict: Verdict

    @property
    def final(self) -> bool:
        return self.verdict in ("success", "failure")

    def describe(self) -> str:
        if self.field is None:
            return "no field the frontend reads is present"
        known = {
            "success": "a success value the frontend knows",
            "failure": "a failure value the frontend knows",
            "pending": "not final: the frontend polls again",
            "unknown": "a value the frontend does not know: it polls again, for ever if it is final",
        }[self.verdict]
        return f"{self.field} = {self.value!r}: {known}"


def _lookup(body: Any, path: tuple[str, ...]) -> tuple[bool, Any]:
    value = body
    for key in path:
        if not isinstance(value, dict) or key not in value:
            return False, None
        value = value[key]
    return True, value


def classify(value: Any) -> Verdict:
    if isinstance(value, bool):
        return "unknown"
    if value in SUCCESS_VALUES:
        return "success"
    if value in FAILURE_VALUES:
        return "failure"
    if isinstance(value, str) and value in PENDING_VALUES:
        return "pending"
    return "unknown"


def read_status(body: Any) -> Reading:
    """The first field present (and not null) decides, as the frontend's lookup does."""
    for path in FIELDS:
        present, value = _lookup(body, path)
        if present and value is not None:
            return Reading(".".join(path), value, classify(value))
    return Reading(None, None, "unknown")


# Where a backend may have put the status instead (the checklist's section 8).
NESTED_STATUS = (("payment", "status"), ("payment", "state"), ("result", "status"), ("transaction", "status"))
# The ids a status answer may name its payment by.
ID_FIELDS = (
    ("CheckoutRequestID",),
    ("checkout_request_id",),
    ("checkoutRequestID",),
    ("checkoutRequestId",),
    ("data", "CheckoutRequestID"),
    ("data", "checkout_request_id"),
    ("payment", "checkout_request_id"),
    ("payment", "CheckoutRequestID"),
    ("payment_id",),
    ("payment", "id"),
)
RESULT_CODE_FIELDS = (("ResultCode",), ("result_code",), ("data", "ResultCode"), ("data", "result_code"))


def nested_status(body: Any) -> tuple[str, Any] | None:
    """A status the frontend never reads because it is nested (``payment.status``), if any."""
    for path in NESTED_STATUS:
        present, value = _lookup(body, path)
        if present and value is not None:
            return ".".join(path), value
    return None


def named_ids(body: Any) -> dict[str, str]:
    """Every id the answer names its payment by, by field."""
    found: dict[str, str] = {}
    for path in ID_FIELDS:
        present, value = _lookup(body, path)
        if present and isinstance(value, str) and value:
            found[".".join(path)] = value
    return found


def has_result_code(body: Any) -> bool:
    return any(_lookup(body, path)[0] for path in RESULT_CODE_FIELDS)


# Where an initiate answer may carry the id the frontend polls with.
CHECKOUT_ID_FIELDS = (("CheckoutRequestID",),)
MISPLACED_CHECKOUT_ID = (
    ("checkout_request_id",),
    ("checkoutRequestID",),
    ("checkoutRequestId",),
    ("data", "CheckoutRequestID"),
    ("data", "checkout_request_id"),
    ("response", "CheckoutRequestID"),
    ("payment", "checkout_request_id"),
)


def checkout_request_id(body: Any) -> tuple[str | None, str | None]:
    """The initiate answer's ``CheckoutRequestID`` and, when it is missing, where else an id is
    (``data.CheckoutRequestID``...), which the frontend does not read."""
    present, value = _lookup(body, ("CheckoutRequestID",))
    if present and isinstance(value, str) and value:
        return value, None
    for path in MISPLACED_CHECKOUT_ID:
        present, value = _lookup(body, path)
        if present and isinstance(value, str) and value:
            return None, ".".join(path)
    return None, None
