"""Queue stage, shared backend: the held-message store in PostgreSQL, for several guards at once.

Selected by a URL (`--store postgresql://user@host/db`, or `store.url`); SQLite stays the
embedded default. The same HeldStore contract as SqliteStore, plus what several nodes need:

* **Durability.** Every transaction commits with `synchronous_commit = on` (set per connection):
  COMMIT returns after the WAL is flushed on the server, so `put()` returning still means the
  message survives a crash of the database host, and only then does the SMTP side answer 250.
* **Many schedulers, one delivery.** Due work is claimed in one statement
  (`SELECT … FOR UPDATE SKIP LOCKED` feeding an `UPDATE … RETURNING`): two nodes claiming at the
  same instant get disjoint rows and never wait for each other. A claim is a *lease*
  (`lease_until`, `lease_owner`), not a lock held across the delivery: the row lock ends with the
  claim's short transaction. While this process delivers, a heartbeat renews the leases it holds
  every `lease/3`; a node that dies (or loses the database) stops renewing, its leases run out
  within one lease (60 s by default) and any other node claims the work again — including a
  delivery the dead node had started. `recover_leases()` is therefore a no-op here: at start a
  node cannot tell a dead node's lease from a live one's, and does not need to.
* **Versioned migrations.** `mailguard_schema` records each applied version; `open()` applies the
  missing ones under a transaction-scoped advisory lock (two nodes starting together migrate
  once), and refuses a database whose schema is newer than this MailGuard.
* **Faults.** Every driver or network error, and a pool/connect/command timeout, becomes
  StoreError, which the callers already turn into 451 (keep), 503 (web) or a retried tick
  (scheduler). The pool reconnects by itself when the server is back.

Driver: asyncpg — an asyncio-native driver with its own pool (no libpq, no threads), the binary
protocol, and prepared-statement caching; the store needs nothing psycopg 3 has and asyncpg lacks.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import datetime, timedelta
from typing import Any, TypeVar

import asyncpg

from mailguard.errors import StoreError
from mailguard.queue.backends import redact
from mailguard.queue.rows import (
    HELD_COLS,
    NOTICE_COLS,
    WHY_CLAIMED,
    WHY_TAKEN_OVER,
    check_redeem,
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
)

log = logging.getLogger(__name__)
T = TypeVar("T")

_ADVISORY_KEY = 0x6D61696C67756172  # "mailguar": serialises migrations across nodes
_RATE_LOCK = 0x6D67726C  # "mgrl" (+ the kind's hash): serialises rate-limit counting

# (version, name, SQL). Append only; never edit a shipped step.
MIGRATIONS: tuple[tuple[int, str, str], ...] = (
    (
        1,
        "queue, raw bytes, audit, tokens, notices, delivery history, web rate limits",
        """
CREATE TABLE held (
    id text PRIMARY KEY,
    state text NOT NULL,
    gate text NOT NULL,
    mail_from text NOT NULL,
    rcpt_tos jsonb NOT NULL,
    queue_id text NOT NULL,
    created timestamptz NOT NULL,
    due timestamptz NOT NULL,
    on_timeout text NOT NULL,
    envelope jsonb NOT NULL,
    decision jsonb NOT NULL,
    summary jsonb NOT NULL,
    size bigint NOT NULL,
    updated timestamptz NOT NULL,
    attempts integer NOT NULL DEFAULT 0,
    next_attempt timestamptz,
    first_release timestamptz,
    lease_until timestamptz,
    lease_owner text,
    last_reply text NOT NULL DEFAULT '',
    last_by text NOT NULL DEFAULT '',
    last_why text NOT NULL DEFAULT ''
);
CREATE INDEX held_state_id ON held(state, id);
CREATE INDEX held_due ON held(due) WHERE state = 'held';
CREATE INDEX held_next ON held(next_attempt) WHERE state = 'released';
CREATE INDEX held_lease ON held(lease_until) WHERE state = 'delivering';
CREATE INDEX held_sender_id ON held(mail_from, id);
CREATE INDEX held_created ON held(created);
CREATE TABLE raw (
    id text PRIMARY KEY REFERENCES held(id) ON DELETE CASCADE,
    bytes bytea NOT NULL
);
CREATE TABLE audit (
    seq bigserial PRIMARY KEY,
    msg_id text NOT NULL,
    at timestamptz NOT NULL,
    from_state text,
    to_state text NOT NULL,
    by text NOT NULL,
    why text NOT NULL
);
CREATE INDEX audit_msg ON audit(msg_id, seq);
CREATE TABLE token (
    hash bytea PRIMARY KEY,
    msg_id text NOT NULL,
    role text NOT NULL,
    who text NOT NULL,
    expires timestamptz NOT NULL,
    used_at timestamptz,
    used_for text NOT NULL DEFAULT ''
);
CREATE INDEX token_msg ON token(msg_id);
CREATE TABLE notice (
    id bigserial PRIMARY KEY,
    msg_id text,
    kind text NOT NULL,
    rcpts jsonb NOT NULL,
    data jsonb NOT NULL,
    null_sender boolean NOT NULL,
    state text NOT NULL DEFAULT 'pending',
    created timestamptz NOT NULL,
    next_attempt timestamptz NOT NULL,
    lease_until timestamptz,
    attempts integer NOT NULL DEFAULT 0,
    last_reply text NOT NULL DEFAULT '',
    delay double precision NOT NULL DEFAULT 0
);
CREATE INDEX notice_due ON notice(next_attempt) WHERE state = 'pending';
CREATE INDEX notice_msg ON notice(msg_id);
CREATE TABLE domain_history (
    domain text PRIMARY KEY,
    count bigint NOT NULL,
    first_seen timestamptz NOT NULL,
    last_seen timestamptz NOT NULL
);
CREATE INDEX domain_history_count ON domain_history(count);
CREATE TABLE history_import (key text PRIMARY KEY);
CREATE TABLE web_miss (
    client text NOT NULL,
    at timestamptz NOT NULL
);
CREATE INDEX web_miss_client ON web_miss(client, at);
""",
    ),
    (
        2,
        "web rate limits by kind (unknown-token misses, failed admin logins)",
        """
ALTER TABLE web_miss ADD COLUMN kind text NOT NULL DEFAULT 'token';
DROP INDEX web_miss_client;
CREATE INDEX web_miss_client ON web_miss(kind, client, at);
CREATE INDEX web_miss_at ON web_miss(kind, at);
""",
    ),
)
SCHEMA_VERSION = MIGRATIONS[-1][0]

_COLS = HELD_COLS
_NOTICE_COLS = NOTICE_COLS
# What a pooled connection is to the type checker; the code uses it as a Connection.
Conn = asyncpg.Connection | asyncpg.pool.PoolConnectionProxy
_ERRORS = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.InternalClientError,
    OSError,
    TimeoutError,
)


def _jsonb_out(v: Any) -> bytes:
    # jsonb's binary form: a version byte, then the JSON text (binary also serves COPY)
    return b"\x01" + json.dumps(v, ensure_ascii=False, default=str).encode()


def _jsonb_in(b: bytes) -> Any:
    return json.loads(b[1:])


async def _init_connection(c: Conn) -> None:
    await c.set_type_codec(
        "jsonb", encoder=_jsonb_out, decoder=_jsonb_in, schema="pg_catalog", format="binary"
    )


def _held(r: asyncpg.Record) -> Held:
    return held_from(r)


def _notice(r: asyncpg.Record) -> PendingNotice:
    return notice_from(r)


def _where(
    state: State | None, sender: str | None, since: datetime | None, before: str | None
) -> tuple[str, list[Any]]:
    """The WHERE clause (with its leading space, or "") of a list/count, and its arguments."""
    where: list[str] = []
    args: list[Any] = []
    for cond, val in (
        ("state = ${}", state.value if state is not None else None),
        ("mail_from = ${}", sender or None),
        ("created >= ${}", since),
        ("id < ${}", before or None),  # ids sort by creation time: keyset pagination
    ):
        if val is not None:
            args.append(val)
            where.append(cond.format(len(args)))
    return (" WHERE " + " AND ".join(where) if where else ""), args


class PostgresStore:
    """HeldStore on PostgreSQL through an asyncpg pool. `await open()` (or `async with`)."""

    shared = True  # several processes and hosts schedule from it at once

    def __init__(
        self,
        url: str,
        *,
        min_size: int = 1,
        max_size: int = 10,
        timeout: float = 5.0,  # connect and pool acquire
        command_timeout: float = 10.0,
        migrate: bool = True,
        heartbeat: bool = True,
    ) -> None:
        self.url = url
        self.path = redact(url)  # what messages name (SqliteStore has its file path here)
        self._min = min_size
        self._max = max_size
        self._timeout = timeout
        self._command_timeout = command_timeout
        self._migrate = migrate
        self._heartbeat_on = heartbeat
        self._pool: asyncpg.Pool | None = None
        # leases this process holds and renews: id → (owner, lease length)
        self._leases: dict[str, tuple[str, timedelta]] = {}
        self._notice_leases: dict[int, timedelta] = {}
        self._beat: asyncio.Task[None] | None = None
        self._opener: asyncio.Task[None] | None = None
        self._claimed = asyncio.Event()
        self._stopping = False

    # -- plumbing ------------------------------------------------------------------------------

    async def __aenter__(self) -> PostgresStore:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def open(self) -> None:
        if self._pool is not None:
            return
        try:
            pool = await asyncpg.create_pool(
                self.url,
                min_size=self._min,
                max_size=self._max,
                timeout=self._timeout,
                command_timeout=self._command_timeout,
                init=_init_connection,
                server_settings={
                    "synchronous_commit": "on",  # COMMIT waits for the WAL flush: 250 needs it
                    "application_name": "mailguard",
                    "timezone": "UTC",
                },
            )
        except _ERRORS as e:
            raise StoreError(f"{self.path}: cannot connect: {e}") from e
        self._pool = pool
        try:
            if self._migrate:
                await self.migrate()
            else:
                await self._check_version()
        except BaseException:
            await self.close()
            raise
        if self._heartbeat_on:
            self._stopping = False
            self._beat = asyncio.ensure_future(self._heartbeat())

    async def open_or_retry(self, every: float = 5.0) -> bool:
        """Open now if the database answers; else keep trying in the background (every call
        raises StoreError until then, so mail to be kept gets 451 meanwhile). True if open."""
        try:
            await self.open()
            return True
        except StoreError as e:
            log.error("%s: not available yet, retrying every %.0fs: %s", self.path, every, e)

        async def retry() -> None:
            while self._pool is None:
                await asyncio.sleep(every)
                try:
                    await self.open()
                    log.info("%s: connected", self.path)
                except StoreError as e:
                    log.warning("%s: still not available: %s", self.path, e)

        self._opener = asyncio.ensure_future(retry())
        return False

    async def close(self) -> None:
        if self._opener is not None:
            self._opener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._opener
            self._opener = None
        if self._beat is not None:
            self._stopping = True
            self._claimed.set()
            self._beat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._beat
            self._beat = None
        pool, self._pool = self._pool, None
        if pool is not None:
            try:
                await asyncio.wait_for(pool.close(), 5)
            except (TimeoutError, *_ERRORS):
                pool.terminate()

    @property
    def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise StoreError(f"{self.path}: store is not open")
        return self._pool

    @contextlib.asynccontextmanager
    async def _conn(self) -> AsyncIterator[Conn]:
        try:
            async with self.pool.acquire(timeout=self._timeout) as c:
                yield c
        except (StoreError, TransitionError, TokenError):
            raise
        except _ERRORS as e:
            raise StoreError(f"{self.path}: {type(e).__name__}: {e}") from e

    async def _tx(self, fn: Callable[[Conn], Awaitable[T]], deadline: float | None = None) -> T:
        async def run() -> T:
            async with self._conn() as c, c.transaction():
                return await fn(c)

        return await self._within(run(), deadline)

    async def _read(self, fn: Callable[[Conn], Awaitable[T]], deadline: float | None = None) -> T:
        async def run() -> T:
            async with self._conn() as c:
                return await fn(c)

        return await self._within(run(), deadline)

    async def within(self, aw: Awaitable[T], deadline: float) -> T:
        """`aw`, or StoreError after `deadline` seconds. A database that hangs (connections
        open, no answer) costs each call its connect or command timeout, and then up to the
        acquire timeout again while asyncpg waits for the cancelled query; for the SMTP answer
        (and /healthz, and the history lookup) the caller's deadline bounds the whole call."""
        return await self._within(aw, deadline)

    async def _within(self, aw: Awaitable[T], deadline: float | None) -> T:
        if deadline is None:
            return await aw
        try:
            return await asyncio.wait_for(aw, deadline)
        except TimeoutError as e:
            raise StoreError(f"{self.path}: no answer within {deadline:g}s") from e

    # -- migrations ----------------------------------------------------------------------------

    async def _check_version(self) -> int:
        async def work(c: Conn) -> int:
            exists = await c.fetchval("SELECT to_regclass('mailguard_schema') IS NOT NULL")
            v = await c.fetchval("SELECT max(version) FROM mailguard_schema") if exists else None
            return int(v or 0)

        v = await self._read(work)
        if v > SCHEMA_VERSION:
            raise StoreError(f"{self.path}: schema {v} is newer than this MailGuard")
        if v < SCHEMA_VERSION and not self._migrate:
            raise StoreError(
                f"{self.path}: schema {v} needs migrating to {SCHEMA_VERSION} "
                "(mailguard store migrate)"
            )
        return v

    async def migrate(self) -> list[int]:
        """Apply the missing migrations (each in its own transaction); the versions applied."""

        async def work(c: Conn) -> list[int]:
            await c.execute("SELECT pg_advisory_xact_lock($1)", _ADVISORY_KEY)
            await c.execute(
                "CREATE TABLE IF NOT EXISTS mailguard_schema (version integer PRIMARY KEY, "
                "name text NOT NULL, applied timestamptz NOT NULL DEFAULT now())"
            )
            have = int(await c.fetchval("SELECT coalesce(max(version), 0) FROM mailguard_schema"))
            if have > SCHEMA_VERSION:
                raise StoreError(f"{self.path}: schema {have} is newer than this MailGuard")
            done = []
            for version, name, sql in MIGRATIONS:
                if version <= have:
                    continue
                await c.execute(sql)
                await c.execute(
                    "INSERT INTO mailguard_schema(version, name) VALUES ($1, $2)", version, name
                )
                done.append(version)
                log.info("%s: schema migrated to version %d (%s)", self.path, version, name)
            return done

        # One transaction: PostgreSQL's DDL is transactional, so a failed step leaves nothing.
        return await self._tx(work)

    async def schema_version(self) -> int:
        return await self._check_version()

    # -- lease heartbeat -----------------------------------------------------------------------

    async def _heartbeat(self) -> None:
        # A flag, not only cancel(): 3.11's wait_for can swallow a cancel that meets a wake-up.
        while not self._stopping:
            shortest = min(
                [d for _, d in self._leases.values()] + list(self._notice_leases.values()),
                default=timedelta(seconds=30),
            )
            self._claimed.clear()
            with contextlib.suppress(TimeoutError):  # a new, shorter lease: sleep again
                await asyncio.wait_for(self._claimed.wait(), max(0.2, shortest.total_seconds() / 3))
                continue
            try:
                await self.renew_leases()
            except StoreError as e:
                log.warning("cannot renew delivery leases: %s", e)
            except Exception:  # anything else a driver raises: the heartbeat must not die
                log.exception("cannot renew delivery leases")

    async def renew_leases(self, now: datetime | None = None) -> int:
        """Extend the leases this process holds (deliveries and notices in flight)."""
        if not self._leases and not self._notice_leases:
            return 0
        leases = dict(self._leases)
        notices = dict(self._notice_leases)

        async def work(c: Conn) -> int:
            at = now or await c.fetchval("SELECT now()")
            n = 0
            if leases:
                r = await c.execute(
                    "UPDATE held AS h SET lease_until = $1::timestamptz + v.len "
                    "FROM unnest($2::text[], $3::text[], $4::interval[]) AS v(id, owner, len) "
                    "WHERE h.id = v.id AND h.state = 'delivering' AND h.lease_owner = v.owner",
                    at,
                    list(leases),
                    [o for o, _ in leases.values()],
                    [d for _, d in leases.values()],
                )
                n += int(r.split()[-1])
            if notices:
                r = await c.execute(
                    "UPDATE notice AS n SET lease_until = $1::timestamptz + v.len "
                    "FROM unnest($2::bigint[], $3::interval[]) AS v(id, len) "
                    "WHERE n.id = v.id AND n.state = 'pending' AND n.lease_until IS NOT NULL",
                    at,
                    list(notices),
                    list(notices.values()),
                )
                n += int(r.split()[-1])
            return n

        return await self._tx(work)

    # -- helpers inside a transaction ----------------------------------------------------------

    @staticmethod
    async def _audit(
        c: Conn,
        msg_id: str,
        at: datetime,
        frm: State | None,
        to: State,
        by: str,
        why: str,
    ) -> None:
        await c.execute(
            "INSERT INTO audit(msg_id, at, from_state, to_state, by, why) "
            "VALUES ($1, $2, $3, $4, $5, $6)",
            msg_id,
            at,
            frm.value if frm else None,
            to.value,
            by,
            why,
        )

    @staticmethod
    async def _insert_notices(c: Conn, notices: Sequence[NewNotice], now: datetime) -> list[int]:
        ids = []
        for n in notices:
            row = notice_row(n)
            nid = await c.fetchval(
                "INSERT INTO notice(msg_id, kind, rcpts, data, null_sender, created, "
                "next_attempt, state, delay) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9) RETURNING id",
                n.msg_id,
                n.kind,
                list(n.to),
                dict(n.data),
                n.null_sender,
                now,
                n.due,
                row.state,
                row.delay,
            )
            ids.append(int(nid))
        return ids

    @staticmethod
    async def _get(c: Conn, msg_id: str, *, lock: bool = False) -> Held | None:
        q = f"SELECT {_COLS} FROM held WHERE id = $1" + (" FOR UPDATE" if lock else "")
        r = await c.fetchrow(q, msg_id)
        return _held(r) if r else None

    # -- HeldStore -----------------------------------------------------------------------------

    async def ping(self) -> bool:
        try:
            return bool(await self._read(lambda c: c.fetchval("SELECT 1"), self._timeout) == 1)
        except StoreError:
            return False

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
        await self._tx(lambda c: self._put(c, item, raw, tokens, notices, by, why))

    async def put_many(self, batch: Sequence[PutRequest]) -> None:
        """Several put()s in ONE transaction: all stored, or none."""

        async def work(c: Conn) -> None:
            for p in batch:
                await self._put(c, p.item, p.raw, p.tokens, p.notices, p.by, p.why)

        await self._tx(work, self._command_timeout)  # the SMTP answer waits for it

    async def _put(
        self,
        c: Conn,
        item: Held,
        raw: bytes,
        tokens: Sequence[NewToken],
        notices: Sequence[NewNotice],
        by: str,
        why: str,
    ) -> None:
        await c.execute(
            f"INSERT INTO held({_COLS}) VALUES "
            "($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13,$14,$15,$16,$17,$18,$19,$20,$21)",
            *held_values(item, len(raw), by, why),
        )
        await c.execute("INSERT INTO raw(id, bytes) VALUES ($1, $2)", item.id, raw)
        if tokens:
            await c.executemany(
                "INSERT INTO token(hash, msg_id, role, who, expires) VALUES ($1,$2,$3,$4,$5)",
                [(t.hash, item.id, t.role, t.who, t.expires) for t in tokens],
            )
        await self._insert_notices(c, notices, item.created)
        await self._audit(c, item.id, item.created, None, item.state, by, why)

    async def get(self, msg_id: str) -> Held | None:
        return await self._read(lambda c: self._get(c, msg_id))

    async def raw(self, msg_id: str) -> bytes | None:
        v = await self._read(lambda c: c.fetchval("SELECT bytes FROM raw WHERE id = $1", msg_id))
        return bytes(v) if v is not None else None

    async def _move(
        self,
        c: Conn,
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
        cur = await self._get(c, msg_id, lock=True)
        plan = plan_move(cur, msg_id, to, now, by, why, expect, next_attempt, last_reply)
        assert cur is not None
        sets = ", ".join(f"{col} = ${i}" for i, (col, _) in enumerate(plan.assign, 2))
        await c.execute(
            f"UPDATE held SET {sets} WHERE id = $1", msg_id, *(v for _, v in plan.assign)
        )
        if plan.drop_raw:
            await c.execute("DELETE FROM raw WHERE id = $1", msg_id)
        if plan.parked == "release":
            await self._release_parked(c, msg_id, now)
        elif plan.parked == "drop":
            await c.execute("DELETE FROM notice WHERE msg_id = $1 AND state = 'parked'", msg_id)
        await self._audit(c, msg_id, now, cur.state, to, by, why)
        await self._insert_notices(c, notices, now)
        new = await self._get(c, msg_id)
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
        out = await self._tx(
            lambda c: self._move(
                c, msg_id, to, now, by, why, expect, notices, next_attempt, last_reply
            )
        )
        if to is not State.DELIVERING:
            self._leases.pop(msg_id, None)
        return out

    @staticmethod
    async def _token(c: Conn, h: bytes, *, lock: bool = False) -> tuple[TokenInfo, Held] | None:
        r = await c.fetchrow(
            "SELECT msg_id, role, who, expires, used_at, used_for FROM token WHERE hash = $1"
            + (" FOR UPDATE" if lock else ""),
            h,
        )
        if r is None:
            return None
        held = await PostgresStore._get(c, r["msg_id"], lock=lock)
        if held is None:
            return None
        info = token_from(r)
        return info, held

    async def token(self, token_hash: bytes) -> tuple[TokenInfo, Held] | None:
        return await self._read(lambda c: self._token(c, token_hash))

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
        async def work(c: Conn) -> Held:
            found = await self._token(c, token_hash, lock=True)
            if found is None:
                raise TokenError("unknown")
            info, held = found
            check_redeem(info, held, now)
            await c.execute(
                "UPDATE token SET used_at = $1, used_for = $2 WHERE hash = $3",
                now,
                action,
                token_hash,
            )
            return await self._move(
                c, held.id, to, now, by, why, frozenset({State.HELD}), notices, None, None
            )

        return await self._tx(work)

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
        args.append(limit + 1)
        sql = f"SELECT {_COLS} FROM held{cond} ORDER BY id DESC LIMIT ${len(args)}"
        rows = await self._read(lambda c: c.fetch(sql, *args))
        items = tuple(_held(r) for r in rows[:limit])
        return Page(items, items[-1].id if len(rows) > limit else None)

    async def counts(self) -> dict[str, int]:
        rows = await self._read(lambda c: c.fetch("SELECT state, count(*) FROM held GROUP BY 1"))
        out = {st.value: 0 for st in State}
        for st, n in rows:
            out[str(st)] = int(n)
        return out

    async def count(
        self,
        state: State | None = None,
        *,
        sender: str | None = None,
        since: datetime | None = None,
    ) -> int:
        cond, args = _where(state, sender, since, None)
        v = await self._read(lambda c: c.fetchval(f"SELECT count(*) FROM held{cond}", *args))
        return int(v)

    async def oldest_held(self) -> datetime | None:
        q = "SELECT min(created) FROM held WHERE state = 'held'"
        v: datetime | None = await self._read(lambda c: c.fetchval(q))
        return v

    async def audit(self, msg_id: str) -> list[AuditEntry]:
        rows = await self._read(
            lambda c: c.fetch(
                "SELECT msg_id, at, from_state, to_state, by, why FROM audit "
                "WHERE msg_id = $1 ORDER BY seq",
                msg_id,
            )
        )
        return [
            AuditEntry(
                r["msg_id"],
                r["at"],
                State(r["from_state"]) if r["from_state"] else None,
                State(r["to_state"]),
                r["by"],
                r["why"],
            )
            for r in rows
        ]

    async def due_held(self, now: datetime, limit: int = 100) -> list[Held]:
        rows = await self._read(
            lambda c: c.fetch(
                f"SELECT {_COLS} FROM held WHERE state = 'held' AND due <= $1 "
                "ORDER BY due LIMIT $2",
                now,
                limit,
            )
        )
        return [_held(r) for r in rows]

    async def claim_deliveries(
        self, now: datetime, lease_until: datetime, owner: str, limit: int = 20
    ) -> list[Held]:
        async def work(c: Conn) -> list[tuple[Held, State]]:
            # SKIP LOCKED: another node claiming at this instant takes other rows, no waiting.
            rows = await c.fetch(
                f"""
                WITH due AS (
                    SELECT id, state AS prev FROM held
                    WHERE (state = 'released' AND next_attempt <= $1)
                       OR (state = 'delivering' AND lease_until <= $1)
                    ORDER BY next_attempt NULLS FIRST
                    LIMIT $4
                    FOR UPDATE SKIP LOCKED
                )
                UPDATE held AS h SET state = 'delivering', lease_until = $2, lease_owner = $3,
                    attempts = h.attempts + 1, updated = $1, last_by = 'scheduler',
                    last_why = CASE WHEN due.prev = 'released' THEN '{WHY_CLAIMED}'
                                    ELSE '{WHY_TAKEN_OVER}' END
                FROM due WHERE h.id = due.id
                RETURNING {", ".join("h." + col.strip() for col in _COLS.split(","))}, due.prev
                """,
                now,
                lease_until,
                owner,
                limit,
            )
            out = [(_held(r), State(r["prev"])) for r in rows]
            if out:
                await c.executemany(
                    "INSERT INTO audit(msg_id, at, from_state, to_state, by, why) "
                    "VALUES ($1, $2, $3, 'delivering', 'scheduler', $4)",
                    [(h.id, now, prev.value, h.last_why) for h, prev in out],
                )
            return out

        claimed = await self._tx(work)
        claimed.sort(key=lambda hp: hp[0].next_attempt or hp[0].created)
        length = lease_until - now
        for h, _ in claimed:
            self._leases[h.id] = (owner, length)
        if claimed:
            self._claimed.set()
        return [h for h, _ in claimed]

    async def recover_leases(self, now: datetime) -> int:
        """Nothing to do on a shared store: a dead node's leases run out by themselves, and at
        start a node cannot tell them from a live node's."""
        return 0

    async def add_notices(self, notices: Sequence[NewNotice]) -> list[int]:
        if not notices:
            return []
        now = min(n.due for n in notices)
        return await self._tx(lambda c: self._insert_notices(c, notices, now))

    async def drop_notices(self, ids: Sequence[int]) -> int:
        if not ids:
            return 0
        r: str = await self._tx(
            lambda c: c.execute(
                "DELETE FROM notice WHERE state = 'pending' AND id = ANY($1::bigint[])", list(ids)
            )
        )
        return int(r.split()[-1])

    @staticmethod
    async def _release_parked(c: Conn, msg_id: str, now: datetime) -> int:
        r: str = await c.execute(
            "UPDATE notice SET state = 'pending', "
            "next_attempt = $1::timestamptz + make_interval(secs => delay) "
            "WHERE msg_id = $2 AND state = 'parked'",
            now,
            msg_id,
        )
        return int(r.split()[-1])

    async def release_parked(self, msg_id: str, now: datetime) -> int:
        return await self._tx(lambda c: self._release_parked(c, msg_id, now))

    async def drop_parked(self, msg_id: str) -> int:
        r: str = await self._tx(
            lambda c: c.execute("DELETE FROM notice WHERE msg_id = $1 AND state = 'parked'", msg_id)
        )
        return int(r.split()[-1])

    async def claim_notices(
        self, now: datetime, lease_until: datetime, limit: int = 20
    ) -> list[PendingNotice]:
        rows = await self._tx(
            lambda c: c.fetch(
                f"""
                WITH due AS (
                    SELECT id FROM notice
                    WHERE state = 'pending' AND next_attempt <= $1
                      AND (lease_until IS NULL OR lease_until <= $1)
                    ORDER BY next_attempt LIMIT $3
                    FOR UPDATE SKIP LOCKED
                )
                UPDATE notice AS n SET lease_until = $2, attempts = n.attempts + 1
                FROM due WHERE n.id = due.id
                RETURNING {", ".join("n." + col.strip() for col in _NOTICE_COLS.split(","))},
                          n.next_attempt AS due_at
                """,
                now,
                lease_until,
                limit,
            )
        )
        rows = sorted(rows, key=lambda r: (r["due_at"], r["id"]))
        for r in rows:
            self._notice_leases[int(r["id"])] = lease_until - now
        if rows:
            self._claimed.set()
        return [_notice(r) for r in rows]

    async def finish_notice(
        self, notice_id: int, *, now: datetime, sent: bool, reply: str, retry_at: datetime | None
    ) -> None:
        if sent:
            q = (
                "UPDATE notice SET state = 'sent', data = '{}'::jsonb, lease_until = NULL, "
                "last_reply = $1 WHERE id = $2"
            )
            args: tuple[Any, ...] = (reply, notice_id)
        elif retry_at is not None:
            q = (
                "UPDATE notice SET lease_until = NULL, next_attempt = $1, last_reply = $2 "
                "WHERE id = $3"
            )
            args = (retry_at, reply, notice_id)
        else:
            q = (
                "UPDATE notice SET state = 'failed', data = '{}'::jsonb, lease_until = NULL, "
                "last_reply = $1 WHERE id = $2"
            )
            args = (reply, notice_id)
        await self._tx(lambda c: c.execute(q, *args))
        self._notice_leases.pop(notice_id, None)

    async def notices_for(self, msg_id: str) -> list[PendingNotice]:
        rows = await self._read(
            lambda c: c.fetch(
                f"SELECT {_NOTICE_COLS} FROM notice WHERE msg_id = $1 ORDER BY id", msg_id
            )
        )
        return [_notice(r) for r in rows]

    # -- web rate limits shared by every node ---------------------------------------------------

    async def rate_hit(self, budget: Budget, client: str) -> bool:
        """Counted under a per-kind advisory lock, so two nodes counting at the same instant
        cannot both take the last unit of a budget. The database's clock (`now()`) decides the
        window: nodes' clocks do not matter. Not worth a WAL flush: synchronous_commit off for
        this transaction (a crash of the database host may forget the last few misses)."""

        async def work(c: Conn) -> bool:
            await c.execute("SET LOCAL synchronous_commit = off")
            await c.execute(
                "SELECT pg_advisory_xact_lock($1, hashtext($2))", _RATE_LOCK, budget.kind
            )
            await c.execute(
                "DELETE FROM web_miss WHERE kind = $1 AND at <= now() - make_interval(secs => $2)",
                budget.kind,
                budget.window,
            )
            mine, everyone = await self._rate_counts(c, budget, client)
            over = budget.over(mine, everyone)
            if not over and budget.records(everyone):
                await c.execute(
                    "INSERT INTO web_miss(kind, client, at) VALUES ($1, $2, now())",
                    budget.kind,
                    client,
                )
            return over

        return await self._tx(work)

    @staticmethod
    async def _rate_counts(c: Conn, budget: Budget, client: str) -> tuple[int, int]:
        r = await c.fetchrow(
            "SELECT count(*) FILTER (WHERE client = $2) AS mine, count(*) AS everyone "
            "FROM web_miss WHERE kind = $1 AND at > now() - make_interval(secs => $3)",
            budget.kind,
            client,
            budget.window,
        )
        assert r is not None
        return int(r["mine"]), int(r["everyone"])

    async def rate_blocked(self, budget: Budget, client: str) -> bool:
        mine, everyone = await self._read(lambda c: self._rate_counts(c, budget, client))
        return budget.over(mine, everyone)
