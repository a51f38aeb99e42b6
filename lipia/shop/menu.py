"""The menu: a catalogue shipped with the package (or a JSON file named by LIPIA_MENU_FILE).

The menu is read once at start-up and never changes while lipia runs; orders copy the name and
price of each item, so a later menu change never alters an existing order's total.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from pydantic import BaseModel, Field, model_validator


class MenuCategory(BaseModel):
    id: str
    name: str


class MenuItem(BaseModel):
    id: str = Field(min_length=1, max_length=40)
    category: str
    name: str = Field(min_length=1, max_length=120)
    description: str = ""
    price: int = Field(gt=0, le=250_000, description="Whole Kenyan shillings.")
    available: bool = True


class Menu(BaseModel):
    restaurant: str
    currency: str = "KES"
    categories: list[MenuCategory]
    items: list[MenuItem]

    @model_validator(mode="after")
    def _check_consistency(self) -> Menu:
        category_ids = {c.id for c in self.categories}
        seen: set[str] = set()
        for item in self.items:
            if item.category not in category_ids:
                raise ValueError(f"menu item {item.id!r} names unknown category {item.category!r}")
            if item.id in seen:
                raise ValueError(f"menu item id {item.id!r} appears twice")
            seen.add(item.id)
        return self

    def item(self, item_id: str) -> MenuItem | None:
        return next((item for item in self.items if item.id == item_id), None)


def load_menu(path: str | None = None) -> Menu:
    if path:
        text = Path(path).read_text(encoding="utf-8")
    else:
        text = resources.files("lipia.shop").joinpath("menu.json").read_text(encoding="utf-8")
    return Menu.model_validate(json.loads(text))
