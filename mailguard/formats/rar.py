"""RAR 4 and 5: per-file encryption flags and encrypted headers (rar -hp), from block headers."""

from __future__ import annotations

from mailguard.formats.base import FileInfo, combine, u16, u32

RAR4 = b"Rar!\x1a\x07\x00"
RAR5 = b"Rar!\x1a\x07\x01\x00"
MIME = "application/vnd.rar"


def _vint(b: bytes, i: int) -> tuple[int, int]:
    v = shift = 0
    for _ in range(10):
        if not 0 <= i < len(b):
            raise ValueError("truncated")
        c = b[i]
        i += 1
        v |= (c & 0x7F) << shift
        shift += 7
        if not c & 0x80:
            return v, i
    raise ValueError("vint too long")


def _verdict(statuses: list[bool | None], truncated: bool, more: bool) -> FileInfo:
    n, enc = len(statuses), sum(1 for s in statuses if s)
    if n == 0:
        return FileInfo("rar", MIME, None if truncated else False, "RAR archive without files")
    if enc == n:
        detail = f"all {n} files encrypted; file names visible"
    elif enc:
        detail = f"mixed: {enc} of {n} files encrypted, the rest in clear"
    else:
        detail = f"{n} files, none encrypted"
    verdict = combine(statuses)
    if verdict is True and (truncated or more):
        verdict = None  # files we could not read may be in clear
    return FileInfo(
        "rar", MIME, verdict, detail + ("; not all headers read" if more else ""), limited=more
    )


def _rar4(b: bytes, max_entries: int) -> FileInfo:
    i = len(RAR4)
    statuses: list[bool | None] = []
    for _ in range(max_entries * 2):
        if i + 7 > len(b):
            return _verdict(statuses, True, False)
        htype, flags, size = b[i + 2], u16(b, i + 3), u16(b, i + 5)
        add = u32(b, i + 7) if flags & 0x8000 else 0
        if htype == 0x73 and flags & 0x0080:
            return FileInfo(
                "rar", MIME, True, "RAR with encrypted headers: names and contents hidden"
            )
        if htype == 0x74 and (flags & 0xE0) != 0xE0:  # 0xE0 = directory
            statuses.append(bool(flags & 0x04))
            if len(statuses) >= max_entries:
                return _verdict(statuses, False, True)
        if htype == 0x7B or size < 7:
            return _verdict(statuses, size < 7, False)
        i += size + add
    return _verdict(statuses, False, True)


def _rar5(b: bytes, max_entries: int) -> FileInfo:
    i = len(RAR5)
    statuses: list[bool | None] = []
    for _ in range(max_entries * 2):
        try:
            hsize, hstart = _vint(b, i + 4)
            htype, j = _vint(b, hstart)
            hflags, j = _vint(b, j)
            extra = data_size = 0
            if hflags & 1:
                extra, j = _vint(b, j)
            if hflags & 2:
                data_size, j = _vint(b, j)
        except ValueError:
            return _verdict(statuses, True, False)
        hend = hstart + hsize
        if hsize == 0 or hend > len(b):
            return _verdict(statuses, True, False)
        if htype == 4:
            return FileInfo(
                "rar", MIME, True, "RAR with encrypted headers: names and contents hidden"
            )
        if htype == 2:
            try:
                fflags, _ = _vint(b, j)
            except ValueError:
                return _verdict(statuses, True, False)
            if not fflags & 1:  # not a directory
                enc = False
                k = max(j, hend - extra)  # the extra area ends the header
                while extra and k < hend:
                    rsize, k2 = _vint(b, k)
                    rtype, _ = _vint(b, k2)
                    enc |= rtype == 0x01  # file encryption record
                    if rsize == 0:
                        break
                    k = k2 + rsize
                statuses.append(enc)
                if len(statuses) >= max_entries:
                    return _verdict(statuses, False, True)
        if htype == 5:
            return _verdict(statuses, False, False)
        i = hend + data_size
    return _verdict(statuses, False, True)


def sniff_rar(data: bytes, max_entries: int) -> FileInfo:
    try:
        if data.startswith(RAR5):
            return _rar5(data, max_entries)
        return _rar4(data, max_entries)
    except ValueError as e:
        return FileInfo("rar", MIME, None, f"RAR headers unreadable: {e}")
