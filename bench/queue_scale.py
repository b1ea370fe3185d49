"""`mailguard queue list` / `release` (and the admin API's) with 100 000 held messages, on SQLite
and on PostgreSQL (issue 14 item 7: ≤ 100 ms each).

    python bench/queue_scale.py [--n 100000] [--reps 10] [--backend sqlite|postgresql|both]
                                [--pg-url URL] [--keep DIR]

Filling: every message is made by the real `HoldService.keep()` (the id, the Held row, the
sender's token, the "held" notice and its link, exactly as the server stores them for a hold)
and written with `HeldStore.put_many()` — the same inserts as `put()`, 2 000 messages per
transaction instead of one fsync each. PostgreSQL gets the same rows through
`mailguard store copy SQLITE URL` (the real migration command, which verifies counts and the
SHA-256 of every message). Without --pg-url a private cluster is started (tests/pg_support.py:
initdb + pg_ctl on a free loopback port, fsync on).

Three levels are timed, each on its own:
* store: the calls the command makes, on an open store (list: one page + the count line;
  release: HoldService.release, one committed and flushed transaction);
* admin API: GET /api/messages and POST /api/messages/ID/release against the real aiohttp app
  (make_app) on 127.0.0.1, timed at the HTTP client;
* CLI process: the whole `mailguard queue …` process, start-up included, next to the bare
  interpreter start (`python -c pass`) and the import of the CLI.
Also prints the query plans (EXPLAIN) of the list/count/release statements.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from mailguard.envelope import Envelope  # noqa: E402
from mailguard.gate import Gate  # noqa: E402
from mailguard.queue.backends import make_store  # noqa: E402
from mailguard.queue.service import HoldService, KeepRequest  # noqa: E402
from mailguard.queue.sqlite import SqliteStore  # noqa: E402
from mailguard.queue.store import HeldStore, NewNotice, NewToken, PutRequest, State, new_id  # noqa: E402

RAW = (
    b"From: taro@example.co.jp\r\nTo: a@partner.co.jp\r\nSubject: report\r\n"
    b"Message-ID: <x@example.co.jp>\r\n\r\n" + b"body line\r\n" * 400
)  # ≈ 4.6 KB
SUMMARY = {
    "subject": "月次報告",
    "sender": "Taro <taro@example.co.jp>",
    "internal": [],
    "external": [{"addr": "a@partner.co.jp", "name": "", "field": "to", "org": "partner.co.jp"}],
    "attachments": [],
    "findings": [],
}
BATCH = 2000


class _Capture:
    """What HoldService.keep() asks the store to put, kept for one put_many()."""

    def __init__(self) -> None:
        self.batch: list[PutRequest] = []

    async def put(
        self,
        item: Any,
        raw: bytes,
        tokens: Sequence[NewToken] = (),
        notices: Sequence[NewNotice] = (),
        *,
        by: str = "smtp",
        why: str = "",
    ) -> None:
        self.batch.append(PutRequest(item, raw, tuple(tokens), tuple(notices), by, why))


async def fill(db: Path, n: int, t0: datetime) -> list[str]:
    cap = _Capture()
    clock_at = [t0]
    service = HoldService(
        cast(HeldStore, cap), public_url="http://guard.test", clock=lambda: clock_at[0]
    )
    ids: list[str] = []
    async with SqliteStore(db) as store:
        for i in range(n):
            now = t0 + timedelta(milliseconds=i)
            clock_at[0] = now
            sender = f"user{i % 500}@example.co.jp"
            env = Envelope(sender, ["a@partner.co.jp"], xforward={"IDENT": f"Q{i:07X}"})
            req = KeepRequest(
                id=new_id(now),
                gate=Gate.HOLD,
                summary=SUMMARY,
                decision={"action": "hold", "rules": ["cool-down"]},
                wait=timedelta(days=30),  # still held while we measure
                why="cool-down",
            )
            reply = await service.keep(env, RAW, req)
            assert reply.code == 250, reply
            ids.append(req.id)
            if len(cap.batch) >= BATCH:
                await store.put_many(cap.batch)
                cap.batch = []
        if cap.batch:
            await store.put_many(cap.batch)
    return ids


def _stats(xs: list[float]) -> str:
    return f"median {statistics.median(xs):7.2f} ms  max {max(xs):7.2f} ms"


async def store_level(location: str, ids: list[str], reps: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    async with make_store(location, pool_size=2, migrate=False) as store:
        service = HoldService(store)
        for i in range(reps + 1):  # the first round warms caches and is dropped
            t = time.perf_counter()
            page = await store.list_messages(limit=50)
            await store.count()
            a = (time.perf_counter() - t) * 1000
            t = time.perf_counter()
            page = await store.list_messages(state=State.HELD, limit=50)
            await store.count(State.HELD)
            b = (time.perf_counter() - t) * 1000
            assert len(page.items) == 50
            t = time.perf_counter()
            await service.release(ids[(i * 7919) % len(ids)], by="bench", why="bench")
            c = (time.perf_counter() - t) * 1000
            if i:
                out.setdefault("store: queue list (page 50 + count)", []).append(a)
                out.setdefault("store: queue list --state held", []).append(b)
                out.setdefault("store: queue release ID", []).append(c)
    return out


async def api_level(location: str, ids: list[str], reps: int) -> dict[str, list[float]]:
    import aiohttp
    from aiohttp import web

    from mailguard.web.app import make_app

    out: dict[str, list[float]] = {}
    token = "bench-admin-token-" + "x" * 32
    async with make_store(location, pool_size=4, migrate=False) as store:
        app = make_app(store, HoldService(store), admin_token=token)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        base = f"http://127.0.0.1:{port}"
        auth = {"Authorization": f"Bearer {token}"}
        try:
            async with aiohttp.ClientSession(headers=auth) as http:
                for i in range(reps + 1):
                    t = time.perf_counter()
                    async with http.get(f"{base}/api/messages?state=held&limit=50") as r:
                        body = await r.json()
                    a = (time.perf_counter() - t) * 1000
                    assert r.status == 200 and len(body["items"]) == 50, r.status
                    msg = ids[(i * 104729 + 11) % len(ids)]
                    t = time.perf_counter()
                    async with http.post(f"{base}/api/messages/{msg}/release") as r:
                        await r.read()
                    b = (time.perf_counter() - t) * 1000
                    assert r.status in (200, 409), r.status
                    if i:
                        out.setdefault("API: GET /api/messages?state=held", []).append(a)
                        out.setdefault("API: POST /api/messages/ID/release", []).append(b)
        finally:
            await runner.cleanup()
    return out


def cli_level(location: str, ids: list[str], reps: int) -> dict[str, list[float]]:
    exe = shutil.which("mailguard", path=str(Path(sys.executable).parent))
    cmd = [exe] if exe else [sys.executable, "-m", "mailguard"]
    out: dict[str, list[float]] = {}

    def run(name: str, argv: list[str]) -> None:
        t = time.perf_counter()
        p = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        ms = (time.perf_counter() - t) * 1000
        assert p.returncode in (0, 1), p.stderr
        out.setdefault(name, []).append(ms)

    for i in range(reps):
        run("process: python -c pass", [sys.executable, "-c", "pass"])
        run(
            "process: python -c 'import mailguard.cli'",
            [sys.executable, "-c", "import mailguard.cli"],
        )
        run("process: mailguard queue list", [*cmd, "queue", "list", "--store", location])
        run(
            "process: mailguard queue list --state held",
            [*cmd, "queue", "list", "--state", "held", "--store", location],
        )
        msg = ids[(i * 15485863 + 29) % len(ids)]
        run(
            "process: mailguard queue release ID",
            [*cmd, "queue", "release", msg, "--store", location],
        )
    return out


def plans_sqlite(db: Path, some_id: str) -> list[str]:
    c = sqlite3.connect(db)
    try:
        out = []
        for q, args in (
            ("SELECT * FROM held ORDER BY id DESC LIMIT 51", ()),
            ("SELECT * FROM held WHERE state = ? ORDER BY id DESC LIMIT 51", ("held",)),
            ("SELECT count(*) FROM held", ()),
            ("SELECT count(*) FROM held WHERE state = ?", ("held",)),
            ("UPDATE held SET state = 'released' WHERE id = ?", (some_id,)),
        ):
            plan = " / ".join(r[3] for r in c.execute("EXPLAIN QUERY PLAN " + q, args))
            out.append(f"  {q}\n      {plan}")
        return out
    finally:
        c.close()


def plans_pg(psql: Any, some_id: str) -> list[str]:
    out = []
    for q in (
        "SELECT * FROM held ORDER BY id DESC LIMIT 51",
        "SELECT * FROM held WHERE state = 'held' ORDER BY id DESC LIMIT 51",
        "SELECT count(*) FROM held",
        "SELECT count(*) FROM held WHERE state = 'held'",
        f"SELECT * FROM held WHERE id = '{some_id}' FOR UPDATE",
    ):
        plan = psql(f"EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF, SUMMARY ON) {q}")
        lines = [ln.strip() for ln in plan.splitlines() if ln.strip()]
        out.append(f"  {q}\n      " + " / ".join(lines))
    return out


def report(title: str, res: dict[str, list[float]]) -> None:
    print(f"\n{title}")
    for name, xs in res.items():
        verdict = ""
        if not name.startswith("process: python"):
            verdict = "  ≤ 100 ms: " + ("met" if max(xs) <= 100 else "MISSED")
        print(f"  {name:48} {_stats(xs)}{verdict}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--backend", choices=("sqlite", "postgresql", "both"), default="both")
    ap.add_argument("--pg-url", help="an empty PostgreSQL database (default: a private cluster)")
    ap.add_argument("--keep", type=Path, help="keep the SQLite file here (default: temp dir)")
    args = ap.parse_args()
    tmp = tempfile.TemporaryDirectory(prefix="mailguard-qscale-")
    db = (args.keep or Path(tmp.name)) / "queue.db"
    db.parent.mkdir(parents=True, exist_ok=True)
    if db.exists():
        db.unlink()
    t0 = datetime.now(UTC).replace(microsecond=0) - timedelta(days=1)
    print(
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {os.cpu_count()} cores, "
        f"Python {sys.version.split()[0]}, load {os.getloadavg()[0]:.1f}"
    )
    t = time.perf_counter()
    ids = asyncio.run(fill(db, args.n, t0))
    print(
        f"filled {args.n} held messages through HoldService.keep + put_many in "
        f"{time.perf_counter() - t:.1f} s ({db.stat().st_size / 1e6:.0f} MB SQLite)"
    )
    cluster = None
    pg_url = args.pg_url
    if args.backend in ("postgresql", "both") and not pg_url:
        from pg_support import PgCluster, pg_bindir

        bindir = pg_bindir()
        if bindir is None:
            sys.exit("no PostgreSQL binaries (Debian's postgresql); pass --pg-url")
        cluster = PgCluster(bindir, fsync=True).start()
        pg_url = cluster.new_database()
    try:
        if pg_url:
            t = time.perf_counter()
            p = subprocess.run(
                [sys.executable, "-m", "mailguard", "store", "copy", str(db), pg_url],
                capture_output=True,
                text=True,
            )
            assert p.returncode == 0, p.stdout + p.stderr
            print(
                "copied to PostgreSQL with `mailguard store copy` in "
                f"{time.perf_counter() - t:.1f} s"
            )
        if args.backend in ("sqlite", "both"):
            print("\n== SQLite (synchronous=FULL, WAL) ==")
            print("plans:\n" + "\n".join(plans_sqlite(db, ids[0])))
            report("store level", asyncio.run(store_level(str(db), ids, args.reps)))
            report("admin API", asyncio.run(api_level(str(db), ids, args.reps)))
            report("CLI process (start-up included)", cli_level(str(db), ids, args.reps))
        if pg_url and args.backend in ("postgresql", "both"):
            print("\n== PostgreSQL (synchronous_commit=on) ==")
            if cluster is not None:
                name = pg_url.rsplit("/", 1)[1]
                print("plans:\n" + "\n".join(plans_pg(lambda q: cluster.psql(name, q), ids[1])))
            report("store level", asyncio.run(store_level(pg_url, ids[1:], args.reps)))
            report("admin API", asyncio.run(api_level(pg_url, ids[1:], args.reps)))
            report("CLI process (start-up included)", cli_level(pg_url, ids[1:], args.reps))
    finally:
        if cluster is not None:
            cluster.stop()
        tmp.cleanup()


if __name__ == "__main__":
    main()
