"""The relay seam: hand one message to the upstream MTA and return its answer."""

from __future__ import annotations

from typing import Protocol

from mailguard.envelope import Envelope, Reply


class Transport(Protocol):
    async def send(self, env: Envelope, raw: bytes) -> Reply:
        """Deliver `raw` unchanged to env.rcpt_tos. Never raises for upstream trouble:

        2xx = accepted (for at least every recipient not listed in the reply text as refused),
        4xx = try again later (connection errors, timeouts, upstream 4xx), 5xx = upstream's 5xx.
        """
        ...
