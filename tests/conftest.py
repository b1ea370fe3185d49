"""Shared test fixtures: a real SMTP sink on loopback (stands in for Postfix's :10026) and a real
MailGuard server between the test's SMTP client and that sink."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from aiosmtpd.smtp import SMTP

from mailguard.app import Service
from mailguard.checks.context import Org
from mailguard.config import Config, SmtpConfig, StoreConfig, UpstreamConfig, WebConfig
from mailguard.policy import Policy

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Sink:
    """Records what it receives; `reply`/`rcpt_reply` script its answers."""

    got: list[tuple[str, list[str], bytes]] = field(default_factory=list)
    reply: str = "250 2.0.0 Ok: queued as UP1"
    rcpt_reply: dict[str, str] = field(default_factory=dict)
    xforward: list[dict[str, str]] = field(default_factory=list)
    delay: float = 0.0

    async def handle_RCPT(self, server, session, envelope, address, options) -> str:  # type: ignore[no-untyped-def]
        if address in self.rcpt_reply:
            return self.rcpt_reply[address]
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope) -> str:  # type: ignore[no-untyped-def]
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.reply.startswith("250"):
            self.got.append(
                (envelope.mail_from, list(envelope.rcpt_tos), envelope.original_content)
            )
        return self.reply


async def serve_sink(
    sink: Sink, *, port: int = 0, xforward: bool = False, idle: float = 300
) -> asyncio.Server:
    loop = asyncio.get_running_loop()

    def factory() -> SMTP:
        if xforward:  # our own front as the sink: it speaks XFORWARD like Postfix's :10026
            from mailguard.envelope import Reply
            from mailguard.smtp import FrontHandler, GuardSMTP, Networks

            async def record(env: Any, msg: Any) -> Reply:
                if sink.reply.startswith("250"):
                    sink.got.append((env.mail_from, env.rcpt_tos, bytes(msg.content)))
                    sink.xforward.append(dict(env.xforward))
                return Reply(int(sink.reply[:3]), sink.reply[4:])

            return GuardSMTP(
                FrontHandler(record), networks=Networks(["127.0.0.0/8"]), hostname="sink.test"
            )
        return SMTP(sink, hostname="sink.test", enable_SMTPUTF8=True, timeout=idle)

    return await loop.create_server(factory, "127.0.0.1", port)


def port_of(server: asyncio.Server) -> int:
    return int(server.sockets[0].getsockname()[1])


@pytest_asyncio.fixture
async def sink() -> AsyncIterator[tuple[Sink, int]]:
    s = Sink()
    server = await serve_sink(s)
    yield s, port_of(server)
    server.close()


# A real policy with no rules: every check runs, nothing acts, every message is relayed.
PASS_ALL = Policy(org=Org(internal=("example.co.jp",)), rules=(), source="<tests: pass all>")


def guard_config(up_port: int, **smtp: Any) -> Config:
    import atexit
    import tempfile

    tmp = tempfile.mkdtemp(prefix="mg-test-")
    atexit.register(shutil.rmtree, tmp, True)
    store = Path(tmp) / "mailguard.db"
    return Config(
        smtp=replace(SmtpConfig(listen=("127.0.0.1", 0), hostname="guard.test"), **smtp),
        upstream=UpstreamConfig(
            address=("127.0.0.1", up_port), connect_timeout=2, command_timeout=3, data_timeout=5
        ),
        store=StoreConfig(path=store),
        web=WebConfig(enabled=False),
    )


@pytest_asyncio.fixture
async def guard_factory() -> AsyncIterator[Callable[..., Any]]:
    """Start the real service (front, pipeline, relay, queue) with `policy` on 127.0.0.1:0;
    stopped at the end of the test."""
    started: list[Service] = []

    async def start(cfg: Config, policy: Policy = PASS_ALL) -> Service:
        server = Service(cfg, policy=policy)
        await server.start()
        started.append(server)
        return server

    yield start
    for s in started:
        await s.stop(grace=1)


# -- helpers for tests that run `mailguard serve` as a real process ------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ThreadSink:
    """A sink in its own thread + loop, for tests that drive a subprocess synchronously."""

    def __init__(self, port: int = 0, **kw: Any) -> None:
        self.sink = Sink(**kw)
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._port = port
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        if not self._ready.wait(5):
            raise RuntimeError("sink did not start")

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)

        async def main() -> None:
            self.server = await serve_sink(self.sink, port=self._port)
            self.port = port_of(self.server)
            self._ready.set()

        self.loop.run_until_complete(main())
        self.loop.run_forever()

    def stop(self) -> None:
        async def close() -> None:
            self.server.close()

        asyncio.run_coroutine_threadsafe(close(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture
def thread_sink() -> Iterator[ThreadSink]:
    s = ThreadSink()
    yield s
    s.stop()


def mailguard_cmd() -> list[str]:
    exe = shutil.which("mailguard", path=os.path.dirname(sys.executable))
    return [exe] if exe else [sys.executable, "-m", "mailguard"]


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {port}")


def start_serve(args: list[str], *, cwd: Path | None = None, log: Path) -> subprocess.Popen[bytes]:
    fh = open(log, "ab")  # noqa: SIM115 - the child keeps it
    return subprocess.Popen(
        [*mailguard_cmd(), "serve", *args], stdout=fh, stderr=subprocess.STDOUT, cwd=cwd or ROOT
    )


def missing_tool(what: str) -> None:
    """Skip for a missing external tool, unless CI said every tool must be there."""
    if os.environ.get("MAILGUARD_REQUIRE_TOOLS"):
        pytest.fail(f"{what} is required (MAILGUARD_REQUIRE_TOOLS is set)")
    pytest.skip(what)
