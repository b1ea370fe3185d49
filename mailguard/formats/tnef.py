"""TNEF (winmail.dat): Outlook's wrapper; the user's files are inside and are sniffed in turn.

Attributes are walked once, bounded by count. A file's name comes from the MAPI long filename
(PR_ATTACH_LONG_FILENAME) when present, else from attAttachTitle, decoded with the message's
OEM code page (CP932 for Japanese Outlook).
"""

from __future__ import annotations

from dataclasses import dataclass

from mailguard.formats.base import Budget, FileInfo, Inner, combine, decode_name, u16, u32

MAGIC = b"\x78\x9f\x3e\x22"
MIME = "application/ms-tnef"
ATT_RENDDATA = 0x00069002  # starts a new attachment
ATT_TITLE = 0x00018010
ATT_DATA = 0x0006800F
ATT_MAPI = 0x00069005  # attachment MAPI properties
ATT_OEM_CP = 0x00069007
PR_ATTACH_LONG_FILENAME = 0x3707
PR_DISPLAY_NAME = 0x3001
MAX_ATTRIBUTES = 100_000
FIXED = {
    0x0002: 4,
    0x0003: 4,
    0x0004: 4,
    0x0005: 8,
    0x0006: 8,
    0x0007: 8,
    0x000A: 4,
    0x000B: 4,
    0x0014: 8,
    0x0040: 8,
    0x0048: 16,
}
VARIABLE = {0x000D, 0x001E, 0x001F, 0x0102}


@dataclass(slots=True)
class _Att:
    title: bytes = b""
    long_name: str = ""
    data: bytes | None = None


def _pad4(n: int) -> int:
    return (n + 3) & ~3


def _mapi_names(b: bytes, codepage: str) -> dict[int, str]:
    """String properties we care about from a MAPI property block (bounded walk)."""
    out: dict[int, str] = {}
    if len(b) < 4:
        return out
    count, i = u32(b, 0), 4
    for _ in range(min(count, 4096)):
        if i + 4 > len(b):
            break
        ptype, pid = u16(b, i), u16(b, i + 2)
        i += 4
        if pid >= 0x8000:  # named property: GUID, kind, then an id or a name
            kind = u32(b, i + 16)
            i += 20
            if kind == 0:
                i += 4
            else:
                i += 4 + _pad4(u32(b, i))
        multi = bool(ptype & 0x1000)
        base = ptype & ~0x1000
        if base in FIXED:
            n = u32(b, i) if multi else 1
            i += (4 if multi else 0) + n * _pad4(FIXED[base])
            continue
        if base not in VARIABLE:
            break  # unknown type: the rest cannot be framed
        n = u32(b, i)
        i += 4
        for k in range(min(n, 1024)):
            ln = u32(b, i)
            val = b[i + 4 : i + 4 + ln]
            i += 4 + _pad4(ln)
            if k == 0 and pid in (PR_ATTACH_LONG_FILENAME, PR_DISPLAY_NAME):
                if base == 0x001F:
                    out[pid] = val.decode("utf-16-le", "replace").rstrip("\x00")
                elif base == 0x001E:
                    out[pid] = _decode(val.rstrip(b"\x00"), codepage)
    return out


def _decode(raw: bytes, codepage: str) -> str:
    if codepage:
        try:
            return raw.decode(codepage)
        except (UnicodeDecodeError, LookupError):
            pass
    return decode_name(raw)


def sniff_tnef(data: bytes, budget: Budget, inner: Inner | None) -> FileInfo:
    lim = budget.limits
    atts: list[_Att] = []
    codepage = ""
    i = 6
    limited = damaged = ""
    for _ in range(MAX_ATTRIBUTES):
        if i + 9 > len(data):
            break
        level, attr, ln = data[i], u32(data, i + 1), u32(data, i + 5)
        start, end = i + 9, i + 9 + ln
        if end + 2 > len(data):
            damaged = "damaged: truncated"
            break
        val = data[start:end]
        if attr == ATT_OEM_CP and ln >= 4:
            codepage = f"cp{u32(val, 0)}"
        elif level == 2 and attr == ATT_RENDDATA:
            if len(atts) >= lim.max_entries:
                limited = f"more than {lim.max_entries} attachments"
                break
            atts.append(_Att())
        elif level == 2 and atts:
            if attr == ATT_TITLE:
                atts[-1].title = val.split(b"\x00", 1)[0]
            elif attr == ATT_DATA:
                atts[-1].data = val
            elif attr == ATT_MAPI:
                names = _mapi_names(val, codepage)
                atts[-1].long_name = names.get(PR_ATTACH_LONG_FILENAME) or names.get(
                    PR_DISPLAY_NAME, ""
                )
        i = end + 2  # checksum
    members: list[FileInfo] = []
    statuses: list[bool | None] = []
    for a in atts:
        name = a.long_name or _decode(a.title, codepage)
        if a.data is None:
            info = FileInfo("other", "", None, "embedded Outlook item not inspected", name=name)
        elif inner is not None and budget.take(len(a.data)):
            sub = inner(a.data, name)
            info = FileInfo(
                sub.kind,
                sub.mime,
                sub.encrypted,
                sub.detail,
                sub.members,
                sub.limited,
                name,
                len(a.data),
            )
        else:
            info = FileInfo(
                "other",
                "",
                None,
                "not inspected: over the size budget",
                limited=True,
                name=name,
                size=len(a.data),
            )
        statuses.append(info.encrypted)
        if len(members) < lim.max_members_listed:
            members.append(info)
    if not atts:
        detail = "Outlook rich-text wrapper without attachments"
    else:
        enc = sum(1 for s in statuses if s)
        detail = f"Outlook winmail.dat with {len(atts)} attachment(s), {enc} encrypted"
    for note in (limited, damaged):
        if note:
            detail += f"; {note}"
    return FileInfo("tnef", MIME, combine(statuses), detail, tuple(members), bool(limited))
