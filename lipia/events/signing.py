"""Signing a delivery the Standard Webhooks way, with the ``standardwebhooks`` library:
``webhook-id`` (the event id, the same on every redelivery), ``webhook-timestamp`` (this
attempt's, in seconds) and ``webhook-signature``: ``v1,<base64 HMAC-SHA256 of id.timestamp.body>``,
one per secret, separated by spaces, so a receiver holding either the old or the new secret
verifies during a rotation."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

from standardwebhooks import Webhook

from lipia import __version__

USER_AGENT = f"lipia-webhooks/{__version__}"


def signature(secrets: Sequence[str], message_id: str, timestamp: datetime, body: str) -> str:
    return " ".join(Webhook(secret).sign(message_id, timestamp, body) for secret in secrets)


def signed_headers(
    secrets: Sequence[str], message_id: str, body: str, *, now: datetime | None = None
) -> dict[str, str]:
    """The headers of one delivery attempt of ``body``."""
    if not secrets:
        raise ValueError("a delivery needs at least one signing secret")
    # Whole seconds: the header carries seconds, and the signature must cover what it says.
    moment = (now or datetime.now(UTC)).replace(microsecond=0)
    return {
        "content-type": "application/json",
        "user-agent": USER_AGENT,
        "webhook-id": message_id,
        "webhook-timestamp": str(int(moment.timestamp())),
        "webhook-signature": signature(secrets, message_id, moment, body),
    }
