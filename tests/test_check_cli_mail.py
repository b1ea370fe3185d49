"""Realistic outgoing messages for the `mailguard check` tests (built as Japanese clients do)."""

from __future__ import annotations

import base64
import io
from email.header import Header

import pyzipper

# The real encodings Japanese mail clients use for headers.


def jis(text: str) -> str:
    """RFC 2047 ISO-2022-JP B-encoding (Outlook, Thunderbird with Japanese defaults)."""
    return Header(text, "iso-2022-jp").encode()


def sjis_raw(text: str) -> bytes:
    """Raw Shift_JIS/CP932 bytes in a header: what old Windows clients still send."""
    return text.encode("cp932")


def mail(
    *,
    frm: str = f"{jis('田中 太郎')} <tanaka@example.co.jp>",
    to: list[str],
    cc: list[str] | None = None,
    subject: str = "新製品のご案内",
    extra_headers: list[str] | None = None,
    attachments: list[tuple[str, str, bytes]] | None = None,
    body: str = "いつもお世話になっております。\n田中です。\n",
) -> bytes:
    """A multipart message as Outlook shapes it: ISO-2022-JP body, base64 attachments."""
    lines = [
        *(extra_headers or []),
        f"From: {frm}",
        "To: " + ",\r\n\t".join(to),
    ]
    if cc:
        lines.append("Cc: " + ",\r\n\t".join(cc))
    lines += [
        f"Subject: {jis(subject)}",
        "Date: Tue, 17 Nov 2026 10:00:00 +0900",
        "Message-ID: <20261117100000.1234@example.co.jp>",
        "MIME-Version: 1.0",
    ]
    text = body.encode("iso-2022-jp")
    if not attachments:
        lines += [
            'Content-Type: text/plain; charset="ISO-2022-JP"',
            "Content-Transfer-Encoding: 7bit",
        ]
        return ("\r\n".join(lines) + "\r\n\r\n").encode() + text.replace(b"\n", b"\r\n")
    lines.append('Content-Type: multipart/mixed; boundary="----=_NextPart_000_0001"')
    out = (
        "\r\n".join(lines) + "\r\n\r\nThis is a multi-part message in MIME format.\r\n\r\n"
    ).encode()
    out += b'------=_NextPart_000_0001\r\nContent-Type: text/plain; charset="ISO-2022-JP"\r\n'
    out += b"Content-Transfer-Encoding: 7bit\r\n\r\n" + text.replace(b"\n", b"\r\n") + b"\r\n"
    for name, ctype, data in attachments:
        encoded = jis(name)
        b64 = base64.encodebytes(data).replace(b"\n", b"\r\n")
        out += (
            f'------=_NextPart_000_0001\r\nContent-Type: {ctype};\r\n\tname="{encoded}"\r\n'
            "Content-Transfer-Encoding: base64\r\n"
            f'Content-Disposition: attachment;\r\n\tfilename="{encoded}"\r\n\r\n'
        ).encode() + b64
    return out + b"------=_NextPart_000_0001--\r\n"


def pdf(text: str = "mitsumori") -> bytes:
    body = f"BT /F1 12 Tf 72 712 Td ({text}) Tj ET".encode()
    return (
        b"%PDF-1.4\n1 0 obj\n<< /Type /Catalog /Pages 2 0 R >>\nendobj\n"
        b"2 0 obj\n<< /Type /Pages /Kids [3 0 R] /Count 1 >>\nendobj\n"
        b"3 0 obj\n<< /Type /Page /Parent 2 0 R /Contents 4 0 R >>\nendobj\n"
        + f"4 0 obj\n<< /Length {len(body)} >>\nstream\n".encode()
        + body
        + b"\nendstream\nendobj\ntrailer\n<< /Root 1 0 R >>\n%%EOF\n"
    )


def aes_zip(name: str, data: bytes, password: bytes = b"Pa55-w0rd") -> bytes:
    buf = io.BytesIO()
    with pyzipper.AESZipFile(
        buf, "w", compression=pyzipper.ZIP_DEFLATED, encryption=pyzipper.WZ_AES
    ) as z:
        z.setpassword(password)
        z.writestr(name, data)
    return buf.getvalue()


CUSTOMERS = [
    f"{jis('山田 花子')} <hanako.yamada@customer-a.co.jp>",
    '"Suzuki, Ichiro" <suzuki@customer-b.co.jp>',
    "sato.personal@gmail.com",
]

# What each test message should get under policies/default.toml (offline: no DNS, no history).
MASS_BCC = mail(to=[f"user{i}@client{i}.co.jp" for i in range(12)])
MULTI_COMPANY = mail(to=CUSTOMERS[:2], cc=["boss@example.co.jp"])
WITH_PDF = mail(
    to=["hanako.yamada@customer-a.co.jp"],
    subject="お見積書の送付",
    attachments=[("御見積書.pdf", "application/pdf", pdf())],
)
WITH_ZIP = mail(
    to=["hanako.yamada@customer-a.co.jp"],
    subject="資料送付",
    attachments=[("資料.zip", "application/x-zip-compressed", aes_zip("資料.pdf", pdf()))],
)
INTERNAL = mail(to=[f"{jis('鈴木')} <suzuki@example.co.jp>", "team@sales.example.co.jp"])
