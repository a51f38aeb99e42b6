"""The simulator's memory: access tokens, every push accepted and every callback delivery attempted.

The ledger is the truth about what the simulated customer did, whatever faults did to the wire:
`paid` says money moved even when the callback was dropped or the push response was lost.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from .faults import CallbackFault, QueryFault
from .ids import daraja_timestamp, masked_checkout_request_id, receipt_number
from .outcomes import Outcome


@dataclass(slots=True)
class Push:
    """One accepted STK Push: what was asked, what the customer will do, and what has happened."""

    checkout_request_id: str
    merchant_request_id: str
    phone: str
    party_a: str
    party_b: str
    amount: int
    account_reference: str
    transaction_desc: str | None
    transaction_type: str
    callback_url: str
    accepted_at: datetime
    outcome: Outcome
    callback_fault: CallbackFault
    query_fault: QueryFault
    state: Literal["pending", "final"] = "pending"
    acted_at: datetime | None = None
    acted_monotonic: float | None = None
    receipt: str | None = None
    transaction_date: int | None = None
    response_delivered: bool = True
    act_now: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def log_id(self) -> str:
        """The CheckoutRequestID as log lines show it (without the payer's number)."""
        return masked_checkout_request_id(self.checkout_request_id)

    @property
    def paid(self) -> bool:
        return self.state == "final" and self.outcome.paid

    def to_json(self) -> dict[str, Any]:
        return {
            "CheckoutRequestID": self.checkout_request_id,
            "MerchantRequestID": self.merchant_request_id,
            "phone": self.phone,
            "party_a": self.party_a,
            "party_b": self.party_b,
            "amount": self.amount,
            "account_reference": self.account_reference,
            "transaction_desc": self.transaction_desc,
            "transaction_type": self.transaction_type,
            "callback_url": self.callback_url,
            "accepted_at": self.accepted_at.isoformat(),
            "result_code": self.outcome.result_code,
            "result_desc": self.outcome.callback_desc,
            "state": self.state,
            "acted_at": self.acted_at.isoformat() if self.acted_at else None,
            "paid": self.paid,
            "receipt": self.receipt,
            "transaction_date": self.transaction_date,
            "callback_mode": self.callback_fault.mode if self.outcome.send_callback else "never",
            "response_delivered": self.response_delivered,
        }


@dataclass(frozen=True, slots=True)
class CallbackAttempt:
    checkout_request_id: str
    url: str  # the push's CallBackURL
    delivered_to: str  # where the request went: the CallBackURL, or its callback route's target
    body: dict[str, Any]
    sent_at: datetime
    completed_at: datetime
    status_code: int | None
    error: str | None

    def to_json(self) -> dict[str, Any]:
        return {
            "CheckoutRequestID": self.checkout_request_id,
            "url": self.url,
            "delivered_to": self.delivered_to,
            "body": self.body,
            "sent_at": self.sent_at.isoformat(),
            "completed_at": self.completed_at.isoformat(),
            "status_code": self.status_code,
            "error": self.error,
        }


class Ledger:
    def __init__(self) -> None:
        self.pushes: dict[str, Push] = {}
        self.callbacks: list[CallbackAttempt] = []
        self._receipts: set[str] = set()
        self._live_prompts: Counter[str] = Counter()
        self._tokens: dict[str, float] = {}  # token -> monotonic expiry

    # -- tokens --------------------------------------------------------------------------------

    def issue_token(self, token: str, expires_at: float, now: float) -> None:
        self._tokens = {t: exp for t, exp in self._tokens.items() if exp > now}
        self._tokens[token] = expires_at

    def token_valid(self, token: str, now: float) -> bool:
        expires_at = self._tokens.get(token)
        return expires_at is not None and now < expires_at

    def revoke_tokens(self) -> int:
        count = len(self._tokens)
        self._tokens.clear()
        return count

    # -- pushes --------------------------------------------------------------------------------

    def knows(self, push: Push) -> bool:
        """False once a reset has forgotten the push (its late work must leave no trace)."""
        return self.pushes.get(push.checkout_request_id) is push

    def has_live_prompt(self, phone: str) -> bool:
        return self._live_prompts[phone] > 0

    def add_push(self, push: Push) -> None:
        if push.checkout_request_id in self.pushes:  # pragma: no cover - ids are unique by construction
            raise RuntimeError("duplicate CheckoutRequestID")
        self.pushes[push.checkout_request_id] = push
        self._live_prompts[push.phone] += 1

    def settle(self, push: Push, now: datetime, monotonic: float) -> bool:
        """The customer acts (or the prompt lapses). False if that already happened."""
        if push.state == "final" or not self.knows(push):
            return False
        push.state = "final"
        push.acted_at = now
        push.acted_monotonic = monotonic
        if push.outcome.paid:
            receipt = receipt_number(now)
            while receipt in self._receipts:
                receipt = receipt_number(now)
            self._receipts.add(receipt)
            push.receipt = receipt
            push.transaction_date = int(daraja_timestamp(now))
        self._live_prompts[push.phone] -= 1
        if self._live_prompts[push.phone] <= 0:
            del self._live_prompts[push.phone]
        return True

    def record_callback(self, push: Push, attempt: CallbackAttempt) -> None:
        if self.knows(push):  # a delivery still in flight at a reset belongs to the old ledger
            self.callbacks.append(attempt)

    def clear(self) -> None:
        """Forget pushes and callbacks. Tokens stay valid; receipts issued stay reserved (never reused)."""
        self.pushes.clear()
        self.callbacks.clear()
        self._live_prompts.clear()

    def to_json(self) -> dict[str, Any]:
        return {
            "pushes": [push.to_json() for push in self.pushes.values()],
            "callbacks": [attempt.to_json() for attempt in self.callbacks],
        }
