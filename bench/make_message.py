"""A benchmark message with an attachment, and a small sender for it (no mailguard import).

    python bench/make_message.py OUT.eml [--size 1048576]        write the message
    python bench/make_message.py --send HOST:PORT [--count N] [--conc 5] FILE.eml

The message: Japanese headers (ISO-2022-JP encoded words), a short ISO-2022-JP text part and a
base64 zip (one stored member of random bytes, as a scanner sees an already-compressed file),
about SIZE bytes in all. Deterministic (seeded), so two runs send the same bytes. `--send` sends
FILE COUNT times, one smtplib connection per message, CONC at a time (bench/instr_per_msg.sh).
"""

from __future__ import annotations

import argparse
import base64
import io
import random
import smtplib
import sys
import threading
import zipfile
from email.header import Header


def jis(s: str) -> str:
    return Header(s, "iso-2022-jp").encode()


def make(size: int) -> bytes:
    head = (
        f"From: {jis('田中 太郎')} <a@example.co.jp>\r\n"
        f"To: {jis('山田 花子')} <b@partner.co.jp>\r\n"
        f"Subject: {jis('お見積りの件')}\r\n"
        "Date: Tue, 17 Nov 2026 10:00:00 +0900\r\n"
        "Message-ID: <20261117100000.1234@example.co.jp>\r\n"
        "MIME-Version: 1.0\r\n"
        'Content-Type: multipart/mixed; boundary="==b1=="\r\n\r\n'
        "--==b1==\r\n"
        'Content-Type: text/plain; charset="iso-2022-jp"\r\n'
        "Content-Transfer-Encoding: 7bit\r\n\r\n"
    ).encode()
    text = "いつもお世話になっております。\r\n".encode("iso-2022-jp") * 40
    att = (
        b'--==b1==\r\nContent-Type: application/zip; name="mitsumori.zip"\r\n'
        b"Content-Transfer-Encoding: base64\r\n"
        b'Content-Disposition: attachment; filename="mitsumori.zip"\r\n\r\n'
    )
    tail = b"--==b1==--\r\n"
    rest = max(0, size - len(head) - len(text) - len(att) - len(tail))
    payload = max(1, rest * 76 // 78 * 3 // 4 - 200)  # base64 + CRLF per 76, zip overhead
    z = io.BytesIO()
    with zipfile.ZipFile(z, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("見積書.xlsx", random.Random(1).randbytes(payload))
    b64 = base64.encodebytes(z.getvalue()).replace(b"\n", b"\r\n")
    return head + text + att + b64 + tail


def send(target: str, path: str, count: int, conc: int) -> None:
    host, _, port = target.rpartition(":")
    with open(path, "rb") as f:
        raw = f.read()
    left = [count]
    lock = threading.Lock()
    failed: list[BaseException] = []

    def worker() -> None:
        while True:
            with lock:
                if left[0] <= 0 or failed:
                    return
                left[0] -= 1
            try:
                with smtplib.SMTP(host, int(port), timeout=600) as c:
                    c.sendmail("a@example.co.jp", ["b@partner.co.jp"], raw)
            except Exception as e:  # report, stop the others
                failed.append(e)

    threads = [threading.Thread(target=worker) for _ in range(conc)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failed:
        raise SystemExit(f"make_message.py --send: {failed[0]!r}")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("file")
    ap.add_argument("--size", type=int, default=1 << 20)
    ap.add_argument("--send", metavar="HOST:PORT")
    ap.add_argument("--count", type=int, default=1)
    ap.add_argument("--conc", type=int, default=5)
    a = ap.parse_args()
    if a.send:
        send(a.send, a.file, a.count, a.conc)
        return 0
    with open(a.file, "wb") as f:
        f.write(make(a.size))
    return 0


if __name__ == "__main__":
    sys.exit(main())
