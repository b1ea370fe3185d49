"""Queue stage: which backend a store location names.

`var/mailguard.db` (any path) → SqliteStore, the embedded default for one guard;
`postgresql://user@host[:port]/db` → PostgresStore, shared by several guards.

PostgresStore (and asyncpg) is imported only when a URL asks for it: `mailguard queue …` on a
SQLite store starts faster without it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, TypeAlias
from urllib.parse import urlsplit, urlunsplit

from mailguard.queue.sqlite import SqliteStore

if TYPE_CHECKING:
    from mailguard.queue.postgres import PostgresStore

Store: TypeAlias = "SqliteStore | PostgresStore"


def is_url(store: str) -> bool:
    """True for a PostgreSQL URL (`postgresql://…`, `postgres://…`), False for a file path."""
    return store.startswith(("postgresql://", "postgres://"))


def redact(url: str) -> str:
    """The URL without its password, for logs and messages."""
    try:
        u = urlsplit(url)
    except ValueError:
        return "postgresql://…"
    if u.password is None:
        return url
    netloc = f"{u.username}:***@{u.hostname}" + (f":{u.port}" if u.port else "")
    return urlunsplit((u.scheme, netloc, u.path, u.query, u.fragment))


def make_store(location: str | Path, *, pool_size: int = 10, migrate: bool = True) -> Store:
    """A store object for a path or a PostgreSQL URL (not opened yet)."""
    s = str(location)
    if is_url(s):
        from mailguard.queue.postgres import PostgresStore

        return PostgresStore(s, max_size=max(1, pool_size), migrate=migrate)
    return SqliteStore(Path(s))


def describe(location: str | Path) -> str:
    """The location for messages (a URL without its password)."""
    return redact(str(location))


__all__ = ["Store", "describe", "is_url", "make_store", "redact"]
