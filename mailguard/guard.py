"""The guard: one message through parse → checks → policy → action, answered with one SMTP reply.

This is where the never-lose-mail rule is enforced for the in-transaction path:

* pass (and bcc/zip rewrites): relayed inside the SMTP transaction, the client gets the upstream's
  answer (4xx when the upstream is down: Postfix keeps the mail and retries);
* hold / confirm / approve: stored durably (fsync) by the keeper before we answer 250;
* reject: 5xx with the policy's human reason (Postfix bounces it to the sender);
* anything unexpected: 451, logged with Postfix's queue id, the server keeps serving.
"""

from __future__ import annotations

import base64
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Protocol

from mailguard.checks.finding import Finding
from mailguard.envelope import TEMPFAIL, Envelope, Reply
from mailguard.policy.decision import Decision, Gate

if TYPE_CHECKING:
    from mailguard.message import MessageView
    from mailguard.smtp import Incoming

log = logging.getLogger("mailguard.guard")


class Sender(Protocol):
    async def send(self, env: Envelope, raw: bytes, *, wire: bytes | None = None) -> Reply: ...


class Keeper(Protocol):
    """The durable side (queue): returns 250 only after the message is committed."""

    async def keep(
        self, env: Envelope, raw: bytes, decision: Decision, summary: dict[str, Any]
    ) -> Reply: ...

    async def keep_split(
        self, parts: list[tuple[Envelope, bytes]], decision: Decision, summary: dict[str, Any]
    ) -> Reply: ...

    async def send_notices(self, notices: Any, env: Envelope) -> list[int]: ...

    async def drop_notices(self, ids: list[int], env: Envelope) -> None: ...


@dataclass(slots=True)
class Outcome:
    """What happened to one message: for the log line and the metrics."""

    id: str  # ours, for log correlation (Postfix's queue id is env.queue_id)
    reply: Reply
    decision: Decision | None
    view: MessageView | None
    stages: dict[str, float]
    findings: tuple[Finding, ...] = ()  # all findings, also those no rule acted on
    error: str = ""
    verdict: Any = None  # what the analyzer returned (analysis.Analysis in the server)


def new_id() -> str:
    """Short, sortable, unique enough per host: time in µs + 3 random bytes, base32."""
    n = (time.time_ns() // 1000) << 24 | int.from_bytes(os.urandom(3), "big")
    return base64.b32encode(n.to_bytes(11, "big")).decode().rstrip("=").lstrip("A")


# view → Decision, or an object carrying `.decision` and `.findings` (analysis.Analysis)
Analyzer = Callable[["MessageView"], Awaitable[Any]]
ViewParser = Callable[[Any, Envelope], "MessageView"]
Observer = Callable[[Envelope, Outcome], None]


class Guard:
    def __init__(
        self,
        transport: Sender,
        *,
        parse: ViewParser,
        analyze: Analyzer,
        keeper: Keeper | None = None,
        rewrite: Callable[[bytes, MessageView, Decision], Awaitable[tuple[bytes, Any]]]
        | None = None,
        observe: Observer | None = None,
    ) -> None:
        self.transport = transport
        self.parse = parse
        self.analyze = analyze
        self.keeper = keeper
        self.rewrite = rewrite
        self.observe = observe
        self.in_flight = 0

    async def process(self, env: Envelope, msg: Incoming) -> Reply:
        self.in_flight += 1
        stages: dict[str, float] = {}
        view = decision = None
        findings: tuple[Finding, ...] = ()
        error = ""
        verdict: Any = None
        try:
            t = time.perf_counter()
            view = self.parse(msg.content, env)
            stages["parse"] = time.perf_counter() - t
            t = time.perf_counter()
            verdict = await self.analyze(view)
            decision = getattr(verdict, "decision", verdict)
            findings = tuple(getattr(verdict, "findings", decision.findings))
            stages["checks"] = time.perf_counter() - t
            reply = await self._act(env, msg, view, decision, stages)
        except Exception as e:
            log.exception("%s: internal error, answering 451", env.queue_id)
            reply = TEMPFAIL
            error = f"{type(e).__name__}: {e}"
        finally:
            self.in_flight -= 1
        if self.observe is not None:
            try:
                outcome = Outcome(new_id(), reply, decision, view, stages, findings, error, verdict)
                self.observe(env, outcome)
            except Exception:
                log.exception("%s: observer failed (message already answered)", env.queue_id)
        return reply

    async def _act(
        self,
        env: Envelope,
        msg: Incoming,
        view: MessageView,
        decision: Decision,
        stages: dict[str, float],
    ) -> Reply:
        if decision.gate is Gate.REJECT:
            text = decision.reject_message or "message refused by policy"
            return Reply(550, f"5.7.1 MailGuard: {text}")
        raw: Any = msg.content
        wire = msg.wire
        notices: tuple[Any, ...] = ()
        splits: tuple[tuple[tuple[str, ...], bytes], ...] = ()
        if decision.transforms:
            if self.rewrite is None:
                # never 250-and-drop: without the rewrite stage the message waits at Postfix
                log.warning(
                    "%s: policy asks for %s but rewrites are not enabled: 451",
                    env.queue_id,
                    ",".join(decision.transforms),
                )
                return Reply(451, "4.3.0 MailGuard: rewrite not available, try again later")
            t = time.perf_counter()
            raw, result = await self.rewrite(bytes(raw), view, decision)
            notices = tuple(getattr(result, "notices", ()))
            splits = tuple(getattr(result, "splits", ()))
            trace = getattr(result, "trace", "")
            if trace:
                log.info("%s: rewritten: %s", env.queue_id, trace)
            stages["rewrite"] = time.perf_counter() - t
            wire = None
        keep = decision.gate in (Gate.HOLD, Gate.CONFIRM, Gate.APPROVE)
        if (notices or splits or keep) and self.keeper is None:
            log.warning(
                "%s: %s needs the queue, none configured: 451", env.queue_id, decision.action
            )
            return Reply(451, "4.3.0 MailGuard: queue not available, try again later")
        # Notices (zip passwords) are stored durably first and withdrawn if the message does
        # not go out: a password never leaves for mail that was not sent.
        t = time.perf_counter()
        notice_ids = await self.keeper.send_notices(notices, env) if notices else []  # type: ignore[union-attr]
        if splits:
            # one delivery per recipient group (per-domain passwords): each part is stored and
            # sent by the scheduler; several in-transaction relays could half-succeed
            assert self.keeper is not None
            parts = [(replace(env, rcpt_tos=list(rcpts)), sraw) for rcpts, sraw in splits]
            summary = summarize(view, decision)
            if keep:  # each part waits for its own release (one confirm link per domain)
                for penv, praw in parts:
                    reply = await self.keeper.keep(penv, praw, decision, summary)
                    if not reply.ok:
                        break  # 451: the client retries; parts already kept may go twice
            else:
                reply = await self.keeper.keep_split(parts, decision, summary)
            stages["store"] = time.perf_counter() - t
        elif keep:
            assert self.keeper is not None
            reply = await self.keeper.keep(env, bytes(raw), decision, summarize(view, decision))
            stages["store"] = time.perf_counter() - t
        else:
            reply = await self.transport.send(env, raw, wire=wire)
            stages["relay"] = time.perf_counter() - t
        if notice_ids and not reply.ok:
            await self.keeper.drop_notices(notice_ids, env)  # type: ignore[union-attr]
        return reply


def summarize(view: MessageView, decision: Decision) -> dict[str, Any]:
    """What the confirm page may show: addresses, subject, file names and sizes, findings."""
    return {
        "subject": view.subject,
        "from": [a.addr for a in view.from_],
        "to": [a.addr for a in view.to],
        "cc": [a.addr for a in view.cc],
        "attachments": [
            {"filename": p.filename, "size": p.encoded_size, "content_type": p.content_type}
            for p in view.attachments
        ],
        "findings": [
            {"code": f.code, "reason_en": f.reason_en, "reason_ja": f.reason_ja}
            for f in decision.findings
        ],
        "rules": list(decision.rules),
    }
