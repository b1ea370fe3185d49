"""MailGuard's exception tree.

MailGuardError
├── ConfigError        a config or policy file is unusable (carries file, line, key)
├── StoreError         the durable store could not commit (→ 451)
└── RelayError         the upstream could not take the message (→ 4xx/5xx as answered)
"""

from __future__ import annotations


class MailGuardError(Exception):
    """Base of every error MailGuard raises on purpose."""


class ConfigError(MailGuardError):
    """A configuration or policy file is unusable. str() reads `file:line: key: what is wrong`."""

    def __init__(self, message: str, *, file: str = "", line: int | None = None, key: str = ""):
        self.file = file
        self.line = line
        self.key = key
        self.reason = message
        where = file
        if line is not None:
            where = f"{where}:{line}" if where else f"line {line}"
        parts = [p for p in (where, key) if p]
        super().__init__(": ".join([*parts, message]))


class StoreError(MailGuardError):
    """The durable store could not commit; the caller must answer 451."""


class RelayError(MailGuardError):
    """The upstream MTA did not accept the message."""

    def __init__(self, code: int, text: str):
        self.code = code
        self.text = text
        super().__init__(f"{code} {text}")
