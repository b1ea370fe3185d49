"""Queue stage, the contract: states, allowed moves and the HeldStore protocol every backend keeps.

    held ──► released ──► delivering ──► delivered
      │         │            │  └──────► failed       (5xx, or retries ran out → DSN to sender)
      │         │            └─────────► released     (4xx / connection error: retry later)
      │         └──► cancelled                          (admin cancels before delivery starts)
      ├──► cancelled   (sender cancels, approver refuses, admin)
      └──► expired     (confirm/approve deadline passed and the policy says cancel)

Every move is one atomic transaction that also writes an audit row (when, who, why) and may insert
notices, so "the state changed" and "the sender will be told" can never come apart.
"""

from __future__ import annotations

import base64
import enum
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from mailguard.errors import StoreError


class State(enum.StrEnum):
    HELD = "held"
    RELEASED = "released"
    CANCELLED = "cancelled"
    EXPIRED = "expired"
    DELIVERING = "delivering"
    DELIVERED = "delivered"
    FAILED = "failed"


ALLOWED: dict[State, frozenset[State]] = {
    State.HELD: frozenset({State.RELEASED, State.CANCELLED, State.EXPIRED}),
    State.RELEASED: frozenset({State.DELIVERING, State.CANCELLED}),
    State.DELIVERING: frozenset({State.DELIVERED, State.FAILED, State.RELEASED}),
    State.CANCELLED: frozenset(),
    State.EXPIRED: frozenset(),
    State.DELIVERED: frozenset(),
    State.FAILED: frozenset(),
}
TERMINAL = frozenset(s for s, nxt in ALLOWED.items() if not nxt)


class TransitionError(StoreError):
    """The message is not in a state that allows the requested move (or does not exist)."""

    def __init__(self, msg_id: str, current: State | None, to: State):
        self.msg_id = msg_id
        self.current = current
        self.to = to
        now = current.value if current else "missing"
        super().__init__(f"{msg_id}: cannot move {now} → {to.value}")


class TokenError(StoreError):
    """A confirm-page token is unknown, used or expired (`reason` says which)."""

    def __init__(self, reason: str, held: Held | None = None):
        self.reason = reason  # "unknown", "used", "expired", "decided"
        self.held = held
        super().__init__(f"token {reason}")


def utcnow() -> datetime:
    return datetime.now(UTC)


_B32 = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"  # Crockford: no I, L, O, U to misread


_TO_CROCKFORD = bytes.maketrans(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567", _B32.encode())


def new_id(now: datetime | None = None) -> str:
    """16 characters, time-sortable (48-bit ms) + 32 random bits, easy to read out on the phone."""
    ms = (time.time_ns() // 1_000_000 if now is None else int(now.timestamp() * 1000)) & (
        (1 << 48) - 1
    )
    n = (ms << 32) | int.from_bytes(os.urandom(4), "big")
    # 80 bits = 16 base32 digits; the standard alphabet mapped to Crockford's in one pass
    return base64.b32encode(n.to_bytes(10, "big")).translate(_TO_CROCKFORD).decode()


@dataclass(frozen=True, slots=True)
class Held:
    """One kept message (metadata only; the bytes come from `HeldStore.raw`)."""

    id: str
    state: State
    gate: str  # "hold", "confirm", "approve"
    mail_from: str
    rcpt_tos: tuple[str, ...]
    created: datetime
    due: datetime  # hold: when it goes out by itself; confirm/approve: the deadline
    on_timeout: str = "cancel"  # confirm/approve unanswered: "cancel" or "send"
    queue_id: str = "-"  # Postfix's id, for log correlation
    envelope: Mapping[str, Any] = field(default_factory=dict)  # mail/rcpt options, xforward
    decision: Mapping[str, Any] = field(default_factory=dict)  # Decision.to_json()
    summary: Mapping[str, Any] = field(default_factory=dict)  # what the confirm page shows
    size: int = 0
    updated: datetime | None = None
    attempts: int = 0  # delivery attempts so far
    next_attempt: datetime | None = None  # released: not before this time
    first_release: datetime | None = None  # retries give up max_age after this
    lease_until: datetime | None = None
    last_reply: str = ""  # upstream's last answer, "451 4.4.1 ..."
    last_by: str = ""
    last_why: str = ""

    def to_json(self) -> dict[str, Any]:
        def ts(d: datetime | None) -> str | None:
            return d.isoformat() if d else None

        return {
            "id": self.id,
            "state": self.state.value,
            "gate": self.gate,
            "mail_from": self.mail_from,
            "rcpt_tos": list(self.rcpt_tos),
            "queue_id": self.queue_id,
            "created": ts(self.created),
            "due": ts(self.due),
            "on_timeout": self.on_timeout,
            "size": self.size,
            "updated": ts(self.updated),
            "attempts": self.attempts,
            "next_attempt": ts(self.next_attempt),
            "last_reply": self.last_reply,
            "last_by": self.last_by,
            "last_why": self.last_why,
            "subject": self.summary.get("subject", ""),
            "rules": list(self.decision.get("rules", [])),
        }


@dataclass(frozen=True, slots=True)
class AuditEntry:
    msg_id: str
    at: datetime
    from_state: State | None  # None = the message arrived
    to_state: State
    by: str  # "smtp", "scheduler", "sender", "approver:boss@example.co.jp", "cli:root", "api"
    why: str

    def to_json(self) -> dict[str, Any]:
        return {
            "at": self.at.isoformat(),
            "from": self.from_state.value if self.from_state else None,
            "to": self.to_state.value,
            "by": self.by,
            "why": self.why,
        }


@dataclass(frozen=True, slots=True)
class NewToken:
    """A confirm-page token about to be stored: only its SHA-256 hash goes to disk."""

    hash: bytes
    role: str  # "sender" or "approver"
    who: str  # the address it was sent to
    expires: datetime


@dataclass(frozen=True, slots=True)
class TokenInfo:
    msg_id: str
    role: str
    who: str
    expires: datetime
    used_at: datetime | None
    used_for: str  # the action it was used for ("send", "cancel", …)


@dataclass(frozen=True, slots=True)
class NewNotice:
    """A mail the guard must send (rendered at send time by notify, or a DSN)."""

    kind: str  # "held", "confirm", "approval-request", "outcome", "zip-password", "dsn"
    to: tuple[str, ...]
    data: Mapping[str, Any]  # template variables; may hold a link or a password until sent
    due: datetime
    null_sender: bool = False  # MAIL FROM:<> (bounces and outcomes: nothing may answer them)
    msg_id: str | None = None
    # Not None: parked until message `msg_id` is accepted upstream, then due this much later;
    # withdrawn if it is cancelled, expires or fails (zip passwords: never for mail not sent).
    after_delivery: timedelta | None = None


@dataclass(frozen=True, slots=True)
class PendingNotice:
    id: int
    msg_id: str | None
    kind: str
    to: tuple[str, ...]
    data: Mapping[str, Any]
    null_sender: bool
    attempts: int
    created: datetime
    state: str = "pending"  # "pending", "sent", "failed"
    last_reply: str = ""


@dataclass(frozen=True, slots=True)
class PutRequest:
    """One put() of a put_many() batch."""

    item: Held
    raw: bytes
    tokens: Sequence[NewToken] = ()
    notices: Sequence[NewNotice] = ()
    by: str = "smtp"
    why: str = ""


@dataclass(frozen=True, slots=True)
class Page:
    items: tuple[Held, ...]
    next: str | None  # cursor for the following page (the last id), None at the end


# With no global budget, at most this many events per kind and window are recorded (rows stay
# bounded under a flood from many addresses); per-client budgets still apply to what is recorded.
RATE_ROWS_CAP = 100_000


@dataclass(frozen=True, slots=True)
class Budget:
    """Web rate limits kept in the store (shared by every process and node on it): at most
    `limit` events per client and `global_limit` from all clients together (0 = none) within
    `window` seconds, for one `kind` ("token": unknown-token misses; "login": failed admin
    logins)."""

    kind: str
    limit: int
    window: float
    global_limit: int = 0

    def over(self, mine: int, everyone: int) -> bool:
        return (self.global_limit > 0 and everyone >= self.global_limit) or (
            self.limit > 0 and mine >= self.limit
        )

    def records(self, everyone: int) -> bool:
        """Record one more event (the budget was not over)? Not past the row cap."""
        return everyone < (self.global_limit if self.global_limit > 0 else RATE_ROWS_CAP)


class HeldStore(Protocol):
    """The durable queue. Backends: SqliteStore (embedded), PostgresStore (shared)."""

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def ping(self) -> bool:
        """True when the store answers a trivial query (for /healthz)."""
        ...

    async def put(
        self,
        item: Held,
        raw: bytes,
        tokens: Sequence[NewToken] = (),
        notices: Sequence[NewNotice] = (),
        *,
        by: str = "smtp",
        why: str = "",
    ) -> None:
        """Store message, tokens and notices in one transaction; return only after the commit
        is durable (fsynced): the SMTP 250 depends on it. Raises StoreError otherwise."""
        ...

    async def put_many(self, batch: Sequence[PutRequest]) -> None:
        """Several put()s in one transaction: all durable on return, or none (StoreError)."""
        ...

    async def get(self, msg_id: str) -> Held | None: ...

    async def raw(self, msg_id: str) -> bytes | None:
        """The message bytes as stored (None once a terminal state dropped them)."""
        ...

    async def move(
        self,
        msg_id: str,
        to: State,
        *,
        now: datetime,
        by: str,
        why: str,
        expect: frozenset[State] | None = None,
        notices: Sequence[NewNotice] = (),
        next_attempt: datetime | None = None,
        last_reply: str | None = None,
    ) -> Held:
        """One atomic transition, checked against ALLOWED (and `expect` if given), recorded with
        who/when/why, together with `notices`. Raises TransitionError."""
        ...

    async def redeem(
        self,
        token_hash: bytes,
        to: State,
        *,
        now: datetime,
        action: str,
        by: str,
        why: str,
        notices: Sequence[NewNotice] = (),
    ) -> Held:
        """Use a token up and move its (held) message, atomically. Raises TokenError."""
        ...

    async def token(self, token_hash: bytes) -> tuple[TokenInfo, Held] | None: ...

    async def list_messages(
        self,
        *,
        state: State | None = None,
        sender: str | None = None,
        since: datetime | None = None,
        before: str | None = None,
        limit: int = 50,
    ) -> Page:
        """Newest first; `before` = the cursor of the previous page."""
        ...

    async def count(
        self,
        state: State | None = None,
        *,
        sender: str | None = None,
        since: datetime | None = None,
    ) -> int:
        """Messages matching the filters list_messages takes (its `before` aside)."""
        ...

    async def counts(self) -> dict[str, int]:
        """Messages per state, read in one query (every state present, 0 when empty)."""
        ...

    async def oldest_held(self) -> datetime | None:
        """Arrival time of the oldest message still held (None when none is)."""
        ...

    async def audit(self, msg_id: str) -> list[AuditEntry]: ...

    async def due_held(self, now: datetime, limit: int = 100) -> list[Held]:
        """Held messages whose hold time or deadline has passed."""
        ...

    async def claim_deliveries(
        self, now: datetime, lease_until: datetime, owner: str, limit: int = 20
    ) -> list[Held]:
        """Move due released messages (and delivering ones whose lease ran out: a crashed
        worker) to delivering under a lease, attempts += 1."""
        ...

    async def recover_leases(self, now: datetime) -> int:
        """Let every delivering lease run out now (single-scheduler start-up after a crash)."""
        ...

    async def add_notices(self, notices: Sequence[NewNotice]) -> list[int]:
        """Durably queue notices (committed and fsynced on return); their ids."""
        ...

    async def drop_notices(self, ids: Sequence[int]) -> int:
        """Delete notices not yet sent (the mail they belong to was not delivered after all)."""
        ...

    async def release_parked(self, msg_id: str, now: datetime) -> int:
        """Notices parked for `msg_id` become due (its delivery was accepted upstream)."""
        ...

    async def drop_parked(self, msg_id: str) -> int:
        """Withdraw the notices parked for `msg_id` (it was not delivered)."""
        ...

    async def claim_notices(
        self, now: datetime, lease_until: datetime, limit: int = 20
    ) -> list[PendingNotice]: ...

    async def finish_notice(
        self, notice_id: int, *, now: datetime, sent: bool, reply: str, retry_at: datetime | None
    ) -> None:
        """sent → data scrubbed (links, passwords); retry_at → pending again; else failed."""
        ...

    async def notices_for(self, msg_id: str) -> list[PendingNotice]: ...

    async def rate_hit(self, budget: Budget, client: str) -> bool:
        """One event (a miss) from `client`: True = over the budget already (answer 429, not
        counted); False = counted. Events older than the window are pruned here."""
        ...

    async def rate_blocked(self, budget: Budget, client: str) -> bool:
        """Is `client` (or everyone together) over the budget? Reads only."""
        ...


def ts(d: datetime | None) -> float | None:
    return d.timestamp() if d is not None else None


def dt(x: float | None) -> datetime | None:
    return datetime.fromtimestamp(x, UTC) if x is not None else None
