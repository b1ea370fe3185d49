"""A guard on PostgreSQL stopped with SIGTERM writes the delivery history it still has in memory
before it closes the store (found by bench/store.sh: the history writer ran after the pool was
closed and the batch was lost with "store is not open")."""

from __future__ import annotations

from pathlib import Path

from e2e_support import Guard, policy
from pg_support import PgCluster, pg_cluster, pg_url

__all__ = ["pg_cluster", "pg_url"]


def test_history_flushed_before_the_store_closes(
    tmp_path: Path, pg_url: str, pg_cluster: PgCluster
) -> None:
    db = pg_url.rsplit("/", 1)[1]
    with Guard(tmp_path, policy_text=policy(""), config_extra={"store": {"url": pg_url}}) as g:
        sent = g.send(to=["P <p@partner.example>"], subject="history at shutdown")
        assert sent.relayed, sent.text
        # leave at once: the history writer batches for a second, so this one is still pending
    log = g.log_text()
    assert "could not record" not in log, log
    got = pg_cluster.psql(db, "SELECT count FROM domain_history WHERE domain = 'partner.example'")
    assert got == "1", (got, log[-2000:])
