"""Scheduler stage: release due holds, expire confirmations, deliver released mail, send notices.

One `tick(now)` does one pass; `run()` ticks every `interval` seconds until `stop()`. Tests call
`tick()` with a controlled clock.

Delivery is at-least-once. A message is leased (state delivering, lease_until) before it is
handed to the upstream; "delivered" is committed right after the upstream's 250. If the process
dies between those two moments, the lease runs out (or `run()` recovers leases at start, since one
scheduler owns a SQLite file) and the message is sent again: at most one duplicate per crash per
message, and only for a crash inside that window (one SQLite commit long). Leases are longer than
any delivery can take (upstream data_timeout), so a live worker never loses its lease.

The store may be unreachable for a while (a shared PostgreSQL restarting): a tick that cannot
reach it is logged and retried with a back-off (at most `STORE_RETRY_MAX` apart), and a store
write that records what already happened upstream (delivered, deferred, a notice sent) is retried
until it commits, never skipped: a delivery whose outcome is not recorded keeps its lease (renewed
when the store is back) and is recorded then; only if this process dies meanwhile does the lease
run out and the message go again (the at-least-once bound).

Upstream 4xx / connection trouble → back to released with exponential back-off (base · 2^(n-1),
capped); 5xx, or still failing `max_age` after release → failed + RFC 3464 bounce to the sender
— to the sender the organisation owns only: for a null sender (a bounce of a bounce, as Postfix's
double bounce) or a foreign one it goes to the admin (`notify.admin`, stored with the message).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from mailguard.envelope import Envelope, Reply
from mailguard.errors import StoreError
from mailguard.notify.render import Notifier
from mailguard.queue.dsn import build_dsn, header_block
from mailguard.queue.service import outcome_notice, route_of
from mailguard.queue.store import (
    Held,
    HeldStore,
    NewNotice,
    PendingNotice,
    State,
    TransitionError,
    utcnow,
)

if TYPE_CHECKING:
    from mailguard.metrics import Metrics

log = logging.getLogger("mailguard.scheduler")
T = TypeVar("T")

STORE_RETRY_MAX = 5.0  # seconds between two attempts while the store is unreachable


class Delivery(Protocol):
    """The pipeline's second half: relay a released message (and learn from its delivery)."""

    async def deliver(self, msg_id: str, env: Envelope, raw: bytes) -> Reply: ...


class Scheduler:
    def __init__(
        self,
        store: HeldStore,
        delivery: Delivery,
        notifier: Notifier,
        *,
        metrics: Metrics | None = None,
        lang: str = "ja",
        remote_mta: str = "",
        clock: Callable[[], datetime] = utcnow,
        interval: float = 1.0,
        lease: timedelta = timedelta(minutes=10),
        backoff: timedelta = timedelta(minutes=1),
        backoff_max: timedelta = timedelta(hours=1),
        max_age: timedelta = timedelta(days=5),  # Postfix's maximal_queue_lifetime
        batch: int = 20,
        concurrency: int = 4,
        reporting_mta: str = "",
        recover_on_start: bool = True,
    ) -> None:
        self.store = store
        self.delivery = delivery
        self.notifier = notifier
        self.metrics = metrics
        self.lang = lang  # outcome notices whose message names no language
        self.remote_mta = remote_mta
        self.clock = clock
        self.interval = interval
        self.lease = lease
        self.backoff = backoff
        self.backoff_max = backoff_max
        self.max_age = max_age
        self.batch = batch
        self.reporting_mta = reporting_mta or socket.getfqdn()
        self.recover_on_start = recover_on_start
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{id(self):x}"
        self._sem = asyncio.Semaphore(concurrency)
        self._stop = asyncio.Event()
        self._wake = asyncio.Event()

    # -- loop ----------------------------------------------------------------------------------

    async def run(self) -> None:
        self._stop.clear()
        if self.recover_on_start:
            n = await self.store.recover_leases(self.clock())
            if n:
                log.warning("recovered %d delivery lease(s) left by a previous run", n)
        wait = self.interval
        while not self._stop.is_set():
            try:
                await self.tick()
                if wait != self.interval:
                    log.warning("scheduler: store available again")
                wait = self.interval
            except StoreError as e:  # the store is down: say so once, then back off quietly
                if wait == self.interval:
                    log.error("scheduler: store unavailable, retrying: %s", e)
                wait = min(max(wait * 2, self.interval), max(STORE_RETRY_MAX, self.interval))
            except Exception:
                log.exception("scheduler tick failed; retrying in %.1fs", self.interval)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), wait)
            self._wake.clear()

    def wake(self) -> None:
        """Run the next tick now (after a release from the web page, say)."""
        self._wake.set()

    async def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    async def _until_stored(self, what: str, fn: Callable[[], Awaitable[T]]) -> T:
        """Run a store call that must not be skipped, retrying while the store is unreachable
        (StoreError) until it commits or the scheduler stops (then the error propagates)."""
        wait = min(0.5, STORE_RETRY_MAX)
        logged = False
        while True:
            try:
                out = await fn()
            except StoreError as e:
                if self._stop.is_set():
                    raise
                if not logged:
                    log.error("%s: store unavailable, retrying until it answers: %s", what, e)
                    logged = True
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), wait)
                wait = min(wait * 2, STORE_RETRY_MAX)
                continue
            if logged:
                log.warning("%s: recorded after the store came back", what)
            return out

    async def tick(self, now: datetime | None = None) -> dict[str, int]:
        """One pass over everything due at `now`; returns counts for logs and tests."""
        now = now or self.clock()
        stats = {
            "released": 0,
            "expired": 0,
            "delivered": 0,
            "deferred": 0,
            "failed": 0,
            "notices": 0,
        }
        for held in await self.store.due_held(now, limit=self.batch * 5):
            await self._timeout(held, now, stats)
        while True:
            claimed = await self.store.claim_deliveries(
                now, now + self.lease, self.owner, limit=self.batch
            )
            if not claimed:
                break
            await asyncio.gather(*(self._deliver(h, now, stats) for h in claimed))
            if len(claimed) < self.batch:
                break
        while True:
            pending = await self.store.claim_notices(now, now + self.lease, limit=self.batch)
            if not pending:
                break
            await asyncio.gather(*(self._notice(n, now, stats) for n in pending))
            if len(pending) < self.batch:
                break
        return stats

    # -- holds and deadlines -------------------------------------------------------------------

    async def _timeout(self, held: Held, now: datetime, stats: dict[str, int]) -> None:
        try:
            if held.gate == "hold":
                await self.store.move(
                    held.id,
                    State.RELEASED,
                    now=now,
                    by="scheduler",
                    why="hold time over",
                    expect=frozenset({State.HELD}),
                )
                stats["released"] += 1
            elif held.on_timeout == "send":
                notices = outcome_notice(
                    held,
                    "sent-on-timeout",
                    now=now,
                    lang=self.lang,
                    by="scheduler",
                    why="no answer by the deadline",
                )
                await self.store.move(
                    held.id,
                    State.RELEASED,
                    now=now,
                    by="scheduler",
                    why="deadline passed: policy sends",
                    expect=frozenset({State.HELD}),
                    notices=notices,
                )
                stats["released"] += 1
            else:
                notices = outcome_notice(
                    held, "expired", now=now, lang=self.lang, why="no answer by the deadline"
                )
                await self.store.move(
                    held.id,
                    State.EXPIRED,
                    now=now,
                    by="scheduler",
                    why="deadline passed: policy cancels",
                    expect=frozenset({State.HELD}),
                    notices=notices,
                )
                stats["expired"] += 1
        except TransitionError:
            return  # decided meanwhile (a click, the CLI): nothing to do
        log.info(
            "%s: %s",
            held.id,
            "released (hold over)" if held.gate == "hold" else f"deadline: {held.on_timeout}",
        )

    # -- delivery ------------------------------------------------------------------------------

    def _backoff(self, attempts: int) -> timedelta:
        step: timedelta = self.backoff * (2 ** max(0, min(attempts - 1, 20)))
        return min(step, self.backoff_max)

    async def _deliver(self, held: Held, now: datetime, stats: dict[str, int]) -> None:
        async with self._sem:
            raw = await self._until_stored(held.id, lambda: self.store.raw(held.id))
            if raw is None:  # cannot happen for a non-terminal message; never mark it delivered
                log.error("%s: bytes missing; failing it", held.id)
                await self._fail(
                    held, b"", Reply(554, "5.3.0 MailGuard: stored copy missing"), now, stats
                )
                return
            e = held.envelope
            env = Envelope(
                mail_from=held.mail_from,
                rcpt_tos=list(held.rcpt_tos),
                mail_options=list(e.get("mail_options", [])),
                rcpt_options=[list(o) for o in e.get("rcpt_options", [])],
                xforward=dict(e.get("xforward", {})),
                client_addr=str(e.get("client_addr", "")),
            )
            try:
                reply = await self.delivery.deliver(held.id, env, raw)
            except Exception as exc:  # the seam promises not to raise; be safe anyway
                log.exception("%s: transport raised", held.id)
                reply = Reply(451, f"4.3.0 transport error: {type(exc).__name__}")
            last = f"{reply.code} {reply.text}"[:500]
            if reply.ok:
                done = self.clock()
                try:
                    await self._until_stored(
                        f"{held.id}: delivered",
                        lambda: self.store.move(
                            held.id,
                            State.DELIVERED,
                            now=done,
                            by="scheduler",
                            why="upstream accepted",
                            last_reply=last,
                        ),
                    )
                except TransitionError as e:  # another node took it over meanwhile (lease ran out)
                    log.warning("%s: delivered, already recorded elsewhere: %s", held.id, e)
                stats["delivered"] += 1
                log.info("%s: delivered: %s", held.id, last)
                return
            first = held.first_release or now
            if reply.code < 500 and now - first < self.max_age:
                retry = now + self._backoff(held.attempts)
                await self._until_stored(
                    f"{held.id}: deferred",
                    lambda: self.store.move(
                        held.id,
                        State.RELEASED,
                        now=now,
                        by="scheduler",
                        why=f"deferred: {last}",
                        next_attempt=retry,
                        last_reply=last,
                    ),
                )
                stats["deferred"] += 1
                log.warning(
                    "%s: deferred (attempt %d, retry %s): %s",
                    held.id,
                    held.attempts,
                    retry.isoformat(timespec="seconds"),
                    last,
                )
                return
            if reply.code < 500:
                reply = Reply(reply.code, f"{reply.text} (gave up after {self.max_age})")
            await self._fail(held, raw, reply, now, stats)

    async def _fail(
        self, held: Held, raw: bytes, reply: Reply, now: datetime, stats: dict[str, int]
    ) -> None:
        last = f"{reply.code} {reply.text}"[:500]
        notices: list[NewNotice] = []
        to, why = route_of(held)  # never bounce a bounce, nor to a forged sender: the admin
        if to:
            data: dict[str, Any] = {
                "id": held.id,
                "rcpts": list(held.rcpt_tos),
                "code": reply.code,
                "text": reply.text,
                "arrival": held.created.isoformat(),
                "last_attempt": now.isoformat(),
                "headers_b64": base64.b64encode(header_block(raw)).decode(),
                "sender": held.mail_from,
                "about": why,  # "" = to the sender; else why the admin gets it
            }
            notices.append(NewNotice("dsn", (to,), data, now, null_sender=True, msg_id=held.id))
        await self._until_stored(
            f"{held.id}: failed",
            lambda: self.store.move(
                held.id,
                State.FAILED,
                now=now,
                by="scheduler",
                why=f"permanent failure: {last}",
                last_reply=last,
                notices=notices,
            ),
        )
        stats["failed"] += 1
        log.warning(
            "%s: failed, bounce %s: %s",
            held.id,
            ("queued" + (f" for the admin ({why})" if why else ""))
            if notices
            else f"not sent ({why}, no notify.admin)",
            last,
        )

    # -- notices -------------------------------------------------------------------------------

    def _render(self, n: PendingNotice) -> bytes:
        if n.kind == "dsn":
            d = n.data
            raw = build_dsn(
                reporting_mta=self.reporting_mta,
                postmaster=self.notifier.sender,
                to=n.to[0],
                msg_id=str(d["id"]),
                rcpts=list(d["rcpts"]),
                code=int(d["code"]),
                text=str(d["text"]),
                arrival=datetime.fromisoformat(d["arrival"]),
                last_attempt=datetime.fromisoformat(d["last_attempt"]),
                original_headers=base64.b64decode(d["headers_b64"]),
                remote_mta=self.remote_mta,
                note=_admin_note(str(d.get("about") or ""), str(d.get("sender") or "")),
            )
            return self.notifier.seal("dsn", raw)
        lang = n.data.get("lang") or None
        return self.notifier.render(n.kind, n.to, n.data, lang=str(lang) if lang else None)

    async def _notice(self, n: PendingNotice, now: datetime, stats: dict[str, int]) -> None:
        async with self._sem:
            try:
                raw = self._render(n)
            except Exception as e:
                log.exception("notice %d (%s, id=%s): cannot render", n.id, n.kind, n.msg_id)
                err = f"render error: {e}"[:500]
                await self._until_stored(
                    f"notice {n.id}",
                    lambda: self.store.finish_notice(
                        n.id, now=now, sent=False, reply=err, retry_at=None
                    ),
                )
                return
            try:
                reply = await self.notifier.send_raw(
                    raw, n.to, null_sender=n.null_sender, msg_id=n.msg_id or "-"
                )
            except Exception as exc:  # the seam promises not to raise; be safe anyway
                log.exception("notice %d (%s): transport raised", n.id, n.kind)
                reply = Reply(451, f"4.3.0 transport error: {type(exc).__name__}")
            last = f"{reply.code} {reply.text}"[:500]
            if reply.ok:
                await self._until_stored(
                    f"notice {n.id}: sent",
                    lambda: self.store.finish_notice(
                        n.id, now=now, sent=True, reply=last, retry_at=None
                    ),
                )
                stats["notices"] += 1
                if self.metrics is not None:
                    self.metrics.notice_sent(n.kind)
                log.info("%s: notice %d (%s) sent", n.msg_id or "-", n.id, n.kind)
                return
            age = now - n.created
            retry = (
                now + self._backoff(n.attempts) if reply.temporary and age < self.max_age else None
            )
            await self._until_stored(
                f"notice {n.id}",
                lambda: self.store.finish_notice(
                    n.id, now=now, sent=False, reply=last, retry_at=retry
                ),
            )
            log.warning(
                "notice %d (%s, id=%s) %s: %s",
                n.id,
                n.kind,
                n.msg_id,
                "deferred" if retry else "failed",
                last,
            )


def _admin_note(why: str, sender: str) -> str:
    """The DSN's line for the admin: why they, not the sender, get it."""
    if why == "null-sender":
        return "To the admin: the message had a null sender (MAIL FROM:<>)."
    if why:
        return f"To the admin: the sender {sender!r} is not one the organisation owns ({why})."
    return ""
