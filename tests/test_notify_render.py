"""Notices: MIME structure, ISO-2022-JP and UTF-8 decode with the stdlib parser, signatures."""

from __future__ import annotations

import email
import email.policy
from pathlib import Path
from typing import Any

import pytest

from mailguard.notify.render import Notifier, is_own_notice, own_notice_kind
from tests._queue_support import SECRET, SUMMARY, Sink, serve, stop, transport

DATA: dict[str, Any] = {
    "id": "01ABCDEF23456789",
    "subject": SUMMARY["subject"],
    "sender": "taro@example.co.jp",
    "internal": SUMMARY["internal"],
    "external": SUMMARY["external"],
    "findings": SUMMARY["findings"],
    "due": "2025-04-01T09:05:00+00:00",
    "on_timeout": "cancel",
    "url": "http://guard.test/m/AbCdEfGhIjKlMnOpQrStUvWxYz012345",
}


def notifier(charset: str = "utf-8", lang: str = "ja", **kw: Any) -> Notifier:
    return Notifier(
        transport(9), "mailguard@example.co.jp", charset=charset, lang=lang, secret=SECRET, **kw
    )


def parse(raw: bytes) -> email.message.EmailMessage:
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(msg, email.message.EmailMessage)
    return msg


@pytest.mark.parametrize("charset", ["iso-2022-jp", "utf-8"])
@pytest.mark.parametrize("kind", ["held", "confirm", "approval-request", "approval-pending"])
def test_notices_decode_in_both_charsets(charset: str, kind: str) -> None:
    raw = notifier(charset).render(kind, ["taro@example.co.jp"], {**DATA, "approvers": ["boss@x"]})
    assert raw.isascii()  # 7bit on the wire: fine for any upstream
    msg = parse(raw)
    assert msg.get_content_type() == "multipart/alternative"
    text, html = msg.get_payload()  # type: ignore[misc]
    assert text.get_content_type() == "text/plain" and html.get_content_type() == "text/html"
    assert text.get_content_charset() == charset
    if charset == "iso-2022-jp":
        assert text["Content-Transfer-Encoding"] in (None, "7bit")
        assert b"=?iso-2022-jp?b?" in raw.lower()
    body = text.get_content()
    assert "月次報告" in body and DATA["url"] in body
    assert "a@partner.co.jp" in body
    assert SUMMARY["findings"][0]["reason_ja"] in body
    assert "月次報告" in str(msg["Subject"])
    assert f'href="{DATA["url"]}"' in html.get_content()
    assert msg["Auto-Submitted"] == "auto-generated"
    assert msg["Message-ID"] and msg["Date"]
    assert own_notice_kind(raw, SECRET) == kind


def test_english_and_bilingual() -> None:
    en = parse(notifier(lang="en").render("confirm", ["t@x"], DATA))
    assert str(en["Subject"]).startswith("[MailGuard] Please confirm your message")
    body = en.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    assert "Check the recipients" in body and "cancelled" in body
    both = parse(notifier(lang="ja+en", charset="iso-2022-jp").render("held", ["t@x"], DATA))
    body = both.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    assert "自動的に送信されます" in body and "sent automatically" in body
    assert "送信を保留しています / Your message is on hold" in str(both["Subject"])


def test_outcome_and_zip_password() -> None:
    n = notifier("iso-2022-jp")
    msg = parse(
        n.render(
            "outcome",
            ["t@x"],
            {**DATA, "outcome": "refused", "by": "boss@x", "why": "宛先が違います"},
        )
    )
    body = msg.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    assert "却下されました" in body and "宛先が違います" in body and "送信されていません" in body
    pw = parse(
        n.render(
            "zip-password",
            ["b@partner.co.jp"],
            {"password": "Xy7-kP2q", "archive": "見積書.zip", "subject": "見積"},
        )
    )
    body = pw.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    assert "Xy7-kP2q" in body and "見積書.zip" in body


def test_text_jis_cannot_encode_falls_back_to_utf8() -> None:
    raw = notifier("iso-2022-jp").render("held", ["t@x"], {**DATA, "subject": "報告 😀"})
    msg = parse(raw)
    text = msg.get_body(("plain",))
    assert text is not None and text.get_content_charset() == "utf-8"
    assert "報告 😀" in text.get_content()
    assert str(msg["Subject"]).endswith("報告 😀")
    assert b"=?utf-8?b?" in raw  # the subject fell back to UTF-8 too


def test_copied_header_is_not_own_notice() -> None:
    raw = notifier().render("held", ["t@x"], DATA)
    assert is_own_notice(raw, SECRET)
    assert not is_own_notice(raw, b"another-secret")
    head, _, _ = raw.partition(b"\r\n\r\n")
    forged = head + b"\r\n\r\nplease wire money to the account below\r\n"
    assert not is_own_notice(forged, SECRET)  # the header alone proves nothing
    plain = b"X-MailGuard-Notice: held; sig=" + b"0" * 32 + b"\r\nSubject: x\r\n\r\nbody\r\n"
    assert not is_own_notice(plain, SECRET)
    # LF line ends (a file on disk) still verify
    assert is_own_notice(raw.replace(b"\r\n", b"\n"), SECRET)


def test_admin_templates_override(tmp_path: Path) -> None:
    (tmp_path / "held.txt.j2").write_text(
        "Subject: {{ tr('カスタム', 'Custom') }}\n\n{{ d.url }} only\n", encoding="utf-8"
    )
    msg = parse(notifier(templates_dir=tmp_path).render("held", ["t@x"], DATA))
    assert str(msg["Subject"]) == "カスタム"
    assert msg.get_body(("plain",)).get_content().strip() == f"{DATA['url']} only"  # type: ignore[union-attr]
    # the other kinds still come from the shipped set
    assert "確認" in str(
        parse(notifier(templates_dir=tmp_path).render("confirm", ["t"], DATA))["Subject"]
    )


@pytest.mark.asyncio
async def test_send_uses_null_sender_for_outcomes() -> None:
    sink = Sink()
    server, port = await serve(sink)
    n = Notifier(transport(port), "mailguard@example.co.jp", secret=SECRET)
    try:
        r1 = await n.send(
            "outcome", ["taro@example.co.jp"], {**DATA, "outcome": "expired"}, null_sender=True
        )
        r2 = await n.send("confirm", ["taro@example.co.jp"], DATA)
    finally:
        await stop(server)
    assert r1.ok and r2.ok
    assert [(f, t) for f, t, _ in sink.got] == [
        ("<>", ["taro@example.co.jp"]),
        ("mailguard@example.co.jp", ["taro@example.co.jp"]),
    ]
    assert all(is_own_notice(raw, SECRET) for *_, raw in sink.got)


@pytest.mark.parametrize("password_to", ["sender", "recipients"])
def test_zip_password_notice_from_the_zip_action(password_to: str) -> None:
    """The notice the zip transform really emits renders (contract between actions and notify)."""
    from mailguard.actions.zip import _notice

    notice = _notice(
        {"password_to": password_to},
        "Kq7-xP2m",
        ["見積書.xlsx", "仕様.pdf"],
        "見積書.zip",
        "お見積り",
        ["b@partner.co.jp"],
        "taro@example.co.jp",
    )
    msg = parse(notifier("iso-2022-jp", lang="ja+en").render(notice.kind, notice.to, notice.data))
    body = msg.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    assert "Kq7-xP2m" in body and "見積書.zip" in body and "仕様.pdf" in body
    assert "お見積り" in str(msg["Subject"])
    to_sender = password_to == "sender"
    assert ("メール以外の方法" in body) is to_sender
    assert ("先にお送りしたメール" in body) is not to_sender
