"""A MEASUREMENT PROTOTYPE, not a product feature: MailGuard's decision path behind Postfix's
milter protocol (issue 15 item 5), so bench/postfix.sh can time `smtpd_milters` against the
before-queue proxy (`smtpd_proxy_filter`) in the same run.

    python bench/milter_proto.py --listen 127.0.0.1:10035 \\
        --policy bench/policies/observe.toml --store /tmp/x.db
    # Postfix: smtpd_milters = inet:127.0.0.1:10035, milter_default_action = tempfail

The milter wire protocol is kilter.protocol's (parsers and the filter-side state machine,
sans-IO, typed; `pip install kilter.protocol`); this file only moves bytes between an asyncio
stream and its buffer. Per message it collects the envelope (MAIL FROM / RCPT TO with their
ESMTP arguments), the header fields (SMFIP_HDR_LEADSPC: the value exactly as received) and the
body chunks, rebuilds the message bytes as the client sent them (Postfix's own Received: field
is not shown to a milter) and hands them to the same `Pipeline.handle` that `mailguard serve`
uses. The pipeline's upstream is replaced by a stand-in that records "relay these bytes" and
answers 250; the end-of-message answer is then:

    pass (bytes unchanged)         → SMFIR_CONTINUE (Postfix queues the message itself)
    reject 5xx / tempfail 4xx      → SMFIR_REPLYCODE with the pipeline's code and text
    kept (hold/confirm/approve)    → SMFIR_DISCARD after the store's commit (MailGuard relays
                                     it later itself, as in every other mode)
    rewrite (bcc/zip: new bytes)   → not done here: 451 (a product version would send
                                     SMFIR_CHGHEADER / SMFIR_REPLBODY / SMFIR_DELRCPT)

Only the pass path is measured. `--null` answers CONTINUE without running MailGuard (the
milter path's ceiling, as bq0 is the before-queue proxy's). Every event but end-of-message is
negotiated "no reply" (SMFIP_NR_*): Postfix waits for no round trip per header or body chunk.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import contextvars
import logging
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

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

from mailguard.app import make_resolver, policy_for, settings_for
from mailguard.config import load, parse_hostport
from mailguard.envelope import Envelope, Reply
from mailguard.history import DomainHistory
from mailguard.lookups import HistoryCache, Lookups
from mailguard.metrics import Metrics
from mailguard.pipeline import Content, Pipeline
from mailguard.queue import HoldService
from mailguard.queue.backends import make_store

log = logging.getLogger("mailguard.milter_proto")
DUMP: Path | None = None

# Postfix sends at most 65535 bytes of data per milter packet (no MDS_* negotiated)
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
ACTIONS = (
    ActionFlags.ADD_HEADERS
    | ActionFlags.CHANGE_HEADERS
    | ActionFlags.CHANGE_BODY
    | ActionFlags.ADD_RECIPIENT
    | ActionFlags.DELETE_RECIPIENT
    | ActionFlags.SETSYMLIST
)


@dataclass(slots=True)
class Verdict:
    """What the pipeline did with one message: `relayed` holds the bytes it would send on."""

    relayed: Content | None = None


_verdict: contextvars.ContextVar[Verdict] = contextvars.ContextVar("milter_verdict")


class PostfixContinues:
    """The pipeline's upstream under a milter: "relay" means let Postfix queue it."""

    async def send(self, env: Envelope, raw: Content, *, wire: bytes | None = None) -> Reply:
        _verdict.get().relayed = raw
        return Reply(250, "2.0.0 Postfix continues")


@dataclass(slots=True)
class Transaction:
    mail_from: str = ""
    mail_options: list[str] = field(default_factory=list)
    rcpts: list[str] = field(default_factory=list)
    rcpt_options: list[list[str]] = field(default_factory=list)
    parts: list[bytes] = field(default_factory=list)  # header lines, then body chunks
    in_body: bool = False
    queue_id: str = ""


def _addr(b: bytes | memoryview) -> str:
    s = bytes(b).decode("utf-8", "surrogateescape")
    return s[1:-1] if s.startswith("<") and s.endswith(">") else s


def _args(args: list[bytes | memoryview]) -> list[str]:
    return [bytes(a).decode("utf-8", "surrogateescape") for a in args]


class MilterSession:
    def __init__(
        self, pipeline: Pipeline | None, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ):
        self.pipeline = pipeline
        self.reader = reader
        self.writer = writer
        self.proto = FilterProtocol()
        self.inbuf = SimpleBuffer(BUFSIZE)
        self.outbuf = SimpleBuffer(BUFSIZE)
        self.tx = Transaction()

    def send(self, message: Negotiate | Continue | Discard | ReplyCode) -> None:
        self.proto.write_to(self.outbuf, message)
        self.writer.write(self.outbuf[:].tobytes())
        del self.outbuf[:]

    async def run(self) -> None:
        try:
            while True:
                data = await self.reader.read(self.inbuf.available)
                if not data:
                    return
                self.inbuf[:] = data
                eom = False
                for msg in self.proto.read_from(self.inbuf):
                    if isinstance(msg, EndOfMessage):
                        if len(msg.content):
                            self.tx.parts.append(bytes(msg.content))
                        eom = True  # the MTA sends nothing more until it has our answer
                    elif not self.event(msg):
                        return
                if eom:
                    await self.end_of_message()
                await self.writer.drain()
        finally:
            self.writer.close()

    def event(self, msg: object) -> bool:
        tx = self.tx
        if isinstance(msg, Body):
            tx.parts.append(bytes(msg.content))
        elif isinstance(msg, Header):
            if not tx.in_body:
                value = bytes(msg.value).replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
                tx.parts.append(msg.name.encode("ascii") + b":" + value + b"\r\n")
        elif isinstance(msg, EnvelopeFrom):
            self.tx = tx = Transaction()
            tx.mail_from, tx.mail_options = _addr(msg.sender), _args(msg.arguments)
        elif isinstance(msg, EnvelopeRecipient):
            tx.rcpts.append(_addr(msg.recipient))
            tx.rcpt_options.append(_args(msg.arguments))
        elif isinstance(msg, Macro):
            tx.queue_id = msg.macros.get("i", tx.queue_id)
        elif isinstance(msg, Negotiate):
            self.send(
                Negotiate(
                    6,
                    ACTIONS & msg.action_flags,
                    NO_REPLY & msg.protocol_flags,
                    {Stage.END_MESSAGE: ["i"]},
                )
            )
        elif isinstance(msg, Abort):
            self.tx = Transaction()
        elif isinstance(msg, Close):
            return False
        else:
            # Connect, Helo, Data, EndOfHeaders, Unknown: nothing to collect
            if isinstance(msg, EndOfHeaders):
                tx.parts.append(b"\r\n")
                tx.in_body = True
            if self.proto.needs_response(msg):  # type: ignore[arg-type]
                self.send(Continue())
        return True

    async def end_of_message(self) -> None:
        tx, self.tx = self.tx, Transaction()
        if not tx.in_body:
            tx.parts.append(b"\r\n")
        content = b"".join(tx.parts)
        if DUMP is not None:  # --dump: check the rebuilt bytes against what was sent
            (DUMP / f"{tx.queue_id or id(content)}.eml").write_bytes(content)
        env = Envelope(
            tx.mail_from,
            tx.rcpts,
            mail_options=tx.mail_options,
            rcpt_options=tx.rcpt_options,
            xforward={"IDENT": tx.queue_id} if tx.queue_id else {},
        )
        if self.pipeline is None:  # --null: the protocol's own cost, no MailGuard
            self.send(Continue())
            return
        verdict = Verdict()
        token = _verdict.set(verdict)
        try:
            reply = await self.pipeline.handle(env, content, None)
        finally:
            _verdict.reset(token)
        if not reply.ok:
            line = str(reply).encode("utf-8", "replace") + b"\0"
            self.send(ReplyCode(line))
        elif verdict.relayed is None:
            self.send(Discard())  # kept by MailGuard's store (committed): it relays it later
        elif verdict.relayed is content:
            self.send(Continue())
        else:
            log.warning("rewrite needs milter edit actions: not in this prototype, 451")
            self.send(ReplyCode(b"451 4.3.0 MailGuard: rewrite not supported by this milter\0"))


async def main(args: argparse.Namespace) -> None:
    cfg = load(args.config)
    cfg = replace(cfg, policy=replace(cfg.policy, file=args.policy))
    cfg = replace(cfg, store=replace(cfg.store, path=Path(args.store), url=""))
    policy = policy_for(cfg)
    store = make_store(cfg.store.path)
    await store.open()
    metrics = Metrics()
    lookups = Lookups(HistoryCache(DomainHistory(cfg.store.path)), make_resolver(cfg, metrics))
    pipeline: Pipeline | None = Pipeline(
        policy,
        lookups,
        PostfixContinues(),
        queue=HoldService(store),
        metrics=metrics,
        settings=settings_for(cfg),
    )

    if args.null:
        pipeline = None

    async def session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await MilterSession(pipeline, reader, writer).run()
        except Exception:
            log.exception("milter session failed")

    host, port = parse_hostport(args.listen)
    server = await asyncio.start_server(session, host, port, limit=BUFSIZE)
    log.warning("milter prototype listening on %s:%s", host, port)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--listen", default="127.0.0.1:10035")
    ap.add_argument("--policy", required=True)
    ap.add_argument("--store", required=True)
    ap.add_argument("-c", "--config", default=None)
    ap.add_argument("--null", action="store_true", help="zero-cost milter: CONTINUE, no checks")
    ap.add_argument("--dump", type=Path, default=None, help="write each rebuilt message here")
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    ns = ap.parse_args()
    DUMP = ns.dump
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main(ns))
