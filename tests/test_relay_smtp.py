"""The pass-through relay, driven for real: SMTP client → MailGuard → SMTP sink, over loopback."""

from __future__ import annotations

import asyncio
import logging
import smtplib
from dataclasses import dataclass, field
from typing import Any

import aiosmtplib
import pytest
from conftest import Sink, guard_config, port_of, serve_sink

from mailguard.envelope import Envelope, Reply
from mailguard.relay.smtp import SmtpTransport

SEND = {"sender": "a@example.co.jp", "recipients": ["b@partner.co.jp"], "hostname": "127.0.0.1"}


def msg(body: bytes = b"body\r\n", headers: bytes = b"") -> bytes:
    return (
        b"From: a@example.co.jp\r\nTo: b@partner.co.jp\r\nSubject: hi\r\n"
        + headers
        + b"Message-ID: <1@example.co.jp>\r\n\r\n"
        + body
    )


JA_SUBJECT = "見積書の送付".encode()
CASES = {
    "plain": msg(),
    "utf8-header-8bit-body": msg("本文です。\r\n".encode(), b"Subject: " + JA_SUBJECT + b"\r\n"),
    "iso2022jp": msg(
        b"\x1b$B$3$s$K$A$O\x1b(B\r\n",
        b"Subject: =?ISO-2022-JP?B?GyRCOCs3UTxxGyhC?=\r\nContent-Type: text/plain; "
        b"charset=ISO-2022-JP\r\n",
    ),
    "998-octet-lines": msg(b"x" * 998 + b"\r\n" + b"." + b"y" * 997 + b"\r\n"),
    "dot-lines": msg(b".\r\n..\r\n.leading dot\r\nend\r\n.\r\n"),
    "starts-with-dot-body": msg(b".\r\n"),
    "no-final-crlf-body": msg(b"last line"),
    "empty-body": msg(b""),
}


@pytest.mark.asyncio
@pytest.mark.parametrize("name", list(CASES))
async def test_bytes_arrive_identical(name: str, sink: Any, guard_factory: Any) -> None:
    up, up_port = sink
    guard = await guard_factory(guard_config(up_port))
    raw = CASES[name]
    opts = ["SMTPUTF8", "BODY=8BITMIME"] if any(b > 127 for b in raw) else []
    errors, reply = await aiosmtplib.send(raw, port=guard.port, mail_options=opts, **SEND)
    assert errors == {}
    assert "queued as UP1" in reply
    expected = raw if raw.endswith(b"\r\n") or not raw else raw + b"\r\n"
    assert up.got == [("a@example.co.jp", ["b@partner.co.jp"], expected)]


async def raw_session(port: int, chunks: list[bytes], *, pause: float = 0.0) -> list[bytes]:
    """Speak SMTP by hand: EHLO/MAIL/RCPT/DATA, then `chunks` written one by one."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    replies: list[bytes] = [await reader.readline()]

    async def cmd(line: bytes) -> bytes:
        writer.write(line)
        await writer.drain()
        out = b""
        while True:
            ln = await reader.readline()
            out += ln
            if ln[3:4] != b"-":
                return out

    for line in (b"EHLO c.test\r\n", b"MAIL FROM:<a@example.co.jp>\r\n", b"RCPT TO:<b@x.jp>\r\n"):
        replies.append(await cmd(line))
    replies.append(await cmd(b"DATA\r\n"))
    for c in chunks:
        writer.write(c)
        await writer.drain()
        if pause:
            await asyncio.sleep(pause)
    replies.append(await asyncio.wait_for(reader.readline(), 10))
    replies.append(await cmd(b"QUIT\r\n"))
    writer.close()
    return replies


@pytest.mark.asyncio
async def test_terminator_split_across_writes(sink: Any, guard_factory: Any) -> None:
    up, up_port = sink
    guard = await guard_factory(guard_config(up_port))
    body = msg(b"line\r\n..dotted\r\n")
    wire = body.replace(b"\r\n..dotted", b"\r\n...dotted") + b".\r\n"
    # every split point inside the last 8 bytes, i.e. across "\r\n.\r\n"
    for cut in range(len(wire) - 8, len(wire)):
        replies = await raw_session(guard.port, [wire[:cut], wire[cut:]], pause=0.02)
        assert replies[-2].startswith(b"250"), (cut, replies)
    assert all(g[2] == body for g in up.got)
    assert len(up.got) == 8


@pytest.mark.asyncio
async def test_byte_by_byte_and_empty_message(sink: Any, guard_factory: Any) -> None:
    up, up_port = sink
    guard = await guard_factory(guard_config(up_port))
    wire = b"Subject: x\r\n\r\n..\r\n.\r\n"
    replies = await raw_session(guard.port, [bytes([b]) for b in wire])
    assert replies[-2].startswith(b"250")
    replies = await raw_session(guard.port, [b".\r\n"])  # empty message: terminator at once
    assert replies[-2].startswith(b"250")
    replies = await raw_session(guard.port, [b"\r\n.\r\n"])  # one empty line
    assert replies[-2].startswith(b"250")
    assert [g[2] for g in up.got] == [b"Subject: x\r\n\r\n.\r\n", b"", b"\r\n"]


@pytest.mark.asyncio
async def test_pipelined_command_after_dot_is_not_swallowed(sink: Any, guard_factory: Any) -> None:
    up, up_port = sink
    guard = await guard_factory(guard_config(up_port))
    reader, writer = await asyncio.open_connection("127.0.0.1", guard.port)
    writer.write(
        b"EHLO c\r\nMAIL FROM:<a@x.jp>\r\nRCPT TO:<b@y.jp>\r\nDATA\r\n"
        b"Subject: p\r\n\r\nhello\r\n.\r\nNOOP\r\nQUIT\r\n"
    )
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 10)
    codes = [ln[:3] for ln in data.split(b"\r\n") if ln[3:4] == b" "]
    assert codes == [b"220", b"250", b"250", b"250", b"354", b"250", b"250", b"221"], data
    assert up.got[0][2] == b"Subject: p\r\n\r\nhello\r\n"


@pytest.mark.asyncio
async def test_bare_lf_is_normalised_for_upstream(sink: Any, guard_factory: Any) -> None:
    up, up_port = sink
    guard = await guard_factory(guard_config(up_port))
    replies = await raw_session(guard.port, [b"Subject: x\n\nbare\nlf\r\n.\r\n"])
    assert replies[-2].startswith(b"250")
    assert up.got[0][2] == b"Subject: x\r\n\r\nbare\r\nlf\r\n"


@pytest.mark.asyncio
async def test_line_too_long_is_refused_after_draining(sink: Any, guard_factory: Any) -> None:
    up, up_port = sink
    guard = await guard_factory(guard_config(up_port))
    replies = await raw_session(guard.port, [b"Subject: x\r\n\r\n" + b"z" * 1001 + b"\r\n.\r\n"])
    assert replies[-2].startswith(b"500")
    assert replies[-1].startswith(b"221")  # the session is still in step
    assert up.got == []


@pytest.mark.asyncio
async def test_oversize_552_by_size_param_and_by_data(sink: Any, guard_factory: Any) -> None:
    up, up_port = sink
    guard = await guard_factory(guard_config(up_port, max_message_size=10_000))
    big = msg(b"x" * 100 + b"\r\n") * 200
    with pytest.raises(aiosmtplib.SMTPSenderRefused) as e1:  # aiosmtplib sends SIZE=
        await aiosmtplib.send(big, port=guard.port, **SEND)
    assert e1.value.code == 552
    replies = await raw_session(guard.port, [big + b".\r\n"])  # no SIZE: refused after DATA
    assert replies[-2].startswith(b"552")
    assert up.got == []
    await aiosmtplib.send(msg(), port=guard.port, **SEND)  # still serving
    assert len(up.got) == 1


@pytest.mark.asyncio
async def test_large_message_is_spooled_and_identical(sink: Any, guard_factory: Any) -> None:
    up, up_port = sink
    guard = await guard_factory(guard_config(up_port, spool_threshold=64 * 1024))
    body = b"".join(b".%06d " % i + b"a" * 70 + b"\r\n" for i in range(20000))  # ~1.6 MB
    raw = msg(body)
    await aiosmtplib.send(raw, port=guard.port, **SEND)
    assert up.got[0][2] == raw


@pytest.mark.asyncio
async def test_upstream_refused_connection_answers_451(guard_factory: Any) -> None:
    from conftest import free_port

    guard = await guard_factory(guard_config(free_port()))
    with pytest.raises(aiosmtplib.SMTPDataError) as err:
        await aiosmtplib.send(msg(), port=guard.port, **SEND)
    assert err.value.code == 451


@pytest.mark.asyncio
async def test_upstream_silent_times_out_451(guard_factory: Any) -> None:
    async def mute(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(30)  # accepts, never greets

    server = await asyncio.start_server(mute, "127.0.0.1", 0)
    guard = await guard_factory(guard_config(port_of(server)))
    loop = asyncio.get_running_loop()
    t = loop.time()
    with pytest.raises(aiosmtplib.SMTPDataError) as err:
        await aiosmtplib.send(msg(), port=guard.port, timeout=20, **SEND)
    assert err.value.code == 451
    assert loop.time() - t < 8  # the connect timeout (2 s) bounded it
    server.close()


@pytest.mark.asyncio
async def test_upstream_closes_mid_session_451(guard_factory: Any) -> None:
    async def rude(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 rude ESMTP\r\n")
        await reader.readline()
        writer.write(b"250 rude\r\n")
        await reader.readline()
        writer.close()  # drop at MAIL

    server = await asyncio.start_server(rude, "127.0.0.1", 0)
    guard = await guard_factory(guard_config(port_of(server)))
    with pytest.raises(aiosmtplib.SMTPDataError) as err:
        await aiosmtplib.send(msg(), port=guard.port, **SEND)
    assert err.value.code == 451
    server.close()


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("upstream", "code", "text"),
    [
        ("554 5.7.1 rejected: spam", 554, "5.7.1 rejected: spam"),
        ("452 4.3.1 insufficient storage", 451, "4.3.1 insufficient storage"),
    ],
)
async def test_upstream_final_reply_class_is_kept(
    upstream: str, code: int, text: str, guard_factory: Any
) -> None:
    s = Sink(reply=upstream)
    server = await serve_sink(s)
    guard = await guard_factory(guard_config(port_of(server)))
    with pytest.raises(aiosmtplib.SMTPDataError) as err:
        await aiosmtplib.send(msg(), port=guard.port, **SEND)
    assert (err.value.code, err.value.message) == (code, text)
    server.close()


@pytest.mark.asyncio
async def test_partial_recipients_never_vanish(guard_factory: Any) -> None:
    s = Sink(rcpt_reply={"gone@partner.co.jp": "550 5.1.1 no such user", "busy@x.jp": "450 busy"})
    server = await serve_sink(s)
    guard = await guard_factory(guard_config(port_of(server)))
    with pytest.raises(aiosmtplib.SMTPDataError) as err:
        await aiosmtplib.send(
            msg(), port=guard.port, sender="a@example.co.jp",
            recipients=["ok@partner.co.jp", "gone@partner.co.jp"], hostname="127.0.0.1",
        )  # fmt: skip
    assert err.value.code == 550 and "gone@partner.co.jp" in err.value.message
    with pytest.raises(aiosmtplib.SMTPDataError) as err:
        await aiosmtplib.send(
            msg(), port=guard.port, sender="a@example.co.jp",
            recipients=["ok@partner.co.jp", "gone@partner.co.jp", "busy@x.jp"],
            hostname="127.0.0.1",
        )  # fmt: skip
    assert err.value.code == 451 and "busy@x.jp" in err.value.message
    assert s.got == []  # nobody got a copy, so the client's retry/bounce covers everyone
    server.close()


@pytest.mark.asyncio
async def test_handler_exception_answers_451_and_keeps_serving(
    sink: Any, guard_factory: Any, caplog: pytest.LogCaptureFixture, monkeypatch: Any
) -> None:
    import mailguard.pipeline

    up, up_port = sink
    real = mailguard.pipeline.analyze_view

    def flaky(view: Any, *a: Any, **kw: Any) -> Any:  # a bug inside the checks, injected
        if "boom" in view.subject:
            raise RuntimeError("injected failure")
        return real(view, *a, **kw)

    monkeypatch.setattr(mailguard.pipeline, "analyze_view", flaky)
    guard = await guard_factory(guard_config(up_port))
    boom = msg().replace(b"Subject: hi", b"Subject: boom")
    with caplog.at_level(logging.ERROR), pytest.raises(aiosmtplib.SMTPDataError) as err:
        await aiosmtplib.send(boom, port=guard.port, **SEND)
    assert err.value.code == 451
    assert "injected failure" in caplog.text
    # same connection, next transaction, works
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=guard.port)
    async with client:
        with pytest.raises(aiosmtplib.SMTPDataError):
            await client.sendmail("a@example.co.jp", ["b@partner.co.jp"], boom)
        await client.sendmail("a@example.co.jp", ["b@partner.co.jp"], msg())
    assert len(up.got) == 1


@pytest.mark.asyncio
async def test_client_outside_allowed_networks_is_refused(sink: Any, guard_factory: Any) -> None:
    up, up_port = sink
    guard = await guard_factory(guard_config(up_port, allowed_networks=("192.0.2.0/24",)))
    reader, writer = await asyncio.open_connection("127.0.0.1", guard.port)
    greeting = await reader.readline()
    assert greeting.startswith(b"554 5.7.1")
    assert await reader.read() == b""  # closed
    writer.close()
    assert up.got == []


@pytest.mark.asyncio
async def test_xforward_is_accepted_logged_and_forwarded(
    guard_factory: Any, caplog: pytest.LogCaptureFixture
) -> None:
    s = Sink()
    server = await serve_sink(s, xforward=True)
    guard = await guard_factory(guard_config(port_of(server)))
    caplog.set_level(logging.INFO, logger="mailguard.pipeline")
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=guard.port)
    async with client:
        assert client.supports_extension("xforward")
        r = await client.execute_command(b"XFORWARD", b"NAME=mx.example.co.jp", b"ADDR=192.0.2.7")
        assert r.code == 250
        r = await client.execute_command(b"XFORWARD", b"IDENT=4XyZ1Q2w3", b"PROTO=ESMTP")
        assert r.code == 250
        await client.sendmail("a@example.co.jp", ["b@partner.co.jp"], msg())
        await client.sendmail("a@example.co.jp", ["b@partner.co.jp"], msg())  # no XFORWARD
    lines = [r.getMessage() for r in caplog.records if r.name == "mailguard.pipeline"]
    assert lines[0].startswith("4XyZ1Q2w3: id=") and lines[1].startswith("-: id="), lines
    assert s.xforward[0] == {
        "NAME": "mx.example.co.jp", "ADDR": "192.0.2.7", "IDENT": "4XyZ1Q2w3", "PROTO": "ESMTP",
    }  # fmt: skip
    assert s.xforward[1] == {}
    server.close()


@pytest.mark.asyncio
async def test_before_queue_log_line_carries_the_upstreams_queue_id(
    guard_factory: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Before-queue, Postfix sends XFORWARD IDENT=[UNAVAILABLE]: the log line takes the id from
    the upstream's "queued as …" instead, so one id ties Postfix's log and ours."""
    s = Sink(reply="250 2.0.0 Ok: queued as 4dK9xQ2hZ7z")
    server = await serve_sink(s, xforward=True)
    guard = await guard_factory(guard_config(port_of(server)))
    caplog.set_level(logging.INFO, logger="mailguard.pipeline")
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=guard.port)
    async with client:
        r = await client.execute_command(b"XFORWARD", b"IDENT=[UNAVAILABLE]", b"PROTO=ESMTP")
        assert r.code == 250
        await client.sendmail("a@example.co.jp", ["b@partner.co.jp"], msg())
    lines = [r.getMessage() for r in caplog.records if r.name == "mailguard.pipeline"]
    assert lines[0].startswith("4dK9xQ2hZ7z: id="), lines
    server.close()


@pytest.mark.asyncio
async def test_pool_survives_upstream_closing_idle_connections(guard_factory: Any) -> None:
    s = Sink()
    server = await serve_sink(s, idle=0.3)  # the upstream drops connections idle for 0.3 s
    guard = await guard_factory(guard_config(port_of(server)))
    for _ in range(3):
        await aiosmtplib.send(msg(), port=guard.port, **SEND)
        await asyncio.sleep(0.6)
    assert len(s.got) == 3
    server.close()


@pytest.mark.asyncio
async def test_pool_reuses_connections(sink: Any, guard_factory: Any) -> None:
    up, up_port = sink
    guard = await guard_factory(guard_config(up_port))
    for _ in range(20):
        await aiosmtplib.send(msg(), port=guard.port, **SEND)
    assert len(up.got) == 20
    assert guard.upstream is not None and guard.upstream.transport.open_connections == 1


@pytest.mark.asyncio
async def test_stale_pooled_connection_is_retried(sink: Any) -> None:
    """The upstream closed an idle pooled connection without us noticing: one retry, no loss."""
    up, up_port = sink
    t = SmtpTransport("127.0.0.1", up_port, connect_timeout=2, command_timeout=3)
    env = Envelope("a@x.jp", ["b@y.jp"])
    assert (await t.send(env, b"Subject: 1\r\n\r\n")).code == 250
    conn = t._idle[0]
    assert conn.smtp.protocol is not None and conn.smtp.protocol.transport is not None
    # make the socket dead under aiosmtplib's feet without it seeing connection_lost yet
    sock = conn.smtp.protocol.transport.get_extra_info("socket")
    import socket as _s

    sock.shutdown(_s.SHUT_RDWR)
    reply = await t.send(env, b"Subject: 2\r\n\r\n")
    assert reply.code == 250, reply
    assert [g[2] for g in up.got] == [b"Subject: 1\r\n\r\n", b"Subject: 2\r\n\r\n"]
    await t.close()


def test_smtplib_client_and_reply_format(thread_sink: Any) -> None:
    """The stdlib client (what most scripts use) against a server in its own thread."""
    import threading

    from conftest import PASS_ALL

    from mailguard.app import Service

    loop = asyncio.new_event_loop()
    srv = Service(guard_config(thread_sink.port), policy=PASS_ALL)
    loop.run_until_complete(srv.start())
    th = threading.Thread(target=loop.run_forever, daemon=True)
    th.start()
    try:
        with smtplib.SMTP("127.0.0.1", srv.port, timeout=10) as c:
            c.ehlo("client.test")
            assert c.has_extn("8bitmime") and c.has_extn("smtputf8") and c.has_extn("size")
            refused = c.sendmail("a@example.co.jp", ["b@partner.co.jp"], msg())
            assert refused == {}
    finally:
        asyncio.run_coroutine_threadsafe(srv.stop(grace=1), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        th.join(5)
    assert thread_sink.sink.got[0][2] == msg()


def test_reply_multiline_rendering() -> None:
    assert str(Reply(250, "a\nb")) == "250-a\r\n250 b"
    assert str(Reply(451, "4.3.0 x")) == "451 4.3.0 x"


@pytest.mark.asyncio
async def test_fast_protocol_init_matches_aiosmtpd_init() -> None:
    """The copied-template path must build the same per-connection state as aiosmtpd does."""
    from mailguard.smtp import FrontHandler, GuardSMTP, Networks

    handler = FrontHandler(lambda e, m: None)  # type: ignore[arg-type,return-value]
    kw = {"networks": Networks(["127.0.0.0/8"]), "hostname": "h.test"}
    first, second = GuardSMTP(handler, **kw), GuardSMTP(handler, **kw)  # type: ignore[arg-type]
    assert sorted(vars(first)) == sorted(vars(second))
    assert all(m.__self__ is second for m in second._smtp_methods.values())
    assert second._stream_reader is not first._stream_reader
    assert second._handle_hooks.keys() == first._handle_hooks.keys()


@pytest.mark.asyncio
async def test_null_sender_is_relayed_as_null(sink: Any, guard_factory: Any) -> None:
    up, up_port = sink
    guard = await guard_factory(guard_config(up_port))

    def send_null() -> None:  # smtplib writes MAIL FROM:<> for ""; aiosmtplib refuses it
        with smtplib.SMTP("127.0.0.1", guard.port, timeout=10) as c:
            c.sendmail("", ["b@x.jp"], msg())

    await asyncio.to_thread(send_null)
    assert up.got[0][0] == "<>"  # what aiosmtpd's sink records for MAIL FROM:<>


# ------------------------------------------------- on_connect_error / on_open (the metrics hooks)


class Hooks:
    """Records what SmtpTransport reports: connection errors and open/close deltas."""

    def __init__(self) -> None:
        self.errors = 0
        self.deltas: list[int] = []

    def error(self) -> None:
        self.errors += 1

    def opened(self, delta: int) -> None:
        self.deltas.append(delta)

    def transport(self, port: int, **kw: Any) -> SmtpTransport:
        kw.setdefault("connect_timeout", 1)
        kw.setdefault("command_timeout", 1)
        return SmtpTransport(
            "127.0.0.1", port, on_connect_error=self.error, on_open=self.opened, **kw
        )


ENV = Envelope("a@x.jp", ["b@y.jp"])


@pytest.mark.asyncio
async def test_hooks_refused_port_counts_every_attempt() -> None:
    from conftest import free_port

    h = Hooks()
    t = h.transport(free_port())  # nothing listens: connection refused
    assert (await t.send(ENV, b"Subject: 1\r\n\r\n")).code == 451
    assert (await t.send(ENV, b"Subject: 2\r\n\r\n")).code == 451
    assert await t.probe() is False
    assert h.errors == 3 and h.deltas == []
    assert t.open_connections == 0


@pytest.mark.asyncio
async def test_hooks_silent_upstream_is_a_connect_timeout() -> None:
    async def mute(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(10)  # accepts, never greets

    server = await asyncio.start_server(mute, "127.0.0.1", 0)
    h = Hooks()
    t = h.transport(port_of(server), connect_timeout=0.3)
    assert (await t.send(ENV, b"Subject: 1\r\n\r\n")).code == 451
    assert h.errors == 1 and h.deltas == []
    server.close()


@pytest.mark.asyncio
@pytest.mark.parametrize("drop_at", [b"EHLO", b"MAIL"])
async def test_hooks_dropped_connection(drop_at: bytes) -> None:
    async def rude(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 rude ESMTP\r\n")
        if drop_at == b"MAIL":
            await reader.readline()
            writer.write(b"250 rude\r\n")
        await reader.readline()
        writer.close()

    server = await asyncio.start_server(rude, "127.0.0.1", 0)
    h = Hooks()
    t = h.transport(port_of(server))
    assert (await t.send(ENV, b"Subject: 1\r\n\r\n")).code == 451
    assert h.errors == 1
    # dropped at EHLO: never counted as open; dropped at MAIL: opened, then closed once
    assert h.deltas == ([] if drop_at == b"EHLO" else [1, -1])
    assert t.open_connections == sum(h.deltas) == 0
    server.close()


@pytest.mark.asyncio
async def test_hooks_pool_open_and_close(sink: Any) -> None:
    up, up_port = sink
    h = Hooks()
    t = h.transport(up_port)
    for i in range(5):
        assert (await t.send(ENV, b"Subject: %d\r\n\r\n" % i)).code == 250
    assert await t.probe() is True
    assert h.deltas == [1] and t.open_connections == 1  # one pooled connection, reused
    await t.close()
    assert h.deltas == [1, -1] and t.open_connections == 0
    assert h.errors == 0 and len(up.got) == 5


@pytest.mark.asyncio
async def test_hooks_concurrent_sends_open_several(sink: Any) -> None:
    up, up_port = sink
    up.delay = 0.2  # transactions overlap: each needs its own connection
    h = Hooks()
    t = h.transport(up_port, pool_size=2)
    replies = await asyncio.gather(*(t.send(ENV, b"Subject: c\r\n\r\n") for _ in range(4)))
    assert [r.code for r in replies] == [250] * 4
    assert h.deltas.count(1) == 4
    assert sum(h.deltas) == t.open_connections == 2  # the pool keeps two, closes the rest
    await t.close()
    assert sum(h.deltas) == 0 and h.errors == 0


@pytest.mark.asyncio
async def test_hooks_stale_pooled_connection_is_not_an_error(sink: Any) -> None:
    import socket as _s

    _, up_port = sink
    h = Hooks()
    t = h.transport(up_port)
    assert (await t.send(ENV, b"Subject: 1\r\n\r\n")).code == 250
    conn = t._idle[0]
    assert conn.smtp.protocol is not None and conn.smtp.protocol.transport is not None
    conn.smtp.protocol.transport.get_extra_info("socket").shutdown(_s.SHUT_RDWR)
    assert (await t.send(ENV, b"Subject: 2\r\n\r\n")).code == 250
    assert h.errors == 0
    assert h.deltas == [1, -1, 1]
    await t.close()


@pytest.mark.asyncio
async def test_hooks_feed_the_real_metrics(sink: Any) -> None:
    from conftest import free_port
    from prometheus_client.parser import text_string_to_metric_families

    from mailguard.metrics import Metrics

    mx = Metrics()
    _, up_port = sink

    def gauge(delta: int) -> None:
        mx.upstream_connections_open.inc(delta)

    good = SmtpTransport(
        "127.0.0.1", up_port, on_connect_error=mx.upstream_connection_errors.inc, on_open=gauge
    )
    bad = SmtpTransport(
        "127.0.0.1", free_port(), on_connect_error=mx.upstream_connection_errors.inc, on_open=gauge
    )
    assert (await good.send(ENV, b"Subject: 1\r\n\r\n")).code == 250
    assert (await bad.send(ENV, b"Subject: 1\r\n\r\n")).code == 451

    def scrape() -> dict[str, float]:
        body, _ = mx.render()
        return {
            s.name: s.value
            for f in text_string_to_metric_families(body.decode())
            for s in f.samples
        }

    s = scrape()
    assert s["mailguard_upstream_connection_errors_total"] == 1
    assert s["mailguard_upstream_connections_open"] == 1
    await good.close()
    assert scrape()["mailguard_upstream_connections_open"] == 0


@pytest.mark.asyncio
async def test_hook_failure_does_not_fail_delivery(sink: Any) -> None:
    up, up_port = sink

    def broken(*_: Any) -> None:
        raise RuntimeError("metrics down")

    t = SmtpTransport("127.0.0.1", up_port, on_connect_error=broken, on_open=broken)
    assert (await t.send(ENV, b"Subject: 1\r\n\r\n")).code == 250
    await t.close()
    assert len(up.got) == 1


# -- international addresses (issue 12 item 4) -------------------------------------------------


@dataclass
class _OptsSink(Sink):
    """A Sink that also records the MAIL parameters it was given."""

    mail_options: list[list[str]] = field(default_factory=list)

    async def handle_DATA(self, server, session, envelope) -> str:  # type: ignore[no-untyped-def]
        self.mail_options.append(list(envelope.mail_options))
        return await super().handle_DATA(server, session, envelope)


async def _sink_server(sink: Sink, *, smtputf8: bool) -> Any:
    from aiosmtpd.smtp import SMTP

    loop = asyncio.get_running_loop()
    return await loop.create_server(
        lambda: SMTP(sink, hostname="sink.test", enable_SMTPUTF8=smtputf8), "127.0.0.1", 0
    )


@pytest.mark.asyncio
async def test_non_ascii_envelope_goes_out_with_smtputf8_unasked() -> None:
    """The notifier's envelope carries no SMTPUTF8 option: the relay adds it itself."""
    up = _OptsSink()
    server = await _sink_server(up, smtputf8=True)
    t = SmtpTransport("127.0.0.1", port_of(server), connect_timeout=2, command_timeout=3)
    for env in (
        Envelope("mailguard@example.co.jp", ["山田@example.co.jp"]),  # a notice to 山田
        Envelope("山田@example.co.jp", ["b@partner.co.jp"]),
    ):
        reply = await t.send(env, b"Subject: n\r\n\r\nhi\r\n")
        assert reply.code == 250, reply
    assert [(g[0], g[1]) for g in up.got] == [
        ("mailguard@example.co.jp", ["山田@example.co.jp"]),
        ("山田@example.co.jp", ["b@partner.co.jp"]),
    ]
    assert all("SMTPUTF8" in o for o in up.mail_options), up.mail_options
    # an ASCII envelope is not marked SMTPUTF8
    assert (await t.send(Envelope("a@x.jp", ["b@y.jp"]), b"Subject: a\r\n\r\n")).code == 250
    assert "SMTPUTF8" not in up.mail_options[-1]
    await t.close()
    server.close()


@pytest.mark.asyncio
async def test_non_ascii_envelope_without_upstream_smtputf8_is_a_permanent_refusal() -> None:
    up = Sink()
    server = await _sink_server(up, smtputf8=False)
    t = SmtpTransport("127.0.0.1", port_of(server), connect_timeout=2, command_timeout=3)
    for env in (
        Envelope("mailguard@example.co.jp", ["山田@example.co.jp"]),
        Envelope("山田@example.co.jp", ["b@partner.co.jp"], mail_options=["SMTPUTF8"]),
    ):
        reply = await t.send(env, b"Subject: n\r\n\r\nhi\r\n")  # must not raise
        assert reply.code == 550 and reply.text.startswith("5.6.7"), reply
    assert up.got == []
    # the pooled connection is still good for the next (ASCII) message
    assert (await t.send(Envelope("a@x.jp", ["b@y.jp"]), b"Subject: a\r\n\r\n")).code == 250
    assert len(up.got) == 1 and t.open_connections == 1
    await t.close()
    server.close()


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "env",
    [
        Envelope("a@x.jp", ["b@y.jp>\r\nRCPT TO:<victim@z.jp"]),
        Envelope("a@x.jp\r\nRSET", ["b@y.jp"]),
        Envelope("a@x.jp", ["b\x00@y.jp"]),
    ],
)
async def test_control_characters_in_an_address_never_reach_the_upstream(
    env: Envelope, sink: Any
) -> None:
    up, up_port = sink
    t = SmtpTransport("127.0.0.1", up_port, connect_timeout=2, command_timeout=3)
    reply = await t.send(env, b"Subject: x\r\n\r\n")
    assert reply.code == 553 and reply.text.startswith("5.1.3"), reply
    assert up.got == []
    await t.close()


# -- upstream PIPELINING (RFC 2920): one write for XFORWARD/MAIL/RCPT…/DATA --------------------


@dataclass
class _PipeliningSink(Sink):
    """An aiosmtpd sink that announces PIPELINING (aiosmtpd reads pipelined commands in order)."""

    async def handle_EHLO(self, server, session, envelope, hostname, responses):  # type: ignore[no-untyped-def]
        session.host_name = hostname
        responses.insert(len(responses) - 1, "250-PIPELINING")
        return responses


@pytest.mark.asyncio
@pytest.mark.parametrize("replies", ["one-segment", "one-per-segment", "back-to-back"])
async def test_pipelined_envelope_is_one_write_and_every_reply_is_read(replies: str) -> None:
    """The upstream sees MAIL, both RCPTs and DATA before it answers anything (a client waiting
    for MAIL's reply would hang here); its replies may come together or one by one."""
    got: list[bytes] = []

    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 up ESMTP\r\n")
        await reader.readline()  # EHLO
        writer.write(b"250-up\r\n250-PIPELINING\r\n250-XFORWARD NAME ADDR IDENT\r\n250 SIZE\r\n")
        for _ in range(2):
            group = b""
            while not group.endswith(b"DATA\r\n"):
                group += await reader.read(4096)
            got.append(group)
            answers = [b"250 2.0.0 Ok\r\n"] * 4 + [b"354 go on\r\n"]
            if replies == "one-segment":
                writer.write(b"".join(answers))
            else:
                for a in answers:  # separate segments, paused or straight after each other
                    writer.write(a)
                    await writer.drain()
                    await asyncio.sleep(0.01 if replies == "one-per-segment" else 0)
            body = await reader.readuntil(b"\r\n.\r\n")
            got.append(body)
            writer.write(b"250 2.0.0 Ok: queued as P1\r\n")
        await reader.read()
        writer.close()

    server = await asyncio.start_server(upstream, "127.0.0.1", 0)
    t = SmtpTransport("127.0.0.1", port_of(server), connect_timeout=2, command_timeout=3)
    env = Envelope("a@x.jp", ["b@y.jp", "c@y.jp"], xforward={"NAME": "mx.x.jp", "IDENT": "Q1"})
    for _ in range(2):  # the second on the pooled connection: no reply left over in between
        reply = await t.send(env, b"Subject: p\r\n\r\n.dot\r\n")
        assert (reply.code, reply.text) == (250, "2.0.0 Ok: queued as P1")
    assert t.open_connections == 1
    await t.close()
    server.close()
    assert got[0] == (
        b"XFORWARD NAME=mx.x.jp IDENT=Q1\r\nMAIL FROM:<a@x.jp> SIZE=20\r\n"
        b"RCPT TO:<b@y.jp>\r\nRCPT TO:<c@y.jp>\r\nDATA\r\n"
    )
    assert got[1] == b"Subject: p\r\n\r\n..dot\r\n.\r\n"


@pytest.mark.asyncio
async def test_pipelined_partial_recipients_never_vanish() -> None:
    """Partial refusal with DATA answered 354: nothing is delivered (the connection is closed
    inside DATA), the answer names the refused recipient, and the next message goes out."""
    s = _PipeliningSink(rcpt_reply={"gone@y.jp": "550 5.1.1 no such user", "busy@y.jp": "450 busy"})
    server = await serve_sink(s)
    t = SmtpTransport("127.0.0.1", port_of(server), connect_timeout=2, command_timeout=3)
    r = await t.send(Envelope("a@x.jp", ["ok@y.jp", "gone@y.jp"]), b"Subject: 1\r\n\r\n")
    assert r.code == 550 and "gone@y.jp" in r.text, r
    r = await t.send(Envelope("a@x.jp", ["ok@y.jp", "gone@y.jp", "busy@y.jp"]), b"S: 2\r\n\r\n")
    assert r.code == 451 and "busy@y.jp" in r.text, r
    r = await t.send(Envelope("a@x.jp", ["gone@y.jp"]), b"Subject: 3\r\n\r\n")  # DATA: 503
    assert (r.code, r.text) == (550, "5.1.1 no such user"), r
    assert s.got == []
    r = await t.send(Envelope("a@x.jp", ["ok@y.jp"]), b"Subject: 4\r\n\r\n")
    assert r.code == 250, r
    assert [g[2] for g in s.got] == [b"Subject: 4\r\n\r\n"]
    await t.close()
    server.close()


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("upstream", "code", "text"),
    [
        ("554 5.7.1 rejected: spam", 554, "5.7.1 rejected: spam"),
        ("452 4.3.1 insufficient storage", 451, "4.3.1 insufficient storage"),
    ],
)
async def test_pipelined_final_reply_class_is_kept(
    upstream: str, code: int, text: str, guard_factory: Any
) -> None:
    s = _PipeliningSink(reply=upstream)
    server = await serve_sink(s)
    guard = await guard_factory(guard_config(port_of(server)))
    with pytest.raises(aiosmtplib.SMTPDataError) as err:
        await aiosmtplib.send(msg(), port=guard.port, **SEND)
    assert (err.value.code, err.value.message) == (code, text)
    s.reply = "250 2.0.0 Ok: queued as UP1"
    names = ("plain", "dot-lines", "998-octet-lines", "starts-with-dot-body")
    for name in names:
        await aiosmtplib.send(CASES[name], port=guard.port, **SEND)
    assert [g[2] for g in s.got] == [CASES[n] for n in names]  # the original bytes
    server.close()
