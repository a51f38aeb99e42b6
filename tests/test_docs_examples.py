"""`/docs` "Try it out" works as given: each operation's example, read from /openapi.json the way
Swagger UI builds it, sent to a running server."""

from __future__ import annotations

import asyncio
import json
import shlex
from pathlib import Path
from typing import Any

import pytest

from tests.support.envelope import assert_envelope, assert_error_response
from tests.support.server import RunningServer

pytestmark = pytest.mark.anyio


def _resolve(schema: dict[str, Any], spec: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        name = schema["$ref"].removeprefix("#/components/schemas/")
        schema = spec["components"]["schemas"][name]
    return schema


def sample(schema: dict[str, Any], spec: dict[str, Any]) -> Any:
    """What Swagger UI pre-fills: a schema's own example, else one built from its properties'."""
    schema = _resolve(schema, spec)
    if "example" in schema:
        return schema["example"]
    if schema.get("examples"):
        return schema["examples"][0]
    if "anyOf" in schema:
        return sample(next(s for s in schema["anyOf"] if s.get("type") != "null"), spec)
    kind = schema.get("type")
    if kind == "object" or "properties" in schema:
        return {name: sample(prop, spec) for name, prop in schema.get("properties", {}).items()}
    if kind == "array":
        return [sample(schema["items"], spec)]
    defaults: dict[str, Any] = {"string": "string", "integer": 0, "number": 0, "boolean": True}
    return defaults[str(kind)]


def body_example(spec: dict[str, Any], path: str) -> Any:
    content = spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]
    return sample(content["schema"], spec)


def parameter_example(spec: dict[str, Any], path: str, name: str) -> Any:
    (parameter,) = [p for p in spec["paths"][path]["get"]["parameters"] if p["name"] == name]
    (example,) = parameter["examples"].values()
    return example["value"]


async def test_the_docs_examples_succeed_as_given(server: RunningServer) -> None:
    spec = (await server.client.get("/openapi.json")).json()

    order_example = body_example(spec, "/api/orders")
    assert order_example == {
        "items": [{"menu_item_id": "pilau-beef", "quantity": 1}],
        "customer_name": "Wanjiku",
        "note": "No onions, please",
    }
    created = await server.client.post("/api/orders", json=order_example)
    assert created.status_code == 201, created.text
    order = created.json()

    initiate_example = body_example(spec, "/api/payments/mpesa/initiate")
    assert set(initiate_example) == {"phone", "amount", "order_id"}
    # The example's amount is the example order's total; only its id cannot be known in advance.
    assert initiate_example["amount"] == order["total"]
    # Where unknown order ids are refused, the example's id names no order: send the one just
    # made in its place. The point is that the example's shape and values are valid.
    as_given = await server.client.post("/api/payments/mpesa/initiate", json=initiate_example)
    if as_given.status_code == 404:
        assert assert_error_response(as_given)["error"] == "OrderNotFound"
        initiated = await server.client.post(
            "/api/payments/mpesa/initiate", json={**initiate_example, "order_id": order["order_id"]}
        )
    else:
        initiated = as_given
    assert initiated.status_code == 200, initiated.text
    checkout_id = initiated.json()["CheckoutRequestID"]
    assert checkout_id

    status_path = "/api/payments/status/{payment_ref}"
    example_ref = parameter_example(spec, status_path, "payment_ref")
    assert example_ref.startswith("ws_CO_")
    # An example id belongs to no payment here: the documented 404, the envelope plus the status
    # fields that end the frontend's wait.
    unknown = await server.client.get(f"/api/payments/status/{example_ref}")
    assert unknown.status_code == 404, unknown.text
    body = unknown.json()
    assert_envelope({"error": body["error"], "detail": body["detail"]})
    assert (body["error"], body["reason"], body["final"]) == ("PaymentNotFound", "unknown_payment", True)
    # The same request with the id initiate answered: the payment, paid by the simulator.
    status = await server.client.get(f"/api/payments/status/{checkout_id}")
    assert status.status_code == 200, status.text
    final = await server.wait_final(checkout_id)
    assert final["status"] == "completed"


def readme_block_after(marker: str) -> list[str]:
    """The shell commands of the first ``bash`` block after ``marker`` in README.md, each joined
    across its backslash continuations (comments dropped)."""
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    block = text[text.index(marker) :].split("```bash\n", 1)[1].split("```", 1)[0]
    commands, current = [], ""
    for line in block.splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        current += line.rstrip("\\").rstrip() + " " if line.endswith("\\") else line
        if not line.endswith("\\"):
            commands.append(current)
            current = ""
    return commands


@pytest.mark.simulator_mode_only
async def test_the_checklists_debugging_commands_work_as_written(server: RunningServer) -> None:
    """Section 9 of the frontend team's checklist, as the README quotes it, run with curl against
    lipia on the embedded default (only the port is this test server's)."""
    commands = readme_block_after("The checklist's debugging commands")
    assert [command.split()[1] for command in commands] == [
        "http://localhost:5555/api/menu",
        "-X",
        "http://localhost:5555/api/payments/status/CHECKOUT_REQUEST_ID_HERE",
    ]

    async def run(command: str) -> dict[str, Any]:
        argv = shlex.split(command.replace("http://localhost:5555", server.base_url))
        process = await asyncio.create_subprocess_exec(
            *argv, "-s", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        out, err = await process.communicate()
        assert process.returncode == 0, err
        answer: dict[str, Any] = json.loads(out)
        return answer

    menu = await run(commands[0])
    assert menu["categories"]
    initiated = await run(commands[1])
    checkout_id = initiated["CheckoutRequestID"]
    assert checkout_id.startswith("ws_CO_"), initiated
    assert initiated["order_id"] == "test123"
    status = await run(commands[2].replace("CHECKOUT_REQUEST_ID_HERE", checkout_id))
    assert status["CheckoutRequestID"] == checkout_id
    assert status["status"] in ("pending", "completed")
    final = await server.wait_final(checkout_id)
    assert (final["status"], final["ResultCode"]) == ("completed", "0")
