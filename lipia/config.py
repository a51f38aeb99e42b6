"""lipia's one settings object, read from ``LIPIA_*`` environment variables and ``.env``.

Nothing else in lipia reads the environment. Tests build a ``Settings(...)`` with their own
values and pass it to ``create_app``.
"""

from __future__ import annotations

import ipaddress
from enum import StrEnum
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, model_validator
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


# Safaricom's published callback source addresses (reference/daraja.md §7.1). The list changes:
# it is configuration (LIPIA_CALLBACK_ALLOWED_IPS), not code.
SAFARICOM_CALLBACK_IPS = (
    "196.201.214.200",
    "196.201.214.206",
    "196.201.213.114",
    "196.201.214.207",
    "196.201.214.208",
    "196.201.213.44",
    "196.201.212.127",
    "196.201.212.138",
    "196.201.212.129",
    "196.201.212.136",
    "196.201.212.74",
    "196.201.212.69",
)

DEFAULT_ADMIN_TOKEN = "change-me"


class IpPolicy(StrEnum):
    off = "off"
    log = "log"
    enforce = "enforce"


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

    admin_token: SecretStr = SecretStr(DEFAULT_ADMIN_TOKEN)

    # -- callback authentication (design.md §6; README "Security") --
    # Safaricom's callback source addresses: off, log (accept but warn), or enforce (refuse).
    # None: off in simulator mode (callbacks come from this machine), log otherwise.
    callback_ip_policy: IpPolicy | None = None
    callback_allowed_ips: list[str] = Field(default_factory=lambda: list(SAFARICOM_CALLBACK_IPS))
    # Peers whose X-Forwarded-For is believed (your reverse proxies). Nobody else's is.
    trusted_proxies: list[str] = Field(default_factory=list)
    # Confirm a reported success with an STK Query before the order is marked paid.
    # None: on everywhere except simulator mode.
    confirm_success_by_query: bool | None = None

    # -- abuse limits --
    push_limit_per_phone: int = Field(default=5, ge=1)
    push_limit_per_ip: int = Field(default=30, ge=1)
    push_limit_window_seconds: float = Field(default=600.0, gt=0)
    max_body_bytes: int = Field(default=64 * 1024, ge=1024)
    cors_origins: list[str] = Field(default_factory=list)
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

    # -- reconciler (lipia/reconciler.py; design.md §3 rule 6) --
    # Runs inside `lipia serve`; `lipia reconcile` runs it alone.
    reconciler_enabled: bool = True
    reconciler_interval_seconds: float = Field(default=5.0, gt=0)
    # First STK Query this long after the push, then waits doubling from the backoff, capped.
    reconciler_first_query_after_seconds: float = Field(default=20.0, ge=0)
    reconciler_backoff_seconds: float = Field(default=10.0, gt=0)
    reconciler_max_backoff_seconds: float = Field(default=120.0, gt=0)
    # The query budget of one process, shared by all payments.
    reconciler_max_queries_per_second: float = Field(default=5.0, gt=0)
    # No final answer this long after the push (or the row's creation): EXPIRED.
    reconciler_expire_after_seconds: float = Field(default=180.0, gt=0)
    # An INITIATING row younger than this may still have its push in flight: leave it alone.
    reconciler_initiating_grace_seconds: float = Field(default=60.0, ge=0)
    reconciler_lease_seconds: float = Field(default=60.0, gt=0)
    reconciler_batch_size: int = Field(default=20, ge=1)
    # Stored callbacks younger than this are left to the request that stored them.
    reconciler_inbox_grace_seconds: float = Field(default=5.0, ge=0)

    @model_validator(mode="after")
    def _refuse_unsafe_live_settings(self) -> Settings:
        problems = self.unsafe_live_settings()
        if problems:
            raise ValueError(
                f"lipia will not start in {self.daraja_env.value} mode with unsafe settings:\n- "
                + "\n- ".join(problems)
            )
        return self

    def unsafe_live_settings(self) -> list[str]:
        """What must be fixed before talking to real Safaricom (empty in simulator mode)."""
        if self.is_simulator:
            return []
        problems: list[str] = []
        url = urlsplit(self.public_url or "")
        host = (url.hostname or "").lower()
        if url.scheme != "https":
            problems.append(
                "LIPIA_PUBLIC_URL must be the https:// address Safaricom can reach (callbacks need https)."
            )
        if not host or host == "localhost" or host.endswith(".localhost") or _is_private_address(host):
            problems.append(f"LIPIA_PUBLIC_URL host {host or '(none)'!r} is not publicly reachable.")
        if self.consumer_key.get_secret_value() in ("", SIMULATOR_CONSUMER_KEY):
            problems.append("LIPIA_CONSUMER_KEY is missing: use your Daraja app's consumer key.")
        if self.consumer_secret.get_secret_value() in ("", SIMULATOR_CONSUMER_SECRET):
            problems.append("LIPIA_CONSUMER_SECRET is missing: use your Daraja app's consumer secret.")
        if not self.passkey.get_secret_value():
            problems.append("LIPIA_PASSKEY is missing.")
        token = self.admin_token.get_secret_value()
        if token == DEFAULT_ADMIN_TOKEN or len(token) < 16:
            problems.append("LIPIA_ADMIN_TOKEN must be set to a random value of at least 16 characters.")
        if self.daraja_env is DarajaEnv.production:
            if self.passkey.get_secret_value() == SANDBOX_PASSKEY or self.shortcode == SANDBOX_SHORTCODE:
                problems.append("LIPIA_SHORTCODE/LIPIA_PASSKEY are Safaricom's sandbox values; use your own.")
        return problems

    @property
    def callback_source_policy(self) -> IpPolicy:
        if self.callback_ip_policy is None:
            return IpPolicy.off if self.is_simulator else IpPolicy.log
        return self.callback_ip_policy

    @property
    def confirms_by_query(self) -> bool:
        if self.confirm_success_by_query is None:
            return not self.is_simulator
        return self.confirm_success_by_query

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


def _is_private_address(host: str) -> bool:
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return address.is_private or address.is_loopback or address.is_link_local or address.is_unspecified
