"""Benchmark of the zip transform: a 25 MB attachment, time and peak memory (tracemalloc).

    python bench/bench_zip.py [--mb 25] [--method aes|zipcrypto|both] [--kind random|csv|both]

Goal (issue 6): ≤ 1 s and a few copies of the attachment at most. `peak` counts what the
transform allocates (the input message already exists); `copies` = peak / attachment size.
"""

from __future__ import annotations

import argparse
import os
import time
import tracemalloc
from email import policy
from email.message import EmailMessage

from mailguard.actions.zip import ZipAttachments
from mailguard.envelope import Envelope
from mailguard.message import MessageView


def make(size: int, kind: str) -> bytes:
    if kind == "random":  # incompressible, like JPEG/PDF/XLSX: the zip stores it
        data = os.urandom(size)
    else:  # a CSV customer list: deflated
        row = "12345,山田 太郎,yamada@example.co.jp,東京都千代田区1-2-3\n".encode("cp932")
        data = (row * (size // len(row) + 1))[:size]
    m = EmailMessage()
    m["From"] = "yamada@example.co.jp"
    m["To"] = "tanaka@partner.co.jp"
    m["Subject"] = "bench"
    m.set_content("body\n")
    m.add_attachment(data, "application", "octet-stream", filename="大きなファイル.bin")
    return m.as_bytes(policy=policy.SMTP)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=float, default=25)
    ap.add_argument("--method", default="both")
    ap.add_argument("--kind", default="both")
    a = ap.parse_args()
    size = int(a.mb * 1024 * 1024)
    env = Envelope("yamada@example.co.jp", ["tanaka@partner.co.jp"])
    methods = ["aes", "zipcrypto"] if a.method == "both" else [a.method]
    kinds = ["random", "csv"] if a.kind == "both" else [a.kind]
    t = ZipAttachments()
    for kind in kinds:
        raw = make(size, kind)
        for method in methods:
            opts = {"method": method}
            best = float("inf")
            for _ in range(3):
                view = MessageView.parse(raw, env)
                t0 = time.perf_counter()
                out = t.apply(raw, view, opts)
                best = min(best, time.perf_counter() - t0)
                del out, view
            view = MessageView.parse(raw, env)
            tracemalloc.start()
            out = t.apply(raw, view, opts)
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
            print(
                f"{kind:6} {method:9} {a.mb:g} MB: best of 3 {best:.3f} s, "
                f"peak {peak / 2**20:.0f} MiB = {peak / size:.1f}x the attachment, "
                f"message {len(raw) / 2**20:.1f} → {len(out.raw) / 2**20:.1f} MiB"
            )
            del out, view


if __name__ == "__main__":
    main()
