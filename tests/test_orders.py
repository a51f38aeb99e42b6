"""Menu and orders through a real server: server-side pricing and a clear 4xx for every bad order."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from lipia.shop.orders import MAX_LINES, MAX_ORDER_TOTAL, MAX_QUANTITY
from tests.support.envelope import assert_error_response
from tests.support.server import RunningServer, running_server

pytestmark = pytest.mark.anyio


# Nothing here pays or changes shared state, so one server serves the whole module (fast).
@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
async def server(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[RunningServer]:
    async with running_server(tmp_path_factory.mktemp("orders")) as running:
        yield running


async def _menu(server: RunningServer) -> dict[str, Any]:
    response = await server.client.get("/api/menu")
    assert response.status_code == 200
    menu: dict[str, Any] = response.json()
    return menu


def _available(menu: dict[str, Any]) -> list[dict[str, Any]]:
    return [item for item in menu["items"] if item["available"]]


def assert_error(response: httpx.Response, *, status: int) -> dict[str, Any]:
    """The 4xx ``status`` in the one JSON error envelope (tests/support/envelope.py)."""
    assert 400 <= status < 500, status
    return assert_error_response(response, status)


def _detail_text(body: dict[str, Any]) -> str:
    detail: str = body["detail"]
    return detail


# -- menu --------------------------------------------------------------------------------------


async def test_menu_has_categorised_items_with_integer_prices(server: RunningServer) -> None:
    menu = await _menu(server)

    categories = menu["categories"]
    items = menu["items"]
    assert 15 <= len(items) <= 40
    category_ids = [c["id"] for c in categories]
    assert len(category_ids) == len(set(category_ids)) >= 3
    assert all(c["name"] for c in categories)
    item_ids = [item["id"] for item in items]
    assert len(item_ids) == len(set(item_ids))
    for item in items:
        assert item["category"] in category_ids, item
        assert type(item["price"]) is int, item
        assert 0 < item["price"] <= MAX_ORDER_TOTAL
        assert type(item["available"]) is bool
        assert item["name"]
    # Every category is used, and the flag actually varies.
    assert {item["category"] for item in items} == set(category_ids)
    assert {item["available"] for item in items} == {True, False}
    assert menu["currency"] == "KES"


# -- creating orders ---------------------------------------------------------------------------


async def test_total_is_computed_on_the_server_ignoring_client_prices(server: RunningServer) -> None:
    menu = await _menu(server)
    first, second = _available(menu)[:2]
    body = {
        "items": [
            {"menu_item_id": first["id"], "quantity": 2, "unit_price": 1, "price": 1, "line_total": 1},
            {"menu_item_id": second["id"], "quantity": 3, "unit_price": 1},
        ],
        "total": 1,
        "amount": 1,
        "customer_name": "Wanjiku",
    }

    response = await server.client.post("/api/orders", json=body)

    assert response.status_code == 201, response.text
    order = response.json()
    expected = first["price"] * 2 + second["price"] * 3
    assert order["total"] == expected
    assert order["total"] != 1
    assert order["status"] == "awaiting_payment"
    assert order["currency"] == "KES"
    assert order["customer_name"] == "Wanjiku"
    assert [(line["menu_item_id"], line["quantity"]) for line in order["items"]] == [
        (first["id"], 2),
        (second["id"], 3),
    ]
    for line, item in zip(order["items"], (first, second), strict=True):
        assert line["unit_price"] == item["price"]
        assert line["name"] == item["name"]
        assert line["line_total"] == item["price"] * line["quantity"]

    stored = (await server.client.get(f"/api/orders/{order['order_id']}")).json()
    assert stored["total"] == expected


async def test_repeated_items_merge_into_one_line(server: RunningServer) -> None:
    menu = await _menu(server)
    a, b = _available(menu)[:2]
    items = [
        {"menu_item_id": a["id"], "quantity": 1},
        {"menu_item_id": b["id"], "quantity": 2},
        {"menu_item_id": a["id"], "quantity": 3},
    ]

    response = await server.client.post("/api/orders", json={"items": items})

    assert response.status_code == 201, response.text
    order = response.json()
    assert [(line["menu_item_id"], line["quantity"]) for line in order["items"]] == [
        (a["id"], 4),
        (b["id"], 2),
    ]
    assert order["total"] == a["price"] * 4 + b["price"] * 2


async def test_merged_quantity_is_bounded_too(server: RunningServer) -> None:
    menu = await _menu(server)
    item = _available(menu)[0]
    half = MAX_QUANTITY // 2 + 1
    items = [{"menu_item_id": item["id"], "quantity": half}, {"menu_item_id": item["id"], "quantity": half}]

    body = assert_error(await server.client.post("/api/orders", json={"items": items}), status=422)

    assert item["name"] in _detail_text(body)
    assert str(MAX_QUANTITY) in _detail_text(body)


async def test_quantity_at_the_limit_is_accepted(server: RunningServer) -> None:
    menu = await _menu(server)
    item = min(_available(menu), key=lambda i: i["price"])

    response = await server.client.post(
        "/api/orders", json={"items": [{"menu_item_id": item["id"], "quantity": MAX_QUANTITY}]}
    )

    assert response.status_code == 201, response.text
    assert response.json()["total"] == item["price"] * MAX_QUANTITY


async def test_unknown_item_is_named(server: RunningServer) -> None:
    body = assert_error(
        await server.client.post(
            "/api/orders", json={"items": [{"menu_item_id": "unicorn-steak", "quantity": 1}]}
        ),
        status=422,
    )
    assert "unicorn-steak" in _detail_text(body)
    assert "unknown" in _detail_text(body).lower()


async def test_unavailable_item_is_refused(server: RunningServer) -> None:
    menu = await _menu(server)
    unavailable = next(item for item in menu["items"] if not item["available"])

    body = assert_error(
        await server.client.post(
            "/api/orders", json={"items": [{"menu_item_id": unavailable["id"], "quantity": 1}]}
        ),
        status=422,
    )

    text = _detail_text(body)
    assert unavailable["name"] in text or unavailable["id"] in text
    assert "available" in text.lower()


@pytest.mark.parametrize(
    ("quantity", "words"),
    [
        (0, "at least"),
        (-1, "at least"),
        (-(10**9), "at least"),
        (10**9, "at most"),
        (MAX_QUANTITY + 1, "at most"),
    ],
)
async def test_out_of_range_quantity_is_refused(server: RunningServer, quantity: int, words: str) -> None:
    menu = await _menu(server)
    item = _available(menu)[0]

    body = assert_error(
        await server.client.post(
            "/api/orders", json={"items": [{"menu_item_id": item["id"], "quantity": quantity}]}
        ),
        status=422,
    )

    text = _detail_text(body)
    assert "quantity" in text.lower()
    assert words in text
    assert item["name"] in text


@pytest.mark.parametrize("quantity", [1.5, 2.0, "2", "two", None, True, [1], {"n": 1}, 10**30])
async def test_non_integer_quantity_is_refused(server: RunningServer, quantity: Any) -> None:
    menu = await _menu(server)
    item = _available(menu)[0]

    body = assert_error(
        await server.client.post(
            "/api/orders", json={"items": [{"menu_item_id": item["id"], "quantity": quantity}]}
        ),
        status=422,
    )

    assert "quantity" in _detail_text(body).lower()


@pytest.mark.parametrize(
    ("payload", "names"),
    [
        ({"items": []}, "items"),
        ({}, "items"),
        ({"customer_name": "x"}, "items"),
        ({"items": None}, "items"),
        ({"items": "pilau-beef"}, "items"),
        ({"items": [{"quantity": 1}]}, "menu_item_id"),
        ({"items": [{"menu_item_id": "pilau-beef"}]}, "quantity"),
        ({"items": [{"menu_item_id": 123, "quantity": 1}]}, "menu_item_id"),
        ({"items": [{"menu_item_id": "", "quantity": 1}]}, "menu_item_id"),
        ({"items": [{"menu_item_id": "x" * 500, "quantity": 1}]}, "menu_item_id"),
        ({"items": ["pilau-beef"]}, "items"),
        (
            {"items": [{"menu_item_id": "pilau-beef", "quantity": 1}], "customer_name": "x" * 500},
            "customer_name",
        ),
        ({"items": [{"menu_item_id": "pilau-beef", "quantity": 1}], "note": "x" * 5000}, "note"),
    ],
)
async def test_malformed_order_is_refused_with_the_field_named(
    server: RunningServer, payload: dict[str, Any], names: str
) -> None:
    body = assert_error(await server.client.post("/api/orders", json=payload), status=422)
    assert names in _detail_text(body)
    if body["error"] == "ValidationError":
        assert any(names in error["loc"] for error in body["errors"]), body


async def test_a_validation_error_names_each_field_in_detail_and_lists_them_in_errors(
    server: RunningServer,
) -> None:
    payload = {"items": [{"menu_item_id": "pilau-beef", "quantity": "two"}, {"quantity": 1}]}

    body = assert_error(await server.client.post("/api/orders", json=payload), status=422)

    assert body["error"] == "ValidationError"
    assert body["errors"] == [
        {
            "loc": ["body", "items", 0, "quantity"],
            "msg": "Input should be a valid integer",
            "type": "int_type",
        },
        {"loc": ["body", "items", 1, "menu_item_id"], "msg": "Field required", "type": "missing"},
    ]
    assert body["detail"] == (
        "items[0].quantity: Input should be a valid integer; items[1].menu_item_id: Field required"
    )


async def test_too_many_lines_is_refused(server: RunningServer) -> None:
    menu = await _menu(server)
    available = _available(menu)
    items = [
        {"menu_item_id": available[i % len(available)]["id"], "quantity": 1} for i in range(MAX_LINES + 1)
    ]

    body = assert_error(await server.client.post("/api/orders", json={"items": items}), status=422)

    text = _detail_text(body)
    assert "items" in text
    assert str(MAX_LINES) in text


async def test_total_above_the_mpesa_limit_is_refused(server: RunningServer) -> None:
    menu = await _menu(server)
    items: list[dict[str, Any]] = []
    total = 0
    for item in sorted(_available(menu), key=lambda i: -i["price"]):
        items.append({"menu_item_id": item["id"], "quantity": MAX_QUANTITY})
        total += item["price"] * MAX_QUANTITY
        if total > MAX_ORDER_TOTAL:
            break
    assert total > MAX_ORDER_TOTAL

    body = assert_error(await server.client.post("/api/orders", json={"items": items}), status=422)

    text = _detail_text(body)
    assert str(MAX_ORDER_TOTAL) in text.replace(",", "")
    assert str(total) in text.replace(",", "")


# JSON that is not an order is invalid input (422); a body that is not UTF-8 is not JSON at all (400).
@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"{not json", 422),
        (b"", 422),
        (b"[]", 422),
        (b'"items"', 422),
        (b"null", 422),
        (b"42", 422),
        (b'{"items": [', 422),
        ('{"items": "\xff"}'.encode("latin-1"), 400),
    ],
)
async def test_malformed_json_body_is_a_4xx_json(server: RunningServer, raw: bytes, status: int) -> None:
    response = await server.client.post(
        "/api/orders", content=raw, headers={"content-type": "application/json"}
    )
    assert_error(response, status=status)


async def test_wrong_content_type_is_a_4xx_json(server: RunningServer) -> None:
    response = await server.client.post(
        "/api/orders", content=b"items=pilau-beef", headers={"content-type": "text/plain"}
    )
    assert_error(response, status=422)


# -- reading orders ----------------------------------------------------------------------------


async def test_read_order_returns_items_total_and_status(server: RunningServer) -> None:
    menu = await _menu(server)
    item = _available(menu)[0]
    created = await server.create_order([{"menu_item_id": item["id"], "quantity": 3}])

    response = await server.client.get(f"/api/orders/{created['order_id']}")

    assert response.status_code == 200
    order = response.json()
    assert order["order_id"] == created["order_id"]
    assert order["status"] == "awaiting_payment"
    assert order["total"] == item["price"] * 3
    assert order["items"] == [
        {
            "menu_item_id": item["id"],
            "name": item["name"],
            "unit_price": item["price"],
            "quantity": 3,
            "line_total": item["price"] * 3,
        }
    ]
    assert order["paid_at"] is None
    assert order["payment_id"] is None


async def test_order_ids_are_unique(server: RunningServer) -> None:
    ids = {(await server.create_order())["order_id"] for _ in range(5)}
    assert len(ids) == 5


@pytest.mark.parametrize("order_id", ["ord_0000000000000000", "nope", "x" * 300, "%00", "1%20OR%201%3D1"])
async def test_unknown_order_is_404_json(server: RunningServer, order_id: str) -> None:
    body = assert_error(await server.client.get(f"/api/orders/{order_id}"), status=404)
    assert body["error"]


async def test_customer_name_and_note_need_the_orders_access_key(server: RunningServer) -> None:
    """An order id travels in status answers and URLs; the customer's own words stay with whoever
    created the order."""
    body = {
        "items": [{"menu_item_id": "pilau-beef", "quantity": 1}],
        "customer_name": "Wanjiku",
        "note": "Gate B",
    }
    created = await server.client.post("/api/orders", json=body)
    assert created.status_code == 201
    order = created.json()
    assert (order["customer_name"], order["note"]) == ("Wanjiku", "Gate B")
    key = order["access_key"]
    assert len(key) >= 24

    anonymous = (await server.client.get(f"/api/orders/{order['order_id']}")).json()
    wrong = (await server.client.get(f"/api/orders/{order['order_id']}", headers={"X-Order-Key": "x"})).json()
    owner = (await server.client.get(f"/api/orders/{order['order_id']}", headers={"X-Order-Key": key})).json()

    assert (anonymous["customer_name"], anonymous["note"]) == (None, None)
    assert (wrong["customer_name"], wrong["note"]) == (None, None)
    assert (owner["customer_name"], owner["note"]) == ("Wanjiku", "Gate B")
    assert "access_key" not in owner
    assert anonymous["total"] == owner["total"]  # what the checkout needs is public
