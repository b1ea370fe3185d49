"""`mailguard store migrate|copy|version`: the store's schema, and moving an install to PostgreSQL.

mailguard store migrate [--store PATH|URL | -c CONFIG]
    apply the missing schema migrations (the server also applies them at start) and print
    the version.
mailguard store copy SRC DST
    copy everything durable from a SQLite store (SRC, a file) into an empty PostgreSQL store
    (DST, a URL): held messages and their bytes, decisions, the audit trail, tokens, pending
    notices, delivery history and import keys, in one PostgreSQL transaction; then VACUUM
    (ANALYZE) them (`raw`: ANALYZE) and verify row counts per table and every message's
    bytes (length and SHA-256) on both sides.
    Stop the guard (or accept that mail held during the copy stays in SRC): the copy reads
    one consistent snapshot of SRC.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import sqlite3
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mailguard.config import load
from mailguard.errors import ConfigError, StoreError
from mailguard.queue.backends import describe, is_url, make_store
from mailguard.queue.postgres import PostgresStore

_EXIT_OK, _EXIT_FAIL, _EXIT_USAGE = 0, 1, 2
# The store's command timeout (10 s) is for the mail path; a copy of a big install (100 000
# messages: ~0.5 GB of bytes) streams and hashes for longer than that.
_BULK_TIMEOUT = 3600.0

# table → columns, in the order both schemas share
TABLES: dict[str, tuple[str, ...]] = {
    "held": (
        "id",
        "state",
        "gate",
        "mail_from",
        "rcpt_tos",
        "queue_id",
        "created",
        "due",
        "on_timeout",
        "envelope",
        "decision",
        "summary",
        "size",
        "updated",
        "attempts",
        "next_attempt",
        "first_release",
        "lease_until",
        "lease_owner",
        "last_reply",
        "last_by",
        "last_why",
    ),
    "raw": ("id", "bytes"),
    "audit": ("seq", "msg_id", "at", "from_state", "to_state", "by", "why"),
    "token": ("hash", "msg_id", "role", "who", "expires", "used_at", "used_for"),
    "notice": (
        "id",
        "msg_id",
        "kind",
        "rcpts",
        "data",
        "null_sender",
        "state",
        "created",
        "next_attempt",
        "lease_until",
        "attempts",
        "last_reply",
        "delay",
    ),
    "domain_history": ("domain", "count", "first_seen", "last_seen"),
    "history_import": ("key",),
}
_EPOCH = {
    "created",
    "due",
    "updated",
    "next_attempt",
    "first_release",
    "lease_until",
    "at",
    "expires",
    "used_at",
}
_ISO = {"first_seen", "last_seen"}
_JSON = {"rcpt_tos", "envelope", "decision", "summary", "rcpts", "data"}


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "store",
        help="schema migrations; copy a SQLite store into PostgreSQL",
        description="The durable store: `migrate` applies schema migrations; `copy SRC DST` moves "
        "a SQLite install into an empty PostgreSQL database and verifies counts and bytes.",
    )
    sub = p.add_subparsers(dest="store_command", metavar="ACTION")
    mig = sub.add_parser("migrate", help="apply the missing schema migrations")
    src = mig.add_mutually_exclusive_group()
    src.add_argument("--store", metavar="PATH|URL", help="SQLite file or postgresql://…")
    src.add_argument("-c", "--config", metavar="FILE", help="service config (store.url or path)")
    cp = sub.add_parser("copy", help="copy a SQLite store into an empty PostgreSQL store")
    cp.add_argument("src", metavar="SRC", help="the SQLite store file")
    cp.add_argument("dst", metavar="DST", help="postgresql://user@host/db (empty or new schema)")
    cp.add_argument("--json", action="store_true", help="print the verification as JSON")
    p.set_defaults(func=main, store_parser=p)


def _location(args: argparse.Namespace) -> str:
    if args.store:
        return str(args.store)
    st = load(args.config).store
    return st.url or str(st.path)


async def _migrate(location: str) -> int:
    store = make_store(location, pool_size=1)
    async with store:
        if isinstance(store, PostgresStore):
            version = await store.schema_version()
        else:
            version = 2  # SqliteStore migrates on open (queue_meta 'schema')
    print(f"{describe(location)}: schema version {version}")
    return _EXIT_OK


def _convert(col: str, v: Any) -> Any:
    if v is None:
        return None
    if col in _EPOCH:
        return datetime.fromtimestamp(float(v), UTC)
    if col in _ISO:
        d = datetime.fromisoformat(str(v))
        return d if d.tzinfo else d.replace(tzinfo=UTC)
    if col in _JSON:
        return json.loads(v)
    if col == "null_sender":
        return bool(v)
    if col in ("bytes", "hash"):
        return bytes(v)
    if col == "delay":
        return float(v)
    return v


def _read_sqlite(path: Path) -> dict[str, list[tuple[Any, ...]]]:
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        db.execute("BEGIN")  # one read snapshot for every table
        have = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        out: dict[str, list[tuple[Any, ...]]] = {}
        for table, cols in TABLES.items():
            if table not in have:
                out[table] = []
                continue
            q = f"SELECT {', '.join(cols)} FROM {table}"
            out[table] = [
                tuple(_convert(c, v) for c, v in zip(cols, row, strict=True))
                for row in db.execute(q)
            ]
        db.execute("COMMIT")
        return out
    finally:
        db.close()


def _digests(rows: list[tuple[Any, ...]]) -> dict[str, tuple[int, str]]:
    return {str(i): (len(b), hashlib.sha256(b).hexdigest()) for i, b in rows}


async def copy(src: Path, dst: str) -> dict[str, Any]:
    """Copy and verify; raises StoreError when DST is not empty or does not match after."""
    data = await asyncio.to_thread(_read_sqlite, src)
    store = PostgresStore(dst, max_size=2)
    async with store:

        async def work(c: Any) -> None:
            n = await c.fetchval("SELECT count(*) FROM held")
            if n:
                raise StoreError(f"{store.path}: not empty ({n} messages): refusing to copy")
            for table, cols in TABLES.items():
                if data[table]:
                    await c.copy_records_to_table(
                        table, records=data[table], columns=list(cols), timeout=_BULK_TIMEOUT
                    )
            # serial columns continue after the copied ids
            await c.execute(
                "SELECT setval(pg_get_serial_sequence('audit', 'seq'), "
                "coalesce((SELECT max(seq) FROM audit), 0) + 1, false)"
            )
            await c.execute(
                "SELECT setval(pg_get_serial_sequence('notice', 'id'), "
                "coalesce((SELECT max(id) FROM notice), 0) + 1, false)"
            )

        await store._tx(work)

        async with store._conn() as c:
            # A bulk load leaves no planner statistics and no visibility map; do now what
            # autovacuum would do a while later (counts of the queue become index-only scans).
            for table in TABLES:  # the bytes are never scanned: statistics are enough there
                what = "ANALYZE" if table == "raw" else "VACUUM (ANALYZE)"
                await c.execute(f"{what} {table}", timeout=_BULK_TIMEOUT)
            counts = {
                t: int(await c.fetchval(f"SELECT count(*) FROM {t}", timeout=_BULK_TIMEOUT))
                for t in TABLES
            }
            rows = await c.fetch(
                "SELECT id, length(bytes) AS n, sha256(bytes) AS h FROM raw", timeout=_BULK_TIMEOUT
            )
    want_counts = {t: len(rows_) for t, rows_ in data.items()}
    got = {r["id"]: (int(r["n"]), bytes(r["h"]).hex()) for r in rows}
    want = _digests(data["raw"])
    report = {
        "src": str(src),
        "dst": describe(dst),
        "counts": want_counts,
        "bytes": sum(n for n, _ in want.values()),
        "verified": counts == want_counts and got == want,
    }
    if counts != want_counts:
        raise StoreError(f"copy verification failed: counts {counts} != {want_counts}")
    if got != want:
        bad = sorted(k for k in set(got) | set(want) if got.get(k) != want.get(k))
        raise StoreError(f"copy verification failed: bytes differ for {len(bad)}: {bad[:5]}")
    return report


def main(args: argparse.Namespace) -> int:
    cmd = getattr(args, "store_command", None)
    if not cmd:
        args.store_parser.print_help(sys.stderr)
        return _EXIT_USAGE
    try:
        if cmd == "migrate":
            return asyncio.run(_migrate(_location(args)))
        if is_url(args.src) or not is_url(args.dst):
            print(
                "mailguard store copy: SRC is a SQLite file, DST a postgresql:// URL",
                file=sys.stderr,
            )
            return _EXIT_USAGE
        if not Path(args.src).is_file():
            print(f"mailguard store copy: no SQLite store at {args.src}", file=sys.stderr)
            return _EXIT_FAIL
        report = asyncio.run(copy(Path(args.src), args.dst))
    except ConfigError as e:
        print(f"mailguard store: {e}", file=sys.stderr)
        return _EXIT_USAGE
    except (StoreError, sqlite3.Error, OSError) as e:
        print(f"mailguard store: {e}", file=sys.stderr)
        return _EXIT_FAIL
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        c = report["counts"]
        print(
            f"copied {report['src']} → {report['dst']}: {c['held']} messages "
            f"({c['raw']} with bytes, {report['bytes']} bytes), "
            f"{c['audit']} audit rows, {c['token']} tokens, {c['notice']} notices, "
            f"{c['domain_history']} history domains; verified: counts and SHA-256 of every message"
        )
    return _EXIT_OK
