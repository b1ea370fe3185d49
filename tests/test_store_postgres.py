"""PostgreSQL as the shared store: config and CLI by URL, migrations, SQLite → PostgreSQL copy,
shared delivery history, SKIP LOCKED claims by several schedulers, lease heartbeat."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from pg_support import pg_cluster, pg_url
from test_queue_store import held

from mailguard.config import from_dict
from mailguard.errors import ConfigError
from mailguard.history import DomainHistory
from mailguard.history_pg import PgHistory
from mailguard.lookups import HistoryCache
from mailguard.queue.backends import make_store
from mailguard.queue.postgres import SCHEMA_VERSION, PostgresStore
from mailguard.queue.service import new_token
from mailguard.queue.sqlite import SqliteStore
from mailguard.queue.store import NewNotice, NewToken, State

__all__ = ["pg_cluster", "pg_url"]

T0 = datetime(2025, 4, 1, 9, 0, tzinfo=UTC)
ROOT = Path(__file__).resolve().parent.parent


def mailguard(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mailguard", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )


def test_store_url_in_config_and_path_key() -> None:
    url = "postgresql://mg@db.example/mailguard"
    assert from_dict({"store": {"url": url}}).store.url == url
    cfg = from_dict({"store": {"path": url, "lease": "30s"}})  # the same key as --store
    assert cfg.store.url == url and cfg.store.lease == 30.0
    with pytest.raises(ConfigError):
        from_dict({"store": {"url": "mysql://x"}})
    assert isinstance(make_store("var/x.db"), SqliteStore)
    assert isinstance(make_store(url), PostgresStore)


@pytest.mark.asyncio
async def test_migrations_are_versioned_and_applied_once(pg_url: str) -> None:
    async with PostgresStore(pg_url) as s, PostgresStore(pg_url) as s2:
        assert await s.schema_version() == SCHEMA_VERSION
        assert await s2.migrate() == []  # a second node starting: nothing to do
    async with PostgresStore(pg_url, migrate=False) as s3:
        assert await s3.schema_version() == SCHEMA_VERSION


def test_store_migrate_cli(pg_url: str) -> None:
    out = mailguard("store", "migrate", "--store", pg_url)
    assert out.returncode == 0, out.stderr
    assert f"schema version {SCHEMA_VERSION}" in out.stdout
    # the queue CLI works against the shared store from any host
    out = mailguard("queue", "list", "--store", pg_url, "--json")
    assert out.returncode == 0, out.stderr
    assert '"items": []' in out.stdout


@pytest.mark.asyncio
async def test_copy_sqlite_to_postgres_verifies_counts_and_bytes(
    tmp_path: Path, pg_url: str
) -> None:
    db = tmp_path / "old.db"
    ids = []
    async with SqliteStore(db) as s:
        for i in range(5):
            h = held(T0 + timedelta(seconds=i))
            _, th = new_token()
            n = NewNotice("held", (h.mail_from,), {"見": "日本語"}, h.created, msg_id=h.id)
            await s.put(h, bytes(range(256)) * (i + 1), [NewToken(th, "sender", "t", h.due)], [n])
            ids.append(h.id)
        await s.move(ids[0], State.CANCELLED, now=T0, by="t", why="")
    with DomainHistory(db) as hist:
        hist.record(["partner.co.jp"], T0)
    out = mailguard("store", "copy", str(db), pg_url, "--json")
    assert out.returncode == 0, out.stderr
    assert '"verified": true' in out.stdout
    async with PostgresStore(pg_url) as pg:
        assert await pg.count() == 5 and await pg.count(State.HELD) == 4
        assert await pg.raw(ids[3]) == bytes(range(256)) * 4
        assert await pg.raw(ids[0]) is None
        assert [a.to_state for a in await pg.audit(ids[0])] == [State.HELD, State.CANCELLED]
        (n,) = await pg.notices_for(ids[1])
        assert n.data["見"] == "日本語"
        assert (await PgHistory(pg).acounts(["partner.co.jp"]))["partner.co.jp"] == 1
        more = await pg.add_notices([NewNotice("held", ("a@b",), {}, T0)])
        assert more[0] > n.id  # sequences continue after the copied ids
    again = mailguard("store", "copy", str(db), pg_url)
    assert again.returncode == 1 and "not empty" in again.stderr


@pytest.mark.asyncio
async def test_history_is_shared_between_nodes(pg_url: str) -> None:
    async with PostgresStore(pg_url) as a, PostgresStore(pg_url) as b:
        node1 = HistoryCache(PgHistory(a), flush_every=0.01)
        node2 = HistoryCache(PgHistory(b))
        assert (await node2.snapshot(["sales.partner.co.jp"]))["sales.partner.co.jp"] == 0
        node1.learn(["sales.partner.co.jp"])
        await node1.flush()
        snap = await node2.snapshot(["sales.partner.co.jp", "partner.co.jp"])
        assert snap["sales.partner.co.jp"] == 1 and snap["partner.co.jp"] == 1


@pytest.mark.asyncio
async def test_two_schedulers_claim_disjoint_work(pg_url: str) -> None:
    async with PostgresStore(pg_url) as a, PostgresStore(pg_url) as b:
        for i in range(40):
            h = held(T0 + timedelta(milliseconds=i))
            await a.put(h, b"x")
            await a.move(h.id, State.RELEASED, now=T0, by="t", why="")
        lease = T0 + timedelta(seconds=60)
        got = await asyncio.gather(
            *(s.claim_deliveries(T0, lease, f"n{i}", limit=7) for i in range(6) for s in (a, b))
        )
        ids = [h.id for batch in got for h in batch]
        assert len(ids) == 40 and len(set(ids)) == 40  # every message once, none twice


@pytest.mark.asyncio
async def test_heartbeat_keeps_a_live_lease_and_a_dead_one_runs_out(pg_url: str) -> None:
    async with PostgresStore(pg_url) as live, PostgresStore(pg_url) as other:
        h1, h2 = held(), held(T0 + timedelta(seconds=1))
        for h in (h1, h2):
            await live.put(h, b"x")
            await live.move(h.id, State.RELEASED, now=T0, by="t", why="")
        now = datetime.now(UTC)
        claimed = await live.claim_deliveries(now, now + timedelta(seconds=2), "live")
        assert {c.id for c in claimed} == {h1.id, h2.id}
        live._leases.pop(h2.id)  # as if the node delivering h2 had died: nobody renews it
        await asyncio.sleep(3)
        later = datetime.now(UTC)
        (taken,) = await other.claim_deliveries(later, later + timedelta(minutes=1), "other")
        assert taken.id == h2.id and taken.attempts == 2  # the dead one's, not the live one's
        assert (await other.get(h1.id)).lease_until > later  # type: ignore[union-attr]


@pytest.mark.asyncio
async def test_token_redeemed_once_across_nodes(pg_url: str) -> None:
    async with PostgresStore(pg_url) as a, PostgresStore(pg_url) as b:
        h = held()
        _, th = new_token()
        await a.put(h, b"x", [NewToken(th, "sender", "t", h.due)])
        results = await asyncio.gather(
            a.redeem(th, State.RELEASED, now=T0, action="send", by="s", why=""),
            b.redeem(th, State.CANCELLED, now=T0, action="cancel", by="s", why=""),
            return_exceptions=True,
        )
        assert sum(not isinstance(r, Exception) for r in results) == 1
