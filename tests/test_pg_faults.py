"""PostgreSQL down under a running `mailguard serve --store postgresql://…` (issue 14, item 4).

A private cluster of its own (it is stopped with `pg_ctl stop -m fast` and started again on the
same port mid-test, so it is not the session's shared one). Everything is seen from outside:
SMTP answers (smtplib), what the receiving sink got, `/healthz`, `/metrics`, and the tables.

* while the database is down, mail the policy keeps gets 451 — never 250 without a commit;
* mail the policy passes is relayed and gets 250; the delivery-history lookup degrades to the
  finding `domain.history_unavailable` (this policy passes it) instead of a 451;
* `/healthz` answers 503 with store/history false; `mailguard_store_up` is 0;
* after `pg_ctl start`, with no restart of mailguard: keeps get 250 again within seconds, a hold
  that ran out during the outage is delivered, the history learned during the outage is in the
  table (the next mail to that domain is "known"), `/healthz` is 200, nothing half-stored.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from e2e_support import Guard, policy, wait_for
from pg_support import PgCluster, require_pg

RULES = """
[[rule]]
name = "first-time"
when = "domain.first_time and recipient.external < 2"
action = "confirm"

[[rule]]
name = "history-down"
when = "domain.history_unavailable"
action = "pass"

[[rule]]
name = "two-external"
when = "recipient.external >= 2"
action = "hold"
hold_for = "4s"
"""


@pytest.fixture
def cluster() -> Iterator[PgCluster]:
    """A cluster this test may stop and start; stopped and removed however the test ends."""
    c = PgCluster(require_pg()).start()
    try:
        yield c
    finally:
        c.stop()


def healthz(g: Guard) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(g.url("/healthz"), timeout=15) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def server_pids(cluster: PgCluster) -> list[int]:
    """The postmaster and its children (each in a session of its own: no process group)."""
    pm = int((cluster.data / "postmaster.pid").read_text().split()[0])
    kids = subprocess.run(["pgrep", "-P", str(pm)], capture_output=True, text=True).stdout
    return [pm, *(int(x) for x in kids.split())]


def table(cluster: PgCluster, db: str, sql: str) -> str:
    return cluster.psql(db, sql)


def test_database_down_keeps_451_passes_flow_and_all_recovers(
    tmp_path: Path, cluster: PgCluster
) -> None:
    url = cluster.new_database()
    db = url.rsplit("/", 1)[1]
    extra = {"store": {"url": url, "lease": "3s"}}
    with Guard(tmp_path / "g", policy_text=policy(RULES), config_extra=extra) as g:
        # Up: a hold taken before the outage, due while the database is down.
        held = g.send(to=["A <a@partner-one.example>", "B <b@partner-two.example>"], subject="A")
        assert held.held_id, held.text
        status, body = healthz(g)
        assert status == 200 and body["store"] is True, body

        cluster.server_stop("fast")
        t_down = time.monotonic()

        # Kept mail: 451, never 250.
        kept = g.send(to=["C <c@partner-one.example>", "D <d@partner-two.example>"], subject="B")
        assert kept.code == 451, (kept.code, kept.text)
        assert kept.text.startswith("4."), kept.text

        # Passed mail flows: internal …
        internal = g.send(to=["Sato <sato@ourco.co.jp>"], subject="C internal")
        assert internal.code == 250, (internal.code, internal.text)
        g.wait_mail(internal)
        # … and external to a domain never seen: the history cannot say "first time", the
        # policy names the degraded lookup and passes it.
        new = g.send(to=["N <n@brand-new.example>"], subject="D new domain")
        assert new.code == 250, (new.code, new.text)
        g.wait_mail(new)
        rec = g.decision_record(new)
        assert "domain.history_unavailable" in rec["findings"], rec
        assert "history-down" in rec["rules"], rec
        assert "domain.first_time" not in rec["findings"], rec

        # /healthz says so, and the metric ops alert on.
        status, body = healthz(g)
        assert status == 503, body
        assert body["store"] is False and body["history"] is False and body["ok"] is False, body
        assert g.metric("mailguard_store_up") == 0

        # Stay down past the hold's end (4 s) and past a lease (3 s): the scheduler must live.
        time.sleep(max(0.0, 6.0 - (time.monotonic() - t_down)))
        assert g.proc is not None and g.proc.poll() is None, g.log_text()[-3000:]
        assert not g.mail_with(held.message_id), "delivered while its state could not be stored"

        cluster.server_start()
        t_up = time.monotonic()

        # Keeps get 250 again within a few seconds, with no restart.
        def kept_again() -> Any:
            s = g.send(to=["E <e@partner-one.example>", "F <f@partner-two.example>"], subject="E")
            return s if s.code == 250 else None

        again = wait_for(kept_again, 10, interval=0.5, what="250 for a kept message after start")
        assert again.held_id, again.text
        assert time.monotonic() - t_up < 10

        # The hold that ran out during the outage is delivered by the scheduler.
        g.wait_mail(held, timeout=15)

        # /healthz back to 200 by itself.
        def healthy() -> Any:
            st, b = healthz(g)
            return b if st == 200 else None

        body = wait_for(healthy, 10, interval=0.5, what="/healthz 200 after the database is back")
        assert body["store"] is True and body["history"] is True, body
        wait_for(lambda: g.metric("mailguard_store_up") == 1, 20, what="mailguard_store_up 1")

        # The deliveries learned during the outage reached the shared history …
        wait_for(
            lambda: (
                table(
                    cluster,
                    db,
                    "SELECT count FROM domain_history WHERE domain = 'brand-new.example'",
                )
                == "1"
            ),
            10,
            what="the outage's history delta written after recovery",
        )
        # … so the same domain is known now: no first-time confirm, relayed at once.
        known = g.send(to=["N <n2@brand-new.example>"], subject="G known now")
        assert known.code == 250 and not known.held_id, known.text
        g.wait_mail(known)
        assert "domain.first_time" not in g.decision_record(known)["findings"]

        # Nothing half-stored: the 451'd message left no row; every row has its bytes/audit.
        rows = table(cluster, db, "SELECT id FROM held ORDER BY id").split()
        assert sorted(rows) == sorted([held.held_id, again.held_id]), rows
        assert (
            table(cluster, db, "SELECT count(*) FROM raw WHERE id NOT IN (SELECT id FROM held)")
            == "0"
        )
        assert (
            table(
                cluster,
                db,
                "SELECT count(*) FROM held h WHERE state NOT IN ('delivered','cancelled','expired',"
                "'failed') AND NOT EXISTS (SELECT 1 FROM raw r WHERE r.id = h.id)",
            )
            == "0"
        )
        assert (
            table(
                cluster, db, "SELECT count(*) FROM audit WHERE msg_id NOT IN (SELECT id FROM held)"
            )
            == "0"
        )
        wait_for(
            lambda: (
                table(cluster, db, f"SELECT state FROM held WHERE id = '{held.held_id}'")
                == "delivered"
            ),
            10,
            what="the recovered hold recorded delivered",
        )
        assert g.proc is not None and g.proc.poll() is None
    # A clean stop writes what was learned last (G's delivery) before it closes the store.
    assert (
        table(cluster, db, "SELECT count FROM domain_history WHERE domain = 'brand-new.example'")
        == "2"
    )


def test_delivery_in_flight_when_the_database_goes_down(tmp_path: Path, cluster: PgCluster) -> None:
    """The upstream accepts a released message while the database is down: the "delivered"
    commit waits for the database (lease renewed again once it is back) instead of being
    dropped — delivered once, recorded delivered, nothing stuck in "delivering"."""
    url = cluster.new_database()
    db = url.rsplit("/", 1)[1]
    arrived = threading.Event()
    database_down = threading.Event()

    def slow_upstream(data: bytes) -> None:
        if b"Subject: in flight" in data:
            arrived.set()
            database_down.wait(20)  # answer only once the database is gone
            time.sleep(0.5)
        return None

    rules = RULES.replace('hold_for = "4s"', 'hold_for = "1s"')
    extra = {"store": {"url": url, "lease": "3s"}}
    with Guard(
        tmp_path / "g", policy_text=policy(rules), config_extra=extra, refuse=slow_upstream
    ) as g:
        sent = g.send(
            to=["A <a@partner-one.example>", "B <b@partner-two.example>"], subject="in flight"
        )
        assert sent.held_id, sent.text
        assert arrived.wait(15), "the scheduler never delivered"
        cluster.server_stop("fast")
        database_down.set()
        time.sleep(5)  # longer than the lease (3 s)
        assert g.proc is not None and g.proc.poll() is None, g.log_text()[-3000:]
        cluster.server_start()

        state = f"SELECT state FROM held WHERE id = '{sent.held_id}'"
        wait_for(
            lambda: table(cluster, db, state) == "delivered",
            15,
            what="the delivery recorded after the database came back",
        )
        time.sleep(2)  # a second delivery would come from a re-claim after the lease
        copies = [m for m in g.mails() if sent.message_id in m.header("Message-ID")]
        assert len(copies) == 1, f"delivered {len(copies)} times"
        assert table(cluster, db, "SELECT count(*) FROM held WHERE state = 'delivering'") == "0"


@pytest.mark.asyncio
async def test_history_backlog_is_bounded_and_written_after_recovery(cluster: PgCluster) -> None:
    """Deliveries learned while the database is down: kept per domain (at most
    MAX_BACKLOG_DOMAINS, the rest dropped and counted), written once it is back."""
    from mailguard.history_pg import PgHistory
    from mailguard.lookups import MAX_BACKLOG_DOMAINS, HistoryCache
    from mailguard.queue.postgres import PostgresStore

    url = cluster.new_database()
    db = url.rsplit("/", 1)[1]
    async with PostgresStore(url, timeout=2.0) as store:
        cache = HistoryCache(PgHistory(store), flush_every=0.05)
        try:
            cluster.server_stop("fast")
            assert await cache.try_snapshot(["x.example"]) is None  # degraded, no exception
            assert not cache.available
            for _ in range(3):  # one domain, three deliveries: one backlog entry
                cache.learn(["often.example"])
            cache.learn(f"d{i}.example" for i in range(MAX_BACKLOG_DOMAINS + 10))
            await asyncio.sleep(0.3)
            await cache.flush()  # still down: folded into the backlog
            assert cache.backlog == MAX_BACKLOG_DOMAINS
            assert cache.dropped == 11  # the often.example entry took one slot
            cluster.server_start()
            for _ in range(75):  # the background retry writes it within its back-off (≤ 5 s)
                if cache.available and not cache.backlog:
                    break
                await asyncio.sleep(0.2)
            assert cache.available and cache.backlog == 0
        finally:
            await cache.close()
    assert (
        cluster.psql(db, "SELECT count FROM domain_history WHERE domain = 'often.example'") == "3"
    )
    assert int(cluster.psql(db, "SELECT count(*) FROM domain_history")) == MAX_BACKLOG_DOMAINS


def test_database_down_at_start(tmp_path: Path, cluster: PgCluster) -> None:
    """`mailguard serve` started while the database is down: it listens; kept mail gets 451,
    passed mail flows (history unavailable); once the database starts, the guard connects and
    migrates by itself and kept mail gets 250."""
    url = cluster.new_database()
    cluster.server_stop("fast")
    extra = {"store": {"url": url, "lease": "3s"}}
    with Guard(tmp_path / "g", policy_text=policy(RULES), config_extra=extra) as g:
        kept = g.send(to=["A <a@partner-one.example>", "B <b@partner-two.example>"], subject="K")
        assert kept.code == 451, (kept.code, kept.text)
        passed = g.send(to=["N <n@brand-new.example>"], subject="P")
        assert passed.code == 250, (passed.code, passed.text)
        g.wait_mail(passed)
        assert "domain.history_unavailable" in g.decision_record(passed)["findings"]
        status, body = healthz(g)
        assert status == 503 and body["store"] is False, body

        cluster.server_start()

        def kept_now() -> Any:
            s = g.send(to=["A <a@partner-one.example>", "B <b@partner-two.example>"], subject="K2")
            return s if s.code == 250 else None

        again = wait_for(kept_now, 15, interval=0.5, what="250 once the database is up")
        assert again.held_id, again.text
        g.wait_mail(again, timeout=15)  # hold_for 4 s, then the scheduler delivers it
        wait_for(lambda: healthz(g)[0] == 200, 10, interval=0.5, what="/healthz 200")


def test_database_hung(tmp_path: Path, cluster: PgCluster) -> None:
    """The database stops answering without closing anything (every server process stopped
    with SIGSTOP: connections open, no reply): kept mail gets 451 within the store's timeouts,
    passed mail still flows, and both recover after SIGCONT."""
    url = cluster.new_database()
    extra = {"store": {"url": url, "lease": "3s"}}
    with Guard(tmp_path / "g", policy_text=policy(RULES), config_extra=extra) as g:
        warm = g.send(to=["N <n@warm.example>"], subject="warm")  # first-time: confirm, kept
        assert warm.held_id, warm.text
        pids = server_pids(cluster)
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            kept = g.send(
                to=["A <a@partner-one.example>", "B <b@partner-two.example>"], subject="K"
            )
            kept_s = time.monotonic() - t0
            assert kept.code == 451, (kept.code, kept.text)
            t0 = time.monotonic()
            passed = g.send(to=["Sato <sato@ourco.co.jp>"], subject="P")
            passed_s = time.monotonic() - t0
            assert passed.code == 250, (passed.code, passed.text)
            g.wait_mail(passed)
            print(f"hung database: 451 after {kept_s:.1f}s, pass 250 after {passed_s:.1f}s")
            # history read 2 s + the store's command timeout 10 s; then passes flow at once
            assert kept_s < 18 and passed_s < 5, (kept_s, passed_s)
        finally:
            for pid in pids:
                os.kill(pid, signal.SIGCONT)

        def kept_now() -> Any:
            s = g.send(to=["A <a@partner-one.example>", "B <b@partner-two.example>"], subject="K2")
            return s if s.code == 250 else None

        again = wait_for(kept_now, 20, interval=0.5, what="250 after SIGCONT")
        assert again.held_id, again.text
