"""Latency per message at concurrency 1: p50/p99 of one SMTP transaction through `mailguard serve`
and straight to the sink, measured in the same run.

    .venv/bin/python bench/latency.py [--count 2000] [--size 5120] [--policy FILE] [--dns]

One connection per message (as Postfix's smtp client without connection caching), smtplib as
the client, smtp-sink as the upstream. With --dns, `[dns] enabled` points at a loopback DNS
server that answers every query (MX), and the recipient domain repeats, so after the first
message every lookup is answered from the guard's cache — "DNS answered from cache".
Prints one line per path and the date.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import smtplib
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on {port}")


def message(size: int, i: int) -> bytes:
    head = (
        f"From: a@example.co.jp\r\nTo: b@partner.co.jp\r\nSubject: latency {i}\r\n"
        f"Message-ID: <lat-{i}@example.co.jp>\r\n\r\n"
    ).encode()
    line = b"x" * 76 + b"\r\n"
    return head + line * max(1, (size - len(head)) // len(line))


def run(port: int, count: int, size: int) -> list[float]:
    out = []
    for i in range(count):
        raw = message(size, i)
        t = time.perf_counter()
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as c:
            c.sendmail("a@example.co.jp", ["b@partner.co.jp"], raw)
        out.append(time.perf_counter() - t)
    return out


def dns_server() -> int:
    """A loopback DNS server answering MX 10 mx.<name> for every name (dnspython)."""
    import dns.message
    import dns.rrset

    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            data, addr = sock.recvfrom(4096)
            q = dns.message.from_wire(data)
            r = dns.message.make_response(q)
            name = q.question[0].name
            r.answer.append(dns.rrset.from_text(name, 300, "IN", "MX", f"10 mx.{name}"))
            sock.sendto(r.to_wire(), addr)

    threading.Thread(target=serve, daemon=True).start()
    return int(sock.getsockname()[1])


def pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, round(p / 100 * (len(s) - 1)))] * 1000


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--count", type=int, default=2000)
    ap.add_argument("--size", type=int, default=5120)
    ap.add_argument("--policy", default=str(ROOT / "bench/policies/observe.toml"))
    ap.add_argument("--dns", action="store_true")
    a = ap.parse_args()
    sink_bin = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"
    tmp = Path(tempfile.mkdtemp(prefix="mg-latency-"))
    sink_port, mg_port = free_port(), free_port()
    procs = [
        subprocess.Popen(
            [sink_bin, "-u", "nobody", f"127.0.0.1:{sink_port}", "1000"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    ]
    cfg = tmp / "mg.toml"
    dns = ""
    if a.dns:
        dns = f'\n[dns]\nenabled = true\nnameservers = ["127.0.0.1"]\nport = {dns_server()}\n'
    cfg.write_text(
        f'[smtp]\nlisten = "127.0.0.1:{mg_port}"\n[upstream]\naddress = "127.0.0.1:{sink_port}"\n'
        f'[policy]\nfile = "{a.policy}"\n[store]\npath = "{tmp / "mg.db"}"\n'
        f'[web]\nenabled = false\n[log]\nlevel = "warning"\n{dns}'
    )
    exe = os.environ.get("MAILGUARD") or (  # MAILGUARD=/path/to/mailguard: another install
        shutil.which("mailguard", path=os.path.dirname(sys.executable)) or "mailguard"
    )
    procs.append(subprocess.Popen([exe, "serve", "-c", str(cfg)], stderr=subprocess.DEVNULL))
    try:
        wait_port(sink_port)
        wait_port(mg_port)
        run(mg_port, 50, a.size)  # warm-up: caches, pooled upstream connection
        run(sink_port, 50, a.size)
        direct = run(sink_port, a.count, a.size)
        guard = run(mg_port, a.count, a.size)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)
    day = datetime.date.today().isoformat()
    for label, xs in (("direct", direct), ("mailguard", guard)):
        print(
            f"{label:9} size={a.size} n={len(xs)} p50={pct(xs, 50):.2f}ms p99={pct(xs, 99):.2f}ms "
            f"mean={statistics.fmean(xs) * 1000:.2f}ms dns={'cache' if a.dns else 'off'} ({day})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
