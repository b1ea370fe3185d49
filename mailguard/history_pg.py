"""Delivery history in PostgreSQL: the same counts as DomainHistory, shared by every node.

With several guards on one PostgreSQL store, a domain one node delivered to is no longer
"first-time" on the others: every node reads and counts in `domain_history` of the shared store,
through the store's own pool (no second set of connections). The table comes with the store's
migrations (mailguard/queue/postgres.py).

Only the async side is offered (HistoryBackend): the server and `mailguard check` use it through
lookups.HistoryCache; the imports (`mailguard history import`) stay with the SQLite class.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

from mailguard.checks.domains import FREQUENT_MIN
from mailguard.history import FrequentCache, lookup_keys, tally
from mailguard.queue.postgres import Conn, PostgresStore


class PgHistory:
    """HistoryBackend on the shared PostgreSQL store."""

    def __init__(
        self,
        store: PostgresStore,
        *,
        frequent_min: int = FREQUENT_MIN,
        frequent_refresh: float = 300.0,
        timeout: float = 2.0,  # per lookup: a database that does not answer degrades it soon
    ) -> None:
        self.store = store
        self.timeout = timeout
        self.frequent_min = frequent_min
        self._frequent = FrequentCache(frequent_refresh)

    async def acounts(self, domains: Iterable[str]) -> dict[str, int]:
        return await self.store.within(self._acounts(domains), self.timeout)

    async def _acounts(self, domains: Iterable[str]) -> dict[str, int]:
        keys = lookup_keys(domains)
        out = dict.fromkeys(keys, 0)
        if not keys:
            return out
        async with self.store._conn() as c:
            rows = await c.fetch(
                "SELECT domain, count FROM domain_history WHERE domain = ANY($1::text[])",
                keys,
            )
        for r in rows:
            out[r["domain"]] = int(r["count"])
        return out

    async def known(self, min_count: int = 1) -> set[str]:
        return await self.store.within(self._known(min_count), self.timeout * 5)

    async def _known(self, min_count: int) -> set[str]:
        async with self.store._conn() as c:
            rows = await c.fetch(
                "SELECT domain FROM domain_history WHERE count >= $1",
                min_count,
            )
        return {r["domain"] for r in rows}

    async def rows(self, min_count: int = 1) -> list[tuple[str, int, str, str]]:
        async with self.store._conn() as c:
            rows = await c.fetch(
                "SELECT domain, count, first_seen, last_seen FROM domain_history "
                "WHERE count >= $1 ORDER BY count DESC, domain",
                min_count,
            )
        return [
            (
                r["domain"],
                int(r["count"]),
                r["first_seen"].isoformat(timespec="seconds"),
                r["last_seen"].isoformat(timespec="seconds"),
            )
            for r in rows
        ]

    async def afrequent(self, now: float | None = None) -> frozenset[str]:
        cached = self._frequent.cached(now)
        if cached is not None:
            return cached
        return self._frequent.put(frozenset(await self.known(self.frequent_min)), now)

    def frequent_cached(self, now: float | None = None) -> frozenset[str] | None:
        return self._frequent.cached(now)

    def add_frequent(self, domains: Iterable[str]) -> None:
        self._frequent.add(domains)

    async def arecord_and_count(self, batch: list[tuple[set[str], datetime]]) -> dict[str, int]:
        """Count the batch (one row per domain per delivery) and return the new counts."""
        per = tally(batch)
        if not per:
            return {}

        async def work(c: Conn) -> dict[str, int]:
            rows = await c.fetch(
                "INSERT INTO domain_history AS h(domain, count, first_seen, last_seen) "
                "SELECT * FROM unnest($1::text[], $2::bigint[], $3::timestamptz[], "
                "$4::timestamptz[]) ORDER BY 1 "
                "ON CONFLICT(domain) DO UPDATE SET count = h.count + excluded.count, "
                "first_seen = least(h.first_seen, excluded.first_seen), "
                "last_seen = greatest(h.last_seen, excluded.last_seen) "
                "RETURNING domain, count",
                list(per),
                [v[0] for v in per.values()],
                [v[1] for v in per.values()],
                [v[2] for v in per.values()],
            )
            return {r["domain"]: int(r["count"]) for r in rows}

        return await self.store._tx(work)

    async def aclose(self) -> None:
        """The pool belongs to the store; nothing of ours to close."""


__all__ = ["PgHistory"]
