"""Settings of the Daraja simulator (one frozen dataclass, defaults = Safaricom's public sandbox)."""

from __future__ import annotations

from dataclasses import dataclass

SANDBOX_SHORTCODE = "174379"
SANDBOX_PASSKEY = "bfb279f9aa9bdbcf158e97dd71a467cd2e0c893059b10f78e6b72ada1ed2c919"


@dataclass(frozen=True, slots=True)
class SimulatorConfig:
    """How the simulated Daraja behaves.

    `callback_delay_seconds` is how long the simulated customer takes to act (pay, cancel, enter a
    wrong PIN...); `prompt_timeout_seconds` is how long an unanswered prompt lives before Daraja
    gives up (result codes 1037 and 1019). `strict_https` enforces Daraja's https-only rule for
    CallBackURL; otherwise http is accepted for loopback hosts. `subscriber_lock` refuses a second
    push to a phone that still has a live prompt, as Daraja does.
    """

    consumer_key: str = "lipia-simulator-key"
    consumer_secret: str = "lipia-simulator-secret"
    shortcode: str = SANDBOX_SHORTCODE
    passkey: str = SANDBOX_PASSKEY
    callback_delay_seconds: float = 2.0
    prompt_timeout_seconds: float = 30.0
    token_ttl_seconds: float = 3600
    strict_https: bool = False
    subscriber_lock: bool = True
    callback_timeout_seconds: float = 10.0

    def __post_init__(self) -> None:
        if not (self.shortcode.isascii() and self.shortcode.isdigit() and 5 <= len(self.shortcode) <= 7):
            raise ValueError("shortcode must be 5-7 digits")
        if not self.consumer_key or not self.consumer_secret or not self.passkey:
            raise ValueError("consumer_key, consumer_secret and passkey must not be empty")
        for name in ("callback_delay_seconds", "prompt_timeout_seconds", "callback_timeout_seconds"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")
        if self.token_ttl_seconds <= 0:
            raise ValueError("token_ttl_seconds must be positive")
