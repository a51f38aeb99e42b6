"""One ``lipia doctor`` run: the backend's contract (``backend``), lipia's own configuration when
asked (``configuration``), and the callback evidence for the "what to share" bundle."""

from __future__ import annotations

from pathlib import Path

from lipia.config import Settings
from lipia.doctor.backend import DoctorOptions, Progress, check_backend
from lipia.doctor.configuration import check_configuration
from lipia.doctor.findings import Findings
from lipia.doctor.report import log_lines_for


async def run_doctor(
    options: DoctorOptions,
    *,
    settings: Settings | None = None,
    log: Path | None = None,
    progress: Progress | None = None,
) -> Findings:
    findings = await check_backend(options, progress)
    if settings is not None:
        await check_configuration(settings, options.url, findings)
        findings.callback_evidence += await timeline_evidence(settings, findings)
    if log is not None:
        ids = [findings.checkout_request_id, _payment_id(findings)]
        findings.callback_evidence = log_lines_for(log, ids) + findings.callback_evidence
    return findings


def _payment_id(findings: Findings) -> str | None:
    body = findings.initiate_body
    value = body.get("payment_id") if isinstance(body, dict) else None
    return value if isinstance(value, str) else None


async def timeline_evidence(settings: Settings, findings: Findings) -> list[str]:
    """lipia's own record of the callbacks that reached this payment (its admin timeline)."""
    ref = _payment_id(findings) or findings.checkout_request_id
    if ref is None:
        return []
    from lipia.errors import PaymentNotFound
    from lipia.http.admin import read_timeline
    from lipia.runtime import open_runtime

    try:
        async with open_runtime(settings, start_workers=False) as runtime:
            timeline = await read_timeline(runtime.db, ref, include_raw=True)
    except PaymentNotFound:
        return [f"lipia's database ({settings.database_url.split('://')[0]}) has no payment {ref}"]
    lines = [
        f"{c.received_at.isoformat()} M-PESA CALLBACK RECEIVED path={c.path} status={c.status.value} "
        f"result_code={c.result_code} from={c.client_ip} body={c.raw_body}"
        for c in timeline.callbacks
    ]
    return lines or [f"lipia's timeline of {ref} holds no callback: none reached lipia"]
