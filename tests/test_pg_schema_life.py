"""Schema life on a shared PostgreSQL, as docs/deploy-multi-node.md ("Upgrade") describes it:
nodes starting at the same moment migrate once (advisory lock), and a database whose schema is
newer than this MailGuard is not used — `store migrate` fails, and `mailguard serve` keeps
serving but answers 451 for mail it would have to keep (it retries the store every 5 s)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest
from e2e_support import Guard, policy, wait_for
from pg_support import PgCluster, pg_cluster, pg_url

from mailguard.errors import StoreError
from mailguard.queue.postgres import SCHEMA_VERSION, PostgresStore

__all__ = ["pg_cluster", "pg_url"]

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.asyncio
async def test_nodes_starting_together_migrate_once(pg_url: str, pg_cluster: PgCluster) -> None:
    stores = [PostgresStore(pg_url, heartbeat=False) for _ in range(4)]
    try:
        await asyncio.gather(*(s.open() for s in stores))  # every one runs migrate() at once
        for s in stores:
            assert await s.schema_version() == SCHEMA_VERSION
    finally:
        await asyncio.gather(*(s.close() for s in stores))
    db = pg_url.rsplit("/", 1)[1]
    assert pg_cluster.psql(db, "SELECT count(*) FROM mailguard_schema") == str(SCHEMA_VERSION)


def _from_the_future(pg_url: str, pg_cluster: PgCluster) -> None:
    async def migrate() -> None:
        async with PostgresStore(pg_url, heartbeat=False):
            pass

    asyncio.run(migrate())
    db = pg_url.rsplit("/", 1)[1]
    pg_cluster.psql(
        db, f"INSERT INTO mailguard_schema(version, name) VALUES ({SCHEMA_VERSION + 1}, 'future')"
    )


def test_newer_schema_is_refused_by_migrate(pg_url: str, pg_cluster: PgCluster) -> None:
    _from_the_future(pg_url, pg_cluster)

    async def open_it() -> None:
        async with PostgresStore(pg_url, heartbeat=False):
            pass

    with pytest.raises(StoreError, match="newer than this MailGuard"):
        asyncio.run(open_it())
    out = subprocess.run(
        [sys.executable, "-m", "mailguard", "store", "migrate", "--store", pg_url],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert out.returncode != 0
    assert "newer than this MailGuard" in out.stderr + out.stdout


HOLD = """
[[rule]]
name = "hold-external"
when = "recipient.external >= 1"
action = "hold"
hold_for = "1h"
"""


def test_serve_on_a_newer_schema_keeps_nothing(
    tmp_path: Path, pg_url: str, pg_cluster: PgCluster
) -> None:
    _from_the_future(pg_url, pg_cluster)
    with Guard(tmp_path, policy_text=policy(HOLD), config_extra={"store": {"url": pg_url}}) as g:
        sent = g.send(to=["P <p@partner.example>"], subject="old guard, new schema")
        assert sent.code == 451, sent.text  # never 250 without a commit
        wait_for(lambda: "newer than this MailGuard" in g.log_text(), 10, what="the log line")
    db = pg_url.rsplit("/", 1)[1]
    assert pg_cluster.psql(db, "SELECT count(*) FROM held") == "0"
