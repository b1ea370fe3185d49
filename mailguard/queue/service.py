"""Queue stage, the verbs: keep a message (hold/confirm/approve), act on a token, release, cancel.

`keep()` stores the message, its tokens and the notices that carry the links in ONE durable
transaction and only then answers 250: a notice that cannot be sent right now is retried by the
scheduler, so a mail-server hiccup never leaves a message waiting for a link nobody received.

Tokens are `secrets.token_urlsafe(24)` (192 random bits); only their SHA-256 is stored. The link
itself exists in the database only inside the pending notice that carries it, and is scrubbed as
soon as that notice has been handed to the upstream MTA.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from mailguard.actions.base import Notice
from mailguard.envelope import Envelope, Reply
from mailguard.errors import StoreError
from mailguard.policy.decision import Decision, Gate
from mailguard.queue.store import (
    Held,
    HeldStore,
    NewNotice,
    NewToken,
    State,
    TokenError,
    TokenInfo,
    new_id,
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


def notice_data(held: Held, **extra: Any) -> dict[str, Any]:
    """Template variables every notice about one message shares (no message content)."""
    s = held.summary
    return {
        "id": held.id,
        "subject": s.get("subject", ""),
        "sender": held.mail_from or s.get("from", ""),
        "internal": list(s.get("internal", [])),
        "external": list(s.get("external", [])),
        "findings": [
            {k: f.get(k, "") for k in ("code", "reason_en", "reason_ja")}
            for f in s.get("findings", [])
        ],
        "due": held.due.isoformat(),
        "gate": held.gate,
        "on_timeout": held.on_timeout,
        **extra,
    }


def outcome_notice(
    held: Held, outcome: str, *, now: datetime, by: str = "", why: str = ""
) -> list[NewNotice]:
    """Tell the sender what became of the message (null envelope sender: nothing answers it)."""
    to = held.mail_from or str(held.summary.get("from", ""))
    if not to:
        return []
    data = notice_data(held, outcome=outcome, by=by, why=why)
    return [NewNotice("outcome", (to,), data, now, null_sender=True, msg_id=held.id)]


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
        return (
            ("send", "cancel")
            if held.decision.get("options", {}).get("allow_send_now")
            else ("cancel",)
        )
    if held.gate == Gate.CONFIRM.label:
        return ("send", "cancel")
    return ("cancel",)


def _new_held(
    env: Envelope,
    raw: bytes,
    decision: Decision,
    summary: Mapping[str, Any],
    now: datetime,
    due: datetime,
    *,
    gate: Gate | None = None,
) -> Held:
    gate = gate or decision.gate
    return Held(
        id=new_id(now),
        state=State.HELD,
        gate=gate.label,
        mail_from=env.mail_from,
        rcpt_tos=tuple(env.rcpt_tos),
        created=now,
        due=due,
        on_timeout=decision.on_timeout if gate != Gate.HOLD else "send",
        queue_id=env.queue_id,
        envelope={
            "mail_options": list(env.mail_options),
            "rcpt_options": [list(o) for o in env.rcpt_options],
            "xforward": dict(env.xforward),
            "client_addr": env.client_addr,
        },
        decision=decision.to_json(),
        summary=dict(summary),
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
        lang: str = "",
        waits: Mapping[Gate, timedelta] | None = None,
    ) -> None:
        self.store = store
        self.public_url = public_url.rstrip("/")
        self.clock = clock
        self.lang = lang  # "" = the notifier's default
        self.waits = {**DEFAULT_WAIT, **(waits or {})}

    def link(self, token: str) -> str:
        return f"{self.public_url}/m/{token}"

    # -- SMTP side -----------------------------------------------------------------------------

    async def keep(
        self, env: Envelope, raw: bytes, decision: Decision, summary: Mapping[str, Any]
    ) -> Reply:
        """Store durably and queue the notices; 250 only after the commit, else 451."""
        if decision.gate not in (Gate.HOLD, Gate.CONFIRM, Gate.APPROVE):
            raise ValueError(f"keep() needs hold, confirm or approve, not {decision.action}")
        try:
            now = self.clock()
            due = now + (decision.hold_for or self.waits[decision.gate])
            held = _new_held(env, raw, decision, summary, now, due)
            tokens, notices = self._links(held, decision, now)
            await self.store.put(
                held, raw, tokens, notices, by="smtp", why=", ".join(decision.rules) or "policy"
            )
        except Exception:
            log.exception("%s: store write failed, answering 451", env.queue_id)
            return QUEUE_TEMPFAIL
        log.info(
            "%s: held id=%s gate=%s rules=%s until=%s",
            env.queue_id,
            held.id,
            held.gate,
            ",".join(decision.rules),
            due.isoformat(timespec="seconds"),
        )
        return Reply(
            250,
            f"2.0.0 Ok: held as {held.id} ({held.gate} until {due.strftime('%Y-%m-%dT%H:%M:%SZ')})",
        )

    async def keep_split(
        self,
        parts: Sequence[tuple[Envelope, bytes]],
        decision: Decision,
        summary: Mapping[str, Any],
    ) -> Reply:
        """Store one message as several deliveries (per-domain zip passwords), due at once.

        Each part is committed before the 250; the scheduler sends them within a tick. If a
        later part fails to commit, 451: the client retries and earlier parts may go twice
        (the at-least-once bound of docs/queue.md).
        """
        ids = []
        try:
            now = self.clock()
            for env, raw in parts:
                held = _new_held(env, raw, decision, summary, now, now, gate=Gate.HOLD)
                await self.store.put(held, raw, [], [], by="smtp", why="split delivery")
                ids.append(held.id)
        except Exception:
            log.exception("%s: store write failed for a split delivery, answering 451", "-")
            return QUEUE_TEMPFAIL
        log.info("%s: split into %d deliveries: %s", parts[0][0].queue_id, len(ids), ",".join(ids))
        return Reply(250, f"2.0.0 Ok: queued as {len(ids)} deliveries ({', '.join(ids)})")

    def _links(
        self, held: Held, decision: Decision, now: datetime
    ) -> tuple[list[NewToken], list[NewNotice]]:
        tokens: list[NewToken] = []
        notices: list[NewNotice] = []
        extra = {"lang": self.lang} if self.lang else {}
        allow_now = bool(decision.options.get("allow_send_now"))
        sender = held.mail_from or str(held.summary.get("from", ""))

        def add(role: str, who: str, kind: str, null: bool = False, **more: Any) -> None:
            tok, h = new_token()
            tokens.append(NewToken(h, role, who, held.due))
            data = notice_data(held, url=self.link(tok), **extra, **more)
            notices.append(NewNotice(kind, (who,), data, now, null_sender=null, msg_id=held.id))

        if decision.gate == Gate.APPROVE:
            for a in decision.approvers:
                add("approver", a, "approval-request")
            if not decision.approvers:
                log.warning(
                    "%s: id=%s needs approval but names no approver", held.queue_id, held.id
                )
        if not sender:
            log.warning("%s: id=%s has no sender to notify (null sender)", held.queue_id, held.id)
        elif decision.gate == Gate.HOLD:
            add("sender", sender, "held", allow_send_now=allow_now)
        elif decision.gate == Gate.CONFIRM:
            add("sender", sender, "confirm")
        else:
            add("sender", sender, "approval-pending", approvers=list(decision.approvers))
        return tokens, notices

    async def send_notices(self, notices: Sequence[Notice], env: Envelope) -> list[int]:
        """Durably queue notices from transforms (zip passwords) BEFORE relaying the mail.

        Raises StoreError: the caller answers 451 rather than send mail whose password is lost.
        Returns the notice ids: if the relay then does not answer 2xx, pass them to
        `drop_notices` so no password goes out for a message that was not delivered.
        """
        if not notices:
            return []
        now = self.clock()
        rows = [
            NewNotice(
                n.kind,
                tuple(n.to),
                {**dict(n.data), **({"lang": self.lang} if self.lang else {})},
                now + n.send_after,
                msg_id=None,
            )
            for n in notices
        ]
        try:
            ids = await self.store.add_notices(rows)
        except StoreError:
            raise
        except Exception as e:
            raise StoreError(f"cannot queue notices: {e}") from e
        log.info(
            "%s: queued %d notice(s): %s",
            env.queue_id,
            len(rows),
            ",".join(n.kind for n in notices),
        )
        return ids

    async def drop_notices(self, ids: Sequence[int], env: Envelope) -> None:
        """Withdraw queued notices whose message the upstream did not take (best effort)."""
        try:
            n = await self.store.drop_notices(ids)
        except StoreError as e:
            log.warning("%s: could not withdraw %d notice(s): %s", env.queue_id, len(ids), e)
            return
        log.info("%s: withdrew %d notice(s): message not relayed", env.queue_id, n)

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
                notices = outcome_notice(held, "cancelled", now=now, by=info.who, why=reason)
        elif action == "approve":
            to, why = State.RELEASED, f"approved{': ' + reason if reason else ''}"
            notices = outcome_notice(held, "approved", now=now, by=info.who, why=reason)
        else:  # refuse
            to, why = State.CANCELLED, f"refused{': ' + reason if reason else ''}"
            notices = outcome_notice(held, "refused", now=now, by=info.who, why=reason)
        new = await self.store.redeem(
            hash_token(token), to, now=now, action=action, by=who, why=why, notices=notices
        )
        log.info("%s: id=%s %s by %s (web %s)", held.queue_id, held.id, action, info.role, client)
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
        log.info("%s: id=%s released by %s", held.queue_id, msg_id, by)
        return held

    async def cancel(
        self, msg_id: str, *, by: str, why: str = "cancelled by admin", tell_sender: bool = True
    ) -> Held:
        now = self.clock()
        cur = await self.store.get(msg_id)
        notices = (
            outcome_notice(cur, "cancelled", now=now, by=by, why=why)
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
        log.info("%s: id=%s cancelled by %s", held.queue_id, msg_id, by)
        return held

    async def approve(self, msg_id: str, *, by: str, why: str = "") -> Held:
        """Admin-side approval (the approver normally uses the page)."""
        now = self.clock()
        cur = await self.store.get(msg_id)
        notices = outcome_notice(cur, "approved", now=now, by=by, why=why) if cur else []
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
        notices = outcome_notice(cur, "refused", now=now, by=by, why=why) if cur else []
        return await self.store.move(
            msg_id,
            State.CANCELLED,
            now=now,
            by=by,
            why=f"refused{': ' + why if why else ''}",
            expect=frozenset({State.HELD}),
            notices=notices,
        )
