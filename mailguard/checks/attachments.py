"""Checks stage: the user's attached files — what each really is, and whether it is encrypted.

A user file is a MIME leaf with role "attachment"; inline cid images, calendar parts and
signatures are not. Files inside forwarded messages (message/rfc822, also base64-encoded ones)
and inside Outlook's winmail.dat (TNEF) count as attached files too. An S/MIME or PGP/MIME
encrypted message counts as one encrypted item: its contents cannot be seen, and are protected.

Files written into a text body (uuencode, yEnc, BinHex: `mailguard.formats.inline`) are user
files too: listed with `inline` set, judged like the others, and counted in `attachment.inline`
(unless encrypted) because the zip rewrite only encloses MIME parts. A MIME region the view could
not enter (depth or part bound) is listed as an `uninspected` item: encryption unknown, limited.

Every file goes through `mailguard.formats.sniff` (bytes, not names or declared types). The work per
message is bounded: one decompression budget for all files, a cap on items and nesting.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mailguard.checks.context import CheckContext
from mailguard.checks.finding import Finding
from mailguard.formats import DEFAULT_LIMITS, Budget, FileInfo, SniffLimits, sniff
from mailguard.formats.inline import find_encoded, might_hold_encoded
from mailguard.message.types import Part

if TYPE_CHECKING:
    from mailguard.message import MessageView

__all__ = ["AttachmentItem", "AttachmentReport", "analyze"]

log = logging.getLogger(__name__)

ENCAPSULATED = frozenset({"message/rfc822", "message/global", "message/news"})
MAX_ITEMS = 1000  # files reported per message; more = attachment.limit
# base64-encoded forwarded messages re-parsed inside each other (each level grows the message
# by a third, so real chains stay short; 7bit/8bit forwards are one MIME tree, bounded by Limits)
MAX_MESSAGE_DEPTH = 32
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
    inline: str = ""  # "uuencode", "yenc", "binhex": written into the text body at `path`
    uninspected: bool = False  # a MIME region past the depth/part bound (contents unseen)

    @property
    def label(self) -> str:
        if self.filename:
            return self.filename
        if self.uninspected:
            return "(part not inspected)"
        return "(encrypted message)" if self.encrypted_mail else "(no name)"

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
        if self.inline:
            out["inline"] = self.inline
        if self.uninspected:
            out["uninspected"] = True
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


LIMIT_DEFECTS = ("mime.depth_limit", "mime.parts_limit")
_TEXT_BODIES = frozenset({"text/plain", "text/x-uuencode", "text/x-yenc"})


def _container_names(view: MessageView, outer: str) -> dict[int, str]:
    """id(part) → name of the nearest forwarded message around it (or `outer`). One walk,
    no recursion: a chain of 1000 forwards costs O(parts), not O(parts × depth)."""
    out: dict[int, str] = {}
    stack: list[tuple[Part, str]] = [(view.root, outer)]
    while stack:
        part, name = stack.pop()
        out[id(part)] = name
        if part.children:
            inner = (
                part.filename or "forwarded message" if part.content_type in ENCAPSULATED else name
            )
            stack.extend((c, inner) for c in part.children)
    return out


def _walk_all(view: MessageView, w: _Walk) -> None:
    """Every part of the message and of the forwarded messages inside it, in tree order.

    Iterative: a forwarded message that has to be re-parsed (base64 message/rfc822) pushes its
    parts on a stack instead of recursing, so the item order is that of the tree."""
    frames: list[tuple[Iterator[Part], MessageView, int, str, dict[int, str]]] = [
        (iter(view.parts), view, 0, "", _container_names(view, ""))
    ]
    while frames and not w.truncated:
        it, v, depth, outer, names = frames[-1]
        part = next(it, None)
        if part is None:
            frames.pop()
            continue
        container = names.get(id(part), outer)
        limit = next((d for d in LIMIT_DEFECTS if d in part.defects), None)
        if limit is not None:
            _uninspected(v, part, w, limit, container)
        elif part.role == "encrypted":
            _encrypted_part(v, part, w, outer)
        elif part.role == "container" and part.content_type in ENCAPSULATED:
            if part.disposition == "attachment" or part.filename:  # a forwarded .eml file
                data = v.body_of(part)
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
            inner = _attachment(v, part, w, depth, container)
            if inner is not None:
                iv, name = inner
                frames.append((iter(iv.parts), iv, depth + 1, name, _container_names(iv, name)))
        elif part.role == "body" and part.content_type in _TEXT_BODIES:
            _inline_files(v, part, w, container)


def _uninspected(view: MessageView, part: Part, w: _Walk, limit: str, container: str) -> None:
    """A region the MIME bound kept us out of: listed, unknown, limited — never "nothing"."""
    what = (
        f"MIME nesting deeper than {view.limits.max_depth} levels"
        if limit == "mime.depth_limit"
        else f"more than {view.limits.max_parts} MIME parts"
    )
    w.add(
        AttachmentItem(
            part.filename,
            part.content_type,
            part.encoded_size,
            FileInfo(
                "uninspected",
                part.content_type,
                None,
                f"not inspected: {what}; it may hold files",
                limited=True,
            ),
            part.path,
            container,
            uninspected=True,
        )
    )


def _inline_files(view: MessageView, part: Part, w: _Walk, container: str) -> None:
    """uuencode / yEnc / BinHex blocks written into a text body: files like any other."""
    text = view.body_of(part)
    if not might_hold_encoded(text):
        return
    for f in find_encoded(text):
        info = w.sniff(f.data, f.name)
        if not f.complete or f.limited:
            info = FileInfo(
                info.kind,
                info.mime,
                info.encrypted,
                f"{info.detail} (the {f.encoding} block is incomplete or too large)",
                info.members,
                limited=True,
            )
        w.add(
            AttachmentItem(
                f.name,
                f.content_type,
                len(f.data),
                info,
                part.path,
                container,
                inline=f.encoding,
            )
        )


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


def _attachment(
    view: MessageView, part: Part, w: _Walk, depth: int, container: str
) -> tuple[MessageView, str] | None:
    """Judge one attached file; a forwarded message to look into is returned, not walked."""
    data = view.body_of(part)
    info = w.sniff(data, part.filename)
    item = AttachmentItem(part.filename, part.content_type, len(data), info, part.path, container)
    if info.kind == "tnef":
        if not info.members:  # rich-text wrapper only: the body, not a file
            if info.encrypted is None or info.limited:
                w.add(item)
            return None
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
        return None
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
            return None
        from mailguard.message import MessageView

        # The attached message is a readable file itself; its own attachments are looked into.
        w.add(item)
        name = part.filename or "forwarded message"
        return MessageView.parse(data), f"{container}/{name}" if container else name
    w.add(item)
    return None


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
        _walk_all(view, w)
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
    inline = [i for i in items if i.inline and i.info.encrypted is not True]
    if inline:
        f.append(
            _finding(
                "attachment.inline",
                inline,
                "{n} file{s} written into the text of the message (uuencode, yEnc or BinHex) "
                "{is_} not encrypted, and the zip rewrite cannot enclose them",
                "本文中に埋め込まれた (uuencode・yEnc・BinHex) 暗号化されていない"
                "ファイルが{n}件あります。パスワード付き ZIP 化の対象にできません",
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
