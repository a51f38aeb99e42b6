"""Masking helpers for values that must never reach logs in full (reliability.md §4.3)."""

from __future__ import annotations

# Fixed-width filler: the mask does not even reveal how many digits were hidden.
_FILLER = "****"


def mask_phone(phone: str) -> str:
    """Keep the first 4 and last 3 characters of a phone number: ``2547****149``.

    Enough to tell numbers apart in a log line, not enough to call anyone. Values too short to
    keep 7 characters and still hide something are masked entirely.
    """
    if len(phone) <= 8:
        return _FILLER
    return f"{phone[:4]}{_FILLER}{phone[-3:]}"
