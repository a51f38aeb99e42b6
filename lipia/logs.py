"""Structured logging: one JSON object per line in live mode, a readable coloured line in
development, every timestamp UTC ISO-8601 (``2026-11-26T11:15:01.123Z``, as the API writes times).

Callers pass facts as ``extra={...}``; they mask phone numbers and CheckoutRequestIDs themselves
(``lipia.redact``) and never pass secrets. As a second line of defence a filter replaces any
configured secret value (consumer key and secret, passkey, admin token) and masks any phone
number that still slips into a record, its traceback included.

The handler sits on the root logger, and uvicorn's loggers are routed to it, so every line a
process writes (a library's warning, an unhandled error's traceback) is one record in the same
format, redacted the same way: no plain-text line escapes.

A payment's story is easy to follow: inside ``payment_context(...)`` every record carries the
payment id and the masked CheckoutRequestID as fields, whichever module (or library) wrote it.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterable, Iterator
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import IO, Any

from pythonjsonlogger.json import JsonFormatter

from lipia.redact import mask_checkout_id, scrub_personal_data

_REDACTED = "[redacted]"

# The payment whose story the current task is telling (set by ``payment_context``).
_PAYMENT_ID: ContextVar[str | None] = ContextVar("lipia_payment_id", default=None)
_CHECKOUT_ID: ContextVar[str | None] = ContextVar("lipia_checkout_request_id", default=None)


@contextlib.contextmanager
def payment_context(payment_id: str | None, checkout_request_id: str | None = None) -> Iterator[None]:
    """Every record logged inside carries ``payment_id`` and the masked ``checkout_request_id``
    (tasks started inside inherit them). Nested contexts fill in what the outer one lacked."""
    payment_token = _PAYMENT_ID.set(payment_id or _PAYMENT_ID.get())
    masked = mask_checkout_id(checkout_request_id) if checkout_request_id else _CHECKOUT_ID.get()
    checkout_token = _CHECKOUT_ID.set(masked)
    try:
        yield
    finally:
        _CHECKOUT_ID.reset(checkout_token)
        _PAYMENT_ID.reset(payment_token)


class PaymentFields(logging.Filter):
    """Adds the current payment's id and masked CheckoutRequestID to records that lack them."""

    def filter(self, record: logging.LogRecord) -> bool:
        payment_id, checkout_id = _PAYMENT_ID.get(), _CHECKOUT_ID.get()
        if payment_id is not None and getattr(record, "payment_id", None) is None:
            record.payment_id = payment_id
        if checkout_id is not None and getattr(record, "checkout_request_id", None) is None:
            record.checkout_request_id = checkout_id
        return True


class RedactSecrets(logging.Filter):
    """The second line of defence: whatever a caller (or a library, or a traceback) put in a
    record, configured secrets are replaced and phone numbers masked before it is written."""

    def __init__(self, secrets: Iterable[str]) -> None:
        super().__init__()
        # Very short values would redact innocent text; real secrets are long.
        self._secrets = sorted({s for s in secrets if len(s) >= 8}, key=len, reverse=True)

    def _clean(self, text: str) -> str:
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, _REDACTED)
        return scrub_personal_data(text)

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = self._clean(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        if record.exc_info and not record.exc_text:
            # Formatted here, once, so the traceback (SQL errors included) is cleaned too.
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self._clean(record.exc_text)
            # Formatters prefer exc_info when it is there; leave them only the cleaned text.
            record.exc_info = None
        for key, value in list(record.__dict__.items()):
            if isinstance(value, str) and key not in ("msg", "message", "exc_text"):
                record.__dict__[key] = self._clean(value)
        return True


def utc_timestamp(created: float) -> str:
    """``2026-11-26T11:15:01.123Z``: UTC, ISO-8601, milliseconds, whatever the host's zone."""
    moment = datetime.fromtimestamp(created, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class JsonLines(JsonFormatter):
    """One JSON object per record: time, level, logger, message, the extra fields, and a
    traceback (as one string field) when there is one."""

    def __init__(self) -> None:
        super().__init__(
            "{asctime}{levelname}{name}{message}",
            style="{",
            rename_fields={
                "asctime": "time",
                "levelname": "level",
                "name": "logger",
                "exc_info": "traceback",
            },
        )

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return utc_timestamp(record.created)


# Attributes every LogRecord has: anything else on a record is a field a caller passed in extra.
_STANDARD_ATTRIBUTES = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "color_message"}
_COLOURS = {
    "DEBUG": "\x1b[2m",
    "INFO": "\x1b[32m",
    "WARNING": "\x1b[33m",
    "ERROR": "\x1b[31m",
    "CRITICAL": "\x1b[1;31m",
}
_DIM, _RESET = "\x1b[2m", "\x1b[0m"


class ReadableLines(logging.Formatter):
    """``2026-11-26T11:15:01.123Z INFO  lipia.payments payment status changed payment_id=pay_…``:
    one line per record for a developer's terminal (coloured when it is one), the extra fields as
    ``key=value``, a traceback below its line."""

    def __init__(self, *, colour: bool) -> None:
        super().__init__()
        self.colour = colour

    def format(self, record: logging.LogRecord) -> str:
        level = record.levelname
        fields = " ".join(
            f"{key}={_field_text(value)}"
            for key, value in record.__dict__.items()
            if key not in _STANDARD_ATTRIBUTES and value is not None and not key.startswith("_")
        )
        stamp, name = utc_timestamp(record.created), record.name
        if self.colour:
            colour = _COLOURS.get(level, "")
            line = (
                f"{_DIM}{stamp}{_RESET} {colour}{level:<7}{_RESET} {_DIM}{name}{_RESET} {record.getMessage()}"
            )
            if fields:
                line += f" {_DIM}{fields}{_RESET}"
        else:
            line = f"{stamp} {level:<7} {name} {record.getMessage()}" + (f" {fields}" if fields else "")
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line += "\n" + record.exc_text
        return line


def _field_text(value: Any) -> str:
    text = str(value)
    return repr(text) if not text or any(c.isspace() for c in text) else text


# Libraries whose INFO/DEBUG lines carry full URLs (callback tokens) or SQL parameters (phones).
QUIET_LOGGERS = ("httpx", "httpcore", "uvicorn.access", "aiosqlite", "sqlalchemy.engine", "alembic")
# uvicorn's own loggers: no handlers of their own, so their records (an unhandled error's
# traceback included) reach the root handler like everyone else's.
UVICORN_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access")


def configure_logging(
    level: str = "INFO",
    *,
    json_lines: bool = True,
    secrets: Iterable[str] = (),
    stream: IO[str] | None = None,
) -> logging.Handler:
    """Send every log record of this process to ``stream`` (stderr): JSON lines, or readable
    lines (coloured on a terminal). Returns the handler.

    Run uvicorn with ``log_config=None`` so it keeps its hands off the loggers set up here.
    """
    target = stream or sys.stderr
    handler = logging.StreamHandler(target)
    if json_lines:
        handler.setFormatter(JsonLines())
    else:
        handler.setFormatter(ReadableLines(colour=_is_terminal(target)))
    handler.addFilter(PaymentFields())
    handler.addFilter(RedactSecrets(secrets))
    handler.lipia_handler = True  # type: ignore[attr-defined]
    root = logging.getLogger()
    # Replaces only a handler configured here before (a test framework's own handlers stay).
    root.handlers[:] = [h for h in root.handlers if not getattr(h, "lipia_handler", False)] + [handler]
    root.setLevel(level.upper())
    for name in ("lipia", *UVICORN_LOGGERS):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True
        logger.setLevel(logging.NOTSET)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    return handler


def _is_terminal(stream: IO[str]) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False
