"""Relay stage: hand a message to the upstream MTA over pooled aiosmtplib connections.

The upstream's answer goes back unchanged in class: 2xx accepted, 5xx refused, anything else
(connection refused, timeout, 4xx, a dropped connection) becomes a 4xx so the client retries.

Recipients are all-or-nothing within one transaction, because once our client got 250 for its
RCPTs we can no longer refuse one recipient alone:

* every RCPT accepted upstream → DATA is sent, the upstream's final reply is ours;
* any RCPT refused with 4xx → nothing is sent (RSET) and we answer 451: the client retries the
  whole message later and nobody receives it twice;
* some RCPTs refused with 5xx, none with 4xx → nothing is sent and we answer the 5xx, naming the
  refused recipients, so the sender's bounce says exactly who was refused (no recipient vanishes);
* all refused → the first refusal's code and text.

International addresses (RFC 6531): an envelope with a non-ASCII address (`山田@example.co.jp`)
goes out with SMTPUTF8 whether or not the caller asked for it (the guard's own notices to such
a sender do not), when the upstream offers it; when it does not, the answer is
`550 5.6.7` before anything is sent — permanent, so neither Postfix nor the notice scheduler
retries for days something no retry can fix. An address with a control character (CR/LF would
inject a command into the upstream session) is refused with `553 5.1.3`. `send` never raises
for either.

aiosmtplib's `sendmail` re-normalises line endings and dot-stuffs with regexes over the whole
message (≈ 30 ms per MiB, twice for SIZE); we already hold the dot-stuffed wire form the client
sent, so DATA writes those bytes as they are, or stuffs a changed message in one pass.

Two optional hooks report on the connections, for the metrics (no metrics import here):

* `on_connect_error()`: once per failed connection to the upstream — the attempt failed
  (refused, no route, connect or greeting/EHLO timeout, dropped before EHLO was answered), or an
  established connection failed under a transaction or probe (dropped, timed out). A pooled
  connection found stale and retried on a fresh one is not counted: nothing failed for the client.
* `on_open(delta)`: +1 when a connection is opened (after EHLO), -1 when it is closed, exactly
  once per connection, so a gauge can follow `open_connections`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import mmap
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import aiosmtplib
from aiosmtplib.errors import SMTPServerDisconnected
from aiosmtplib.protocol import COMMAND_INJECTION_REGEX, SMTPProtocol
from aiosmtplib.response import SMTPResponse

from mailguard.envelope import Envelope, Reply
from mailguard.logfmt import safe_id

log = logging.getLogger("mailguard.relay")

ConnectErrorHook = Callable[[], None]
OpenHook = Callable[[int], None]

_CHUNK = 1 << 20
UPSTREAM_DOWN = "4.4.1 MailGuard: upstream MTA unavailable, try again later"
NO_SMTPUTF8 = Reply(
    550,
    "5.6.7 MailGuard: the envelope has a non-ASCII address and the upstream MTA does not "
    "offer SMTPUTF8 (RFC 6531)",
)
BAD_ADDRESS = Reply(553, "5.1.3 MailGuard: control character in an envelope address")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def needs_smtputf8(env: Envelope) -> bool:
    """True when an envelope address is not ASCII (RFC 6531: only SMTPUTF8 carries it)."""
    return not env.mail_from.isascii() or not all(r.isascii() for r in env.rcpt_tos)


def dot_stuff(content: bytes | mmap.mmap, *, chunk: int = _CHUNK) -> Iterator[bytes]:
    """Yield `content` in SMTP DATA form: CRLF line ends, leading dots doubled (RFC 5321 4.5.2).

    Works on bytes or an mmap without copying the whole message: chunks end after a LF, so every
    chunk starts at a line start. Bare CR/LF are turned into CRLF as every MTA expects.
    """
    mv = memoryview(content)
    n = len(mv)
    pos = 0
    last = b"\r\n"
    while pos < n:
        end = min(pos + chunk, n)
        if end < n:
            nl = content.find(b"\n", end - 1)  # cut after a LF: every piece starts a line
            end = n if nl < 0 else nl + 1
        piece = bytes(mv[pos:end])
        crlf = piece.count(b"\r\n")
        if piece.count(b"\n") != crlf or piece.count(b"\r") != crlf:
            piece = piece.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
        if piece.startswith(b"."):
            piece = b"." + piece
        last = piece
        yield piece.replace(b"\r\n.", b"\r\n..")
        pos = end
    if not last.endswith(b"\r\n"):
        yield b"\r\n"  # the caller appends ".\r\n", which must start a line


@dataclass(slots=True)
class _Conn:
    smtp: aiosmtplib.SMTP
    created: float
    last_used: float
    uses: int = 0
    xforward: bool = False
    smtputf8: bool = False
    eightbit: bool = False
    size: bool = False
    pipelining: bool = False
    closed: bool = False


class SmtpTransport:
    """aiosmtplib client with a small pool of upstream connections.

    aiosmtplib has no pool. Idle connections are kept for `idle_timeout` seconds and renewed after
    `max_uses` messages; a pooled connection the upstream closed meanwhile is noticed before use
    (is_connected) or at the first command, and the message is retried once on a fresh connection
    (safe: nothing was sent yet).
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        connect_timeout: float = 10.0,
        command_timeout: float = 60.0,
        data_timeout: float = 300.0,
        pool_size: int = 64,
        idle_timeout: float = 30.0,
        max_uses: int = 1000,
        local_hostname: str | None = None,
        on_connect_error: ConnectErrorHook | None = None,
        on_open: OpenHook | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.connect_timeout = connect_timeout
        self.command_timeout = command_timeout
        self.data_timeout = data_timeout
        self.pool_size = pool_size
        self.idle_timeout = idle_timeout
        self.max_uses = max_uses
        self.local_hostname = local_hostname or "mailguard.localdomain"
        self._idle: list[_Conn] = []
        self._closed = False
        self.on_connect_error = on_connect_error
        self.on_open = on_open
        self.open_connections = 0

    # -- pool -----------------------------------------------------------------------------
    async def _connect(self) -> _Conn:
        smtp = aiosmtplib.SMTP(
            hostname=self.host,
            port=self.port,
            # no per-call wait_for (a task and a timer per command in 3.11): _transaction puts
            # one asyncio.timeout around each phase instead
            timeout=None,
            local_hostname=self.local_hostname,
            start_tls=False,
            use_tls=False,
        )
        try:
            await smtp.connect(timeout=self.connect_timeout)
            async with asyncio.timeout(self.command_timeout):
                await smtp.ehlo()
        except (OSError, aiosmtplib.SMTPException, TimeoutError):
            smtp.close()
            self._connect_failed()
            raise
        except BaseException:
            smtp.close()
            raise
        now = time.monotonic()
        self.open_connections += 1
        self._opened(1)
        return _Conn(
            smtp,
            now,
            now,
            xforward=smtp.supports_extension("xforward"),
            smtputf8=smtp.supports_extension("smtputf8"),
            eightbit=smtp.supports_extension("8bitmime"),
            size=smtp.supports_extension("size"),
            pipelining=smtp.supports_extension("pipelining"),
        )

    def _discard(self, conn: _Conn) -> None:
        conn.smtp.close()
        if conn.closed:
            return
        conn.closed = True
        self.open_connections -= 1
        self._opened(-1)

    # -- hooks (a failing hook is logged, never allowed to fail a delivery) -------------------
    def _connect_failed(self) -> None:
        if self.on_connect_error is not None:
            try:
                self.on_connect_error()
            except Exception:
                log.exception("relay: on_connect_error hook failed")

    def _opened(self, delta: int) -> None:
        if self.on_open is not None:
            try:
                self.on_open(delta)
            except Exception:
                log.exception("relay: on_open hook failed")

    async def _acquire(self) -> tuple[_Conn, bool]:
        """A connection and whether it came from the pool (and so may be stale)."""
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()
            if conn.smtp.is_connected and now - conn.last_used < self.idle_timeout:
                return conn, True
            self._discard(conn)
        return await self._connect(), False

    def _release(self, conn: _Conn) -> None:
        conn.uses += 1
        conn.last_used = time.monotonic()
        if (
            self._closed
            or not conn.smtp.is_connected
            or conn.uses >= self.max_uses
            or len(self._idle) >= self.pool_size
        ):
            self._discard(conn)
        else:
            self._idle.append(conn)

    async def close(self) -> None:
        """Close idle connections (QUIT, bounded); in-flight ones close when released."""
        self._closed = True
        idle, self._idle = self._idle, []

        async def quit(conn: _Conn) -> None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2):  # a silent upstream must not delay shutdown
                    await conn.smtp.quit()

        await asyncio.gather(*(quit(c) for c in idle))
        for conn in idle:
            self._discard(conn)

    async def probe(self) -> bool:
        """True if the upstream answers a connection with a greeting (for /healthz)."""
        try:
            conn, _ = await self._acquire()
        except (OSError, aiosmtplib.SMTPException, TimeoutError):
            return False
        try:
            async with asyncio.timeout(self.command_timeout):
                await conn.smtp.noop()
        except (OSError, aiosmtplib.SMTPException, TimeoutError):
            self._discard(conn)
            self._connect_failed()
            return False
        self._release(conn)
        return True

    # -- sending --------------------------------------------------------------------------
    async def send(
        self, env: Envelope, raw: bytes | mmap.mmap, *, wire: bytes | None = None
    ) -> Reply:
        """Deliver `raw` to every envelope recipient or to none; see the module docstring.

        `wire` is the same message already in DATA form (dot-stuffed, CRLF), as received:
        when given it is written as is.
        """
        for attempt in (1, 2):
            try:
                conn, pooled = await self._acquire()
            except (OSError, aiosmtplib.SMTPException, TimeoutError) as e:
                self._conn_error(env, e, counted=True)  # _connect told on_connect_error
                return Reply(451, UPSTREAM_DOWN)
            try:
                reply = await self._transaction(conn, env, raw, wire)
            except _Stale as e:
                self._discard(conn)
                if pooled and attempt == 1:
                    continue  # nothing was sent on the stale connection: retry on a fresh one
                self._conn_error(env, e.__cause__ or e)
                return Reply(451, UPSTREAM_DOWN)
            except (OSError, aiosmtplib.SMTPException, TimeoutError) as e:
                self._discard(conn)
                self._conn_error(env, e)
                return Reply(451, UPSTREAM_DOWN)
            except BaseException:
                self._discard(conn)
                raise
            self._release(conn)
            return reply
        raise AssertionError("unreachable")

    def _conn_error(self, env: Envelope, e: BaseException, *, counted: bool = False) -> None:
        log.warning(
            "%s: upstream %s:%s: %s: %s",
            safe_id(env.queue_id),
            self.host,
            self.port,
            type(e).__name__,
            e or "no answer",
        )
        if not counted:
            self._connect_failed()

    async def _transaction(
        self, conn: _Conn, env: Envelope, raw: bytes | mmap.mmap, wire: bytes | None
    ) -> Reply:
        """Envelope commands under command_timeout, then the data under data_timeout."""
        try:
            async with asyncio.timeout(self.command_timeout):
                reply = await self._envelope(conn, env, raw, wire)
            if reply is not None:
                return reply
            async with asyncio.timeout(self.data_timeout):
                return await self._data(conn, raw, wire)
        except TimeoutError:
            conn.smtp.close()  # mid-command: the session is out of step, never reuse it
            raise

    async def _envelope(
        self, conn: _Conn, env: Envelope, raw: bytes | mmap.mmap, wire: bytes | None
    ) -> Reply | None:
        """MAIL, RCPT…, DATA; a Reply when the transaction ends here, None to send the data."""
        smtp = conn.smtp
        if _CONTROL.search(env.mail_from) or any(_CONTROL.search(r) for r in env.rcpt_tos):
            log.warning(
                "%s: control character in an envelope address: refused", safe_id(env.queue_id)
            )
            return BAD_ADDRESS
        utf8 = needs_smtputf8(env)
        if utf8 and not conn.smtputf8:
            log.warning(
                "%s: non-ASCII envelope address, upstream %s:%s has no SMTPUTF8: refused",
                safe_id(env.queue_id),
                self.host,
                self.port,
            )
            return NO_SMTPUTF8
        opts: list[str] = []
        if conn.size:
            opts.append(f"SIZE={len(wire) if wire is not None else len(raw)}")
        for o in env.mail_options:
            up = o.upper()
            if (up == "BODY=8BITMIME" and conn.eightbit) or (up == "SMTPUTF8" and conn.smtputf8):
                opts.append(up)
        if utf8 and "SMTPUTF8" not in opts:
            opts.append("SMTPUTF8")
        encoding = "utf-8" if "SMTPUTF8" in opts else "ascii"
        xforward: list[bytes] = []
        if conn.xforward and env.xforward:
            xforward = [
                f"{k}={v}".encode("utf-8", "surrogateescape") for k, v in env.xforward.items()
            ]
        mail = [b"FROM:" + _path(env.mail_from, encoding), *(o.encode() for o in opts)]
        rcpts = [b"TO:" + _path(rcpt, encoding) for rcpt in env.rcpt_tos]
        if conn.pipelining:
            return await self._envelope_pipelined(conn, env, xforward, mail, rcpts)
        try:
            if xforward:
                r = await smtp.execute_command(b"XFORWARD", *xforward)
                self._xforward_reply(env, r)
            # straight commands: the envelope was parsed by our front already, and aiosmtplib's
            # mail()/rcpt() re-parse each address with the email package (≈ 80 µs each)
            r = await smtp.execute_command(b"MAIL", *mail)
        except (SMTPServerDisconnected, ConnectionError) as e:
            raise _Stale() from e
        if r.code != 250:
            await self._rset(smtp)
            return Reply(r.code if r.code >= 500 else 451, r.message)

        refused: list[tuple[str, int, str]] = []
        for rcpt, arg in zip(env.rcpt_tos, rcpts, strict=True):
            r = await smtp.execute_command(b"RCPT", arg)
            if r.code not in (250, 251):
                refused.append((rcpt, r.code, r.message))
        if refused:
            await self._rset(smtp)
            return _refusal_reply(refused, len(env.rcpt_tos))

        r = await smtp.execute_command(b"DATA")
        if r.code != 354:
            await self._rset(smtp)
            return Reply(r.code if r.code >= 500 else 451, r.message)
        return None

    async def _envelope_pipelined(
        self,
        conn: _Conn,
        env: Envelope,
        xforward: list[bytes],
        mail: list[bytes],
        rcpts: list[bytes],
    ) -> Reply | None:
        """The same commands and decisions as the one-at-a-time path, written in one group
        (RFC 2920: XFORWARD, MAIL, RCPT…, DATA last) when the upstream offers PIPELINING: one
        write and one round trip instead of 3 + recipients. The replies are then read in order.

        Nothing of the message is sent before every reply is in: if MAIL or a RCPT was refused
        but DATA still got 354, the connection is closed (an unfinished DATA is never delivered)
        instead of RSET."""
        smtp = conn.smtp
        proto = smtp.protocol
        if proto is None:
            raise _Stale()
        cmds = [b"MAIL " + b" ".join(mail), *(b"RCPT " + r for r in rcpts), b"DATA"]
        if xforward:
            cmds.insert(0, b"XFORWARD " + b" ".join(xforward))
        for c in cmds:  # as aiosmtplib's execute_command refuses them
            if COMMAND_INJECTION_REGEX.search(c):
                raise ValueError("Command arg contains a prohibited control character")
        try:
            proto._response_pending = True  # arm the reply reader as execute_command does
            proto.write(b"\r\n".join(cmds) + b"\r\n")
            first = await proto.read_response()
        except (SMTPServerDisconnected, ConnectionError) as e:
            raise _Stale() from e
        replies = [first]
        while len(replies) < len(cmds):
            replies.append(await _next_reply(proto))
        if xforward:
            self._xforward_reply(env, replies.pop(0))
        r_mail, r_data, r_rcpts = replies[0], replies[-1], replies[1:-1]
        end: Reply | None = None
        if r_mail.code != 250:
            end = Reply(r_mail.code if r_mail.code >= 500 else 451, r_mail.message)
        else:
            refused = [
                (rcpt, r.code, r.message)
                for rcpt, r in zip(env.rcpt_tos, r_rcpts, strict=True)
                if r.code not in (250, 251)
            ]
            if refused:
                end = _refusal_reply(refused, len(env.rcpt_tos))
            elif r_data.code != 354:
                end = Reply(r_data.code if r_data.code >= 500 else 451, r_data.message)
        if end is None:
            return None
        if r_data.code == 354:
            smtp.close()  # inside DATA with nothing to send: only a closed connection aborts it
        else:
            await self._rset(smtp)
        return end

    def _xforward_reply(self, env: Envelope, r: SMTPResponse) -> None:
        if r.code != 250:
            log.info(
                "%s: upstream refused XFORWARD: %s %s", safe_id(env.queue_id), r.code, r.message
            )

    async def _data(self, conn: _Conn, raw: bytes | mmap.mmap, wire: bytes | None) -> Reply:
        proto = conn.smtp.protocol
        assert proto is not None
        # Written straight to the protocol: see the module docstring for why not smtp.data().
        proto._response_pending = True  # arm the reply reader as execute_command does
        if wire is not None:
            if len(wire) < 65536:
                proto.write(wire + b".\r\n")  # one syscall; copying 64 KiB is cheaper
            else:
                proto.write(wire)
                proto.write(b".\r\n")
        else:
            for piece in dot_stuff(raw):
                proto.write(piece)
                await proto._drain_helper()
            proto.write(b".\r\n")
        final = await proto.read_response()
        if final.code == 250:
            return Reply(250, final.message)
        return Reply(final.code if final.code >= 500 else 451, final.message)

    async def _rset(self, smtp: aiosmtplib.SMTP) -> None:
        with contextlib.suppress(Exception):
            await smtp.rset()


async def _next_reply(proto: SMTPProtocol) -> SMTPResponse:
    """The next reply of a pipelined group: one the last read left in the buffer (several
    replies can arrive in one segment; aiosmtplib parses only the first), else the next one
    to arrive."""
    buffered = proto._read_response_from_buffer()
    if buffered is not None:
        return buffered
    return await proto.read_response()


def _path(addr: str, encoding: str) -> bytes:
    """An SMTP reverse/forward path: <addr>; the null sender stays <>."""
    a = addr.strip()
    if a in ("", "<>"):
        return b"<>"
    if not (a.startswith("<") and a.endswith(">")):
        a = f"<{a}>"
    return a.encode(encoding, "surrogateescape")


class _Stale(Exception):
    """A pooled connection turned out dead before anything was sent."""


def _refusal_reply(refused: list[tuple[str, int, str]], total: int) -> Reply:
    if any(code < 500 for _, code, _ in refused):
        who = ", ".join(r for r, c, _ in refused if c < 500)
        return Reply(451, f"4.5.0 MailGuard: upstream deferred recipient(s) {who}; retry later")
    if len(refused) == total:
        _, code, text = refused[0]
        return Reply(code, text)
    detail = "; ".join(f"<{r}>: {c} {t}" for r, c, t in refused)
    code = refused[0][1]
    return Reply(
        code,
        f"5.1.1 MailGuard: upstream refused {len(refused)} of {total} recipients, "
        f"message not sent to anyone: {detail}",
    )


__all__ = ["ConnectErrorHook", "OpenHook", "SmtpTransport", "dot_stuff", "needs_smtputf8"]
