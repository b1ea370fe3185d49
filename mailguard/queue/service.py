"""Queue stage, the verbs: keep a message (hold/confirm/approve), act on a token, release, cancel.

`keep()` stores the message, its tokens and the notices that carry the links in ONE durable
transaction and only then answers 250: a notice that cannot be sent right now is retried by the
scheduler, so a mail-server hiccup never leaves a message waiting for a link nobody received.

Who is told: notices go to the envelope sender only when the organisation owns it (the pipeline
says so in `KeepRequest.notify_sender`: internal domain or `notify.senders`). A null sender
(`MAIL FROM:<>`) or a foreign one never gets the guard's mail — that would make the guard a
backscatter and phishing relay with the company's name on it; the message stays held and the admin
(`notify.admin`) gets the link instead, in a notice whose kind says why (`null-sender`,
`unowned-sender`). The choice is stored with the message (`decision["notify"]`), so its outcome
notices and its bounce later go to the same place.

Tokens are `secrets.token_urlsafe(24)` (192 random bits); only their SHA-256 is stored. The link
itself exists in the database only inside the pending notice that carries it, and is scrubbed as
soon as that notice has been handed to the upstream MTA.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

from mailguard.envelope import Envelope, Reply
from mailguard.errors import StoreError
from mailguard.gate import Gate
from mailguard.logfmt import safe_id
from mailguard.queue.store import (
    Held,
    HeldStore,
    NewNotice,
    NewToken,
    State,
    TokenError,
    TokenInfo,
    utcnow,
)

log = logging.getLogger("mailguard.queue")

DEFAULT_WAIT = {
    Gate.HOLD: timedelta(minutes=5),
    Gate.CONFIRM: timedelta(hours=24),
    Gate.APPROVE: timedelta(hours=72),
}
QUEUE_TEMPFAIL = Reply(451, "4.3.0 MailGuard: cannot queue the message now, try again later")


def new_token() -> tuple[str, bytes]:
    """(token for the link, SHA-256 to store)."""
    tok = secrets.token_urlsafe(24)
    return tok, hash_token(tok)


def hash_token(token: str) -> bytes:
    return hashlib.sha256(token.encode("ascii", "replace")).digest()


@dataclass(frozen=True, slots=True)
class KeepRequest:
    """What the pipeline asks the queue to keep: plain data, no policy or action types."""

    id: str  # the message's one id (log line, queue, page, notices)
    gate: Gate  # HOLD, CONFIRM or APPROVE
    summary: Mapping[str, object]  # Summary.to_json(): what pages and notices show
    decision: Mapping[str, Any]  # Decision.to_json(): for the audit, the CLI and the API
    wait: timedelta | None = None  # hold time / deadline; None = the queue's default
    on_timeout: str = "cancel"  # confirm/approve unanswered: "cancel" or "send"
    approvers: tuple[str, ...] = ()
    allow_send_now: bool = False  # HOLD: the sender's page may send at once
    lang: str = ""  # notices: "ja", "en", "ja+en"; "" = the service's default
    why: str = "policy"  # audit: the rules that fired
    # zip passwords and the like: parked, sent only once this message was accepted upstream
    after_delivery: tuple[NewNotice, ...] = ()
    # the organisation owns the envelope sender (internal domain or notify.senders): notices may
    # go to it; False (or a null sender) = they go to the admin instead
    notify_sender: bool = True


NULL_SENDER = "null-sender"  # notice kinds for the admin: why the sender is not told
UNOWNED_SENDER = "unowned-sender"
ADMIN_KINDS = (NULL_SENDER, UNOWNED_SENDER)


def notify_route(mail_from: str, notify_sender: bool, admin: str) -> dict[str, str]:
    """Who gets the notices about a message: {"to": address or "", "why": "" | kind}."""
    if not mail_from:
        return {"to": admin, "why": NULL_SENDER}
    if not notify_sender:
        return {"to": admin, "why": UNOWNED_SENDER}
    return {"to": mail_from, "why": ""}


def route_of(held: Held) -> tuple[str, str]:
    """(address, why) stored with the message at keep time; rows kept before the route was
    stored: the sender (a null sender: nobody)."""
    r = held.decision.get("notify")
    if isinstance(r, Mapping):
        return str(r.get("to") or ""), str(r.get("why") or "")
    return held.mail_from, "" if held.mail_from else NULL_SENDER


def addressed(kind: str, data: Mapping[str, Any], why: str) -> tuple[str, dict[str, Any]]:
    """A notice meant for the sender, as it goes out: unchanged for an owned sender, else the
    admin's kind (`null-sender` / `unowned-sender`) with the sender's kind in data["about"]."""
    if not why:
        return kind, dict(data)
    shown = "".join(
        c if c.isprintable() else f"\\u{ord(c):04x}" for c in str(data.get("sender") or "")
    )
    return why, {**data, "about": kind, "sender_shown": shown[:320]}


def redirect_notices(
    notices: Sequence[NewNotice], mail_from: str, notify_sender: bool, admin: str
) -> list[NewNotice]:
    """Notices a transform addressed to the envelope sender (zip passwords), re-addressed when
    the sender may not be told: to the admin, or dropped when there is none. Notices to others
    (passwords to the recipients, as the policy says) are unchanged."""
    route = notify_route(mail_from, notify_sender, admin)
    if not route["why"]:
        return list(notices)
    sender = mail_from.lower()
    out: list[NewNotice] = []
    for n in notices:
        if not any(not t or t.lower() == sender for t in n.to):
            out.append(n)
            continue
        if not route["to"]:
            log.warning(
                "%s: %s for a %s withdrawn: no notify.admin", n.msg_id, n.kind, route["why"]
            )
            continue
        kind, data = addressed(n.kind, {**n.data, "sender": mail_from}, route["why"])
        out.append(replace(n, kind=kind, to=(route["to"],), data=data))
    return out


def notice_data(held: Held, lang: str, **extra: Any) -> dict[str, Any]:
    """Template variables every notice about one message shares (no message content)."""
    return {
        "id": held.id,
        "summary": dict(held.summary),
        "sender": held.mail_from,
        "due": held.due.isoformat(),
        "gate": held.gate,
        "on_timeout": held.on_timeout,
        "lang": str(held.decision.get("lang") or lang),
        **extra,
    }


def outcome_notice(
    held: Held, outcome: str, *, now: datetime, lang: str = "", by: str = "", why: str = ""
) -> list[NewNotice]:
    """Tell the sender what became of the message (null envelope sender: nothing answers it);
    a sender the organisation does not own is never told: the admin is (`route_of`)."""
    to, reason = route_of(held)
    if not to:
        return []
    kind, data = addressed(
        "outcome", notice_data(held, lang, outcome=outcome, by=by, why=why), reason
    )
    return [NewNotice(kind, (to,), data, now, null_sender=True, msg_id=held.id)]


@dataclass(frozen=True, slots=True)
class PageView:
    """What the confirm page needs: the token's role and the message it belongs to."""

    token: TokenInfo
    held: Held
    actions: tuple[str, ...]  # what this token may do now: "send", "cancel", "approve", "refuse"


def allowed_actions(info: TokenInfo, held: Held) -> tuple[str, ...]:
    if info.role == "approver":
        return ("approve", "refuse")
    if held.gate == Gate.HOLD.label:
        return ("send", "cancel") if held.decision.get("allow_send_now") else ("cancel",)
    if held.gate == Gate.CONFIRM.label:
        return ("send", "cancel")
    return ("cancel",)


def _new_held(
    env: Envelope,
    raw: bytes,
    req: KeepRequest,
    now: datetime,
    due: datetime,
    *,
    gate: Gate,
    admin: str = "",
) -> Held:
    return Held(
        id=req.id,
        state=State.HELD,
        gate=gate.label,
        mail_from=env.mail_from,
        rcpt_tos=tuple(env.rcpt_tos),
        created=now,
        due=due,
        on_timeout=req.on_timeout if gate != Gate.HOLD else "send",
        queue_id=env.queue_id,
        envelope={
            "mail_options": list(env.mail_options),
            "rcpt_options": [list(o) for o in env.rcpt_options],
            "xforward": dict(env.xforward),
            "client_addr": env.client_addr,
        },
        decision={
            **req.decision,
            "lang": req.lang,
            "allow_send_now": req.allow_send_now,
            "notify": notify_route(env.mail_from, req.notify_sender, admin),
        },
        summary=dict(req.summary),
        size=len(raw),
    )


class HoldService:
    """Keeps messages and carries out decisions about them; the SMTP server, the web pages, the
    admin API and the CLI all go through it so every path records who and why."""

    def __init__(
        self,
        store: HeldStore,
        *,
        public_url: str = "http://127.0.0.1:8025",
        clock: Callable[[], datetime] = utcnow,
        lang: str = "ja",
        waits: Mapping[Gate, timedelta] | None = None,
        admin: str = "",
    ) -> None:
        self.store = store
        self.admin = admin  # notices for null and foreign senders go here ("" = nobody)
        self.public_url = public_url.rstrip("/")
        self.clock = clock
        self.lang = lang  # notices whose policy names no language
        self.waits = {**DEFAULT_WAIT, **(waits or {})}

    def link(self, token: str) -> str:
        return f"{self.public_url}/m/{token}"

    # -- SMTP side -----------------------------------------------------------------------------

    async def keep(self, env: Envelope, raw: bytes, req: KeepRequest) -> Reply:
        """Store durably with its links and notices; 250 only after the commit, else 451."""
        if not req.gate.keeps:
            raise ValueError(f"keep() needs hold, confirm or approve, not {req.gate.label}")
        try:
            now = self.clock()
            due = now + (req.wait or self.waits[req.gate])
            held = _new_held(env, raw, req, now, due, gate=req.gate, admin=self.admin)
            tokens, notices = self._links(held, req, now)
            parked = self._parked(held.id, req.after_delivery, env.mail_from, req.notify_sender)
            await self.store.put(held, raw, tokens, [*notices, *parked], by="smtp", why=req.why)
        except Exception:
            log.exception("%s: store write failed, answering 451", req.id)
            return QUEUE_TEMPFAIL
        log.info(
            "%s: held gate=%s rules=%s until=%s queue_id=%s",
            held.id,
            held.gate,
            req.why,
            due.isoformat(timespec="seconds"),
            safe_id(env.queue_id),
        )
        return Reply(
            250,
            f"2.0.0 Ok: held as {held.id} ({held.gate} until {due.strftime('%Y-%m-%dT%H:%M:%SZ')})",
        )

    async def keep_split(
        self, parts: Sequence[tuple[Envelope, bytes, tuple[NewNotice, ...]]], req: KeepRequest
    ) -> Reply:
        """Store one message as several deliveries (per-domain zip passwords), each due at once
        and each with its own parked notices; ids are `<id>.1`, `<id>.2`, …

        Each part is committed before the 250; the scheduler sends them within a tick. If a
        later part fails to commit, 451: the client retries and earlier parts may go twice
        (the at-least-once bound of docs/queue.md).
        """
        ids = []
        try:
            now = self.clock()
            for i, (env, raw, notices) in enumerate(parts, 1):
                part = replace(req, id=f"{req.id}.{i}")
                held = _new_held(env, raw, part, now, now, gate=Gate.HOLD, admin=self.admin)
                parked = self._parked(held.id, notices, env.mail_from, req.notify_sender)
                await self.store.put(held, raw, [], parked, by="smtp", why="split delivery")
                ids.append(held.id)
        except Exception:
            log.exception("%s: store write failed for a split delivery, answering 451", req.id)
            return QUEUE_TEMPFAIL
        log.info("%s: split into %d deliveries: %s", req.id, len(ids), ",".join(ids))
        return Reply(250, f"2.0.0 Ok: queued as {len(ids)} deliveries ({', '.join(ids)})")

    def _links(
        self, held: Held, req: KeepRequest, now: datetime
    ) -> tuple[list[NewToken], list[NewNotice]]:
        tokens: list[NewToken] = []
        notices: list[NewNotice] = []
        lang = req.lang or self.lang

        def add(role: str, who: str, kind: str, why: str = "", **more: Any) -> None:
            tok, h = new_token()
            tokens.append(NewToken(h, role, who, held.due))
            kind, data = addressed(kind, notice_data(held, lang, url=self.link(tok), **more), why)
            notices.append(NewNotice(kind, (who,), data, now, msg_id=held.id))

        if req.gate == Gate.APPROVE:
            for a in req.approvers:
                add("approver", a, "approval-request")
            if not req.approvers:
                log.warning("%s: needs approval but names no approver", held.id)
        # the sender's link goes to the sender only if the organisation owns it, else the admin
        to, why = route_of(held)
        if why:
            log.warning(
                "%s: %s: the sender is not told; %s",
                held.id,
                why,
                f"the admin gets the link ({to})" if to else "no notify.admin: nobody is told",
            )
        if not to:
            return tokens, notices
        if req.gate == Gate.HOLD:
            add("sender", to, "held", why, allow_send_now=req.allow_send_now)
        elif req.gate == Gate.CONFIRM:
            add("sender", to, "confirm", why)
        else:
            add("sender", to, "approval-pending", why, approvers=list(req.approvers))
        return tokens, notices

    def _parked(
        self, msg_id: str, notices: Sequence[NewNotice], mail_from: str, notify_sender: bool
    ) -> list[NewNotice]:
        rows = redirect_notices(notices, mail_from, notify_sender, self.admin)
        return [replace(n, msg_id=msg_id) for n in rows]

    async def park_notices(
        self,
        msg_id: str,
        notices: Sequence[NewNotice],
        *,
        mail_from: str | None = None,
        notify_sender: bool = True,
    ) -> None:
        """Durably park notices (zip passwords) of a message about to be relayed in-transaction.
        Those addressed to a null or foreign `mail_from` go to the admin instead (`_links`).

        Raises StoreError: the caller answers 451 rather than send mail whose password is lost.
        Then exactly one of `release_parked` (the upstream accepted it) or `drop_parked`.
        """
        if mail_from is not None:
            notices = redirect_notices(notices, mail_from, notify_sender, self.admin)
        if not notices:
            return
        rows = [replace(n, msg_id=msg_id) for n in notices]
        try:
            await self.store.add_notices(rows)
        except StoreError:
            raise
        except Exception as e:
            raise StoreError(f"cannot queue notices: {e}") from e

    async def release_parked(self, msg_id: str) -> None:
        n = await self.store.release_parked(msg_id, self.clock())
        log.info("%s: %d notice(s) due: message accepted upstream", msg_id, n)

    async def drop_parked(self, msg_id: str) -> None:
        """Withdraw parked notices of a message that was not relayed (best effort, logged)."""
        try:
            n = await self.store.drop_parked(msg_id)
        except StoreError as e:
            log.error("%s: could not withdraw parked notice(s): %s", msg_id, e)
            return
        if n:
            log.info("%s: withdrew %d notice(s): message not relayed", msg_id, n)

    # -- confirm pages -------------------------------------------------------------------------

    async def page(self, token: str) -> PageView:
        """Look a token up without changing anything. Raises TokenError."""
        found = await self.store.token(hash_token(token))
        if found is None:
            raise TokenError("unknown")
        info, held = found
        if info.used_at is not None:
            raise TokenError("used", held)
        if held.state is not State.HELD:
            raise TokenError("decided", held)
        if info.expires <= self.clock():
            raise TokenError("expired", held)
        return PageView(info, held, allowed_actions(info, held))

    async def act(self, token: str, action: str, *, reason: str = "", client: str = "") -> Held:
        """Carry out one page action (single use). Raises TokenError or ValueError."""
        view = await self.page(token)
        if action not in view.actions:
            raise ValueError(f"action {action!r} not allowed here")
        info, held = view.token, view.held
        now = self.clock()
        who = f"{info.role}:{info.who}"
        reason = reason.strip()[:500]
        notices: list[NewNotice] = []
        if action == "send":
            to, why = State.RELEASED, "sender confirmed" if held.gate != "hold" else "send now"
        elif action == "cancel":
            to, why = State.CANCELLED, "cancelled by the sender"
            if info.role != "sender":
                notices = outcome_notice(
                    held, "cancelled", now=now, lang=self.lang, by=info.who, why=reason
                )
        elif action == "approve":
            to, why = State.RELEASED, f"approved{': ' + reason if reason else ''}"
            notices = outcome_notice(
                held, "approved", now=now, lang=self.lang, by=info.who, why=reason
            )
        else:  # refuse
            to, why = State.CANCELLED, f"refused{': ' + reason if reason else ''}"
            notices = outcome_notice(
                held, "refused", now=now, lang=self.lang, by=info.who, why=reason
            )
        new = await self.store.redeem(
            hash_token(token), to, now=now, action=action, by=who, why=why, notices=notices
        )
        log.info("%s: %s by %s (web %s)", held.id, action, info.role, client)
        return new

    # -- admin (API, CLI) ----------------------------------------------------------------------

    async def release(self, msg_id: str, *, by: str, why: str = "released by admin") -> Held:
        held = await self.store.move(
            msg_id,
            State.RELEASED,
            now=self.clock(),
            by=by,
            why=why,
            expect=frozenset({State.HELD}),
        )
        log.info("%s: released by %s", msg_id, by)
        return held

    async def cancel(
        self, msg_id: str, *, by: str, why: str = "cancelled by admin", tell_sender: bool = True
    ) -> Held:
        now = self.clock()
        cur = await self.store.get(msg_id)
        notices = (
            outcome_notice(cur, "cancelled", now=now, lang=self.lang, by=by, why=why)
            if cur is not None and tell_sender
            else []
        )
        held = await self.store.move(
            msg_id,
            State.CANCELLED,
            now=now,
            by=by,
            why=why,
            expect=frozenset({State.HELD, State.RELEASED}),
            notices=notices,
        )
        log.info("%s: cancelled by %s", msg_id, by)
        return held

    async def approve(self, msg_id: str, *, by: str, why: str = "") -> Held:
        """Admin-side approval (the approver normally uses the page)."""
        now = self.clock()
        cur = await self.store.get(msg_id)
        notices = (
            outcome_notice(cur, "approved", now=now, lang=self.lang, by=by, why=why) if cur else []
        )
        return await self.store.move(
            msg_id,
            State.RELEASED,
            now=now,
            by=by,
            why=f"approved{': ' + why if why else ''}",
            expect=frozenset({State.HELD}),
            notices=notices,
        )

    async def refuse(self, msg_id: str, *, by: str, why: str = "") -> Held:
        now = self.clock()
        cur = await self.store.get(msg_id)
        notices = (
            outcome_notice(cur, "refused", now=now, lang=self.lang, by=by, why=why) if cur else []
        )
        return await self.store.move(
            msg_id,
            State.CANCELLED,
            now=now,
            by=by,
            why=f"refused{': ' + why if why else ''}",
            expect=frozenset({State.HELD}),
            notices=notices,
        )
