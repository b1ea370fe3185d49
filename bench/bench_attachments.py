"""Benchmark (not a test): CPU time of sniff + attachments.analyze per message.

    python bench/bench_attachments.py [--repeat N]

Messages: a 5 KB mail with a small CSV; a mail with a 10 MB zip; a mail with a 10 MB PDF;
the same PDF with a user password (qpdf, if installed). MessageView.parse is timed separately.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import statistics
import subprocess
import tempfile
import time
import zipfile
from collections.abc import Callable
from email.message import EmailMessage
from pathlib import Path

from mailguard.checks import CheckContext
from mailguard.checks.attachments import analyze
from mailguard.formats import sniff
from mailguard.message import MessageView


def mail(name: str, data: bytes, ctype: str, body: str = "お世話になっております。\n") -> bytes:
    m = EmailMessage()
    m["From"] = "山田 <yamada@example.co.jp>"
    m["To"] = "tanaka@partner.co.jp"
    m["Subject"] = "資料送付の件"
    m.set_content(body)
    maintype, subtype = ctype.split("/")
    m.add_attachment(data, maintype=maintype, subtype=subtype, filename=name)
    return m.as_bytes()


def big_pdf(size: int) -> bytes:
    blob = os.urandom(size)  # stands in for a compressed image stream
    objs = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 200 200] /Contents 4 0 R >>",
        b"<< /Length %d >>\nstream\n" % len(blob) + blob + b"\nendstream",
    ]
    out, offs = b"%PDF-1.4\n", []
    for i, o in enumerate(objs, 1):
        offs.append(len(out))
        out += b"%d 0 obj\n" % i + o + b"\nendobj\n"
    x = len(out)
    out += b"xref\n0 5\n0000000000 65535 f \n" + b"".join(b"%010d 00000 n \n" % o for o in offs)
    return out + b"trailer\n<< /Size 5 /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % x


def big_zip(size: int) -> bytes:
    b = io.BytesIO()
    with zipfile.ZipFile(b, "w", zipfile.ZIP_DEFLATED) as z:
        for i in range(10):  # mostly incompressible, like photos and PDFs
            z.writestr(f"写真{i}.jpg", b"\xff\xd8\xff\xe0" + os.urandom(size // 10))
        z.writestr("一覧.csv", "氏名,メール\n" * 1000)
    return b.getvalue()


def cpu_ms(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.process_time()
        fn()
        times.append((time.process_time() - t) * 1000)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    csv = ("氏名,メール\n" + "山田太郎,taro@example.co.jp\n" * 80).encode("cp932")
    pdf = big_pdf(10 << 20)
    cases = {
        "5 KB mail + CSV": mail("顧客リスト.csv", csv, "text/csv", body="本文\n" * 200),
        "10 MB zip": mail("写真.zip", big_zip(10 << 20), "application/zip"),
        "10 MB pdf": mail("カタログ.pdf", pdf, "application/pdf"),
    }
    if shutil.which("qpdf"):
        with tempfile.TemporaryDirectory() as d:
            src, dst = Path(d, "in.pdf"), Path(d, "out.pdf")
            src.write_bytes(pdf)
            subprocess.run(["qpdf", "--encrypt", "u", "o", "256", "--", src, dst], check=True)
            cases["10 MB pdf, AES-256 user pw"] = mail(
                "契約書.pdf", dst.read_bytes(), "application/pdf"
            )
    ctx = CheckContext()
    print(f"{'message':28} {'size':>10} {'parse ms':>9} {'analyze ms':>11} {'sniff ms':>9}")
    for label, raw in cases.items():
        view = MessageView.parse(raw)
        att = view.attachments[0]
        body = view.body_of(att)
        parse = cpu_ms(lambda raw=raw: MessageView.parse(raw), args.repeat)
        # analyze on a fresh view each time: includes base64 decoding of the attachment
        full = cpu_ms(lambda raw=raw: analyze(MessageView.parse(raw), ctx), args.repeat) - parse
        only = cpu_ms(lambda body=body, att=att: sniff(body, att.filename), args.repeat)
        print(f"{label:28} {len(raw):>10} {parse:>9.2f} {full:>11.2f} {only:>9.2f}")


if __name__ == "__main__":
    main()
