"""Benchmark the held queue at size: 100 000 held messages, then list a page and release one.

    python bench/bench_queue.py [--n 100000] [--db PATH]

Goal (issue 5): listing a page and releasing one stay under 100 ms. Seeding uses one bulk
transaction (not what is measured); every measured operation goes through SqliteStore as the
server does, including the fsync of each commit.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sqlite3
import statistics
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from mailguard.queue.service import hash_token, new_token
from mailguard.queue.sqlite import SqliteStore
from mailguard.queue.store import Held, NewToken, State, new_id

RAW = (
    b"From: taro@example.co.jp\r\nTo: a@partner.co.jp\r\nSubject: report\r\n"
    b"Message-ID: <x@example.co.jp>\r\n\r\n" + b"body line\r\n" * 40
)
SUMMARY = {
    "subject": "月次報告",
    "from": "taro@example.co.jp",
    "internal": ["c@example.co.jp"],
    "external": ["a@partner.co.jp", "b@other.example.com"],
    "attachments": [{"filename": "list.xlsx", "size": 48213, "content_type": "application/x"}],
    "findings": [{"code": "recipient.visible_external", "reason_en": "x", "reason_ja": "x"}],
}


def seed(db: Path, n: int, t0: datetime) -> list[str]:
    """Bulk-load n held messages through the store's schema (one transaction)."""

    async def schema() -> None:
        async with SqliteStore(db):
            pass

    asyncio.run(schema())
    c = sqlite3.connect(db)
    c.execute("PRAGMA synchronous=OFF")
    ids = []
    rows, raws, toks = [], [], []
    summary = json.dumps(SUMMARY, ensure_ascii=False)
    decision = json.dumps({"action": "hold", "rules": ["cool-down"]})
    for i in range(n):
        created = t0 + timedelta(milliseconds=10 * i)
        qid = new_id(created)
        ids.append(qid)
        sender = f"user{i % 500}@example.co.jp"
        rows.append(
            (
                qid,
                "held",
                "hold",
                sender,
                '["a@partner.co.jp"]',
                "-",
                created.timestamp(),
                (created + timedelta(days=30)).timestamp(),
                "send",
                "{}",
                decision,
                summary,
                len(RAW),
                created.timestamp(),
            )
        )
        raws.append((qid, RAW))
        toks.append(
            (
                hash_token(f"bench-token-{i:08d}-padpadpad"),
                qid,
                "sender",
                sender,
                (created + timedelta(days=30)).timestamp(),
            )
        )
    c.execute("BEGIN")
    c.executemany(
        "INSERT INTO held(id, state, gate, mail_from, rcpt_tos, queue_id, created, due, "
        "on_timeout, envelope, decision, summary, size, updated) "
        "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
        rows,
    )
    c.executemany("INSERT INTO raw(id, bytes) VALUES (?,?)", raws)
    c.executemany("INSERT INTO token(hash, msg_id, role, who, expires) VALUES (?,?,?,?,?)", toks)
    c.execute("COMMIT")
    c.execute("ANALYZE")
    c.close()
    return ids


async def measure(db: Path, ids: list[str], t0: datetime, reps: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}

    def rec(name: str, ms: float) -> None:
        out.setdefault(name, []).append(ms)

    async with SqliteStore(db) as s:
        now = t0 + timedelta(days=1)
        for i in range(reps):
            t = time.perf_counter()
            page = await s.list_messages(limit=50)
            rec("list first page (50)", (time.perf_counter() - t) * 1000)
            assert len(page.items) == 50
            t = time.perf_counter()
            page = await s.list_messages(state=State.HELD, limit=50, before=ids[len(ids) // 2 + i])
            rec("list state=held, page in the middle", (time.perf_counter() - t) * 1000)
            assert len(page.items) == 50
            t = time.perf_counter()
            page = await s.list_messages(sender="user7@example.co.jp", limit=50)
            rec("list sender=… (50)", (time.perf_counter() - t) * 1000)
            t = time.perf_counter()
            await s.move(ids[i * 997 % len(ids)], State.RELEASED, now=now, by="bench", why="bench")
            rec("release one (fsynced commit)", (time.perf_counter() - t) * 1000)
            t = time.perf_counter()
            await s.token(hash_token(f"bench-token-{i * 13:08d}-padpadpad"))
            rec("token lookup (confirm page)", (time.perf_counter() - t) * 1000)
            t = time.perf_counter()
            await s.due_held(now, limit=100)
            rec("due_held scan (scheduler tick)", (time.perf_counter() - t) * 1000)
            _tok, h = new_token()
            item = Held(
                id=new_id(now),
                state=State.HELD,
                gate="hold",
                mail_from="taro@example.co.jp",
                rcpt_tos=("a@partner.co.jp",),
                created=now,
                due=now + timedelta(minutes=5),
                summary=SUMMARY,
            )
            t = time.perf_counter()
            await s.put(item, RAW, [NewToken(h, "sender", "taro@example.co.jp", item.due)])
            rec("put one (fsynced commit, before 250)", (time.perf_counter() - t) * 1000)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--db", type=Path, help="keep the store here (default: a temp dir)")
    args = ap.parse_args()
    tmp = tempfile.TemporaryDirectory(prefix="mailguard-bench-")
    db = args.db or Path(tmp.name) / "bench.db"
    t0 = datetime(2025, 4, 1, tzinfo=UTC)
    t = time.perf_counter()
    ids = seed(db, args.n, t0)
    print(
        f"seeded {args.n} held messages in {time.perf_counter() - t:.1f}s "
        f"({os.path.getsize(db) / 1e6:.0f} MB)"
    )
    res = asyncio.run(measure(db, ids, t0, args.reps))
    print(f"{'operation':42} {'median ms':>10} {'max ms':>8}   (n={args.reps})")
    for name, xs in res.items():
        print(f"{name:42} {statistics.median(xs):10.2f} {max(xs):8.2f}")
    worst = max(max(res["list first page (50)"]), max(res["release one (fsynced commit)"]))
    print(f"goal < 100 ms for list and release: {'met' if worst < 100 else 'NOT met'}")
    tmp.cleanup()


if __name__ == "__main__":
    main()
