"""Queue stage, embedded backend: the held-message store in one SQLite file (WAL, fsync per commit).

Why the message bytes live in the database (table `raw`) and not in files next to it: a message,
its tokens, its notices and its audit row then commit in ONE transaction, and one fsync of the WAL
makes all of them durable together. With files we would need write-tmp/fsync/rename/fsync-dir
plus a commit, and a crash between the two leaves orphans or dangling rows to clean up. Messages
are at most smtp.max_message_size (50 MiB by default), well inside SQLite's 1 GB blob limit; the
blobs sit in their own table so listing never reads them, and are deleted when a message reaches a
terminal state (we keep what happened, not what was said).

journal_mode=WAL with synchronous=FULL: every COMMIT fsyncs the WAL before returning, so when
put() returns the message survives a power cut (WAL with NORMAL may lose the last commits).

All SQL runs on one dedicated thread holding the one connection: a single writer, never
blocking the event loop. Other processes (the `mailguard queue` CLI) open their own connection;
SQLite's file locks serialise them (busy_timeout).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

from mailguard.errors import StoreError
from mailguard.queue.rows import (
    HELD_COLS,
    check_redeem,
    claim_why,
    encode_values,
    held_from,
    held_values,
    notice_from,
    notice_row,
    plan_move,
    token_from,
)
from mailguard.queue.store import (
    AuditEntry,
    Budget,
    Held,
    NewNotice,
    NewToken,
    Page,
    PendingNotice,
    PutRequest,
    State,
    TokenError,
    TokenInfo,
    TransitionError,
    dt,
    ts,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

# 2: notice.delay, state 'parked' (sent only after the message's delivery)
# 3: web_miss (web rate limits in the store)
SCHEMA_VERSION = 3
SCHEMA = """
CREATE TABLE IF NOT EXISTS held (
    id TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    gate TEXT NOT NULL,
    mail_from TEXT NOT NULL,
    rcpt_tos TEXT NOT NULL,
    queue_id TEXT NOT NULL,
    created REAL NOT NULL,
    due REAL NOT NULL,
    on_timeout TEXT NOT NULL,
    envelope TEXT NOT NULL,
    decision TEXT NOT NULL,
    summary TEXT NOT NULL,
    size INTEGER NOT NULL,
    updated REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt REAL,
    first_release REAL,
    lease_until REAL,
    lease_owner TEXT,
    last_reply TEXT NOT NULL DEFAULT '',
    last_by TEXT NOT NULL DEFAULT '',
    last_why TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS held_state_id ON held(state, id);
CREATE INDEX IF NOT EXISTS held_state_due ON held(state, due);
CREATE INDEX IF NOT EXISTS held_state_next ON held(state, next_attempt);
CREATE INDEX IF NOT EXISTS held_state_lease ON held(state, lease_until);
CREATE INDEX IF NOT EXISTS held_sender_id ON held(mail_from, id);
CREATE INDEX IF NOT EXISTS held_created ON held(created);
CREATE TABLE IF NOT EXISTS raw (
    id TEXT PRIMARY KEY REFERENCES held(id),
    bytes BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS audit (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    msg_id TEXT NOT NULL,
    at REAL NOT NULL,
    from_state TEXT,
    to_state TEXT NOT NULL,
    by TEXT NOT NULL,
    why TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_msg ON audit(msg_id, seq);
CREATE TABLE IF NOT EXISTS token (
    hash BLOB PRIMARY KEY,
    msg_id TEXT NOT NULL,
    role TEXT NOT NULL,
    who TEXT NOT NULL,
    expires REAL NOT NULL,
    used_at REAL,
    used_for TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS token_msg ON token(msg_id);
CREATE TABLE IF NOT EXISTS notice (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    msg_id TEXT,
    kind TEXT NOT NULL,
    rcpts TEXT NOT NULL,
    data TEXT NOT NULL,
    null_sender INTEGER NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending',
    created REAL NOT NULL,
    next_attempt REAL NOT NULL,
    lease_until REAL,
    attempts INTEGER NOT NULL DEFAULT 0,
    last_reply TEXT NOT NULL DEFAULT '',
    delay REAL NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS notice_due ON notice(state, next_attempt);
CREATE INDEX IF NOT EXISTS notice_msg ON notice(msg_id);
CREATE TABLE IF NOT EXISTS web_miss (
    kind TEXT NOT NULL,
    client TEXT NOT NULL,
    at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS web_miss_client ON web_miss(kind, client, at);
CREATE INDEX IF NOT EXISTS web_miss_at ON web_miss(kind, at);
"""

_COLS = HELD_COLS


def _json_out(v: Any) -> str:
    return json.dumps(v, ensure_ascii=False, default=str)


def _row_to_held(r: sqlite3.Row) -> Held:
    return held_from(r, json.loads, dt)


def _row_to_notice(r: sqlite3.Row) -> PendingNotice:
    return notice_from(r, json.loads, dt)


def _where(
    state: State | None, sender: str | None, since: datetime | None, before: str | None
) -> tuple[str, list[Any]]:
    """The WHERE clause (with its leading space, or "") of a list/count, and its arguments."""
    where: list[str] = []
    args: list[Any] = []
    if state is not None:
        where.append("state = ?")
        args.append(state.value)
    if sender:
        where.append("mail_from = ?")
        args.append(sender)
    if since is not None:
        where.append("created >= ?")
        args.append(ts(since))
    if before:
        where.append("id < ?")  # ids sort by creation time: keyset pagination
        args.append(before)
    return (" WHERE " + " AND ".join(where) if where else ""), args


class SqliteStore:
    """HeldStore on one SQLite file. `await open()` (or `async with`) before use."""

    def __init__(self, path: str | os.PathLike[str], *, busy_timeout: float = 5.0) -> None:
        self.path = Path(path)
        self._busy_timeout = busy_timeout
        self._db: sqlite3.Connection | None = None
        self._exec: ThreadPoolExecutor | None = None

    # -- plumbing ------------------------------------------------------------------------------

    async def __aenter__(self) -> SqliteStore:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def open(self) -> None:
        if self._exec is not None:
            return
        self._exec = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mailguard-store")
        try:
            await self._run(self._open)
        except BaseException:
            self._exec.shutdown(wait=False)
            self._exec = None
            raise

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(
            self.path,
            timeout=self._busy_timeout,
            isolation_level=None,  # we issue BEGIN IMMEDIATE / COMMIT ourselves
            check_same_thread=False,  # only ever used from our one store thread
        )
        db.row_factory = sqlite3.Row
        mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode.lower() != "wal":
            raise StoreError(f"{self.path}: cannot use WAL journal (got {mode})")
        db.execute("PRAGMA synchronous=FULL")  # fsync the WAL on every commit: 250 depends on it
        db.execute("PRAGMA foreign_keys=ON")
        # Our own version row, not PRAGMA user_version: the file may be shared with the
        # domain history store.
        db.execute("CREATE TABLE IF NOT EXISTS queue_meta (key TEXT PRIMARY KEY, value TEXT)")
        row = db.execute("SELECT value FROM queue_meta WHERE key = 'schema'").fetchone()
        if row and int(row[0]) > SCHEMA_VERSION:
            raise StoreError(f"{self.path}: queue schema {row[0]} is newer than this MailGuard")
        if row is None or int(row[0]) < SCHEMA_VERSION:  # else nothing to write (and fsync)
            db.executescript(SCHEMA)
            cols = {r[1] for r in db.execute("PRAGMA table_info(notice)")}
            if "delay" not in cols:  # schema 1 → 2
                db.execute("ALTER TABLE notice ADD COLUMN delay REAL NOT NULL DEFAULT 0")
            db.execute(
                "INSERT OR REPLACE INTO queue_meta(key, value) VALUES ('schema', ?)",
                (str(SCHEMA_VERSION),),
            )
        self._db = db
        # A new -wal file's directory entry must survive a crash too.
        fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    async def close(self) -> None:
        if self._exec is None:
            return
        try:
            await self._run(self._close)
        finally:
            self._exec.shutdown(wait=True)
            self._exec = None

    def _close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    async def _run(self, fn: Callable[[], T]) -> T:
        if self._exec is None:
            raise StoreError(f"{self.path}: store is not open")
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._exec, fn)
        except (StoreError, TransitionError, TokenError):
            raise
        except sqlite3.Error as e:
            raise StoreError(f"{self.path}: {e}") from e
        except RuntimeError as e:  # executor shut down under us
            raise StoreError(f"{self.path}: {e}") from e

    @property
    def _c(self) -> sqlite3.Connection:
        if self._db is None:
            raise StoreError(f"{self.path}: store is not open")
        return self._db

    def _tx(self, fn: Callable[[sqlite3.Connection], T], *, fsync: bool = True) -> T:
        """Run fn inside BEGIN IMMEDIATE … COMMIT (rolled back on any error). fsync=False: a
        commit that may be lost in a power cut (rate-limit counts), without the WAL fsync."""
        c = self._c
        if not fsync:
            c.execute("PRAGMA synchronous=NORMAL")
        try:
            c.execute("BEGIN IMMEDIATE")
            try:
                out = fn(c)
            except BaseException:
                c.execute("ROLLBACK")
                raise
            c.execute("COMMIT")
        finally:
            if not fsync:
                c.execute("PRAGMA synchronous=FULL")
        return out

    @staticmethod
    def _audit(
        c: sqlite3.Connection,
        msg_id: str,
        at: datetime,
        frm: State | None,
        to: State,
        by: str,
        why: str,
    ) -> None:
        c.execute(
            "INSERT INTO audit(msg_id, at, from_state, to_state, by, why) VALUES (?,?,?,?,?,?)",
            (msg_id, ts(at), frm.value if frm else None, to.value, by, why),
        )

    @staticmethod
    def _insert_notices(
        c: sqlite3.Connection, notices: Sequence[NewNotice], now: float
    ) -> list[int]:
        ids = []
        for n in notices:
            row = notice_row(n)
            cur = c.execute(
                "INSERT INTO notice(msg_id, kind, rcpts, data, null_sender, created, "
                "next_attempt, state, delay) VALUES (?,?,?,?,?,?,?,?,?)",
                (
                    n.msg_id,
                    n.kind,
                    json.dumps(list(n.to)),
                    json.dumps(dict(n.data), ensure_ascii=False, default=str),
                    int(n.null_sender),
                    now,
                    ts(n.due),
                    row.state,
                    row.delay,
                ),
            )
            ids.append(int(cur.lastrowid or 0))
        return ids

    # -- HeldStore -----------------------------------------------------------------------------

    async def ping(self) -> bool:
        try:
            return await self._run(lambda: self._c.execute("SELECT 1").fetchone()[0] == 1)
        except StoreError:
            return False

    def _put(
        self,
        c: sqlite3.Connection,
        item: Held,
        raw: bytes,
        tokens: Sequence[NewToken],
        notices: Sequence[NewNotice],
        by: str,
        why: str,
    ) -> None:
        c.execute(
            f"INSERT INTO held({_COLS}) VALUES ({','.join('?' * 21)})",
            encode_values(held_values(item, len(raw), by, why), _json_out, ts),
        )
        c.execute("INSERT INTO raw(id, bytes) VALUES (?, ?)", (item.id, raw))
        c.executemany(
            "INSERT INTO token(hash, msg_id, role, who, expires) VALUES (?,?,?,?,?)",
            [(t.hash, item.id, t.role, t.who, ts(t.expires)) for t in tokens],
        )
        self._insert_notices(c, notices, ts(item.created) or 0.0)
        self._audit(c, item.id, item.created, None, item.state, by, why)

    async def put(
        self,
        item: Held,
        raw: bytes,
        tokens: Sequence[NewToken] = (),
        notices: Sequence[NewNotice] = (),
        *,
        by: str = "smtp",
        why: str = "",
    ) -> None:
        await self._run(
            lambda: self._tx(lambda c: self._put(c, item, raw, tokens, notices, by, why))
        )

    async def put_many(self, batch: Sequence[PutRequest]) -> None:
        """Several put()s in ONE transaction (one fsync): all stored, or none."""

        def work(c: sqlite3.Connection) -> None:
            for p in batch:
                self._put(c, p.item, p.raw, p.tokens, p.notices, p.by, p.why)

        await self._run(lambda: self._tx(work))

    def _get(self, c: sqlite3.Connection, msg_id: str) -> Held | None:
        r = c.execute(f"SELECT {_COLS} FROM held WHERE id = ?", (msg_id,)).fetchone()
        return _row_to_held(r) if r else None

    async def get(self, msg_id: str) -> Held | None:
        return await self._run(lambda: self._get(self._c, msg_id))

    async def raw(self, msg_id: str) -> bytes | None:
        def work() -> bytes | None:
            r = self._c.execute("SELECT bytes FROM raw WHERE id = ?", (msg_id,)).fetchone()
            return bytes(r[0]) if r else None

        return await self._run(work)

    def _move(
        self,
        c: sqlite3.Connection,
        msg_id: str,
        to: State,
        now: datetime,
        by: str,
        why: str,
        expect: frozenset[State] | None,
        notices: Sequence[NewNotice],
        next_attempt: datetime | None,
        last_reply: str | None,
    ) -> Held:
        cur = self._get(c, msg_id)
        plan = plan_move(cur, msg_id, to, now, by, why, expect, next_attempt, last_reply)
        assert cur is not None
        sets = ", ".join(f"{col} = ?" for col, _ in plan.assign)
        args = [ts(v) if isinstance(v, datetime) else v for _, v in plan.assign]
        c.execute(f"UPDATE held SET {sets} WHERE id = ?", (*args, msg_id))
        if plan.drop_raw:
            c.execute("DELETE FROM raw WHERE id = ?", (msg_id,))
        if plan.parked == "release":
            self._release_parked(c, msg_id, now)
        elif plan.parked == "drop":
            c.execute("DELETE FROM notice WHERE msg_id = ? AND state = 'parked'", (msg_id,))
        self._audit(c, msg_id, now, cur.state, to, by, why)
        self._insert_notices(c, notices, ts(now) or 0.0)
        new = self._get(c, msg_id)
        assert new is not None
        return new

    async def move(
        self,
        msg_id: str,
        to: State,
        *,
        now: datetime,
        by: str,
        why: str,
        expect: frozenset[State] | None = None,
        notices: Sequence[NewNotice] = (),
        next_attempt: datetime | None = None,
        last_reply: str | None = None,
    ) -> Held:
        return await self._run(
            lambda: self._tx(
                lambda c: self._move(
                    c, msg_id, to, now, by, why, expect, notices, next_attempt, last_reply
                )
            )
        )

    def _token(self, c: sqlite3.Connection, h: bytes) -> tuple[TokenInfo, Held] | None:
        r = c.execute(
            "SELECT msg_id, role, who, expires, used_at, used_for FROM token WHERE hash = ?", (h,)
        ).fetchone()
        if r is None:
            return None
        held = self._get(c, r["msg_id"])
        if held is None:
            return None
        info = token_from(r, dt)
        return info, held

    async def token(self, token_hash: bytes) -> tuple[TokenInfo, Held] | None:
        return await self._run(lambda: self._token(self._c, token_hash))

    async def redeem(
        self,
        token_hash: bytes,
        to: State,
        *,
        now: datetime,
        action: str,
        by: str,
        why: str,
        notices: Sequence[NewNotice] = (),
    ) -> Held:
        def work(c: sqlite3.Connection) -> Held:
            found = self._token(c, token_hash)
            if found is None:
                raise TokenError("unknown")
            info, held = found
            check_redeem(info, held, now)
            c.execute(
                "UPDATE token SET used_at = ?, used_for = ? WHERE hash = ?",
                (ts(now), action, token_hash),
            )
            return self._move(
                c, held.id, to, now, by, why, frozenset({State.HELD}), notices, None, None
            )

        return await self._run(lambda: self._tx(work))

    async def list_messages(
        self,
        *,
        state: State | None = None,
        sender: str | None = None,
        since: datetime | None = None,
        before: str | None = None,
        limit: int = 50,
    ) -> Page:
        limit = max(1, min(limit, 1000))
        cond, args = _where(state, sender, since, before)
        sql = f"SELECT {_COLS} FROM held{cond} ORDER BY id DESC LIMIT ?"

        def work() -> Page:
            rows = self._c.execute(sql, (*args, limit + 1)).fetchall()
            items = tuple(_row_to_held(r) for r in rows[:limit])
            return Page(items, items[-1].id if len(rows) > limit else None)

        return await self._run(work)

    async def counts(self) -> dict[str, int]:
        def work() -> dict[str, int]:
            out = {st.value: 0 for st in State}
            for st, n in self._c.execute("SELECT state, count(*) FROM held GROUP BY state"):
                out[str(st)] = int(n)
            return out

        return await self._run(work)

    async def count(
        self,
        state: State | None = None,
        *,
        sender: str | None = None,
        since: datetime | None = None,
    ) -> int:
        cond, args = _where(state, sender, since, None)
        q = f"SELECT count(*) FROM held{cond}"
        return await self._run(lambda: int(self._c.execute(q, args).fetchone()[0]))

    async def oldest_held(self) -> datetime | None:
        def work() -> datetime | None:
            q = "SELECT min(created) FROM held WHERE state = ?"
            v = self._c.execute(q, (State.HELD.value,)).fetchone()[0]
            return None if v is None else dt(v)

        return await self._run(work)

    async def audit(self, msg_id: str) -> list[AuditEntry]:
        def work() -> list[AuditEntry]:
            rows = self._c.execute(
                "SELECT msg_id, at, from_state, to_state, by, why FROM audit "
                "WHERE msg_id = ? ORDER BY seq",
                (msg_id,),
            ).fetchall()
            return [
                AuditEntry(
                    r["msg_id"],
                    dt(r["at"]),  # type: ignore[arg-type]
                    State(r["from_state"]) if r["from_state"] else None,
                    State(r["to_state"]),
                    r["by"],
                    r["why"],
                )
                for r in rows
            ]

        return await self._run(work)

    async def due_held(self, now: datetime, limit: int = 100) -> list[Held]:
        def work() -> list[Held]:
            rows = self._c.execute(
                f"SELECT {_COLS} FROM held WHERE state = 'held' AND due <= ? ORDER BY due LIMIT ?",
                (ts(now), limit),
            ).fetchall()
            return [_row_to_held(r) for r in rows]

        return await self._run(work)

    async def claim_deliveries(
        self, now: datetime, lease_until: datetime, owner: str, limit: int = 20
    ) -> list[Held]:
        def work(c: sqlite3.Connection) -> list[Held]:
            rows = c.execute(
                "SELECT id, state FROM held WHERE (state = 'released' AND next_attempt <= ?) "
                "OR (state = 'delivering' AND lease_until <= ?) ORDER BY next_attempt LIMIT ?",
                (ts(now), ts(now), limit),
            ).fetchall()
            out = []
            for r in rows:
                frm = State(r["state"])
                why = claim_why(frm)
                c.execute(
                    "UPDATE held SET state = 'delivering', lease_until = ?, lease_owner = ?, "
                    "attempts = attempts + 1, updated = ?, last_by = 'scheduler', last_why = ? "
                    "WHERE id = ?",
                    (ts(lease_until), owner, ts(now), why, r["id"]),
                )
                self._audit(c, r["id"], now, frm, State.DELIVERING, "scheduler", why)
                h = self._get(c, r["id"])
                assert h is not None
                out.append(h)
            return out

        return await self._run(lambda: self._tx(work))

    async def recover_leases(self, now: datetime) -> int:
        def work(c: sqlite3.Connection) -> int:
            cur = c.execute(
                "UPDATE held SET lease_until = ? WHERE state = 'delivering' AND lease_until > ?",
                (ts(now), ts(now)),
            )
            return cur.rowcount

        return await self._run(lambda: self._tx(work))

    async def add_notices(self, notices: Sequence[NewNotice]) -> list[int]:
        if not notices:
            return []
        now = min(ts(n.due) or 0.0 for n in notices)
        return await self._run(lambda: self._tx(lambda c: self._insert_notices(c, notices, now)))

    async def drop_notices(self, ids: Sequence[int]) -> int:
        if not ids:
            return 0
        q = f"DELETE FROM notice WHERE state = 'pending' AND id IN ({','.join('?' * len(ids))})"
        return await self._run(lambda: self._tx(lambda c: c.execute(q, list(ids)).rowcount))

    @staticmethod
    def _release_parked(c: sqlite3.Connection, msg_id: str, now: datetime) -> int:
        cur = c.execute(
            "UPDATE notice SET state = 'pending', next_attempt = ? + delay "
            "WHERE msg_id = ? AND state = 'parked'",
            (ts(now), msg_id),
        )
        return cur.rowcount

    async def release_parked(self, msg_id: str, now: datetime) -> int:
        return await self._run(lambda: self._tx(lambda c: self._release_parked(c, msg_id, now)))

    async def drop_parked(self, msg_id: str) -> int:
        def work(c: sqlite3.Connection) -> int:
            q = "DELETE FROM notice WHERE msg_id = ? AND state = 'parked'"
            return c.execute(q, (msg_id,)).rowcount

        return await self._run(lambda: self._tx(work))

    async def claim_notices(
        self, now: datetime, lease_until: datetime, limit: int = 20
    ) -> list[PendingNotice]:
        def work(c: sqlite3.Connection) -> list[PendingNotice]:
            rows = c.execute(
                "SELECT * FROM notice WHERE state = 'pending' AND next_attempt <= ? "
                "AND (lease_until IS NULL OR lease_until <= ?) ORDER BY next_attempt LIMIT ?",
                (ts(now), ts(now), limit),
            ).fetchall()
            c.executemany(
                "UPDATE notice SET lease_until = ?, attempts = attempts + 1 WHERE id = ?",
                [(ts(lease_until), r["id"]) for r in rows],
            )
            return [replace(_row_to_notice(r), attempts=r["attempts"] + 1) for r in rows]

        return await self._run(lambda: self._tx(work))

    async def finish_notice(
        self, notice_id: int, *, now: datetime, sent: bool, reply: str, retry_at: datetime | None
    ) -> None:
        def work(c: sqlite3.Connection) -> None:
            if sent:
                # Links and passwords leave the disk once the notice is out.
                c.execute(
                    "UPDATE notice SET state = 'sent', data = '{}', lease_until = NULL, "
                    "last_reply = ? WHERE id = ?",
                    (reply, notice_id),
                )
            elif retry_at is not None:
                c.execute(
                    "UPDATE notice SET lease_until = NULL, next_attempt = ?, last_reply = ? "
                    "WHERE id = ?",
                    (ts(retry_at), reply, notice_id),
                )
            else:
                c.execute(
                    "UPDATE notice SET state = 'failed', data = '{}', lease_until = NULL, "
                    "last_reply = ? WHERE id = ?",
                    (reply, notice_id),
                )

        await self._run(lambda: self._tx(work))

    async def notices_for(self, msg_id: str) -> list[PendingNotice]:
        def work() -> list[PendingNotice]:
            rows = self._c.execute(
                "SELECT * FROM notice WHERE msg_id = ? ORDER BY id", (msg_id,)
            ).fetchall()
            return [_row_to_notice(r) for r in rows]

        return await self._run(work)

    # -- web rate limits (every process on this file shares them) -------------------------------

    @staticmethod
    def _rate_counts(
        c: sqlite3.Connection, budget: Budget, client: str, since: float
    ) -> tuple[bool, int]:
        mine, everyone = c.execute(
            "SELECT count(*) FILTER (WHERE client = ?2), count(*) FROM web_miss "
            "WHERE kind = ?1 AND at > ?3",
            (budget.kind, client, since),
        ).fetchone()
        return budget.over(int(mine), int(everyone)), int(everyone)

    async def rate_hit(self, budget: Budget, client: str) -> bool:
        def work(c: sqlite3.Connection) -> bool:
            now = time.time()
            since = now - budget.window
            c.execute("DELETE FROM web_miss WHERE kind = ? AND at <= ?", (budget.kind, since))
            over, everyone = self._rate_counts(c, budget, client, since)
            if not over and budget.records(everyone):
                c.execute(
                    "INSERT INTO web_miss(kind, client, at) VALUES (?, ?, ?)",
                    (budget.kind, client, now),
                )
            return over

        return await self._run(lambda: self._tx(work, fsync=False))

    async def rate_blocked(self, budget: Budget, client: str) -> bool:
        def work() -> bool:
            since = time.time() - budget.window
            return self._rate_counts(self._c, budget, client, since)[0]

        return await self._run(work)
