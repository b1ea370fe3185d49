"""Queue stage, shared by both backends: rows ↔ values and the rules of a move, once.

SqliteStore and PostgresStore differ in SQL dialect and in how a column comes back (SQLite: JSON
text and epoch seconds; PostgreSQL: jsonb and timestamptz already decoded). Everything else —
which columns a Held has, what a move sets, what happens to the bytes and to parked notices when
a message reaches a terminal state, when a token may act — lives here, so the two backends
cannot drift apart. Each backend passes its two decoders (`load` for a JSON column, `when` for a
time column) and renders `MovePlan.assign` in its own placeholder style. (The web's rate-limit
budget, `Budget`, is part of the contract in store.py.)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from mailguard.queue.store import (
    ALLOWED,
    TERMINAL,
    Held,
    NewNotice,
    PendingNotice,
    State,
    TokenError,
    TokenInfo,
    TransitionError,
)

HELD_COLS = (
    "id, state, gate, mail_from, rcpt_tos, queue_id, created, due, on_timeout, envelope, "
    "decision, summary, size, updated, attempts, next_attempt, first_release, lease_until, "
    "last_reply, last_by, last_why"
)
NOTICE_COLS = "id, msg_id, kind, rcpts, data, null_sender, attempts, created, state, last_reply"

WHY_CLAIMED = "delivery attempt"
WHY_TAKEN_OVER = "lease ran out (crash?)"  # a delivering lease that ran out: a node died


class Row(Protocol):
    """sqlite3.Row and asyncpg.Record alike: columns by name."""

    def __getitem__(self, key: str, /) -> Any: ...


def _same(v: Any) -> Any:
    return v


def held_from(
    r: Row, load: Callable[[Any], Any] = _same, when: Callable[[Any], Any] = _same
) -> Held:
    """A Held from a row of HELD_COLS (`load` decodes JSON columns, `when` time columns)."""
    return Held(
        id=r["id"],
        state=State(r["state"]),
        gate=r["gate"],
        mail_from=r["mail_from"],
        rcpt_tos=tuple(load(r["rcpt_tos"])),
        created=when(r["created"]),
        due=when(r["due"]),
        on_timeout=r["on_timeout"],
        queue_id=r["queue_id"],
        envelope=load(r["envelope"]),
        decision=load(r["decision"]),
        summary=load(r["summary"]),
        size=r["size"],
        updated=when(r["updated"]),
        attempts=r["attempts"],
        next_attempt=when(r["next_attempt"]),
        first_release=when(r["first_release"]),
        lease_until=when(r["lease_until"]),
        last_reply=r["last_reply"],
        last_by=r["last_by"],
        last_why=r["last_why"],
    )


def notice_from(
    r: Row, load: Callable[[Any], Any] = _same, when: Callable[[Any], Any] = _same
) -> PendingNotice:
    return PendingNotice(
        id=r["id"],
        msg_id=r["msg_id"],
        kind=r["kind"],
        to=tuple(load(r["rcpts"])),
        data=load(r["data"]),
        null_sender=bool(r["null_sender"]),
        attempts=r["attempts"],
        created=when(r["created"]),
        state=r["state"],
        last_reply=r["last_reply"],
    )


def token_from(r: Row, when: Callable[[Any], Any] = _same) -> TokenInfo:
    return TokenInfo(
        msg_id=r["msg_id"],
        role=r["role"],
        who=r["who"],
        expires=when(r["expires"]),
        used_at=when(r["used_at"]),
        used_for=r["used_for"],
    )


def held_values(item: Held, size: int, by: str, why: str) -> tuple[Any, ...]:
    """The 21 values of HELD_COLS for a new message (JSON/time columns not yet encoded)."""
    return (
        item.id,
        item.state.value,
        item.gate,
        item.mail_from,
        list(item.rcpt_tos),
        item.queue_id,
        item.created,
        item.due,
        item.on_timeout,
        dict(item.envelope),
        dict(item.decision),
        dict(item.summary),
        size,
        item.created,
        item.attempts,
        item.next_attempt,
        item.first_release,
        None,
        "",
        by,
        why,
    )


# Columns of HELD_COLS holding JSON / times (by position in held_values)
HELD_JSON = frozenset({4, 9, 10, 11})
HELD_TIMES = frozenset({6, 7, 13, 15, 16, 17})


@dataclass(frozen=True, slots=True)
class NoticeRow:
    state: str  # "pending", or "parked" until its message is accepted upstream
    delay: float  # parked: seconds after the delivery it becomes due


def notice_row(n: NewNotice) -> NoticeRow:
    parked = n.after_delivery is not None
    if parked and not n.msg_id:
        raise ValueError("a notice parked until delivery needs its message id")
    return NoticeRow(
        "parked" if parked else "pending",
        n.after_delivery.total_seconds() if n.after_delivery is not None else 0.0,
    )


@dataclass(frozen=True, slots=True)
class MovePlan:
    """What one checked move writes: held columns (value None = SQL NULL), then the terminal
    clean-up: drop the bytes; parked notices released (delivered) or withdrawn (any other end)."""

    assign: tuple[tuple[str, Any], ...]
    drop_raw: bool
    parked: str  # "" (not terminal), "release" or "drop"


def plan_move(
    cur: Held | None,
    msg_id: str,
    to: State,
    now: datetime,
    by: str,
    why: str,
    expect: frozenset[State] | None,
    next_attempt: datetime | None,
    last_reply: str | None,
) -> MovePlan:
    """Check a move against ALLOWED (and `expect`) — TransitionError — and say what it writes."""
    if cur is None or to not in ALLOWED[cur.state] or (expect and cur.state not in expect):
        raise TransitionError(msg_id, cur.state if cur else None, to)
    assign: list[tuple[str, Any]] = [
        ("state", to.value),
        ("updated", now),
        ("last_by", by),
        ("last_why", why),
    ]
    if to is State.RELEASED:
        assign.append(("next_attempt", next_attempt or now))
        if cur.first_release is None:
            assign.append(("first_release", now))
    if to in TERMINAL or to is State.RELEASED:
        assign += [("lease_until", None), ("lease_owner", None)]
    if last_reply is not None:
        assign.append(("last_reply", last_reply))
    terminal = to in TERMINAL
    # Content is not kept after the fact (metadata and audit stay); a zip password parked for
    # a message that was not delivered must never go out.
    parked = ("release" if to is State.DELIVERED else "drop") if terminal else ""
    return MovePlan(tuple(assign), terminal, parked)


def check_redeem(info: TokenInfo, held: Held, now: datetime) -> None:
    """May this token act on its message now? TokenError says why not."""
    if info.used_at is not None:
        raise TokenError("used", held)
    if held.state is not State.HELD:
        raise TokenError("decided", held)
    if info.expires <= now:
        raise TokenError("expired", held)


def claim_why(prev: State) -> str:
    return WHY_CLAIMED if prev is State.RELEASED else WHY_TAKEN_OVER


def encode_values(
    values: Sequence[Any], json_out: Callable[[Any], Any], time_out: Callable[[Any], Any]
) -> tuple[Any, ...]:
    """held_values with the JSON and time columns encoded for one backend."""
    return tuple(
        json_out(v) if i in HELD_JSON else time_out(v) if i in HELD_TIMES else v
        for i, v in enumerate(values)
    )
