"""Upstream outage under load: the upstream MTA is cut (listener and open connections) for N
seconds while Postfix-like clients keep sending through a real `mailguard serve`.

Expect: only 4xx (or dropped-connection) answers while it is down, no 5xx, 0 lost (every 250 is
at the upstream), and every message delivered once the clients retry after recovery.

    python bench/outage.py                      # 2 000 messages, 20 senders, 60 s outage
    python bench/outage.py --messages 300 --outage 3
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from conftest import free_port, start_serve, wait_port  # noqa: E402
from fault_support import StoppableSink, bench_message, postfix_like, serve_config  # noqa: E402

LOG_LEVEL = "warning"


@dataclass
class Result:
    sent: int
    accepted: int
    delivered: int
    lost: int
    duplicates: int
    refused_5xx: int
    codes_during_outage: dict[int, int]
    ok_during_outage: int  # 250 answered while the upstream was down (must be 0 for pass mail)
    attempts: int
    seconds: float

    def line(self) -> str:
        return (
            f"sent={self.sent} accepted={self.accepted} delivered={self.delivered} "
            f"lost={self.lost} duplicates={self.duplicates} refused_5xx={self.refused_5xx} "
            f"codes_during_outage={dict(sorted(self.codes_during_outage.items()))} "
            f"250_during_outage={self.ok_during_outage} attempts={self.attempts} "
            f"seconds={self.seconds:.1f}"
        )


async def run(
    *,
    messages: int = 2000,
    senders: int = 20,
    outage: float = 60.0,
    down_after: float = 5.0,
    retry: float = 1.0,
    workdir: Path,
) -> Result:
    sink = StoppableSink(free_port())
    await sink.start()
    port = free_port()
    cfg = serve_config(
        workdir / "mg.toml",
        listen=port,
        upstream=sink.port,
        store=workdir / "mg.db",
        policy=ROOT / "bench/policies/observe.toml",
    )
    proc = start_serve(
        ["-c", str(cfg), "--log-level", LOG_LEVEL, "--grace", "2"], log=workdir / "serve.log"
    )
    try:
        await asyncio.to_thread(wait_port, port, 20)
        msgs = dict(
            (m[2].split(b"Message-ID: <")[1].split(b">")[0].decode(), m)
            for m in (bench_message(i, rcpt="b@example.co.jp", tag="o") for i in range(messages))
        )
        loop = asyncio.get_running_loop()
        window: list[float] = []

        async def cut() -> None:
            await asyncio.sleep(down_after)
            window.append(loop.time())
            await sink.stop()
            await asyncio.sleep(outage)
            await sink.start()
            window.append(loop.time())

        t0 = time.monotonic()
        cutter = asyncio.ensure_future(cut())
        # paced so that the load runs before, during and after the outage
        tally = await postfix_like(
            port,
            msgs,
            senders=senders,
            retry=retry,
            deadline=outage + 120 + messages / 20,
            rate=messages / (outage + 2 * down_after),
        )
        await cutter
        took = time.monotonic() - t0
    finally:
        proc.terminate()
        await asyncio.to_thread(proc.wait, 30)
        await sink.stop()
    ids = collections.Counter(sink.ids)
    delivered = {i for i in ids if i in msgs}
    start, end = window
    # a reply to an attempt that started before the cut may land just after it: 1 s margin
    during = [c for t, c in tally.codes if start + 1.0 < t < end]
    return Result(
        sent=messages,
        accepted=len(tally.accepted),
        delivered=len(delivered),
        lost=len(tally.accepted - delivered),
        duplicates=sum(n - 1 for i, n in ids.items() if i in msgs),
        refused_5xx=len(tally.refused),
        codes_during_outage=dict(collections.Counter(during)),
        ok_during_outage=sum(1 for c in during if c == 250),
        attempts=tally.attempts,
        seconds=took,
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=2000)
    ap.add_argument("--senders", type=int, default=20)
    ap.add_argument("--outage", type=float, default=60.0, help="seconds the upstream is down")
    ap.add_argument("--retry", type=float, default=1.0, help="client retry delay after 4xx")
    ap.add_argument("--before", type=float, default=5.0, help="seconds of load before the cut")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="mg-outage-") as d:
        r = asyncio.run(
            run(
                messages=a.messages,
                senders=a.senders,
                outage=a.outage,
                down_after=a.before,
                retry=a.retry,
                workdir=Path(d),
            )
        )
    print(r.line())
    ok = r.lost == 0 and r.refused_5xx == 0 and r.ok_during_outage == 0 and r.delivered == r.sent
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
