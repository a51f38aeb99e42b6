"""``lipia trigger``: drive a running simulator from a terminal, as a payments CLI's ``trigger``
does: arm faults, make a customer act now with a chosen outcome, send a push's callback again.

A client of the control API (``/simulator/...``) over HTTP, so it drives the simulator mounted in
``lipia serve`` (``http://127.0.0.1:5555/daraja``) or a ``lipia simulator`` process alike. Like the
rest of the simulator, it imports nothing of lipia.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import httpx

# Named faults for `lipia trigger fault`: what each arms (README "Simulator faults").
NAMED_FAULTS: dict[str, dict[str, Any]] = {
    "drop-callback": {"callback": {"mode": "drop"}},
    "duplicate-callback": {"callback": {"mode": "duplicate", "count": 2}},
    "delay-callback": {"callback": {"mode": "delay", "delay_seconds": 30}},
    "callback-before-response": {"callback": {"mode": "before_response"}},
    "reset-after-accept": {"push": {"mode": "reset_after_accept"}},
    "spike-arrest": {"push": {"mode": "error", "status": 500, "error_code": "500.003.02"}},
    "query-lag": {"query": {"lag_seconds": 60}},
    "contradicting-query": {"query": {"contradict": True}},
    "oauth-error": {"oauth_error": {"status": 500, "error_code": "500.003.1001"}},
}


def fault_body(
    name: str | None, *, times: int | None = None, raw: str | None = None
) -> dict[str, Any] | None:
    """The body that arms fault ``name`` (for the next ``times`` pushes), or ``raw`` JSON as is;
    None when neither is given (show what is armed)."""
    if raw is not None:
        try:
            body = json.loads(raw)
        except ValueError:
            raise TriggerError("--json is not JSON") from None
        if not isinstance(body, dict):
            raise TriggerError("--json must be a JSON object")
        return body
    if name is None:
        return None
    if name not in NAMED_FAULTS:
        raise TriggerError(f"unknown fault {name!r}; one of {', '.join(NAMED_FAULTS)} (or --json)")
    arm = copy.deepcopy(NAMED_FAULTS[name])
    if times is not None:
        for group in arm.values():
            group["times"] = times
    return arm


class TriggerError(Exception):
    """The simulator refused, or could not be reached: one line saying which and why."""


class SimulatorControl:
    def __init__(self, base_url: str, *, token: str | None = None, timeout: float = 10.0) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.base_url = base_url.rstrip("/")
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout, trust_env=False)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> SimulatorControl:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        try:
            response = self._http.request(method, path, json=body)
        except httpx.TransportError as exc:
            raise TriggerError(
                f"cannot reach the simulator at {self.base_url} ({type(exc).__name__}): is lipia (simulator "
                "mode) or `lipia simulator` running there? Pass --simulator URL"
            ) from None
        try:
            answer = response.json()
        except ValueError:
            answer = None
        if response.status_code >= 400:
            reason = answer.get("error") if isinstance(answer, dict) else response.text[:200]
            raise TriggerError(f"the simulator answered {response.status_code} to {method} {path}: {reason}")
        return answer

    def faults(self, arm: dict[str, Any] | None = None, *, clear: bool = False) -> Any:
        if clear:
            return self._call("DELETE", "/simulator/faults")
        if arm is not None:
            return self._call("POST", "/simulator/faults", arm)
        return self._call("GET", "/simulator/faults")

    def act(
        self, checkout_request_id: str, *, outcome: str | None = None, result_code: int | None = None
    ) -> Any:
        body: dict[str, Any] | None = None
        if outcome is not None:
            body = {"outcome": outcome}
        elif result_code is not None:
            body = {"result_code": result_code}
        return self._call("POST", f"/simulator/pushes/{checkout_request_id}/act", body)

    def resend(self, checkout_request_id: str, *, copies: int = 1) -> Any:
        return self._call("POST", f"/simulator/pushes/{checkout_request_id}/callback", {"copies": copies})

    def pushes(self) -> list[dict[str, Any]]:
        ledger = self._call("GET", "/simulator/transactions")
        return list(ledger["pushes"]) if isinstance(ledger, dict) else []
