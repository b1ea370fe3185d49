"""What the checks need from outside the message: delivery history and DNS verdicts.

One module for both the server and `mailguard check`, so a dry run looks up exactly what the
server would. The history cache never remembers "never sent there": a domain that a delivery
just taught is seen by the very next message (a zero is always read from the store).

The history store may be down (a shared PostgreSQL store restarting, say). Mail must not stop
for that: a read that fails makes the lookup *unavailable* (`Context.history_unavailable`, the
finding `domain.history_unavailable`, which the policy names like any other) instead of an
error. After a failure messages do not ask the store again (a database that does not answer
would cost every message a timeout) until a background retry (every 1–5 s) finds it answering,
or `HISTORY_RETRY` seconds have passed. Counts learned meanwhile are kept as
per-domain deltas (at most `MAX_BACKLOG_DOMAINS` domains; beyond that new domains are dropped
and logged) and written when the store answers again; a background retry finds out by itself.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Protocol

from mailguard.checks.context import DnsStatus, HistorySnapshot, Org
from mailguard.checks.domains import recipient_addresses
from mailguard.history import DomainHistory
from mailguard.message.addresses import parse_envelope
from mailguard.message.types import Address

if TYPE_CHECKING:
    from mailguard.dns import DomainResolver
    from mailguard.message import MessageView

log = logging.getLogger("mailguard.lookups")

HISTORY_RETRY = 30.0  # seconds: after a failed read, "unavailable" without asking (unless the
# background retry, every 1–5 s, finds the store answering sooner)
RETRY_MAX = 5.0  # seconds: the longest wait between two retries of the store
MAX_BACKLOG_DOMAINS = 20_000  # distinct domains whose learned deltas wait for the store


def lookup_domains(view: MessageView) -> list[str]:
    """Every recipient domain a message names (envelope, To, Cc, Bcc): A-labels, no literals."""
    return list(
        dict.fromkeys(
            a.domain for a in recipient_addresses(view) if a.domain and not a.domain.startswith("[")
        )
    )


def delivery_domains(rcpt_tos: Iterable[str]) -> tuple[str, ...]:
    """The domains a delivery to these envelope recipients teaches the history."""
    return domains_of(parse_envelope(rcpt_tos))


def domains_of(addrs: Iterable[Address]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(a.domain for a in addrs if a.domain and a.domain[0] != "["))


class HistoryBackend(Protocol):
    """Where the delivery history lives: DomainHistory (SQLite file) or PgHistory (the shared
    PostgreSQL store). Reads and writes are async; the frequent set is cached by the backend."""

    frequent_min: int

    async def acounts(self, domains: Iterable[str]) -> dict[str, int]: ...

    async def afrequent(self) -> frozenset[str]: ...

    def frequent_cached(self, now: float | None = None) -> frozenset[str] | None: ...

    def add_frequent(self, domains: Iterable[str]) -> None: ...

    async def arecord_and_count(self, batch: list[tuple[set[str], datetime]]) -> dict[str, int]: ...

    async def aclose(self) -> None: ...


class HistoryCache:
    """Delivery history as the checks see it, cheap per message.

    Counts read from the store are cached a minute (zeros are not: "first-time" is always
    read fresh); a delivery counts at once — as a pending delta until its batch reaches the
    store (every `flush_every` seconds, so other processes sharing the file see it within that
    time), then as the store's new count. A domain a delivery makes frequent joins the
    look-alike set at that flush, not at the next periodic refresh.
    """

    def __init__(self, history: HistoryBackend, *, ttl: float = 60.0, flush_every: float = 1.0):
        self.history = history
        self.ttl = ttl
        self.flush_every = flush_every
        self._counts: dict[str, tuple[int, float]] = {}  # the store's count, when read
        self._unflushed: Counter[str] = Counter()  # learned, not yet in the store
        self._expanded: dict[str, tuple[str, ...]] = {}  # domain → itself + registrable
        self._pending: list[tuple[set[str], datetime]] = []
        # deltas whose write failed: domain → (count, first, last), written at the next flush
        self._backlog: dict[str, tuple[int, datetime, datetime]] = {}
        self.dropped = 0  # learned deltas given up (backlog full)
        self._task: asyncio.Task[None] | None = None
        self._down_until = 0.0  # monotonic: until then reads answer "unavailable" at once
        self._read_ok = True
        self._write_ok = True
        self._retry: asyncio.Task[None] | None = None
        self._closing = False

    @property
    def available(self) -> bool:
        """The last read and the last write of the history store succeeded."""
        return self._read_ok and self._write_ok

    @property
    def backlog(self) -> int:
        """Domains with learned counts waiting for the store."""
        return len(self._backlog)

    async def try_snapshot(self, domains: Iterable[str]) -> HistorySnapshot | None:
        """The snapshot, or None when the history store cannot be read now (it is retried in
        the background; see the module's docstring)."""
        if not self._read_ok and time.monotonic() < self._down_until:
            return None
        try:
            snap = await self.snapshot(domains)
        except Exception as e:  # StoreError, or anything a driver raises: degrade, never 451
            self._failed("read", e)
            return None
        self._read_ok = True
        return snap

    def _failed(self, what: str, e: BaseException) -> None:
        was = self.available
        if what == "read":
            self._read_ok = False
        else:
            self._write_ok = False
        self._down_until = time.monotonic() + HISTORY_RETRY
        if was:
            log.error("history: %s failed, degrading until the store answers: %s", what, e)
        if not self._closing and (self._retry is None or self._retry.done()):
            self._retry = asyncio.ensure_future(self._retry_loop())

    async def _retry_loop(self) -> None:
        """Until the store answers: write the backlog (or probe with a read), backing off."""
        wait = min(self.flush_every, RETRY_MAX)
        while not self.available and not self._closing:
            await asyncio.sleep(wait)
            wait = min(wait * 2, RETRY_MAX)
            try:
                await self.history.acounts(("invalid",))  # a cheap read: the store answers
            except Exception:
                continue
            self._read_ok = True
            if self._backlog or self._pending:
                await self.flush()  # sets _write_ok (and on failure schedules nothing new)
            else:
                self._write_ok = True  # nothing left to write
            if self.available:
                log.warning("history: store available again")

    async def snapshot(self, domains: Iterable[str]) -> HistorySnapshot:
        now = time.monotonic()
        known: dict[str, int] = {}
        missing = []
        for d in domains:
            hit = self._counts.get(d)
            if hit is not None and now - hit[1] < self.ttl:
                known[d] = hit[0]
            else:
                missing.append(d)
        if missing:
            fresh = await self.history.acounts(missing)
            now = time.monotonic()
            for d, n in fresh.items():
                known.setdefault(d, n)
                if n > 0:
                    self._counts[d] = (n, now)
        if self._unflushed:
            for d in known:
                known[d] += self._unflushed.get(d, 0)
        frequent = self.history.frequent_cached(now)  # no thread hop per message …
        if frequent is None:
            frequent = await self.history.afrequent()  # … SQL every few minutes
        return HistorySnapshot(known, frequent)

    def learn(self, domains: Iterable[str]) -> None:
        """One delivery to these domains: visible to the next message at once."""
        expanded: set[str] = set()
        for d in domains:
            e = self._expanded.get(d)
            if e is None:
                if len(self._expanded) > 50_000:
                    self._expanded.clear()
                e = self._expanded[d] = tuple(DomainHistory.expand((d,)))
            expanded.update(e)
        if not expanded:
            return
        self._pending.append((expanded, datetime.now(UTC)))
        self._unflushed.update(expanded)
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._flush_later())

    async def _flush_later(self) -> None:
        await asyncio.sleep(self.flush_every)
        if not self._write_ok:  # the store is down: into the backlog; the retry loop writes it
            batch, self._pending = self._pending, []
            self._keep(batch)
            return
        await self.flush()

    async def flush(self) -> None:
        batch, self._pending = self._pending, []
        backlog, self._backlog = self._backlog, {}
        for d, (n, lo, hi) in backlog.items():  # n deliveries to d: the same entry n times
            one, last = ({d}, lo), ({d}, hi)
            batch += [one] * (n - 1) + [last]
        if not batch:
            return
        try:
            fresh = await self.history.arecord_and_count(batch)
        except Exception as e:
            # Keep the deltas (counted in this process meanwhile) for the next flush.
            self._keep(batch)
            self._failed("write", e)
            return
        self._write_ok = True
        now = time.monotonic()
        for doms, _ in batch:
            self._unflushed.subtract(doms)
        self._unflushed = +self._unflushed  # drop zeros
        for d, n in fresh.items():
            if n > 0:
                self._counts[d] = (n, now)
        self.history.add_frequent(d for d, n in fresh.items() if n >= self.history.frequent_min)

    def _keep(self, batch: list[tuple[set[str], datetime]]) -> None:
        """Fold a batch that could not be written into the backlog (bounded in domains)."""
        lost: Counter[str] = Counter()
        for doms, when in batch:
            for d in doms:
                cur = self._backlog.get(d)
                if cur is None:
                    if len(self._backlog) >= MAX_BACKLOG_DOMAINS:
                        lost[d] += 1
                        continue
                    cur = (0, when, when)
                n, lo, hi = cur
                self._backlog[d] = (n + 1, min(lo, when), max(hi, when))
        if lost:
            self.dropped += sum(lost.values())
            self._unflushed.subtract(lost)
            self._unflushed = +self._unflushed
            log.error(
                "history: store unavailable and %d domains waiting: %d new deltas dropped",
                len(self._backlog),
                sum(lost.values()),
            )

    async def close(self) -> None:
        self._closing = True
        for t in (self._task, self._retry):
            if t is not None and not t.done():
                t.cancel()
        await self.flush()
        if self._backlog:
            log.error(
                "history: stopping with counts for %d domains not written (store unavailable)",
                len(self._backlog),
            )
        await self.history.aclose()


@dataclass(frozen=True, slots=True)
class Context:
    """What one message's checks get from outside: None = not looked up (no store, no DNS)."""

    history: HistorySnapshot | None = None
    dns: Mapping[str, DnsStatus] | None = None
    history_unavailable: bool = False  # there is a history, but it could not be read now


class Lookups:
    """History and DNS for one message; the same object serves `serve` and `check`."""

    def __init__(
        self, history: HistoryCache | None = None, resolver: DomainResolver | None = None
    ) -> None:
        self.history = history
        self.resolver = resolver

    async def gather(self, view: MessageView, org: Org) -> Context:
        if self.history is None and self.resolver is None:
            return Context()
        domains = lookup_domains(view)
        hist = await self.history.try_snapshot(domains) if self.history is not None else None
        dns = None
        if self.resolver is not None:
            dns = await self.resolver.statuses(d for d in domains if not org.is_internal(d))
        return Context(hist, dns, self.history is not None and hist is None)

    def learn(self, domains: Iterable[str]) -> None:
        if self.history is not None:
            self.history.learn(domains)

    async def close(self) -> None:
        if self.history is not None:
            await self.history.close()
