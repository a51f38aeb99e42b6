"""``lipia doctor URL``: the checklist run against any backend that claims the seed's contract,
lipia or not, as a client: section 9's requests, then the status polled and read exactly as the
frontend reads it (sections 2-4), each problem named with its fix.

Nothing here knows lipia's internals; against lipia it finds (and uses) the built-in simulator's
ledger at ``URL/daraja`` when there is one, to tell "no callback came" from "a callback came and
was never applied".
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx

from lipia.doctor import contract
from lipia.doctor.findings import Findings, Outcome
from lipia.redact import mask_checkout_id
from lipia.tls import client_context

# The checklist's section 9 request; the order id is new each run, so a second run does not find
# the first one's order paid.
SECTION_9_PHONE = "254712345678"
SECTION_9_AMOUNT = 100
INITIATE = "/api/payments/mpesa/initiate"
STATUS = "/api/payments/status/{id}"

Progress = Callable[[str], None]


@dataclass(frozen=True)
class DoctorOptions:
    url: str = "http://localhost:5555"
    phone: str = SECTION_9_PHONE
    amount: int = SECTION_9_AMOUNT
    order_id: str | None = None
    timeout: float = 90.0
    interval: float = 3.0
    origin: str | None = None
    # A Daraja simulator whose ledger says what happened to the push (None: URL/daraja if found).
    simulator: str | None = None
    request_timeout: float = 15.0

    def chosen_order_id(self) -> str:
        return self.order_id or "doctor-" + secrets.token_hex(4)


class Backend:
    def __init__(self, options: DoctorOptions, http: httpx.AsyncClient, progress: Progress | None) -> None:
        self.options = options
        self.http = http
        self.progress = progress or (lambda _text: None)
        self.findings = Findings(url=options.url)

    async def run(self) -> Findings:
        if not await self.backend_up():
            return self.findings
        checkout_id = await self.initiate()
        if self.options.origin:
            await self.cors(self.options.origin)
        if checkout_id is not None:
            await self.follow(checkout_id)
        return self.findings

    # -- section 9: is it up, does initiate answer --------------------------------------------

    async def backend_up(self) -> bool:
        try:
            response = await self.http.get("/api/menu")
        except httpx.HTTPError as exc:
            self.findings.add(
                "backend is up",
                Outcome.FAIL,
                f"GET /api/menu: cannot connect ({type(exc).__name__})",
                f"start the backend, or pass its URL: lipia doctor http://host:port (tried "
                f"{self.options.url})",
            )
            return False
        if response.status_code != 200:
            self.findings.add(
                "backend is up",
                Outcome.FAIL,
                f"GET /api/menu answered {response.status_code}",
                "the checklist's first command (section 9) must answer 200 with the menu",
            )
            return False
        self.findings.add("backend is up", Outcome.PASS, "GET /api/menu answered 200")
        return True

    async def _initiate(self, order_id: str, amount: int) -> tuple[httpx.Response, float]:
        body = {"phone": self.options.phone, "amount": amount, "order_id": order_id}
        started = time.monotonic()
        response = await self.http.post(INITIATE, json=body)
        return response, (time.monotonic() - started) * 1000

    async def initiate(self) -> str | None:
        order_id = self.options.chosen_order_id()
        try:
            response, elapsed_ms = await self._initiate(order_id, self.options.amount)
            if response.status_code in (400, 404, 409, 422) and _about_orders(response):
                created = await self._create_order()
                if created is not None:
                    self.findings.add(
                        "initiate needs an order first",
                        Outcome.PASS,
                        f"initiate for {order_id!r} answered {response.status_code} ({_error_of(response)}); "
                        f"made order {created[0]!r} with POST /api/orders (total {created[1]}) and paid that",
                    )
                    response, elapsed_ms = await self._initiate(*created)
        except httpx.HTTPError as exc:
            self.findings.add(
                "initiate answers", Outcome.FAIL, f"POST {INITIATE}: {type(exc).__name__}", None
            )
            return None
        self.findings.timings["initiate_ms"] = round(elapsed_ms, 1)
        body = _json(response)
        self.findings.initiate_body = body
        if response.status_code >= 300:
            self.findings.add(
                "initiate answers",
                Outcome.FAIL,
                f"POST {INITIATE} answered {response.status_code}: {_error_of(response)}",
                "section 9's initiate must answer 200 with a CheckoutRequestID",
            )
            return None
        checkout_id, misplaced = contract.checkout_request_id(body)
        if checkout_id is None:
            where = f" (an id is in {misplaced}, which the frontend does not read)" if misplaced else ""
            self.findings.add(
                "initiate returns a CheckoutRequestID",
                Outcome.FAIL,
                f"POST {INITIATE} answered {response.status_code} without CheckoutRequestID{where}",
                "answer with the CheckoutRequestID Daraja returned, at the top level as 'CheckoutRequestID': "
                "the frontend polls the status with it (sections 1 and 9)",
            )
            return None
        self.findings.checkout_request_id = checkout_id
        self.findings.add(
            "initiate returns a CheckoutRequestID",
            Outcome.PASS,
            f"CheckoutRequestID {mask_checkout_id(checkout_id)} in {elapsed_ms:.0f} ms",
        )
        return checkout_id

    async def _create_order(self) -> tuple[str, int] | None:
        """An order of the menu's first available item, as the frontend would make it."""
        menu = _json(await self.http.get("/api/menu"))
        item = _first_item(menu)
        if item is None:
            return None
        body = {"items": [{"menu_item_id": item, "quantity": 1}]}
        response = await self.http.post("/api/orders", json=body)
        order = _json(response)
        if response.status_code >= 300 or not isinstance(order, dict):
            return None
        order_id, total = order.get("order_id") or order.get("id"), order.get("total")
        if not isinstance(order_id, str) or not isinstance(total, int):
            return None
        return order_id, total

    # -- sections 1-4 and 8: the status, polled and read as the frontend reads it --------------

    async def follow(self, checkout_id: str) -> None:
        path = STATUS.format(id=checkout_id)
        started = time.monotonic()
        deadline = started + self.options.timeout
        reading: contract.Reading | None = None
        seen_ids: list[dict[str, str]] = []
        while True:
            try:
                response = await self.http.get(path)
            except httpx.HTTPError as exc:
                self.findings.add("status answers", Outcome.FAIL, f"GET {path}: {type(exc).__name__}", None)
                return
            self.findings.polls += 1
            body = _json(response)
            if self.findings.polls == 1:
                if not await self._first_answer(response, body, checkout_id):
                    return
            if not self.findings.status_bodies or body != self.findings.status_bodies[-1]:
                self.findings.status_bodies.append(body)
            seen_ids.append(contract.named_ids(body))
            reading = contract.read_status(body)
            elapsed = time.monotonic() - started
            self.progress(f"{elapsed:4.0f} s  {reading.describe()}")
            if reading.final or reading.verdict == "unknown" and _looks_final(reading):
                break
            if time.monotonic() + self.options.interval > deadline:
                break
            await asyncio.sleep(self.options.interval)
        self.findings.timings["polled_seconds"] = round(time.monotonic() - started, 1)
        self.findings.decided_by = reading.field
        self._check_ids(checkout_id, seen_ids)
        await self._check_reading(reading, self.findings.last_status, checkout_id)

    async def _first_answer(self, response: httpx.Response, body: Any, checkout_id: str) -> bool:
        shown = mask_checkout_id(checkout_id)
        if response.status_code == 404:
            self.findings.status_bodies.append(body)
            self.findings.add(
                "status answers for the initiate's id",
                Outcome.FAIL,
                f"GET /api/payments/status/{shown} answered 404 for the id initiate returned",
                "look payments up by the CheckoutRequestID your initiate returns (save it when you push, "
                "before answering); the checklist's section 6: 'Using wrong CheckoutRequestID'",
            )
            return False
        if response.status_code != 200 or not isinstance(body, dict):
            self.findings.add(
                "status answers for the initiate's id",
                Outcome.FAIL,
                f"GET /api/payments/status/{shown} answered {response.status_code}"
                + ("" if isinstance(body, dict) else " without a JSON object"),
                "answer 200 with the status JSON (section 2)",
            )
            return False
        self.findings.add(
            "status answers for the initiate's id", Outcome.PASS, f"GET /api/payments/status/{shown}: 200"
        )
        return True

    def _check_ids(self, checkout_id: str, seen: list[dict[str, str]]) -> None:
        """The status must be about the payment initiate started: same id, every time."""
        problems = []
        for index, ids in enumerate(seen):
            if ids and checkout_id not in ids.values():
                named = ", ".join(f"{k}={mask_checkout_id(v)}" for k, v in ids.items())
                problems.append(f"poll {index + 1} named {named}")
        changing = {ids.get("CheckoutRequestID") for ids in seen if ids.get("CheckoutRequestID")}
        if len(changing) > 1 and problems:
            problems.insert(0, f"{len(changing)} different CheckoutRequestIDs across {len(seen)} polls")
        if problems:
            self.findings.add(
                "the id stays the same",
                Outcome.FAIL,
                f"initiate returned {mask_checkout_id(checkout_id)}, but " + "; ".join(problems[:3]),
                "return the same CheckoutRequestID from initiate and status, from the same stored "
                "payment (never a new one per call); section 6: 'Using wrong CheckoutRequestID'",
            )
        else:
            self.findings.add("the id stays the same", Outcome.PASS, "every answer names the initiate's id")

    async def _check_reading(self, reading: contract.Reading, body: Any, checkout_id: str) -> None:
        nested = contract.nested_status(body)
        if reading.field is None:
            if nested is not None:
                self.findings.add(
                    "status is where the frontend reads it",
                    Outcome.FAIL,
                    f"no top-level status; the status is nested in {nested[0]} = {nested[1]!r}, which the "
                    "frontend never reads",
                    f'put it at the top level too: {{"status": {nested[1]!r}, "payment": {{...}}}} '
                    "(the checklist's section 8)",
                )
            else:
                self.findings.add(
                    "status is where the frontend reads it",
                    Outcome.FAIL,
                    "none of status, ResultCode, result_code, payment_status, data.status, data.ResultCode, "
                    "data.result_code is in the answer",
                    "answer with a top-level 'status' (section 2)",
                )
            await self._never_final(checkout_id)
            return
        if reading.verdict == "unknown":
            fix = "answer a final state with a value the frontend knows (completed, failed, cancelled, "
            fix += "insufficient_funds, or ResultCode 0/1) and put the finer reason in another field, e.g. "
            fix += f'{{"status": "failed", "reason": {reading.value!r}}} (sections 3 and 4)'
            self.findings.add(
                "the final value is one the frontend knows",
                Outcome.FAIL,
                f"{reading.field} = {reading.value!r}: the frontend does not know this value and keeps "
                "polling for ever",
                fix,
            )
            return
        self.findings.add(
            "status is where the frontend reads it", Outcome.PASS, f"decided by {reading.field}"
        )
        if not reading.final:
            await self._never_final(checkout_id)
            return
        self.findings.timings["final_after_seconds"] = self.findings.timings.get("polled_seconds", 0.0)
        self.findings.add("the final value is one the frontend knows", Outcome.PASS, reading.describe())
        if not contract.has_result_code(body):
            self.findings.add(
                "ResultCode is there",
                Outcome.WARN,
                "the final answer has no ResultCode or result_code",
                "add M-Pesa's ResultCode beside status (the checklist's section 8 example): it says why",
            )
        else:
            self.findings.add("ResultCode is there", Outcome.PASS, "the final answer carries M-Pesa's code")

    async def _never_final(self, checkout_id: str) -> None:
        """Still pending at the timeout: say what the simulator's ledger knows, if there is one."""
        waited = self.options.timeout
        detail = f"still not final after {waited:g} s ({self.findings.polls} polls)"
        fix = (
            "check that Safaricom reaches your callback URL (https, registered, not behind a broken "
            "proxy), that the callback handler updates the payment, and query M-Pesa (STK Query) when "
            "no callback comes (section 6: 'Status endpoint returns pending forever')"
        )
        push = await self._ledger_push(checkout_id)
        if push is not None:
            delivered = [c for c in push["callbacks"] if c.get("status_code") and c["status_code"] < 300]
            if push["state"] != "final":
                detail += "; the simulator says the customer has not answered the prompt yet"
                fix = "wait longer (--timeout), or make the customer act: lipia trigger act ID"
            elif delivered:
                detail += (
                    f"; the simulator delivered the callback (ResultCode {push['result_code']}) to "
                    f"{delivered[-1]['delivered_to'].split('?')[0].rsplit('/', 1)[0]}/… and got HTTP "
                    f"{delivered[-1]['status_code']}: it was received but never applied"
                )
                fix = (
                    "your callback handler acknowledges but does not update the payment: find it by "
                    "CheckoutRequestID, store ResultCode, and return 200 only after saving (section 5a)"
                )
            elif push["callbacks"]:
                last = push["callbacks"][-1]
                why = last.get("error") or last.get("status_code")
                detail += f"; the callback could not be delivered ({why})"
            else:
                detail += "; the simulator sent no callback for this push (dropped, or never sent)"
                fix = "query M-Pesa (STK Query) for payments with no callback; " + fix
        self.findings.add("a final state comes", Outcome.FAIL, detail, fix)

    async def _ledger_push(self, checkout_id: str) -> dict[str, Any] | None:
        base = self.options.simulator or self.options.url.rstrip("/") + "/daraja"
        try:
            response = await self.http.get(base.rstrip("/") + "/simulator/transactions")
            ledger = response.json() if response.status_code == 200 else None
        except (httpx.HTTPError, ValueError):
            return None
        if not isinstance(ledger, dict):
            return None
        for push in ledger.get("pushes", []):
            if push.get("CheckoutRequestID") == checkout_id:
                sent = ledger.get("callbacks", [])
                callbacks = [c for c in sent if c.get("CheckoutRequestID") == checkout_id]
                return {**push, "callbacks": callbacks}
        return None

    # -- CORS: can a page on the frontend's origin call it --------------------------------------

    async def cors(self, origin: str) -> None:
        problems = []
        preflight = await self.http.options(
            INITIATE,
            headers={
                "Origin": origin,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "content-type",
            },
        )
        allowed = preflight.headers.get("access-control-allow-origin")
        if allowed not in (origin, "*"):
            problems.append(
                f"the preflight of POST {INITIATE} answered {preflight.status_code} without "
                f"Access-Control-Allow-Origin for {origin}"
            )
        else:
            methods = preflight.headers.get("access-control-allow-methods", "").upper()
            headers = preflight.headers.get("access-control-allow-headers", "").lower()
            if "POST" not in methods and methods != "*":
                problems.append("the preflight does not allow POST")
            if "content-type" not in headers and headers != "*":
                problems.append("the preflight does not allow the Content-Type header")
        menu = await self.http.get("/api/menu", headers={"Origin": origin})
        if menu.headers.get("access-control-allow-origin") not in (origin, "*"):
            problems.append(f"GET /api/menu answered without Access-Control-Allow-Origin for {origin}")
        if problems:
            self.findings.add(
                f"CORS for {origin}",
                Outcome.FAIL,
                "; ".join(problems),
                f"allow the origin {origin} (lipia: LIPIA_CORS_ORIGINS={origin}): methods GET and POST, "
                "header Content-Type",
            )
        else:
            self.findings.add(f"CORS for {origin}", Outcome.PASS, "a page on this origin may call the API")


def _json(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return response.text[:2000]


def _error_of(response: httpx.Response) -> str:
    body = _json(response)
    if isinstance(body, dict):
        parts = [str(body[k]) for k in ("error", "detail", "message") if isinstance(body.get(k), str)]
        if parts:
            return ": ".join(parts)[:300]
    return str(body)[:200]


def _about_orders(response: httpx.Response) -> bool:
    return "order" in _error_of(response).lower()


def _first_item(menu: Any) -> str | None:
    """The id of the first available item, in lipia's menu shape or a flat list of items."""
    items: list[Any] = []
    if isinstance(menu, dict):
        for category in menu.get("categories", []) if isinstance(menu.get("categories"), list) else []:
            if isinstance(category, dict) and isinstance(category.get("items"), list):
                items += category["items"]
        if isinstance(menu.get("items"), list):
            items += menu["items"]
    elif isinstance(menu, list):
        items = menu
    for item in items:
        if isinstance(item, dict) and item.get("available", True) and isinstance(item.get("id"), str):
            return str(item["id"])
    return None


# Values the frontend does not know that plainly end a payment: no use polling on.
_ENDINGS = frozenset(
    {
        "timeout",
        "timed_out",
        "expired",
        "error",
        "rejected",
        "declined",
        "canceled_by_user",
        "complete",
        "successful",
        "succeeded",
        "failure",
        "fail",
        "done",
        "reversed",
    }
)


def _looks_final(reading: contract.Reading) -> bool:
    return isinstance(reading.value, str) and reading.value.lower() in _ENDINGS


async def check_backend(options: DoctorOptions, progress: Progress | None = None) -> Findings:
    async with httpx.AsyncClient(
        base_url=options.url.rstrip("/"),
        timeout=options.request_timeout,
        trust_env=False,
        verify=client_context(),
    ) as http:
        return await Backend(options, http, progress).run()
