"""Known gap (issue 14 item 4, found while writing docs/deploy-multi-node.md): when the
"delivered" commit of a claimed delivery fails because PostgreSQL went away, the store keeps the
lease in the list its heartbeat renews. Once the database is back the lease is renewed for as long
as the process lives, so no node delivers the message again until that guard restarts. Expected:
the lease is given up (or runs out) and another node can claim the delivery after store.lease.
strict xfail: this test starts failing when the gap is fixed — then drop the marker."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest
from pg_support import PgCluster, require_pg
from test_queue_store import held

from mailguard.errors import StoreError
from mailguard.queue.postgres import PostgresStore
from mailguard.queue.store import State

LEASE = timedelta(seconds=3)


@pytest.mark.xfail(
    strict=True, raises=AssertionError, reason="the lease of a failed final commit is renewed"
)
@pytest.mark.asyncio
async def test_failed_delivered_commit_lets_another_node_take_over() -> None:
    # a cluster of its own: this test stops and restarts the server
    pg_cluster = PgCluster(require_pg()).start()
    try:
        await _scenario(pg_cluster, pg_cluster.new_database())
    finally:
        pg_cluster.stop()


async def _scenario(pg_cluster: PgCluster, pg_url: str) -> None:
    now = datetime.now(UTC)
    h = held(now - timedelta(minutes=10), due=timedelta(0))
    s = PostgresStore(pg_url)
    await s.open()
    try:
        await s.put(h, b"x\r\n")
        await s.move(h.id, State.RELEASED, now=now, by="t", why="t")
        got = await s.claim_deliveries(now, now + LEASE, "node-1", limit=5)
        assert [g.id for g in got] == [h.id]
        pg_cluster.server_stop("immediate")  # the upstream said 250, then the database is gone
        try:
            with pytest.raises(StoreError):
                await s.move(h.id, State.DELIVERED, now=now, by="scheduler", why="accepted")
        finally:
            pg_cluster.server_start()
            pg_cluster.wait_ready()
        await asyncio.sleep(3 * LEASE.total_seconds())
        t = datetime.now(UTC)
        async with PostgresStore(pg_url) as other:
            again = await other.claim_deliveries(t, t + LEASE, "node-2", limit=5)
        assert [g.id for g in again] == [h.id], "still leased by node 1 after 3 leases"
    finally:
        await s.close()
