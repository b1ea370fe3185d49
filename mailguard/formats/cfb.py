"""OLE compound files (CFB): encrypted OOXML containers and legacy .doc/.xls/.ppt/.msg.

A password-protected .docx/.xlsx/.pptx is not a zip: Office wraps it in a CFB file holding the
streams "EncryptionInfo" and "EncryptedPackage". Legacy binary Office files say it themselves:
Word's FIB flag fEncrypted, Excel's FILEPASS record, PowerPoint's encrypted CurrentUserAtom token.
The reader is small and bounded (chains are followed at most once per sector).
"""

from __future__ import annotations

import struct

from mailguard.formats.base import FileInfo, u16, u32

MAGIC = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"
ENDS = frozenset({0xFFFFFFFE, 0xFFFFFFFF, 0xFFFFFFFD, 0xFFFFFFFC})
OLE_MIME = "application/x-ole-storage"
EXT_MIME = {
    "docx": "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
    "docm": "application/vnd.ms-word.document.macroEnabled.12",
    "xlsx": "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
    "xlsm": "application/vnd.ms-excel.sheet.macroEnabled.12",
    "xlsb": "application/vnd.ms-excel.sheet.binary.macroEnabled.12",
    "pptx": "application/vnd.openxmlformats-officedocument.presentationml.presentation",
    "pptm": "application/vnd.ms-powerpoint.presentation.macroEnabled.12",
}
MAX_DIR_ENTRIES = 4096
MAX_STREAM = 4 << 20  # legacy Office: we only read headers and the first records


class CfbError(ValueError):
    pass


class Cfb:
    """Read-only view of a compound file: root-level names and (bounded) stream reads."""

    def __init__(self, data: bytes) -> None:
        if len(data) < 512 or not data.startswith(MAGIC):
            raise CfbError("not a compound file")
        self.d = data
        shift = u16(data, 0x1E)
        if shift not in (9, 12):
            raise CfbError(f"sector shift {shift}")
        self.ssz = 1 << shift
        self.mini_ssz = 1 << u16(data, 0x20)
        self.cutoff = u32(data, 0x38)
        self.nsect = max(0, len(data) // self.ssz - 1)
        self.fat = self._fat(u32(data, 0x2C))
        self.minifat: list[int] | None = None
        self.mini_first = u32(data, 0x3C)
        self.entries = self._directory(u32(data, 0x30))
        if not self.entries or self.entries[0][1] != 5:
            raise CfbError("no root entry")
        self.root = self._children(0)

    def _sector(self, n: int) -> bytes:
        off = (n + 1) * self.ssz
        return self.d[off : off + self.ssz]

    def _fat(self, nfat: int) -> list[int]:
        d = self.d
        ids = [u32(d, 0x4C + 4 * i) for i in range(109)]
        nxt, seen = u32(d, 0x44), set[int]()
        per = self.ssz // 4 - 1
        while nxt not in ENDS and nxt not in seen and nxt < self.nsect and len(seen) < 1 << 16:
            seen.add(nxt)
            sec = self._sector(nxt)
            ids.extend(struct.unpack_from(f"<{per}I", sec))
            nxt = u32(sec, per * 4)
        fat: list[int] = []
        for sid in ids[: max(0, min(nfat, self.nsect))]:
            if sid in ENDS or sid >= self.nsect:
                continue
            fat.extend(struct.unpack_from(f"<{self.ssz // 4}I", self._sector(sid)))
        return fat

    def _chain(self, start: int, table: list[int], limit: int) -> list[int]:
        out: list[int] = []
        seen: set[int] = set()
        n = start
        while n not in ENDS and n < len(table) and n not in seen and len(out) < limit:
            seen.add(n)
            out.append(n)
            n = table[n]
        return out

    def _directory(self, first: int) -> list[tuple[str, int, int, int, int, int, int]]:
        raw = b"".join(self._sector(s) for s in self._chain(first, self.fat, self.nsect))
        out = []
        for off in range(0, min(len(raw), MAX_DIR_ENTRIES * 128), 128):
            e = raw[off : off + 128]
            if len(e) < 128:
                break
            nlen = min(u16(e, 64), 64)
            name = e[: max(0, nlen - 2)].decode("utf-16-le", "replace")
            size = u32(e, 120) if self.ssz == 512 else struct.unpack_from("<Q", e, 120)[0]
            # name, type, left, right, child, start, size
            out.append((name, e[66], u32(e, 68), u32(e, 72), u32(e, 76), u32(e, 116), size))
        return out

    def _children(self, idx: int) -> dict[str, int]:
        """Names of a storage's direct children (the red-black tree, walked iteratively)."""
        out: dict[str, int] = {}
        stack = [self.entries[idx][4]]
        seen: set[int] = set()
        while stack:
            n = stack.pop()
            if n >= len(self.entries) or n in seen:
                continue
            seen.add(n)
            e = self.entries[n]
            out[e[0]] = n
            stack.extend((e[2], e[3]))
        return out

    def read(self, name: str, limit: int = MAX_STREAM) -> bytes | None:
        idx = self.root.get(name)
        if idx is None:
            return None
        _, typ, _, _, _, start, size = self.entries[idx]
        if typ != 2:
            return None
        want = min(size, limit)
        if size < self.cutoff:
            if self.minifat is None:
                sectors = self._chain(self.mini_first, self.fat, self.nsect)
                raw = b"".join(self._sector(s) for s in sectors)
                self.minifat = list(struct.unpack_from(f"<{len(raw) // 4}I", raw))
            root_start = self.entries[0][5]
            container = b"".join(
                self._sector(s) for s in self._chain(root_start, self.fat, self.nsect)
            )
            out = bytearray()
            for ms in self._chain(start, self.minifat, len(self.minifat)):
                out += container[ms * self.mini_ssz : (ms + 1) * self.mini_ssz]
                if len(out) >= want:
                    break
            return bytes(out[:want])
        need = want // self.ssz + 1
        return b"".join(self._sector(s) for s in self._chain(start, self.fat, need))[:want]


def _excel(wb: bytes) -> FileInfo:
    mime = "application/vnd.ms-excel"
    pos = 0
    for _ in range(20000):
        if pos + 4 > len(wb):
            break
        rtype, rlen = u16(wb, pos), u16(wb, pos + 2)
        if rtype == 0x002F:  # FILEPASS
            kind = u16(wb, pos + 4)
            how = "XOR obfuscation" if kind == 0 else "RC4"
            if kind == 1 and pos + 8 <= len(wb) and u16(wb, pos + 6) >= 2:
                how = "RC4 CryptoAPI"
            return FileInfo("ole", mime, True, f"Excel workbook protected with a password ({how})")
        if rtype == 0x000A:  # EOF of the workbook globals: FILEPASS comes before it
            break
        pos += 4 + rlen
    return FileInfo("ole", mime, False, "Excel workbook (legacy .xls) without a password")


def sniff_cfb(data: bytes, filename: str = "") -> FileInfo:
    try:
        cfb = Cfb(data)
    except (CfbError, struct.error, IndexError) as e:
        return FileInfo("ole", OLE_MIME, None, f"damaged compound file: {e}")
    names = cfb.root
    ext = filename.rsplit(".", 1)[-1].lower() if "." in filename else ""
    try:
        if "EncryptedPackage" in names:
            info = cfb.read("EncryptionInfo", 64) or b""
            major, minor = (u16(info, 0), u16(info, 2)) if len(info) >= 4 else (0, 0)
            scheme = {
                (4, 4): "Agile encryption (AES)",
                (3, 2): "Standard encryption (AES)",
                (4, 2): "Standard encryption (AES)",
            }.get((major, minor), f"encryption version {major}.{minor}")
            return FileInfo(
                "ooxml",
                EXT_MIME.get(ext, OLE_MIME),
                True,
                f"password-protected Office document ({scheme})",
            )
        if "WordDocument" in names:
            fib = cfb.read("WordDocument", 64) or b""
            mime = "application/msword"
            if len(fib) < 12 or u16(fib, 0) != 0xA5EC:
                return FileInfo("ole", mime, None, "Word document with an unknown header")
            flags = u16(fib, 10)
            if flags & 0x0100:
                how = "XOR obfuscation" if flags & 0x8000 else "RC4"
                return FileInfo(
                    "ole", mime, True, f"Word document protected with a password ({how})"
                )
            return FileInfo("ole", mime, False, "Word document (legacy .doc) without a password")
        for book in ("Workbook", "Book"):
            if book in names:
                return _excel(cfb.read(book, 1 << 20) or b"")
        if "PowerPoint Document" in names:
            mime = "application/vnd.ms-powerpoint"
            cu = cfb.read("Current User", 64) or b""
            if len(cu) >= 16:
                token = u32(cu, 12)
                if token == 0xF3D1C4DF:
                    return FileInfo(
                        "ole", mime, True, "PowerPoint presentation protected with a password"
                    )
                if token == 0xE391C05F:
                    return FileInfo(
                        "ole",
                        mime,
                        False,
                        "PowerPoint presentation (legacy .ppt) without a password",
                    )
            return FileInfo(
                "ole", mime, None, "PowerPoint presentation: encryption state unreadable"
            )
        if any(n.startswith(("__substg1.0_", "__properties_version1.0")) for n in names):
            return FileInfo(
                "msg", "application/vnd.ms-outlook", False, "Outlook message file (.msg)"
            )
    except (struct.error, IndexError, ValueError) as e:
        return FileInfo("ole", OLE_MIME, None, f"damaged compound file: {e}")
    return FileInfo("ole", OLE_MIME, None, "compound file of an unknown application")
