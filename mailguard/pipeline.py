"""One message from "DATA received" to "answered": view → lookups → checks → policy → action →
relay or keep → record (history, metrics, log line). Read top to bottom.

The SMTP front calls `handle()`; the scheduler calls `deliver()` (the second half, for mail the
queue released); `mailguard check` calls `analyze()` (the first half, no side effects). The same
code and the same lookups decide in all three, so a dry run shows what the server does.

Never lose mail: a pass (or a rewrite) is relayed inside the SMTP transaction and the client gets
the upstream's answer; hold / confirm / approve answer 250 only after the queue's commit; any
error answers 451 and the server keeps serving.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from dataclasses import dataclass, field, replace
from datetime import timedelta
from fnmatch import fnmatchcase
from mmap import mmap
from typing import TYPE_CHECKING, Protocol

from mailguard.actions import apply_all
from mailguard.actions.base import Notice, Rewritten
from mailguard.analysis import Analysis, analyze_view
from mailguard.checks.context import Org
from mailguard.checks.finding import Finding
from mailguard.checks.recipients import party
from mailguard.envelope import TEMPFAIL, Envelope, Reply
from mailguard.logfmt import safe_id
from mailguard.lookups import Lookups, delivery_domains, domains_of
from mailguard.message import MessageView
from mailguard.message.addresses import address_key, parse_envelope
from mailguard.message.types import Address, Part
from mailguard.notify.render import is_own_notice
from mailguard.policy import Policy
from mailguard.policy.decision import PASS, Decision, Gate
from mailguard.queue.service import HoldService, KeepRequest
from mailguard.queue.store import NewNotice, new_id, utcnow
from mailguard.summary import Attachment, Field, Reason, Recipient, Summary

if TYPE_CHECKING:
    from mailguard.metrics import Metrics

log = logging.getLogger("mailguard.pipeline")

Content = bytes | mmap


class Relay(Protocol):
    """The upstream MTA (relay.smtp.SmtpTransport): never raises for upstream trouble."""

    async def send(self, env: Envelope, raw: Content, *, wire: bytes | None = None) -> Reply: ...


@dataclass(frozen=True, slots=True)
class Settings:
    """Per-service knobs the pipeline needs (from the config)."""

    secret: bytes = b""  # seals the guard's own notices: those pass unguarded
    lang: str = "ja"  # notices, when the policy names no language
    log_addresses: bool = False
    json_log: bool = False
    # MAIL FROM patterns the organisation owns besides its internal domains (notify.senders)
    notify_senders: tuple[str, ...] = ()


@dataclass(slots=True)
class Trace:
    """What happened to one message: the log line, the metrics and the history read it."""

    id: str
    env: Envelope
    stages: dict[str, float] = field(default_factory=dict)
    view: MessageView | None = None
    analysis: Analysis | None = None
    decision: Decision | None = None
    reply: Reply = TEMPFAIL
    relayed: bool = False  # handed to the upstream in this transaction (pass, bcc, zip)
    error: str = ""


async def analyze(view: MessageView, policy: Policy, lookups: Lookups) -> Analysis:
    """Look up history and DNS, run the checks and the policy: the decision, no side effects.
    The server's pipeline and `mailguard check` both decide through here."""
    env = view.envelope
    assert env is not None, "the pipeline analyses a message with its envelope"
    ctx = await lookups.gather(view, policy.org)
    return analyze_view(
        view,
        env,
        policy,
        history=ctx.history,
        dns=ctx.dns,
        history_unavailable=ctx.history_unavailable,
    )


class Pipeline:
    def __init__(
        self,
        policy: Policy,
        lookups: Lookups,
        relay: Relay,
        *,
        queue: HoldService | None = None,
        metrics: Metrics | None = None,
        settings: Settings = Settings(),
    ) -> None:
        self.policy = policy  # replaced on reload
        self.lookups = lookups
        self.relay = relay  # replaced when a reload changes the upstream
        self.queue = queue
        self.metrics = metrics
        self.settings = settings
        self.in_flight = 0

    # -- the first half: decide (also `mailguard check`) ------------------------------------

    async def analyze(self, view: MessageView) -> Analysis:
        return await analyze(view, self.policy, self.lookups)

    # -- DATA received → SMTP answer ---------------------------------------------------------

    async def handle(self, env: Envelope, content: Content, wire: bytes | None = None) -> Reply:
        t = Trace(new_id(), env)
        self.in_flight += 1
        try:
            t0 = time.perf_counter()
            t.view = view = MessageView.parse(content, env)
            t1 = time.perf_counter()
            t.stages["parse"] = t1 - t0
            if self._own_notice(view):
                t.decision = PASS  # the guard's own notices are not guarded again
            else:
                t.analysis = await self.analyze(view)
                t.decision = t.analysis.decision
            t.stages["checks"] = time.perf_counter() - t1
            t.reply = await self._act(t, content, wire)
        except Exception as e:
            log.exception(
                "%s: internal error, answering 451 (queue_id=%s)", t.id, safe_id(env.queue_id)
            )
            t.reply = TEMPFAIL
            t.error = f"{type(e).__name__}: {e}"
        finally:
            self.in_flight -= 1
        self._record(t)
        return t.reply

    def _own_notice(self, view: MessageView) -> bool:
        secret = self.settings.secret
        return bool(
            secret and view.header("X-MailGuard-Notice") and is_own_notice(bytes(view.raw), secret)
        )

    async def _act(self, t: Trace, content: Content, wire: bytes | None) -> Reply:
        decision, view = t.decision, t.view
        assert decision is not None and view is not None
        if decision.gate is Gate.REJECT:
            text = decision.reject_message or "message refused by policy"
            return Reply(550, f"5.7.1 MailGuard: {text}")
        raw: Content = content
        rewritten: Rewritten | None = None
        if decision.transforms:
            t0 = time.perf_counter()
            rewritten = await asyncio.to_thread(_rewrite, bytes(content), view, decision)
            t.stages["rewrite"] = time.perf_counter() - t0
            if rewritten.trace:
                log.info("%s: rewritten: %s", t.id, rewritten.trace)
            raw, wire = rewritten.raw, None
        lang = decision.lang or self.settings.lang
        after = tuple(_parked(n, lang) for n in rewritten.notices) if rewritten else ()
        splits = rewritten.splits if rewritten else ()
        if (after or splits or decision.gate.keeps) and self.queue is None:
            log.warning("%s: %s needs the queue, none configured: 451", t.id, decision.action)
            return Reply(451, "4.3.0 MailGuard: queue not available, try again later")
        t0 = time.perf_counter()
        if splits or decision.gate.keeps:
            assert self.queue is not None
            reply = await self._keep(t, bytes(raw), after, splits, lang)
            t.stages["store"] = time.perf_counter() - t0
            return reply
        reply = await self._relay_now(t, raw, wire, after)
        t.stages["relay"] = time.perf_counter() - t0
        return reply

    async def _relay_now(
        self, t: Trace, raw: Content, wire: bytes | None, after: tuple[NewNotice, ...]
    ) -> Reply:
        """Relay inside the transaction; parked notices go out only if the upstream took it."""
        if after:
            assert self.queue is not None
            await self.queue.park_notices(  # StoreError → 451, nothing sent
                t.id, after, mail_from=t.env.mail_from, notify_sender=self._owns(t.env.mail_from)
            )
        accepted = False
        try:
            reply = await self.relay.send(t.env, raw, wire=wire)
            t.relayed = True
            accepted = reply.ok
            if accepted and after:
                assert self.queue is not None
                try:
                    await self.queue.release_parked(t.id)
                except Exception:  # the mail is out: answer 250 (a 451 would send it twice)
                    log.exception("%s: delivered, but its password could not be released", t.id)
            return reply
        finally:
            if after and not accepted:
                assert self.queue is not None
                await self.queue.drop_parked(t.id)

    async def _keep(
        self,
        t: Trace,
        raw: bytes,
        after: tuple[NewNotice, ...],
        splits: tuple[tuple[tuple[str, ...], bytes], ...],
        lang: str,
    ) -> Reply:
        assert self.queue is not None and t.decision is not None
        decision = t.decision
        req = KeepRequest(
            id=t.id,
            gate=decision.gate if decision.gate.keeps else Gate.HOLD,
            summary=summarize(t.analysis).to_json() if t.analysis else {},
            decision=decision.to_json(),
            wait=decision.hold_for,
            on_timeout=decision.on_timeout,
            approvers=decision.approvers,
            allow_send_now=decision.allow_send_now,
            lang=lang,
            why=", ".join(decision.rules) or "policy",
            after_delivery=after,
            notify_sender=self._owns(t.env.mail_from),
        )
        if not splits:
            return await self.queue.keep(t.env, raw, req)
        # One delivery per recipient group (per-domain zip passwords): the transform returns
        # one notice per group, in the groups' order.
        per_part: list[tuple[NewNotice, ...]] = (
            [(n,) for n in after] if len(after) == len(splits) else [after] * len(splits)
        )
        parts = [
            (replace_rcpts(t.env, rcpts), sraw, notices)
            for (rcpts, sraw), notices in zip(splits, per_part, strict=True)
        ]
        if not decision.gate.keeps:
            return await self.queue.keep_split(parts, req)
        reply = Reply(451, "4.3.0 MailGuard: nothing kept")
        for i, (penv, praw, notices) in enumerate(parts, 1):  # each waits for its own link
            part = replace(req, id=f"{t.id}.{i}", after_delivery=notices)
            reply = await self.queue.keep(penv, praw, part)
            if not reply.ok:
                break  # 451: the client retries; parts already kept may go twice
        return reply

    def _owns(self, mail_from: str) -> bool:
        """The organisation owns this envelope sender: the guard's notices may go to it."""
        return owns_sender(mail_from, self.policy.org, self.settings.notify_senders)

    # -- the second half: released by the queue → upstream -----------------------------------

    async def deliver(self, msg_id: str, env: Envelope, raw: bytes) -> Reply:
        """Relay a message the queue released; a delivery teaches the history at once."""
        reply = await self.relay.send(env, raw)
        if self.metrics is not None:
            self.metrics.relay_result(reply.code)
        if reply.ok:
            self.lookups.learn(delivery_domains(env.rcpt_tos))
        return reply

    # -- record: history, metrics, the log line ----------------------------------------------

    def _record(self, t: Trace) -> None:
        try:
            self._record_unsafe(t)
        except Exception:
            log.exception("%s: recording failed (message already answered)", t.id)

    def _record_unsafe(self, t: Trace) -> None:
        decision, view, reply = t.decision, t.view, t.reply
        action = decision.action if decision is not None else "error"
        if t.relayed and reply.ok:
            rcpts = view.rcpts if view is not None else parse_envelope(t.env.rcpt_tos)
            self.lookups.learn(domains_of(rcpts))
        findings: tuple[Finding, ...] = t.analysis.findings if t.analysis is not None else ()
        codes = [f.code for f in findings]
        m = self.metrics
        if m is not None:
            m.observe_message(
                action if reply.code < 400 or action == "reject" else "tempfail",
                rules=decision.rules if decision else (),
                codes=codes,
                transforms=decision.transforms if decision else (),
                size=view.size if view else None,
            )
            for stage, secs in t.stages.items():
                m.stage_seconds.labels(stage).observe(secs)
            if t.relayed:
                m.relay_result(reply.code)
            m.smtp_reply(reply.code)
        if not log.isEnabledFor(logging.INFO):
            return
        from mailguard.logfmt import message_log_line

        s = self.settings
        log.info(
            "%s",
            message_log_line(
                queue_id=correlation_id(t.env.queue_id, reply),
                mg_id=t.id,
                message_id=(view.message_id or "") if view else "",
                decision=action,
                rules=decision.rules if decision else (),
                codes=codes,
                transforms=decision.transforms if decision else (),
                size=view.size if view else 0,
                recipients=len(t.env.rcpt_tos),
                elapsed=sum(t.stages.values()),
                reply=reply.code,
                sender=t.env.mail_from,
                rcpts=t.env.rcpt_tos,
                log_addresses=s.log_addresses,
                json=s.json_log,
            ),
        )


# -- helpers ------------------------------------------------------------------------------------


_QUEUED_AS = re.compile(r"\bqueued as ([A-Za-z0-9]{4,64})\b")


def correlation_id(queue_id: str, reply: Reply) -> str:
    """The id that ties Postfix's log to ours: the client's XFORWARD IDENT, or — before-queue,
    where Postfix has no queue id yet and sends IDENT=[UNAVAILABLE] — the upstream's
    "queued as …" from its answer to our DATA."""
    if queue_id not in ("-", "[UNAVAILABLE]"):
        return queue_id
    m = _QUEUED_AS.search(reply.text) if reply.ok else None
    return m[1] if m else queue_id


def owns_sender(mail_from: str, org: Org, patterns: tuple[str, ...] = ()) -> bool:
    """MAIL FROM is an address of the organisation: an internal domain of the policy, or one of
    the `notify.senders` patterns (shell-style, case-insensitive). A null sender is nobody's."""
    if not mail_from.strip("<> "):
        return False
    addr = parse_envelope([mail_from])[0]
    if not addr.domain or not addr.local:
        return False
    if org.is_internal(addr.domain.lower()):
        return True
    forms = {f"{addr.local}@{addr.domain}".lower(), mail_from.strip("<> ").lower()}
    return any(fnmatchcase(f, p.lower()) for p in patterns for f in forms)


def _rewrite(raw: bytes, view: MessageView, decision: Decision) -> Rewritten:
    env = view.envelope

    def reparse(b: bytes) -> MessageView:
        return MessageView.parse(b, env)

    return apply_all(raw, view, decision.transforms, decision.options, reparse=reparse)


def _parked(n: Notice, lang: str) -> NewNotice:
    """A transform's notice, parked until its message is delivered (then due `send_after` on)."""
    data = {**dict(n.data), "lang": lang} if "lang" not in n.data else dict(n.data)
    return NewNotice(n.kind, n.to, data, utcnow(), after_delivery=n.send_after or timedelta(0))


def replace_rcpts(env: Envelope, rcpts: tuple[str, ...]) -> Envelope:
    return replace(env, rcpt_tos=list(rcpts))


def summarize(a: Analysis) -> Summary:
    """What the sender (or approver) is shown: who it really goes to, split internal / external,
    with the names and header fields the sender gave them, attachments, and why it waits."""
    view, org, decision = a.view, a.org, a.decision
    named: dict[str, Address] = {}
    for addr in (*view.to, *view.cc, *view.bcc):
        named.setdefault(address_key(addr), addr)
    env = a.envelope
    actual = list(view.rcpts) if env.rcpt_tos else list(named.values())
    internal: list[Recipient] = []
    external: list[Recipient] = []
    seen: set[str] = set()
    for addr in actual:
        key = address_key(addr)
        if key in seen:
            continue
        seen.add(key)
        shown = named.get(key)
        where: Field = "hidden"
        if shown is not None and shown.header in ("to", "cc", "bcc"):
            where = shown.header
        text = (
            addr.addr
            if addr.domain_unicode == addr.domain
            else f"{addr.local}@{addr.domain_unicode}"
        )
        name = shown.display_name if shown is not None else ""
        if addr.domain and not org.is_internal(addr.domain):
            external.append(Recipient(text, name, where, party(addr, org)))
        else:
            internal.append(Recipient(text, name, where))
    return Summary(
        subject=view.subject or "",
        sender=", ".join(
            f"{f.display_name} <{f.addr}>" if f.display_name else f.addr for f in view.from_
        ),
        internal=tuple(internal),
        external=tuple(external),
        attachments=tuple(
            Attachment(p.filename, _size(view, p), p.content_type) for p in view.attachments
        ),
        findings=tuple(Reason(f.code, f.reason_en, f.reason_ja) for f in decision.findings),
        rules=decision.rules,
        domains=domains_of(view.rcpts),
    )


def _size(view: MessageView, p: Part) -> int:
    """The file's own size: base64 carries 3 bytes in 4 characters, line ends aside."""
    if p.transfer_encoding != "base64":
        return p.encoded_size
    body = view.raw[p.body_start : p.body_end]
    chars = len(body) - body.count(b"\n") - body.count(b"\r") - body.count(b"=")
    return chars * 3 // 4


__all__ = [
    "Content",
    "Pipeline",
    "Relay",
    "Settings",
    "Trace",
    "analyze",
    "owns_sender",
    "summarize",
]
