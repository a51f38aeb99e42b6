"""The Daraja client's exception hierarchy.

Every class carries ``http_status``, ``error_code``, ``error_message`` and ``request_id`` where
Daraja supplied them, and never a secret:

* DarajaError
  + DarajaAuthError          - no usable access token; no product request was processed.
  + DarajaRejected           - HTTP 4xx or a non-"0" ResponseCode; not processed, do not retry as is.
  + DarajaBusy               - 500.003.02 spike arrest / 500.003.03 quota; not processed, retry later.
  + DarajaConfigError        - 500.001.1001 "Wrong credentials" / "Merchant does not exist".
  + DarajaSubscriberLocked   - 500.001.1001 "Unable to lock subscriber"; not processed, retry in >= 1 min.
  + DarajaAmbiguous          - outcome unknown; a push that raised this must never be re-sent.
  + DarajaUnavailable        - the request never left (connect failure); not processed.

Which response shape maps to which class is decided in ``wire``; transport failures are
translated in ``client`` (``DarajaClient._send``).
"""

from __future__ import annotations

import re

# The field in "Bad Request - Invalid <field>" (DarajaRejected.field).
_FIELD = re.compile(r"Bad Request - Invalid (\w+)")


class DarajaError(Exception):
    """Base class for every error the Daraja client raises."""

    def __init__(
        self,
        message: str,
        *,
        http_status: int | None = None,
        error_code: str | None = None,
        error_message: str | None = None,
        request_id: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.http_status = http_status
        self.error_code = error_code
        self.error_message = error_message
        self.request_id = request_id

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.message!r}, http_status={self.http_status!r}, "
            f"error_code={self.error_code!r}, request_id={self.request_id!r})"
        )


class DarajaAuthError(DarajaError):
    """No usable access token, so no product request was processed.

    Raised when the token endpoint refuses us (wrong consumer key/secret: HTTP 400 with an empty
    body; bad auth scheme ``400.008.01``; bad grant type ``400.008.02``), answers 200 with a body
    that has no usable token, or when a product API rejects a freshly fetched token a second
    time (``404.001.03`` / ``401.00x.01`` twice in a row, e.g. the app is not subscribed to the
    product, or another instance keeps invalidating our token).
    """


class DarajaRejected(DarajaError):
    """Daraja refused the request outright; it was provably not processed. Do not retry as is.

    Raised on HTTP 4xx (with or without an error envelope, e.g. ``400.002.02 Bad Request -
    Invalid PhoneNumber``) and on HTTP 200 whose ``ResponseCode`` is not ``"0"``. ``field`` is
    the Daraja field named by ``"Bad Request - Invalid <field>"``, when present.
    """

    def __init__(
        self,
        message: str,
        *,
        http_status: int | None = None,
        error_code: str | None = None,
        error_message: str | None = None,
        request_id: str | None = None,
    ) -> None:
        super().__init__(
            message,
            http_status=http_status,
            error_code=error_code,
            error_message=error_message,
            request_id=request_id,
        )
        match = _FIELD.search(error_message or "")
        self.field: str | None = match.group(1) if match else None


class DarajaBusy(DarajaError):
    """The gateway shed the request (``500.003.02`` spike arrest / system busy, ``500.003.03``
    quota, or HTTP 429). Rejected before processing; retry later with backoff."""


class DarajaConfigError(DarajaError):
    """``500.001.1001`` "Wrong credentials" / "Merchant does not exist": shortcode, passkey or
    Timestamp do not match what Daraja expects. Not processed; fix the configuration."""


class DarajaSubscriberLocked(DarajaError):
    """``500.001.1001`` "Unable to lock subscriber": the customer already has an STK/USSD session
    open. This push was not processed; a new one may succeed after at least a minute."""


class DarajaAmbiguous(DarajaError):
    """The outcome is unknown: the request may have been processed.

    Raised when the request left but no trustworthy answer came back: read/write timeout,
    connection reset or remote disconnect, a 5xx without a parseable Daraja error envelope,
    ``500.003.1001`` internal error, a redirect, or an unparseable 200 body.

    **A push that raised this MUST NOT be re-sent, by anyone**: STK Push has no idempotency key,
    the prompt may already be on the customer's phone, and a second push is a second payment.
    Resolve it by callback or reconciliation. For STK Query this simply means "ask again later".
    """


class DarajaUnavailable(DarajaError):
    """The request never reached Daraja (connection refused, DNS failure, connect or pool
    timeout; or the token request itself failed in transit). Provably not processed; retry later."""


def _copy_error(exc: DarajaError) -> DarajaError:
    """A fresh instance of the same class with the same fields (and no traceback)."""
    return type(exc)(
        exc.message,
        http_status=exc.http_status,
        error_code=exc.error_code,
        error_message=exc.error_message,
        request_id=exc.request_id,
    )
