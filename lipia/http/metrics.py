"""``GET /metrics``: Prometheus' text format, behind a bearer token like the admin API.

The token is ``LIPIA_METRICS_TOKEN`` (or, when that is empty, ``LIPIA_ADMIN_TOKEN``): give
Prometheus its own, so the scraper never holds the admin token. On the same port as the API,
so whatever reaches lipia can be scraped, and only with the token (a separate port would be
one more listener to firewall, and one more the deployment kit would have to open).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Response, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from lipia.errors import error_responses
from lipia.http.security import check_bearer_token
from lipia.http.services import ServicesDep
from lipia.observability.metrics import CONTENT_TYPE, render

_bearer = HTTPBearer(
    auto_error=False,
    scheme_name="MetricsToken",
    description="LIPIA_METRICS_TOKEN (or, when empty, LIPIA_ADMIN_TOKEN), "
    "as `Authorization: Bearer <token>`.",
)

router = APIRouter(tags=["operations"])


@router.get(
    "/metrics",
    response_class=Response,
    responses={
        200: {"content": {CONTENT_TYPE: {}}, "description": "Prometheus' text exposition format."},
        **error_responses(401),
    },
)
async def metrics(
    services: ServicesDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)],
) -> Response:
    """Payments by state and result, callback latency, the share settled without a callback, the
    oldest pending payment, reconciler queries, Daraja errors, status requests, limit hits and the
    callback inbox (README "Debugging a payment" lists them, with alerts)."""
    check_bearer_token(
        services.settings.metrics_bearer_token,
        credentials.credentials if credentials is not None else None,
        realm="lipia-metrics",
        missing="Send the metrics token as 'Authorization: Bearer <LIPIA_METRICS_TOKEN>'.",
        invalid="The metrics token is not valid.",
    )
    body = await render(services.db)
    return Response(body, media_type=CONTENT_TYPE, headers={"Cache-Control": "no-store"})
