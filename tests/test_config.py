"""Settings: one object from LIPIA_* variables; live modes refuse unsafe values and say what to fix."""

from __future__ import annotations

import base64
import secrets
import subprocess
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr, ValidationError

from lipia.config import IpPolicy, Settings
from lipia.config.guard import (
    MIN_PROMPT_WINDOW_SECONDS,
    WEAK_ADMIN_TOKEN,
    WEAK_METRICS_TOKEN,
    admin_token_is_strong,
    is_loopback_host,
    public_url_problems,
)

SAFE_LIVE = {
    "public_url": "https://shop.example.co.ke",
    "consumer_key": "real-consumer-key",
    "consumer_secret": "real-consumer-secret",
    "passkey": "a-real-passkey-from-safaricom",
    "shortcode": "4123456",
    # openssl rand -hex 24: the stricter guard refuses made-up tokens such as "a-long-random-admin-token".
    "admin_token": "4e2f2bd63dbd1c3d1ce4f6036c6180923a71c8f0127b05f6",
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


# Each list setting with two values it accepts.
LIST_SETTINGS = {
    "LIPIA_CORS_ORIGINS": ["https://shop.example", "https://admin.shop.example"],
    "LIPIA_TRUSTED_PROXIES": ["10.0.0.1", "10.2.0.0/16"],
    "LIPIA_CALLBACK_ALLOWED_IPS": ["196.201.214.200", "196.201.212.0/24"],
    "LIPIA_WEBHOOK_EVENTS": ["order.paid", "payment.failed"],
    "LIPIA_WEBHOOK_SECRET": ["whsec_" + "A" * 32, "whsec_" + "B" * 32],
}


def _plain(values: list[Any]) -> list[Any]:
    """A list setting's values, secrets unwrapped."""
    return [value.get_secret_value() if isinstance(value, SecretStr) else value for value in values]


LIST_FORMATS = [
    lambda a, b: f"{a},{b}",
    lambda a, b: f" {a} , {b} ",
    lambda a, b: f"{a},{b},",
    lambda a, b: f'["{a}", "{b}"]',
    lambda a, b: f' [ "{a}","{b}" ] ',
]


def _field(name: str) -> str:
    return name.removeprefix("LIPIA_").lower()


def test_every_list_setting_is_in_the_list_of_forgiving_ones() -> None:
    lists = [name for name, field in Settings.model_fields.items() if "list" in str(field.annotation)]
    assert sorted(lists) == sorted(_field(name) for name in LIST_SETTINGS)


@pytest.mark.parametrize("name", LIST_SETTINGS)
@pytest.mark.parametrize(
    "spell", LIST_FORMATS, ids=["commas", "spaces", "trailing comma", "json", "json spaced"]
)
def test_list_settings_take_commas_or_json_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, name: str, spell: Any
) -> None:
    values = LIST_SETTINGS[name]
    monkeypatch.setenv(name, spell(*values))
    assert _plain(getattr(Settings(_env_file=None), _field(name))) == values


@pytest.mark.parametrize("name", LIST_SETTINGS)
@pytest.mark.parametrize("spell", [LIST_FORMATS[1], LIST_FORMATS[3]], ids=["commas", "json"])
def test_list_settings_take_commas_or_json_from_the_env_file(tmp_path: Path, name: str, spell: Any) -> None:
    values = LIST_SETTINGS[name]
    env_file = tmp_path / ".env"
    env_file.write_text(f"{name}={spell(*values)}\n")
    assert _plain(getattr(Settings(_env_file=env_file), _field(name))) == values


@pytest.mark.parametrize("name", LIST_SETTINGS)
def test_an_empty_list_setting_is_an_empty_list(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    for raw in ("", "[]", " , "):
        monkeypatch.setenv(name, raw)
        assert getattr(Settings(_env_file=None), _field(name)) == []


def test_a_list_setting_from_code_is_taken_as_it_is() -> None:
    settings = Settings(_env_file=None, trusted_proxies=["127.0.0.1"], cors_origins=["https://a.example"])
    assert (settings.trusted_proxies, settings.cors_origins) == (["127.0.0.1"], ["https://a.example"])


@pytest.mark.parametrize("name", ["LIPIA_TRUSTED_PROXIES", "LIPIA_CALLBACK_ALLOWED_IPS"])
def test_an_address_list_refuses_what_is_not_an_address(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    monkeypatch.setenv(name, "10.0.0.1, proxy.internal")
    with pytest.raises(ValidationError, match="'proxy.internal' is not an IP address or CIDR block"):
        Settings(_env_file=None)


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


def refusals(mode: str, **overrides: object) -> str:
    with pytest.raises(ValidationError) as info:
        live(mode, **overrides)
    text = str(info.value)
    assert f"will not start in {mode} mode" in text
    return text


# -- LIPIA_PUBLIC_URL: where Safaricom calls back --

REFUSED_PUBLIC_URLS = [
    # (url, what the one line says)
    ("http://pay.example.com", "must be the https://"),
    ("ftp://pay.example.com", "must be the https://"),
    ("pay.example.com", "must be the https://"),
    ("https://user:pw@pay.example.com", "user name or password"),
    ("https://user@pay.example.com", "user name or password"),
    ("https://pay.example.com/?x", "must not contain '?'"),
    ("https://pay.example.com?", "must not contain '?'"),
    ("https://pay.example.com#x", "must not contain '#'"),
    ("https://pay.example.com#", "must not contain '#'"),
    ("https://pay.example.com:99999", "port '99999' is not a number from 1 to 65535"),
    ("https://pay.example.com:0", "port '0' is not a number from 1 to 65535"),
    ("https://pay.example.com:abc", "port 'abc' is not a number from 1 to 65535"),
    ("https://pay.example.com:", "port '' is not a number"),
    ("https://", "has no host"),
    ("https:///callbacks", "has no host"),
    ("https://myserver", "single-label name"),
    ("https://localhost", "'.localhost' names are never public"),
    ("https://localhost.", "'.localhost' names are never public"),
    ("https://LocalHost:5555", "'.localhost' names are never public"),
    ("https://shop.localhost", "'.localhost' names are never public"),
    ("https://printer.local", "'.local' names are never public"),
    ("https://pay.internal", "'.internal' names are never public"),
    ("https://pay.test", "'.test' names are never public"),
    ("https://pay.invalid", "'.invalid' names are never public"),
    ("https://your-public-host.example", "'.example' names are never public"),
    ("https://router.home.arpa", "'.home.arpa' names are never public"),
    ("https://pay.lan", "'.lan' names are never public"),
    ("https://pay.intranet", "'.intranet' names are never public"),
    ("https://pay.CORP.", "'.corp' names are never public"),
    ("https://pay.localdomain", "'.localdomain' names are never public"),
    ("https://127.0.0.1", "a loopback address"),
    ("https://127.1", "it is 127.0.0.1, a loopback address"),
    ("https://2130706433", "it is 127.0.0.1, a loopback address"),
    ("https://0x7f000001", "it is 127.0.0.1, a loopback address"),
    ("https://017700000001", "it is 127.0.0.1, a loopback address"),
    ("https://0x7f.1", "it is 127.0.0.1, a loopback address"),
    ("https://0", "it is 0.0.0.0, the unspecified address"),
    ("https://0.0.0.0", "the unspecified address"),
    ("https://10.0.0.1", "a private network address"),
    ("https://172.16.5.4", "a private network address"),
    ("https://192.168.1.10", "a private network address"),
    ("https://169.254.169.254", "a link-local address"),
    ("https://100.64.0.1", "a carrier-grade NAT address"),
    ("https://100.127.255.254", "a carrier-grade NAT address"),
    ("https://224.0.0.1", "a multicast address"),
    ("https://240.0.0.1", "a private network address"),
    ("https://192.0.2.1", "a documentation address"),
    ("https://198.51.100.7", "a documentation address"),
    ("https://203.0.113.9", "a documentation address"),
    ("https://[::1]", "a loopback address"),
    ("https://[::]", "the unspecified address"),
    ("https://[fe80::1]", "a link-local address"),
    ("https://[fe80::1%25eth0]", "a link-local address"),
    ("https://[fc00::1]", "a unique local (private) address"),
    ("https://[fd12:3456::1]", "a unique local (private) address"),
    ("https://[ff02::1]", "a multicast address"),
    ("https://[2001:db8::1]", "a documentation address"),
    ("https://[::ffff:127.0.0.1]", "IPv4-mapped 127.0.0.1, a loopback address"),
    ("https://[::ffff:10.0.0.1]", "IPv4-mapped 10.0.0.1, a private network address"),
    ("https://[::ffff:196.201.214.200]", "write the IPv4 address itself"),
    ("https://[2002:7f00:1::]", "it embeds 127.0.0.1, a loopback address"),
    ("https://[2002:c0a8:101::1]", "it embeds 192.168.1.1, a private network address"),
    ("https://[64:ff9b::a00:1]", "it embeds 10.0.0.1, a private network address"),
    ("https://::1", "write an IPv6 address in brackets"),
    ("https://[::1", "not a valid URL"),
    ("https://[not-an-address]", "not a valid URL"),
    ("https://[::1]x", "not a valid"),
    ("https://1.2.3.256", "not a valid IPv4 address"),
    ("https://0x", "not a valid IPv4 address"),
    ("https://pay.123", "ends in a number"),
    ("https://pay..example.com", "not a valid host name"),
    ("https://p%61y.example.com", "not a valid host name"),
    ("https://pay_1.example.com", "not a valid host name"),
    ("https://3301553864", "legacy spelling of 196.201.182.200"),
    (" https://pay.example.com", "spaces or control characters"),
    ("https://pay.example.com/\tx", "spaces or control characters"),
]


@pytest.mark.parametrize(("url", "reason"), REFUSED_PUBLIC_URLS)
def test_public_url_refusals_say_why_and_what_to_set(url: str, reason: str) -> None:
    problems = public_url_problems(url)
    assert any(reason in problem for problem in problems), problems
    for problem in problems:
        assert problem.startswith("LIPIA_PUBLIC_URL")
        assert "\n" not in problem
        assert "https://" in problem  # what to set it to


@pytest.mark.parametrize("url", [url for url, _ in REFUSED_PUBLIC_URLS[::7]])
@pytest.mark.parametrize("mode", ["sandbox", "production"])
def test_live_modes_refuse_those_public_urls(mode: str, url: str) -> None:
    assert "LIPIA_PUBLIC_URL" in refusals(mode, public_url=url)


@pytest.mark.parametrize(
    "url",
    [
        "https://pay.example.com",
        "https://pay.example.com/",
        "https://pay.example.com:8443/lipia",
        "https://pay.example.com.",
        "HTTPS://Pay.Example.COM/Lipia",
        "https://shop.example.co.ke",
        "https://196.201.214.200",
        "https://196.201.214.200:8443/prefix",
        "https://[2606:4700::1111]",
        "https://[2002:c4c9:d6c8::1]",  # 6to4 around a public address
        "https://10.0.0.1.nip.io",  # a name, not an address: the guard never asks DNS
        "https://kahawa.xn--p1ai",
        "https://mkahawa.co.ke",
    ],
)
def test_public_urls_safaricom_can_reach_are_allowed(url: str) -> None:
    assert public_url_problems(url) == []
    assert live("sandbox", public_url=url).callback_url("t").endswith("/api/payments/mpesa/callback/t")


def test_public_url_problems_of_one_url_are_all_listed() -> None:
    problems = public_url_problems("http://user@127.1:99999/?q#f")
    assert len(problems) == 6  # scheme, fragment, query, userinfo, port, host
    assert all("\n" not in problem for problem in problems)


# -- LIPIA_ADMIN_TOKEN --

WEAK_TOKENS = [
    "change-me",
    "short",
    "aaaaaaaaaaaaaaaa",
    "abababababababababababab",
    "0123456789abcdef01234567",
    "password-password-password",
    "a-long-random-admin-token",
    "x" * 20 + "0123456789abcdefghij",  # half of it one character
    "4e2f2bd63dbd1c3d1ce4f60",  # 23 characters of a good one
]
STRONG_TOKENS = [
    "4e2f2bd63dbd1c3d1ce4f6036c6180923a71c8f0127b05f6",  # openssl rand -hex 24
    "f+Y8KycQINB/97hpg5leCAFCBf0UvyL2C84auFiJsdI=",  # openssl rand -base64 32
    "CVzQ6imxxlfm-9H8TqW4LXP0eQ8CNrSEvE_B-g8mYg4",  # secrets.token_urlsafe(32)
]


@pytest.mark.parametrize("mode", ["sandbox", "production"])
def test_an_empty_admin_token_turns_the_admin_api_off_in_live_modes(mode: str) -> None:
    # Nothing to guess: require_admin refuses every request when no token is configured.
    assert live(mode, admin_token="").admin_token.get_secret_value() == ""


@pytest.mark.parametrize("token", WEAK_TOKENS)
@pytest.mark.parametrize("mode", ["sandbox", "production"])
def test_live_modes_refuse_weak_admin_tokens(mode: str, token: str) -> None:
    assert not admin_token_is_strong(token)
    assert WEAK_ADMIN_TOKEN in refusals(mode, admin_token=token)


@pytest.mark.parametrize("token", WEAK_TOKENS)
def test_live_modes_refuse_a_weak_metrics_token(token: str) -> None:
    assert WEAK_METRICS_TOKEN in refusals("production", metrics_token=token)


def test_a_strong_metrics_token_starts() -> None:
    token = secrets.token_hex(24)
    assert live("production", metrics_token=token).metrics_token.get_secret_value() == token


@pytest.mark.parametrize("token", STRONG_TOKENS)
def test_strong_admin_tokens_start(token: str) -> None:
    assert admin_token_is_strong(token)
    assert live("production", admin_token=token).admin_token.get_secret_value() == token


def test_freshly_generated_tokens_always_pass() -> None:
    for _ in range(300):
        assert admin_token_is_strong(secrets.token_hex(24))
        assert admin_token_is_strong(secrets.token_urlsafe(32))
        assert admin_token_is_strong(base64.b64encode(secrets.token_bytes(32)).decode())


def test_the_suggested_openssl_command_passes() -> None:
    try:
        token = subprocess.run(
            ["openssl", "rand", "-hex", "24"], capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pytest.skip("no openssl here")
    assert "$(openssl rand -hex 24)" in WEAK_ADMIN_TOKEN
    assert admin_token_is_strong(token)


def test_simulator_mode_takes_any_admin_token() -> None:
    assert Settings(_env_file=None, admin_token="").admin_token.get_secret_value() == ""


# -- the prompt window --


@pytest.mark.parametrize("mode", ["sandbox", "production"])
def test_live_modes_refuse_a_prompt_window_shorter_than_daraja_s(mode: str) -> None:
    assert MIN_PROMPT_WINDOW_SECONDS == 120
    text = refusals(mode, reconciler_expire_after_seconds=119)
    assert "LIPIA_RECONCILER_EXPIRE_AFTER_SECONDS is 119: set it to at least 120" in text
    assert live(mode, reconciler_expire_after_seconds=120).reconciler_expire_after_seconds == 120


def test_simulator_mode_has_no_prompt_window_minimum() -> None:
    assert (
        Settings(_env_file=None, reconciler_expire_after_seconds=0.5).reconciler_expire_after_seconds == 0.5
    )


# -- credentials --


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            {"consumer_key": "lipia-simulator-key"},
            "LIPIA_CONSUMER_KEY is the built-in simulator's key; set your Daraja app's consumer key",
        ),
        ({"consumer_key": ""}, "LIPIA_CONSUMER_KEY is missing: set your Daraja app's consumer key"),
        (
            {"consumer_secret": "lipia-simulator-secret"},
            "LIPIA_CONSUMER_SECRET is the built-in simulator's secret; set your Daraja app's consumer secret",
        ),
        ({"consumer_secret": ""}, "LIPIA_CONSUMER_SECRET is missing: set your Daraja app's consumer secret"),
        ({"passkey": ""}, "LIPIA_PASSKEY is missing: set the Lipa Na M-Pesa passkey"),
    ],
)
def test_credential_messages_tell_the_simulator_s_values_from_missing_ones(
    override: dict[str, object], message: str
) -> None:
    text = refusals("sandbox", **override)
    assert message in text
    other = "is missing" if "built-in" in message else "built-in simulator"
    assert other not in text


# -- simulator mode: local unless asked --


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "", "192.168.1.20", "10.0.0.5", "my-laptop", "fe80::1"])
def test_simulator_mode_refuses_listening_beyond_loopback_without_the_opt_in(host: str) -> None:
    assert not is_loopback_host(host)
    with pytest.raises(ValidationError) as info:
        Settings(_env_file=None, host=host)
    text = str(info.value)
    assert "will not start in simulator mode" in text
    assert "anyone on the network could mark orders paid with no money moving" in text
    assert "LIPIA_SIMULATOR_ALLOW_REMOTE=true" in text
    assert "--allow-remote" in text
    assert Settings(_env_file=None, host=host, simulator_allow_remote=True).host == host


@pytest.mark.parametrize(
    "host", ["127.0.0.1", "127.0.0.2", "localhost", "LOCALHOST", "localhost.", "::1", "[::1]"]
)
def test_simulator_mode_listens_on_loopback_without_the_opt_in(host: str) -> None:
    assert is_loopback_host(host)
    assert Settings(_env_file=None, host=host).host == host


def test_the_remote_opt_in_reads_its_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LIPIA_HOST", "0.0.0.0")
    with pytest.raises(ValidationError, match="LIPIA_SIMULATOR_ALLOW_REMOTE"):
        Settings(_env_file=None)
    monkeypatch.setenv("LIPIA_SIMULATOR_ALLOW_REMOTE", "true")
    assert Settings(_env_file=None).simulator_allow_remote is True


@pytest.mark.parametrize("mode", ["sandbox", "production"])
def test_live_modes_may_listen_on_every_interface(mode: str) -> None:
    assert live(mode, host="0.0.0.0").host == "0.0.0.0"
