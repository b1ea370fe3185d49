"""Delivery history: which domains the organisation has written to, and how often (SQLite).

The domain check calls a domain "first-time" when this store has never seen it, and protects
frequently used domains against look-alikes. The server records every relayed message; the
`mailguard history import` command learns the past from a Postfix mail log or an mbox of sent
mail, so day one is not all "first-time".

A message counts once per domain. `record()` also counts the registrable domain when it differs
(mail to sales.partner.co.jp makes partner.co.jp known), so a new subdomain of a known
organisation is not "first-time".

Imports are idempotent: each imported delivery (Postfix: queue id + recipient domain + log
timestamp; mbox: Message-ID, or a digest of the headers when there is none) is remembered in
`history_import`, so importing the same or an overlapping (rotated) log twice counts nothing twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import mailbox
import os
import re
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path

from mailguard.checks.context import HistorySnapshot
from mailguard.checks.domains import FREQUENT_MIN, registrable
from mailguard.message.addresses import normalize_domain, parse_addresses

__all__ = ["DomainHistory", "HistorySnapshot", "ImportResult"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS domain_history (
    domain     TEXT PRIMARY KEY,      -- lowercase A-label
    count      INTEGER NOT NULL,      -- messages sent there
    first_seen TEXT NOT NULL,         -- ISO 8601 UTC
    last_seen  TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS history_import (
    key TEXT PRIMARY KEY              -- one imported delivery: makes imports idempotent
);
"""


@dataclass(frozen=True, slots=True)
class ImportResult:
    messages: int  # deliveries/messages newly counted
    skipped: int  # already imported before (idempotence) or not outbound
    domains: dict[str, int] = field(default_factory=dict)  # domain → messages newly counted


def _iso(when: datetime) -> str:
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.astimezone(UTC).isoformat(timespec="seconds")


def lookup_keys(domains: Iterable[str]) -> list[str]:
    """The rows a count lookup reads: each domain and its registrable domain, once each."""
    want = list(dict.fromkeys(d for d in domains if d))
    return list(dict.fromkeys([*want, *(registrable(d) for d in want)]))


def tally(batch: list[tuple[set[str], datetime]]) -> dict[str, tuple[int, datetime, datetime]]:
    """domain → (deliveries, first, last) of a batch: one upsert per domain, not per delivery."""
    per: dict[str, tuple[int, datetime, datetime]] = {}
    for doms, when in batch:
        for d in doms:
            n, lo, hi = per.get(d, (0, when, when))
            per[d] = (n + 1, min(lo, when), max(hi, when))
    return per


class FrequentCache:
    """The frequent set (domains written to at least frequent_min times), reloaded at most every
    `refresh` seconds; the same object while unchanged (the look-alike index is keyed on it)."""

    def __init__(self, refresh: float) -> None:
        self.refresh = refresh
        self._set: frozenset[str] | None = None
        self._at = 0.0

    def cached(self, now: float | None = None) -> frozenset[str] | None:
        """The set if it is still fresh, else None (the caller reloads and calls `put`)."""
        t = time.monotonic() if now is None else now
        if self._set is None or t - self._at >= self.refresh:
            return None
        return self._set

    def put(self, fresh: frozenset[str], now: float | None = None) -> frozenset[str]:
        if fresh != self._set:  # keep the same object when unchanged (index cache)
            self._set = fresh
        self._at = time.monotonic() if now is None else now
        return self._set

    def add(self, domains: Iterable[str]) -> None:
        """Domains a delivery just made frequent: into the cached set now, not at the next
        refresh (a new set object, so the look-alike index is rebuilt once)."""
        new = frozenset(domains)
        if self._set is not None and not new <= self._set:
            self._set = self._set | new

    def clear(self) -> None:
        self._set = None


class DomainHistory:
    """The domain_history table. One connection behind a lock; async wrappers use to_thread."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        frequent_min: int = FREQUENT_MIN,
        frequent_refresh: float = 300.0,  # seconds between reloads of the frequent set
    ) -> None:
        self.path = Path(path)
        if str(path) != ":memory:":
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(
            str(path), check_same_thread=False, isolation_level=None, timeout=30.0
        )
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            # History is advisory: losing the last counts in a power cut is harmless, so the
            # queue's synchronous=FULL is not needed here.
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA busy_timeout=30000")
            self._db.executescript(_SCHEMA)
        self.frequent_min = frequent_min
        self._frequent = FrequentCache(frequent_refresh)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> DomainHistory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reads ------------------------------------------------------------------------------

    def counts(self, domains: Iterable[str]) -> dict[str, int]:
        """domain → messages sent there (0 for never). Registrable domains are looked up too."""
        keys = lookup_keys(domains)
        out = dict.fromkeys(keys, 0)
        with self._lock:
            for i in range(0, len(keys), 500):  # SQLite's parameter limit
                chunk = keys[i : i + 500]
                marks = ",".join("?" * len(chunk))
                q = f"SELECT domain, count FROM domain_history WHERE domain IN ({marks})"
                for d, n in self._db.execute(q, chunk):
                    out[d] = int(n)
        return out

    def known(self, min_count: int = 1) -> set[str]:
        """Domains written to at least `min_count` times (the look-alike check protects these)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT domain FROM domain_history WHERE count >= ?", (min_count,)
            ).fetchall()
        return {r[0] for r in rows}

    def rows(self, min_count: int = 1) -> list[tuple[str, int, str, str]]:
        """(domain, count, first_seen, last_seen), most used first."""
        with self._lock:
            return [
                (str(d), int(n), str(f), str(la))
                for d, n, f, la in self._db.execute(
                    "SELECT domain, count, first_seen, last_seen FROM domain_history "
                    "WHERE count >= ? ORDER BY count DESC, domain",
                    (min_count,),
                )
            ]

    def frequent(self, now: float | None = None) -> frozenset[str]:
        """known(frequent_min), reloaded at most every `frequent_refresh` seconds."""
        cached = self._frequent.cached(now)
        if cached is not None:
            return cached
        return self._frequent.put(frozenset(self.known(self.frequent_min)), now)

    def frequent_cached(self, now: float | None = None) -> frozenset[str] | None:
        """The frequent set if it is still fresh, else None (then `frequent()` reloads it)."""
        return self._frequent.cached(now)

    def add_frequent(self, domains: Iterable[str]) -> None:
        """Domains a delivery just made frequent: into the cached set now."""
        self._frequent.add(domains)

    def record_and_count(self, batch: list[tuple[set[str], datetime]]) -> dict[str, int]:
        """record_many, then the new counts of the domains it touched (one thread hop)."""
        self.record_many(batch)
        return self.counts({d for doms, _ in batch for d in doms})

    def snapshot(self, domains: Iterable[str]) -> HistorySnapshot:
        """What CheckContext.history wants for one message."""
        return HistorySnapshot(self.counts(domains), self.frequent())

    # -- writes -----------------------------------------------------------------------------

    def record(self, domains: Iterable[str], when: datetime) -> None:
        """Count one message to these domains (each domain once, plus its registrable domain)."""
        self.record_many([(set(self.expand(domains)), when)])

    @staticmethod
    def expand(domains: Iterable[str]) -> Iterator[str]:
        for d in domains:
            d = d.strip().rstrip(".").lower()
            if not d or d.startswith("["):
                continue
            yield d
            reg = registrable(d)
            if reg and reg != d:
                yield reg

    def record_many(self, batch: list[tuple[set[str], datetime]]) -> None:
        rows = [(d, n, _iso(lo), _iso(hi)) for d, (n, lo, hi) in sorted(tally(batch).items())]
        if not rows:
            return
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany(
                    "INSERT INTO domain_history(domain, count, first_seen, last_seen) "
                    "VALUES (?1, ?2, ?3, ?4) ON CONFLICT(domain) DO UPDATE SET "
                    "count = count + excluded.count, "
                    "first_seen = min(first_seen, excluded.first_seen), "
                    "last_seen = max(last_seen, excluded.last_seen)",
                    rows,
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def _import(self, items: list[tuple[str, set[str], datetime]]) -> ImportResult:
        """items: (idempotence key, domains, when). Claim and count in one transaction."""
        counted: dict[str, int] = {}
        messages = skipped = 0
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for key, doms, when in items:
                    cur = self._db.execute(
                        "INSERT OR IGNORE INTO history_import(key) VALUES (?)", (key,)
                    )
                    if not cur.rowcount:
                        skipped += 1
                        continue
                    messages += 1
                    for d in sorted(set(self.expand(doms))):
                        self._db.execute(
                            "INSERT INTO domain_history(domain, count, first_seen, last_seen) "
                            "VALUES (?1, 1, ?2, ?2) ON CONFLICT(domain) DO UPDATE SET "
                            "count = count + 1, first_seen = min(first_seen, excluded.first_seen), "
                            "last_seen = max(last_seen, excluded.last_seen)",
                            (d, _iso(when)),
                        )
                        counted[d] = counted.get(d, 0) + 1
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        self._frequent.clear()  # reload on next use
        return ImportResult(messages, skipped, counted)

    # -- async wrappers (the server runs the store off the event loop) -----------------------

    async def acounts(self, domains: Iterable[str]) -> dict[str, int]:
        return await asyncio.to_thread(self.counts, list(domains))

    async def arecord(self, domains: Iterable[str], when: datetime) -> None:
        await asyncio.to_thread(self.record, list(domains), when)

    async def asnapshot(self, domains: Iterable[str]) -> HistorySnapshot:
        return await asyncio.to_thread(self.snapshot, list(domains))

    # lookups.HistoryBackend (PgHistory is the shared-store one)

    async def afrequent(self) -> frozenset[str]:
        return await asyncio.to_thread(self.frequent)

    async def arecord_and_count(self, batch: list[tuple[set[str], datetime]]) -> dict[str, int]:
        return await asyncio.to_thread(self.record_and_count, batch)

    async def aclose(self) -> None:
        self.close()

    # -- imports ----------------------------------------------------------------------------

    def import_postfix_log(self, path: str | os.PathLike[str]) -> ImportResult:
        """Learn from `status=sent` deliveries in a Postfix mail log (plain or .gz).

        Counts remote SMTP deliveries only: `relay=local`, `virtual`, `lmtp`/`pipe` transports
        and hops to a loopback content filter (MailGuard itself on 127.0.0.1:10025) are skipped,
        so a message that passed through the filter is counted once. A message (queue id) counts
        once per recipient domain.
        """
        items, skipped = _postfix_items(Path(path))
        res = self._import(items)
        return ImportResult(res.messages, res.skipped + skipped, res.domains)

    def import_mbox(self, path: str | os.PathLike[str]) -> ImportResult:
        """Learn from the To/Cc/Bcc headers of an mbox of sent mail (one count per message)."""
        items: list[tuple[str, set[str], datetime]] = []
        skipped = 0
        box = mailbox.mbox(str(path), create=False)
        try:
            for key in box.iterkeys():
                raw = box.get_bytes(key)
                item = _mbox_item(raw)
                if item is None:
                    skipped += 1
                else:
                    items.append(item)
        finally:
            box.close()
        res = self._import(items)
        return ImportResult(res.messages, res.skipped + skipped, res.domains)


# ---------------------------------------------------------------------------------------------
# Parsers for the imports
# ---------------------------------------------------------------------------------------------

# Classic syslog ("Nov 23 10:00:00 host postfix/smtp[123]: QID: ...") and RFC 3339 timestamps.
_PF_LINE = re.compile(
    r"^(?P<ts>\w{3} [ \d]\d \d\d:\d\d:\d\d|\d{4}-\d\d-\d\dT[\d:.]+(?:Z|[+-]\d\d:?\d\d)?)\s+\S+\s+"
    r"(?P<prog>[\w./-]+)(?:\[\d+\])?:\s+(?P<qid>[0-9A-Za-z]+):\s+(?P<rest>.*)$"
)
_PF_TO = re.compile(r"\bto=<(?P<to>[^>]*)>")
_PF_RELAY = re.compile(r"\brelay=(?P<relay>[^,\s]+)")
_PF_STATUS = re.compile(r"\bstatus=(?P<status>\w+)")
_LOOPBACK = re.compile(r"^(localhost|127\.\d+\.\d+\.\d+|\[?::1\]?)(\[|$|:)|\[(127\.[\d.]+|::1)\]")
_MONTHS = {
    m: i
    for i, m in enumerate(
        ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"), 1
    )
}


def _open_text(path: Path) -> Iterator[str]:
    if path.suffix == ".gz":
        import gzip

        with gzip.open(path, "rt", encoding="utf-8", errors="surrogateescape") as f:
            yield from f
    else:
        with path.open("r", encoding="utf-8", errors="surrogateescape") as f:
            yield from f


def _pf_time(ts: str, year: int) -> datetime:
    if ts[0].isdigit():
        try:
            return datetime.fromisoformat(ts.replace("Z", "+00:00"))
        except ValueError:
            return datetime.now(UTC)
    month = _MONTHS.get(ts[:3].lower(), 1)
    day = int(ts[4:6])
    hh, mm, ss = (int(x) for x in ts[7:15].split(":"))
    try:
        naive = datetime(year, month, day, hh, mm, ss)
    except ValueError:  # Feb 29 in a non-leap guess
        naive = datetime(year, month, 28, hh, mm, ss)
    return naive.astimezone()  # syslog writes the log host's local time: assume it is ours


def _postfix_items(path: Path) -> tuple[list[tuple[str, set[str], datetime]], int]:
    mtime = datetime.fromtimestamp(path.stat().st_mtime)
    per_msg: dict[tuple[str, str], tuple[set[str], datetime]] = {}
    skipped = 0
    for line in _open_text(path):
        if "status=" not in line or "to=<" not in line:
            continue
        m = _PF_LINE.match(line.rstrip("\r\n"))
        if m is None:
            continue
        prog = m["prog"].rsplit("/", 1)[-1]
        rest = m["rest"]
        st = _PF_STATUS.search(rest)
        to = _PF_TO.search(rest)
        relay = _PF_RELAY.search(rest)
        if st is None or to is None or st["status"] != "sent":
            continue
        rl = relay["relay"].lower() if relay else "none"
        if (
            prog not in ("smtp",)
            or rl in ("local", "virtual", "none")
            or "lmtp" in rl
            or "dovecot" in rl
            or _LOOPBACK.search(rl)
        ):
            skipped += 1
            continue
        ts = m["ts"]
        # Classic syslog has no year: a log is written up to its mtime, so a month after the
        # mtime's month belongs to the year before.
        month = _MONTHS.get(ts[:3].lower(), 0)
        when = _pf_time(ts, mtime.year - 1 if month > mtime.month else mtime.year)
        addr = to["to"]
        domain = normalize_domain(addr.rpartition("@")[2])[0] if "@" in addr else ""
        if not domain:
            skipped += 1
            continue
        key = (m["qid"], domain)
        if key not in per_msg:
            per_msg[key] = ({domain}, when)
    items = [
        (f"pf:{qid}:{dom}:{_iso(when)[:10]}", doms, when)
        for (qid, dom), (doms, when) in per_msg.items()
    ]
    return items, skipped


def _mbox_item(raw: bytes) -> tuple[str, set[str], datetime] | None:
    end = raw.find(b"\n\n")
    crlf = raw.find(b"\r\n\r\n")
    if crlf != -1 and (end == -1 or crlf < end):
        end = crlf
    head = raw if end == -1 else raw[:end]
    text = head.decode("utf-8", "surrogateescape")
    fields: dict[str, list[str]] = {}
    name = ""
    for line in re.split(r"\r?\n", text):
        if not line or line.startswith("From "):
            continue
        if line[0] in " \t" and name:
            fields[name][-1] += "\r\n" + line
            continue
        name, sep, value = line.partition(":")
        if not sep:
            name = ""
            continue
        name = name.strip().lower()
        fields.setdefault(name, []).append(value.lstrip(" \t"))
    domains: set[str] = set()
    for h in ("to", "cc", "bcc"):
        for a in parse_addresses(h, fields.get(h, [])):
            if a.domain:
                domains.add(a.domain)
    if not domains:
        return None
    when = datetime.now(UTC)
    for d in fields.get("date", [])[:1]:
        with contextlib.suppress(TypeError, ValueError, IndexError):
            when = parsedate_to_datetime(d.strip())
    mid = (fields.get("message-id") or [""])[0].strip()
    key = "mbox:" + (mid if mid else hashlib.sha256(head).hexdigest())
    return key, domains, when
