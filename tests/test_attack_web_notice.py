"""Issue 12 item 1 — phishing text in the guard's own notice and page. Against `mailguard serve`
(tests/e2e_support.py): a message whose Subject, display name and attachment name carry CR/LF,
bidi controls and a URL is held for confirmation; the notice the guard sends and the confirm page
it serves must show those values as quoted data on one line, and link nothing but the guard's own
URLs.

Attack → what the old code did:
* Subject `=?UTF-8?B?…?=` decoding to `Invoice\\r\\n\\r\\n*** IT NOTICE: log in at https://… ***`
  → the notice's Subject line ended at the CR/LF and the rest opened the notice body; the HTML
  part made https://login.evil.example/sso a link;
* a display name with U+202E and a file name `invoice\\u202efdp.exe` → shown with the override.
"""

from __future__ import annotations

import base64
import re
from email.header import decode_header, make_header
from pathlib import Path

from e2e_support import SENDER, Guard, policy

CONFIRM = """
[[rule]]
name = "ask"
when = "recipient.external"
action = "confirm"
"""

EVIL_URL = "https://login.evil.example/sso"
PHISH = f"Invoice\r\n\r\n*** IT NOTICE: log in at {EVIL_URL} ***"
BIDI = "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u200e\u200f\u061c"
NAME = "Tanaka\u202e moc.live \r\nIT desk: https://evil.example/reset"
FILE = "invoice\u202efdp.exe"
JA = 'lang = "ja"'


def b64word(s: str) -> str:
    return f"=?UTF-8?B?{base64.b64encode(s.encode()).decode()}?="


def phishing_mail() -> bytes:
    boundary = "b0undary-e2e"
    fname = "".join(f"%{b:02X}" for b in FILE.encode())
    return (
        f"From: {SENDER}\r\n"
        f'To: "{b64word(NAME)}" <tanaka@customer-a.co.jp>\r\n'
        f"Subject: {b64word(PHISH)}\r\n"
        "Message-ID: <phish-1@e2e.test>\r\n"
        "MIME-Version: 1.0\r\n"
        f'Content-Type: multipart/mixed; boundary="{boundary}"\r\n'
        "\r\n"
        f"--{boundary}\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n\r\n"
        "hello\r\n"
        f"--{boundary}\r\n"
        "Content-Type: application/octet-stream\r\n"
        f"Content-Disposition: attachment; filename*=UTF-8''{fname}\r\n"
        "Content-Transfer-Encoding: base64\r\n\r\n"
        f"{base64.b64encode(b'MZ' + bytes(200)).decode()}\r\n"
        f"--{boundary}--\r\n"
    ).encode()


def html_part(msg_bytes: bytes) -> str:
    import email
    import email.policy

    m = email.message_from_bytes(msg_bytes, policy=email.policy.default)
    for part in m.walk():
        if part.get_content_type() == "text/html":
            return str(part.get_content())  # type: ignore[attr-defined]
    raise AssertionError("no text/html part")


def text_part(msg_bytes: bytes) -> str:
    import email
    import email.policy

    m = email.message_from_bytes(msg_bytes, policy=email.policy.default)
    for part in m.walk():
        if part.get_content_type() == "text/plain":
            return str(part.get_content())  # type: ignore[attr-defined]
    raise AssertionError("no text/plain part")


def test_phishing_subject_name_and_file_name_stay_quoted_data(tmp_path: Path) -> None:
    with Guard(tmp_path, policy_text=policy(CONFIRM, defaults=JA)) as g:
        code, text = g.send_bytes(phishing_mail(), SENDER, ["tanaka@customer-a.co.jp"])
        assert code == 250 and "held as" in text, (code, text)
        notice = g.wait_notice("confirm")
        link = g.link(notice)

        # -- the notice's headers: one Subject, no injected lines, data quoted
        head = notice.data.split(b"\r\n\r\n", 1)[0].decode("ascii")
        assert "IT NOTICE" not in head  # encoded words only; decode to check the value
        subject = str(make_header(decode_header(notice.msg["Subject"])))
        assert "\r" not in subject and "\n" not in subject
        assert (
            "「Invoice *** IT NOTICE: log in at https[:]//login.evil.example/sso ***」" in subject
        )

        # -- the text part: the data never starts a line of its own
        body = text_part(notice.data)
        for line in body.splitlines():
            assert not line.lstrip().startswith("*** IT NOTICE"), body
        assert EVIL_URL not in body and "https://evil.example" not in body
        assert "件名: 「Invoice *** IT NOTICE" in body
        assert not any(c in body for c in BIDI), "bidi control in the notice text"
        assert "「invoicefdp.exe」" in body
        assert "「Tanaka moc.live IT desk: https[:]//evil.example/reset」 <tanaka@" in body

        # -- the HTML part: the only link is the guard's own confirm link
        page_html = html_part(notice.data)
        hrefs = re.findall(r"<a\b[^>]*href=\"([^\"]*)\"", page_html)
        assert hrefs == [link], hrefs
        assert EVIL_URL not in page_html
        assert not any(c in page_html for c in BIDI)

        # -- the confirm page: quoted, one line, no bidi, no foreign links
        page = g.page(link, lang="ja")
        assert page.status == 200
        assert page.section("subject").startswith("「Invoice *** IT NOTICE"), page.section(
            "subject"
        )
        assert EVIL_URL not in page.html and "https://evil.example" not in page.html
        assert not any(c in page.html for c in BIDI), "bidi control on the page"
        assert "「invoicefdp.exe」" in page.text
        assert "「Tanaka moc.live IT desk" in page.text
        page_hrefs = re.findall(r"<a\b[^>]*href=\"([^\"]*)\"", page.html)
        assert page_hrefs == ["?lang=en"], page_hrefs


def test_long_subject_is_capped(tmp_path: Path) -> None:
    with Guard(tmp_path, policy_text=policy(CONFIRM, defaults=JA)) as g:
        sent = g.send(to=["tanaka@customer-a.co.jp"], subject="Q" * 5000)
        assert sent.held_id
        notice = g.wait_notice("confirm")
        body = text_part(notice.data)
        assert "Q" * 300 not in body and "Q" * 150 in body and "…」" in body
        page = g.page(g.link(notice))
        assert "Q" * 300 not in page.html and "…" in page.section("subject")
