"""Settings: one object from LIPIA_* variables; live modes refuse unsafe values and say what to fix."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from lipia.config import IpPolicy, Settings

SAFE_LIVE = {
    "public_url": "https://shop.example.co.ke",
    "consumer_key": "real-consumer-key",
    "consumer_secret": "real-consumer-secret",
    "passkey": "a-real-passkey-from-safaricom",
    "shortcode": "4123456",
    "admin_token": "a-long-random-admin-token",
}


def live(mode: str, **overrides: object) -> Settings:
    return Settings(_env_file=None, daraja_env=mode, **{**SAFE_LIVE, **overrides})  # type: ignore[arg-type]


def test_reads_lipia_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LIPIA_PORT", "6001")
    monkeypatch.setenv("LIPIA_DATABASE_URL", "sqlite+aiosqlite:///x.db")
    monkeypatch.setenv("LIPIA_CORS_ORIGINS", '["https://shop.example"]')
    settings = Settings(_env_file=None)
    assert settings.port == 6001
    assert settings.database_url == "sqlite+aiosqlite:///x.db"
    assert settings.cors_origins == ["https://shop.example"]
    assert settings.base_url == "http://127.0.0.1:6001"
    assert settings.callback_url("tok") == "http://127.0.0.1:6001/api/payments/mpesa/callback/tok"


def test_embedded_defaults_need_nothing() -> None:
    settings = Settings(_env_file=None)
    assert settings.is_simulator
    assert settings.unsafe_live_settings() == []
    assert settings.confirms_by_query is False
    assert settings.callback_source_policy is IpPolicy.off


@pytest.mark.parametrize("mode", ["sandbox", "production"])
def test_safe_live_settings_start(mode: str) -> None:
    settings = live(mode)
    assert settings.confirms_by_query is True
    assert settings.callback_source_policy is IpPolicy.log
    assert settings.daraja_url.startswith("https://")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"public_url": "http://shop.example.co.ke"}, "https://"),
        ({"public_url": "https://localhost:5555"}, "not publicly reachable"),
        ({"public_url": "https://127.0.0.1"}, "not publicly reachable"),
        ({"public_url": "https://192.168.1.10"}, "not publicly reachable"),
        ({"public_url": None}, "LIPIA_PUBLIC_URL"),
        ({"consumer_key": "lipia-simulator-key"}, "LIPIA_CONSUMER_KEY"),
        ({"consumer_secret": ""}, "LIPIA_CONSUMER_SECRET"),
        ({"passkey": ""}, "LIPIA_PASSKEY"),
        ({"admin_token": "change-me"}, "LIPIA_ADMIN_TOKEN"),
        ({"admin_token": "short"}, "LIPIA_ADMIN_TOKEN"),
    ],
)
@pytest.mark.parametrize("mode", ["sandbox", "production"])
def test_live_modes_refuse_unsafe_values(mode: str, override: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError) as info:
        live(mode, **override)
    assert message in str(info.value)
    assert f"will not start in {mode} mode" in str(info.value)


def test_production_refuses_the_sandbox_shortcode_and_passkey() -> None:
    from lipia.config import SANDBOX_PASSKEY

    with pytest.raises(ValidationError, match="sandbox values"):
        live("production", shortcode="174379")
    with pytest.raises(ValidationError, match="sandbox values"):
        live("production", passkey=SANDBOX_PASSKEY)
    assert live("sandbox", shortcode="174379", passkey=SANDBOX_PASSKEY).shortcode == "174379"


def test_every_problem_is_listed_at_once() -> None:
    with pytest.raises(ValidationError) as info:
        Settings(_env_file=None, daraja_env="production")
    text = str(info.value)
    for variable in ("LIPIA_PUBLIC_URL", "LIPIA_CONSUMER_KEY", "LIPIA_CONSUMER_SECRET", "LIPIA_ADMIN_TOKEN"):
        assert variable in text
