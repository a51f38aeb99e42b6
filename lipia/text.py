"""Text lipia stores: never NUL, other control characters, or lone surrogates.

PostgreSQL refuses NUL in text columns and every driver refuses to encode a lone surrogate
(``"\\ud800"`` is valid JSON but not UTF-8), so such text must be stopped at the boundary: refused
with a 4xx where a person typed it, replaced where lipia only keeps it for the record.
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator

# C0 controls except tab, newline and carriage return; DEL; C1 controls; lone surrogates.
_UNSTORABLE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff]")
REPLACEMENT = "\ufffd"


def is_storable(text: str) -> bool:
    return _UNSTORABLE.search(text) is None


def storable(text: str, limit: int | None = None) -> str:
    """``text`` with every unstorable character replaced, cut to ``limit`` characters."""
    cleaned = _UNSTORABLE.sub(REPLACEMENT, text)
    return cleaned if limit is None else cleaned[:limit]


def _check_storable(text: str) -> str:
    if not is_storable(text):
        raise ValueError("must not contain control characters, NUL or unpaired surrogates")
    return text


# A pydantic string type for fields people type (names, notes): refused with a 422 when it holds
# characters no database can store.
StorableText = Annotated[str, AfterValidator(_check_storable)]
