"""Health endpoints: liveness (the process answers) apart from readiness (it can serve)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from lipia import schema
from lipia.errors import ErrorResponse, NotReady
from lipia.http.services import ServicesDep
from lipia.observability.health import reconciler_health
from lipia.observability.snapshot import take_snapshot

router = APIRouter(tags=["operations"])

# A probe that waits longer than this is answered "not ready" rather than left hanging.
READY_TIMEOUT_SECONDS = 5.0
_NOT_READY: dict[int | str, dict[str, Any]] = {
    503: {
        "model": ErrorResponse,
        "description": "Not ready (`NotReady`): the database cannot be reached, or its schema is not "
        "the one this lipia needs. Retry later; `detail` says which.",
    }
}


@router.get("/health/live")
async def health_live() -> dict[str, str]:
    """Liveness: the process answers. Touches nothing else, so a database outage never gets a
    healthy process restarted."""
    return {"status": "ok"}


@router.get("/health/ready", responses=_NOT_READY)
async def health_ready(services: ServicesDep) -> dict[str, str]:
    """Readiness: the database answers and its schema is at this lipia's head; 503 otherwise."""
    problem = await schema.readiness(services.db, timeout_seconds=READY_TIMEOUT_SECONDS)
    if problem is not None:
        raise NotReady(problem)
    return {
        "status": "ok",
        "database": "ok",
        "schema": schema.head(),
        "daraja_env": services.settings.daraja_env.value,
    }


@router.get("/health", responses=_NOT_READY)
async def health(services: ServicesDep) -> dict[str, Any]:
    """Readiness, as `/health/ready` (the same status code, for existing probes), and what an
    operator asks next: is the reconciler running, does OAuth against the configured Daraja
    work, which schema, and the payments a person should look at. A failing detail makes
    `status` `degraded`, never the answer a 503: the load balancer keeps a ready instance."""
    ready: dict[str, Any] = dict(await health_ready(services))
    settings = services.settings
    checks: dict[str, Any] = {"schema": {"status": "ok", "revision": schema.head()}}
    if services.reconciler is not None:
        checks["reconciler"] = reconciler_health(
            services.reconciler,
            enabled=settings.reconciler_enabled,
            interval=settings.reconciler_interval_seconds,
        )
    if services.daraja_auth is not None:
        checks["daraja_auth"] = {
            "env": settings.daraja_env.value,
            **(await services.daraja_auth.check()).to_json(),
        }
    snapshot = await take_snapshot(services.db)
    checks["payments"] = {
        "oldest_pending_payment_id": snapshot.oldest_pending_payment_id,
        "oldest_pending_age_seconds": snapshot.oldest_pending_age_seconds,
        "callbacks_waiting_to_apply": snapshot.inbox_by_status["received"],
        "callbacks_failed_to_apply": snapshot.inbox_by_status["failed"],
        "completed_without_callback_ratio": snapshot.recent_share_without_callback,
    }
    failing = [name for name, check in checks.items() if check.get("status") not in (None, "ok", "disabled")]
    return {**ready, "status": "degraded" if failing else "ok", "failing": failing, "checks": checks}
