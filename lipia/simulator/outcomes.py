"""What the simulated customer does, chosen by magic phone number (the table in README.md).

Like test card numbers: a handful of numbers produce each failure, every other valid number pays.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Wait(Enum):
    """Which configured delay passes before the outcome happens."""

    CUSTOMER = "callback_delay_seconds"  # the customer answers the prompt
    PROMPT = "prompt_timeout_seconds"  # the prompt lapses unanswered


@dataclass(frozen=True, slots=True)
class Outcome:
    result_code: int
    callback_desc: str  # ResultDesc in the callback
    query_desc: str  # ResultDesc in the STK Query answer (Daraja words some codes differently)
    wait: Wait
    paid: bool = False  # money moved from the customer to the merchant
    send_callback: bool = True


SUCCESS_DESC = "The service request is processed successfully."

SUCCESS = Outcome(0, SUCCESS_DESC, SUCCESS_DESC, Wait.CUSTOMER, paid=True)
INSUFFICIENT_FUNDS = Outcome(
    1,
    "The balance is insufficient for the transaction.",
    "The balance is insufficient for the transaction.",
    Wait.CUSTOMER,
)
CANCELLED = Outcome(1032, "Request cancelled by user", "Request cancelled by user", Wait.CUSTOMER)
NO_RESPONSE = Outcome(1037, "No response from user.", "DS timeout user cannot be reached", Wait.PROMPT)
WRONG_PIN = Outcome(
    2001, "The initiator information is invalid.", "The initiator information is invalid.", Wait.CUSTOMER
)
EXPIRED = Outcome(1019, "Transaction has expired", "Transaction has expired", Wait.PROMPT)
PAID_NO_CALLBACK = Outcome(0, SUCCESS_DESC, SUCCESS_DESC, Wait.CUSTOMER, paid=True, send_callback=False)

MAGIC_NUMBERS: dict[str, Outcome] = {
    "254700000001": INSUFFICIENT_FUNDS,
    "254700001032": CANCELLED,
    "254700001037": NO_RESPONSE,
    "254700002001": WRONG_PIN,
    "254700001019": EXPIRED,
    "254700009999": PAID_NO_CALLBACK,
}

# Outcomes `POST /simulator/pushes/{id}/act` can impose, by name and by result code (a code
# names the outcome that sends a callback; 0 is the plain success).
OUTCOMES_BY_NAME: dict[str, Outcome] = {
    "success": SUCCESS,
    "insufficient_funds": INSUFFICIENT_FUNDS,
    "cancelled": CANCELLED,
    "no_response": NO_RESPONSE,
    "wrong_pin": WRONG_PIN,
    "expired": EXPIRED,
    "paid_no_callback": PAID_NO_CALLBACK,
}
OUTCOMES_BY_CODE: dict[int, Outcome] = {
    outcome.result_code: outcome for outcome in OUTCOMES_BY_NAME.values() if outcome.send_callback
}

# What a "contradicting" STK Query answers instead of the truth. A sandbox quirk: the public
# sandbox's query has reported failure for payments whose callback said ResultCode 0.
CONTRADICT_SUCCESS = CANCELLED
CONTRADICT_FAILURE = SUCCESS


def outcome_for(phone: str) -> Outcome:
    """The outcome for a normalised 12-digit phone number; unknown numbers pay."""
    return MAGIC_NUMBERS.get(phone, SUCCESS)
