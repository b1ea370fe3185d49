"""The HeldStore contract on real backends — SqliteStore on real files and PostgresStore on a
private PostgreSQL cluster: durability settings, transitions, audit, tokens, leases, paging."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from pg_support import PgCluster, pg_cluster, require_pg

from mailguard.errors import StoreError
from mailguard.queue.postgres import PostgresStore
from mailguard.queue.service import hash_token, new_token
from mailguard.queue.sqlite import SqliteStore
from mailguard.queue.store import (
    ALLOWED,
    TERMINAL,
    Budget,
    Held,
    NewNotice,
    NewToken,
    PutRequest,
    State,
    TokenError,
    TransitionError,
    new_id,
)

__all__ = ["pg_cluster"]  # the session fixture, imported for pytest

T0 = datetime(2025, 4, 1, 9, 0, tzinfo=UTC)


class Backend:
    """One place a store lives; `store()` opens a new store object on it (a restart)."""

    def __init__(self, kind: str, tmp_path: Path, cluster: PgCluster | None) -> None:
        self.kind = kind
        self.path = tmp_path / "q.db"
        self.cluster = cluster
        self.url = cluster.new_database() if cluster is not None else ""

    def store(self) -> Any:
        if self.kind == "sqlite":
            return SqliteStore(self.path)
        return PostgresStore(self.url)

    def sql(self, query: str) -> list[tuple[Any, ...]]:
        """Rows read by an outside client (another process), as text."""
        if self.kind == "sqlite":
            c = sqlite3.connect(self.path)
            try:
                return [tuple(str(v) for v in r) for r in c.execute(query).fetchall()]
            finally:
                c.close()
        assert self.cluster is not None
        out = self.cluster.psql(self.url.rsplit("/", 1)[1], query)
        return [tuple(line.split("|")) for line in out.splitlines() if line]


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    cluster = None
    if request.param == "postgres":
        require_pg()
        cluster = request.getfixturevalue("pg_cluster")
    yield Backend(request.param, tmp_path, cluster)


def held(now: datetime = T0, *, due: timedelta = timedelta(minutes=5), **kw: object) -> Held:
    base: dict[str, object] = dict(
        id=new_id(now),
        state=State.HELD,
        gate="hold",
        mail_from="taro@example.co.jp",
        rcpt_tos=("a@partner.co.jp",),
        created=now,
        due=now + due,
        summary={"subject": "月次報告"},
        decision={"action": "hold", "rules": ["cool-down"]},
    )
    base.update(kw)
    return Held(**base)  # type: ignore[arg-type]


@pytest.mark.asyncio
async def test_put_is_durable_and_survives_reopen(backend: Backend) -> None:
    h = held()
    async with backend.store() as s:
        await s.put(h, b"raw bytes\r\n")
    # A different connection (another process, after a restart) sees the committed row.
    if backend.kind == "sqlite":
        assert backend.sql("PRAGMA journal_mode") == [("wal",)]
    assert backend.sql(f"SELECT state FROM held WHERE id = '{h.id}'") == [("held",)]
    async with backend.store() as s2:
        got = await s2.get(h.id)
        assert got is not None and got.state is State.HELD
        assert got.summary["subject"] == "月次報告"
        assert await s2.raw(h.id) == b"raw bytes\r\n"
        (entry,) = await s2.audit(h.id)
        assert (entry.from_state, entry.to_state, entry.by) == (None, State.HELD, "smtp")


@pytest.mark.asyncio
async def test_commits_wait_for_the_disk(backend: Backend) -> None:
    async with backend.store() as s:
        if backend.kind == "sqlite":
            sync = await s._run(lambda: s._c.execute("PRAGMA synchronous").fetchone()[0])
            assert sync == 2  # FULL
        else:
            async with s.pool.acquire() as c:
                assert await c.fetchval("SHOW synchronous_commit") == "on"


@pytest.mark.asyncio
async def test_transitions_follow_allowed_and_are_audited(backend: Backend) -> None:
    async with backend.store() as s:
        h = held()
        await s.put(h, b"x")
        with pytest.raises(TransitionError):
            await s.move(h.id, State.DELIVERED, now=T0, by="t", why="skip")
        await s.move(h.id, State.RELEASED, now=T0, by="cli:root", why="looks fine")
        with pytest.raises(TransitionError):  # expect guards a race with another actor
            await s.move(
                h.id, State.CANCELLED, now=T0, by="t", why="", expect=frozenset({State.HELD})
            )
        await s.move(h.id, State.CANCELLED, now=T0, by="api", why="changed my mind")
        assert await s.raw(h.id) is None  # content dropped at a terminal state
        with pytest.raises(TransitionError):
            await s.move(h.id, State.RELEASED, now=T0, by="t", why="")
        with pytest.raises(TransitionError) as e:
            await s.move("NOSUCHID", State.RELEASED, now=T0, by="t", why="")
        assert e.value.current is None
        trail = [(a.from_state, a.to_state, a.by, a.why) for a in await s.audit(h.id)]
    assert trail == [
        (None, State.HELD, "smtp", ""),
        (State.HELD, State.RELEASED, "cli:root", "looks fine"),
        (State.RELEASED, State.CANCELLED, "api", "changed my mind"),
    ]
    assert all(not ALLOWED[t] for t in TERMINAL)


@pytest.mark.asyncio
async def test_tokens_stored_as_hashes_single_use_and_expiring(backend: Backend) -> None:
    async with backend.store() as s:
        h1, h2 = held(), held(T0 + timedelta(seconds=1))
        t1, hash1 = new_token()
        t2, hash2 = new_token()
        assert len(t1) >= 22 and hash1 == hash_token(t1)  # ≥ 128 bits of token_urlsafe
        await s.put(h1, b"1", [NewToken(hash1, "sender", "taro@example.co.jp", h1.due)])
        await s.put(h2, b"2", [NewToken(hash2, "sender", "taro@example.co.jp", h2.due)])
        with pytest.raises(TokenError) as e:
            await s.redeem(
                hash_token("nope" * 8), State.RELEASED, now=T0, action="send", by="sender", why=""
            )
        assert e.value.reason == "unknown"
        out = await s.redeem(hash1, State.RELEASED, now=T0, action="send", by="sender", why="ok")
        assert out.state is State.RELEASED
        with pytest.raises(TokenError) as e:
            await s.redeem(hash1, State.CANCELLED, now=T0, action="cancel", by="sender", why="")
        assert e.value.reason == "used"
        with pytest.raises(TokenError) as e:
            await s.redeem(hash2, State.RELEASED, now=h2.due, action="send", by="s", why="")
        assert e.value.reason == "expired"
        assert (await s.get(h2.id)).state is State.HELD  # type: ignore[union-attr]
    if backend.kind == "sqlite":
        db = backend.path
        wal = db.with_suffix(".db-wal")
        raw_db = db.read_bytes() + (wal.read_bytes() if wal.exists() else b"")
    else:
        raw_db = repr(backend.sql("SELECT t::text FROM token t")).encode()
        assert len(backend.sql("SELECT 1 FROM token WHERE length(hash) = 32")) == 2
    assert t1.encode() not in raw_db and t2.encode() not in raw_db


@pytest.mark.asyncio
async def test_claim_lease_and_crash_recovery(backend: Backend) -> None:
    async with backend.store() as s:
        h = held()
        await s.put(h, b"x")
        await s.move(h.id, State.RELEASED, now=T0, by="t", why="")
        (c,) = await s.claim_deliveries(T0, T0 + timedelta(minutes=10), "w1")
        assert c.state is State.DELIVERING and c.attempts == 1
        # While the lease runs nobody else may take it.
        assert await s.claim_deliveries(T0 + timedelta(minutes=5), T0, "w2") == []
    # "Crash": reopen; after the lease runs out the message comes back exactly once.
    async with backend.store() as s:
        later = T0 + timedelta(minutes=11)
        (c2,) = await s.claim_deliveries(later, later + timedelta(minutes=10), "w2")
        assert c2.id == h.id and c2.attempts == 2
        assert await s.claim_deliveries(later, later, "w3") == []
        if backend.kind == "postgres":
            # shared store: no node may cut another's lease short at start
            assert await s.recover_leases(later) == 0
            later += timedelta(minutes=10)
        else:
            assert await s.recover_leases(later) == 1
        (c3,) = await s.claim_deliveries(later, later + timedelta(minutes=10), "w3")
        assert c3.attempts == 3
        whys = [a.why for a in await s.audit(h.id)]
        assert whys.count("lease ran out (crash?)") == 2


@pytest.mark.asyncio
async def test_notices_claim_scrub_and_retry(backend: Backend) -> None:
    async with backend.store() as s:
        n = NewNotice("zip-password", ("b@partner.co.jp",), {"password": "S3cret!"}, T0)
        later = NewNotice(
            "zip-password", ("b@partner.co.jp",), {"password": "x"}, T0 + timedelta(minutes=5)
        )
        await s.add_notices([n, later])
        (p,) = await s.claim_notices(T0, T0 + timedelta(minutes=1))
        assert p.data["password"] == "S3cret!"
        assert await s.claim_notices(T0, T0) == []  # leased
        await s.finish_notice(
            p.id, now=T0, sent=False, reply="451 busy", retry_at=T0 + timedelta(seconds=30)
        )
        (p2,) = await s.claim_notices(T0 + timedelta(seconds=30), T0 + timedelta(minutes=1))
        assert p2.id == p.id and p2.attempts == 2
        await s.finish_notice(p.id, now=T0, sent=True, reply="250 ok", retry_at=None)
    rows = backend.sql("SELECT data, state FROM notice")
    assert ("{}", "sent") in rows  # password gone from disk


@pytest.mark.asyncio
async def test_list_filters_and_keyset_pages(backend: Backend) -> None:
    async with backend.store() as s:
        ids = []
        for i in range(7):
            h = held(
                T0 + timedelta(seconds=i),
                mail_from="hanako@example.co.jp" if i % 2 else "taro@example.co.jp",
            )
            ids.append(h.id)
            await s.put(h, b"x")
        await s.move(ids[0], State.CANCELLED, now=T0, by="t", why="")
        p1 = await s.list_messages(limit=3)
        p2 = await s.list_messages(limit=3, before=p1.next)
        p3 = await s.list_messages(limit=3, before=p2.next)
        seen = [h.id for p in (p1, p2, p3) for h in p.items]
        assert seen == ids[::-1] and p3.next is None
        assert [h.id for h in (await s.list_messages(state=State.CANCELLED)).items] == [ids[0]]
        assert len((await s.list_messages(sender="hanako@example.co.jp")).items) == 3
        assert len((await s.list_messages(since=T0 + timedelta(seconds=5))).items) == 2
        assert await s.count(State.HELD) == 6


@pytest.mark.asyncio
async def test_put_many_is_one_atomic_batch_of_puts(backend: Backend) -> None:
    async with backend.store() as s:
        items = [held(T0 + timedelta(seconds=i)) for i in range(3)]
        batch = [
            PutRequest(
                h,
                b"m%d" % i,
                [NewToken(hash_token(f"tok-{i}-" + "x" * 20), "sender", h.mail_from, h.due)],
                [NewNotice("held", (h.mail_from,), {"n": i}, T0, msg_id=h.id)],
                why="batch",
            )
            for i, h in enumerate(items)
        ]
        await s.put_many(batch)
        assert await s.count(State.HELD) == 3
        assert await s.raw(items[2].id) == b"m2"
        assert (await s.audit(items[1].id))[0].why == "batch"
        assert len(await s.notices_for(items[0].id)) == 1
        assert (await s.token(hash_token("tok-1-" + "x" * 20))) is not None
        dup = [PutRequest(held(T0 + timedelta(minutes=1)), b"new"), PutRequest(items[0], b"x")]
        with pytest.raises(StoreError):
            await s.put_many(dup)  # the second collides: the first is not kept either
        assert await s.count() == 3
        assert await s.count(sender="taro@example.co.jp", since=T0 + timedelta(seconds=1)) == 2


@pytest.mark.asyncio
async def test_web_rate_limits_are_shared_bounded_and_expire(backend: Backend) -> None:
    """Misses are counted in the store: a second store object on the same file/database (another
    process, another node) spends the same per-client and global budgets; old windows are
    pruned, and nothing is recorded past a budget (rows stay bounded)."""
    misses = Budget("token", 3, 600.0, global_limit=5)
    async with backend.store() as s1, backend.store() as s2:
        assert [await s1.rate_hit(misses, "10.0.0.1") for _ in range(2)] == [False, False]
        assert await s2.rate_hit(misses, "10.0.0.1") is False  # the 3rd, on the "other node"
        assert await s1.rate_blocked(misses, "10.0.0.1") is True
        assert await s2.rate_hit(misses, "10.0.0.1") is True  # over: 429, not counted
        assert await s2.rate_blocked(misses, "10.0.0.2") is False
        assert await s1.rate_hit(misses, "10.0.0.2") is False
        assert await s2.rate_hit(misses, "10.0.0.3") is False  # 5 in all: the global budget
        assert await s1.rate_hit(misses, "10.0.0.4") is True
        assert await s1.rate_blocked(misses, "10.0.0.9") is True
        # another kind (failed admin logins) has budgets of its own
        assert await s1.rate_blocked(Budget("login", 3, 600.0, 5), "10.0.0.1") is False
        for _ in range(20):
            await s1.rate_hit(misses, "10.0.0.5")
        assert backend.sql("SELECT count(*) FROM web_miss WHERE kind = 'token'") == [("5",)]
        # a short window runs out, and the old rows are pruned by the next miss
        brief = Budget("brief", 1, 0.3)
        assert await s1.rate_hit(brief, "10.0.0.1") is False
        assert await s2.rate_hit(brief, "10.0.0.1") is True
        await asyncio.sleep(0.5)
        assert await s2.rate_blocked(brief, "10.0.0.1") is False
        assert await s2.rate_hit(brief, "10.0.0.6") is False
        assert backend.sql("SELECT client FROM web_miss WHERE kind = 'brief'") == [("10.0.0.6",)]


@pytest.mark.asyncio
async def test_closed_or_unusable_store_raises_store_error(tmp_path: Path) -> None:
    s = SqliteStore(tmp_path / "q.db")
    with pytest.raises(StoreError):
        await s.put(held(), b"x")  # not open
    (tmp_path / "dir.db").mkdir()
    with pytest.raises(StoreError):
        await SqliteStore(tmp_path / "dir.db").open()
    assert await s.ping() is False


@pytest.mark.asyncio
async def test_unreachable_postgres_raises_store_error() -> None:
    from pg_support import free_port

    s = PostgresStore(f"postgresql://nobody@127.0.0.1:{free_port()}/none", timeout=2)
    with pytest.raises(StoreError) as e:
        await s.open()
    assert "postgresql://" in str(e.value)
    with pytest.raises(StoreError):
        await s.put(held(), b"x")  # not open
    assert await s.ping() is False
