"""Daraja's STK callbacks: ``POST /api/payments/mpesa/callback/{token}`` (the per-payment secret
lipia puts in the CallBackURL) and the bare ``POST /api/payments/mpesa/callback``. Every body is
stored before anything else is decided; the answer only says what happened to it."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter, BackgroundTasks, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.requests import ClientDisconnect

from lipia.daraja.fields import MAX_ID_LENGTH, MAX_RESULT_CODE_NUMBER
from lipia.errors import (
    CallbackSourceRefused,
    ErrorResponse,
    RequestAbandoned,
    TooManyRequests,
    error_body,
    error_responses,
)
from lipia.http.services import Services, ServicesDep
from lipia.observability.limits import limit_hit
from lipia.payments.inbox import MAX_STORED_BODY

logger = logging.getLogger("lipia.api")

# Every endpoint documents the one error envelope for invalid input (not FastAPI's default shape);
# 400 is a body that is not JSON at all.
router = APIRouter(responses=error_responses(400, 422))


class CallbackAck(BaseModel):
    ResultCode: int = 0
    ResultDesc: str = "Accepted"


# Daraja's STK callback envelope (what it POSTs to the CallBackURL), stated exactly as lipia's parser
# (lipia/daraja/callbacks.py) accepts it, so the schema neither promises nor refuses more than it does.
_TEXT_ID = {"type": "string", "minLength": 1, "maxLength": MAX_ID_LENGTH, "pattern": r"^[A-Za-z0-9_.:\-]+$"}
_RESULT_CODE = {
    "anyOf": [
        {"type": "string", "pattern": r"^(0|[1-9][0-9]{0,9}|[A-Za-z][A-Za-z0-9_.\-]{0,39})$"},
        {"type": "integer", "minimum": 0, "maximum": MAX_RESULT_CODE_NUMBER},
    ]
}
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
                        "MerchantRequestID": {"anyOf": [_TEXT_ID, {"type": "null"}]},
                        "CheckoutRequestID": _TEXT_ID,
                        "ResultCode": _RESULT_CODE,
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
    **error_responses(400, 403, 408, 413, 415, 429),
    400: {"model": ErrorResponse, "description": "Not a Daraja callback (still stored for inspection)."},
    403: {"model": ErrorResponse, "description": "Source address refused by the allowlist (still stored)."},
    429: {
        "model": ErrorResponse,
        "description": "Too many callbacks from this address (bare path, unknown token) or for this "
        "payment; not stored.",
    },
}


async def _read_limited(request: Request, limit: int) -> tuple[bytes, bool]:
    """The body, cut at ``limit`` bytes; True if it was longer."""
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            chunks.append(chunk)
            size += len(chunk)
            if size > limit:
                return b"".join(chunks)[: limit + 1], True
    except ClientDisconnect:
        # The client went away, or security.BodySizeLimit cut a stalled body off and has already
        # answered 408; nothing was stored, and this answer goes nowhere.
        raise RequestAbandoned("The request body was not received.") from None
    return b"".join(chunks), False


async def _receive_callback(
    request: Request, services: Services, background: BackgroundTasks, token: str | None
) -> Any:
    raw, too_large = await _read_limited(request, MAX_STORED_BODY)
    source_ip = services.client_ip(request)
    admission = await services.inbox.admission(raw, token=token, limit=services.limits.callbacks_per_payment)
    if not admission.token_known:
        # Anyone can post here without knowing a payment's secret: every such body is a row,
        # so each address (and all of them together) gets a budget. Genuine Daraja callbacks
        # come on a known token and are never refused here.
        setting = "LIPIA_UNAUTHENTICATED_CALLBACKS_PER_MINUTE"
        services.spend(services.limits.unauthenticated_callbacks, request, setting + "_PER_IP")
        services.spend(services.limits.unauthenticated_callbacks_total, request, setting)
    crowded = admission.crowded
    if crowded is not None:
        limit_hit("LIPIA_CALLBACKS_PER_PAYMENT")
        logger.warning("limit reached", extra={"limit": "LIPIA_CALLBACKS_PER_PAYMENT", "reason": crowded})
        raise TooManyRequests(crowded, retry_after_seconds=60)
    source_allowed = services.callback_sources is None or services.callback_sources.allows(source_ip)
    content_type = request.headers.get("content-type", "")
    is_json = content_type.split(";")[0].strip().lower() == "application/json"
    refused = None
    if not source_allowed:
        refused = "source address is not on the Safaricom callback list"
    elif not is_json:
        refused = "content type is not application/json"
    stored = await services.inbox.store(
        raw,
        token=token,
        client_ip=source_ip,
        content_type=content_type,
        refused=refused,
        payment_id=admission.payment_id,
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
    background.add_task(services.inbox.apply_soon, stored.inbox_id)
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
    """The bare callback path the frontend team's checklist names (no token)."""
    return await _receive_callback(request, services, background, None)
