"""What an event says: its versioned JSON body, built once when the event is written and sent
byte for byte by every delivery.

A body carries the event id, type, creation time and lipia's mode, and a snapshot of the payment
as the status endpoint would show it then. It carries no secret and no full phone number: the
phone is masked, and so is the CheckoutRequestID (Daraja ends it with the payer's number);
receivers key on ``payment_id`` or ``order_id``, which the status endpoint accepts too.
"""

from __future__ import annotations

import json
import secrets
from datetime import UTC, datetime
from typing import Any

from lipia.models import LIVE_STATES, EventType, OrderOrigin, Payment
from lipia.payments.status import public_outcome
from lipia.redact import mask_checkout_id, mask_phone, scrub_personal_data

# Bumped only when a field changes meaning or goes away; new fields may appear in any version.
PAYLOAD_VERSION = 1


def new_event_id() -> str:
    return "evt_" + secrets.token_hex(12)


def timestamp(moment: datetime | None) -> str | None:
    """ISO 8601 in UTC with a ``Z``, as the rest of the API writes times."""
    if moment is None:
        return None
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def payment_data(payment: Payment, origin: OrderOrigin, order_paid_at: datetime | None) -> dict[str, Any]:
    """The payment as the frontend's status JSON shows it, plus what a merchant's system needs."""
    outcome = public_outcome(payment)
    completed = outcome.status == "completed"
    return {
        "payment_id": payment.id,
        "status": outcome.status,
        "reason": outcome.reason,
        "final": payment.state not in LIVE_STATES,
        "ResultCode": outcome.result_code,
        "result_desc": scrub_personal_data(payment.result_desc) if payment.result_desc else None,
        "amount": payment.amount,
        "amount_paid": (payment.paid_amount or payment.amount) if completed else None,
        "currency": payment.currency,
        "mpesa_receipt_number": payment.mpesa_receipt_number if completed else None,
        "phone": mask_phone(payment.phone),
        "checkout_request_id": mask_checkout_id(payment.checkout_request_id),
        "order_id": payment.order_id,
        "external_reference": payment.order_id if origin.external else None,
        "order_origin": origin.value,
        "order_paid_at": timestamp(order_paid_at),
        "state": payment.state.value,
        "settled_by": payment.settled_by.value if payment.settled_by else None,
        "review_reason": payment.review_reason,
        "created_at": timestamp(payment.created_at),
        "updated_at": timestamp(payment.updated_at),
    }


def event_body(
    event_id: str, event_type: EventType, created_at: datetime, environment: str | None, data: dict[str, Any]
) -> str:
    """The JSON every delivery of the event sends (Standard Webhooks signs these exact bytes)."""
    return json.dumps(
        {
            "id": event_id,
            "type": event_type.value,
            "version": PAYLOAD_VERSION,
            "created_at": timestamp(created_at),
            "environment": environment,
            "data": data,
        },
        separators=(",", ":"),
    )
