"""The status JSON the frontend polls, in the shape the frontend team's checklist asks for.

The frontend reads ``status``, ``ResultCode``, ``result_code``, ``payment_status``,
``data.status``, ``data.ResultCode``, ``data.result_code`` in that order and knows only a few
values. So ``status`` is always one it knows (``pending`` or a final ``completed``, ``failed``,
``cancelled``, ``insufficient_funds``), the finer reason goes in ``reason``, and every mirrored
field says the same thing.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field

from lipia.models import OrderOrigin, Payment, PaymentState
from lipia.redact import mask_phone

PublicStatus = Literal["pending", "completed", "failed", "cancelled", "insufficient_funds"]

_REASON_BY_CODE = {
    "1037": "timeout",
    "1036": "timeout",
    "2001": "wrong_pin",
    "1019": "expired",
    "2": "limit",
    "3": "limit",
    "4": "limit",
    "8": "limit",
    "17": "limit",
}

_MESSAGES = {
    "pending": "Check your phone and enter your M-Pesa PIN to pay.",
    "completed": "Payment received. Thank you!",
    "insufficient_funds": "Your M-Pesa balance is too low for this payment.",
    "cancelled": "You cancelled the M-Pesa prompt. You can try again.",
    "timeout": "The M-Pesa prompt was not answered in time. You can try again.",
    "wrong_pin": "The M-Pesa PIN was wrong. You can try again.",
    "expired": "The M-Pesa prompt expired before it was answered. You can try again.",
    "limit": "M-Pesa declined the payment because of a transaction limit.",
    "needs_review": "We could not confirm this payment automatically. Please do not pay again; "
    "our staff will check it.",
    "completed_needs_review": "Payment received. Thank you! Our staff will double-check one detail.",
    "failed": "The payment did not go through. You can try again.",
}


@dataclass(frozen=True)
class PublicOutcome:
    status: PublicStatus
    reason: str | None
    result_code: str | None


def public_outcome(payment: Payment) -> PublicOutcome:
    state = payment.state
    code = payment.result_code
    if state in (PaymentState.INITIATING, PaymentState.PENDING, PaymentState.UNKNOWN):
        return PublicOutcome("pending", None, None)
    if state is PaymentState.COMPLETED:
        return PublicOutcome("completed", None, "0")
    if state is PaymentState.INSUFFICIENT_FUNDS:
        return PublicOutcome("insufficient_funds", None, code or "1")
    if state is PaymentState.CANCELLED:
        return PublicOutcome("cancelled", None, code or "1032")
    if state is PaymentState.EXPIRED:
        # Inferred by us, not reported by Daraja: there is no Daraja code to show.
        return PublicOutcome("failed", "expired", None)
    if state is PaymentState.NEEDS_REVIEW:
        if code == "0":
            # It was paid and verified before the conflicting evidence came: the money arrived
            # and the order stays paid, so the customer sees success; staff see the review.
            return PublicOutcome("completed", "needs_review", "0")
        # Never "0" next to a non-success status: no field may contradict another.
        return PublicOutcome("failed", "needs_review", None)
    reason = _REASON_BY_CODE.get(code or "", code or "failed")
    return PublicOutcome("failed", reason, code)


class StatusData(BaseModel):
    status: PublicStatus
    ResultCode: str | None
    result_code: str | None


class PaymentSummary(BaseModel):
    id: str
    status: PublicStatus
    amount: int
    currency: str
    mpesa_receipt_number: str | None
    phone: str = Field(description="Masked, e.g. 2547****678.")
    order_id: str
    checkout_request_id: str | None
    created_at: datetime
    updated_at: datetime


class PaymentStatusResponse(BaseModel):
    status: PublicStatus
    payment_status: PublicStatus
    final: bool
    reason: str | None
    message: str
    ResultCode: str | None
    result_code: str | None
    ResultDesc: str | None
    CheckoutRequestID: str = Field(
        description="Daraja's CheckoutRequestID once known; until then lipia's payment id (the id "
        "the initiate answer gave when Daraja's answer to the push was lost)."
    )
    checkout_request_id: str
    payment_id: str
    order_id: str
    external_reference: str | None = Field(
        description="The order id, when the order lives elsewhere (registered by the merchant's "
        "backend, or opened by its first initiate); null for lipia's own orders."
    )
    order_origin: OrderOrigin
    amount: int
    amount_paid: int | None = Field(
        description="What M-Pesa says was paid (the amount, unless it reported another), once completed."
    )
    currency: str
    mpesa_receipt_number: str | None
    data: StatusData
    payment: PaymentSummary


def status_response(payment: Payment, origin: OrderOrigin = OrderOrigin.LIPIA) -> PaymentStatusResponse:
    """The status JSON of a payment whose order has this ``origin``."""
    outcome = public_outcome(payment)
    final = outcome.status != "pending"
    key = outcome.reason or outcome.status
    if outcome.status == "completed" and outcome.reason:
        key = f"completed_{outcome.reason}"
    message = _MESSAGES.get(key, _MESSAGES["failed"])
    receipt = payment.mpesa_receipt_number if outcome.status == "completed" else None
    return PaymentStatusResponse(
        status=outcome.status,
        payment_status=outcome.status,
        final=final,
        reason=outcome.reason,
        message=message,
        ResultCode=outcome.result_code,
        result_code=outcome.result_code,
        ResultDesc=payment.result_desc if final and outcome.result_code is not None else None,
        CheckoutRequestID=payment.checkout_request_id or payment.id,
        checkout_request_id=payment.checkout_request_id or payment.id,
        payment_id=payment.id,
        order_id=payment.order_id,
        external_reference=payment.order_id if origin.external else None,
        order_origin=origin,
        amount=payment.amount,
        amount_paid=(payment.paid_amount or payment.amount) if outcome.status == "completed" else None,
        currency=payment.currency,
        mpesa_receipt_number=receipt,
        data=StatusData(
            status=outcome.status, ResultCode=outcome.result_code, result_code=outcome.result_code
        ),
        payment=PaymentSummary(
            id=payment.id,
            status=outcome.status,
            amount=payment.amount,
            currency=payment.currency,
            mpesa_receipt_number=receipt,
            phone=mask_phone(payment.phone),
            order_id=payment.order_id,
            checkout_request_id=payment.checkout_request_id,
            created_at=payment.created_at,
            updated_at=payment.updated_at,
        ),
    )


# -- an id no payment has ------------------------------------------------------------------------

UNKNOWN_PAYMENT_MESSAGE = (
    "no payment with this id: check you pass the CheckoutRequestID from the initiate response"
)


def unknown_payment_body(error: str, detail: str) -> dict[str, object]:
    """The 404 body of a status poll for an id no payment has: the error envelope, and the status
    fields the frontend reads saying "failed", so its wait ends instead of polling forever."""
    data = {"status": "failed", "ResultCode": None, "result_code": None}
    return {
        "error": error,
        "detail": detail,
        "status": "failed",
        "payment_status": "failed",
        "final": True,
        "reason": "unknown_payment",
        "message": UNKNOWN_PAYMENT_MESSAGE,
        "ResultCode": None,
        "result_code": None,
        "data": data,
    }
