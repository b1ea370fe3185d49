"""Test helpers for the queue/web/notify/scheduler tests: a real aiosmtpd sink, a settable clock."""

from __future__ import annotations

import asyncio
import email
import email.policy
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP

from mailguard.checks.finding import Finding
from mailguard.envelope import Envelope
from mailguard.notify.render import Notifier
from mailguard.policy.decision import Decision, Gate
from mailguard.queue.service import HoldService
from mailguard.queue.sqlite import SqliteStore
from mailguard.relay.smtp import SmtpTransport
from mailguard.scheduler import Scheduler

SECRET = b"test-secret-0123456789abcdef"
SENDER = "taro@example.co.jp"
RCPTS = ["a@partner.co.jp", "b@other.example.com", "c@example.co.jp"]
RAW = (
    b"From: Taro <taro@example.co.jp>\r\n"
    b"To: a@partner.co.jp, b@other.example.com\r\n"
    b"Cc: c@example.co.jp\r\n"
    b"Subject: =?UTF-8?B?5pyI5qyh5aCx5ZGK?=\r\n"
    b"Message-ID: <orig-1@example.co.jp>\r\n"
    b"\r\n"
    b"body line 1\r\n.leading dot line\r\n"
)
SUMMARY: dict[str, Any] = {
    "subject": "月次報告",
    "from": SENDER,
    "to": ["a@partner.co.jp", "b@other.example.com"],
    "cc": ["c@example.co.jp"],
    "internal": ["c@example.co.jp"],
    "external": ["a@partner.co.jp", "b@other.example.com"],
    "attachments": [
        {"filename": "顧客リスト.xlsx", "size": 48213, "content_type": "application/vnd.ms-excel"}
    ],
    "findings": [
        {
            "code": "recipient.visible_external",
            "reason_en": "2 external addresses from 2 domains are visible in To/Cc",
            "reason_ja": "To/Cc に 2 ドメインの社外アドレス 2 件が見えています",
        }
    ],
    "rules": ["bcc-mistake"],
}
FINDING = Finding(
    "recipient.visible_external",
    "2 external addresses from 2 domains are visible in To/Cc",
    "To/Cc に 2 ドメインの社外アドレス 2 件が見えています",
    count=2,
)


@dataclass
class Sink:
    """Stands in for Postfix's :10026; `reply` decides what it answers at end of DATA."""

    got: list[tuple[str, list[str], bytes]] = field(default_factory=list)
    reply: str = "250 2.0.0 Ok: queued as UP1"
    replies: dict[str, str] = field(default_factory=dict)  # by MAIL FROM, overrides `reply`

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        reply = self.replies.get(envelope.mail_from, self.reply)
        if reply.startswith("2"):
            self.got.append(
                (envelope.mail_from, list(envelope.rcpt_tos), envelope.original_content)
            )
        return reply

    def messages(self) -> list[email.message.Message]:
        return [email.message_from_bytes(raw, policy=email.policy.default) for *_, raw in self.got]

    def of_kind(self, kind: str) -> list[tuple[str, list[str], bytes]]:
        needle = f"X-MailGuard-Notice: {kind};".encode()
        return [g for g in self.got if needle in g[2]]

    def originals(self) -> list[tuple[str, list[str], bytes]]:
        return [g for g in self.got if b"X-MailGuard-Notice:" not in g[2]]


async def serve(handler: object, port: int = 0) -> tuple[asyncio.Server, int]:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTP(handler, loop=loop, hostname="sink.test"), "127.0.0.1", port
    )
    return server, server.sockets[0].getsockname()[1]


async def stop(server: asyncio.Server) -> None:
    server.close()
    await server.wait_closed()


class Clock:
    """A settable clock (aware UTC)."""

    def __init__(self, start: datetime | None = None) -> None:
        self.now = start or datetime.now(UTC).replace(microsecond=0)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **kw: float) -> datetime:
        self.now += timedelta(**kw)
        return self.now


def transport(port: int) -> SmtpTransport:
    # pool_size=0: every send opens a fresh connection, so "upstream down" is really down
    return SmtpTransport("127.0.0.1", port, connect_timeout=2, command_timeout=5, pool_size=0)


def envelope(sender: str = SENDER, rcpts: list[str] | None = None) -> Envelope:
    return Envelope(
        sender,
        list(rcpts or RCPTS),
        mail_options=["BODY=8BITMIME"],
        xforward={"IDENT": "4XyZ1"},
        client_addr="127.0.0.1",
    )


def decision(gate: Gate, **kw: Any) -> Decision:
    return Decision(gate=gate, rules=("bcc-mistake",), findings=(FINDING,), **kw)


@dataclass
class Rig:
    """Store + service + notifier + scheduler wired like the server wires them."""

    store: SqliteStore
    service: HoldService
    notifier: Notifier
    scheduler: Scheduler
    clock: Clock
    transport: SmtpTransport


async def rig(
    db: Path, port: int, clock: Clock | None = None, *, charset: str = "utf-8", lang: str = "ja"
) -> Rig:
    clock = clock or Clock()
    store = SqliteStore(db)
    await store.open()
    tr = transport(port)
    service = HoldService(store, public_url="http://guard.test", clock=clock)
    notifier = Notifier(
        tr,
        "mailguard@example.co.jp",
        charset=charset,
        lang=lang,
        secret=SECRET,
        public_url="http://guard.test",
    )
    sched = Scheduler(
        store,
        tr,
        notifier,
        clock=clock,
        backoff=timedelta(seconds=30),
        reporting_mta="guard.test",
    )
    return Rig(store, service, notifier, sched, clock, tr)


async def close(r: Rig) -> None:
    await r.transport.close()
    await r.store.close()


def link_of(raw: bytes) -> str:
    """The confirm link in a rendered notice (from its text part)."""
    import re

    msg = email.message_from_bytes(raw, policy=email.policy.default)
    part = msg.get_body(("plain",))
    assert part is not None
    m = re.search(r"http://guard\.test(/m/[A-Za-z0-9_-]+)", part.get_content())
    assert m, part.get_content()
    return m[1]
