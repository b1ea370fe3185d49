"""Test helpers for the queue/web/notify/scheduler tests: a real aiosmtpd sink, a settable clock."""

from __future__ import annotations

import asyncio
import base64
import email
import email.policy
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP

from mailguard.envelope import Envelope, Reply
from mailguard.history import DomainHistory
from mailguard.lookups import HistoryCache, Lookups
from mailguard.notify.render import Notifier
from mailguard.pipeline import Pipeline, Settings
from mailguard.policy import Policy
from mailguard.policy.decision import Gate
from mailguard.policy.parse import parse_policy
from mailguard.queue.service import HoldService
from mailguard.queue.sqlite import SqliteStore
from mailguard.relay.smtp import SmtpTransport
from mailguard.scheduler import Scheduler

SECRET = b"test-secret-0123456789abcdef"
SENDER = "taro@example.co.jp"
RCPTS = ["a@partner.co.jp", "b@other.example.com", "c@example.co.jp"]


def _xlsx() -> bytes:
    """A small unencrypted OOXML workbook (a zip with the parts a sniffer looks for)."""
    import io
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("[Content_Types].xml", '<?xml version="1.0"?><Types/>')
        z.writestr("xl/workbook.xml", "<workbook/>" + "x" * 4000)
    return buf.getvalue()


XLSX = _xlsx()
RAW = (
    b"From: Taro <taro@example.co.jp>\r\n"
    b"To: Hanako Partner <a@partner.co.jp>, b@other.example.com\r\n"
    b"Cc: c@example.co.jp\r\n"
    b"Subject: =?UTF-8?B?5pyI5qyh5aCx5ZGK?=\r\n"
    b"Message-ID: <orig-1@example.co.jp>\r\n"
    b"MIME-Version: 1.0\r\n"
    b'Content-Type: multipart/mixed; boundary="b1"\r\n'
    b"\r\n"
    b"--b1\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"\r\n"
    b"body line 1\r\n.leading dot line\r\n"
    b"--b1\r\n"
    b"Content-Type: application/vnd.openxmlformats-officedocument.spreadsheetml.sheet\r\n"
    b"Content-Disposition: attachment;\r\n"
    b" filename*=UTF-8''%E9%A1%A7%E5%AE%A2%E3%83%AA%E3%82%B9%E3%83%88.xlsx\r\n"
    b"Content-Transfer-Encoding: base64\r\n"
    b"\r\n"
    + b"\r\n".join(
        base64.b64encode(XLSX)[i : i + 76] for i in range(0, len(base64.b64encode(XLSX)), 76)
    )
    + b"\r\n--b1--\r\n"
)


def gate_policy(gate: Gate, **rule: Any) -> Policy:
    """A real policy whose one rule puts the test message (two outside organisations visible in
    To) through `gate`; `rule` adds rule keys (hold_for="5m", on_timeout="send", …)."""
    keys = {"name": "bcc-mistake", "when": "recipient.visible_external >= 1", "action": gate.label}
    if gate is Gate.APPROVE:
        keys["approvers"] = ["boss@example.co.jp"]
    if gate is not Gate.HOLD and "hold_for" in rule:
        rule["confirm_timeout"] = rule.pop("hold_for")
    keys.update(rule)
    body = "\n".join(f"{k} = {_toml(v)}" for k, v in keys.items())
    text = f'[organization]\ninternal_domains = ["example.co.jp"]\n\n[[rule]]\n{body}\n'
    return parse_policy(text, source="<tests>")


def zip_policy(**options: Any) -> Policy:
    """A real policy that zips the test message's attachment and passes it."""
    opts = ", ".join(f"{k} = {_toml(v)}" for k, v in options.items())
    text = (
        '[organization]\ninternal_domains = ["example.co.jp"]\n\n[[rule]]\nname = "zip-it"\n'
        'when = "attachment.unencrypted"\naction = "zip"\n'
        + (f"options = {{ {opts} }}\n" if opts else "")
    )
    return parse_policy(text, source="<tests: zip>")


def _toml(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, timedelta):
        return f'"{int(v.total_seconds())}s"'
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    return f'"{v}"'


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


@dataclass
class Rig:
    """Store, queue, pipeline, notifier and scheduler wired as the server wires them (a clock
    the test moves); messages are kept by the real pipeline from real bytes."""

    store: SqliteStore
    service: HoldService
    notifier: Notifier
    scheduler: Scheduler
    clock: Clock
    transport: SmtpTransport
    pipeline: Pipeline


async def rig(
    db: Path, port: int, clock: Clock | None = None, *, charset: str = "utf-8", lang: str = "ja"
) -> Rig:
    clock = clock or Clock()
    store = SqliteStore(db)
    await store.open()
    tr = transport(port)
    service = HoldService(store, public_url="http://guard.test", clock=clock, lang=lang)
    lookups = Lookups(HistoryCache(DomainHistory(db.with_suffix(".history.db"))))
    pipeline = Pipeline(
        gate_policy(Gate.CONFIRM), lookups, tr, queue=service, settings=Settings(secret=SECRET)
    )
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
        pipeline,
        notifier,
        clock=clock,
        lang=lang,
        backoff=timedelta(seconds=30),
        reporting_mta="guard.test",
    )
    return Rig(store, service, notifier, sched, clock, tr, pipeline)


async def keep(
    r: Rig, gate: Gate, *, raw: bytes = RAW, env: Envelope | None = None, **rule: Any
) -> Reply:
    """Send `raw` through the real pipeline under a policy that applies `gate`."""
    r.pipeline.policy = gate_policy(gate, **rule)
    return await r.pipeline.handle(env or envelope(), raw)


async def close(r: Rig) -> None:
    await r.transport.close()
    await r.pipeline.lookups.close()
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
