"""The error envelope and README's list of error names, kept true by reading the code."""

from __future__ import annotations

import importlib
import pkgutil
import re
from pathlib import Path
from typing import Any

import httpx
import pytest

import lipia
from lipia import errors
from lipia.errors import LipiaError, error_body, field_summary
from tests.support.envelope import assert_envelope, assert_error_response
from tests.support.server import RunningServer

ROOT = Path(__file__).resolve().parent.parent
# `| `Name` | 404 | meaning |` rows of README's error table.
_ROW = re.compile(r"^\| `([A-Z][A-Za-z]+)` \| ([0-9x, ]+) \| (.+) \|$")
# Error names written where an answer is built: error_body("X", ...), _json_error(413, "X", ...),
# refuse(408, "X", ...), _error(403, "X", ...).
_NAMED = re.compile(r"\b(?:error_body|_json_error|_error|refuse)\(\s*(?:\d+,\s*)?\"([A-Z][A-Za-z]+)\"")


def readme_table() -> dict[str, str]:
    """Error name -> its status column, from README.md."""
    rows: dict[str, str] = {}
    for line in (ROOT / "README.md").read_text().splitlines():
        match = _ROW.match(line)
        if match:
            assert match.group(1) not in rows, f"{match.group(1)} is listed twice"
            rows[match.group(1)] = match.group(2)
    return rows


def error_classes() -> list[type[LipiaError]]:
    """Every LipiaError subclass anywhere in lipia (each module imported, so none is missed)."""
    for module in pkgutil.walk_packages(lipia.__path__, "lipia."):
        if ".migrations." not in module.name and not module.name.endswith("__main__"):
            importlib.import_module(module.name)
    found: list[type[LipiaError]] = []
    todo = list(LipiaError.__subclasses__())
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo.extend(cls.__subclasses__())
    return found


def names_in_source() -> set[str]:
    """Error names lipia's code (not the simulator's) writes into answers by hand."""
    names: set[str] = set()
    for path in (ROOT / "lipia").rglob("*.py"):
        if "simulator" not in path.parts:
            names.update(_NAMED.findall(path.read_text()))
    return names


def test_every_error_lipia_answers_is_in_the_readme_table_with_its_status() -> None:
    table = readme_table()
    classes = error_classes()
    for cls in classes:
        assert cls.__name__ in table, f"README's error table lacks {cls.__name__}"
        statuses = {int(code) for code in re.findall(r"\d{3}", table[cls.__name__])}
        assert cls.status_code in statuses, (cls.__name__, cls.status_code, table[cls.__name__])
    known = {cls.__name__ for cls in classes} | errors.OTHER_ERROR_NAMES
    assert names_in_source() <= known, "add the new name to errors.OTHER_ERROR_NAMES"
    # No stale rows either: every listed name is one lipia can answer.
    assert set(table) == known


def test_the_source_scan_finds_the_hand_written_names() -> None:
    # The scan above is only worth something if it sees the names it is meant to see.
    assert {"PayloadTooLarge", "RequestTimeout", "DatabaseUnavailable", "InternalError"} <= (
        names_in_source()
    )


@pytest.mark.parametrize(
    ("detail", "text"),
    [
        ("No order with id 'x'.", "No order with id 'x'."),
        ("two\nlines  here", "two lines here"),
        ({"why": 1}, '{"why": 1}'),
        ("", "SomeError"),
    ],
)
def test_detail_is_always_one_line_of_text(detail: object, text: str) -> None:
    assert error_body("SomeError", detail) == {"error": "SomeError", "detail": text}


def test_the_summary_names_fields_as_a_client_writes_them() -> None:
    field_errors: list[dict[str, Any]] = [
        {"loc": ["body", "phone"], "msg": "Field required", "type": "missing"},
        {"loc": ["body", "items", 2, "quantity"], "msg": "Value error, too many", "type": "value_error"},
        {"loc": ["query", "limit"], "msg": "Input should be greater than 0", "type": "greater_than"},
        {"loc": ["body", 7], "msg": "JSON decode error", "type": "json_invalid"},
        {"loc": ["body"], "msg": "Field required", "type": "missing"},
    ]
    assert field_summary(field_errors) == (
        "phone: Field required; items[2].quantity: too many; "
        "query.limit: Input should be greater than 0; body: JSON decode error; body: Field required"
    )
    assert set(error_body("ValidationError", "x", field_errors)) == {"error", "detail", "errors"}
    assert set(error_body("ValidationError", "x", [])) == {"error", "detail"}


@pytest.mark.anyio
async def test_router_and_middleware_errors_are_in_the_envelope(server: RunningServer) -> None:
    missing = assert_error_response(await server.client.get("/api/nothing-here"), 404)
    assert missing == {"error": "NotFound", "detail": "Not Found"}
    wrong_method = assert_error_response(await server.client.delete("/api/menu"), 405)
    assert wrong_method == {"error": "MethodNotAllowed", "detail": "Method Not Allowed"}
    limit = server.settings.max_body_bytes
    too_big = await server.client.post(
        "/api/orders", content=b"x" * (limit + 1), headers={"content-type": "application/json"}
    )
    assert assert_error_response(too_big, 413) == {
        "error": "PayloadTooLarge",
        "detail": f"Request body is larger than {limit} bytes.",
    }
    not_json = await server.client.post(
        "/api/payments/mpesa/callback", content=b"a=b", headers={"content-type": "text/plain"}
    )
    assert assert_error_response(not_json, 415)["error"] == "UnsupportedMediaType"


@pytest.mark.anyio
async def test_openapi_documents_the_envelope(server: RunningServer) -> None:
    schema = (await server.client.get("/openapi.json")).json()
    components = schema["components"]["schemas"]
    envelope = components["ErrorResponse"]
    assert envelope["required"] == ["error", "detail"]
    assert envelope["properties"]["detail"]["type"] == "string"
    errors_field = envelope["properties"]["errors"]
    assert errors_field["type"] == "array"
    assert errors_field["items"] == {"$ref": "#/components/schemas/FieldError"}
    assert set(components["FieldError"]["properties"]) == {"loc", "msg", "type"}
    # The documented example is itself a valid envelope.
    assert_envelope(
        {name: field["examples"][0] for name, field in envelope["properties"].items() if "examples" in field}
    )


def test_an_error_response_parses_with_httpx_json() -> None:
    # The body the middleware sends by hand is the same envelope as the handlers'.
    from lipia.http.security import _json_error

    start, body = _json_error(503, "DatabaseUnavailable", "down", retry_after=5)
    response = httpx.Response(start["status"], headers=start["headers"], content=body["body"])
    assert assert_error_response(response, 503) == {"error": "DatabaseUnavailable", "detail": "down"}
