"""lipia's one settings object, read from ``LIPIA_*`` environment variables and ``.env``.

Nothing else in lipia reads the environment. Tests build a ``Settings(...)`` with their own
values and pass it to ``create_app``.
"""

from __future__ import annotations

from enum import StrEnum

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

# Safaricom's public sandbox passkey for shortcode 174379 (reference/daraja.md §8). It is a
# published test value, not a secret; the simulator accepts it by default.
SANDBOX_SHORTCODE = "174379"
SANDBOX_PASSKEY = "bfb279f9aa9bdbcf158e97dd71a467cd2e0c893059b10f78e6b72ada1ed2c919"

# Credentials the built-in simulator accepts out of the box; meaningless anywhere else.
SIMULATOR_CONSUMER_KEY = "lipia-simulator-key"
SIMULATOR_CONSUMER_SECRET = "lipia-simulator-secret"

DARAJA_BASE_URLS = {
    "sandbox": "https://sandbox.safaricom.co.ke",
    "production": "https://api.safaricom.co.ke",
}

# The prefix under which `lipia serve` mounts the simulator in simulator mode.
SIMULATOR_MOUNT = "/daraja"


class DarajaEnv(StrEnum):
    simulator = "simulator"
    sandbox = "sandbox"
    production = "production"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LIPIA_", env_file=".env", extra="ignore")

    database_url: str = "sqlite+aiosqlite:///./lipia.db"
    host: str = "127.0.0.1"
    port: int = 5555
    # The base URL Safaricom (or the simulator) reaches us on; callback URLs are built from it.
    # Defaults to http://<host>:<port>, which only the built-in simulator can reach.
    public_url: str | None = None
    menu_file: str | None = None

    daraja_env: DarajaEnv = DarajaEnv.simulator
    # Overrides the base URL implied by daraja_env (e.g. a separate `lipia simulator` process).
    daraja_base_url: str | None = None
    consumer_key: SecretStr = SecretStr(SIMULATOR_CONSUMER_KEY)
    consumer_secret: SecretStr = SecretStr(SIMULATOR_CONSUMER_SECRET)
    shortcode: str = SANDBOX_SHORTCODE
    passkey: SecretStr = SecretStr(SANDBOX_PASSKEY)
    transaction_type: str = "CustomerPayBillOnline"
    # For Till payments (CustomerBuyGoodsOnline) PartyB is the till number, not the shortcode.
    party_b: str | None = None
    daraja_timeout_seconds: float = Field(default=15.0, gt=0)

    admin_token: SecretStr = SecretStr("change-me")
    log_level: str = "INFO"
    log_json: bool = True

    # A pending payment with no callback this long after its push is queried once by the next
    # status poll (design.md §3 rule 7). The reconciler handles everything else.
    status_query_after_seconds: float = Field(default=20.0, ge=0)
    # Pollers share one query per payment: no second query for it within this interval.
    status_query_min_interval_seconds: float = Field(default=10.0, ge=0)

    # Simulator (only used in simulator mode): seconds before the simulated customer acts.
    simulator_callback_delay_seconds: float = Field(default=2.0, ge=0)
    simulator_prompt_timeout_seconds: float = Field(default=30.0, ge=0)

    @property
    def is_simulator(self) -> bool:
        return self.daraja_env is DarajaEnv.simulator

    @property
    def base_url(self) -> str:
        if self.public_url:
            return self.public_url.rstrip("/")
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        return f"http://{host}:{self.port}"

    @property
    def daraja_url(self) -> str:
        """Base URL of the Daraja API lipia talks to."""
        if self.daraja_base_url:
            return self.daraja_base_url.rstrip("/")
        if self.daraja_env is DarajaEnv.simulator:
            return self.base_url + SIMULATOR_MOUNT
        return DARAJA_BASE_URLS[self.daraja_env.value]

    def callback_url(self, token: str) -> str:
        return f"{self.base_url}/api/payments/mpesa/callback/{token}"
