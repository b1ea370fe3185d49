"""7z: encrypted streams (AES coder 06F10701) and encrypted headers (-mhe=on).

The header is usually LZMA-compressed ("encoded header"); we unpack it (bounded) with the stdlib
lzma module and read the coder list of every folder. If the encoded header itself goes through the
AES coder, the file names are hidden as well: that is the strongest protection 7z offers.
"""

from __future__ import annotations

import lzma

from mailguard.formats.base import FileInfo, u32, u64

MAGIC = b"7z\xbc\xaf\x27\x1c"
MIME = "application/x-7z-compressed"
AES = b"\x06\xf1\x07\x01"
LZMA1 = b"\x03\x01\x01"
LZMA2 = b"\x21"
MAX_HEADER = 16 << 20


class SzError(ValueError):
    pass


class _R:
    def __init__(self, b: bytes) -> None:
        self.b = b
        self.i = 0

    def byte(self) -> int:
        if self.i >= len(self.b):
            raise SzError("truncated header")
        v = self.b[self.i]
        self.i += 1
        return v

    def raw(self, n: int) -> bytes:
        if n < 0 or self.i + n > len(self.b):
            raise SzError("truncated header")
        v = self.b[self.i : self.i + n]
        self.i += n
        return v

    def num(self) -> int:
        first = self.byte()
        mask = 0x80
        value = 0
        for i in range(8):
            if first & mask == 0:
                return value | ((first & (mask - 1)) << (8 * i))
            value |= self.byte() << (8 * i)
            mask >>= 1
        return value

    def bits(self, n: int) -> list[bool]:
        out: list[bool] = []
        mask = cur = 0
        for _ in range(n):
            if mask == 0:
                cur, mask = self.byte(), 0x80
            out.append(bool(cur & mask))
            mask >>= 1
        return out

    def defined(self, n: int) -> list[bool]:
        return [True] * n if self.byte() else self.bits(n)


Folder = list[tuple[bytes, bytes]]  # coders: (id, properties)


def _folder(r: _R) -> tuple[Folder, int]:
    coders: Folder = []
    total_in = total_out = 0
    ncoders = r.num()
    if ncoders > 64:
        raise SzError("too many coders")
    for _ in range(ncoders):
        flag = r.byte()
        cid = r.raw(flag & 0x0F)
        nin, nout = (r.num(), r.num()) if flag & 0x10 else (1, 1)
        props = r.raw(r.num()) if flag & 0x20 else b""
        if flag & 0x80:
            raise SzError("alternative coders are not supported")
        coders.append((cid, props))
        total_in += nin
        total_out += nout
    for _ in range(total_out - 1):  # bind pairs
        r.num()
        r.num()
    npacked = total_in - (total_out - 1)
    if npacked > 1:
        for _ in range(npacked):
            r.num()
    return coders, total_out


def _streams_info(r: _R) -> tuple[int, list[int], list[Folder], list[int]]:
    """(pack_pos, pack_sizes, folders, unpack size of each folder's main output)."""
    pack_pos, pack_sizes, folders, unpack = 0, [], [], []
    outs: list[int] = []
    prop = r.byte()
    if prop == 0x06:  # PackInfo
        pack_pos = r.num()
        n = r.num()
        if n > 1 << 16:
            raise SzError("too many pack streams")
        prop = r.byte()
        while prop != 0x00:
            if prop == 0x09:
                pack_sizes = [r.num() for _ in range(n)]
            elif prop == 0x0A:
                defined = r.defined(n)
                r.raw(4 * sum(defined))
            else:
                raise SzError(f"unexpected property {prop:#x} in PackInfo")
            prop = r.byte()
        prop = r.byte()
    if prop == 0x07:  # UnPackInfo
        if r.byte() != 0x0B:
            raise SzError("expected folder list")
        nf = r.num()
        if nf > 1 << 16:
            raise SzError("too many folders")
        if r.byte() != 0:
            raise SzError("external folders are not supported")
        for _ in range(nf):
            coders, nout = _folder(r)
            folders.append(coders)
            outs.append(nout)
        if r.byte() != 0x0C:
            raise SzError("expected unpack sizes")
        for nout in outs:
            sizes = [r.num() for _ in range(nout)]
            unpack.append(sizes[-1] if sizes else 0)
    return pack_pos, pack_sizes, folders, unpack


def _lzma_filter(cid: bytes, props: bytes) -> dict[str, object]:
    if cid == LZMA1 and len(props) == 5:
        d = props[0]
        lc, d = d % 9, d // 9
        lp, pb = d % 5, d // 5
        return {"id": lzma.FILTER_LZMA1, "lc": lc, "lp": lp, "pb": pb, "dict_size": u32(props, 1)}
    if cid == LZMA2 and len(props) == 1:
        p = props[0]
        dict_size = 0xFFFFFFFF if p >= 40 else (2 | (p & 1)) << (p // 2 + 11)
        return {"id": lzma.FILTER_LZMA2, "dict_size": dict_size}
    raise SzError(f"header coder {cid.hex()} not supported")


def _coders_of(folders: list[Folder]) -> set[bytes]:
    return {cid for f in folders for cid, _ in f}


def sniff_7z(data: bytes) -> FileInfo:
    if len(data) < 32:
        return FileInfo("7z", MIME, None, "truncated 7z archive")
    off, size = u64(data, 12), u64(data, 20)
    start = 32 + off
    if size == 0:
        return FileInfo("7z", MIME, False, "empty 7z archive")
    if start + size > len(data) or size > MAX_HEADER:
        return FileInfo("7z", MIME, None, "7z header missing (truncated or damaged)")
    header = data[start : start + size]
    try:
        for _ in range(4):  # an encoded header may (in theory) encode another
            r = _R(header)
            kind = r.byte()
            if kind == 0x01:
                break
            if kind != 0x17:
                raise SzError(f"unknown header type {kind:#x}")
            pack_pos, pack_sizes, folders, unpack = _streams_info(r)
            if AES in _coders_of(folders):
                return FileInfo(
                    "7z", MIME, True, "7z with encrypted headers: names and contents hidden (AES)"
                )
            if len(folders) != 1 or not pack_sizes or len(folders[0]) != 1:
                raise SzError("header packed with an unsupported coder chain")
            cid, props = folders[0][0]
            want = unpack[0]
            if want > MAX_HEADER:
                raise SzError("header too large")
            p0 = 32 + pack_pos
            dec = lzma.LZMADecompressor(lzma.FORMAT_RAW, filters=[_lzma_filter(cid, props)])
            header = dec.decompress(data[p0 : p0 + pack_sizes[0]], want)
        else:
            raise SzError("too many nested encoded headers")
        # header: optional ArchiveProperties, AdditionalStreamsInfo, then MainStreamsInfo.
        prop = r.byte()
        if prop == 0x02:
            raise SzError("archive properties are not supported")
        if prop == 0x03:
            _streams_info(r)
            prop = r.byte()
        if prop != 0x04:
            return FileInfo("7z", MIME, False, "7z archive without file contents")
        _, _, folders, _ = _streams_info(r)
    except (SzError, lzma.LZMAError, ValueError, IndexError) as e:
        return FileInfo("7z", MIME, None, f"7z header unreadable: {e}")
    enc = sum(1 for f in folders if any(cid == AES for cid, _ in f))
    if not folders:
        return FileInfo("7z", MIME, False, "7z archive with empty files only")
    if enc == len(folders):
        return FileInfo("7z", MIME, True, "7z contents encrypted (AES-256); file names visible")
    if enc:
        return FileInfo(
            "7z",
            MIME,
            False,
            f"mixed: {enc} of {len(folders)} 7z blocks encrypted, the rest in clear",
        )
    return FileInfo("7z", MIME, False, "7z archive without a password")
