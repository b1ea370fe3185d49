"""Rewrites and gates through the real server: bcc and zip in the pass path, password notices,
per-domain split deliveries, reject, and a password never leaving for mail that was not sent."""

from __future__ import annotations

import asyncio
import email
import email.policy
import io
import re
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
import pytest_asyncio
import pyzipper
from conftest import Sink, port_of, serve_sink

from mailguard.app import build_server
from mailguard.config import Config, SmtpConfig, StoreConfig, UpstreamConfig, WebConfig

SENDER = "yamada@example.co.jp"
RCPTS = ["tanaka@client-a.co.jp", "suzuki@client-b.co.jp", "sato@example.co.jp"]
POLICY = """
[organization]
internal_domains = ["example.co.jp"]

[[rule]]
name = "bcc-several-parties"
when = "recipient.external_parties >= 2"
action = "bcc"

[[rule]]
name = "zip-attachments"
when = "attachment.unencrypted"
action = "zip"
options = { method = "aes", password_to = "sender" %s }

[[rule]]
name = "no-exe"
when = "attachment.present >= 5"
action = "reject"
reject_message = "too many attachments"
"""


def message(*, files: int = 1) -> bytes:
    from email.message import EmailMessage

    m = EmailMessage()
    m["From"] = "山田 <yamada@example.co.jp>"
    m["To"] = "田中様 <tanaka@client-a.co.jp>, 鈴木様 <suzuki@client-b.co.jp>"
    m["Cc"] = "佐藤 <sato@example.co.jp>"
    m["Subject"] = "見積書の送付"
    m.set_content("見積書をお送りします。\n")
    for i in range(files):
        m.add_attachment(
            f"品名,金額\n部品{i},100\n".encode("cp932"),
            maintype="text", subtype="csv", filename=f"見積書{i}.csv",
        )  # fmt: skip
    return m.as_bytes(policy=email.policy.SMTP)


@pytest_asyncio.fixture
async def rig(tmp_path: Path, request: Any) -> Any:
    extra = getattr(request, "param", "")
    sink = Sink()
    up = await serve_sink(sink)
    policy = tmp_path / "policy.toml"
    policy.write_text(POLICY % extra, encoding="utf-8")
    cfg = Config(
        smtp=SmtpConfig(listen=("127.0.0.1", 0)),
        upstream=UpstreamConfig(address=("127.0.0.1", port_of(up))),
        store=StoreConfig(path=tmp_path / "mg.db"),
        web=WebConfig(enabled=False, secret="s3cret"),
    )
    from dataclasses import replace

    cfg = replace(cfg, policy=replace(cfg.policy, file=str(policy)))
    server = build_server(cfg, lambda: cfg)
    await server.start()
    yield server, sink, up
    await server.stop(grace=1)
    up.close()


async def wait_for(pred: Any, within: float = 10.0) -> None:
    async with asyncio.timeout(within):
        while not pred():  # noqa: ASYNC110 - the sink is polled, it has no event for this
            await asyncio.sleep(0.05)


def parsed(raw: bytes) -> email.message.EmailMessage:
    return email.message_from_bytes(raw, policy=email.policy.default)  # type: ignore[return-value]


@pytest.mark.asyncio
async def test_bcc_and_zip_in_the_pass_path(rig: Any) -> None:
    server, sink, _ = rig
    _, reply = await aiosmtplib.send(
        message(), sender=SENDER, recipients=RCPTS, hostname="127.0.0.1", port=server.port
    )
    assert reply.startswith("2.0.0")
    await wait_for(lambda: len(sink.got) >= 2)  # the message, then the password notice
    mail = next(g for g in sink.got if g[1] == RCPTS)
    notice = next(g for g in sink.got if g[1] == [SENDER])
    m = parsed(mail[2])
    assert "client-a" not in str(m["To"]) and "client-b" not in str(m["To"])
    assert "client-" not in str(m.get("Cc", ""))
    assert "sato@example.co.jp" in str(m["Cc"])  # internal stays visible
    assert m["Subject"] == "見積書の送付"
    zips = [p for p in m.iter_attachments() if p.get_filename().endswith(".zip")]
    assert len(zips) == 1 and not any(
        p.get_filename().endswith(".csv") for p in m.iter_attachments()
    )
    n = parsed(notice[2])
    text = n.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    found = re.search(r"パスワード: (\S+)", text)
    assert found, text
    password = found.group(1)
    with pyzipper.AESZipFile(io.BytesIO(zips[0].get_content())) as z:
        z.setpassword(password.encode())
        names = z.namelist()
        assert names == ["見積書0.csv"]
        assert z.read(names[0]) == "品名,金額\n部品0,100\n".encode("cp932")


@pytest.mark.asyncio
async def test_reject_answers_550_with_the_policy_reason(rig: Any) -> None:
    server, sink, _ = rig
    with pytest.raises(aiosmtplib.SMTPDataError) as err:
        await aiosmtplib.send(
            message(files=5), sender=SENDER, recipients=RCPTS, hostname="127.0.0.1",
            port=server.port,
        )  # fmt: skip
    assert err.value.code == 550 and "too many attachments" in err.value.message
    assert sink.got == []


@pytest.mark.asyncio
async def test_no_password_for_mail_the_upstream_refused(rig: Any) -> None:
    server, sink, _ = rig
    sink.reply = "554 5.7.1 upstream says no"
    with pytest.raises(aiosmtplib.SMTPDataError) as err:
        await aiosmtplib.send(
            message(), sender=SENDER, recipients=RCPTS, hostname="127.0.0.1", port=server.port
        )
    assert err.value.code == 554
    sink.reply = "250 2.0.0 Ok"
    await asyncio.sleep(2.5)  # a few scheduler ticks: the withdrawn notice must not go out
    assert sink.got == []


@pytest.mark.asyncio
@pytest.mark.parametrize("rig", [", per_domain_passwords = true"], indirect=True)
async def test_per_domain_passwords_split_the_delivery(rig: Any) -> None:
    server, sink, _ = rig
    _, reply = await aiosmtplib.send(
        message(), sender=SENDER, recipients=RCPTS, hostname="127.0.0.1", port=server.port
    )
    assert "deliveries" in reply
    await wait_for(lambda: sum(1 for g in sink.got if g[1] != [SENDER]) >= 3, within=15)
    groups = sorted(tuple(g[1]) for g in sink.got if g[1] != [SENDER])
    assert groups == [
        ("sato@example.co.jp",), ("suzuki@client-b.co.jp",), ("tanaka@client-a.co.jp",)
    ]  # fmt: skip
    zips = []
    for g in sink.got:
        if g[1] != [SENDER]:
            m = parsed(g[2])
            zips += [p.get_content() for p in m.iter_attachments()]
    assert len(zips) == 3 and len(set(zips)) == 3  # a different zip (password) per domain


@pytest.mark.asyncio
async def test_delivered_mail_teaches_the_history(rig: Any, tmp_path: Path) -> None:
    """A passed message counts for its domains: the next one to them is no longer first-time."""
    from mailguard.history import DomainHistory

    server, sink, _ = rig
    raw = b"From: yamada@example.co.jp\r\nTo: tanaka@client-a.co.jp\r\nSubject: hi\r\n\r\nx\r\n"
    send = {"sender": SENDER, "hostname": "127.0.0.1", "port": server.port}
    await aiosmtplib.send(raw, recipients=["tanaka@client-a.co.jp"], **send)
    assert server.lookups is not None and server.lookups.history is not None
    await server.lookups.history.flush()  # the batched writer, without waiting for its timer
    with DomainHistory(tmp_path / "mg.db") as h:
        assert h.counts(["client-a.co.jp"]) == {"client-a.co.jp": 1}
    assert len(sink.got) == 1


@pytest.mark.asyncio
async def test_queue_gauges_report_held_mail_and_its_age(tmp_path: Path) -> None:
    """mailguard_queue_messages and the oldest-held age feed the "held too long" alert."""
    from mailguard.metrics import Metrics

    sink = Sink()
    up = await serve_sink(sink)
    policy = tmp_path / "hold.toml"
    policy.write_text(
        '[organization]\ninternal_domains = ["example.co.jp"]\n'
        '[[rule]]\nname = "cool-down"\nwhen = "recipient.external"\naction = "hold"\n'
        'hold_for = "1h"\n'
    )
    from dataclasses import replace

    cfg = Config(
        smtp=SmtpConfig(listen=("127.0.0.1", 0)),
        upstream=UpstreamConfig(address=("127.0.0.1", port_of(up))),
        store=StoreConfig(path=tmp_path / "mg.db"),
        web=WebConfig(enabled=False, secret="s"),
    )
    cfg = replace(cfg, policy=replace(cfg.policy, file=str(policy)))
    metrics = Metrics()
    server = build_server(cfg, lambda: cfg, metrics=metrics)
    await server.start()
    try:
        raw = b"From: yamada@example.co.jp\r\nTo: tanaka@client-a.co.jp\r\nSubject: x\r\n\r\nx\r\n"
        _, reply = await aiosmtplib.send(
            raw, sender=SENDER, recipients=["tanaka@client-a.co.jp"], hostname="127.0.0.1",
            port=server.port,
        )  # fmt: skip
        assert "held as" in reply
        await asyncio.sleep(1.1)
        await server.refresh_queue_gauges()
        text = metrics.render()[0].decode()
        assert 'mailguard_queue_messages{state="held"} 1.0' in text
        sample = next(
            ln
            for ln in text.splitlines()
            if ln.startswith("mailguard_queue_oldest_held_age_seconds ")
        )
        age = float(sample.split()[1])
        assert 1.0 <= age < 30
    finally:
        await server.stop(grace=1)
        up.close()
