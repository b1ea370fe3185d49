"""Composition: config → policy, checks context, rewrites, relay, queue, web: one Service a process.

No module-level state: everything a process needs is built here from the config and passed in.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mailguard.analysis import Analysis, analyze_view
from mailguard.config import Config
from mailguard.envelope import Envelope
from mailguard.errors import ConfigError
from mailguard.guard import Outcome
from mailguard.message.addresses import parse_envelope
from mailguard.policy import Policy, builtin_policy, load_policy
from mailguard.policy.decision import PASS, Decision
from mailguard.server import Server

if TYPE_CHECKING:
    from mailguard.dns import DomainResolver
    from mailguard.history import DomainHistory
    from mailguard.message import MessageView
    from mailguard.metrics import Metrics

log = logging.getLogger("mailguard.app")

# The policy used when the config names none: the shipped default next to the package (source
# checkout), else the built-in equivalent.
SHIPPED_POLICY = Path(__file__).resolve().parent.parent / "policies" / "default.toml"


def policy_for(cfg: Config) -> Policy:
    if cfg.policy.file:
        return load_policy(cfg.policy.file)
    if SHIPPED_POLICY.is_file():
        return load_policy(SHIPPED_POLICY)
    return builtin_policy()


def recipient_domains(view: MessageView) -> set[str]:
    """Every recipient domain of a message: headers and envelope (A-labels)."""
    out = {a.domain for a in (*view.to, *view.cc, *view.bcc) if a.domain}
    if view.envelope is not None:
        out.update(a.domain for a in parse_envelope(view.envelope.rcpt_tos) if a.domain)
    return out


class HistoryCache:
    """Delivery history as the checks see it, cheap per message.

    Counts are cached per domain (a minute) so the hot path rarely touches SQLite; deliveries are
    recorded in batches by a background task (losing a few counts in a crash is harmless — a
    domain would at worst look first-time once more).
    """

    def __init__(self, history: DomainHistory, *, ttl: float = 60.0, flush_every: float = 2.0):
        self.history = history
        self.ttl = ttl
        self.flush_every = flush_every
        self._counts: dict[str, tuple[int, float]] = {}
        self._pending: list[tuple[set[str], datetime]] = []
        self._task: asyncio.Task[None] | None = None

    async def snapshot(self, domains: Iterable[str]) -> Any:
        from mailguard.history import HistorySnapshot

        now = time.monotonic()
        known: dict[str, int] = {}
        missing = []
        for d in domains:
            hit = self._counts.get(d)
            if hit is not None and now - hit[1] < self.ttl:
                known[d] = hit[0]
            else:
                missing.append(d)
        if missing:
            fresh = await asyncio.to_thread(self.history.counts, missing)
            for d in missing:
                n = fresh.get(d, 0)
                self._counts[d] = (n, now)
                known[d] = n
        frequent = self.history.frequent_cached(now)  # no thread hop per message …
        if frequent is None:
            frequent = await asyncio.to_thread(self.history.frequent)  # … SQL every few minutes
        return HistorySnapshot(known, frequent)

    def record(self, domains: set[str]) -> None:
        if not domains:
            return
        self._pending.append((domains, datetime.now(UTC)))
        now = time.monotonic()
        for d in domains:  # the next message to d is no longer first-time
            n, _ = self._counts.get(d, (0, now))
            self._counts[d] = (n + 1, now)
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._flush_later())

    async def _flush_later(self) -> None:
        await asyncio.sleep(self.flush_every)
        await self.flush()

    async def flush(self) -> None:
        batch, self._pending = self._pending, []
        if batch:
            try:
                await asyncio.to_thread(self.history._record_many, batch)
            except Exception:
                log.exception("history: could not record %d deliveries", len(batch))

    async def close(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
        await self.flush()
        self.history.close()


@dataclass(slots=True)
class Bundle:
    """What a (re)load produces: the config, the policy and the analyzer built on them."""

    cfg: Config
    policy: Policy
    analyzer: Callable[[MessageView], Any]


def make_analyzer(
    policy: Policy,
    *,
    history: HistoryCache | None = None,
    resolver: DomainResolver | None = None,
    secret: str = "",
) -> Callable[[MessageView], Any]:
    """view → Analysis: look up what the checks need (I/O), then the pure checks and policy."""
    from mailguard.notify import is_own_notice

    async def analyze(view: MessageView) -> Analysis | Decision:
        env = view.envelope
        assert env is not None
        # the guard's own notices (sealed with the secret) are not guarded again
        if secret and view.header("X-MailGuard-Notice") and is_own_notice(bytes(view.raw), secret):
            return PASS
        hist = dns = None
        if history is not None or resolver is not None:
            domains = recipient_domains(view)
            if history is not None:
                hist = await history.snapshot(domains)
            if resolver is not None:
                dns = await resolver.statuses(d for d in domains if not policy.org.is_internal(d))
        return analyze_view(view, env, policy, history=hist, dns=dns)

    return analyze


async def rewrite(raw: bytes, view: MessageView, decision: Decision) -> tuple[bytes, Any]:
    """Apply the decision's transforms (bcc, zip) off the event loop."""
    from mailguard.actions import apply_all
    from mailguard.message import MessageView as MV

    env = view.envelope

    def reparse(b: bytes) -> MessageView:
        return MV.parse(b, env)

    result = await asyncio.to_thread(
        apply_all, raw, view, decision.transforms, decision.options, reparse=reparse
    )
    return result.raw, result


class Service(Server):
    """Server + the stages around it: history, DNS, metrics, log lines."""

    def __init__(
        self,
        cfg: Config,
        reload_cfg: Callable[[], Config],
        *,
        worker: int = 0,
        reuse_port: bool = False,
        metrics: Metrics | None = None,
    ) -> None:
        super().__init__(cfg, load=self._load_bundle, reuse_port=reuse_port)
        self._reload_cfg = reload_cfg
        self.worker = worker
        self.metrics = metrics
        self.history: HistoryCache | None = None
        self.resolver: DomainResolver | None = None
        self.bundle: Bundle | None = None
        self.store: Any = None
        self.hold: Any = None
        self.notifier: Any = None
        self.scheduler: Any = None
        self._web: Any = None
        self._tasks: list[asyncio.Future[Any]] = []
        self.observers.append(self._log_and_count)

    def _load_bundle(self) -> tuple[Config, Any]:
        cfg = self._reload_cfg()
        policy = policy_for(cfg)
        if self.history is None:
            from mailguard.history import DomainHistory

            cfg.store.path.parent.mkdir(parents=True, exist_ok=True)
            self.history = HistoryCache(DomainHistory(cfg.store.path))
        if cfg.dns.enabled and self.resolver is None:
            from mailguard.dns import DomainResolver

            self.resolver = DomainResolver(
                list(cfg.dns.nameservers) or None, port=cfg.dns.port, timeout=cfg.dns.timeout
            )
        analyzer = make_analyzer(
            policy, history=self.history, resolver=self.resolver, secret=cfg.web.secret
        )
        self.bundle = Bundle(cfg, policy, analyzer)
        if self.metrics is not None:
            self.metrics.prepare(r.name for r in policy.rules)
        return cfg, analyzer

    async def send(self, env: Envelope, raw: Any, *, wire: bytes | None = None) -> Any:
        """The current upstream transport (it is replaced when a reload changes the upstream)."""
        assert self.transport is not None
        return await self.transport.send(env, raw, wire=wire)

    async def start(self) -> None:
        from mailguard.queue import HoldService, SqliteStore

        # Everything a message needs is ready before the port opens: no 451 during start-up.
        self.build()
        cfg = self.cfg
        assert self.guard is not None and self.bundle is not None
        self.guard.rewrite = rewrite
        self._warm_up(self.bundle.policy)
        self.store = SqliteStore(cfg.store.path)
        await self.store.open()
        host, port = cfg.web.listen
        public_url = cfg.web.public_url or f"http://{f'[{host}]' if ':' in host else host}:{port}"
        self.hold = HoldService(self.store, public_url=public_url)
        self.guard.keeper = self.hold
        if self.worker == 0:
            await self._start_worker0(cfg, public_url)
        gc.freeze()  # start-up objects (policy, PSL, templates) live for ever: skip them in GC
        await self.listen()

    async def _start_worker0(self, cfg: Config, public_url: str) -> None:
        """Scheduler and web side run in one process only (one scheduler per store)."""
        from mailguard.notify import Notifier
        from mailguard.scheduler import Scheduler

        self.notifier = Notifier(
            self,
            cfg.notify.sender,
            charset=cfg.notify.charset,
            lang=cfg.notify.lang.split("+")[0],
            templates_dir=cfg.notify.templates or None,
            public_url=public_url,
            secret=cfg.web.secret,
            hostname=self._hostname,
        )
        self.scheduler = Scheduler(self.store, self, self.notifier, reporting_mta=self._hostname)
        self._tasks.append(asyncio.ensure_future(self.scheduler.run()))
        self._tasks.append(asyncio.ensure_future(self._queue_gauges()))
        if cfg.web.enabled:
            from aiohttp import web

            from mailguard.web import make_app, start_web

            app = make_app(
                self.store,
                self.hold,
                secret=cfg.web.secret,
                admin_token=cfg.web.admin_token,
                public_url=public_url,
                lang_default=cfg.notify.lang.split("+")[0],
                upstream_check=self._probe,
                on_change=self.scheduler.wake,
                min_dwell=cfg.web.min_dwell,
            )
            if self.metrics is not None:
                metrics = self.metrics

                async def render(request: web.Request) -> web.Response:
                    body, ctype = metrics.render()
                    return web.Response(body=body, headers={"Content-Type": ctype})

                app.router.add_get("/metrics", render)
            self._web = await start_web(app, *cfg.web.listen)
            log.info("web pages and API on %s:%d (links: %s)", *cfg.web.listen, public_url)

    async def _probe(self) -> bool:
        return self.transport is not None and await self.transport.probe()

    async def _queue_gauges(self) -> None:
        while self.metrics is not None:
            try:
                await self.refresh_queue_gauges()
            except Exception:
                log.exception("queue gauges")
            await asyncio.sleep(15)

    async def refresh_queue_gauges(self) -> None:
        """Messages per state and the oldest held message's age, for /metrics and the alerts."""
        from mailguard.queue import State

        assert self.metrics is not None
        counts = {st.value: await self.store.count(st) for st in State}
        oldest = await self.store.oldest_held()
        age = (datetime.now(UTC) - oldest).total_seconds() if oldest is not None else None
        self.metrics.set_queue(counts, age)

    @staticmethod
    def _warm_up(policy: Policy) -> None:
        """Load the Public Suffix List and friends now, not on the first message (≈ 0.3 s)."""
        from mailguard.message import MessageView

        env = Envelope("a@example.com", ["b@example.org"])
        view = MessageView.parse(b"From: a@example.com\r\nTo: b@example.org\r\n\r\nx\r\n", env)
        analyze_view(view, env, policy)

    async def reload(self) -> bool:
        ok = await super().reload()
        if self.metrics is not None:
            self.metrics.policy_reload(ok)
            self.metrics.config_reload(ok)
        return ok

    async def stop(self, grace: float = 30.0) -> None:
        await super().stop(grace)
        if self.scheduler is not None:
            await self.scheduler.stop()
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._web is not None:
            await self._web.cleanup()
        if self.store is not None:
            await self.store.close()
        if self.history is not None:
            await self.history.close()

    def _log_and_count(self, env: Envelope, out: Outcome) -> None:
        from mailguard.logfmt import message_log_line

        cfg = self.cfg
        view = out.view
        decision = out.decision
        codes = [f.code for f in out.findings]
        action = decision.action if decision is not None else "error"
        delivered = out.reply.ok and decision is not None and decision.action == "pass"
        if delivered and self.history is not None:
            blocks = getattr(out.verdict, "blocks", None)
            if blocks and "domains" in blocks:  # the domain check listed every recipient domain
                self.history.record(set(blocks["domains"]))
            elif view is not None:
                self.history.record(recipient_domains(view))
        if self.metrics is not None:
            m = self.metrics
            m.observe_message(
                action if out.reply.code < 400 or action in ("reject",) else "tempfail",
                rules=decision.rules if decision else (),
                codes=codes,
                transforms=decision.transforms if decision else (),
                size=view.size if view else None,
            )
            for stage, secs in out.stages.items():
                m.stage_seconds.labels(stage).observe(secs)
            if "relay" in out.stages:
                m.relay_result(out.reply.code)
            m.smtp_reply(out.reply.code)
        if not log.isEnabledFor(logging.INFO):
            return
        line = message_log_line(
            queue_id=env.queue_id,
            mg_id=out.id,
            message_id=(view.message_id or "") if view else "",
            decision=action,
            rules=decision.rules if decision else (),
            codes=codes,
            transforms=decision.transforms if decision else (),
            size=view.size if view else 0,
            recipients=len(env.rcpt_tos),
            elapsed=sum(out.stages.values()),
            reply=out.reply.code,
            sender=env.mail_from,
            rcpts=env.rcpt_tos,
            log_addresses=cfg.log.log_addresses,
            json=cfg.log.json,
        )
        log.info("%s", line)


def build_server(
    cfg: Config,
    reload_cfg: Callable[[], Config],
    *,
    worker: int = 0,
    reuse_port: bool = False,
    dry_run: bool = False,
    metrics: Metrics | None = None,
) -> Service:
    """Validate config + policy (ConfigError on trouble) and build the Service for one process."""
    policy_for(cfg)  # refuse a bad policy before anything starts
    return Service(cfg, reload_cfg, worker=worker, reuse_port=reuse_port, metrics=metrics)


__all__ = ["ConfigError", "Service", "build_server", "make_analyzer", "policy_for"]
