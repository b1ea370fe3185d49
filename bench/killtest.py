"""kill -9 under load: Postfix-like clients push messages (pass and hold) through `mailguard serve`
while the process is SIGKILLed at random moments and restarted; every message that got a 250
must reach the upstream (held ones once their short hold_for is over), duplicates are counted.

    python bench/killtest.py                          # 2 000 messages, 20 senders, kill every 1-4 s
    python bench/killtest.py --messages 300 --kills 3 --pass-only
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from conftest import free_port, start_serve, wait_port  # noqa: E402
from fault_support import StoppableSink, bench_message, postfix_like, serve_config  # noqa: E402

# Internal mail passes (relayed in-transaction); mail to partner.co.jp is held for 1 s, then the
# scheduler delivers it: both paths are killed in the middle.
POLICY = """
[organization]
internal_domains = ["example.co.jp"]

[[rule]]
name = "cool-down"
when = "recipient.external"
action = "hold"
hold_for = "1s"
"""


@dataclass
class Result:
    sent: int
    accepted: int
    delivered: int
    lost: int
    duplicates: int
    refused_5xx: int
    kills: int
    held_accepted: int
    attempts: int
    seconds: float

    def line(self) -> str:
        return (
            f"sent={self.sent} accepted={self.accepted} delivered={self.delivered} "
            f"lost={self.lost} duplicates={self.duplicates} refused_5xx={self.refused_5xx} "
            f"kills={self.kills} held_accepted={self.held_accepted} attempts={self.attempts} "
            f"seconds={self.seconds:.1f}"
        )


async def run(
    *,
    messages: int = 2000,
    senders: int = 20,
    kills: int = 10,
    every: tuple[float, float] = (1.0, 4.0),
    pass_only: bool = False,
    drain: float = 120.0,
    workdir: Path,
    seed: int | None = None,
) -> Result:
    rnd = random.Random(seed)
    sink = StoppableSink(free_port())
    await sink.start()
    port = free_port()
    (workdir / "policy.toml").write_text(POLICY)
    cfg = serve_config(
        workdir / "mg.toml",
        listen=port,
        upstream=sink.port,
        store=workdir / "mg.db",
        policy=workdir / "policy.toml",
    )
    args = ["-c", str(cfg), "--log-level", "warning", "--grace", "2"]
    procs: list[subprocess.Popen[bytes]] = [start_serve(args, log=workdir / "serve.log")]
    await asyncio.to_thread(wait_port, port, 20)
    msgs = {}
    held_ids = set()
    for i in range(messages):
        hold = not pass_only and i % 2 == 1
        m = bench_message(i, rcpt="x@partner.co.jp" if hold else "b@example.co.jp", tag="k")
        mid = f"k{i:06d}@bench.test"
        msgs[mid] = m
        if hold:
            held_ids.add(mid)
    done = asyncio.Event()
    killed = 0

    async def killer() -> None:
        nonlocal killed
        while killed < kills and not done.is_set():
            await asyncio.sleep(rnd.uniform(*every))
            if done.is_set():
                break
            os.kill(procs[-1].pid, signal.SIGKILL)
            await asyncio.to_thread(procs[-1].wait, 10)
            killed += 1
            procs.append(start_serve(args, log=workdir / "serve.log"))
            await asyncio.to_thread(wait_port, port, 20)

    t0 = time.monotonic()
    k = asyncio.ensure_future(killer())
    # paced so that the kills land in the middle of the load
    tally = await postfix_like(
        port,
        msgs,
        senders=senders,
        retry=0.5,
        deadline=600,
        rate=messages / max(1.0, kills * every[1]),
    )
    done.set()
    await k
    # held mail leaves after hold_for (and after a killed worker's lease runs out)
    want = set(tally.accepted)
    end = time.monotonic() + drain
    while time.monotonic() < end:  # the scheduler of another process: poll the sink
        if want <= set(sink.ids):
            break
        await asyncio.sleep(0.5)
    took = time.monotonic() - t0
    procs[-1].send_signal(signal.SIGTERM)
    await asyncio.to_thread(procs[-1].wait, 30)
    await sink.stop()
    ids = collections.Counter(i for i in sink.ids if i in msgs)
    return Result(
        sent=messages,
        accepted=len(tally.accepted),
        delivered=len(ids),
        lost=len(want - set(ids)),
        duplicates=sum(n - 1 for n in ids.values()),
        refused_5xx=len(tally.refused),
        kills=killed,
        held_accepted=len(want & held_ids),
        attempts=tally.attempts,
        seconds=took,
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=2000)
    ap.add_argument("--senders", type=int, default=20)
    ap.add_argument("--kills", type=int, default=10)
    ap.add_argument("--pass-only", action="store_true", help="no held mail (pass path only)")
    ap.add_argument("--seed", type=int)
    ap.add_argument("--keep", metavar="DIR", help="work in DIR and keep it (logs, store)")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="mg-kill-") as d:
        work = Path(a.keep or d)
        work.mkdir(parents=True, exist_ok=True)
        r = asyncio.run(
            run(
                messages=a.messages,
                senders=a.senders,
                kills=a.kills,
                pass_only=a.pass_only,
                workdir=work,
                seed=a.seed,
            )
        )
    print(r.line())
    return 0 if r.lost == 0 and r.refused_5xx == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
