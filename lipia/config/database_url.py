"""Database URLs as operators write them, and what lipia makes of them."""

from __future__ import annotations

from sqlalchemy.engine import URL, make_url


def is_sqlite(url: str) -> bool:
    return url.startswith("sqlite")


SUPPORTED_SCHEMES = ("sqlite+aiosqlite", "postgresql+asyncpg")


def normalize_database_url(url: str) -> str:
    """``postgresql://`` and ``postgres://`` (what libpq, psql and hosting providers print) mean
    asyncpg, the one PostgreSQL driver lipia ships; libpq's ``sslmode`` is asyncpg's ``ssl``.
    ``sqlite://`` means aiosqlite. Anything else is returned as it is."""
    scheme = url.partition("://")[0]
    if scheme == "sqlite":
        return "sqlite+aiosqlite" + url[len(scheme) :]
    if scheme not in ("postgres", "postgresql", "postgresql+asyncpg"):
        return url
    parsed = make_url(url).set(drivername="postgresql+asyncpg")
    if "sslmode" in parsed.query and "ssl" not in parsed.query:
        parsed = parsed.update_query_dict({"ssl": parsed.query["sslmode"]}).difference_update_query(
            ["sslmode"]
        )
    return parsed.render_as_string(hide_password=False)


def sqlite_path(url: str | URL) -> str | None:
    """The file a SQLite URL names (None for an in-memory or URI-form database)."""
    database = make_url(url).database
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return database
