"""``lipia doctor --config``: lipia's own configuration and state, from the settings this machine
would run with, its database, the configured Daraja, and the running server at the URL.

Each check says what it found and, when it is not a pass, which setting or command fixes it.
"""

from __future__ import annotations

import re
from typing import Any

import httpx

from lipia.config import Settings
from lipia.config.defaults import ExternalOrders
from lipia.config.guard import public_url_problems
from lipia.doctor.findings import Findings, Outcome
from lipia.observability.health import preflight
from lipia.observability.snapshot import Snapshot, take_snapshot
from lipia.runtime import open_runtime
from lipia.tls import client_context

# Words Daraja is documented to refuse in callback URLs (for C2B; reported for STK too).
REFUSED_WORDS = ("mpesa", "m-pesa", "safaricom", "exe", "cmd", "sql", "query")
TRANSACTION_TYPES = ("CustomerPayBillOnline", "CustomerBuyGoodsOnline")
# A callback stored but not applied this long is stuck (the request that stored it applies it at
# once; the reconciler retries after a few seconds).
STUCK_CALLBACK_SECONDS = 300.0


async def check_configuration(settings: Settings, url: str, findings: Findings) -> None:
    check_callback_url(settings, findings)
    check_shortcode(settings, findings)
    check_exposure(settings, findings)
    try:
        async with open_runtime(settings, start_workers=False) as runtime:
            await check_credentials(settings, runtime.daraja, findings)
            snapshot = await take_snapshot(runtime.db)
    except Exception as exc:  # the database itself: one failed check, not a traceback
        findings.add(
            "database",
            Outcome.FAIL,
            f"cannot read lipia's database ({type(exc).__name__}: {str(exc)[:200]})",
            "check LIPIA_DATABASE_URL, and run `lipia db upgrade` on PostgreSQL",
        )
        snapshot = None
    await check_server(settings, url, findings)
    if snapshot is not None:
        check_payments(settings, snapshot, findings)


def check_callback_url(settings: Settings, findings: Findings) -> None:
    name = "callback URL"
    example = settings.callback_url("<token>")
    if settings.is_simulator:
        findings.add(
            name,
            Outcome.PASS,
            f"{example}: simulator mode, the built-in simulator calls back over this machine's network",
        )
        return
    problems = public_url_problems(settings.public_url)
    base = (settings.public_url or "").lower()
    words = [word for word in REFUSED_WORDS if re.search(re.escape(word), base)]
    if problems:
        findings.add(
            name, Outcome.FAIL, "; ".join(problems), "set LIPIA_PUBLIC_URL to your public https address"
        )
    elif words:
        findings.add(
            name,
            Outcome.WARN,
            f"LIPIA_PUBLIC_URL contains {', '.join(words)}: Daraja refuses callback URLs with these words "
            "(documented for C2B, reported for STK)",
            "serve lipia on a host name and path without them, e.g. https://pay.example.com",
        )
    else:
        findings.add(name, Outcome.PASS, f"{example}: https, public")


def check_shortcode(settings: Settings, findings: Findings) -> None:
    name = "shortcode, transaction type and till"
    shortcode, kind, till = settings.shortcode, settings.transaction_type, settings.party_b
    problems: list[str] = []
    fixes: list[str] = []
    if not re.fullmatch(r"[0-9]{5,7}", shortcode):
        problems.append(f"LIPIA_SHORTCODE {shortcode!r} is not a 5-7 digit shortcode")
        fixes.append("set LIPIA_SHORTCODE to your Lipa Na M-Pesa shortcode")
    if kind not in TRANSACTION_TYPES:
        problems.append(f"LIPIA_TRANSACTION_TYPE {kind!r} is neither {' nor '.join(TRANSACTION_TYPES)}")
        fixes.append("CustomerPayBillOnline for a paybill, CustomerBuyGoodsOnline for a till")
    elif kind == "CustomerBuyGoodsOnline" and (till is None or till == shortcode):
        problems.append("CustomerBuyGoodsOnline pays a till, but LIPIA_PARTY_B (the till number) is not set")
        fixes.append("set LIPIA_PARTY_B to the till number (LIPIA_SHORTCODE is the store number)")
    elif kind == "CustomerPayBillOnline" and till is not None and till != shortcode:
        problems.append(f"a paybill pays its own shortcode, but LIPIA_PARTY_B is {till!r}")
        fixes.append("unset LIPIA_PARTY_B, or use CustomerBuyGoodsOnline for a till")
    if till is not None and not re.fullmatch(r"[0-9]{5,8}", till):
        problems.append(f"LIPIA_PARTY_B {till!r} is not a till or shortcode number")
        fixes.append("set LIPIA_PARTY_B to the till number")
    if problems:
        findings.add(name, Outcome.FAIL, "; ".join(problems), "; ".join(fixes))
    else:
        target = f"till {till}" if kind == "CustomerBuyGoodsOnline" else f"paybill {shortcode}"
        findings.add(name, Outcome.PASS, f"{kind}, {target}")


def check_exposure(settings: Settings, findings: Findings) -> None:
    policy = settings.external_order_policy
    if policy is ExternalOrders.open and not settings.is_simulator:
        findings.add(
            "external orders",
            Outcome.WARN,
            "LIPIA_EXTERNAL_ORDERS=open: the client chooses the amount of any order id lipia did not make",
            "use registered (your backend registers each order and its amount) or none",
        )
    else:
        findings.add("external orders", Outcome.PASS, f"LIPIA_EXTERNAL_ORDERS={policy.value}")
    if settings.is_simulator:
        detail = "simulator mode: payments are simulated, no real money moves"
        if settings.listens_beyond_loopback:
            findings.add(
                "simulator exposure",
                Outcome.WARN,
                f"{detail}, and lipia listens on {settings.host}: anyone on the network can mark orders paid",
                "listen on 127.0.0.1 unless you test from other devices",
            )
        else:
            findings.add("simulator exposure", Outcome.PASS, f"{detail}; listening on loopback only")


async def check_credentials(settings: Settings, daraja: Any, findings: Findings) -> None:
    missing = [
        name
        for name, value in (
            ("LIPIA_CONSUMER_KEY", settings.consumer_key.get_secret_value()),
            ("LIPIA_CONSUMER_SECRET", settings.consumer_secret.get_secret_value()),
            ("LIPIA_PASSKEY", settings.passkey.get_secret_value()),
        )
        if not value
    ]
    if missing:
        findings.add(
            "credentials", Outcome.FAIL, f"{', '.join(missing)} empty", "set them from your Daraja app"
        )
        return
    result = await preflight(daraja)
    where = settings.daraja_url
    if result.ok:
        findings.add("credentials", Outcome.PASS, f"OAuth against {where} works: Daraja issued a token")
    else:
        findings.add(
            "credentials",
            Outcome.FAIL,
            f"OAuth against {where} failed: {result.error}",
            "check LIPIA_CONSUMER_KEY and LIPIA_CONSUMER_SECRET (the app's, for this environment: sandbox "
            "keys do not work in production) and LIPIA_DARAJA_ENV",
        )


async def check_server(settings: Settings, url: str, findings: Findings) -> None:
    """The running lipia: its reconciler (/health) and what it saw (/metrics, with the token)."""
    async with httpx.AsyncClient(
        base_url=url.rstrip("/"), timeout=10, trust_env=False, verify=client_context()
    ) as http:
        try:
            health = (await http.get("/health")).json()
        except (httpx.HTTPError, ValueError) as exc:
            findings.add(
                "reconciler",
                Outcome.FAIL,
                f"GET {url}/health: {type(exc).__name__}",
                "start lipia (lipia serve), or pass its URL",
            )
            return
        reconciler = (health.get("checks") or {}).get("reconciler") if isinstance(health, dict) else None
        if not isinstance(reconciler, dict):
            findings.add("reconciler", Outcome.SKIP, f"{url}/health does not report a reconciler")
        elif reconciler.get("status") == "ok":
            findings.add("reconciler", Outcome.PASS, f"running ({reconciler.get('rounds')} rounds)")
        elif reconciler.get("status") == "disabled":
            findings.add(
                "reconciler",
                Outcome.WARN,
                "not running inside this server (LIPIA_RECONCILER_ENABLED=false)",
                "run `lipia reconcile` beside it, or nothing settles payments whose callback never came",
            )
        else:
            findings.add(
                "reconciler",
                Outcome.FAIL,
                f"{reconciler.get('status')}: last round {reconciler.get('last_round_at')}",
                "restart lipia; its log says why the loop stopped (reconcile round failed)",
            )
        token = settings.metrics_bearer_token
        metrics = await http.get("/metrics", headers={"Authorization": f"Bearer {token}"})
    if metrics.status_code != 200:
        findings.add(
            "trusted proxies",
            Outcome.SKIP,
            f"GET /metrics answered {metrics.status_code}",
            "set LIPIA_METRICS_TOKEN (or LIPIA_ADMIN_TOKEN) as the running server has it",
        )
        return
    seen = _sample(metrics.text, "lipia_untrusted_forwarded_for_requests_total")
    if seen:
        findings.add(
            "trusted proxies",
            Outcome.FAIL,
            f"{seen:g} requests carried X-Forwarded-For from a peer not in LIPIA_TRUSTED_PROXIES "
            f"({settings.trusted_proxies or 'none set'}): every customer behind that proxy shares one "
            "per-address limit",
            "set LIPIA_TRUSTED_PROXIES to your reverse proxy's address (lipia's log names the peer)",
        )
    else:
        findings.add(
            "trusted proxies",
            Outcome.PASS,
            f"no X-Forwarded-For from an untrusted peer (trusted: {settings.trusted_proxies or 'none'})",
        )


def _sample(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def check_payments(settings: Settings, snapshot: Snapshot, findings: Findings) -> None:
    window = settings.reconciler_expire_after_seconds
    age = snapshot.oldest_pending_age_seconds
    if age is not None and age > 2 * window + 60:
        findings.add(
            "oldest pending payment",
            Outcome.FAIL,
            f"{snapshot.oldest_pending_payment_id} has waited {age:.0f} s for a final answer (the prompt "
            f"window is {window:g} s)",
            f"lipia payments show {snapshot.oldest_pending_payment_id}; is the reconciler running? "
            "POST /api/admin/payments/<id>/reconcile asks M-Pesa now",
        )
    else:
        shown = "none pending" if age is None else f"{snapshot.oldest_pending_payment_id}, {age:.0f} s"
        findings.add("oldest pending payment", Outcome.PASS, shown)
    stuck_age = snapshot.oldest_unapplied_callback_age_seconds
    failed = snapshot.inbox_by_status.get("failed", 0)
    if failed or (stuck_age is not None and stuck_age > STUCK_CALLBACK_SECONDS):
        parts = []
        if stuck_age is not None and stuck_age > STUCK_CALLBACK_SECONDS:
            parts.append(
                f"{snapshot.inbox_by_status['received']} stored but not applied, the oldest {stuck_age:.0f} s"
            )
        if failed:
            parts.append(f"{failed} could not be applied (status failed)")
        findings.add(
            "stuck callbacks",
            Outcome.FAIL,
            "; ".join(parts),
            "the log's 'callback apply failed' lines say why; lipia payments --state … shows the payments",
        )
    else:
        findings.add("stuck callbacks", Outcome.PASS, "every stored callback was applied")
    ratio = snapshot.recent_share_without_callback
    if snapshot.callbacks_stopped:
        findings.add(
            "callbacks arrive",
            Outcome.FAIL,
            f"the {len(snapshot.newest_completed)} newest completed payments were all completed by STK "
            "Query, none reached by a callback (no receipt numbers): Daraja's callbacks no longer reach "
            "lipia",
            "check LIPIA_PUBLIC_URL, DNS, TLS and the reverse proxy's route to /api/payments/mpesa/callback/",
        )
    elif ratio is not None and ratio > 0.5:
        findings.add(
            "callbacks arrive",
            Outcome.WARN,
            f"{ratio:.0%} of the payments completed in the last hour had no callback",
            "check the route from Safaricom to LIPIA_PUBLIC_URL",
        )
    else:
        shown = "no payment completed recently" if ratio is None else f"{ratio:.0%} completed without one"
        findings.add("callbacks arrive", Outcome.PASS, shown)
