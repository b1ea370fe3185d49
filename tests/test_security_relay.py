"""Security pass, SMTP side: no open relay (at connect and at MAIL), loopback by default, the SMTP
smuggling patterns do not end DATA, dependency floors above known CVEs, no secrets in logs."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import re
import tomllib
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
from conftest import PASS_ALL, ROOT, Sink, guard_config, port_of, serve_sink
from fault_support import connect

from mailguard.app import Service
from mailguard.config import Config

OUTSIDE = ("127.0.0.2", 0)  # a source address outside allowed_networks = 127.0.0.1/32


@pytest.mark.asyncio
async def test_not_allowed_network_is_refused_at_connect(sink: Any, guard_factory: Any) -> None:
    up, up_port = sink
    guard = await guard_factory(guard_config(up_port, allowed_networks=("127.0.0.1/32",)))
    sess, greet = await connect(guard.port, local_addr=OUTSIDE)
    assert greet.startswith(b"554 5.7.1"), greet
    assert await asyncio.wait_for(sess.reader.read(), 5) == b""  # and hung up
    # the allowed address is served
    await aiosmtplib.send(
        b"Subject: x\r\n\r\nx\r\n", sender="a@x.jp", recipients=["b@y.jp"], port=guard.port
    )
    assert len(up.got) == 1


@pytest.mark.asyncio
async def test_pipelined_commands_from_outside_never_relay(sink: Any, guard_factory: Any) -> None:
    """A client that does not wait for the greeting and pipelines a whole transaction."""
    up, up_port = sink
    guard = await guard_factory(guard_config(up_port, allowed_networks=("127.0.0.1/32",)))
    reader, writer = await asyncio.open_connection("127.0.0.1", guard.port, local_addr=OUTSIDE)
    writer.write(
        b"EHLO evil\r\nMAIL FROM:<a@x.jp>\r\nRCPT TO:<victim@y.jp>\r\nDATA\r\n"
        b"Subject: relay me\r\n\r\nspam\r\n.\r\nQUIT\r\n"
    )
    await writer.drain()
    got = b""
    # closed with our commands unread: the kernel may answer RST, also fine
    with contextlib.suppress(ConnectionResetError):
        got = await asyncio.wait_for(reader.read(), 5)
    assert b"250" not in got and b"354" not in got, got
    await asyncio.sleep(0.2)
    assert up.got == []
    writer.close()


@pytest.mark.asyncio
async def test_networks_checked_again_at_mail_after_reload(sink: Any) -> None:
    """A connection opened while 127.0.0.2 was allowed is refused at MAIL once a reload has
    removed that network (the per-message check)."""
    up, up_port = sink
    wide = guard_config(up_port, allowed_networks=("127.0.0.0/8",))
    narrow = replace(wide, smtp=replace(wide.smtp, allowed_networks=("127.0.0.1/32",)))
    server = Service(wide, lambda: narrow, policy=PASS_ALL)
    await server.start()
    try:
        sess, greet = await connect(server.port, local_addr=OUTSIDE)
        assert greet.startswith(b"220")
        assert (await sess.cmd(b"EHLO c\r\n")).startswith(b"250")
        assert await server.reload()
        r = await sess.cmd(b"MAIL FROM:<a@x.jp>\r\n")
        assert r.startswith(b"554 5.7.1"), r
        sess.close()
    finally:
        await server.stop(grace=1)
    assert up.got == []


def test_defaults_bind_loopback_only() -> None:
    cfg = Config()
    assert cfg.smtp.listen[0] == "127.0.0.1"
    assert cfg.web.listen[0] == "127.0.0.1"
    assert set(cfg.smtp.allowed_networks) == {"127.0.0.0/8", "::1/128"}
    assert cfg.web.admin_token == ""  # admin API off until a token is configured


# -- SMTP smuggling (CVE-2023-51764 family; aiosmtpd CVE-2024-27305) ----------------------------

SMUGGLE = [b"\n.\r\n", b"\r\n.\n", b"\n.\n", b"\r.\r\n", b"\r\n.\r", b"\r\n\x00.\r\n"]


@pytest.mark.asyncio
@pytest.mark.parametrize("end", SMUGGLE, ids=[repr(e) for e in SMUGGLE])
async def test_smuggling_pattern_does_not_end_data(end: bytes, guard_factory: Any) -> None:
    up = Sink()
    upstream = await serve_sink(up)
    guard = await guard_factory(guard_config(port_of(upstream)))
    sess, _ = await connect(guard.port)
    for c in (b"EHLO c\r\n", b"MAIL FROM:<a@x.jp>\r\n", b"RCPT TO:<b@y.jp>\r\n", b"DATA\r\n"):
        await sess.cmd(c)
    sess.writer.write(
        b"Subject: first\r\n\r\nbody" + end + b"MAIL FROM:<admin@x.jp>\r\n"
        b"RCPT TO:<victim@z.jp>\r\nDATA\r\nSubject: smuggled\r\n\r\nevil\r\n.\r\n"
    )
    final = await sess.reply()
    assert final.startswith(b"250"), final
    # one message reached the upstream, with the would-be second one inside its body
    assert len(up.got) == 1
    assert up.got[0][1] == ["b@y.jp"]
    assert b"Subject: smuggled" in up.got[0][2]
    assert (await sess.cmd(b"QUIT\r\n")).startswith(b"221")
    upstream.close()


def _floor(spec: str) -> tuple[int, ...]:
    m = re.search(r">=\s*([\d.]+)", spec)
    assert m, spec
    return tuple(int(x) for x in m[1].split("."))


def _version(name: str) -> tuple[int, ...]:
    v = importlib.metadata.version(name)
    return tuple(int(x) for x in re.findall(r"\d+", v)[:3])


# package -> first release with the fix: (CVE)
CVE_FLOORS = {
    "aiosmtpd": ((1, 4, 5), "CVE-2024-27305 SMTP smuggling"),
    "aiohttp": ((3, 10, 11), "CVE-2024-52304 request smuggling"),
    "jinja2": ((3, 1, 6), "CVE-2025-27516 sandbox escape"),
    "dnspython": ((2, 6, 1), "CVE-2023-29483 TuDoor"),
    "idna": ((3, 7), "CVE-2024-3651 quadratic encode"),
}


def test_dependency_floors_above_known_cves() -> None:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    by_name = {re.split(r"[<>=!~ \[]", d, maxsplit=1)[0].lower(): d for d in deps}
    for name, (fixed, why) in CVE_FLOORS.items():
        assert name in by_name, f"{name} missing from dependencies"
        assert _floor(by_name[name]) >= fixed, f"{by_name[name]}: below the fix for {why}"
        assert _version(name) >= fixed, f"installed {name} is below the fix for {why}"


def _text(raw: bytes) -> str:
    """The decoded text parts of a notice (links may sit in base64 or QP)."""
    import email
    import email.policy

    msg = email.message_from_bytes(raw, policy=email.policy.default)
    out = []
    for part in msg.walk():
        if part.get_content_maintype() == "text":
            with contextlib.suppress(LookupError, ValueError):
                out.append(part.get_content())
    return "\n".join(out)


def test_serve_log_has_no_secrets(tmp_path: Path) -> None:
    """A full run with web, admin token, secret and a confirm policy: neither the configured
    secrets nor the confirm tokens mailed to the sender appear in the log."""
    import subprocess
    import urllib.request

    from conftest import ThreadSink, free_port, start_serve, wait_port
    from fault_support import serve_config

    admin, secret = "ADMIN-tok-3f9a1c7e5b2d4680-0123456789", "SECRET-key-8e7d6c5b4a392817"
    sink = ThreadSink()
    port, web_port = free_port(), free_port()
    (tmp_path / "p.toml").write_text(
        '[organization]\ninternal_domains = ["example.co.jp"]\n'
        '[[rule]]\nname = "ask"\nwhen = "recipient.external"\naction = "confirm"\n'
    )
    cfg = serve_config(
        tmp_path / "mg.toml",
        listen=port,
        upstream=sink.port,
        store=tmp_path / "mg.db",
        policy=tmp_path / "p.toml",
        extra=f'[web]\nlisten = "127.0.0.1:{web_port}"\nadmin_token = "{admin}"\n'
        f'secret = "{secret}"\npublic_url = "http://127.0.0.1:{web_port}"\n'
        '[log]\nlevel = "debug"\n',
    )
    proc = start_serve(["-c", str(cfg), "--grace", "2"], log=tmp_path / "serve.log")
    try:
        wait_port(port, 20)
        wait_port(web_port, 20)

        async def send() -> None:
            await aiosmtplib.send(
                b"From: a@example.co.jp\r\nTo: x@partner.co.jp\r\nSubject: s\r\n\r\nx\r\n",
                sender="a@example.co.jp",
                recipients=["x@partner.co.jp"],
                port=port,
            )

        asyncio.run(send())
        links: list[str] = []
        for _ in range(100):
            links = [
                m
                for g in sink.sink.got
                for m in re.findall(r"http://127\.0\.0\.1:\d+/m/([A-Za-z0-9_-]{16,})", _text(g[2]))
            ]
            if links:
                break
            asyncio.run(asyncio.sleep(0.1))
        assert links, "no confirm link was mailed"
        # a scanner-like GET of the link, and the admin API with the token
        urllib.request.urlopen(f"http://127.0.0.1:{web_port}/m/{links[0]}", timeout=5).read()
        req = urllib.request.Request(
            f"http://127.0.0.1:{web_port}/api/messages",
            headers={"Authorization": f"Bearer {admin}"},
        )
        urllib.request.urlopen(req, timeout=5).read()
        metrics = ""
        with contextlib.suppress(OSError):  # /metrics is optional here
            metrics = (
                urllib.request.urlopen(f"http://127.0.0.1:{web_port}/metrics", timeout=5)
                .read()
                .decode()
            )
    finally:
        proc.terminate()
        proc.wait(20)
        sink.stop()
    log = (tmp_path / "serve.log").read_text(errors="replace")
    assert "decision=" in log  # the run really logged messages
    for s in (admin, secret, *links):
        assert s not in log, f"secret {s[:6]}… in the log"
        assert s not in metrics
    assert (
        subprocess.run(
            ["grep", "-c", "Traceback", tmp_path / "serve.log"], capture_output=True
        ).stdout.strip()
        == b"0"
    )
