"""Client for Safaricom's Daraja API: OAuth, M-Pesa Express (STK Push) and STK Push Query.

* ``client`` - ``DarajaClient`` (token cache, the product calls) and ``build_http_client``.
* ``wire``   - Daraja's response shapes and what each one means (results or exceptions).
* ``errors`` - the exception hierarchy every failure is reported in.

Protocol facts come from Safaricom's Daraja documentation and from real Daraja traffic (the public
sandbox, published captures); where the two differ, the comment says so.
Everything callers use is re-exported here, so ``from lipia.daraja import ...`` is the API.
"""

from __future__ import annotations

from .client import STK_PUSH_PATH, STK_QUERY_PATH, TOKEN_PATH, DarajaClient, build_http_client, clean_text
from .errors import (
    DarajaAmbiguous,
    DarajaAuthError,
    DarajaBusy,
    DarajaConfigError,
    DarajaError,
    DarajaRejected,
    DarajaSubscriberLocked,
    DarajaUnavailable,
)
from .wire import StkPushAccepted, StkQueryResult

__all__ = [
    "STK_PUSH_PATH",
    "STK_QUERY_PATH",
    "TOKEN_PATH",
    "DarajaAmbiguous",
    "DarajaAuthError",
    "DarajaBusy",
    "DarajaClient",
    "DarajaConfigError",
    "DarajaError",
    "DarajaRejected",
    "DarajaSubscriberLocked",
    "DarajaUnavailable",
    "StkPushAccepted",
    "StkQueryResult",
    "build_http_client",
    "clean_text",
]
