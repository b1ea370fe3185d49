"""Benchmark: cost of building the message view, next to the stdlib and fast-mail-parser.

Prints per-message microseconds (best of several rounds, one core) for a 5 KB plain message, a
5 KB multipart (Outlook-style mixed/related/alternative), 1 MB with one base64 attachment and
10 MB with one base64 attachment:

    python bench/bench_parse.py [--rounds 5]

Columns: `view` = MessageView.parse (what the relay does per message), `view+addr` = plus To/Cc
parsed, `stdlib` = email.message_from_bytes(policy=compat32) walking every part,
`stdlib-hdr` = BytesHeaderParser on the whole message, `fmp-meta` / `fmp-lazy` =
fast_mail_parser.parse_email_tree(mode="metadata" / "lazy") (if installed).
"""

from __future__ import annotations

import argparse
import base64
import email
import os
import sys
import time
from collections.abc import Callable
from email import policy
from email.parser import BytesHeaderParser
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mailguard.message import MessageView

HEAD = (
    "Return-Path: <taro@example.co.jp>\r\n"
    "Received: from pc01.example.co.jp (pc01.example.co.jp [192.0.2.10])\r\n"
    "\tby mail.example.co.jp (Postfix) with ESMTPSA id 4Q2xYz1abc\r\n"
    "\tfor <hanako@partner.co.jp>; Mon, 15 Jan 2024 10:00:00 +0900 (JST)\r\n"
    "From: =?ISO-2022-JP?B?GyRCOzNFRCBCQE86GyhC?= <taro@example.co.jp>\r\n"
    "To: =?ISO-2022-JP?B?GyRCMlZDZhsoQg==?= <hanako@partner.co.jp>, jiro@other.co.jp\r\n"
    "Cc: boss@example.co.jp\r\n"
    "Subject: =?ISO-2022-JP?B?GyRCOCtAUTtxTkEkTkF3SVUkSyREJCQkRhsoQg==?=\r\n"
    "Date: Mon, 15 Jan 2024 10:00:00 +0900\r\n"
    "Message-ID: <000001da4734$1a2b3c4d$5e6f7a8b@example.co.jp>\r\n"
    "MIME-Version: 1.0\r\n"
    "X-Mailer: Microsoft Outlook 16.0\r\n"
    "Thread-Index: AdpHNBorPE1eb3qLAAAAAAAAAAAAAA==\r\n"
    "Content-Language: ja\r\n"
)


def plain_5k() -> bytes:
    body = "".join(f"line {i:04d} お世話になっております。\r\n" for i in range(120))
    raw = HEAD + "Content-Type: text/plain; charset=UTF-8\r\nContent-Transfer-Encoding: 8bit\r\n"
    return (raw + "\r\n" + body).encode()[:5120]


def multipart_5k() -> bytes:
    text = "お世話になっております。\r\n" * 40
    html = "<p>お世話になっております。</p>\r\n" * 30
    logo = base64.encodebytes(bytes(range(256)) * 3).decode().replace("\n", "\r\n")
    m, r, a = "----=_NextPart_000_0001", "----=_NextPart_001_0002", "----=_NextPart_002_0003"
    out = (
        HEAD + f'Content-Type: multipart/mixed; boundary="{m}"\r\n\r\n'
        "This is a multi-part message in MIME format.\r\n\r\n"
        f'--{m}\r\nContent-Type: multipart/related; boundary="{r}"\r\n\r\n'
        f'--{r}\r\nContent-Type: multipart/alternative; boundary="{a}"\r\n\r\n'
        f'--{a}\r\nContent-Type: text/plain; charset="utf-8"\r\n'
        f"Content-Transfer-Encoding: 8bit\r\n\r\n{text}\r\n"
        f'--{a}\r\nContent-Type: text/html; charset="utf-8"\r\n'
        f"Content-Transfer-Encoding: 8bit\r\n\r\n{html}\r\n--{a}--\r\n\r\n"
        f'--{r}\r\nContent-Type: image/png; name="image001.png"\r\n'
        "Content-Transfer-Encoding: base64\r\nContent-ID: <image001.png@01DA4734.1A2B3C40>\r\n\r\n"
        f"{logo}\r\n--{r}--\r\n\r\n"
        f'--{m}\r\nContent-Type: text/csv; name="=?ISO-2022-JP?B?GyRCOFxLXEw+SmgbKEI=?=.csv"\r\n'
        "Content-Disposition: attachment;\r\n"
        " filename*=utf-8''%E9%A1%A7%E5%AE%A2%E5%90%8D%E7%B0%BF.csv\r\n"
        "Content-Transfer-Encoding: base64\r\n\r\n"
        + base64.encodebytes(b"name,mail\r\n" * 30).decode().replace("\n", "\r\n")
        + f"\r\n--{m}--\r\n"
    )
    return out.encode()


def attachment(size: int) -> bytes:
    blob = base64.encodebytes(os.urandom(size * 3 // 4)).decode().replace("\n", "\r\n")
    m = "----=_NextPart_000_0001"
    out = (
        HEAD + f'Content-Type: multipart/mixed; boundary="{m}"\r\n\r\n'
        f'--{m}\r\nContent-Type: text/plain; charset="iso-2022-jp"\r\n'
        "Content-Transfer-Encoding: 7bit\r\n\r\nsee attached\r\n"
        f'--{m}\r\nContent-Type: application/pdf; name="report.pdf"\r\n'
        'Content-Disposition: attachment; filename="report.pdf"\r\n'
        f"Content-Transfer-Encoding: base64\r\n\r\n{blob}\r\n--{m}--\r\n"
    )
    return out.encode()


def _best(fn: Callable[[], object], n: int, rounds: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t) / n)
    return best * 1e6


def candidates(raw: bytes) -> dict[str, Callable[[], object]]:
    def view() -> object:
        return MessageView.parse(raw)

    def view_addr() -> object:
        v = MessageView.parse(raw)
        return v.to, v.cc, v.subject, [p.filename for p in v.attachments]

    def stdlib() -> object:
        msg = email.message_from_bytes(raw, policy=policy.compat32)
        return [p.get_content_type() for p in msg.walk()]

    def stdlib_hdr() -> object:
        return BytesHeaderParser(policy=policy.compat32).parsebytes(raw)

    out: dict[str, Callable[[], object]] = {
        "view": view,
        "view+addr": view_addr,
        "stdlib": stdlib,
        "stdlib-hdr": stdlib_hdr,
    }
    try:
        import fast_mail_parser as fmp
    except ImportError:
        return out

    def fmp_meta() -> object:
        return fmp.parse_email_tree(raw, mode="metadata")

    def fmp_lazy() -> object:
        return fmp.parse_email_tree(raw, mode="lazy")

    out["fmp-meta"] = fmp_meta
    out["fmp-lazy"] = fmp_lazy
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    samples = {
        "5KB plain": plain_5k(),
        "5KB multipart": multipart_5k(),
        "1MB base64": attachment(1 << 20),
        "10MB base64": attachment(10 << 20),
    }
    names = list(candidates(b"").keys())
    print(f"{'message':<14}{'bytes':>10}" + "".join(f"{n:>12}" for n in names) + "   (µs/msg)")
    for label, raw in samples.items():
        n = max(2, min(2000, int(2e7 // max(len(raw), 1)) // 4))
        row = [_best(fn, n, args.rounds) for fn in candidates(raw).values()]
        print(f"{label:<14}{len(raw):>10}" + "".join(f"{x:>12.1f}" for x in row))


if __name__ == "__main__":
    main()
