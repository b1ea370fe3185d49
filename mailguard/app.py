"""Composition: config → the parts of one process, wired together. It builds and connects; the
message path itself is in pipeline.py.

    front (smtp) ──► pipeline ──► relay (upstream)      lookups: history + DNS
                        └──► queue (store) ◄── scheduler ──► pipeline.deliver / notices
                                  ▲
                                 web (confirm pages, admin API, /metrics, /healthz)

One Service per process; the scheduler and the web side run in worker 0 only (one scheduler per
store file). No module-level state.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import socket
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mailguard.analysis import analyze_view
from mailguard.config import Config
from mailguard.envelope import Envelope, Reply
from mailguard.errors import ConfigError
from mailguard.history import DomainHistory
from mailguard.lookups import HistoryBackend, HistoryCache, Lookups
from mailguard.pipeline import Content, Pipeline, Relay, Settings
from mailguard.policy import Policy, builtin_policy, load_policy, warn_uninspected
from mailguard.queue import HoldService
from mailguard.queue.backends import Store, make_store
from mailguard.queue.postgres import PostgresStore
from mailguard.relay.smtp import SmtpTransport
from mailguard.server import Server
from mailguard.smtp import Networks

if TYPE_CHECKING:
    from aiohttp import web

    from mailguard.dns import DomainResolver
    from mailguard.metrics import Metrics
    from mailguard.milter import MilterFront
    from mailguard.scheduler import Scheduler

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


def make_transport(cfg: Config, metrics: Metrics | None = None) -> SmtpTransport:
    u = cfg.upstream
    return SmtpTransport(
        u.address[0],
        u.address[1],
        connect_timeout=u.connect_timeout,
        command_timeout=u.command_timeout,
        data_timeout=u.data_timeout,
        pool_size=u.pool_size,
        idle_timeout=u.idle_timeout,
        max_uses=u.max_uses,
        local_hostname=cfg.smtp.hostname or None,
        on_connect_error=metrics.upstream_connection_errors.inc if metrics else None,
        on_open=metrics.upstream_connections_open.inc if metrics else None,
    )


def make_resolver(cfg: Config, metrics: Metrics | None = None) -> DomainResolver | None:
    if not cfg.dns.enabled:
        return None
    from mailguard.dns import DomainResolver

    return DomainResolver(
        list(cfg.dns.nameservers) or None,
        port=cfg.dns.port,
        timeout=cfg.dns.timeout,
        on_lookup=metrics.dns_lookup if metrics else None,
    )


def public_url(cfg: Config) -> str:
    host, port = cfg.web.listen
    return cfg.web.public_url or f"http://{f'[{host}]' if ':' in host else host}:{port}"


class Upstream:
    """The upstream MTA as every part sends to it; a reload that moves the upstream swaps the
    transport underneath without the parts noticing."""

    def __init__(self, transport: SmtpTransport) -> None:
        self.transport = transport

    async def send(self, env: Envelope, raw: Content, *, wire: bytes | None = None) -> Reply:
        return await self.transport.send(env, raw, wire=wire)

    async def probe(self) -> bool:
        return await self.transport.probe()

    async def swap(self, transport: SmtpTransport) -> None:
        old, self.transport = self.transport, transport
        await old.close()

    async def close(self) -> None:
        await self.transport.close()


class Service:
    """Everything one `mailguard serve` process runs."""

    def __init__(
        self,
        cfg: Config,
        load: Callable[[], Config] | None = None,
        *,
        worker: int = 0,
        reuse_port: bool = False,
        metrics: Metrics | None = None,
        policy: Policy | None = None,
        sock: socket.socket | None = None,
    ) -> None:
        """`load` re-reads the config on SIGHUP; `policy` fixes the policy (tests, `demo`)
        instead of reading cfg.policy.file."""
        self.cfg = cfg
        self._load = load
        self.worker = worker
        self.reuse_port = reuse_port
        self.metrics = metrics
        self._fixed_policy = policy
        self._sock = sock
        self.policy = policy if policy is not None else policy_for(cfg)  # ConfigError early
        self.pipeline: Pipeline | None = None
        self.front: Server | None = None
        self.milter: MilterFront | None = None
        self.upstream: Upstream | None = None
        self.lookups: Lookups | None = None
        self.store: Store | None = None
        self.queue: HoldService | None = None
        self.scheduler: Scheduler | None = None
        self._web: web.AppRunner | None = None
        self._metrics_web: web.AppRunner | None = None
        self._tasks: list[asyncio.Task[None]] = []

    # -- start ---------------------------------------------------------------------------------

    async def start(self) -> None:
        """Build every part; the SMTP port opens last, so no message meets a half-built guard."""
        cfg, m = self.cfg, self.metrics
        self.store = make_store(cfg.store.url or cfg.store.path, pool_size=cfg.store.pool_size)
        history: HistoryBackend
        if isinstance(self.store, PostgresStore):
            from mailguard.history_pg import PgHistory

            # A database that is down at start: mail to be kept gets 451 until it is back.
            opened = await self.store.open_or_retry()
            history = PgHistory(self.store)
        else:
            cfg.store.path.parent.mkdir(parents=True, exist_ok=True)
            history = DomainHistory(cfg.store.path)
            await self.store.open()
            opened = True
        if m is not None:
            m.store_up.set(1 if opened else 0)
        self.lookups = Lookups(HistoryCache(history), make_resolver(cfg, m))
        self.upstream = Upstream(make_transport(cfg, m))
        self.queue = HoldService(
            self.store, public_url=public_url(cfg), lang=cfg.notify.lang, admin=cfg.notify.admin
        )
        relay: Relay = self.upstream
        if cfg.milter.listen is not None:
            from mailguard.milter import MilterRelay

            relay = MilterRelay(self.upstream)  # "relay as received" = Postfix continues
        self.pipeline = Pipeline(
            self.policy,
            self.lookups,
            relay,
            queue=self.queue,
            metrics=m,
            settings=settings_for(cfg),
        )
        _warm_up(self.policy)
        warn_uninspected(self.policy)  # uninspected mail the policy lets out: say so
        self.front = Server(
            cfg,
            self.pipeline.handle,
            reuse_port=self.reuse_port,
            sock=self._sock,
            on_client=m.smtp_connection if m else None,
        )
        if m is not None:
            m.prepare(r.name for r in self.policy.rules)
            m.policy_reload(True)  # the policy in use loaded fine: the gauge says so from start
        if self.worker == 0:
            await self._start_worker0()
        gc.freeze()  # start-up objects (policy, PSL, templates) live for ever: skip them in GC
        await self.front.listen()
        if cfg.milter.listen is not None:
            from mailguard.milter import MilterFront

            self.milter = MilterFront(
                self.pipeline.handle,
                *cfg.milter.listen,
                Networks(cfg.smtp.allowed_networks),
                reuse_port=True,
            )
            await self.milter.listen()

    async def _start_worker0(self) -> None:
        """Scheduler and web side: one process only (one scheduler per store)."""
        from mailguard.notify import Notifier
        from mailguard.scheduler import Scheduler

        cfg = self.cfg
        assert self.store and self.queue and self.pipeline and self.upstream and self.front
        warn_open_networks(cfg)
        notifier = Notifier(
            self.upstream,
            cfg.notify.sender,
            charset=cfg.notify.charset,
            lang=cfg.notify.lang,
            templates_dir=cfg.notify.templates or None,
            public_url=public_url(cfg),
            secret=cfg.web.secret,
            hostname=self.front.hostname,
        )
        self.scheduler = Scheduler(
            self.store,
            self.pipeline,
            notifier,
            metrics=self.metrics,
            lang=cfg.notify.lang,
            reporting_mta=self.front.hostname,
            remote_mta=cfg.upstream.address[0],
            # A shared store: every node schedules; a dead node's leases run out after
            # store.lease (renewed by the store while a delivery is under way).
            **shared_store_scheduling(self.store, cfg),
        )
        self._tasks.append(asyncio.ensure_future(self.scheduler.run()))
        if self.metrics is not None:
            self._tasks.append(asyncio.ensure_future(self._queue_gauges()))
        if cfg.web.enabled:
            from mailguard.web import make_app, start_web

            app = make_app(
                self.store,
                self.queue,
                secret=cfg.web.secret,
                admin_token=cfg.web.admin_token,
                public_url=public_url(cfg),
                lang_default=cfg.notify.lang,
                upstream_check=self.upstream.probe,
                history_check=self._history_ok,
                on_change=self.scheduler.wake,
                min_dwell=cfg.web.min_dwell,
                metrics=self.metrics,
                metrics_access=cfg.web.metrics,
                rate_limit=(cfg.web.miss_limit, cfg.web.miss_window),
                global_miss_limit=cfg.web.miss_limit_global,
                trusted_proxies=cfg.web.trusted_proxies,
                client_ip_header=cfg.web.client_ip_header,
                login_limit=(
                    cfg.web.login_fail_limit,
                    cfg.web.login_fail_limit_global,
                    cfg.web.login_fail_window,
                ),
            )
            self._web = await start_web(app, *cfg.web.listen)
            log.info("web pages and API on %s:%d (links: %s)", *cfg.web.listen, public_url(cfg))
        if self.metrics is not None and cfg.metrics.listen is not None:
            from mailguard.web import make_metrics_app, start_web

            self._metrics_web = await start_web(make_metrics_app(self.metrics), *cfg.metrics.listen)
            log.info("metrics on %s:%d/metrics", *cfg.metrics.listen)

    def _history_ok(self) -> bool | None:
        """For /healthz: the delivery history answered its last read and write (None: none)."""
        h = self.lookups.history if self.lookups is not None else None
        return h.available if h is not None else None

    @property
    def port(self) -> int:
        assert self.front is not None
        return self.front.port

    # -- metrics that are states, not events ----------------------------------------------------

    async def _queue_gauges(self) -> None:
        while True:
            try:
                await self.refresh_queue_gauges()
            except Exception:
                log.exception("queue gauges")
            await asyncio.sleep(15)

    async def refresh_queue_gauges(self) -> None:
        """Messages per state and the oldest held message's age, for /metrics and the alerts."""
        assert self.metrics is not None and self.store is not None
        up = await self.store.ping()
        self.metrics.store_up.set(1 if up else 0)
        if not up:
            return  # the counts keep their last values; mailguard_store_up says why
        counts = await self.store.counts()  # one query: a message moving is counted once
        oldest = await self.store.oldest_held()
        age = (datetime.now(UTC) - oldest).total_seconds() if oldest is not None else None
        self.metrics.set_queue(counts, age)

    # -- reload, stop, run ---------------------------------------------------------------------

    async def reload(self) -> bool:
        """Re-read config and policy; on any error keep the running ones (and say why)."""
        if self._load is None:
            return False
        m = self.metrics
        try:
            cfg = self._load()
        except Exception as e:
            log.error("reload refused, keeping the running configuration: %s", e)
            if m is not None:
                m.config_reload(False)
            return False
        try:
            policy = self._fixed_policy or policy_for(cfg)
        except Exception as e:
            log.error("reload refused, keeping the running policy and configuration: %s", e)
            if m is not None:  # the policy is what failed: only its alert fires
                m.policy_reload(False)
            return False
        if cfg.smtp.listen != self.cfg.smtp.listen:
            log.warning("smtp.listen changed: takes effect at the next restart")
            cfg = replace(cfg, smtp=replace(cfg.smtp, listen=self.cfg.smtp.listen))
        old = self.cfg
        self.cfg, self.policy = cfg, policy
        assert self.front and self.pipeline and self.upstream
        self.front.reload(cfg)
        if self.milter is not None:
            self.milter.networks.update(cfg.smtp.allowed_networks)
        self.pipeline.policy = policy
        self.pipeline.settings = settings_for(cfg)
        if self.queue is not None:
            self.queue.admin = cfg.notify.admin
        if cfg.upstream != old.upstream or cfg.smtp.hostname != old.smtp.hostname:
            await self.upstream.swap(make_transport(cfg, m))
        if m is not None:
            m.prepare(r.name for r in policy.rules)
            m.policy_reload(True)
            m.config_reload(True)
        log.info("configuration reloaded from %s", cfg.source or "defaults")
        return True

    async def stop(self, grace: float = 30.0) -> None:
        """No new connections; transactions in flight finish (bounded); then the rest closes."""
        if self.milter is not None:
            await self.milter.stop(grace)
        if self.front is not None:
            await self.front.stop(grace)
        if self.scheduler is not None:
            await self.scheduler.stop()
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._web is not None:
            await self._web.cleanup()
        if self._metrics_web is not None:
            await self._metrics_web.cleanup()
        if self.upstream is not None:
            await self.upstream.close()
        if self.lookups is not None:  # first: its last flush may write through the store
            await self.lookups.close()
        if self.store is not None:
            await self.store.close()

    async def run(self, *, grace: float = 30.0) -> int:
        """Start and serve until SIGTERM/SIGINT; SIGHUP reloads. Returns the exit code."""
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        started = asyncio.Event()

        async def reload_when_started() -> None:
            await started.wait()
            await self.reload()

        # Before start(): the port is open (and mail flows) while start() still awaits.
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(reload_when_started()))
        await self.start()
        started.set()
        await stop.wait()
        log.info("stopping: no new connections, finishing transactions in flight")
        await self.stop(grace)
        log.info("stopped")
        return 0


def warn_open_networks(cfg: Config) -> None:
    """A warning at start when smtp.allowed_networks lets every address in (0.0.0.0/0, ::/0)."""
    import ipaddress

    for net in cfg.smtp.allowed_networks:
        if ipaddress.ip_network(net, strict=False).prefixlen == 0:
            log.warning(
                "smtp.allowed_networks contains %s: any host that reaches the SMTP port can "
                "inject mail (open relay); list Postfix's address instead",
                net,
            )


def shared_store_scheduling(store: Store, cfg: Config) -> dict[str, Any]:
    """Scheduler settings for a store several nodes share (none for the embedded one)."""
    if not isinstance(store, PostgresStore):
        return {}
    return {"lease": timedelta(seconds=cfg.store.lease), "recover_on_start": False}


def settings_for(cfg: Config) -> Settings:
    return Settings(
        secret=cfg.web.secret.encode(),
        lang=cfg.notify.lang,
        log_addresses=cfg.log.log_addresses,
        json_log=cfg.log.json,
        notify_senders=cfg.notify.senders,
    )


def _warm_up(policy: Policy) -> None:
    """Load the Public Suffix List and friends now, not on the first message (≈ 0.3 s)."""
    from mailguard.message import MessageView

    env = Envelope("a@example.com", ["b@example.org"])
    view = MessageView.parse(b"From: a@example.com\r\nTo: b@example.org\r\n\r\nx\r\n", env)
    analyze_view(view, env, policy)


def build_server(
    cfg: Config,
    reload_cfg: Callable[[], Config] | None = None,
    *,
    worker: int = 0,
    reuse_port: bool = False,
    metrics: Metrics | None = None,
) -> Service:
    """Validate config + policy (ConfigError on trouble) and build the Service for one process."""
    return Service(cfg, reload_cfg, worker=worker, reuse_port=reuse_port, metrics=metrics)


__all__ = ["ConfigError", "Service", "Upstream", "build_server", "policy_for"]
