"""HTTP endpoints: thin, each calls one domain function. The contract is design.md §2."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from decimal import Decimal
from typing import Annotated, Any

from fastapi import APIRouter, BackgroundTasks, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema, field_validator
from sqlalchemy import text

from lipia import idempotency
from lipia.background import BackgroundRunner
from lipia.callbacks import MAX_ID_NUMBER
from lipia.config import Settings
from lipia.db import Database
from lipia.errors import CallbackSourceRefused, ErrorResponse, error_body, error_responses
from lipia.inbox import MAX_STORED_BODY, CallbackInboxService
from lipia.menu import Menu
from lipia.orders import OrderCreate, OrderOut, create_order, get_order
from lipia.payments import PaymentService, find_payment
from lipia.redact import mask_phone
from lipia.security import CallbackSourceCheck, Network, client_ip
from lipia.status import PaymentStatusResponse, public_outcome, status_response

logger = logging.getLogger("lipia.api")

PHONE_PATTERN = r"^\+?[0-9][0-9 ().-]{7,30}$"


@dataclass
class Services:
    """Everything the endpoints need, built once by the app's lifespan."""

    settings: Settings
    db: Database
    menu: Menu
    payments: PaymentService
    inbox: CallbackInboxService
    runner: BackgroundRunner
    trusted_proxies: tuple[Network, ...] = ()
    callback_sources: CallbackSourceCheck | None = None

    def client_ip(self, request: Request) -> str | None:
        return client_ip(request, self.trusted_proxies)


def get_services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


ServicesDep = Annotated[Services, Depends(get_services)]

# Every endpoint documents the one error envelope for invalid input (not FastAPI's default shape);
# 400 is a body that is not JSON at all.
router = APIRouter(responses=error_responses(400, 422))


# -- menu and orders -----------------------------------------------------------------------


@router.get("/api/menu", response_model=Menu, tags=["menu"])
async def read_menu(services: ServicesDep) -> Menu:
    """The menu: categories and items with integer KES prices and availability."""
    return services.menu


@router.post(
    "/api/orders", response_model=OrderOut, status_code=201, tags=["orders"], responses=error_responses(413)
)
async def create_order_endpoint(body: OrderCreate, services: ServicesDep) -> OrderOut:
    """Create an order; the total is computed on the server from the menu."""
    async with services.db.write() as session:
        order = await create_order(session, services.menu, body)
        return OrderOut.model_validate(order)


@router.get(
    "/api/orders/{order_id}", response_model=OrderOut, tags=["orders"], responses=error_responses(404)
)
async def read_order(order_id: str, services: ServicesDep) -> OrderOut:
    """An order with its items, total and payment state."""
    async with services.db.read() as session:
        return OrderOut.model_validate(await get_order(session, order_id))


# -- payments ------------------------------------------------------------------------------


class InitiateRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    phone: Annotated[
        str,
        # Documented tighter than enforced: the normaliser gives the clearer message.
        WithJsonSchema({"type": "string", "pattern": PHONE_PATTERN, "minLength": 9, "maxLength": 32}),
    ] = Field(
        max_length=32,
        description="Kenyan mobile number: 07XXXXXXXX, 01XXXXXXXX, +2547XXXXXXXX, 2547XXXXXXXX, 7XXXXXXXX.",
        examples=["0708374149"],
    )
    amount: Annotated[Decimal, WithJsonSchema({"type": "integer", "minimum": 1, "maximum": 250_000})] = Field(
        description="Whole Kenyan shillings; must equal the order's total.", examples=[450]
    )
    order_id: str = Field(min_length=1, max_length=40)

    @field_validator("amount")
    @classmethod
    def _whole_shillings(cls, value: Decimal) -> Decimal:
        if not value.is_finite() or value != value.to_integral_value():
            raise ValueError("amount must be a whole number of shillings")
        if value < 1 or value > 250_000:
            raise ValueError("amount must be between 1 and 250000 shillings")
        return value


class InitiateResponse(BaseModel):
    CheckoutRequestID: str | None
    MerchantRequestID: str | None
    ResponseCode: str | None
    ResponseDescription: str
    CustomerMessage: str
    checkout_request_id: str | None
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
    return await idempotency.idempotent(
        services.db,
        scope=idempotency.SCOPE_INITIATE,
        key=idempotency_key,
        request=idempotency.initiate_request(order_id=body.order_id, phone=body.phone, amount=body.amount),
        run=lambda: _initiate(body, services, ip, idempotency_key),
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
    return InitiateResponse(
        CheckoutRequestID=payment.checkout_request_id,
        MerchantRequestID=payment.merchant_request_id,
        ResponseCode="0" if accepted else None,
        ResponseDescription=description,
        CustomerMessage=outcome.customer_message,
        checkout_request_id=payment.checkout_request_id,
        payment_id=payment.id,
        order_id=payment.order_id,
        status=public_outcome(payment).status,
        amount=payment.amount,
        phone=mask_phone(payment.phone),
        message=outcome.customer_message,
    )


class CallbackAck(BaseModel):
    ResultCode: int = 0
    ResultDesc: str = "Accepted"


# Daraja's STK callback envelope (reference/daraja.md §5), stated exactly as lipia's parser
# (lipia/callbacks.py) accepts it, so the schema neither promises nor refuses more than it does.
_TEXT_ID = {"type": "string", "minLength": 1, "maxLength": 80, "pattern": r"\S"}
_SCALAR_ID = {"anyOf": [_TEXT_ID, {"type": "integer", "maximum": MAX_ID_NUMBER, "minimum": -MAX_ID_NUMBER}]}
_ITEM = {"type": "object", "required": ["Name"], "properties": {"Name": {"type": "string"}, "Value": {}}}
_CALLBACK_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["Body"],
    "properties": {
        "Body": {
            "type": "object",
            "required": ["stkCallback"],
            "properties": {
                "stkCallback": {
                    "type": "object",
                    "required": ["CheckoutRequestID", "ResultCode"],
                    "properties": {
                        "MerchantRequestID": {"anyOf": [_SCALAR_ID, {"type": "null"}]},
                        "CheckoutRequestID": _SCALAR_ID,
                        "ResultCode": _SCALAR_ID,
                        "ResultDesc": {"type": ["string", "null"]},
                        # Absent on failures; null is tolerated the same way.
                        "CallbackMetadata": {
                            "anyOf": [
                                {
                                    "type": "object",
                                    "properties": {
                                        "Item": {"anyOf": [{"type": "array", "items": _ITEM}, _ITEM]}
                                    },
                                },
                                {"type": "null"},
                            ]
                        },
                    },
                }
            },
        }
    },
    "example": {
        "Body": {
            "stkCallback": {
                "MerchantRequestID": "29115-34620561-1",
                "CheckoutRequestID": "ws_CO_191220191020363925",
                "ResultCode": 1032,
                "ResultDesc": "Request cancelled by user",
            }
        }
    },
}
_CALLBACK_BODY = {
    "requestBody": {"required": True, "content": {"application/json": {"schema": _CALLBACK_SCHEMA}}}
}
_CALLBACK_ERRORS = {
    **error_responses(400, 403, 413, 415),
    400: {"model": ErrorResponse, "description": "Not a Daraja callback (still stored for inspection)."},
    403: {"model": ErrorResponse, "description": "Source address refused by the allowlist (still stored)."},
}


async def _read_limited(request: Request, limit: int) -> tuple[bytes, bool]:
    """The body, cut at ``limit`` bytes; True if it was longer."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            return b"".join(chunks)[: limit + 1], True
    return b"".join(chunks), False


async def _receive_callback(
    request: Request, services: Services, background: BackgroundTasks, token: str | None
) -> Any:
    raw, too_large = await _read_limited(request, MAX_STORED_BODY)
    source_ip = services.client_ip(request)
    source_allowed = services.callback_sources is None or services.callback_sources.allows(source_ip)
    content_type = request.headers.get("content-type", "")
    is_json = content_type.split(";")[0].strip().lower() == "application/json"
    refused = None
    if not source_allowed:
        refused = "source address is not on the Safaricom callback list"
    elif not is_json:
        refused = "content type is not application/json"
    stored = await services.inbox.store(
        raw, token=token, client_ip=source_ip, content_type=content_type, refused=refused
    )
    # Whatever happens below, the body is stored for inspection; refused ones are never applied.
    if too_large:
        return JSONResponse(error_body("PayloadTooLarge", stored.error), status_code=413)
    if not source_allowed:
        raise CallbackSourceRefused("Callbacks are accepted only from Safaricom's addresses.")
    if not is_json:
        return JSONResponse(
            error_body("UnsupportedMediaType", "Daraja callbacks are sent as application/json."),
            status_code=415,
        )
    if stored.parsed is None:
        return JSONResponse(error_body("InvalidCallback", stored.error), status_code=400)
    # Acknowledge first, apply after the response is sent (the stored row survives a crash).
    background.add_task(services.inbox.apply, stored.inbox_id)
    return CallbackAck()


@router.post(
    "/api/payments/mpesa/callback/{token}",
    response_model=CallbackAck,
    tags=["payments"],
    openapi_extra=_CALLBACK_BODY,
    responses=_CALLBACK_ERRORS,
)
async def mpesa_callback_with_token(
    token: str, request: Request, services: ServicesDep, background: BackgroundTasks
) -> Any:
    """Daraja's STK callback, addressed by the per-payment secret token lipia put in the CallBackURL."""
    return await _receive_callback(request, services, background, token)


@router.post(
    "/api/payments/mpesa/callback",
    response_model=CallbackAck,
    tags=["payments"],
    openapi_extra=_CALLBACK_BODY,
    responses=_CALLBACK_ERRORS,
)
async def mpesa_callback(request: Request, services: ServicesDep, background: BackgroundTasks) -> Any:
    """The seed's bare callback path (no token)."""
    return await _receive_callback(request, services, background, None)


@router.get(
    "/api/payments/status/{payment_ref}",
    response_model=PaymentStatusResponse,
    tags=["payments"],
    responses=error_responses(404),
)
async def payment_status(payment_ref: str, services: ServicesDep) -> PaymentStatusResponse:
    """Status by CheckoutRequestID or lipia payment id, in the shape the frontend polls for."""
    async with services.db.read() as session:
        payment = await find_payment(session, payment_ref)
    if await services.payments.claim_stale_query(payment):
        # Never make the poller wait on Daraja: the answer shows up on a later poll.
        services.runner.spawn(
            services.payments.query_and_apply(payment.id, source="status_query"),
            name=f"status-query-{payment.id}",
        )
    response = status_response(payment)
    logger.debug(
        "STATUS CHECK",
        extra={
            "payment_ref": payment_ref,
            "payment_id": payment.id,
            "status": response.status,
            "result_code": response.ResultCode,
        },
    )
    return response


# -- operations ----------------------------------------------------------------------------


@router.get("/health", tags=["operations"])
async def health(services: ServicesDep) -> dict[str, str]:
    """Liveness and database readiness."""
    async with services.db.read() as session:
        await session.execute(text("SELECT 1"))
    return {"status": "ok", "database": "ok", "daraja_env": services.settings.daraja_env.value}
