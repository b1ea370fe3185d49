"""Queue stage: the durable store of held messages and the verbs that move them.

store.py    states, allowed moves, the HeldStore protocol and value types
sqlite.py   SqliteStore: the embedded backend (WAL, fsync before 250)
postgres.py PostgresStore: the shared backend (several guards, leases, migrations)
rows.py     what both backends share: row mapping, move rules, token checks
backends.py which backend a location (path or postgresql:// URL) names
service.py  HoldService: keep / act on a token / release / cancel
dsn.py      RFC 3464 bounces for mail that failed after our 250
"""

from mailguard.queue.service import HoldService, PageView, hash_token, new_token
from mailguard.queue.sqlite import SqliteStore
from mailguard.queue.store import (
    ALLOWED,
    TERMINAL,
    AuditEntry,
    Budget,
    Held,
    HeldStore,
    NewNotice,
    NewToken,
    Page,
    PendingNotice,
    PutRequest,
    State,
    TokenError,
    TokenInfo,
    TransitionError,
)

__all__ = [
    "ALLOWED",
    "TERMINAL",
    "AuditEntry",
    "Budget",
    "Held",
    "HeldStore",
    "HoldService",
    "NewNotice",
    "NewToken",
    "Page",
    "PageView",
    "PendingNotice",
    "PutRequest",
    "SqliteStore",
    "State",
    "TokenError",
    "TokenInfo",
    "TransitionError",
    "hash_token",
    "new_token",
]
