"""Fixed values behind the settings: Daraja's hosts, the sandbox's published test values, the
simulator's credentials, Safaricom's callback addresses, and the two setting vocabularies."""

from __future__ import annotations

from enum import StrEnum

# Safaricom's public sandbox passkey for shortcode 174379 (the Password examples in Safaricom's
# Daraja documentation are built from it). It is a published test value, not a secret; the
# simulator accepts it by default.
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


# Safaricom's published callback source addresses (the IP whitelisting list in Safaricom's Daraja
# documentation). The list changes:
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


class ExternalOrders(StrEnum):
    """Which ``order_id`` an initiate may name besides the orders lipia made (LIPIA_EXTERNAL_ORDERS)."""

    none = "none"  # lipia's own orders only
    registered = "registered"  # also ids the merchant's backend registered, with their amount
    open = "open"  # any id, at the amount the first initiate for it sends


# Push-spam limits per phone and per client address when LIPIA_PUSH_LIMIT_PER_PHONE / _PER_IP are
# not set: generous in simulator mode (a developer paying again and again from one number and one
# machine), tight against Safaricom (each push is a real PIN prompt on someone's phone).
SIMULATOR_PUSH_LIMITS = (100, 300)
LIVE_PUSH_LIMITS = (5, 30)
