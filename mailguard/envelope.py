"""Envelope and SMTP reply values shared by every stage (smtp → … → relay/queue)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class Envelope:
    """What the SMTP transaction said, as opposed to what the message headers say."""

    mail_from: str
    rcpt_tos: list[str]
    mail_options: list[str] = field(default_factory=list)  # e.g. ["BODY=8BITMIME", "SMTPUTF8"]
    rcpt_options: list[list[str]] = field(default_factory=list)  # one list per recipient
    # XFORWARD attributes from Postfix (NAME, ADDR, PROTO, HELO, IDENT, SOURCE, PORT)
    xforward: dict[str, str] = field(default_factory=dict)
    client_addr: str = ""

    @property
    def queue_id(self) -> str:
        """Postfix's queue id (XFORWARD IDENT) for log correlation, or "-"."""
        return self.xforward.get("IDENT") or "-"

    @property
    def smtputf8(self) -> bool:
        return any(o.upper() == "SMTPUTF8" for o in self.mail_options)

    def to_json(self) -> dict[str, object]:
        return {
            "mail_from": self.mail_from,
            "rcpt_tos": list(self.rcpt_tos),
            "mail_options": list(self.mail_options),
            "queue_id": self.queue_id,
        }


@dataclass(frozen=True, slots=True)
class Reply:
    """An SMTP reply: code plus text (the text may carry an enhanced status code)."""

    code: int
    text: str

    @property
    def ok(self) -> bool:
        return 200 <= self.code < 300

    @property
    def temporary(self) -> bool:
        return 400 <= self.code < 500

    def __str__(self) -> str:
        # aiosmtpd wants "CODE text"; multi-line texts become continuation lines
        lines = self.text.splitlines() or [""]
        if len(lines) == 1:
            return f"{self.code} {lines[0]}"
        head = "\r\n".join(f"{self.code}-{ln}" for ln in lines[:-1])
        return f"{head}\r\n{self.code} {lines[-1]}"


TEMPFAIL = Reply(451, "4.3.0 MailGuard: temporary problem, try again later")
