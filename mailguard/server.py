"""The SMTP front's life cycle: listen, reload its settings, stop without losing a transaction.

It hands every message to one callable (the pipeline's `handle`) and knows nothing else:
start → serve → reload(cfg) (networks, hostname, limits) → stop: no new connections, idle ones
closed, transactions in flight finish (bounded), then the rest are closed.

At most `smtp.max_connections` sessions are served at once (per process); a connection over the
cap is answered `421 4.7.0` and closed before anything else (the client, Postfix, retries).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Awaitable, Callable
from mmap import mmap

from mailguard.config import Config
from mailguard.envelope import Envelope, Reply
from mailguard.smtp import FrontHandler, GuardSMTP, Incoming, Networks

log = logging.getLogger("mailguard.server")


Handle = Callable[[Envelope, bytes | mmap, bytes | None], Awaitable[Reply]]


class Server:
    """One process's SMTP listening socket and the sessions on it."""

    def __init__(
        self,
        cfg: Config,
        handle: Handle,
        *,
        reuse_port: bool = False,
        sock: socket.socket | None = None,
        on_client: Callable[[bool], None] | None = None,
    ) -> None:
        self.cfg = cfg
        self.handle = handle
        self.reuse_port = reuse_port
        self.on_client = on_client
        self._sock = sock
        self._server: asyncio.Server | None = None
        self._protocols: set[GuardSMTP] = set()
        self._served: set[GuardSMTP] = set()  # the ones under max_connections
        self._busy_refused = 0  # refused over the cap since the last warning
        self._busy_logged = 0.0
        self._networks = Networks(cfg.smtp.allowed_networks)
        self._configure(cfg)

    def _configure(self, cfg: Config) -> None:
        self._hostname = cfg.smtp.hostname or socket.getfqdn()  # aiosmtpd: per connection
        self._handler = FrontHandler(self._process, max_recipients=cfg.smtp.max_recipients)

    @property
    def hostname(self) -> str:
        return self._hostname

    async def _process(self, env: Envelope, msg: Incoming) -> Reply:
        return await self.handle(env, msg.content, msg.wire)

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
            on_client=self.on_client,
            max_idle_commands=s.max_idle_commands,
        )
        proto.on_connection = self._track
        return proto

    def _track(self, proto: GuardSMTP, opened: bool) -> None:
        if opened:
            self._protocols.add(proto)
            cap = self.cfg.smtp.max_connections
            if cap and len(self._served) >= cap:
                proto.busy = True  # answered 421 by its session, before the greeting
                self._refused_busy(cap)
            else:
                self._served.add(proto)
        else:
            self._protocols.discard(proto)
            self._served.discard(proto)

    def _refused_busy(self, cap: int) -> None:
        """Warn about connections over the cap, at most every 10 s (a flood is one line)."""
        self._busy_refused += 1
        now = time.monotonic()
        if now - self._busy_logged >= 10.0:
            log.warning(
                "smtp: %d connection(s) refused: %d open, smtp.max_connections = %d",
                self._busy_refused,
                len(self._served),
                cap,
            )
            self._busy_refused = 0
            self._busy_logged = now

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

    def reload(self, cfg: Config) -> None:
        """New settings for new sessions; the network list is updated in place (open sessions
        see it at their next MAIL). smtp.listen changes need a restart."""
        self.cfg = cfg
        self._networks.update(cfg.smtp.allowed_networks)
        self._configure(cfg)

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


def _in_transaction(proto: GuardSMTP) -> bool:
    env = proto.envelope
    return bool(env is not None and env.mail_from)
