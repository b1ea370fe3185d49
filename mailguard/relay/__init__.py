"""Relay stage: the aiosmtplib client to the upstream MTA (connection pool, timeouts)."""

from mailguard.relay.base import Transport

__all__ = ["Transport"]
