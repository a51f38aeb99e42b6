"""The one error envelope, as every test that reads an error checks it.

``{"error": <Name>, "detail": <one line of text>}``, plus ``"errors": [{"loc", "msg", "type"}]``
for a ``ValidationError`` and only for it.
"""

from __future__ import annotations

from typing import Any

import httpx

from lipia.payments.status import unknown_payment_body

FIELD_ERROR_KEYS = {"loc", "msg", "type"}


def assert_envelope(body: Any) -> dict[str, Any]:
    """``body`` is lipia's error envelope, exactly; returns it."""
    assert isinstance(body, dict), body
    whole = body
    if body.get("error") == "PaymentNotFound" and "reason" in body:
        # The status endpoint's 404: the envelope plus, exactly, the status fields that end a
        # frontend's wait; the envelope part is checked below like any other.
        assert body == unknown_payment_body(body["error"], body["detail"]), body
        body = {"error": body["error"], "detail": body["detail"]}
    validation = body.get("error") == "ValidationError"
    assert set(body) == ({"error", "detail", "errors"} if validation else {"error", "detail"}), body
    assert isinstance(body["error"], str)
    assert body["error"].isidentifier(), body
    assert isinstance(body["detail"], str), body
    assert body["detail"], body
    assert "\n" not in body["detail"], body
    if validation:
        errors = body["errors"]
        assert isinstance(errors, list), body
        assert errors, body
        for error in errors:
            assert set(error) == FIELD_ERROR_KEYS, error  # never the input: it may be a phone number
            assert isinstance(error["loc"], list), error
            assert error["loc"], error
            assert isinstance(error["msg"], str), error
            assert isinstance(error["type"], str), error
    return whole


def assert_error_response(response: httpx.Response, status: int | None = None) -> dict[str, Any]:
    """A JSON error answer in the envelope (with ``status``, if given); returns its body."""
    if status is not None:
        assert response.status_code == status, (response.status_code, response.text)
    assert response.status_code >= 400, (response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/json"), response.headers
    return assert_envelope(response.json())


def validation_errors(body: dict[str, Any]) -> list[tuple[tuple[str | int, ...], str]]:
    """``(loc, type)`` of each field error, for exact comparisons."""
    return [(tuple(error["loc"]), error["type"]) for error in body["errors"]]
