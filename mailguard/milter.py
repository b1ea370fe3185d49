"""The milter front: Postfix's smtpd calls MailGuard over the milter protocol
(`smtpd_milters = inet:127.0.0.1:10035`) instead of proxying the SMTP session to it, which saves
the second smtpd and MailGuard's own SMTP send for every message that passes.

The wire protocol is kilter.protocol's (parsers and the filter-side state machine, sans-IO); this
module moves bytes between an asyncio stream and its buffer. Per message it collects the
envelope (MAIL FROM / RCPT TO with their ESMTP arguments), the header fields (negotiated with
SMFIP_HDR_LEADSPC, so each value comes exactly as received) and the body chunks, rebuilds the
message as Postfix will queue it (Postfix shows its milters the header fields its cleanup added,
Message-Id and Date when missing, but not its own Received: line) and hands it to the same
`Pipeline.handle` as the SMTP front. The answer at end-of-message:

    pass (bytes unchanged)          → CONTINUE: Postfix queues the message itself
    reject 5xx / tempfail 4xx       → REPLYCODE with the pipeline's code and text
    kept (hold / confirm / approve) → DISCARD, after the store's commit: MailGuard relays it
                                      upstream itself when it is released, as in every mode
    rewrite (bcc, zip, split)       → MailGuard relays the new message upstream (the
                                      reinjection smtpd, no milters) and answers DISCARD once the
                                      upstream took it, or the upstream's refusal

Every event but end-of-message is negotiated "no reply" (SMFIP_NR_*): Postfix waits for no
round trip per header or body chunk. A milter that is down or times out gets Postfix's
`milter_default_action` (tempfail: the sender sees 4xx and retries; nothing is lost).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import socket
from dataclasses import dataclass, field

from kilter.protocol import (
    Abort,
    ActionFlags,
    Body,
    Close,
    Continue,
    Discard,
    EndOfHeaders,
    EndOfMessage,
    EnvelopeFrom,
    EnvelopeRecipient,
    FilterProtocol,
    Header,
    Macro,
    Negotiate,
    ProtocolFlags,
    ReplyCode,
    Stage,
)
from kilter.protocol.buffer import SimpleBuffer
from kilter.protocol.core import MTAMessage

from mailguard.envelope import Envelope, Reply
from mailguard.pipeline import Content, Relay
from mailguard.server import Handle
from mailguard.smtp import Networks

log = logging.getLogger("mailguard.milter")

# Postfix sends at most 65535 bytes of data per packet (no MDS_* size negotiated)
BUFSIZE = 65535 + 5 + 4096
NO_REPLY = (
    ProtocolFlags.NR_CONNECT
    | ProtocolFlags.NR_HELO
    | ProtocolFlags.NR_SENDER
    | ProtocolFlags.NR_RECIPIENT
    | ProtocolFlags.NR_DATA
    | ProtocolFlags.NR_UNKNOWN
    | ProtocolFlags.NR_END_OF_HEADERS
    | ProtocolFlags.NR_BODY
    | ProtocolFlags.NR_HEADER
    | ProtocolFlags.HEADER_LEADING_SPACE
)
ACTIONS = ActionFlags.SETSYMLIST  # the macros below; no edit actions
# the client (as XFORWARD NAME/ADDR would give it) and Postfix's queue id, for the log line
# and for the XFORWARD MailGuard sends when it relays a held or rewritten message itself
MACROS = {
    Stage.CONNECT: ["{client_addr}", "{client_name}"],
    Stage.END_MESSAGE: ["i"],
}
CONTINUE_TEXT = "2.0.0 MailGuard: Postfix queues it"


@dataclass(slots=True)
class _Verdict:
    """What the pipeline did with the message in hand: `original` is the content it was given;
    `continues` is set when it asked to relay exactly that (Postfix queues it then)."""

    original: Content
    continues: bool = False


_current: contextvars.ContextVar[_Verdict | None] = contextvars.ContextVar(
    "mailguard_milter_message", default=None
)


class MilterRelay:
    """The pipeline's upstream when a milter front runs: "relay the original bytes" of a message
    that came over the milter means "Postfix, continue"; anything else (rewritten mail, released
    mail, notices, messages from the SMTP front) goes to the real upstream."""

    def __init__(self, upstream: Relay) -> None:
        self.upstream = upstream

    async def send(self, env: Envelope, raw: Content, *, wire: bytes | None = None) -> Reply:
        v = _current.get()
        if v is not None and raw is v.original:
            v.continues = True
            return Reply(250, CONTINUE_TEXT)
        return await self.upstream.send(env, raw, wire=wire)


@dataclass(slots=True)
class _Transaction:
    mail_from: str = ""
    mail_options: list[str] = field(default_factory=list)
    rcpts: list[str] = field(default_factory=list)
    rcpt_options: list[list[str]] = field(default_factory=list)
    parts: list[bytes] = field(default_factory=list)  # header lines, blank line, body chunks
    in_body: bool = False


def _addr(b: bytes | memoryview) -> str:
    s = bytes(b).decode("utf-8", "surrogateescape")
    return s[1:-1] if s.startswith("<") and s.endswith(">") else s


def _args(args: list[bytes | memoryview]) -> list[str]:
    return [bytes(a).decode("utf-8", "surrogateescape") for a in args]


class _Session:
    """One connection from Postfix (one per SMTP session): any number of messages."""

    def __init__(
        self, handle: Handle, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.handle = handle
        self.reader = reader
        self.writer = writer
        self.proto = FilterProtocol()
        self.inbuf = SimpleBuffer(BUFSIZE)
        self.outbuf = SimpleBuffer(1024)
        self.tx = _Transaction()
        self.macros: dict[str, str] = {}  # {client_addr}, {client_name}, i (the queue id)
        self.busy = False  # between end-of-message and our answer

    def _send(self, message: Negotiate | Continue | Discard | ReplyCode) -> None:
        self.proto.write_to(self.outbuf, message)
        self.writer.write(self.outbuf[:].tobytes())
        del self.outbuf[:]

    async def run(self) -> None:
        sock = self.writer.get_extra_info("socket")
        quickack = sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6)
        while True:
            data = await self.reader.read(self.inbuf.available)
            if not data:
                return
            if quickack:
                # Postfix writes its packets without waiting for replies (NR flags) and with
                # Nagle on: a delayed ACK from here (up to 40 ms, Linux) holds its next packet,
                # the end-of-message one included. Linux clears QUICKACK by itself: re-arm it.
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
            self.inbuf[:] = data
            eom = False
            for msg in self.proto.read_from(self.inbuf):
                if isinstance(msg, EndOfMessage):
                    if len(msg.content):
                        self.tx.parts.append(bytes(msg.content))
                    eom = True  # Postfix sends nothing more before our answer
                elif not self._event(msg):
                    return
            if eom:
                await self._end_of_message()
            await self.writer.drain()

    def _event(self, msg: MTAMessage) -> bool:
        tx = self.tx
        if isinstance(msg, Body):
            tx.parts.append(bytes(msg.content))
        elif isinstance(msg, Header):
            value = bytes(msg.value).replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
            tx.parts.append(msg.name.encode("utf-8", "surrogateescape") + b":" + value + b"\r\n")
        elif isinstance(msg, EnvelopeFrom):
            self.tx = tx = _Transaction()
            tx.mail_from, tx.mail_options = _addr(msg.sender), _args(msg.arguments)
        elif isinstance(msg, EnvelopeRecipient):
            tx.rcpts.append(_addr(msg.recipient))
            tx.rcpt_options.append(_args(msg.arguments))
        elif isinstance(msg, EndOfHeaders):
            tx.parts.append(b"\r\n")
            tx.in_body = True
        elif isinstance(msg, Macro):
            self.macros.update(msg.macros)
        elif isinstance(msg, Negotiate):
            self._send(
                Negotiate(
                    6,
                    ACTIONS & msg.action_flags,
                    NO_REPLY & msg.protocol_flags,
                    MACROS,
                )
            )
            return True
        elif isinstance(msg, Abort):
            self.tx = _Transaction()
            return True
        elif isinstance(msg, Close):
            return False
        if self.proto.needs_response(msg):  # an MTA that did not take a "no reply" flag
            self._send(Continue())
        return True

    async def _end_of_message(self) -> None:
        tx, self.tx = self.tx, _Transaction()
        if not tx.in_body:
            tx.parts.append(b"\r\n")
        content = b"".join(tx.parts)
        tx.parts.clear()
        env = Envelope(
            tx.mail_from,
            tx.rcpts,
            mail_options=tx.mail_options,
            rcpt_options=tx.rcpt_options,
            xforward={
                k: v
                for k, v in (
                    ("NAME", self.macros.get("{client_name}", "")),
                    ("ADDR", self.macros.get("{client_addr}", "")),
                    ("IDENT", self.macros.get("i", "")),
                )
                if v
            },
            client_addr=self.macros.get("{client_addr}", ""),
        )
        verdict = _Verdict(content)
        token = _current.set(verdict)
        self.busy = True
        try:
            reply = await self.handle(env, content, None)
        finally:
            _current.reset(token)
            self.busy = False
        if not reply.ok:
            line = str(reply).replace("\r\n", " ").encode("utf-8", "replace") + b"\0"
            self._send(ReplyCode(line))
        elif verdict.continues:
            self._send(Continue())
        else:  # kept by the store, or relayed by MailGuard itself (rewritten)
            self._send(Discard())


class MilterFront:
    """The milter listening socket; `stop()` lets messages in hand finish (bounded)."""

    def __init__(
        self,
        handle: Handle,
        host: str,
        port: int,
        networks: Networks,
        *,
        reuse_port: bool = False,
    ):
        self.handle = handle
        # the SMTP front's smtp.allowed_networks: a milter peer can make MailGuard relay (a
        # rewrite, a release), so an unlisted one is closed before a byte is read
        self.networks = networks
        self.host, self._port = host, port
        self.reuse_port = reuse_port
        self._server: asyncio.Server | None = None
        self._sessions: dict[asyncio.Task[None], _Session] = {}

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        if not self.networks.allows(peer):
            log.warning("milter: refused %s (not in smtp.allowed_networks)", peer)
            writer.close()
            return
        task = asyncio.current_task()
        assert task is not None
        session = self._sessions[task] = _Session(self.handle, reader, writer)
        try:
            await session.run()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # Postfix went away: it answers its client by milter_default_action
        except Exception:
            log.exception("milter session failed (Postfix applies milter_default_action)")
        finally:
            del self._sessions[task]
            writer.close()

    async def listen(self) -> None:
        self._server = await asyncio.start_server(
            self._serve, self.host or None, self._port, limit=BUFSIZE,
            reuse_port=self.reuse_port or None,
        )  # fmt: skip
        log.info("milter listening on %s:%d", self.host, self.port)

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def stop(self, grace: float = 30.0) -> None:
        """No new connections; sessions between messages are closed (nothing to lose), a
        message in the pipeline gets up to `grace` seconds to be answered."""
        if self._server is None:
            return
        self._server.close()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while True:
            for task, session in list(self._sessions.items()):
                if not session.busy:
                    task.cancel()
            busy = [t for t, s in self._sessions.items() if s.busy]
            if not busy or loop.time() >= deadline:
                break
            await asyncio.sleep(0.05)
        for task in list(self._sessions):
            task.cancel()
        if self._sessions:
            await asyncio.wait(set(self._sessions), timeout=5)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._server.wait_closed(), 5)


__all__ = ["MilterFront", "MilterRelay"]
