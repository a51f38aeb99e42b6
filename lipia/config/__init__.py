"""lipia's settings: the one :class:`Settings` object, read from ``LIPIA_*`` variables and ``.env``."""

from lipia.config.defaults import (
    DARAJA_BASE_URLS,
    DEFAULT_ADMIN_TOKEN,
    SAFARICOM_CALLBACK_IPS,
    SANDBOX_PASSKEY,
    SANDBOX_SHORTCODE,
    SIMULATOR_CONSUMER_KEY,
    SIMULATOR_CONSUMER_SECRET,
    SIMULATOR_MOUNT,
    DarajaEnv,
    IpPolicy,
)
from lipia.config.settings import Settings

__all__ = [
    "DARAJA_BASE_URLS",
    "DEFAULT_ADMIN_TOKEN",
    "SAFARICOM_CALLBACK_IPS",
    "SANDBOX_PASSKEY",
    "SANDBOX_SHORTCODE",
    "SIMULATOR_CONSUMER_KEY",
    "SIMULATOR_CONSUMER_SECRET",
    "SIMULATOR_MOUNT",
    "DarajaEnv",
    "IpPolicy",
    "Settings",
]
