"""What a person is shown about one message: recipients, attachments, findings. Plain data.

The pipeline builds a `Summary` from the analysis it acted on; the queue stores it as JSON (a
plain record); the confirm page and every notice read it back with `Summary.from_json`. One type
from end to end, so what the sender is asked to confirm is what the guard decided on.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

Field = Literal["to", "cc", "bcc", "hidden"]
_FIELDS: tuple[Field, ...] = ("to", "cc", "bcc", "hidden")


@dataclass(frozen=True, slots=True)
class Recipient:
    addr: str  # for people: local@U-label
    name: str = ""  # display name from the header ("" for envelope-only recipients)
    field: Field = "to"  # where the sender named it; "hidden" = envelope only (Bcc sent)
    org: str = ""  # external: the organisation (registrable domain, or the mailbox at free-mail)

    def label(self) -> str:
        return f"{self.name} <{self.addr}>" if self.name else self.addr


@dataclass(frozen=True, slots=True)
class Attachment:
    name: str
    size: int  # bytes as sent (encoded)
    content_type: str


@dataclass(frozen=True, slots=True)
class Reason:
    code: str
    en: str
    ja: str

    def text(self, lang: str) -> str:
        return self.en if lang == "en" else self.ja


@dataclass(frozen=True, slots=True)
class Summary:
    subject: str = ""
    sender: str = ""  # the From: header, for people ("" when missing)
    internal: tuple[Recipient, ...] = ()
    external: tuple[Recipient, ...] = ()
    attachments: tuple[Attachment, ...] = ()
    findings: tuple[Reason, ...] = ()
    rules: tuple[str, ...] = ()
    domains: tuple[str, ...] = ()  # recipient domains (A-labels): what delivery teaches history

    def by_org(self) -> list[tuple[str, list[Recipient]]]:
        """External recipients grouped by organisation, in the order they first appear."""
        groups: dict[str, list[Recipient]] = {}
        for r in self.external:
            groups.setdefault(r.org or r.addr.rpartition("@")[2], []).append(r)
        return list(groups.items())

    def to_json(self) -> dict[str, object]:
        def rcpt(r: Recipient) -> dict[str, str]:
            return {"addr": r.addr, "name": r.name, "field": r.field, "org": r.org}

        return {
            "subject": self.subject,
            "sender": self.sender,
            "internal": [rcpt(r) for r in self.internal],
            "external": [rcpt(r) for r in self.external],
            "attachments": [
                {"name": a.name, "size": a.size, "content_type": a.content_type}
                for a in self.attachments
            ],
            "findings": [{"code": f.code, "en": f.en, "ja": f.ja} for f in self.findings],
            "rules": list(self.rules),
            "domains": list(self.domains),
        }

    @classmethod
    def from_json(cls, d: Mapping[str, object]) -> Summary:
        """Read back what `to_json` wrote (missing keys: empty; never raises on odd values)."""

        def items(key: str) -> list[Mapping[str, object]]:
            v = d.get(key)
            return [x for x in v if isinstance(x, Mapping)] if isinstance(v, list) else []

        def s(m: Mapping[str, object], key: str) -> str:
            v = m.get(key, "")
            return v if isinstance(v, str) else str(v)

        def rcpt(m: Mapping[str, object]) -> Recipient:
            f = s(m, "field")
            where: Field = "to"
            for known in _FIELDS:
                if f == known:
                    where = known
            return Recipient(s(m, "addr"), s(m, "name"), where, s(m, "org"))

        def size(m: Mapping[str, object]) -> int:
            v = m.get("size", 0)
            return v if isinstance(v, int) else 0

        def strs(key: str) -> tuple[str, ...]:
            v = d.get(key)
            return tuple(str(x) for x in v) if isinstance(v, list) else ()

        return cls(
            subject=s(d, "subject"),
            sender=s(d, "sender"),
            internal=tuple(rcpt(m) for m in items("internal")),
            external=tuple(rcpt(m) for m in items("external")),
            attachments=tuple(
                Attachment(s(m, "name"), size(m), s(m, "content_type"))
                for m in items("attachments")
            ),
            findings=tuple(Reason(s(m, "code"), s(m, "en"), s(m, "ja")) for m in items("findings")),
            rules=strs("rules"),
            domains=strs("domains"),
        )
