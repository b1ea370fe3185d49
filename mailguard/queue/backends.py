"""Queue stage: which backend a store location names.

`var/mailguard.db` (any path) → SqliteStore, the embedded default for one guard;
`postgresql://user@host[:port]/db` → PostgresStore, shared by several guards.
"""

from __future__ import annotations

from pathlib import Path

from mailguard.queue.postgres import PostgresStore, is_url, redact
from mailguard.queue.sqlite import SqliteStore

Store = SqliteStore | PostgresStore


def make_store(location: str | Path, *, pool_size: int = 10, migrate: bool = True) -> Store:
    """A store object for a path or a PostgreSQL URL (not opened yet)."""
    s = str(location)
    if is_url(s):
        return PostgresStore(s, max_size=max(1, pool_size), migrate=migrate)
    return SqliteStore(Path(s))


def describe(location: str | Path) -> str:
    """The location for messages (a URL without its password)."""
    return redact(str(location))


__all__ = ["Store", "describe", "is_url", "make_store"]
