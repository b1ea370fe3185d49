"""Notices rendered from a real message's Summary: recipients split internal / external and
grouped by organisation with names, findings in words, attachments with sizes; MIME structure,
ISO-2022-JP and UTF-8 decode with the stdlib parser, ja+en in one mail, signatures."""

from __future__ import annotations

import email
import email.policy
import logging
import re
import subprocess
import sys
from email.headerregistry import Address as HAddress
from email.message import EmailMessage
from pathlib import Path

import pytest

from mailguard.analysis import analyze_message
from mailguard.envelope import Envelope, Reply
from mailguard.notify import MailSender, human_size, langs_of
from mailguard.notify.render import Notifier, is_own_notice, own_notice_kind
from mailguard.pipeline import summarize
from mailguard.policy import Policy, load_policy
from mailguard.summary import Summary
from tests._queue_support import SECRET, Sink, serve, stop, transport

ROOT = Path(__file__).resolve().parent.parent
POLICY = load_policy(ROOT / "policies" / "default.toml")
SENDER = "taro@example.co.jp"
XLSX = bytes(range(256)) * 188  # 48128 bytes of "spreadsheet"


def make_raw(*, evil_name: str = "") -> bytes:
    """A real outgoing message: two external companies visible, an internal Cc, an attachment."""
    m = EmailMessage()
    m["From"] = HAddress("田中 太郎", addr_spec=SENDER)
    m["To"] = [
        HAddress("山田 花子", addr_spec="hanako@partner.co.jp"),
        HAddress("", addr_spec="ichiro@partner.co.jp"),
    ]
    m["Cc"] = [
        HAddress(evil_name or "Suzuki Jiro", addr_spec="suzuki@other.example.com"),
        HAddress("佐藤 千佳", addr_spec="chika@example.co.jp"),
    ]
    m["Subject"] = "月次報告"
    m["Message-ID"] = "<orig-1@example.co.jp>"
    m.set_content("body line 1\n.leading dot line\n")
    m.add_attachment(
        XLSX,
        maintype="application",
        subtype="vnd.openxmlformats-officedocument.spreadsheetml.sheet",
        filename="顧客リスト.xlsx",
    )
    return m.as_bytes(policy=email.policy.SMTP)


RAW = make_raw()
HIDDEN = "audit@rival.co.jp"  # envelope only: a Bcc
RCPTS = [
    "hanako@partner.co.jp",
    "ichiro@partner.co.jp",
    "suzuki@other.example.com",
    "chika@example.co.jp",
    HIDDEN,
]


def envelope(rcpts: list[str] | None = None) -> Envelope:
    return Envelope(
        SENDER,
        list(rcpts or RCPTS),
        mail_options=["BODY=8BITMIME"],
        xforward={"IDENT": "4XyZ1"},
        client_addr="127.0.0.1",
    )


def _summary_of(raw: bytes, env: Envelope, policy: Policy) -> Summary:
    """The Summary the server stores for this message: the pipeline's own summarize()."""
    return summarize(analyze_message(raw, env, policy))


SUMMARY = _summary_of(RAW, envelope(), POLICY)
DATA: dict[str, object] = {
    "id": "01ABCDEF23456789",
    "summary": SUMMARY.to_json(),
    "due": "2025-04-01T09:05:00+00:00",
    "gate": "confirm",
    "on_timeout": "cancel",
    "url": "http://guard.test/m/AbCdEfGhIjKlMnOpQrStUvWxYz012345",
    "lang": "ja",
}
KINDS_WITH_SUMMARY = ["held", "confirm", "approval-request", "approval-pending", "outcome"]


class Recorder:
    """A MailSender that keeps what it was handed (no relay, no network)."""

    def __init__(self) -> None:
        self.sent: list[tuple[Envelope, bytes]] = []

    async def send(self, env: Envelope, raw: bytes) -> Reply:
        self.sent.append((env, raw))
        return Reply(250, "2.0.0 Ok")


def notifier(charset: str = "utf-8", lang: str = "ja", **kw: object) -> Notifier:
    return Notifier(
        Recorder(),
        "mailguard@example.co.jp",
        charset=charset,
        lang=lang,
        secret=SECRET,
        **kw,  # type: ignore[arg-type]
    )


def parse(raw: bytes) -> email.message.EmailMessage:
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(msg, email.message.EmailMessage)
    return msg


def text_of(raw: bytes) -> str:
    part = parse(raw).get_body(("plain",))
    assert part is not None
    return str(part.get_content())


def data(kind: str, **more: object) -> dict[str, object]:
    extra: dict[str, object] = {
        "held": {"gate": "hold", "allow_send_now": False},
        "approval-request": {"gate": "approve"},
        "approval-pending": {"gate": "approve", "approvers": ["boss@example.co.jp"]},
        "outcome": {"outcome": "refused", "by": "boss@example.co.jp", "why": "宛先が違います"},
    }.get(kind, {})
    return {**DATA, **extra, **more}


def section(body: str, start: str, end: str) -> str:
    assert start in body, body
    return body.split(start, 1)[1].split(end, 1)[0]


def test_the_summary_comes_from_the_real_message() -> None:
    """The helper's Summary is what the analysis saw (guards the fixture, not the notifier)."""
    assert [r.addr for r in SUMMARY.internal] == ["chika@example.co.jp"]
    assert [r.addr for r in SUMMARY.external] == [
        "hanako@partner.co.jp",
        "ichiro@partner.co.jp",
        "suzuki@other.example.com",
        HIDDEN,
    ]
    assert [org for org, _ in SUMMARY.by_org()] == ["partner.co.jp", "example.com", "rival.co.jp"]
    assert SUMMARY.external[0].name == "山田 花子" and SUMMARY.external[-1].field == "hidden"
    assert SUMMARY.attachments[0].name == "顧客リスト.xlsx"
    assert SUMMARY.findings and all(f.ja and f.en for f in SUMMARY.findings)
    assert Summary.from_json(SUMMARY.to_json()) == SUMMARY


@pytest.mark.parametrize("charset", ["iso-2022-jp", "utf-8"])
@pytest.mark.parametrize("kind", KINDS_WITH_SUMMARY)
def test_notices_decode_in_both_charsets(charset: str, kind: str) -> None:
    raw = notifier(charset).render(kind, [SENDER], data(kind))
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
    assert "月次報告" in body and "月次報告" in str(msg["Subject"])
    if kind != "outcome":
        assert DATA["url"] in body and f'href="{DATA["url"]}"' in html.get_content()
    assert msg["Auto-Submitted"] == "auto-generated"
    assert msg["Message-ID"] and msg["Date"]
    assert own_notice_kind(raw, SECRET) == kind


@pytest.mark.parametrize("kind", KINDS_WITH_SUMMARY)
def test_recipients_split_grouped_by_organisation_with_names(kind: str) -> None:
    body = text_of(notifier().render(kind, [SENDER], data(kind)))
    ext = section(body, "社外の宛先:", "社内の宛先:")
    internal = section(body, "社内の宛先:", "添付ファイル:")
    assert ext.startswith(" 3 社・4 件")
    # grouped: each organisation once, its people under it, with display names
    partner = section(ext, "[partner.co.jp]", "[example.com]")
    assert "「山田 花子」 <hanako@partner.co.jp>" in partner and "ichiro@partner.co.jp" in partner
    other = section(ext, "[example.com]", "[rival.co.jp]")
    assert "「Suzuki Jiro」 <suzuki@other.example.com> (Cc)" in other
    assert f"{HIDDEN} (Bcc)" in ext.split("[rival.co.jp]")[1]
    assert "chika" not in ext
    assert "「佐藤 千佳」 <chika@example.co.jp> (Cc)" in internal and "partner" not in internal
    # attachments: name and a human size
    att = SUMMARY.attachments[0]
    assert f"「顧客リスト.xlsx」 ({human_size(att.size)})" in body and "KB" in human_size(att.size)
    if kind != "outcome":  # findings in plain words, as the checks wrote them
        for f in SUMMARY.findings:
            assert f.ja in body


def test_english_recipients_and_findings() -> None:
    body = text_of(notifier(lang="en").render("confirm", [SENDER], data("confirm", lang="")))
    assert "External recipients: 4 at 3 organisations" in body
    assert "Internal recipients: 1" in body
    assert "Check the recipients and attachments" in body and "cancelled" in body
    for f in SUMMARY.findings:
        assert f.en in body and f.ja not in body
    assert "社外" not in body


def test_no_external_recipients_says_none() -> None:
    env = envelope(["chika@example.co.jp"])
    m = EmailMessage()
    m["From"] = SENDER
    m["To"] = "佐藤 千佳 <chika@example.co.jp>"
    m["Subject"] = "社内連絡"
    m.set_content("x\n")
    s = _summary_of(m.as_bytes(policy=email.policy.SMTP), env, POLICY)
    body = text_of(
        notifier(lang="ja+en").render("held", [SENDER], data("held", summary=s.to_json(), lang=""))
    )
    assert "社外の宛先: なし" in body and "External recipients: none" in body
    assert "社内の宛先: 1 件" in body and "「佐藤 千佳」 <chika@example.co.jp>" in body


@pytest.mark.parametrize("where", ["config", "data"])
def test_ja_en_sends_both_languages_in_one_mail(where: str) -> None:
    n = notifier(lang="ja+en" if where == "config" else "ja", charset="iso-2022-jp")
    d = data("held", lang="" if where == "config" else "ja+en")
    raw = n.render("held", [SENDER], d)
    msg = parse(raw)
    body = text_of(raw)
    assert "自動的に送信されます" in body and "sent automatically" in body
    assert "社外の宛先:" in body and "External recipients:" in body
    assert body.index("自動的に") < body.index("sent automatically")  # Japanese first
    assert "送信を保留しました / Your message is on hold" in str(msg["Subject"])
    assert own_notice_kind(raw, SECRET) == "held"


def test_the_notice_language_wins_over_the_default() -> None:
    body = text_of(notifier(lang="ja+en").render("confirm", [SENDER], data("confirm", lang="en")))
    assert "Please confirm" not in body  # the subject line is not in the body
    assert "Check the recipients" in body and "宛先と添付ファイル" not in body


def test_langs_of() -> None:
    assert langs_of("ja") == ["ja"] and langs_of("en") == ["en"] and langs_of("en-US") == ["en"]
    assert langs_of("ja+en") == ["ja", "en"] == langs_of("both") == langs_of("JA + EN")
    assert langs_of("en+ja") == ["en", "ja"]
    assert langs_of("") == ["ja"] == langs_of("fr")


@pytest.mark.parametrize("allow", [True, False])
def test_held_offers_send_now_only_when_allowed(allow: bool) -> None:
    body = text_of(
        notifier(lang="ja+en").render("held", [SENDER], data("held", allow_send_now=allow, lang=""))
    )
    assert ("今すぐ送信する" in body) is allow
    assert ("or send it now" in body) is allow
    assert "送信を取り消す" in body or "取り消すか" in body


def test_outcomes_say_what_happened() -> None:
    n = notifier("iso-2022-jp", lang="ja+en")
    refused = text_of(n.render("outcome", [SENDER], data("outcome", lang="")))
    assert "却下されました" in refused and "宛先が違います" in refused
    assert "送信されていません" in refused and "It has NOT been sent" in refused
    approved = text_of(n.render("outcome", [SENDER], data("outcome", outcome="approved", lang="")))
    assert "配送に回されました" in approved and "has been released for delivery" in approved
    assert "送信されます" not in approved  # not a promise: what was done
    timeout = text_of(
        n.render("outcome", [SENDER], data("outcome", outcome="sent-on-timeout", lang=""))
    )
    assert "期限までに判断がなかった" in timeout and "Nobody answered by the deadline" in timeout


def test_approval_request_names_the_sender() -> None:
    body = text_of(
        notifier(lang="ja+en").render(
            "approval-request", ["boss@x"], data("approval-request", lang="")
        )
    )
    assert "「田中 太郎 <taro@example.co.jp>」 さんのメール" in body
    assert "A message from “田中 太郎 <taro@example.co.jp>”" in body


def test_a_notice_without_summary_still_renders_and_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, "mailguard.notify")
    d = {k: v for k, v in data("confirm").items() if k != "summary"}
    body = text_of(notifier().render("confirm", [SENDER], d))
    assert DATA["url"] in body and "社外の宛先: なし" in body  # the link still reaches the sender
    assert "carries no summary" in caplog.text


def test_hostile_display_names_are_escaped_in_html() -> None:
    evil = '<img src=x onerror="alert(1)">'
    s = _summary_of(make_raw(evil_name=evil), envelope(), POLICY)
    assert any(r.name == evil for r in s.external)
    raw = notifier().render("confirm", [SENDER], data("confirm", summary=s.to_json()))
    html = parse(raw).get_body(("html",))
    assert html is not None
    page = html.get_content()
    assert "<img" not in page and "&lt;img src=x" in page
    assert evil in text_of(raw)  # the plain text shows it as written


def test_text_jis_cannot_encode_falls_back_to_utf8() -> None:
    s = Summary.from_json({**SUMMARY.to_json(), "subject": "報告 😀"})
    raw = notifier("iso-2022-jp").render("held", [SENDER], data("held", summary=s.to_json()))
    msg = parse(raw)
    text = msg.get_body(("plain",))
    assert text is not None and text.get_content_charset() == "utf-8"
    assert "報告 😀" in text.get_content()
    assert str(msg["Subject"]).endswith("「報告 😀」")
    assert b"=?utf-8?b?" in raw  # the subject fell back to UTF-8 too


def test_copied_header_is_not_own_notice() -> None:
    raw = notifier().render("held", [SENDER], data("held"))
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
        "Subject: {{ tr('カスタム', 'Custom') }}\n\n{{ d.url }} {{ s.external | length }} only\n",
        encoding="utf-8",
    )
    msg = parse(notifier(templates_dir=tmp_path).render("held", [SENDER], data("held")))
    assert str(msg["Subject"]) == "カスタム"
    assert msg.get_body(("plain",)).get_content().strip() == f"{DATA['url']} 4 only"  # type: ignore[union-attr]
    # the other kinds still come from the shipped set
    assert "確認" in str(
        parse(notifier(templates_dir=tmp_path).render("confirm", ["t"], data("confirm")))["Subject"]
    )


@pytest.mark.asyncio
async def test_send_hands_the_notice_to_any_mail_sender() -> None:
    rec = Recorder()
    sender: MailSender = rec  # the protocol: no relay type needed
    n = Notifier(sender, "mailguard@example.co.jp", secret=SECRET)
    r = await n.send("outcome", [SENDER], data("outcome"), null_sender=True, msg_id="01ABC")
    assert r.ok
    ((env, raw),) = rec.sent
    assert env.mail_from == "" and env.rcpt_tos == [SENDER] and env.queue_id == "01ABC"
    assert own_notice_kind(raw, SECRET) == "outcome"
    assert n.envelope_for(["a@x"]).mail_from == "mailguard@example.co.jp"


@pytest.mark.asyncio
async def test_send_through_a_real_smtp_transport_uses_null_sender_for_outcomes() -> None:
    sink = Sink()
    server, port = await serve(sink)
    n = Notifier(transport(port), "mailguard@example.co.jp", secret=SECRET)
    try:
        r1 = await n.send("outcome", [SENDER], data("outcome", outcome="expired"), null_sender=True)
        r2 = await n.send("confirm", [SENDER], data("confirm"))
    finally:
        await stop(server)
    assert r1.ok and r2.ok
    assert [(f, t) for f, t, _ in sink.got] == [
        ("<>", [SENDER]),
        ("mailguard@example.co.jp", [SENDER]),
    ]
    assert all(is_own_notice(raw, SECRET) for *_, raw in sink.got)


def test_notify_does_not_import_the_relay() -> None:
    code = (
        "import sys, mailguard.notify; "
        "bad = sorted(m for m in sys.modules if m.startswith('mailguard.relay')); "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("password_to", ["sender", "recipients"])
def test_zip_password_notice_from_the_zip_action(password_to: str) -> None:
    """The notice the zip transform really emits renders (contract between actions and notify).

    It is sent only once the message was accepted upstream, so it speaks in the past tense."""
    from mailguard.actions.zip import _notice

    notice = _notice(
        {"password_to": password_to},
        "Kq7-xP2m",
        ["見積書.xlsx", "仕様.pdf"],
        "見積書.zip",
        "お見積り",
        ["b@partner.co.jp"],
        SENDER,
    )
    n = notifier("iso-2022-jp", lang="ja")
    msg = parse(n.render(notice.kind, notice.to, {**notice.data, "lang": "ja+en"}))
    body = msg.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    assert "Kq7-xP2m" in body and "見積書.zip" in body and "仕様.pdf" in body
    assert "お見積り" in str(msg["Subject"])
    to_sender = password_to == "sender"
    assert ("メール以外の方法" in body) is to_sender
    if to_sender:
        assert "「お見積り」を b@partner.co.jp に送信しました" in body
        assert '"お見積り" was sent to b@partner.co.jp' in body
    else:
        assert "あなた宛てに先にお送りしたメール「お見積り」" in body
        assert "was sent to you earlier" in body
    assert "will be sent" not in body and "送信されます" not in body


# -- issue 12 item 1: values from the message are data -------------------------------------------


def test_data_text_one_safe_line() -> None:
    from mailguard.textsafe import data_text, is_clean, quoted

    evil = "Invoice\r\n\r\n*** IT NOTICE: log in at https://login.evil.example/sso ***\u202e\u2066x"
    out = data_text(evil)
    assert out == "Invoice *** IT NOTICE: log in at https[:]//login.evil.example/sso ***x"
    assert is_clean(out) and data_text(out) == out  # idempotent
    assert data_text("see www.evil.example") == "see www[.]evil.example"
    assert len(data_text("x" * 1000)) == 200 and data_text("x" * 1000).endswith("…")
    assert quoted("見積書", "ja") == "「見積書」" and quoted("quote", "en") == "“quote”"
    assert quoted("", "ja") == ""


def test_html_part_links_only_the_guards_own_urls() -> None:
    s = Summary.from_json(
        {**SUMMARY.to_json(), "subject": "x\r\nhttps://login.evil.example/sso <b>y</b>"}
    )
    d = {**data("confirm"), "summary": s.to_json()}
    subject, body, page = notifier().render_text("confirm", d, "ja")
    assert "\n" not in subject and "https://login.evil.example" not in body + page
    assert re.findall(r'href="([^"]*)"', page) == [d["url"]]
    assert "&lt;b&gt;y&lt;/b&gt;" in page
