"""lipia's one settings object, read from ``LIPIA_*`` environment variables and ``.env``.

Nothing else in lipia reads the environment. Tests build a ``Settings(...)`` with their own
values and pass it to ``create_app``.
"""

from __future__ import annotations

import ipaddress
import json
from typing import Annotated

from pydantic import Field, SecretStr, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from lipia.config.database_url import SUPPORTED_SCHEMES, normalize_database_url
from lipia.config.defaults import (
    DARAJA_BASE_URLS,
    DEFAULT_ADMIN_TOKEN,
    LIVE_PUSH_LIMITS,
    SAFARICOM_CALLBACK_IPS,
    SANDBOX_PASSKEY,
    SANDBOX_SHORTCODE,
    SIMULATOR_CONSUMER_KEY,
    SIMULATOR_CONSUMER_SECRET,
    SIMULATOR_MOUNT,
    SIMULATOR_PUSH_LIMITS,
    DarajaEnv,
    ExternalOrders,
    IpPolicy,
)
from lipia.config.guard import is_loopback_host, live_mode_problems, refuse_unsafe
from lipia.config.origins import normalize_origin
from lipia.config.webhooks import webhook_settings_problems

# A list setting, from the environment or .env, is either comma-separated (``a, b``) or a JSON
# list (``["a", "b"]``): NoDecode hands the raw text to ``_split_list`` instead of parsing JSON.
StrList = Annotated[list[str], NoDecode]
# A list of secrets, in the same two forms (never echoed in an error).
SecretList = Annotated[list[SecretStr], NoDecode]
LIST_FORMAT = 'comma-separated values (a, b) or a JSON list (["a", "b"])'


def split_list(value: object) -> object:
    """``"a, b"`` and ``'["a", "b"]'`` both become ``["a", "b"]``; a list passes through."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    if text.startswith("["):
        try:
            parsed: object = json.loads(text)
        except ValueError:
            raise ValueError(f"it starts with '[' but is not a JSON list; expected {LIST_FORMAT}") from None
        return parsed
    return [part.strip() for part in text.split(",") if part.strip()]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LIPIA_", env_file=".env", extra="ignore")

    # -- database (lipia/db.py, lipia/schema.py; README "Database and migrations") --
    # SQLite (the default) or PostgreSQL: postgresql://user:pass@host:5432/lipia.
    database_url: str = "sqlite+aiosqlite:///./lipia.db"
    # Connections one lipia process keeps, and how many more it may open at a peak: every process
    # (serve, reconcile) may hold pool_size + max_overflow, and their sum must fit max_connections.
    db_pool_size: int = Field(default=10, ge=1)
    db_max_overflow: int = Field(default=10, ge=0)
    # How long a request waits for a free connection before it fails (instead of queueing forever).
    db_pool_timeout_seconds: float = Field(default=10.0, gt=0)
    # Connections older than this are replaced, before a proxy or firewall drops them silently.
    db_pool_recycle_seconds: float = Field(default=1800.0, gt=0)
    # PostgreSQL: connecting, one statement, and waiting for a lock may take this long (0: no limit).
    db_connect_timeout_seconds: float = Field(default=10.0, gt=0)
    db_statement_timeout_seconds: float = Field(default=15.0, ge=0)
    db_lock_timeout_seconds: float = Field(default=5.0, ge=0)

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

    # -- orders that live elsewhere (README "Orders that live elsewhere") --
    # none, registered or open. None: open in simulator mode, none otherwise (open there only when
    # set explicitly).
    external_orders: ExternalOrders | None = None
    # Bearer token for POST /api/external-orders (the merchant's backend). Empty: the admin token.
    merchant_api_token: SecretStr = SecretStr("")

    # -- callback authentication (README "Security") --
    # Safaricom's callback source addresses: off, log (accept but warn), or enforce (refuse).
    # None: off in simulator mode (callbacks come from this machine), log otherwise.
    callback_ip_policy: IpPolicy | None = None
    callback_allowed_ips: StrList = Field(default_factory=lambda: list(SAFARICOM_CALLBACK_IPS))
    # Peers whose X-Forwarded-For is believed (your reverse proxies). Nobody else's is.
    trusted_proxies: StrList = Field(default_factory=list)
    # Confirm a reported success with an STK Query before the order is marked paid.
    # None: on everywhere except simulator mode.
    confirm_success_by_query: bool | None = None

    # -- abuse limits --
    # None: the mode's default (defaults.SIMULATOR_PUSH_LIMITS / LIVE_PUSH_LIMITS).
    push_limit_per_phone: int | None = Field(default=None, ge=1)
    push_limit_per_ip: int | None = Field(default=None, ge=1)
    push_limit_window_seconds: float = Field(default=600.0, gt=0)
    max_body_bytes: int = Field(default=64 * 1024, ge=1024)
    # A request body must arrive within this; a client that declares one and stalls is cut off.
    body_read_timeout_seconds: float = Field(default=10.0, gt=0)
    # Per client address (lipia/http/ratelimit.py): what anyone can do without a credential.
    unauthenticated_callbacks_per_minute_per_ip: int = Field(default=30, ge=1)
    unauthenticated_callbacks_per_minute: int = Field(default=300, ge=1)
    orders_per_minute_per_ip: int = Field(default=30, ge=1)
    status_misses_per_minute_per_ip: int = Field(default=30, ge=1)
    # New Idempotency-Keys per client address per push-limit window.
    idempotency_keys_per_ip: int = Field(default=60, ge=1)
    # Stored callbacks per payment (bare-path hints, copies); more get 429 and are not stored.
    callbacks_per_payment: int = Field(default=20, ge=2)
    # Callbacks kept only for inspection (orphans, invalid, refused, hints) are deleted after this.
    inbox_retention_days: float = Field(default=14.0, gt=0)
    maintenance_interval_seconds: float = Field(default=600.0, gt=0)
    # Browser origins allowed to call the public API (lipia/http/cors.py; README "CORS"), on top
    # of any localhost origin in simulator mode. Normalised as browsers send them.
    cors_origins: StrList = Field(default_factory=list)
    log_level: str = "INFO"
    # JSON lines (for a log shipper) or readable coloured lines (a developer's terminal).
    # None: JSON outside simulator mode, readable in simulator mode.
    log_json: bool | None = None

    # A pending payment with no callback this long after its push is queried once by the next
    # status poll. The reconciler handles everything else.
    status_query_after_seconds: float = Field(default=20.0, ge=0)
    # Pollers share one query per payment: no second query for it within this interval.
    status_query_min_interval_seconds: float = Field(default=10.0, ge=0)

    # -- live status (lipia/http/live_status.py; README "Live status") --
    # GET /api/payments/status/{id}?wait=N waits at most this long, whatever N asks (below
    # nginx's 40 s proxy_read_timeout in deploy/).
    status_wait_max_seconds: float = Field(default=25.0, gt=0)
    # An SSE stream that is still pending is closed after this long; the browser reconnects with
    # Last-Event-ID and goes on where it was.
    status_stream_max_seconds: float = Field(default=120.0, gt=0)
    # Open SSE streams and long-polls at once, per client address and for the whole process
    # (each holds a connection, a file descriptor and a little memory); more get 429.
    live_status_connections_per_ip: int = Field(default=30, ge=1)
    live_status_max_connections: int = Field(default=1000, ge=1)

    # Simulator (only used in simulator mode): seconds before the simulated customer acts.
    simulator_callback_delay_seconds: float = Field(default=2.0, ge=0)
    simulator_prompt_timeout_seconds: float = Field(default=30.0, ge=0)

    # -- reconciler (lipia/payments/reconciler.py) --
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
    # How long a reported success may wait for an STK Query to confirm it (from the push, or from
    # its arrival if later) before it goes to review. None: the prompt window above.
    confirmation_window_seconds: float | None = Field(default=None, gt=0)
    # Stored callbacks younger than this are left to the request that stored them.
    reconciler_inbox_grace_seconds: float = Field(default=5.0, ge=0)

    # -- metrics (lipia/observability; README "Debugging a payment") --
    # Bearer token Prometheus sends to GET /metrics. Empty: the admin token.
    metrics_token: SecretStr = SecretStr("")
    # -- events for the merchant's systems (lipia/events/; README "Events for your systems") --
    # An endpoint that receives every event (more through the admin API), and the whsec_ secrets
    # its deliveries are signed with: each one listed signs (several during a rotation).
    webhook_url: str | None = None
    webhook_secret: SecretList = Field(default_factory=list)
    # Event types LIPIA_WEBHOOK_URL receives; empty: all.
    webhook_events: StrList = Field(default_factory=list)
    # Run the delivery worker in this process (lipia serve, lipia reconcile); any number may.
    webhook_delivery_enabled: bool = True
    # Each attempt: its whole exchange, answer included, within this.
    webhook_timeout_seconds: float = Field(default=10.0, gt=0)
    # The first retry waits about this long, each next one twice as long (with jitter), until
    # the retry window has passed since the event was queued: then the delivery has failed.
    webhook_retry_base_seconds: float = Field(default=30.0, gt=0)
    webhook_retry_window_seconds: float = Field(default=3 * 24 * 3600.0, gt=0)
    # Deliver to private, loopback and other non-public addresses, and over plain http.
    # None: only in simulator mode.
    webhook_allow_private_addresses: bool | None = None
    # How often a worker looks for events written by other instances (its own wake it at once).
    webhook_poll_interval_seconds: float = Field(default=1.0, gt=0)

    # -- start-up guard (lipia/config/guard.py) --
    # Simulator mode listening beyond loopback: anyone who reaches the port can mark orders paid.
    simulator_allow_remote: bool = False

    @field_validator("*", mode="before")
    @classmethod
    def _split_lists(cls, value: object, info: ValidationInfo) -> object:
        # Every list setting, whichever it is (a new one too): see StrList.
        field = cls.model_fields[info.field_name] if info.field_name else None
        if field is not None and NoDecode in field.metadata:
            return split_list(value)
        return value

    @field_validator("trusted_proxies", "callback_allowed_ips")
    @classmethod
    def _addresses(cls, value: list[str]) -> list[str]:
        for entry in value:
            try:
                ipaddress.ip_network(entry.strip(), strict=False)
            except ValueError:
                raise ValueError(
                    f"{entry!r} is not an IP address or CIDR block; expected e.g. 10.0.0.1, 10.0.0.0/8"
                ) from None
        return value

    @field_validator("database_url")
    @classmethod
    def _normalize_database_url(cls, value: str) -> str:
        url = normalize_database_url(value)
        if url.partition("://")[0] not in SUPPORTED_SCHEMES:
            raise ValueError(
                "must be a SQLite URL (sqlite+aiosqlite:///./lipia.db) or a PostgreSQL one "
                "(postgresql://user:password@host:5432/lipia)"
            )
        return url

    @field_validator("cors_origins")
    @classmethod
    def _normalize_cors_origins(cls, values: list[str], info: ValidationInfo) -> list[str]:
        live = info.data.get("daraja_env", DarajaEnv.simulator) is not DarajaEnv.simulator
        origins: list[str] = []
        problems: list[str] = []
        for value in values:
            if value.strip() == "*":
                if live:
                    problems.append(
                        "'*' (any origin) is for simulator mode only: list your frontend's origins, "
                        "e.g. https://shop.example.com"
                    )
                elif "*" not in origins:
                    origins.append("*")
                continue
            try:
                origin = normalize_origin(value)
            except ValueError as exc:
                problems.append(str(exc))
                continue
            if origin not in origins:
                origins.append(origin)
        if problems:
            raise ValueError("; ".join(problems))
        return origins

    @model_validator(mode="after")
    def _refuse_unsafe_live_settings(self) -> Settings:
        refuse_unsafe(self)
        return self

    @model_validator(mode="after")
    def _refuse_bad_webhook_settings(self) -> Settings:
        problems = webhook_settings_problems(self)
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def allows_private_webhooks(self) -> bool:
        if self.webhook_allow_private_addresses is None:
            return self.is_simulator
        return self.webhook_allow_private_addresses

    def unsafe_live_settings(self) -> list[str]:
        """What must be fixed before talking to real Safaricom (empty in simulator mode)."""
        return live_mode_problems(self)

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
    def listens_beyond_loopback(self) -> bool:
        return not is_loopback_host(self.host)

    @property
    def external_order_policy(self) -> ExternalOrders:
        if self.external_orders is None:
            return ExternalOrders.open if self.is_simulator else ExternalOrders.none
        return self.external_orders

    @property
    def merchant_token(self) -> str:
        """The bearer token POST /api/external-orders takes (empty: nobody may register)."""
        return self.merchant_api_token.get_secret_value() or self.admin_token.get_secret_value()

    @property
    def metrics_bearer_token(self) -> str:
        """The bearer token GET /metrics takes (empty: nobody may scrape)."""
        return self.metrics_token.get_secret_value() or self.admin_token.get_secret_value()

    @property
    def logs_as_json(self) -> bool:
        if self.log_json is None:
            return not self.is_simulator
        return self.log_json

    @property
    def phone_push_limit(self) -> int:
        default = SIMULATOR_PUSH_LIMITS if self.is_simulator else LIVE_PUSH_LIMITS
        return self.push_limit_per_phone if self.push_limit_per_phone is not None else default[0]

    @property
    def ip_push_limit(self) -> int:
        default = SIMULATOR_PUSH_LIMITS if self.is_simulator else LIVE_PUSH_LIMITS
        return self.push_limit_per_ip if self.push_limit_per_ip is not None else default[1]

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
