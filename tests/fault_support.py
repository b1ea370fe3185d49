"""Fault-test support: the hostile message set, CPython's email corpus, a hand-driven SMTP client.

Shared by tests/test_hostile_*.py, tests/test_fault_*.py, tests/test_security_*.py and the bench
scripts (bench/killtest.py, bench/outage.py import `smtp_send`-like code of their own so they run
without pytest).
"""

from __future__ import annotations

import asyncio
import base64
import io
import os
import re
import sysconfig
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
VENDORED_CORPUS = HERE / "data" / "cpython_email"


def cpython_email_corpus() -> list[Path]:
    """CPython's Lib/test/test_email/data files: the interpreter's copy, else a vendored one."""
    stdlib = Path(sysconfig.get_paths()["stdlib"]) / "test" / "test_email" / "data"
    for d in (stdlib, VENDORED_CORPUS):
        if d.is_dir():
            files = sorted(
                p
                for p in d.iterdir()
                if p.is_file() and not p.name.startswith(".") and p.name != "README.md"
            )
            if files:
                return files
    return []


# -- the generated hostile set ----------------------------------------------------------------

HDR = b"From: a@example.co.jp\r\nTo: b@partner.co.jp\r\nMessage-ID: <h@example.co.jp>\r\n"


def _mp(boundary: bytes, parts: Iterator[bytes] | list[bytes], *, ctype: bytes = b"mixed") -> bytes:
    out = [b"Content-Type: multipart/" + ctype + b'; boundary="' + boundary + b'"\r\n\r\n']
    for p in parts:
        out += [b"--" + boundary + b"\r\n", p, b"\r\n"]
    out.append(b"--" + boundary + b"--\r\n")
    return b"".join(out)


def _attachment(name: bytes, data: bytes, ctype: bytes = b"application/octet-stream") -> bytes:
    b64 = base64.encodebytes(data).replace(b"\n", b"\r\n")
    return (
        b"Content-Type: " + ctype + b'; name="' + name + b'"\r\n'
        b'Content-Disposition: attachment; filename="' + name + b'"\r\n'
        b"Content-Transfer-Encoding: base64\r\n\r\n" + b64
    )


def _zip(entries: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in entries.items():
            z.writestr(name, data)
    return buf.getvalue()


def zip_bomb_flat() -> bytes:
    """64 MiB of zeros in one entry: ~64 KiB compressed."""
    return _zip({"zeros.bin": bytes(64 << 20)})


def zip_bomb_nested(levels: int = 6, fan: int = 4) -> bytes:
    """42.zip-like: each level holds `fan` copies of the level below (4**6 * 1 MiB = 4 GiB)."""
    inner = _zip({"zeros.bin": bytes(1 << 20)})
    for lvl in range(levels):
        inner = _zip({f"l{lvl}_{i}.zip": inner for i in range(fan)})
    return inner


def zip_overlap_quine() -> bytes:
    """A zip whose central directory points every entry at the same local header (overlap bomb)."""
    one = _zip({"a.txt": b"A" * 1000})
    cd_at = one.rfind(b"PK\x01\x02")
    eocd_at = one.rfind(b"PK\x05\x06")
    cd = one[cd_at:eocd_at]
    n = 500
    eocd = bytearray(one[eocd_at:])
    eocd[8:10] = n.to_bytes(2, "little")
    eocd[10:12] = n.to_bytes(2, "little")
    eocd[12:16] = (len(cd) * n).to_bytes(4, "little")
    return one[:cd_at] + cd * n + bytes(eocd)


def deep_multipart(depth: int) -> bytes:
    body = b"Content-Type: text/plain\r\n\r\nleaf\r\n"
    for i in range(depth):
        body = _mp(b"b%d" % i, [body])
    return body


def deep_rfc822(depth: int) -> bytes:
    body = b"Subject: leaf\r\n\r\nleaf\r\n"
    for _ in range(depth):
        body = b"Content-Type: message/rfc822\r\n\r\nSubject: wrap\r\n" + body
    return body


def hostile_messages() -> dict[str, bytes]:
    """name → full message bytes (CRLF unless the case is about line endings)."""
    text = b"Content-Type: text/plain; charset=utf-8\r\n\r\nhello\r\n"
    m: dict[str, bytes] = {}
    m["zip-bomb-flat"] = (
        HDR
        + b"Subject: z\r\n"
        + _mp(b"zb", [text, _attachment(b"bomb.zip", zip_bomb_flat(), b"application/zip")])
    )
    m["zip-bomb-nested"] = (
        HDR
        + b"Subject: z\r\n"
        + _mp(b"zb", [text, _attachment(b"42.zip", zip_bomb_nested(), b"application/zip")])
    )
    m["zip-overlap"] = (
        HDR
        + b"Subject: z\r\n"
        + _mp(b"zb", [text, _attachment(b"overlap.zip", zip_overlap_quine(), b"application/zip")])
    )
    m["multipart-1000-deep"] = HDR + b"Subject: deep\r\n" + deep_multipart(1000)
    m["rfc822-1000-deep"] = HDR + b"Subject: deep\r\n" + deep_rfc822(1000)
    m["multipart-unterminated-1000-deep"] = HDR + b"".join(
        b'Content-Type: multipart/mixed; boundary="u%d"\r\n\r\n--u%d\r\n' % (i, i)
        for i in range(1000)
    )
    m["attachments-10000"] = (
        HDR
        + b"Subject: many\r\n"
        + _mp(b"many", [text] + [_attachment(b"f%05d.txt" % i, b"x") for i in range(10_000)])
    )
    # huge headers: one folded 1 MiB header, 1 000 and 20 000 header lines
    m["header-1mib-folded"] = (
        HDR + b"Subject: " + b"\r\n ".join([b"w" * 70] * 15_000) + b"\r\n\r\nbody\r\n"
    )
    m["header-1000-lines"] = (
        HDR + b"".join(b"X-H%04d: v\r\n" % i for i in range(1000)) + b"\r\nbody\r\n"
    )
    m["header-20000-lines"] = (
        HDR + b"".join(b"X-H%05d: v\r\n" % i for i in range(20_000)) + b"\r\nbody\r\n"
    )
    m["to-5000-addresses"] = (
        b"From: a@example.co.jp\r\nTo: "
        + b",\r\n ".join(b"u%d@d%d.example.com" % (i, i % 700) for i in range(5000))
        + b"\r\nSubject: many\r\n\r\nbody\r\n"
    )
    m["header-no-colon-garbage"] = b"\x00\xff\xfe garbage\r\n:::\r\n: empty name\r\n\r\nbody\r\n"
    m["only-headers-no-body"] = HDR + b"Subject: x\r\n"
    m["empty"] = b""
    # broken transfer encodings
    m["base64-broken"] = (
        HDR
        + b"Subject: b64\r\n"
        + _mp(
            b"bb",
            [
                text,
                b'Content-Type: application/pdf; name="a.pdf"\r\nContent-Disposition: attachment; '
                b'filename="a.pdf"\r\nContent-Transfer-Encoding: base64\r\n\r\n'
                b"JVBERi0x!!!*&^%$\r\n====\r\nQUJD=RUY=\r\n" + b"A" * 77 + b"\r\n",
            ],
        )
    )
    m["base64-truncated-zip"] = (
        HDR
        + b"Subject: b64\r\n"
        + _mp(b"bb", [text, _attachment(b"t.zip", _zip({"a.txt": b"a" * 5000}))[:-200]])
    )
    m["qp-broken"] = (
        HDR + b"Subject: qp\r\nContent-Type: text/plain; charset=utf-8\r\n"
        b"Content-Transfer-Encoding: quoted-printable\r\n\r\n=ZZ=\r\n=E3=81=\r\n=\r\n=3\r\n"
    )
    m["cte-unknown"] = HDR + b"Content-Transfer-Encoding: x-rot13\r\n\r\nuryyb\r\n"
    # wrong / unknown charsets
    m["charset-lies-iso2022jp-is-utf8"] = (
        HDR
        + "Subject: 見積\r\n".encode()
        + b"Content-Type: text/plain; charset=iso-2022-jp\r\n\r\n"
        + "本文\r\n".encode()
    )
    m["charset-unknown"] = (
        HDR + b"Subject: =?x-unknown-42?B?5pys5paH?=\r\n"
        b"Content-Type: text/plain; charset=x-unknown-42\r\n\r\n\xff\xfe\r\n"
    )
    m["charset-sjis-raw-8bit-headers"] = (
        b"From: \x83e\x83X\x83g <a@example.co.jp>\r\nTo: \x88\xb6\x90\xe6 <b@partner.co.jp>\r\n"
        b"Subject: \x8c\xa9\x90\xcf\r\n\r\n\x96{\x95\xb6\r\n"
    )
    # invalid RFC 2047
    m["rfc2047-invalid"] = (
        b"From: =?utf-8?B?!!!?= <a@example.co.jp>\r\n"
        b"To: =?utf-8?Q?unterminated <b@partner.co.jp>\r\n"
        b"Cc: =?iso-2022-jp?B?GyRCJCIbKEI?==?bogus?X?abc?= <c@third.example>\r\n"
        b"Subject: "
        + b"\r\n ".join([b"=?utf-8?B?" + b"4" * 61 + b"?="] * 80)
        + b" =?=?=?==??==\r\n"
        b"Content-Type: application/octet-stream; name*=utf-8''%ZZ%E3%81; "
        b"name*0*=x''a; name*1=b\r\n"
        b'Content-Disposition: attachment; filename="=?utf-8?B?5pys?==?utf-8?Q?=E3?="\r\n'
        b"\r\nbody\r\n"
    )
    m["idn-garbage-addresses"] = (
        b"From: a@example.co.jp\r\nTo: b@xn--zz-zzz.jp, c@\xe4\xbe\x8b\xe3\x81\x88..jp, "
        b'@@@, <>, "unterminated <d@e\r\nSubject: x\r\n\r\nbody\r\n'
    )
    # NULs and line endings
    m["nul-bytes"] = HDR + b"Subject: n\x00ul\r\n\r\nbody\x00with\x00nuls\r\n\x00\r\n"
    m["bare-lf"] = HDR.replace(b"\r\n", b"\n") + b"Subject: lf\n\nbody\nlines\n"
    m["bare-cr"] = HDR + b"Subject: cr\r\n\r\nbody\rwith\rbare\rcr\r\n"
    m["crlf-mix"] = HDR + b"Subject: mix\n\r\nbody\r\r\n\n\r.\r\n\n.\n\r\n"
    m["boundary-in-body-100000"] = (
        HDR
        + b"Subject: b\r\n"
        + _mp(b"q", [b"Content-Type: text/plain\r\n\r\n" + b"--q-not\r\n" * 100_000])
    )
    m["mime-boundary-empty"] = (
        HDR + b'Content-Type: multipart/mixed; boundary=""\r\n\r\n--\r\nx\r\n----\r\n'
    )
    m["long-line-no-breaks"] = HDR + b"Subject: l\r\n\r\n" + b"x" * 200_000 + b"\r\n"
    m["dots-everywhere"] = HDR + b"Subject: .\r\n\r\n.\r\n..\r\n...\r\n. \r\n.x\r\n"
    return m


# -- a hand-driven SMTP client (asyncio) ------------------------------------------------------


@dataclass
class Session:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    async def reply(self, within: float = 20.0) -> bytes:
        """One complete (possibly multi-line) reply."""
        out = b""
        while True:
            ln = await asyncio.wait_for(self.reader.readline(), within)
            if not ln:
                return out
            out += ln
            if ln[3:4] != b"-":
                return out

    async def cmd(self, line: bytes, within: float = 20.0) -> bytes:
        self.writer.write(line)
        await self.writer.drain()
        return await self.reply(within)

    def close(self) -> None:
        self.writer.close()


async def connect(port: int, *, local_addr: tuple[str, int] | None = None) -> tuple[Session, bytes]:
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, local_addr=local_addr, limit=1 << 20
    )
    s = Session(reader, writer)
    return s, await s.reply()


def stuff(raw: bytes) -> bytes:
    """DATA wire form of `raw`: CRLF-terminated, leading dots doubled, then CRLF.CRLF."""
    if raw and not raw.endswith(b"\r\n"):
        raw += b"\r\n"
    wire = raw.replace(b"\r\n.", b"\r\n..")
    if wire.startswith(b"."):
        wire = b"." + wire
    return wire + b".\r\n"


async def send_raw(
    port: int,
    raw: bytes,
    *,
    sender: bytes = b"a@example.co.jp",
    rcpts: tuple[bytes, ...] = (b"b@partner.co.jp",),
    within: float = 30.0,
    wire: bytes | None = None,
) -> bytes:
    """One transaction; returns the reply to the final dot (or to whatever step failed)."""
    s, greet = await connect(port)
    try:
        if not greet.startswith(b"220"):
            return greet
        for line in (b"EHLO c.test\r\n", b"MAIL FROM:<" + sender + b">\r\n"):
            r = await s.cmd(line, within)
            if not r.startswith(b"250"):
                return r
        for rc in rcpts:
            r = await s.cmd(b"RCPT TO:<" + rc + b">\r\n", within)
            if not r.startswith(b"250"):
                return r
        r = await s.cmd(b"DATA\r\n", within)
        if not r.startswith(b"354"):
            return r
        s.writer.write(stuff(raw) if wire is None else wire)
        await s.writer.drain()
        final = await s.reply(within)
        await s.cmd(b"QUIT\r\n", within)
        return final
    finally:
        s.close()


def rss_kib(pid: int | None = None) -> int:
    """Resident set size (VmRSS) of a process, in KiB (Linux /proc)."""
    with open(f"/proc/{pid or os.getpid()}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


class LoopThread:
    """An asyncio loop in a daemon thread, for synchronous tests (hypothesis) that need a real
    server running for many examples."""

    def __init__(self) -> None:
        import threading

        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Any, within: float = 30.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(within)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def normalised(raw: bytes) -> bytes:
    """What the upstream must get for DATA content `raw` sent with `stuff`: a CRLF added to end
    the last line, then every line end made CRLF, as every MTA expects."""
    if raw and not raw.endswith(b"\r\n"):
        raw += b"\r\n"
    return raw.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")


# -- `mailguard serve` as a real process ---------------------------------------------------------


def serve_config(
    path: Path,
    *,
    listen: int,
    upstream: int,
    store: Path,
    policy: Path | None = None,
    smtp: str = "",
    extra: str = "",
) -> Path:
    """Write a service config for a test or bench run (web off unless `extra` turns it on)."""
    text = (
        f'[smtp]\nlisten = "127.0.0.1:{listen}"\nhostname = "guard.test"\n{smtp}\n'
        f'[upstream]\naddress = "127.0.0.1:{upstream}"\nconnect_timeout = "2s"\n'
        f'command_timeout = "5s"\ndata_timeout = "10s"\n'
        f'[store]\npath = "{store}"\n'
        + (f'[policy]\nfile = "{policy}"\n' if policy else "")
        + (extra or "[web]\nenabled = false\n")
    )
    path.write_text(text)
    return path


# -- a sink that can go down for real, and a sender that behaves like Postfix -------------------

_MSGID = re.compile(rb"^Message-ID:\s*<([^>]+)>", re.MULTILINE | re.IGNORECASE)


def message_id(raw: bytes) -> str:
    m = _MSGID.search(raw)
    return m.group(1).decode() if m else ""


class StoppableSink:
    """An upstream MTA that can be stopped (listener and every open connection cut, as when
    Postfix dies) and started again on the same port. Runs in the caller's loop."""

    def __init__(self, port: int = 0) -> None:
        from conftest import Sink

        self.sink = Sink()
        self.port = port
        self.server: asyncio.AbstractServer | None = None
        self.conns: set[Any] = set()

    @property
    def ids(self) -> list[str]:
        return [message_id(g[2]) for g in self.sink.got]

    async def start(self) -> None:
        from aiosmtpd.smtp import SMTP

        owner = self

        class Tracked(SMTP):
            def connection_made(self, transport: Any) -> None:
                owner.conns.add(transport)
                super().connection_made(transport)

            def connection_lost(self, exc: Exception | None) -> None:
                owner.conns.discard(self.transport)
                super().connection_lost(exc)

        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(
            lambda: Tracked(self.sink, hostname="sink.test", enable_SMTPUTF8=True),
            "127.0.0.1",
            self.port,
            reuse_address=True,
        )
        self.port = int(self.server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None
        for t in list(self.conns):
            t.abort()
        self.conns.clear()
        await asyncio.sleep(0)


@dataclass
class Tally:
    """What the clients saw; `accepted` are the ids that got a 250."""

    sent: int = 0
    accepted: set[str] = field(default_factory=set)
    refused: dict[str, str] = field(default_factory=dict)  # 5xx: the client bounces these
    attempts: int = 0
    codes: list[tuple[float, int]] = field(default_factory=list)  # (monotonic time, code)
    unsettled: set[str] = field(default_factory=set)


async def postfix_like(
    port: int,
    messages: dict[str, tuple[str, list[str], bytes]],
    *,
    senders: int = 20,
    retry: float = 0.5,
    deadline: float = 120.0,
    port_of: Any = None,
    rate: float = 0.0,
) -> Tally:
    """Send every message with `senders` concurrent clients; 4xx or a dropped connection means
    "try again later" (after `retry` s), as Postfix does; 5xx is final. `port_of()` (optional)
    gives the current port (a restarted guard may move). `rate` > 0 paces the submissions
    (messages per second), so the load spans a fault instead of finishing before it."""
    import aiosmtplib

    tally = Tally(sent=len(messages), unsettled=set(messages))
    queue: asyncio.Queue[str] = asyncio.Queue()
    loop = asyncio.get_running_loop()
    for n, mid in enumerate(messages):
        if rate > 0:
            loop.call_later(n / rate, queue.put_nowait, mid)
        else:
            queue.put_nowait(mid)
    end = loop.time() + deadline

    async def worker() -> None:
        while tally.unsettled and loop.time() < end:
            try:
                mid = await asyncio.wait_for(queue.get(), 0.2)
            except TimeoutError:
                continue
            sender, rcpts, raw = messages[mid]
            tally.attempts += 1
            code = 0
            try:
                await aiosmtplib.send(
                    raw,
                    sender=sender,
                    recipients=rcpts,
                    hostname="127.0.0.1",
                    port=port_of() if port_of else port,
                    timeout=20,
                )
                code = 250
            except aiosmtplib.SMTPResponseException as e:
                code = e.code
            except aiosmtplib.SMTPRecipientsRefused as e:
                code = e.recipients[0].code
            except (OSError, aiosmtplib.SMTPException, TimeoutError):
                code = 0  # connection refused / dropped: the guard is down
            tally.codes.append((loop.time(), code))
            if code == 250:
                tally.accepted.add(mid)
                tally.unsettled.discard(mid)
            elif code >= 500:
                tally.refused[mid] = str(code)
                tally.unsettled.discard(mid)
            else:
                loop.call_later(retry, queue.put_nowait, mid)

    await asyncio.gather(*(worker() for _ in range(senders)))
    return tally


def bench_message(i: int, *, rcpt: str, tag: str = "b") -> tuple[str, list[str], bytes]:
    mid = f"{tag}{i:06d}@bench.test"
    raw = (
        f"From: a@example.co.jp\r\nTo: {rcpt}\r\nSubject: fault test {i}\r\n"
        f"Message-ID: <{mid}>\r\nDate: Mon, 1 Jan 2024 00:00:00 +0900\r\n\r\n"
    ).encode() + b"line of body text\r\n" * (1 + i % 40)
    return "a@example.co.jp", [rcpt], raw
