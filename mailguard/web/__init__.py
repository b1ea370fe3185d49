"""Web stage: confirm pages, admin JSON API and /healthz (aiohttp)."""

from mailguard.web.app import RedactingAccessLogger, make_app, make_metrics_app, start_web

__all__ = ["RedactingAccessLogger", "make_app", "make_metrics_app", "start_web"]
