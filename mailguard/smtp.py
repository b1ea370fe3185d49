"""SMTP front: the aiosmtpd server Postfix hands mail to; fast DATA reader, 451 on trouble.

What it adds to aiosmtpd's SMTP class:

* client networks: only configured networks may talk to us (no open relay), checked at connect
  and again at MAIL;
* XFORWARD (Postfix XFORWARD_README): NAME ADDR PROTO HELO IDENT SOURCE PORT are recorded, so log
  lines carry Postfix's queue id, and passed on to an upstream that announces XFORWARD; values are
  xtext (printable ASCII): a control or non-ASCII character is refused with 501 at parse, so it
  never reaches a log line or the upstream;
* idle sessions: more than `max_idle_commands` commands other than MAIL/RCPT/DATA/QUIT (NOOP,
  RSET, HELO/EHLO, VRFY, HELP, XFORWARD, a refused MAIL, …) since the last DATA answer
  `421 4.7.0` and close (Postfix's smtpd_junk_command_limit idea); a connection opened over the
  server's `max_connections` is answered `421 4.7.0` and closed at once (`busy`, set by the
  server);
* a chunked DATA reader: aiosmtpd reads DATA line by line (≈ 4 s CPU for 1 MiB in a profile);
  this one reads up to 1 MiB at a time, finds CRLF.CRLF with bytes.find (also split across reads
  and at the very start), un-stuffs dots with one replace, keeps the wire form for the relay,
  enforces the size limit (552 after draining) and the 1000-octet line rule (500), and spools a
  large message to a temp file instead of RAM;
* any exception in a hook answers 451 (aiosmtpd's default 500 would make Postfix bounce);
* `on_client(accepted)` (optional, for the metrics): told once per client connection whether
  it was served (True) or refused because its address is not in the allowed networks (False).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import mmap
import os
import re
import tempfile
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from aiosmtpd.smtp import SMTP, Session, _AuthMechAttr, syntax
from aiosmtpd.smtp import Envelope as AioEnvelope

from mailguard.envelope import TEMPFAIL, Envelope, Reply

log = logging.getLogger("mailguard.smtp")

XFORWARD_ATTRS = ("NAME", "ADDR", "PROTO", "HELO", "IDENT", "SOURCE", "PORT")
# xtext (RFC 3461 4): printable ASCII without SP; the attributes are separated by spaces
_XFORWARD_BAD = re.compile(r"[^\x20-\x7e]")
# commands that move mail; everything else counts towards max_idle_commands
_MAIL_COMMANDS = frozenset({"MAIL", "RCPT", "DATA", "QUIT"})
TOO_MANY_CONNECTIONS = "421 4.7.0 MailGuard: too many connections, try again later"
TOO_MANY_COMMANDS = "421 4.7.0 MailGuard: too many commands without mail, closing connection"
_READ = 1 << 20
# 998 octets + a transparent dot + CR, between two LFs (RFC 5321 4.5.3.1.6, as aiosmtpd counts)
_MAX_LINE = 1000


@dataclass(slots=True)
class Incoming:
    """One received message: content (dots un-stuffed) and, when unchanged, its wire form."""

    content: bytes | mmap.mmap
    wire: bytes | None = None  # DATA form as received (stuffed, CRLF only), None if spooled/bare LF
    spool_path: str | None = None
    _file: Any = field(default=None, repr=False)

    @property
    def size(self) -> int:
        return len(self.content)

    def close(self) -> None:
        if isinstance(self.content, mmap.mmap):
            self.content.close()
        if self._file is not None:
            self._file.close()
            self._file = None
        if self.spool_path:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.spool_path)
            self.spool_path = None


MessageHandler = Callable[[Envelope, Incoming], Awaitable[Reply]]
ClientHook = Callable[[bool], None]


class Networks:
    """Allowed client networks; '*' entries are not supported on purpose (no open relay)."""

    def __init__(self, nets: Iterable[str]) -> None:
        self.update(nets)

    def update(self, nets: Iterable[str]) -> None:
        """Replace the list in place: open connections see a reload at their next MAIL."""
        self.nets = tuple(ipaddress.ip_network(n, strict=False) for n in nets)

    def allows(self, peer: Any) -> bool:
        if not isinstance(peer, tuple) or not peer:
            return False  # unix socket or unknown: never
        try:
            ip = ipaddress.ip_address(str(peer[0]).split("%")[0])
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
            ip = ip.ipv4_mapped
        return any(ip in n for n in self.nets)


# Per-connection state that must not be copied from the template instance.
_FRESH: dict[str, Any] = {
    "session": None,
    "envelope": None,
    "transport": None,
    "_handler_coroutine": None,
    "_timeout_handle": None,
    "_deadline": 0.0,
    "_timer_armed": False,
    "_tls_protocol": None,
    "_original_transport": None,
    "_tls_handshake_okay": True,
}
_TEMPLATES: dict[Any, dict[str, Any]] = {}
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_PLAIN_PATH = re.compile(rf"<((?:{_ATOM}(?:\.{_ATOM})*@{_LABEL}(?:\.{_LABEL})*)?)>\s*(.*)\Z")


class GuardSMTP(SMTP):
    """aiosmtpd SMTP with XFORWARD, network checks and a chunked DATA reader."""

    def __init__(
        self,
        handler: Any,
        *,
        networks: Networks,
        spool_threshold: int = 8 << 20,
        spool_dir: str | None = None,
        xforward: bool = True,
        min_data_rate: int = 500,
        on_client: ClientHook | None = None,
        max_idle_commands: int = 0,
        **kw: Any,
    ) -> None:
        kw.setdefault("enable_SMTPUTF8", True)
        kw.setdefault("decode_data", False)
        self._fast_init(handler, kw)
        self.networks = networks
        self.spool_threshold = spool_threshold
        self.spool_dir = spool_dir or None
        self.xforward_enabled = xforward
        self.min_data_rate = min_data_rate
        self._xforward: dict[str, str] = {}
        self._pushes = 0
        # accepted (True) or refused by allowed_networks (False), once per client. Per instance
        # (the server's protocol factory passes it): a function set on the class would be bound.
        self.on_client = on_client
        self.max_idle_commands = max_idle_commands  # 0 = no limit
        self._idle_commands = 0
        self.busy = False  # set by the server before the greeting: over max_connections
        self._deadline = 0.0  # the idle timeout's deadline (loop time), see _reset_timeout
        self._timer_armed = False
        if max_idle_commands:
            for name, method in list(self._smtp_methods.items()):
                if name not in _MAIL_COMMANDS:
                    self._smtp_methods[name] = self._counted(method)

    def _counted(
        self, method: Callable[[str | None], Awaitable[None]]
    ) -> Callable[[str | None], Awaitable[None]]:
        async def counted(arg: str | None) -> None:
            if await self._idle_over():
                return
            await method(arg)

        return counted

    async def _idle_over(self) -> bool:
        """Count one command that moves no mail; over the limit: 421 and close (True)."""
        self._idle_commands += 1
        if not self.max_idle_commands or self._idle_commands <= self.max_idle_commands:
            return False
        assert self.session is not None
        log.warning(
            "%r: %d commands without mail: closing", self.session.peer, self._idle_commands - 1
        )
        with contextlib.suppress(Exception):
            await self.push(TOO_MANY_COMMANDS)
        if self.transport is not None:
            self.transport.close()
        return True

    def _fast_init(self, handler: Any, kw: dict[str, Any]) -> None:
        """aiosmtpd's __init__ costs ≈ 1.3 ms (inspect.getmembers over self and the handler, on
        every connection). The first connection of a (class, handler, options) runs it for real;
        later ones copy its result and re-bind the per-connection parts."""
        key = (type(self), id(handler), tuple(sorted(kw.items(), key=lambda kv: kv[0])))
        tpl = _TEMPLATES.get(key)
        if tpl is None:
            super().__init__(handler, **kw)
            bare = asyncio.StreamReaderProtocol(
                asyncio.StreamReader(loop=self.loop), lambda r, w: None, loop=self.loop
            )
            _TEMPLATES[key] = {k: v for k, v in vars(self).items() if k not in vars(bare)}
            return
        loop = tpl["loop"]
        asyncio.StreamReaderProtocol.__init__(
            self,
            asyncio.StreamReader(loop=loop, limit=self.line_length_limit),
            client_connected_cb=self._cb_client_connected,
            loop=loop,
        )
        vars(self).update(tpl)
        vars(self).update(_FRESH)
        self._smtp_methods = {k: getattr(self, "smtp_" + k) for k in tpl["_smtp_methods"]}
        self._auth_methods = {
            k: _AuthMechAttr(getattr(self, v.method.__name__), True) if v.is_builtin else v
            for k, v in tpl["_auth_methods"].items()
        }

    # -- connection -----------------------------------------------------------------------
    on_connection: Callable[[GuardSMTP, bool], None] | None = None  # the server's tracker

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        first = self.transport is None
        super().connection_made(transport)
        if first and self.on_connection is not None:
            self.on_connection(self, True)

    def connection_lost(self, error: Exception | None) -> None:
        super().connection_lost(error)
        if self.on_connection is not None:
            self.on_connection(self, False)

    # -- idle timeout: one timer per connection, its deadline moved per command ----------------
    def _reset_timeout(self, duration: float | None = None) -> None:
        """aiosmtpd cancels its timer and schedules a new one on every command (a TimerHandle,
        a heap push and a cancelled heap entry each time). Here the deadline moves and the one
        timer, when it fires before the deadline, re-arms itself for the rest; a shorter
        deadline (DATA's min_data_rate) re-arms it at once. Same deadline, same callback."""
        loop = self.loop
        deadline = loop.time() + (duration or self._timeout_duration)
        self._deadline = deadline
        h = self._timeout_handle
        if self._timer_armed and h is not None and h.when() <= deadline:
            return  # fires first, then waits for the rest
        if h is not None:
            h.cancel()
        self._timeout_handle = loop.call_at(deadline, self._timer_fired)
        self._timer_armed = True

    def _timer_fired(self) -> None:
        if self.loop.time() < self._deadline:
            self._timeout_handle = self.loop.call_at(self._deadline, self._timer_fired)
            return
        self._timer_armed = False
        self._timeout_cb()  # type: ignore[no-untyped-call]  # aiosmtpd: no annotation

    def _tell_client(self, accepted: bool) -> None:
        if self.on_client is None:
            return
        try:
            self.on_client(accepted)
        except Exception:  # a broken metrics hook must not cost a connection
            log.exception("smtp: on_client hook failed")

    async def _handle_client(self) -> None:
        assert self.session is not None
        if self.busy:  # over the server's max_connections: before any other work
            with contextlib.suppress(Exception):
                await self.push(TOO_MANY_CONNECTIONS)
            assert self.transport is not None
            self.transport.close()
            return
        allowed = self.networks.allows(self.session.peer)
        self._tell_client(allowed)
        if not allowed:
            log.warning("refused connection from %s: not in allowed networks", self.session.peer)
            with contextlib.suppress(Exception):
                await self.push("554 5.7.1 MailGuard: your address is not allowed to relay")
            assert self.transport is not None
            self.transport.close()
            return
        await super()._handle_client()

    def _set_post_data_state(self) -> None:
        super()._set_post_data_state()  # type: ignore[no-untyped-call]  # aiosmtpd: no annotation
        self._xforward = {}  # XFORWARD applies to one transaction (XFORWARD_README)

    async def push(self, status: Any) -> None:
        await super().push(status)
        # A client pipelining thousands of commands is served from the read buffer without the
        # event loop ever running anyone else: let other sessions in every few replies.
        self._pushes += 1
        if self._pushes % 32 == 0:
            await asyncio.sleep(0)

    # -- XFORWARD (announced in EHLO by FrontHandler.handle_EHLO) ---------------------------
    @syntax("XFORWARD attribute=value ...")
    async def smtp_XFORWARD(self, arg: str | None) -> None:
        assert self.session is not None
        if not self.xforward_enabled:
            await self.push('500 Error: command "XFORWARD" not recognized')
            return
        if not self.session.extended_smtp:
            await self.push("503 5.5.1 Error: send EHLO first")
            return
        if self.envelope is not None and self.envelope.mail_from:
            await self.push("503 5.5.1 Error: XFORWARD not allowed inside a mail transaction")
            return
        if not arg:
            await self.push("501 5.5.4 Syntax: XFORWARD attribute=value ...")
            return
        bad = _XFORWARD_BAD.search(arg)
        if bad is not None:
            # xtext only: a control character (ESC, NUL, CR…) or raw 8-bit would reach the
            # logs and the upstream as it came
            await self.push(
                f"501 5.5.4 Bad XFORWARD value: character U+{ord(bad.group()):04X} not allowed"
            )
            return
        attrs: dict[str, str] = {}
        for item in arg.split(" "):
            if not item:
                continue
            name, eq, value = item.partition("=")
            name = name.upper()
            if not eq or name not in XFORWARD_ATTRS:
                await self.push(f"501 5.5.4 Bad XFORWARD attribute: {name[:32]}")
                return
            attrs[name] = value[:255]
        self._xforward.update(attrs)
        await self.push("250 2.0.0 Ok")

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        # aiosmtpd builds a Protocol class and runs the email header parser on every MAIL and
        # RCPT (≈ 0.3 ms each); plain <local@domain> forms take a regex, the rest the original.
        m = _PLAIN_PATH.match(arg)
        if m is not None and not self.local_part_limit:
            return m.group(1) or "<>", m.group(2)
        return super()._getaddr(arg)

    # -- MAIL: per-message network check --------------------------------------------------
    async def smtp_MAIL(self, arg: str | None) -> None:
        assert self.session is not None
        if not self.networks.allows(self.session.peer):
            await self.push("554 5.7.1 MailGuard: your address is not allowed to relay")
            return
        open_before = self.envelope is not None and self.envelope.mail_from is not None
        await super().smtp_MAIL(arg)
        if open_before or self.envelope is None or self.envelope.mail_from is None:
            await self._idle_over()  # a refused MAIL moves no mail either

    # -- DATA -----------------------------------------------------------------------------
    @syntax("DATA")
    async def smtp_DATA(self, arg: str | None) -> None:
        if await self.check_helo_needed():
            return
        if await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None and self.session is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 5.5.1 Error: need RCPT command")
            return
        if arg:
            await self.push("501 5.5.4 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        try:
            incoming, problem = await self._read_data()
        except asyncio.CancelledError:
            log.info("%r connection lost during DATA", self.session.peer)
            self._writer.close()
            raise
        self._idle_commands = 0  # a message was sent: the session is not idle
        if problem:
            self._set_post_data_state()
            await self.push(problem)
            return
        assert incoming is not None
        env = self.envelope
        env.original_content = incoming.content  # type: ignore[assignment]
        env.content = incoming.content  # type: ignore[assignment]
        env.mailguard_incoming = incoming  # type: ignore[attr-defined]
        env.mailguard_xforward = dict(self._xforward)  # type: ignore[attr-defined]
        try:
            status = await self._call_handler_hook("DATA")
        except Exception as e:  # the transaction must end cleanly: 451 and a fresh envelope
            status = await self.handle_exception(e)
        finally:
            incoming.close()
            self._set_post_data_state()
        await self.push(status or str(TEMPFAIL))

    async def _read_data(self) -> tuple[Incoming | None, str | None]:
        """Read DATA up to CRLF.CRLF; returns (message, None) or (None, error reply)."""
        reader = self._reader
        limit = self.data_size_limit or 0
        saved_limit = reader._limit  # type: ignore[attr-defined]
        # StreamReader pauses the socket at 2 × limit: aiosmtpd's 1001 would mean 2 KiB reads.
        reader._limit = _READ  # type: ignore[attr-defined]
        buf = bytearray()
        spool: Any = None  # temp file once the message passes spool_threshold
        spooled = 0  # bytes already moved to the spool
        total = 0
        too_much = too_long = spool_error = False
        loop = asyncio.get_running_loop()
        started = loop.time()
        rate = self.min_data_rate
        scan_from = 0  # position in buf where the terminator search resumes
        dotted = False  # a dot-stuffed line was seen: the content differs from the wire
        line_from = 0  # position in buf where the line-length scan resumes
        try:
            while True:
                chunk = await reader.read(_READ)
                if not chunk:
                    raise asyncio.CancelledError()  # EOF mid-DATA: nothing is accepted
                # idle timeout, capped by the overall DATA deadline (min_data_rate)
                idle = self._timeout_duration
                if rate:
                    deadline = started + idle + (spooled + len(buf) + len(chunk)) / rate
                    idle = min(idle, deadline - loop.time())
                if idle <= 0:
                    log.info("%r DATA too slow: closing", self.session.peer)  # type: ignore[union-attr]
                    assert self.transport is not None
                    self.transport.close()
                    raise asyncio.CancelledError()
                self._reset_timeout(idle)
                buf += chunk
                # the DATA line's CRLF counts as the terminator's first CRLF
                if spooled == 0 and buf.startswith(b".\r\n"):
                    end, stop = 0, 3
                else:
                    end, scan_from, saw = _find_end(buf, scan_from)
                    dotted = dotted or saw
                    stop = end + 5
                if end >= 0:
                    extra = bytes(buf[stop:])
                    del buf[end + 2 if stop > 3 else 0 :]
                    if extra:  # pipelined commands after the dot belong to the command loop
                        reader._buffer[0:0] = extra  # type: ignore[attr-defined]
                if not too_long:
                    too_long, line_from = _long_line(buf, line_from, end < 0)
                total = spooled + len(buf)
                if limit and total > limit and not too_much:
                    too_much = True
                if too_much or too_long:
                    # keep only a tail for the terminator search: nothing else is needed
                    keep = 4 if end < 0 else 0
                    spooled += len(buf) - keep
                    del buf[: len(buf) - keep]
                    scan_from = line_from = 0
                elif spool is not None or len(buf) > self.spool_threshold:
                    keep = 4 if end < 0 else 0
                    try:
                        if spool is None:
                            spool = tempfile.NamedTemporaryFile(  # noqa: SIM115 - outlives block
                                prefix="mailguard-",
                                suffix=".spool",
                                dir=self.spool_dir,
                                delete=False,
                            )
                        spool.write(buf[: len(buf) - keep])
                    except OSError as e:  # disk full: drain the rest, then 451
                        log.error("cannot spool message: %s", e)
                        spool_error = True
                        too_much = True
                    spooled += len(buf) - keep
                    del buf[: len(buf) - keep]
                    scan_from = line_from = 0
                if end >= 0:
                    break
        except BaseException:
            if spool is not None:
                spool.close()
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(spool.name)
            raise
        finally:
            reader._limit = saved_limit  # type: ignore[attr-defined]
        if too_long or too_much:
            if spool is not None:
                with contextlib.suppress(OSError):
                    spool.close()
                    os.unlink(spool.name)
            if spool_error:
                return None, "451 4.3.0 MailGuard: cannot store the message now, try again later"
            if too_much:
                return None, "552 5.3.4 Error: message size exceeds fixed maximum message size"
            return None, "500 5.5.2 Line too long (see RFC 5321 4.5.3.1.6)"
        if spool is None:
            return _unstuff(bytes(buf), dotted), None
        return _spooled(spool, bytes(buf)), None


def _long_line(buf: bytearray, start: int, more: bool) -> tuple[bool, int]:
    """Is there a line over 1000 octets in buf[start:]? Returns (found, where to resume)."""
    pos = start
    n = len(buf)
    while pos + _MAX_LINE < n:
        j = buf.rfind(b"\n", pos, pos + _MAX_LINE + 1)
        if j < 0:
            return True, pos
        pos = j + 1
    if not more and n - pos > _MAX_LINE:
        return True, pos
    return False, pos


def _find_end(buf: bytearray, start: int) -> tuple[int, int, bool]:
    """Find CRLF.CRLF from `start`: (its position or -1, where to resume, saw a dot line).

    One pass finds both the terminator and the dot-stuffed lines (CRLF "." but not CRLF.CRLF),
    so un-stuffing costs nothing for the usual message that has none.
    """
    dotted = False
    n = len(buf)
    i = buf.find(b"\r\n.", start)
    while i >= 0:
        if i + 5 > n:  # "\r\n." or "\r\n.\r" at the very end: decide with the next read
            return -1, i, dotted
        if buf[i + 3] == 13 and buf[i + 4] == 10:
            return i, i, dotted
        dotted = True
        i = buf.find(b"\r\n.", i + 3)
    return -1, max(start, n - 2), dotted


def _unstuff(wire: bytes, dotted: bool = True) -> Incoming:
    """Remove the transparency dots (RFC 5321 4.5.2); keep the wire form when it can be reused."""
    content = wire.replace(b"\r\n.", b"\r\n") if dotted else wire
    if wire.startswith(b"."):
        content = content[1:]
    # Bare CR or LF (not from Postfix, which normalises) must not go upstream as they came.
    # Reusable iff #LF == #CR == #CRLF in the wire (CRLFs counted in the wire itself: deleting
    # the other bytes could make "\r\0\n" look like a pair).
    ends = wire.translate(None, _NOT_LINE_END)
    lf = ends.count(b"\n")
    reusable = lf == len(ends) - lf and wire.count(b"\r\n") == lf
    return Incoming(content, wire if reusable else None)


_NOT_LINE_END = bytes(i for i in range(256) if i not in (10, 13))


def _spooled(spool: Any, tail: bytes) -> Incoming:
    """Finish a spooled message: un-stuff it into a second temp file (flat RAM) and mmap that."""
    spool.write(tail)
    spool.close()
    name = spool.name
    out = open(name + ".msg", "w+b")  # noqa: SIM115 - closed by Incoming.close
    try:
        with open(name, "rb") as src:
            carry = b""
            while block := src.read(_READ):
                data = carry + block
                cut = data.rfind(b"\r\n") + 2  # pieces start at a line start
                if cut < 2:
                    carry = data
                    continue
                carry, data = data[cut:], data[:cut]
                if data.startswith(b"."):
                    data = data[1:]
                out.write(data.replace(b"\r\n.", b"\r\n"))
            if carry.startswith(b"."):
                carry = carry[1:]
            out.write(carry)
        out.flush()
    except BaseException:
        out.close()
        os.unlink(name + ".msg")
        raise
    finally:
        os.unlink(name)
    if out.tell() == 0:
        out.close()
        os.unlink(name + ".msg")
        return Incoming(b"")
    mm = mmap.mmap(out.fileno(), 0, access=mmap.ACCESS_READ)
    return Incoming(mm, None, name + ".msg", out)


class FrontHandler:
    """aiosmtpd handler: turns the transaction into (Envelope, Incoming) for the guard."""

    def __init__(self, process: MessageHandler, *, max_recipients: int = 1000) -> None:
        self.process = process
        self.max_recipients = max_recipients

    async def handle_EHLO(
        self,
        server: GuardSMTP,
        session: Session,
        envelope: AioEnvelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        session.host_name = hostname  # aiosmtpd leaves this to a 5-argument hook
        if server.xforward_enabled and responses and responses[-1].startswith("250 "):
            responses.insert(len(responses) - 1, "250-XFORWARD " + " ".join(XFORWARD_ATTRS))
        return ["\r\n".join(responses)]  # one write, not one syscall per line

    async def handle_RCPT(
        self,
        server: GuardSMTP,
        session: Session,
        envelope: AioEnvelope,
        address: str,
        options: list[str],
    ) -> str:
        if self.max_recipients and len(envelope.rcpt_tos) >= self.max_recipients:
            return "452 4.5.3 Error: too many recipients"
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.append(options)  # type: ignore[arg-type]
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server: GuardSMTP, session: Session, envelope: AioEnvelope) -> str:
        incoming: Incoming = envelope.mailguard_incoming  # type: ignore[attr-defined]
        peer = session.peer
        env = Envelope(
            # aiosmtpd hands the null sender over as "<>"; everything after us means "" by it
            mail_from="" if envelope.mail_from in (None, "<>") else envelope.mail_from,
            rcpt_tos=list(envelope.rcpt_tos),
            mail_options=list(envelope.mail_options),
            rcpt_options=list(envelope.rcpt_options),  # type: ignore[arg-type]
            xforward=envelope.mailguard_xforward,  # type: ignore[attr-defined]
            client_addr=str(peer[0]) if isinstance(peer, tuple) else "",
        )
        reply = await self.process(env, incoming)
        return str(reply)

    async def handle_exception(self, error: Exception) -> str:
        # Without this aiosmtpd answers "500 Error: (Exc) text": Postfix would bounce the mail.
        log.error(
            "SMTP session error, answering 451: %s: %s", type(error).__name__, error, exc_info=error
        )
        return str(TEMPFAIL)
