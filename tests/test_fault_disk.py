"""Disk full / store unwritable: the guard answers 451, never 250, and recovers when space returns.

How the disk is "filled": RLIMIT_FSIZE = 0 on the running `mailguard serve` process (Linux
prlimit(2)). Every write that would grow a file fails with EFBIG (Python ignores SIGXFSZ), which is
what the code sees on a full disk (ENOSPC): the spool file of a large message and the SQLite
commit of a held message both fail. Raising the limit again is "space returns". Chosen because it
needs no root, no tmpfs and no loop device; a read-only directory would not do, as the tests
may run as root, which ignores permission bits.
"""

from __future__ import annotations

import asyncio
import resource
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import ThreadSink, free_port, start_serve, wait_port
from fault_support import message_id, send_raw, serve_config

pytestmark = pytest.mark.skipif(
    not hasattr(resource, "prlimit") or sys.platform != "linux", reason="needs Linux prlimit"
)

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
class Rig:
    port: int
    pid: int
    sink: ThreadSink
    work: Path


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    sink = ThreadSink()
    port = free_port()
    (tmp_path / "policy.toml").write_text(POLICY)
    (tmp_path / "spool").mkdir()
    cfg = serve_config(
        tmp_path / "mg.toml",
        listen=port,
        upstream=sink.port,
        store=tmp_path / "mg.db",
        policy=tmp_path / "policy.toml",
        smtp=f'spool_threshold = "64KiB"\nspool_dir = "{tmp_path / "spool"}"\n',
    )
    proc = start_serve(["-c", str(cfg), "--grace", "2"], log=tmp_path / "serve.log")
    try:
        wait_port(port, 20)
        yield Rig(port, proc.pid, sink, tmp_path)
    finally:
        proc.terminate()
        proc.wait(20)
        sink.stop()


def big(tag: str) -> bytes:
    head = f"From: a@example.co.jp\r\nTo: b@example.co.jp\r\nMessage-ID: <{tag}@t>\r\n\r\n"
    return head.encode() + b"spooled body line of text\r\n" * 40_000  # ~1 MiB > 64 KiB


def held(tag: str) -> bytes:
    head = f"From: a@example.co.jp\r\nTo: x@partner.co.jp\r\nMessage-ID: <{tag}@t>\r\n"
    return head.encode() + b"\r\nh\r\n"


def ids(rig: Rig) -> list[str]:
    return [message_id(g[2]) for g in rig.sink.sink.got]


async def until(cond: object, within: float) -> bool:
    end = time.monotonic() + within
    while time.monotonic() < end:
        if cond():  # type: ignore[operator]
            return True
        await asyncio.sleep(0.2)
    return False


@pytest.mark.asyncio
async def test_full_disk_answers_451_then_recovers(rig: Rig) -> None:
    hold_to = (b"x@partner.co.jp",)
    # healthy: both paths answer 250 (the held one leaves after 1 s)
    assert (await send_raw(rig.port, big("ok-big"), rcpts=(b"b@example.co.jp",)))[:3] == b"250"
    assert (await send_raw(rig.port, held("ok-held"), rcpts=hold_to))[:3] == b"250"
    assert await until(lambda: {"ok-big@t", "ok-held@t"} <= set(ids(rig)), 20)

    soft, hard = resource.prlimit(rig.pid, resource.RLIMIT_FSIZE)
    resource.prlimit(rig.pid, resource.RLIMIT_FSIZE, (0, hard))  # the disk is full
    try:
        for i in range(3):
            r1 = await send_raw(rig.port, big(f"full-big{i}"), rcpts=(b"b@example.co.jp",))
            r2 = await send_raw(rig.port, held(f"full-held{i}"), rcpts=hold_to)
            assert r1.startswith(b"451"), r1
            assert r2.startswith(b"451"), r2
        # a small pass message needs no disk: still relayed in-transaction
        small = b"From: a@example.co.jp\r\nMessage-ID: <full-small@t>\r\n\r\nsmall\r\n"
        assert (await send_raw(rig.port, small, rcpts=(b"b@example.co.jp",)))[:3] == b"250"
    finally:
        resource.prlimit(rig.pid, resource.RLIMIT_FSIZE, (soft, hard))  # space returns
    await asyncio.sleep(2)
    assert not any(i.startswith("full-big") or i.startswith("full-held") for i in ids(rig))

    # recovered: the client's retries now get 250 and the mail arrives
    for i in range(3):
        r1 = await send_raw(rig.port, big(f"full-big{i}"), rcpts=(b"b@example.co.jp",))
        r2 = await send_raw(rig.port, held(f"full-held{i}"), rcpts=hold_to)
        assert r1.startswith(b"250"), r1
        assert r2.startswith(b"250"), r2
    want = {f"full-big{i}@t" for i in range(3)} | {f"full-held{i}@t" for i in range(3)}
    assert await until(lambda: want <= set(ids(rig)), 30), want - set(ids(rig))
    assert not list((rig.work / "spool").iterdir())  # no spool file left behind
    # (the log file could not grow either while the "disk" was full: no assertion on it)
