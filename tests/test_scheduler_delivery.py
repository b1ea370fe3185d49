"""Hold → release → delivery end to end: real SQLite file, SmtpTransport, aiosmtpd sink."""

from __future__ import annotations

import email
import email.policy
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest
import pytest_asyncio

from mailguard.notify.render import is_own_notice
from mailguard.policy.decision import Gate
from mailguard.queue.store import State
from tests._queue_support import (
    RAW,
    RCPTS,
    SECRET,
    SENDER,
    Clock,
    Sink,
    close,
    envelope,
    keep,
    link_of,
    rig,
    serve,
    stop,
    zip_policy,
)


@pytest_asyncio.fixture
async def upstream() -> AsyncIterator[tuple[Sink, int]]:
    sink = Sink()
    server, port = await serve(sink)
    yield sink, port
    await stop(server)


def held_id(reply_text: str) -> str:
    return reply_text.split("held as ")[1].split()[0]


@pytest.mark.asyncio
async def test_hold_notice_then_expiry_sends_original_bytes(tmp_path: Path, upstream) -> None:
    sink, port = upstream
    r = await rig(tmp_path / "q.db", port)
    try:
        reply = await keep(r, Gate.HOLD, hold_for=timedelta(minutes=5))
        assert reply.code == 250 and "held as" in reply.text
        qid = held_id(reply.text)
        stats = await r.scheduler.tick()
        assert stats["notices"] == 1 and sink.originals() == []
        (notice,) = sink.of_kind("held")
        assert notice[0] == "mailguard@example.co.jp" and notice[1] == [SENDER]
        assert link_of(notice[2]).startswith("/m/")
        r.clock.advance(minutes=4, seconds=59)
        assert (await r.scheduler.tick())["delivered"] == 0
        r.clock.advance(seconds=1)
        assert (await r.scheduler.tick())["delivered"] == 1
        assert sink.originals() == [(SENDER, RCPTS, RAW)]  # byte for byte, envelope kept
        h = await r.store.get(qid)
        assert h is not None and h.state is State.DELIVERED and "queued as UP1" in h.last_reply
        trail = [(a.to_state, a.by) for a in await r.store.audit(qid)]
        assert trail == [
            (State.HELD, "smtp"),
            (State.RELEASED, "scheduler"),
            (State.DELIVERING, "scheduler"),
            (State.DELIVERED, "scheduler"),
        ]
        # the link was scrubbed from disk once the notice went out
        (n,) = await r.store.notices_for(qid)
        assert n.state == "sent" and n.data == {}
    finally:
        await close(r)


@pytest.mark.asyncio
async def test_cancel_never_sends(tmp_path: Path, upstream) -> None:
    sink, port = upstream
    r = await rig(tmp_path / "q.db", port)
    try:
        reply = await keep(r, Gate.HOLD, hold_for=timedelta(minutes=5))
        await r.scheduler.tick()
        token = link_of(sink.of_kind("held")[0][2]).removeprefix("/m/")
        await r.service.act(token, "cancel", client="127.0.0.1")
        for _ in range(3):
            r.clock.advance(days=2)
            await r.scheduler.tick()
        assert sink.originals() == []
        h = await r.store.get(held_id(reply.text))
        assert h is not None and h.state is State.CANCELLED
        assert await r.store.raw(h.id) is None
    finally:
        await close(r)


@pytest.mark.asyncio
async def test_restart_with_message_held_then_release_delivers_once(tmp_path, upstream) -> None:
    sink, port = upstream
    db = tmp_path / "q.db"
    clock = Clock()
    r1 = await rig(db, port, clock)
    reply = await keep(r1, Gate.CONFIRM)
    qid = held_id(reply.text)
    await close(r1)  # the process goes away with the message held
    r2 = await rig(db, port, clock)
    try:
        h = await r2.store.get(qid)
        assert h is not None and h.state is State.HELD
        await r2.service.release(qid, by="cli:root", why="checked by phone")
        await r2.scheduler.tick()
        clock.advance(hours=30)
        await r2.scheduler.tick()
        await r2.scheduler.tick()
        assert sink.originals() == [(SENDER, RCPTS, RAW)]
        assert (await r2.store.get(qid)).state is State.DELIVERED  # type: ignore[union-attr]
    finally:
        await close(r2)


@pytest.mark.asyncio
async def test_crash_mid_delivery_redelivers_after_lease(tmp_path: Path, upstream) -> None:
    """At-least-once: a lease left by a dead process is recovered on the next start."""
    sink, port = upstream
    db = tmp_path / "q.db"
    clock = Clock()
    r1 = await rig(db, port, clock)
    reply = await keep(r1, Gate.HOLD, hold_for=timedelta(seconds=1))
    qid = held_id(reply.text)
    await r1.store.move(qid, State.RELEASED, now=clock(), by="t", why="")
    (_c,) = await r1.store.claim_deliveries(clock(), clock() + timedelta(minutes=10), "dead")
    await close(r1)  # died holding the lease, before talking to upstream
    r2 = await rig(db, port, clock)
    try:
        assert await r2.store.recover_leases(clock()) == 1  # what Scheduler.run() does first
        await r2.scheduler.tick()
        assert sink.originals() == [(SENDER, RCPTS, RAW)]
    finally:
        await close(r2)


@pytest.mark.asyncio
async def test_upstream_down_during_release_retried_then_delivered(tmp_path: Path) -> None:
    sink = Sink()
    server, port = await serve(sink)
    await stop(server)  # upstream down
    r = await rig(tmp_path / "q.db", port)
    try:
        reply = await keep(r, Gate.CONFIRM)
        qid = held_id(reply.text)
        await r.service.release(qid, by="api:127.0.0.1")
        stats = await r.scheduler.tick()
        assert stats["deferred"] == 1 and stats["delivered"] == 0
        h = await r.store.get(qid)
        assert h is not None and h.state is State.RELEASED and h.last_reply.startswith("451")
        assert h.next_attempt == r.clock() + timedelta(seconds=30)
        r.clock.advance(seconds=30)
        assert (await r.scheduler.tick())["deferred"] == 1  # still down; back-off doubles
        h = await r.store.get(qid)
        assert h is not None and h.next_attempt == r.clock() + timedelta(seconds=60)
        server, _ = await serve(sink, port)  # upstream recovers
        try:
            r.clock.advance(seconds=59)
            assert (await r.scheduler.tick())["delivered"] == 0  # not yet due
            r.clock.advance(seconds=1)
            assert (await r.scheduler.tick())["delivered"] == 1
            assert sink.originals() == [(SENDER, RCPTS, RAW)]
            assert len(sink.of_kind("confirm")) == 1  # the deferred notice went out too
        finally:
            await stop(server)
    finally:
        await close(r)


@pytest.mark.asyncio
async def test_permanent_failure_after_250_bounces_with_rfc3464_dsn(tmp_path, upstream) -> None:
    sink, port = upstream
    sink.replies[SENDER] = "550 5.1.1 <a@partner.co.jp>: Recipient address rejected"
    r = await rig(tmp_path / "q.db", port)
    try:
        reply = await keep(r, Gate.CONFIRM)
        qid = held_id(reply.text)
        await r.service.release(qid, by="t")
        stats = await r.scheduler.tick()
        assert stats["failed"] == 1
        assert (await r.store.get(qid)).state is State.FAILED  # type: ignore[union-attr]
        (dsn,) = sink.of_kind("dsn")
        assert dsn[0] == "<>" and dsn[1] == [SENDER]  # null sender: a bounce is never bounced
        assert is_own_notice(dsn[2], SECRET)
        msg = email.message_from_bytes(dsn[2], policy=email.policy.default)
        assert msg.get_content_type() == "multipart/report"
        assert msg.get_param("report-type") == "delivery-status"
        human, status, headers = msg.get_payload()  # type: ignore[misc]
        assert "配送できませんでした" in str(msg["Subject"])
        assert "a@partner.co.jp" in human.get_content()
        assert status.get_content_type() == "message/delivery-status"
        blocks = status.get_payload()
        assert blocks[0]["Reporting-MTA"] == "dns; guard.test"
        assert [b["Final-Recipient"] for b in blocks[1:]] == [f"rfc822; {a}" for a in RCPTS]
        assert {b["Status"] for b in blocks[1:]} == {"5.1.1"}
        assert {b["Action"] for b in blocks[1:]} == {"failed"}
        assert headers.get_content_type() == "text/rfc822-headers"
        hdrs = (
            headers.get_payload()
            if isinstance(headers.get_payload(), str)
            else headers.get_payload()[0].as_string()
        )
        assert "Message-ID: <orig-1@example.co.jp>" in str(hdrs)
        assert b"leading dot line" not in dsn[2]  # headers only, never the body
    finally:
        await close(r)


@pytest.mark.asyncio
async def test_confirm_unanswered_expires_and_tells_sender(tmp_path: Path, upstream) -> None:
    sink, port = upstream
    r = await rig(tmp_path / "q.db", port)
    try:
        reply = await keep(r, Gate.CONFIRM, hold_for=timedelta(hours=1))
        await r.scheduler.tick()
        token = link_of(sink.of_kind("confirm")[0][2]).removeprefix("/m/")
        r.clock.advance(hours=1)
        stats = await r.scheduler.tick()
        assert stats["expired"] == 1 and sink.originals() == []
        (out,) = sink.of_kind("outcome")
        assert out[0] == "<>" and out[1] == [SENDER]
        body = email.message_from_bytes(out[2], policy=email.policy.default)
        assert "期限切れ" in str(body["Subject"])
        h = await r.store.get(held_id(reply.text))
        assert h is not None and h.state is State.EXPIRED
        with pytest.raises(Exception) as e:
            await r.service.act(token, "send")
        assert getattr(e.value, "reason", "") == "decided"
    finally:
        await close(r)


@pytest.mark.asyncio
async def test_confirm_deadline_with_on_timeout_send_delivers(tmp_path: Path, upstream) -> None:
    sink, port = upstream
    r = await rig(tmp_path / "q.db", port)
    try:
        await keep(r, Gate.CONFIRM, on_timeout="send", hold_for=timedelta(minutes=30))
        r.clock.advance(minutes=30)
        await r.scheduler.tick()
        assert sink.originals() == [(SENDER, RCPTS, RAW)]
        assert len(sink.of_kind("outcome")) == 1
    finally:
        await close(r)


@pytest.mark.asyncio
async def test_keep_answers_451_when_the_store_cannot_commit(tmp_path: Path, upstream) -> None:
    _sink, port = upstream
    r = await rig(tmp_path / "q.db", port)
    await r.store.close()  # the store is gone (disk error, closed during shutdown)
    try:
        reply = await keep(r, Gate.HOLD)
        assert reply.code == 451
        # a zip pass must park its password first: without the store, 451 and nothing relayed
        r.pipeline.policy = zip_policy()
        reply = await r.pipeline.handle(envelope(), RAW)
        assert reply.code == 451 and _sink.got == []
    finally:
        await r.transport.close()


@pytest.mark.asyncio
async def test_zip_password_notice_is_durable_and_delayed(tmp_path: Path, upstream) -> None:
    """A zipped pass: the mail goes at once; the password (to the recipients, 2 min later)
    only after the upstream took the mail; it leaves the disk once sent."""
    sink, port = upstream
    r = await rig(tmp_path / "q.db", port, charset="iso-2022-jp")
    try:
        r.pipeline.policy = zip_policy(password_to="recipients", password_delay="2m")
        reply = await r.pipeline.handle(envelope(), RAW)
        assert reply.code == 250 and len(sink.originals()) == 1
        parked = await r.store._run(
            lambda: r.store._c.execute("SELECT state, next_attempt FROM notice").fetchall()
        )
        assert [row[0] for row in parked] == ["pending"]  # released: the mail was accepted
        assert parked[0][1] > r.clock().timestamp() + 100  # …and due 2 minutes later
        r.clock.advance(minutes=1)
        assert (await r.scheduler.tick())["notices"] == 0
        r.clock.advance(minutes=1)
        assert (await r.scheduler.tick())["notices"] == 1
        (pw,) = sink.of_kind("zip-password")
        assert pw[1] == ["a@partner.co.jp", "b@other.example.com", "c@example.co.jp"]
        msg = email.message_from_bytes(pw[2], policy=email.policy.default)
        text = msg.get_body(("plain",))
        assert text is not None and text.get_content_charset() == "iso-2022-jp"
        body = text.get_content()
        zipped = email.message_from_bytes(sink.originals()[0][2], policy=email.policy.default)
        names = [p.get_filename() for p in zipped.iter_attachments()]
        assert len(names) == 1 and names[0] and names[0].endswith(".zip") and names[0] in body
        data = await r.store._run(lambda: r.store._c.execute("SELECT data FROM notice").fetchall())
        assert [row[0] for row in data] == ["{}"]  # the password left the disk
    finally:
        await close(r)


@pytest.mark.asyncio
async def test_run_loop_delivers_on_wake_and_stops(tmp_path: Path, upstream) -> None:
    import asyncio

    from mailguard.queue.store import utcnow

    sink, port = upstream
    r = await rig(tmp_path / "q.db", port)
    r.scheduler.clock = utcnow  # the real clock: run() is what `mailguard serve` starts
    r.service.clock = utcnow
    r.scheduler.interval = 30.0  # only wake() can make it tick again within the test
    task = asyncio.create_task(r.scheduler.run())
    try:
        reply = await keep(r, Gate.CONFIRM)
        await r.service.release(held_id(reply.text), by="t")
        r.scheduler.wake()
        for _ in range(100):
            if sink.originals():
                break
            await asyncio.sleep(0.05)
        assert sink.originals() == [(SENDER, RCPTS, RAW)]
        await r.scheduler.stop()
        await asyncio.wait_for(task, 5)
    finally:
        task.cancel()
        await close(r)


@pytest.mark.asyncio
async def test_notices_withdrawn_when_the_mail_was_not_relayed(tmp_path: Path, upstream) -> None:
    """The upstream refuses the zipped mail (451, then 550): no password ever goes out; once it
    accepts, exactly one does."""
    sink, port = upstream
    r = await rig(tmp_path / "q.db", port)
    try:
        r.pipeline.policy = zip_policy()
        for refusal in ("451 4.3.0 try later", "550 5.7.1 no"):
            sink.replies[SENDER] = refusal
            reply = await r.pipeline.handle(envelope(), RAW)
            assert reply.code == int(refusal[:3])
            assert (await r.scheduler.tick())["notices"] == 0
        sink.replies.clear()
        assert (await r.pipeline.handle(envelope(), RAW)).code == 250
        assert (await r.scheduler.tick())["notices"] == 1
        assert len(sink.of_kind("zip-password")) == 1
        rows = await r.store._run(
            lambda: r.store._c.execute("SELECT count(*) FROM notice").fetchall()
        )
        assert rows[0][0] == 1  # the two withdrawn ones are gone, not failed or pending
    finally:
        await close(r)
