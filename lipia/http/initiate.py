"""``POST /api/payments/mpesa/initiate``: an STK Push for an order, idempotent on request; and
``POST /api/external-orders``: the merchant's backend registering an order that lives elsewhere
(LIPIA_EXTERNAL_ORDERS=registered), so that initiates may name it."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal
from typing import Annotated

from fastapi import APIRouter, Request, Response, Security
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema, field_validator
from sqlalchemy.exc import IntegrityError

from lipia.errors import error_responses
from lipia.http import idempotency
from lipia.http.security import check_bearer_token
from lipia.http.services import Services, ServicesDep
from lipia.idempotency import KeyLimit
from lipia.payments import initiation
from lipia.payments.status import public_outcome
from lipia.redact import mask_phone
from lipia.shop.orders import (
    EXTERNAL_ORDER_ID_PATTERN,
    MAX_EXTERNAL_ORDER_ID,
    ExternalOrderConflict,
    ExternalOrderIn,
    ExternalOrderOut,
    register_external_order,
)

PHONE_PATTERN = r"^\+?[0-9][0-9 ().-]{7,30}$"

# Every endpoint documents the one error envelope for invalid input (not FastAPI's default shape);
# 400 is a body that is not JSON at all.
router = APIRouter(responses=error_responses(400, 422))


class InitiateRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    phone: Annotated[
        str,
        # Documented tighter than enforced: the normaliser gives the clearer message.
        WithJsonSchema({"type": "string", "pattern": PHONE_PATTERN, "minLength": 9, "maxLength": 32}),
    ] = Field(
        max_length=32,
        description="Kenyan mobile number: 07XXXXXXXX, 01XXXXXXXX, +2547XXXXXXXX, 2547XXXXXXXX, 7XXXXXXXX.",
        # A number the simulator pays; the amount is the total of POST /api/orders' example.
        examples=["254708374149"],
    )
    amount: Annotated[Decimal, WithJsonSchema({"type": "integer", "minimum": 1, "maximum": 250_000})] = Field(
        description="Whole Kenyan shillings; must equal the order's total.", examples=[500]
    )
    order_id: str = Field(
        min_length=1,
        max_length=MAX_EXTERNAL_ORDER_ID,
        pattern=EXTERNAL_ORDER_ID_PATTERN,
        description="An order from POST /api/orders, or one that lives elsewhere as "
        "LIPIA_EXTERNAL_ORDERS allows (registered by your backend, or any id under `open`).",
        examples=["ord_3f9a1c2b7d4e5f60"],
    )

    @field_validator("amount")
    @classmethod
    def _whole_shillings(cls, value: Decimal) -> Decimal:
        if not value.is_finite() or value != value.to_integral_value():
            raise ValueError("amount must be a whole number of shillings")
        if value < 1 or value > 250_000:
            raise ValueError("amount must be between 1 and 250000 shillings")
        return value


class InitiateResponse(BaseModel):
    CheckoutRequestID: str = Field(
        description="The id to poll `GET /api/payments/status/{id}` with: Daraja's CheckoutRequestID, "
        "or lipia's payment id when Daraja's answer to the push was lost (`ResponseCode` null)."
    )
    MerchantRequestID: str | None
    ResponseCode: str | None
    ResponseDescription: str
    CustomerMessage: str
    checkout_request_id: str
    payment_id: str
    order_id: str
    status: str
    amount: int
    phone: str = Field(description="Masked.")
    message: str


@router.post(
    "/api/payments/mpesa/initiate",
    response_model=InitiateResponse,
    tags=["payments"],
    responses={**error_responses(404, 409, 413, 422, 429, 502, 503), **idempotency.RESPONSES},
)
async def initiate_payment(
    body: InitiateRequest,
    request: Request,
    services: ServicesDep,
    idempotency_key: idempotency.IdempotencyKeyHeader = None,
) -> InitiateResponse | JSONResponse:
    """Send an M-Pesa STK Push for an order. A repeat while a push is live returns that payment.

    With an `Idempotency-Key`, a retry with the same body gets the first answer back (status and
    body, header `Idempotent-Replayed: true`) for 72 hours; see lipia/idempotency.py.
    """
    ip = services.client_ip(request)
    if idempotency_key is None:
        return await _initiate(body, services, ip, None)
    settings = services.settings
    return await idempotency.idempotent(
        services.db,
        scope=initiation.IDEMPOTENCY_SCOPE,
        key=idempotency_key,
        request=initiation.idempotency_request(order_id=body.order_id, phone=body.phone, amount=body.amount),
        run=lambda: _initiate(body, services, ip, idempotency_key),
        client_ip=ip,
        limit=KeyLimit(
            per_ip=settings.idempotency_keys_per_ip,
            window=timedelta(seconds=settings.push_limit_window_seconds),
        ),
    )


async def _initiate(
    body: InitiateRequest, services: Services, client_ip: str | None, idempotency_key: str | None
) -> InitiateResponse:
    outcome = await services.payments.initiate(
        order_id=body.order_id,
        phone=body.phone,
        amount=int(body.amount),
        client_ip=client_ip,
        idempotency_key=idempotency_key,
    )
    payment = outcome.payment
    accepted = payment.checkout_request_id is not None
    description = "Success. Request accepted for processing" if accepted else "Request outcome unknown"
    # Always an id the status endpoint resolves: Daraja's, or (its answer lost) lipia's own.
    poll_id = payment.checkout_request_id or payment.id
    return InitiateResponse(
        CheckoutRequestID=poll_id,
        MerchantRequestID=payment.merchant_request_id,
        ResponseCode="0" if accepted else None,
        ResponseDescription=description,
        CustomerMessage=outcome.customer_message,
        checkout_request_id=poll_id,
        payment_id=payment.id,
        order_id=payment.order_id,
        status=public_outcome(payment).status,
        amount=payment.amount,
        phone=mask_phone(payment.phone),
        message=outcome.customer_message,
    )


# -- orders that live elsewhere -----------------------------------------------------------------

_merchant_bearer = HTTPBearer(
    auto_error=False,
    scheme_name="MerchantToken",
    description="LIPIA_MERCHANT_API_TOKEN (or, when that is empty, LIPIA_ADMIN_TOKEN), sent as "
    "`Authorization: Bearer <token>`. For your backend, server to server: never put it in a frontend.",
)


def _require_merchant(services: Services, credentials: HTTPAuthorizationCredentials | None) -> None:
    # No token configured turns registration off.
    check_bearer_token(
        services.settings.merchant_token,
        credentials.credentials if credentials is not None else None,
        realm="lipia-merchant",
        missing="Send the merchant token as 'Authorization: Bearer <LIPIA_MERCHANT_API_TOKEN>' "
        "(LIPIA_ADMIN_TOKEN when that is not set).",
        invalid="The merchant token is not valid.",
    )


@router.post(
    "/api/external-orders",
    response_model=ExternalOrderOut,
    status_code=201,
    tags=["orders"],
    responses={
        200: {"model": ExternalOrderOut, "description": "Already registered with this amount."},
        **error_responses(401, 403, 409),
    },
)
async def register_order(
    body: ExternalOrderIn,
    services: ServicesDep,
    response: Response,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Security(_merchant_bearer)],
) -> ExternalOrderOut:
    """Register an order your backend keeps (its id and amount) so that the frontend may pay it.

    Server to server, with the merchant token. An initiate for this `order_id` must then send this
    `amount`; the order is paid at most once. Registering the same id with the same amount again
    answers 200 with the order as it stands; another amount is a 409.
    """
    _require_merchant(services, credentials)
    policy = services.settings.external_order_policy
    for _ in range(2):
        try:
            async with services.db.write() as session:
                order, created = await register_external_order(session, body, policy)
                out = ExternalOrderOut.from_order(order, created=created)
        except IntegrityError:
            # Registered by a concurrent request between our read and insert: look again.
            continue
        if not created:
            response.status_code = 200
        response.headers["Cache-Control"] = "no-store"
        return out
    raise ExternalOrderConflict(f"Order {body.order_id!r} is being registered by another request; try again.")
