"""ZIP (and the formats built on it: OOXML, ODF): per-entry encryption from the headers.

The central directory is read (ZIP64 aware); when it is missing or broken we fall back to the
local headers. Nothing is decompressed in full except, within the shared budget, members whose
first bytes show a format that can itself be encrypted (a PDF or zip inside the zip).
"""

from __future__ import annotations

import bz2
import zlib
from dataclasses import dataclass

from mailguard.formats.base import (
    Budget,
    FileInfo,
    Inner,
    combine,
    decode_name,
    u16,
    u32,
    u64,
)

CD_SIG = b"PK\x01\x02"
LOCAL_SIG = b"PK\x03\x04"
EOCD_SIG = b"PK\x05\x06"
Z64_LOC_SIG = b"PK\x06\x07"
Z64_EOCD_SIG = b"PK\x06\x06"

AES_STRENGTH = {1: "AES-128", 2: "AES-192", 3: "AES-256"}
HEAD = 4096  # bytes decompressed to recognise a member's format
# Magic numbers of formats that carry their own encryption: worth a full look inside.
ENCRYPTABLE = (b"%PDF", b"PK\x03\x04", b"\xd0\xcf\x11\xe0", b"7z\xbc\xaf", b"Rar!", b"-----BEGIN")

OOXML_MIME = {
    "word/": "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
    "xl/": "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
    "ppt/": "application/vnd.openxmlformats-officedocument.presentationml.presentation",
}


@dataclass(slots=True)
class Entry:
    name: str
    flags: int
    method: int
    csize: int
    usize: int
    local_offset: int  # -1 when read from a local header (data follows at data_offset)
    data_offset: int = -1
    aes: str = ""  # "AES-256" etc. from the 0x9901 extra field

    @property
    def is_dir(self) -> bool:
        return self.name.endswith("/") and self.usize == 0

    @property
    def encrypted(self) -> bool:
        return bool(self.flags & 0x1) or self.method == 99

    @property
    def scheme(self) -> str:
        if self.method == 99 or self.aes:
            return self.aes or "AES"
        if self.flags & 0x40:
            return "PKWARE strong encryption"
        return "ZipCrypto"


def _extras(raw: bytes) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    i = 0
    while i + 4 <= len(raw):
        hid, hlen = u16(raw, i), u16(raw, i + 2)
        out.setdefault(hid, raw[i + 4 : i + 4 + hlen])
        i += 4 + hlen
    return out


def _apply_extras(e: Entry, extra: bytes, raw_name: bytes) -> None:
    ex = _extras(extra)
    z64 = ex.get(0x0001)
    if z64:  # present fields follow the order usize, csize, offset, only for 0xFFFFFFFF values
        pos = 0
        for attr in ("usize", "csize", "local_offset"):
            if getattr(e, attr) == 0xFFFFFFFF and pos + 8 <= len(z64):
                setattr(e, attr, u64(z64, pos))
                pos += 8
    aes = ex.get(0x9901)
    if aes and len(aes) >= 7 and aes[2:4] == b"AE":
        e.aes = AES_STRENGTH.get(aes[4], "AES")
    up = ex.get(0x7075)  # Info-ZIP Unicode Path: version, CRC32 of the raw name, UTF-8 name
    if up and len(up) > 5 and up[0] == 1 and u32(up, 1) == zlib.crc32(raw_name):
        e.name = up[5:].decode("utf-8", "replace")


def find_eocd(data: bytes) -> int:
    return data.rfind(EOCD_SIG, max(0, len(data) - 65557))


def _central(data: bytes, max_entries: int) -> tuple[list[Entry], int, bool] | None:
    """Entries from the central directory, the declared count, and whether it is encrypted."""
    eocd = find_eocd(data)
    if eocd < 0 or eocd + 22 > len(data):
        return None
    total = u16(data, eocd + 10)
    cd_size = u32(data, eocd + 12)
    cd_off = u32(data, eocd + 16)
    loc = eocd - 20
    if loc >= 0 and data[loc : loc + 4] == Z64_LOC_SIG:
        z64_off = u64(data, loc + 8)
        if data[z64_off : z64_off + 4] != Z64_EOCD_SIG:  # prepended bytes shift offsets
            z64_off = data.rfind(Z64_EOCD_SIG, 0, loc)
        if z64_off >= 0 and z64_off + 56 <= len(data):
            total = u64(data, z64_off + 32)
            cd_size = u64(data, z64_off + 40)
            cd_off = u64(data, z64_off + 48)
            eocd = z64_off
    shift = 0
    if data[cd_off : cd_off + 4] != CD_SIG:
        # Self-extracting or prefixed archives: offsets are relative to the zip's own start.
        guess = eocd - cd_size
        if guess < 0 or data[guess : guess + 4] != CD_SIG:
            return None
        shift = guess - cd_off
        cd_off = guess
    entries: list[Entry] = []
    cd_encrypted = False
    pos = cd_off
    while len(entries) < max_entries and data[pos : pos + 4] == CD_SIG and pos + 46 <= len(data):
        flags, method = u16(data, pos + 8), u16(data, pos + 10)
        nlen, xlen, clen = u16(data, pos + 28), u16(data, pos + 30), u16(data, pos + 32)
        raw_name = data[pos + 46 : pos + 46 + nlen]
        e = Entry(
            decode_name(raw_name, bool(flags & 0x800)),
            flags,
            method,
            u32(data, pos + 20),
            u32(data, pos + 24),
            u32(data, pos + 42),
        )
        _apply_extras(e, data[pos + 46 + nlen : pos + 46 + nlen + xlen], raw_name)
        e.local_offset += shift
        cd_encrypted |= bool(flags & 0x2000)  # PKWARE SES: central directory encrypted too
        entries.append(e)
        pos += 46 + nlen + xlen + clen
    if not entries and total:
        return None
    return entries, max(total, len(entries)), cd_encrypted


def _local(data: bytes, max_entries: int) -> list[Entry]:
    """Fallback for a broken central directory: every plausible local header, in order."""
    entries: list[Entry] = []
    pos = data.find(LOCAL_SIG)
    while pos >= 0 and pos + 30 <= len(data) and len(entries) < max_entries:
        flags, method = u16(data, pos + 6), u16(data, pos + 8)
        csize, usize = u32(data, pos + 18), u32(data, pos + 22)
        nlen, xlen = u16(data, pos + 26), u16(data, pos + 28)
        version = u16(data, pos + 4)
        if version < 100 and 0 < nlen <= 1024 and pos + 30 + nlen <= len(data):
            raw_name = data[pos + 30 : pos + 30 + nlen]
            e = Entry(decode_name(raw_name, bool(flags & 0x800)), flags, method, csize, usize, -1)
            _apply_extras(e, data[pos + 30 + nlen : pos + 30 + nlen + xlen], raw_name)
            e.data_offset = pos + 30 + nlen + xlen
            entries.append(e)
            step = 30 + nlen + xlen + (0 if flags & 0x8 else e.csize)
            pos = data.find(LOCAL_SIG, pos + max(4, step) if step > 0 else pos + 4)
        else:
            pos = data.find(LOCAL_SIG, pos + 4)
    return entries


def _data_start(data: bytes, e: Entry) -> int:
    if e.data_offset >= 0:
        return e.data_offset
    lo = e.local_offset
    if data[lo : lo + 4] != LOCAL_SIG or lo + 30 > len(data):
        return -1
    return lo + 30 + u16(data, lo + 26) + u16(data, lo + 28)


def _inflate(data: bytes, e: Entry, limit: int) -> bytes | None:
    """At most `limit` bytes of the entry's content, or None if the method is not supported."""
    start = _data_start(data, e)
    if start < 0:
        return None
    comp = data[start : start + e.csize] if e.csize else data[start:]
    try:
        if e.method == 0:
            return comp[:limit]
        if e.method == 8:
            return zlib.decompressobj(-15).decompress(comp, limit)
        if e.method == 12:
            return bz2.BZ2Decompressor().decompress(comp, limit)
    except (zlib.error, OSError, EOFError, ValueError):
        return None
    return None


def _by_name(entries: list[Entry]) -> dict[str, Entry]:
    return {e.name: e for e in entries}


def _odf(data: bytes, entries: list[Entry], mimetype: str) -> FileInfo:
    names = _by_name(entries)
    manifest = names.get("META-INF/manifest.xml")
    text = _inflate(data, manifest, 1 << 20) if manifest and not manifest.encrypted else None
    if text is None:
        return FileInfo("odf", mimetype, None, "OpenDocument: manifest unreadable")
    if b"encryption-data" in text:
        return FileInfo("odf", mimetype, True, "OpenDocument protected with a password")
    return FileInfo("odf", mimetype, False, "OpenDocument without a password")


def sniff_zip(data: bytes, budget: Budget, inner: Inner | None) -> FileInfo:
    lim = budget.limits
    central = _central(data, lim.max_entries)
    note = ""
    cd_encrypted = False
    if central is None:
        entries = _local(data, lim.max_entries)
        declared = len(entries)
        note = "central directory missing or damaged; read the local headers"
    else:
        entries, declared, cd_encrypted = central
    if not entries:
        if cd_encrypted:
            return FileInfo("zip", "application/zip", True, "central directory encrypted")
        if central is not None:
            return FileInfo("zip", "application/zip", False, "empty archive")
        return FileInfo("zip", "application/zip", None, "damaged zip: no entry could be read")

    names = _by_name(entries)
    first = entries[0]
    if first.name == "mimetype" and first.method == 0 and not first.encrypted:
        mt = (_inflate(data, first, 200) or b"").decode("ascii", "replace").strip()
        if mt.startswith("application/vnd.oasis.opendocument"):
            return _odf(data, entries, mt)
    ooxml = "[Content_Types].xml" in names

    limited_why: list[str] = []
    if declared > len(entries):
        limited_why.append(f"{declared} entries, only the first {len(entries)} read")
    files = [e for e in entries if not e.is_dir]
    total = sum(e.usize for e in files)
    big = max((e.usize for e in files), default=0)
    if big > lim.max_declared_member or total > lim.max_declared_total:
        limited_why.append(f"entries declare {total / (1 << 30):.1f} GiB uncompressed (zip bomb?)")

    statuses: list[bool | None] = []
    members: list[FileInfo] = []
    schemes: dict[str, int] = {}
    inspected = 0
    inner_protected = 0
    for e in files:
        if e.encrypted or cd_encrypted:
            schemes[e.scheme] = schemes.get(e.scheme, 0) + 1
            status: bool | None = True
            info = FileInfo("other", "", True, f"encrypted entry ({e.scheme})", name=e.name)
        else:
            info = FileInfo("other", "", False, "entry stored in clear", name=e.name, size=e.usize)
            status = False
            if not ooxml and inspected < lim.max_inspect_members:
                inspected += 1
                head = _inflate(data, e, HEAD) or b""
                if head.startswith(ENCRYPTABLE) and inner is None:
                    limited_why.append(f"{e.name}: nested too deep to inspect")
                    status = None
                elif inner and head.startswith(ENCRYPTABLE) and not (e.flags & 0x8 and not e.usize):
                    if e.usize <= lim.max_declared_member and budget.take(e.usize):
                        body = _inflate(data, e, e.usize + 1)
                        if body is not None and len(body) > e.usize:
                            limited_why.append(f"{e.name}: larger than declared")
                            body = None
                        if body is not None:
                            sub = inner(body, e.name)
                            info = FileInfo(
                                sub.kind,
                                sub.mime,
                                sub.encrypted,
                                sub.detail,
                                sub.members,
                                sub.limited,
                                e.name,
                                e.usize,
                            )
                            if sub.limited:
                                limited_why.append(f"{e.name}: {sub.detail}")
                            # A clear entry holding a protected file still protects the data.
                            status = sub.encrypted
                            inner_protected += status is True
                    else:
                        info = FileInfo(
                            "other",
                            "",
                            False,
                            "not inspected: over the size budget",
                            name=e.name,
                            size=e.usize,
                        )
        statuses.append(status)
        if len(members) < lim.max_members_listed:
            members.append(info)

    n_enc = sum(1 for e in files if e.encrypted or cd_encrypted)
    verdict = combine(statuses)
    how = ", ".join(sorted(schemes))
    if cd_encrypted:
        detail = "central directory and entries encrypted (PKWARE strong encryption)"
    elif not files:
        detail = "no files, only folders"
    elif n_enc == len(files):
        detail = f"all {len(files)} entries encrypted ({how})"
    elif n_enc:
        detail = f"mixed: {n_enc} of {len(files)} entries encrypted ({how}), the rest in clear"
    elif inner_protected == len(files):
        detail = f"entries stored in clear, but all {len(files)} are themselves encrypted files"
    else:
        detail = f"{len(files)} entries, none encrypted"
    if verdict is None and n_enc != len(files):
        detail += "; some inner files could not be judged"
    if limited_why:
        detail += "; " + "; ".join(dict.fromkeys(limited_why))
        if verdict is True and declared > len(entries):
            verdict = None  # unread entries might be in clear
    if note:
        detail += f" ({note})"
    if ooxml:
        mime = next((m for p, m in OOXML_MIME.items() if any(n.startswith(p) for n in names)), "")
        return FileInfo(
            "ooxml",
            mime or "application/vnd.openxmlformats-officedocument",
            verdict,
            "Office document (OOXML) without a password" if not n_enc else detail,
            (),
            bool(limited_why),
        )
    return FileInfo("zip", "application/zip", verdict, detail, tuple(members), bool(limited_why))
