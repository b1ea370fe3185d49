"""GuardSMTP's on_client hook, on a real listening socket: told accepted/refused once per client."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import aiosmtplib
import pytest
from conftest import port_of
from prometheus_client.parser import text_string_to_metric_families

from mailguard.envelope import Envelope, Reply
from mailguard.metrics import Metrics
from mailguard.smtp import FrontHandler, GuardSMTP, Incoming, Networks


async def accept_all(env: Envelope, msg: Incoming) -> Reply:
    return Reply(250, "2.0.0 Ok")


async def front(nets: list[str], on_client: Callable[[bool], None] | None) -> asyncio.Server:
    handler = FrontHandler(accept_all)
    networks = Networks(nets)
    loop = asyncio.get_running_loop()
    return await loop.create_server(
        lambda: GuardSMTP(handler, networks=networks, hostname="guard.test", on_client=on_client),
        "127.0.0.1",
        0,
    )


async def greeting(port: int) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        line = await asyncio.wait_for(reader.readline(), 5)
        if line.startswith(b"554"):
            assert await asyncio.wait_for(reader.read(), 5) == b""  # closed by the guard
        return line
    finally:
        writer.close()


@pytest.mark.asyncio
async def test_on_client_accepted_once_per_connection() -> None:
    seen: list[bool] = []
    server = await front(["127.0.0.0/8"], seen.append)
    port = port_of(server)
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port)
    async with client:  # one connection, two transactions: still one client
        for _ in range(2):
            await client.sendmail(
                "a@example.co.jp", ["b@partner.co.jp"], b"Subject: x\r\n\r\nx\r\n"
            )
    assert (await greeting(port)).startswith(b"220")
    assert seen == [True, True]
    server.close()


@pytest.mark.asyncio
async def test_on_client_refused_by_allowed_networks() -> None:
    seen: list[bool] = []
    server = await front(["192.0.2.0/24"], seen.append)
    port = port_of(server)
    assert (await greeting(port)).startswith(b"554 5.7.1")
    assert (await greeting(port)).startswith(b"554 5.7.1")
    await asyncio.sleep(0.05)
    assert seen == [False, False]
    server.close()


@pytest.mark.asyncio
async def test_on_client_feeds_the_real_metrics_and_survives_a_broken_hook() -> None:
    mx = Metrics()
    ok = await front(["127.0.0.0/8"], mx.smtp_connection)
    refused = await front(["192.0.2.0/24"], mx.smtp_connection)
    await greeting(port_of(ok))
    await greeting(port_of(refused))
    await asyncio.sleep(0.05)
    body, _ = mx.render()
    got = {
        s.labels["result"]: s.value
        for f in text_string_to_metric_families(body.decode())
        for s in f.samples
        if s.name == "mailguard_smtp_connections_total"
    }
    assert got == {"accepted": 1, "refused": 1}

    def broken(accepted: bool) -> Any:
        raise RuntimeError("metrics down")

    bad = await front(["127.0.0.0/8"], broken)
    assert (await greeting(port_of(bad))).startswith(b"220")  # served all the same
    for s in (ok, refused, bad):
        s.close()


@pytest.mark.asyncio
async def test_no_hook_is_fine() -> None:
    server = await front(["127.0.0.0/8"], None)
    assert (await greeting(port_of(server))).startswith(b"220")
    server.close()
