"""A zero-cost milter for bench/postfix.sh's `ml0` path: MailGuard's milter front
(mailguard/milter.py: the milter protocol, the message rebuilt from Postfix's header and body
packets) answering CONTINUE to every message without running the pipeline. It is the ceiling of
the milter path, as `bq0` is the before-queue proxy's. A measurement tool, nothing else.

    python bench/null_milter.py --listen 127.0.0.1:10036
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib

from mailguard.config import parse_hostport
from mailguard.envelope import Envelope, Reply
from mailguard.milter import MilterFront, MilterRelay
from mailguard.pipeline import Content
from mailguard.smtp import Networks

LOOPBACK = ("127.0.0.0/8", "::1/128")  # the bench's Postfix only


class _Nowhere:
    async def send(self, env: Envelope, raw: Content, *, wire: bytes | None = None) -> Reply:
        raise AssertionError("the null milter relays nothing itself")


async def main(listen: str) -> None:
    relay = MilterRelay(_Nowhere())

    async def handle(env: Envelope, content: Content, wire: bytes | None) -> Reply:
        return await relay.send(env, content)  # the original bytes: Postfix continues

    front = MilterFront(handle, *parse_hostport(listen), Networks(LOOPBACK))
    await front.listen()
    await asyncio.Event().wait()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--listen", default="127.0.0.1:10036")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main(ap.parse_args().listen))
