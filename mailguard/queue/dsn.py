"""Queue stage, bounces: an RFC 3464 delivery status notification for mail we said 250 to but
the upstream refused for good (or retries ran out).

multipart/report; report-type=delivery-status with three parts: a human explanation (ja/en,
UTF-8), message/delivery-status (one block per recipient), text/rfc822-headers (the original
header, never the body: the content already went wrong once).
"""

from __future__ import annotations

import base64
import re
import secrets
from collections.abc import Sequence
from datetime import datetime
from email.header import Header
from email.utils import format_datetime, make_msgid

_ENHANCED = re.compile(r"^\s*([245]\.\d{1,3}\.\d{1,3})\b")


def status_of(code: int, text: str) -> str:
    """The RFC 3463 status for the DSN: the reply's enhanced code, or one derived from `code`."""
    m = _ENHANCED.match(text)
    if m and m[1][0] == "5":
        return m[1]
    return "5.0.0" if code >= 500 else "4.4.7"  # 4.4.7 = delivery time expired


def _xtext_safe(s: str) -> str:
    return re.sub(r"[\r\n]+", " ", s).strip()


def build_dsn(
    *,
    reporting_mta: str,
    postmaster: str,
    to: str,
    msg_id: str,
    rcpts: Sequence[str],
    code: int,
    text: str,
    arrival: datetime,
    last_attempt: datetime,
    original_headers: bytes,
    remote_mta: str = "",
    note: str = "",
) -> bytes:
    """The DSN as bytes (CRLF). The caller sends it with the null envelope sender. `note`: a
    line for the admin when the DSN goes to them instead of the sender (ASCII, no CR/LF)."""
    boundary = "=_mailguard_" + secrets.token_hex(12)
    status = status_of(code, text)
    diag = _xtext_safe(f"{code} {text}")
    subject = "配送できませんでした / Undelivered Mail Returned to Sender"
    human = (
        "MailGuard からのお知らせです。\r\n\r\n"
        "いったん受け付けたあなたのメールを、次の宛先に配送できませんでした。"
        "このメールは送信されていません。\r\n\r\n"
        "This is MailGuard. Your message was accepted earlier but could not be delivered to\r\n"
        "the recipients below. It has NOT been sent.\r\n\r\n"
        + "".join(f"  <{r}>\r\n" for r in rcpts)
        + f"\r\n  {diag}\r\n\r\n"
        f"  ID: {msg_id}\r\n" + (f"\r\n  {_xtext_safe(note)}\r\n" if note else "")
    )
    human_b64 = base64.encodebytes(human.encode("utf-8")).replace(b"\n", b"\r\n")
    per_msg = (
        f"Reporting-MTA: dns; {reporting_mta}\r\n"
        f"X-MailGuard-Queue-ID: {msg_id}\r\n"
        f"Arrival-Date: {format_datetime(arrival)}\r\n"
    )
    per_rcpt = "".join(
        f"\r\nFinal-Recipient: rfc822; {r}\r\n"
        f"Action: failed\r\n"
        f"Status: {status}\r\n"
        + (f"Remote-MTA: dns; {remote_mta}\r\n" if remote_mta else "")
        + f"Diagnostic-Code: smtp; {diag}\r\n"
        f"Last-Attempt-Date: {format_datetime(last_attempt)}\r\n"
        for r in rcpts
    )
    headers = original_headers.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n").rstrip(b"\r\n")
    domain = postmaster.rpartition("@")[2] or reporting_mta
    head = (
        f"From: MailGuard <{postmaster}>\r\n"
        f"To: <{to}>\r\n"
        f"Subject: {Header(subject, 'utf-8').encode()}\r\n"
        f"Date: {format_datetime(last_attempt)}\r\n"
        f"Message-ID: {make_msgid('mailguard-dsn', domain=domain)}\r\n"
        "Auto-Submitted: auto-replied\r\n"  # RFC 3834: a DSN answers a message
        "MIME-Version: 1.0\r\n"
        "Content-Type: multipart/report; report-type=delivery-status;\r\n"
        f' boundary="{boundary}"\r\n'
    )
    body = (
        f"--{boundary}\r\n"
        'Content-Type: text/plain; charset="utf-8"\r\n'
        "Content-Transfer-Encoding: base64\r\n"
        "Content-Description: Notification\r\n\r\n"
    ).encode() + human_b64
    body += (
        f"\r\n--{boundary}\r\n"
        "Content-Type: message/delivery-status\r\n"
        "Content-Description: Delivery report\r\n\r\n"
        f"{per_msg}{per_rcpt}"
        f"\r\n--{boundary}\r\n"
        "Content-Type: text/rfc822-headers\r\n"
        "Content-Description: Undelivered Message Headers\r\n\r\n"
    ).encode()
    body += headers + f"\r\n\r\n--{boundary}--\r\n".encode()
    return head.encode() + b"\r\n" + body


def header_block(raw: bytes) -> bytes:
    """The message's header section (up to the first empty line)."""
    for sep in (b"\r\n\r\n", b"\n\n"):
        i = raw.find(sep)
        if i >= 0:
            return raw[:i]
    return raw
