"""Issue 12 item 6 (loose end) — an exception after a zip-password notice was parked must not let
the password out.

A zipped pass parks its password notice durably before the mail is relayed inside the SMTP
transaction (mailguard/pipeline.py `_relay_now`); the password becomes due only when the upstream
accepted that mail. Here the relay raises right after the park (an in-process
`mailguard.app.Service`
whose pipeline relay is replaced by one that raises): the client must get 451 (Postfix keeps the
mail and retries), the parked password must be withdrawn (`finally`), and the scheduler — running
in the same Service, with the real notifier and the real upstream — must never send it. A second
message, relayed normally by the same Service, shows its password does go out (the rig works).
"""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from e2e_support import ReceivingSink, build_message, free_port, pdf_bytes, policy, smtp_send

from mailguard.app import Service
from mailguard.config import from_dict
from mailguard.envelope import Envelope, Reply

SENDER = "yamada@ourco.co.jp"
RCPT = "tanaka@customer-a.co.jp"
ZIP = """
[[rule]]
name = "zip-out"
when = "attachment.unencrypted and recipient.external"
action = "zip"
options = { method = "aes", password_to = "sender" }
"""


class Exploding:
    """The pipeline's relay: raises for messages marked X-Explode, else the real upstream."""

    def __init__(self, real: Any, db: Path) -> None:
        self.real = real
        self.db = db
        self.raised = 0
        self.parked_at_raise = -1  # parked password rows when the exception was raised

    def parked(self) -> int:
        with sqlite3.connect(self.db) as c:
            q = "SELECT count(*) FROM notice WHERE kind = 'zip-password' AND state = 'parked'"
            return int(c.execute(q).fetchone()[0])

    async def send(self, env: Envelope, raw: Any, *, wire: bytes | None = None) -> Reply:
        if b"X-Explode: yes" in bytes(raw)[:4000]:
            self.raised += 1
            self.parked_at_raise = self.parked()
            raise RuntimeError("injected after the password was parked")
        reply: Reply = await self.real.send(env, raw, wire=wire)
        return reply


def message(subject: str, explode: bool) -> bytes:
    m = build_message(
        sender=SENDER,
        to=[RCPT],
        subject=subject,
        attachments=[("price-list.pdf", pdf_bytes(4000), "application/pdf")],
        headers={"X-Explode": "yes"} if explode else None,
    )
    return bytes(m)


def zip_service(tmp_path: Path, sink: ReceivingSink) -> Service:
    """The real service (scheduler, notifier, upstream = `sink`) with the zip-and-pass policy."""
    pol = tmp_path / "policy.toml"
    pol.write_text(policy(ZIP), encoding="utf-8")
    cfg = from_dict(
        {
            "smtp": {"listen": f"127.0.0.1:{free_port()}", "hostname": "guard.test"},
            "upstream": {"address": f"127.0.0.1:{sink.port}", "pool_size": 0},
            "store": {"path": str(tmp_path / "mg.db")},
            "policy": {"file": str(pol)},
            "web": {"enabled": False},
            "notify": {"sender": "mailguard@ourco.co.jp"},
        }
    )
    return Service(cfg)


def kinds(sink: ReceivingSink) -> list[str]:
    return [g.notice_kind for g in sink.snapshot() if g.notice_kind]


@pytest.mark.asyncio
async def test_exception_after_park_sends_no_password_and_answers_451(tmp_path: Path) -> None:
    sink = ReceivingSink()
    svc = zip_service(tmp_path, sink)
    try:
        await svc.start()
        assert svc.pipeline is not None and svc.scheduler is not None
        relay = Exploding(svc.pipeline.relay, tmp_path / "mg.db")
        svc.pipeline.relay = relay
        port = svc.port

        code, text = await asyncio.to_thread(
            smtp_send, port, SENDER, [RCPT], message("explodes", True)
        )
        assert code == 451, f"{code} {text}"
        assert relay.raised == 1 and relay.parked_at_raise == 1  # raised after the park
        # several scheduler ticks (1 s each): the withdrawn password is never sent
        for _ in range(30):
            await svc.scheduler.tick()
            await asyncio.sleep(0.1)
        assert "zip-password" not in kinds(sink), "a password went out for mail that did not go"
        assert [g for g in sink.snapshot() if not g.notice_kind] == []
        with sqlite3.connect(tmp_path / "mg.db") as db:
            left = db.execute("SELECT count(*) FROM notice WHERE kind = 'zip-password'")
            assert left.fetchone()[0] == 0, "the parked password was not withdrawn"

        # the same Service relays the next message and its password goes out
        code, text = await asyncio.to_thread(
            smtp_send, port, SENDER, [RCPT], message("goes", False)
        )
        assert code == 250, f"{code} {text}"
        for _ in range(50):
            await svc.scheduler.tick()
            if "zip-password" in kinds(sink):
                break
            await asyncio.sleep(0.1)
        assert kinds(sink) == ["zip-password"]
    finally:
        await svc.stop(grace=2)
        sink.stop()


@pytest.mark.asyncio
async def test_release_failure_after_upstream_accepted_still_answers_250(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The upstream took the zipped mail, then releasing its password fails (any error): the
    client must get 250 — a 451 would make Postfix send the mail a second time."""
    sink = ReceivingSink()
    svc = zip_service(tmp_path, sink)
    try:
        await svc.start()
        assert svc.queue is not None

        async def broken(msg_id: str) -> None:
            raise RuntimeError("injected: release failed after the upstream's 250")

        monkeypatch.setattr(svc.queue, "release_parked", broken)
        code, text = await asyncio.to_thread(
            smtp_send, svc.port, SENDER, [RCPT], message("accepted", False)
        )
        assert code == 250, f"{code} {text}"
        assert len([g for g in sink.snapshot() if not g.notice_kind]) == 1  # delivered once
    finally:
        await svc.stop(grace=2)
        sink.stop()
