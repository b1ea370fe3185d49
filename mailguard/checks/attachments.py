"""Checks stage: the user's attached files — what each really is, and whether it is encrypted.

A user file is a MIME leaf with role "attachment"; inline cid images, calendar parts and
signatures are not. Files inside forwarded messages (message/rfc822, also base64-encoded ones)
and inside Outlook's winmail.dat (TNEF) count as attached files too. An S/MIME or PGP/MIME
encrypted message counts as one encrypted item: its contents cannot be seen, and are protected.

Every file goes through `mailguard.formats.sniff` (bytes, not names or declared types). The work per
message is bounded: one decompression budget for all files, a cap on items and nesting.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mailguard.checks.context import CheckContext
from mailguard.checks.finding import Finding
from mailguard.formats import DEFAULT_LIMITS, Budget, FileInfo, SniffLimits, sniff
from mailguard.message.types import Part

if TYPE_CHECKING:
    from mailguard.message import MessageView

__all__ = ["AttachmentItem", "AttachmentReport", "analyze"]

log = logging.getLogger(__name__)

ENCAPSULATED = frozenset({"message/rfc822", "message/global", "message/news"})
MAX_ITEMS = 1000  # files reported per message; more = attachment.limit
MAX_MESSAGE_DEPTH = 3  # forwarded message inside forwarded message ...
SHOW = 5  # names spelled out in a reason; the rest are counted


@dataclass(frozen=True, slots=True)
class AttachmentItem:
    """One user file (or one encrypted message body) and what its bytes say."""

    filename: str
    content_type: str  # as declared in MIME (for files inside winmail.dat: the sniffed type)
    size: int  # decoded bytes
    info: FileInfo
    path: str = ""  # MIME section of the part that carried it ("2", "3.1")
    container: str = ""  # "winmail.dat" or the forwarded message it was found in
    encrypted_mail: bool = False  # the S/MIME / PGP/MIME payload of an encrypted message

    @property
    def label(self) -> str:
        return self.filename or ("(encrypted message)" if self.encrypted_mail else "(no name)")

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "filename": self.filename,
            "content_type": self.content_type,
            "size": self.size,
            "kind": self.info.kind,
            "mime": self.info.mime,
            "encrypted": self.info.encrypted,
            "detail": self.info.detail,
            "path": self.path,
        }
        if self.container:
            out["container"] = self.container
        if self.encrypted_mail:
            out["encrypted_mail"] = True
        if self.info.limited:
            out["limited"] = True
        return out


@dataclass(slots=True)
class AttachmentReport:
    items: list[AttachmentItem] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    truncated: bool = False  # more than MAX_ITEMS files

    def to_json(self) -> list[dict[str, Any]]:
        return [i.to_json() for i in self.items]


class _Walk:
    """State of one analysis: shared budget, collected items."""

    def __init__(self, limits: SniffLimits) -> None:
        self.budget = Budget(limits)
        self.items: list[AttachmentItem] = []
        self.truncated = False

    def add(self, item: AttachmentItem) -> None:
        if len(self.items) >= MAX_ITEMS:
            self.truncated = True
            return
        self.items.append(item)

    def sniff(self, data: bytes, name: str) -> FileInfo:
        return sniff(data, name, budget=self.budget)


def _containers(view: MessageView) -> dict[str, Part]:
    return {p.path: p for p in view.parts if p.content_type in ENCAPSULATED}


def _container_of(part: Part, enc: dict[str, Part], outer: str) -> str:
    """Name of the nearest forwarded message around `part`, or the outer container's."""
    path = part.path
    while "." in path:
        path = path.rsplit(".", 1)[0]
        msg = enc.get(path)
        if msg is not None:
            return msg.filename or "forwarded message"
    return outer


def _walk_view(view: MessageView, w: _Walk, depth: int, outer: str) -> None:
    enc = _containers(view)
    for part in view.parts:
        if w.truncated:
            return
        if part.role == "encrypted":
            _encrypted_part(view, part, w, outer)
        elif part.role == "container" and part.content_type in ENCAPSULATED:
            if part.disposition == "attachment" or part.filename:  # a forwarded .eml file
                data = view.body_of(part)
                container = _container_of(part, enc, outer)
                w.add(
                    AttachmentItem(
                        part.filename,
                        part.content_type,
                        len(data),
                        w.sniff(data, part.filename),
                        part.path,
                        container,
                    )
                )
        elif part.role == "attachment":
            _attachment(view, part, w, depth, _container_of(part, enc, outer))


def _encrypted_part(view: MessageView, part: Part, w: _Walk, outer: str) -> None:
    if part.content_type == "application/pgp-encrypted":
        return  # the PGP/MIME control part ("Version: 1"); the payload is its sibling
    data = view.body_of(part)
    info = w.sniff(data, part.filename)
    if info.kind not in ("smime", "pgp") or info.encrypted is None:
        # Declared encrypted but the bytes do not show it: do not take the label on trust.
        info = FileInfo(
            info.kind,
            info.mime,
            None,
            f"declared encrypted ({part.content_type}) but not recognisable: {info.detail}",
            limited=info.limited,
        )
    w.add(
        AttachmentItem(
            part.filename, part.content_type, len(data), info, part.path, outer, encrypted_mail=True
        )
    )


def _attachment(view: MessageView, part: Part, w: _Walk, depth: int, container: str) -> None:
    data = view.body_of(part)
    info = w.sniff(data, part.filename)
    item = AttachmentItem(part.filename, part.content_type, len(data), info, part.path, container)
    if info.kind == "tnef":
        if not info.members:  # rich-text wrapper only: the body, not a file
            if info.encrypted is None or info.limited:
                w.add(item)
            return
        for m in info.members:
            w.add(
                AttachmentItem(
                    m.name,
                    m.mime or "application/octet-stream",
                    m.size,
                    m,
                    part.path,
                    part.filename or "winmail.dat",
                )
            )
        return
    if part.content_type in ENCAPSULATED or info.kind == "message":
        if depth >= MAX_MESSAGE_DEPTH:
            w.add(
                AttachmentItem(
                    item.filename,
                    item.content_type,
                    item.size,
                    FileInfo(
                        "message",
                        "message/rfc822",
                        None,
                        "forwarded message nested too deep",
                        limited=True,
                    ),
                    part.path,
                    container,
                )
            )
            return
        from mailguard.message import MessageView

        # The attached message is a readable file itself; its own attachments are looked into.
        w.add(item)
        inner = MessageView.parse(data)
        name = part.filename or "forwarded message"
        _walk_view(inner, w, depth + 1, f"{container}/{name}" if container else name)
        return
    w.add(item)


def _names(items: list[AttachmentItem]) -> str:
    return ", ".join(i.label for i in items[:SHOW])


def _more(items: list[AttachmentItem], en: bool) -> str:
    extra = len(items) - SHOW
    if extra <= 0:
        return ""
    return f" and {extra} more" if en else f" ほか{extra}件"


def _finding(code: str, items: list[AttachmentItem], en: str, ja: str) -> Finding:
    n = len(items)
    names = _names(items)
    data: dict[str, Any] = {
        "files": [
            {"filename": i.label, "kind": i.info.kind, "detail": i.info.detail} for i in items[:50]
        ]
    }
    return Finding(
        code,
        reason_en=en.format(n=n, s="" if n == 1 else "s", is_="is" if n == 1 else "are")
        + f": {names}{_more(items, True)}",
        reason_ja=ja.format(n=n) + f": {names}{_more(items, False)}",
        count=n,
        evidence=tuple(i.label for i in items),
        data=data,
    )


def analyze(
    view: MessageView, ctx: CheckContext, limits: SniffLimits = DEFAULT_LIMITS
) -> AttachmentReport:
    """Findings about the message's attached files. Pure; never raises."""
    w = _Walk(limits)
    try:
        _walk_view(view, w, 0, "")
    except Exception as e:  # keep what we have; the limit finding tells the policy
        log.warning("attachments: analysis stopped: %s: %s", type(e).__name__, e)
        w.truncated = True
    items = w.items
    report = AttachmentReport(items=items, truncated=w.truncated)
    if not items and not w.truncated:
        return report
    clear = [i for i in items if i.info.encrypted is False]
    protected = [i for i in items if i.info.encrypted is True]
    unknown = [i for i in items if i.info.encrypted is None]
    limited = [i for i in items if i.info.limited]
    f = report.findings
    if items:
        f.append(
            _finding(
                "attachment.present", items, "{n} attached file{s}", "添付ファイルが{n}件あります"
            )
        )
    if clear:
        f.append(
            _finding(
                "attachment.unencrypted",
                clear,
                "{n} attached file{s} {is_} not encrypted",
                "暗号化されていない添付ファイルが{n}件あります",
            )
        )
    if protected:
        f.append(
            _finding(
                "attachment.encrypted",
                protected,
                "{n} attached file{s} {is_} encrypted",
                "暗号化された添付ファイルが{n}件あります",
            )
        )
    if unknown:
        f.append(
            _finding(
                "attachment.unknown",
                unknown,
                "could not tell whether {n} attached file{s} {is_} encrypted",
                "暗号化されているか判定できない添付ファイルが{n}件あります",
            )
        )
    if limited or w.truncated:
        lim = (
            _finding(
                "attachment.limit",
                limited,
                "{n} attached file{s} could not be fully inspected (size, count or nesting limit)",
                "サイズ・件数・入れ子の上限に達し、十分に検査できなかった添付ファイルが{n}件あります",
            )
            if limited
            else None
        )
        if w.truncated:
            en = f"more than {MAX_ITEMS} attached files: the rest were not inspected"
            ja = f"添付ファイルが{MAX_ITEMS}件を超えたため、残りは検査していません"
            lim = Finding(
                "attachment.limit",
                reason_en=f"{lim.reason_en}; {en}" if lim else en,
                reason_ja=f"{lim.reason_ja}。{ja}" if lim else ja,
                count=len(limited) + 1,
                evidence=lim.evidence if lim else (),
                data={**(lim.data if lim else {}), "max_items": MAX_ITEMS},
            )
        assert lim is not None
        f.append(lim)
    return report
