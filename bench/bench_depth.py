"""Benchmark: what deep MIME nesting costs the guard (message view + every check), and the bound.

A forward chain of N levels is what mail clients build when a message is forwarded as an
attachment again and again: each level is multipart/mixed (a text part and a message/rfc822
part holding the previous level), with an unencrypted PDF in the original message at the bottom.
Each level takes 2 MIME depth levels. The hostile shapes are a bare multipart nest past the depth
bound and a nest with thousands of sibling parts at the bottom (the part bound).

    python bench/bench_depth.py [--rounds 3] [--levels 10,100,300,1000,2000,3000]

Per shape: message size, MIME parts seen, whether a bound was hit, whether the PDF was found
(`pdf`), best-of-rounds wall time of MessageView.parse and of run_checks, and the peak Python
heap (tracemalloc) of one parse + checks.
"""

from __future__ import annotations

import argparse
import base64
import sys
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mailguard.checks import CheckContext, Org, run_checks
from mailguard.envelope import Envelope
from mailguard.message import MessageView
from mailguard.message.view import Limits


def pdf(size: int = 20_000) -> bytes:
    head = b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\n"
    tail = b"\n%%EOF\n"
    return head + b"%" * (size - len(head) - len(tail)) + tail


def forward_chain(levels: int) -> bytes:
    b64 = base64.encodebytes(pdf()).decode().replace("\n", "\r\n")
    inner = (
        "From: a@partner.co.jp\r\nTo: b@ourco.co.jp\r\nSubject: original\r\nMIME-Version: 1.0\r\n"
        'Content-Type: multipart/mixed; boundary="b0"\r\n\r\n'
        "--b0\r\nContent-Type: text/plain\r\n\r\nhello\r\n"
        '--b0\r\nContent-Type: application/pdf; name="secret.pdf"\r\n'
        'Content-Disposition: attachment; filename="secret.pdf"\r\n'
        "Content-Transfer-Encoding: base64\r\n\r\n" + b64 + "--b0--\r\n"
    )
    parts = [inner]
    for i in range(1, levels + 1):
        who = "yamada@ourco.co.jp" if i == levels else f"p{i}@partner.co.jp"
        parts.insert(
            0,
            f"From: {who}\r\nTo: x@customer.co.jp\r\nSubject: Fw: level {i}\r\n"
            f"Date: Mon, 15 Jan 2024 10:00:00 +0900\r\nMessage-ID: <{i}.fw@ourco.co.jp>\r\n"
            f'MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="=_b{i}"\r\n\r\n'
            f"--=_b{i}\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
            f"Forwarding, see below. (level {i})\r\n"
            f"--=_b{i}\r\nContent-Type: message/rfc822\r\n\r\n",
        )
        parts.append(f"\r\n--=_b{i}--\r\n")
    return "".join(parts).encode()


def bare_nest(depth: int, siblings: int = 1, big: int = 0) -> bytes:
    """multipart/mixed inside multipart/mixed … `siblings` small parts at the bottom (and a
    base64 file of `big` bytes)."""
    head = (
        "From: yamada@ourco.co.jp\r\nTo: x@customer.co.jp\r\nSubject: nest\r\nMIME-Version: 1.0\r\n"
    )
    opens = [head + 'Content-Type: multipart/mixed; boundary="n0"\r\n\r\n']
    for i in range(1, depth):
        opens.append(f'--n{i - 1}\r\nContent-Type: multipart/mixed; boundary="n{i}"\r\n\r\n')
    leaf = "".join(
        f"--n{depth - 1}\r\nContent-Type: application/octet-stream\r\n\r\nx{k}\r\n"
        for k in range(siblings)
    )
    if big:
        leaf += (
            f"--n{depth - 1}\r\nContent-Type: application/pdf\r\n"
            'Content-Disposition: attachment; filename="big.pdf"\r\n'
            "Content-Transfer-Encoding: base64\r\n\r\n"
            + base64.encodebytes(pdf(big)).decode().replace("\n", "\r\n")
        )
    closes = [f"--n{i}--\r\n" for i in range(depth - 1, -1, -1)]
    return ("".join(opens) + leaf + "".join(closes)).encode()


def best(fn: Callable[[], object], rounds: int) -> float:
    out = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        out = min(out, time.perf_counter() - t0)
    return out


def measure(label: str, raw: bytes, rounds: int, lim: Limits) -> None:
    env = Envelope("yamada@ourco.co.jp", ["x@customer.co.jp"])
    ctx = CheckContext(Org(internal=("ourco.co.jp",)))
    t_parse = best(lambda: MessageView.parse(raw, env, lim), rounds)
    view = MessageView.parse(raw, env, lim)
    t_all = best(lambda: run_checks(MessageView.parse(raw, env, lim), ctx), rounds)
    t_checks = max(t_all - t_parse, 0.0)
    res = run_checks(view, ctx)
    tracemalloc.start()
    run_checks(MessageView.parse(raw, env, lim), ctx)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    atts = res.blocks["attachments"]
    found = any(
        a["filename"] in ("secret.pdf", "big.pdf") and a["encrypted"] is False for a in atts
    )
    unseen = sum(1 for a in atts if a.get("uninspected"))
    codes = sorted(
        {f.code for f in res.findings if f.code.startswith(("message.limit", "attachment.limit"))}
    )
    print(
        f"{label:<28} {len(raw) / 1024:>9.0f} {len(view.parts):>6} {found!s:>5} {unseen:>7}"
        f" {','.join(codes) or '-':<31} {t_parse * 1000:>9.1f} {t_checks * 1000:>9.1f}"
        f" {peak / 2**20:>8.1f}"
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--levels", default="10,100,300,500,1000")
    ap.add_argument("--max-depth", type=int, help="try another bound (default: Limits())")
    ap.add_argument("--max-parts", type=int, help="try another bound (default: Limits())")
    a = ap.parse_args()
    lim = Limits()
    lim = Limits(a.max_depth or lim.max_depth, a.max_parts or lim.max_parts)
    run_checks(MessageView.parse(forward_chain(1)), CheckContext())  # imports, caches
    print(
        f"Limits: max_depth={lim.max_depth} max_parts={lim.max_parts};"
        f" python {sys.version.split()[0]}"
    )
    print(
        f"{'shape':<28} {'size KB':>9} {'parts':>6} {'pdf':>5} {'unseen':>7} {'bound findings':<31}"
        f" {'parse ms':>9} {'checks ms':>9} {'peak MB':>8}"
    )
    for n in (int(x) for x in a.levels.split(",")):
        measure(f"forward chain {n} levels", forward_chain(n), a.rounds, lim)
    measure(f"bare nest depth {lim.max_depth + 10}", bare_nest(lim.max_depth + 10), a.rounds, lim)
    measure(
        f"nest {lim.max_depth - 10} + 10 MB file",
        bare_nest(lim.max_depth - 10, 1, 10 << 20),
        a.rounds,
        lim,
    )
    measure(
        f"nest {lim.max_depth - 10} + siblings",
        bare_nest(lim.max_depth - 10, lim.max_parts + 100),
        a.rounds,
        lim,
    )


if __name__ == "__main__":
    main()
