"""The checkout page at ``GET /`` and its files under ``/static/`` (``lipia/static/``): plain HTML,
CSS and ES modules, served as they are (no build step), nothing from another origin.

``lipia-checkout.js`` is the client module frontend teams use (README "Checkout page and
lipia-checkout.js"); ``/static/`` answers CORS like the API (``lipia.http.cors``) so an app on
another origin can import it from lipia.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse
from starlette.staticfiles import StaticFiles

from lipia.config import Settings

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
STATIC_PATH = "/static"
# Safaricom's prompt stays on the phone about a minute (its exact lifetime is not documented).
LIVE_PROMPT_SECONDS = 60
_PROMPT_META = '<meta name="lipia-prompt-seconds" content="60">'

# The page's own files only: no inline script or style, nothing from elsewhere.
PAGE_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)

router = APIRouter(include_in_schema=False)


def prompt_seconds(settings: Settings) -> int:
    """The prompt window the page counts down: the simulator's, or Safaricom's minute."""
    if settings.is_simulator:
        return max(1, round(settings.simulator_prompt_timeout_seconds))
    return LIVE_PROMPT_SECONDS


@cache
def _page_template() -> str:
    return (STATIC_DIR / "index.html").read_text(encoding="utf-8")


def page_html(settings: Settings) -> str:
    seconds = prompt_seconds(settings)
    return _page_template().replace(_PROMPT_META, f'<meta name="lipia-prompt-seconds" content="{seconds}">')


@router.get("/", response_class=HTMLResponse)
async def checkout_page(request: Request) -> HTMLResponse:
    settings: Settings = request.app.state.settings
    return HTMLResponse(
        page_html(settings),
        headers={"Content-Security-Policy": PAGE_CSP, "Cache-Control": "no-cache"},
    )


def static_files() -> StaticFiles:
    return StaticFiles(directory=STATIC_DIR)
