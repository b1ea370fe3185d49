"""The running service: builds every stage from the config and owns their life cycle.

start → serve → (SIGHUP: reload config and policy, keep the old ones if the new ones are bad)
→ SIGTERM: stop accepting, close idle connections, let transactions in flight finish (bounded),
close the rest, exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from mailguard.config import Config
from mailguard.envelope import Envelope, Reply
from mailguard.errors import ConfigError
from mailguard.guard import Analyzer, Guard, Outcome
from mailguard.relay.smtp import SmtpTransport
from mailguard.smtp import FrontHandler, GuardSMTP, Incoming, Networks

log = logging.getLogger("mailguard.server")


def make_transport(cfg: Config) -> SmtpTransport:
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
    )


class Server:
    """One process's SMTP front (plus, in worker 0, the web side and the scheduler)."""

    def __init__(
        self,
        cfg: Config,
        *,
        load: Callable[[], tuple[Config, Analyzer]] | None = None,
        analyzer: Analyzer | None = None,
        reuse_port: bool = False,
        sock: socket.socket | None = None,
    ) -> None:
        """`load` re-reads config and policy (used at start and on SIGHUP); tests may pass a
        fixed `analyzer` instead."""
        self.cfg = cfg
        self._load = load
        self._analyzer = analyzer
        self.reuse_port = reuse_port
        self._sock = sock
        self._server: asyncio.Server | None = None
        self._protocols: set[GuardSMTP] = set()
        self._stopped = asyncio.Event()
        self.transport: SmtpTransport | None = None
        self.guard: Guard | None = None
        self.observers: list[Callable[[Envelope, Outcome], None]] = []

    # -- building -------------------------------------------------------------------------
    def _parse(self, content: Any, env: Envelope) -> Any:
        from mailguard.message import MessageView

        return MessageView.parse(content, env)

    def _observe(self, env: Envelope, outcome: Outcome) -> None:
        for obs in self.observers:
            obs(env, outcome)

    async def _process(self, env: Envelope, msg: Incoming) -> Reply:
        assert self.guard is not None
        return await self.guard.process(env, msg)

    def _factory(self) -> GuardSMTP:
        s = self.cfg.smtp
        proto = GuardSMTP(
            self._handler,
            networks=self._networks,
            spool_threshold=s.spool_threshold,
            spool_dir=s.spool_dir or None,
            xforward=s.xforward,
            min_data_rate=s.min_data_rate,
            data_size_limit=s.max_message_size or None,
            hostname=self._hostname,
            ident="MailGuard",
            timeout=s.timeout,
        )
        proto.on_connection = self._track  # type: ignore[attr-defined]
        return proto

    def _track(self, proto: GuardSMTP, opened: bool) -> None:
        if opened:
            self._protocols.add(proto)
        else:
            self._protocols.discard(proto)

    # -- life cycle -----------------------------------------------------------------------
    async def start(self) -> None:
        self.build()
        await self.listen()

    def build(self) -> None:
        """Load config and policy and build the pipeline; nothing listens yet."""
        if self._load is not None:
            self.cfg, self._analyzer = self._load()
        assert self._analyzer is not None, "an analyzer or a loader is required"
        self._networks = Networks(self.cfg.smtp.allowed_networks)
        self._hostname = self.cfg.smtp.hostname or socket.getfqdn()  # aiosmtpd: per connection
        self._handler = FrontHandler(self._process, max_recipients=self.cfg.smtp.max_recipients)
        self.transport = make_transport(self.cfg)
        self.guard = Guard(
            self.transport, parse=self._parse, analyze=self._analyzer, observe=self._observe
        )

    async def listen(self) -> None:
        """Open the SMTP port: mail flows from here on."""
        loop = asyncio.get_running_loop()
        if self._sock is not None:
            self._server = await loop.create_server(self._factory, sock=self._sock)
        else:
            host, port = self.cfg.smtp.listen
            self._server = await loop.create_server(
                self._factory, host or None, port, reuse_port=self.reuse_port or None
            )
        log.info(
            "listening on %s, upstream %s:%s",
            ", ".join(str(s.getsockname()[:2]) for s in self._server.sockets),
            *self.cfg.upstream.address,
        )

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def reload(self) -> bool:
        """Re-read config and policy; on any error keep the running ones (and say why)."""
        if self._load is None:
            return False
        try:
            cfg, analyzer = self._load()
        except ConfigError as e:
            log.error("reload refused, keeping the running configuration: %s", e)
            return False
        except Exception as e:
            log.exception("reload failed, keeping the running configuration: %s", e)
            return False
        if cfg.smtp.listen != self.cfg.smtp.listen:
            log.warning("smtp.listen changed: takes effect at the next restart")
            cfg = replace(cfg, smtp=replace(cfg.smtp, listen=self.cfg.smtp.listen))
        old_transport, old_cfg = self.transport, self.cfg
        self.cfg = cfg
        self._networks.update(cfg.smtp.allowed_networks)  # in place: open sessions see it
        self._hostname = cfg.smtp.hostname or socket.getfqdn()
        self._handler = FrontHandler(self._process, max_recipients=cfg.smtp.max_recipients)
        self._analyzer = analyzer
        assert self.guard is not None
        self.guard.analyze = analyzer
        if cfg.upstream != old_cfg.upstream or cfg.smtp.hostname != old_cfg.smtp.hostname:
            self.transport = make_transport(cfg)
            self.guard.transport = self.transport
            if old_transport is not None:
                await old_transport.close()
        log.info("configuration reloaded from %s", cfg.source or "defaults")
        return True

    async def stop(self, grace: float = 30.0) -> None:
        """Stop accepting; finish transactions in flight within `grace` seconds; close."""
        if self._server is not None:
            self._server.close()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while True:
            busy = 0
            for proto in list(self._protocols):
                if _in_transaction(proto):
                    busy += 1
                elif proto.transport is not None:
                    proto.transport.close()  # idle between transactions: nothing to lose
            if not busy or loop.time() >= deadline:
                break
            await asyncio.sleep(0.05)
        if busy:
            log.warning("stopping with %d transaction(s) unfinished after %.0fs", busy, grace)
        for proto in list(self._protocols):
            if proto.transport is not None:
                proto.transport.close()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5)
        if self.transport is not None:
            await self.transport.close()
        self._stopped.set()

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


def _in_transaction(proto: GuardSMTP) -> bool:
    env = proto.envelope
    return bool(env is not None and env.mail_from)
