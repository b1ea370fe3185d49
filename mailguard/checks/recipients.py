"""Checks stage: who sees whom — visible external recipients (the Bcc mistake), Bcc, hidden ones.

A *party* is an external organisation: the registrable domain (Public Suffix List), except at a
free-mail / ISP / carrier domain (gmail.com, docomo.ne.jp, ...) where each mailbox is its own party.
Two customers at gmail.com who see each other's address are two parties, not one.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mailguard.checks.context import CheckContext, Org
from mailguard.checks.domains import is_freemail, registrable
from mailguard.checks.finding import Finding
from mailguard.message.addresses import address_key
from mailguard.message.types import Address

if TYPE_CHECKING:
    from mailguard.message import MessageView

__all__ = ["RecipientReport", "analyze", "party"]


def party(a: Address, org: Org | None = None) -> str:
    """The party an external address belongs to: its organisation, or itself at free-mail."""
    if is_freemail(a.domain, org):
        return address_key(a)
    return registrable(a.domain)


def _unique(addrs: Iterable[Address]) -> list[Address]:
    seen: set[str] = set()
    out: list[Address] = []
    for a in addrs:
        k = address_key(a)
        if k not in seen:
            seen.add(k)
            out.append(a)
    return out


def _external(a: Address, org: Org) -> bool:
    # An address without a domain ("root") is delivered locally: not external.
    return bool(a.domain) and not org.is_internal(a.domain)


def _shown(a: Address) -> str:
    if a.domain_unicode != a.domain and a.domain:
        return f"{a.local}@{a.domain_unicode}"
    return a.addr


@dataclass(slots=True)
class RecipientReport:
    to: list[Address] = field(default_factory=list)
    cc: list[Address] = field(default_factory=list)
    bcc: list[Address] = field(default_factory=list)
    envelope: list[Address] | None = None
    visible_external: list[Address] = field(default_factory=list)
    parties: list[str] = field(default_factory=list)
    hidden: list[Address] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)

    @property
    def external_parties(self) -> int:
        return len(self.parties)

    def to_json(self) -> dict[str, Any]:
        return {
            "to": [a.addr for a in self.to],
            "cc": [a.addr for a in self.cc],
            "bcc": [a.addr for a in self.bcc],
            "visible_external": [a.addr for a in self.visible_external],
            "external_parties": self.external_parties,
            "hidden": [a.addr for a in self.hidden],
            "parties": list(self.parties),
            "envelope": None if self.envelope is None else [a.addr for a in self.envelope],
            "display": {  # U-label forms, for people
                "visible_external": [_shown(a) for a in self.visible_external],
                "hidden": [_shown(a) for a in self.hidden],
            },
        }


def analyze(view: MessageView, ctx: CheckContext) -> RecipientReport:
    """Visible external recipients, parties, external/Bcc/hidden recipients of one message."""
    org = ctx.org
    rep = RecipientReport(to=list(view.to), cc=list(view.cc), bcc=list(view.bcc))
    if view.envelope is not None:
        rep.envelope = list(view.rcpts)

    visible = _unique([*rep.to, *rep.cc])
    rep.visible_external = [a for a in visible if _external(a, org)]
    rep.parties = list(dict.fromkeys(party(a, org) for a in rep.visible_external))

    # Who the message really goes to: the envelope when we have one, else every header recipient.
    actual = _unique(rep.envelope if rep.envelope is not None else [*visible, *rep.bcc])
    external = [a for a in actual if _external(a, org)]
    if rep.envelope is not None:
        named = {address_key(a) for a in visible} | {address_key(a) for a in rep.bcc}
        rep.hidden = [a for a in actual if address_key(a) not in named]

    f = rep.findings
    n, p = len(rep.visible_external), len(rep.parties)
    if n:
        f.append(
            Finding(
                "recipient.visible_external",
                f"{n} external address(es) from {p} organisation(s) are visible to every "
                "recipient in To/Cc",
                f"To/Ccに社外の宛先が{n}件({p}組織)見えています",
                n,
                tuple(_shown(a) for a in rep.visible_external),
                {"parties": list(rep.parties)},
            )
        )
        f.append(
            Finding(
                "recipient.external_parties",
                f"To/Cc name {p} different external organisation(s) or private mailbox(es)",
                f"To/Ccに社外の{p}組織(個人のフリーメールを含む)の宛先が含まれています",
                p,
                tuple(rep.parties),
            )
        )
    if external:
        f.append(
            Finding(
                "recipient.external",
                f"The message goes to {len(external)} external recipient(s)",
                f"社外の宛先が{len(external)}件あります",
                len(external),
                tuple(_shown(a) for a in external),
            )
        )
    if rep.bcc:
        f.append(
            Finding(
                "recipient.bcc_header",
                f"A Bcc: header naming {len(rep.bcc)} address(es) is left in the message; "
                "other recipients may see it",
                f"メッセージにBccヘッダー({len(rep.bcc)}件)が残っており、他の受信者に見える"
                "おそれがあります",
                len(rep.bcc),
                tuple(_shown(a) for a in rep.bcc),
            )
        )
    if rep.hidden:
        ext_hidden = [a for a in rep.hidden if _external(a, org)]
        f.append(
            Finding(
                "recipient.hidden",
                f"{len(rep.hidden)} recipient(s) get the message without being named in "
                f"To/Cc (Bcc), {len(ext_hidden)} of them external",
                f"To/Ccに表示されない宛先(Bcc)が{len(rep.hidden)}件あります"
                f"(うち社外{len(ext_hidden)}件)",
                len(rep.hidden),
                tuple(_shown(a) for a in rep.hidden),
                {"external": [_shown(a) for a in ext_hidden]},
            )
        )
    return rep
