"""Builders for attachment tests: real tools where they exist, hand-built bytes where none does.

Formats with no free writer (legacy Office, TNEF, RAR) are built here field by field from their
specifications ([MS-CFB], [MS-DOC], [MS-XLS], [MS-PPT], [MS-OXTNEF], RARLAB technote).
"""

from __future__ import annotations

import io
import shutil
import struct
import subprocess
import zipfile
from pathlib import Path

import pytest
from conftest import missing_tool

CT_XML = (
    '<?xml version="1.0" encoding="UTF-8" standalone="yes"?>'
    '<Types xmlns="http://schemas.openxmlformats.org/package/2006/content-types">'
    '<Default Extension="xml" ContentType="application/xml"/></Types>'
)


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        missing_tool(f"{tool} not installed")
    return path


def run(*args: str | Path, cwd: Path | None = None) -> None:
    subprocess.run([str(a) for a in args], check=True, cwd=cwd, capture_output=True, timeout=60)


def minimal_pdf(text: str = "hello") -> bytes:
    objs = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 200 200] /Contents 4 0 R >>",
    ]
    content = b"BT /F1 12 Tf 20 100 Td (" + text.encode() + b") Tj ET"
    objs.append(b"<< /Length %d >>\nstream\n" % len(content) + content + b"\nendstream")
    out = b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n"
    offs = []
    for i, o in enumerate(objs, 1):
        offs.append(len(out))
        out += b"%d 0 obj\n" % i + o + b"\nendobj\n"
    x = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objs) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offs)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objs) + 1, x)
    return out


def qpdf_encrypt(
    tmp: Path, user: str, owner: str, bits: str, *extra: str, post: tuple[str, ...] = ()
) -> bytes:
    qpdf = need("qpdf")
    src, dst = tmp / "in.pdf", tmp / "out.pdf"
    src.write_bytes(minimal_pdf())
    run(qpdf, *post, "--allow-weak-crypto", "--encrypt", user, owner, bits, *extra, "--", src, dst)
    return dst.read_bytes()


def ooxml(app: str = "xl") -> bytes:
    b = io.BytesIO()
    with zipfile.ZipFile(b, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("[Content_Types].xml", CT_XML)
        z.writestr("_rels/.rels", "<Relationships/>")
        main = {"xl": "xl/workbook.xml", "word": "word/document.xml", "ppt": "ppt/presentation.xml"}
        z.writestr(main[app], "<x>顧客リスト</x>")
    return b.getvalue()


def ooxml_encrypted(app: str = "xl", password: str = "pw") -> bytes:
    ooxml_mod = pytest.importorskip("msoffcrypto.format.ooxml")
    out = io.BytesIO()
    ooxml_mod.OOXMLFile(io.BytesIO(ooxml(app))).encrypt(password, out)
    return out.getvalue()


# --- [MS-CFB] compound file, version 3, no mini stream (streams padded to the 4096 cutoff) ---

FREE, END, FATSECT, NOSTREAM = 0xFFFFFFFF, 0xFFFFFFFE, 0xFFFFFFFD, 0xFFFFFFFF


def cfb(streams: dict[str, bytes]) -> bytes:
    ss = 512
    items = [(n, d + b"\0" * max(0, 4096 - len(d))) for n, d in streams.items()]
    ndir = -(-(1 + len(items)) * 128 // ss)
    data_secs = [-(-len(d) // ss) for _, d in items]
    nfat = 1
    while nfat * (ss // 4) < nfat + ndir + sum(data_secs):
        nfat += 1
    fat = [FREE] * (nfat * ss // 4)
    for i in range(nfat):
        fat[i] = FATSECT

    def chain(start: int, n: int) -> None:
        for k in range(n):
            fat[start + k] = start + k + 1 if k < n - 1 else END

    dir_start = nfat
    chain(dir_start, ndir)
    starts, s = [], dir_start + ndir
    for n in data_secs:
        starts.append(s)
        chain(s, n)
        s += n

    def entry(name: str, typ: int, child: int, right: int, start: int, size: int) -> bytes:
        raw = name.encode("utf-16-le") + b"\0\0"
        return (
            raw.ljust(64, b"\0")
            + struct.pack("<HBB", len(raw), typ, 1)
            + struct.pack("<III", NOSTREAM, right, child)
            + b"\0" * 36
            + struct.pack("<IQ", start, size)
        )

    dirs = entry("Root Entry", 5, 1 if items else NOSTREAM, NOSTREAM, END, 0)
    for i, ((name, data), st) in enumerate(zip(items, starts, strict=True), 1):
        dirs += entry(name, 2, NOSTREAM, i + 1 if i < len(items) else NOSTREAM, st, len(data))
    dirs = dirs.ljust(ndir * ss, b"\0")
    difat = list(range(nfat)) + [FREE] * (109 - nfat)
    header = (
        b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"
        + b"\0" * 16
        + struct.pack("<HHHHH", 0x3E, 3, 0xFFFE, 9, 6)
        + b"\0" * 6
        + struct.pack("<IIIIIIIII", 0, nfat, dir_start, 0, 4096, END, 0, END, 0)
        + struct.pack("<109I", *difat)
    )
    body = (
        struct.pack(f"<{len(fat)}I", *fat)
        + dirs
        + b"".join(d.ljust(-(-len(d) // ss) * ss, b"\0") for _, d in items)
    )
    return header + body


def word_doc(encrypted: bool, obfuscated: bool = False) -> bytes:
    flags = (0x0100 if encrypted else 0) | (0x8000 if obfuscated else 0) | 0x0200
    fib = struct.pack("<HHHHHH", 0xA5EC, 0x00C1, 0, 0x0411, 0, flags)
    return cfb({"WordDocument": fib, "1Table": b"\0" * 64, "\x05SummaryInformation": b"\0" * 48})


def excel_xls(encrypted: bool) -> bytes:
    def rec(t: int, data: bytes) -> bytes:
        return struct.pack("<HH", t, len(data)) + data

    body = rec(0x0809, struct.pack("<HHHHII", 0x0600, 0x0005, 0x2775, 0x07CD, 0, 0))
    if encrypted:  # FILEPASS, RC4 CryptoAPI (version 4.2)
        body += rec(0x002F, struct.pack("<HHH", 1, 4, 2) + b"\0" * 48)
    body += rec(0x0042, struct.pack("<H", 932))  # CODEPAGE: Shift_JIS
    body += rec(0x000A, b"")
    return cfb({"Workbook": body})


def powerpoint_ppt(encrypted: bool) -> bytes:
    token = 0xF3D1C4DF if encrypted else 0xE391C05F
    current_user = struct.pack("<HHI", 0, 0x0FF6, 20) + struct.pack("<II", 20, token) + b"\0" * 12
    return cfb({"Current User": current_user, "PowerPoint Document": b"\0" * 64})


def outlook_msg() -> bytes:
    return cfb(
        {"__substg1.0_0037001F": "件名".encode("utf-16-le"), "__properties_version1.0": b"\0" * 32}
    )


# --- [MS-OXTNEF] winmail.dat ---


def _attr(level: int, aid: int, data: bytes) -> bytes:
    return struct.pack("<BII", level, aid, len(data)) + data + struct.pack("<H", sum(data) & 0xFFFF)


def _pad4(b: bytes) -> bytes:
    return b + b"\0" * (-len(b) % 4)


def tnef(files: list[tuple[str, bytes]], long_names: bool = True) -> bytes:
    out = b"\x78\x9f\x3e\x22" + struct.pack("<H", 0x1234)
    out += _attr(1, 0x00089006, struct.pack("<I", 0x00010000))  # attTnefVersion
    out += _attr(1, 0x00069007, struct.pack("<II", 932, 0))  # attOemCodepage: CP932
    for name, data in files:
        out += _attr(2, 0x00069002, b"\x01\x00" + b"\xff" * 4 + b"\0" * 8)  # attAttachRendData
        out += _attr(2, 0x00018010, name.encode("cp932") + b"\0")  # attAttachTitle
        out += _attr(2, 0x0006800F, data)  # attAttachData
        if long_names:
            uname = name.encode("utf-16-le") + b"\0\0"
            props = struct.pack("<I", 2)
            props += struct.pack("<HHI", 0x0003, 0x3705, 1)  # PR_ATTACH_METHOD = by value
            props += struct.pack("<HHII", 0x001F, 0x3707, 1, len(uname)) + _pad4(uname)
            out += _attr(2, 0x00069005, props)
    return out


# --- RAR 4 and RAR 5 block headers (contents are opaque bytes; only headers matter) ---


def _vint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _rar5_block(fields: bytes, data: bytes = b"") -> bytes:
    return b"\0\0\0\0" + _vint(len(fields)) + fields + data


def rar5(files: list[tuple[str, bool]], headers_encrypted: bool = False) -> bytes:
    out = b"Rar!\x1a\x07\x01\x00"
    if headers_encrypted:
        out += _rar5_block(_vint(4) + _vint(0) + _vint(0) + _vint(0) + _vint(15) + b"\1" * 16)
        return out + b"\x5a" * 64
    out += _rar5_block(_vint(1) + _vint(0) + _vint(0))
    for name, enc in files:
        payload = b"\x11" * 32
        extra = b""
        if enc:
            rec = _vint(1) + _vint(0) + _vint(0) + _vint(15) + b"\2" * 32
            extra = _vint(len(rec)) + rec
        flags = 0x02 | (0x01 if extra else 0)
        raw = name.encode()
        fields = _vint(2) + _vint(flags)
        if extra:
            fields += _vint(len(extra))
        fields += _vint(len(payload)) + _vint(0) + _vint(len(payload)) + _vint(0x20)
        fields += _vint(0) + _vint(0) + _vint(len(raw)) + raw + extra
        out += _rar5_block(fields, payload)
    return out + _rar5_block(_vint(5) + _vint(0) + _vint(0))


def rar4(files: list[tuple[str, bool]], headers_encrypted: bool = False) -> bytes:
    out = b"Rar!\x1a\x07\x00"
    out += struct.pack("<HBHH", 0, 0x73, 0x0080 if headers_encrypted else 0, 13) + b"\0" * 6
    if headers_encrypted:
        return out + b"\x5a" * 64
    for name, enc in files:
        raw = name.encode("cp932")
        payload = b"\x11" * 16
        flags = 0x8000 | (0x04 if enc else 0)
        head = struct.pack(
            "<IIBIIBBHI", len(payload), len(payload), 2, 0, 0, 29, 0x33, len(raw), 0x20
        )
        out += struct.pack("<HBHH", 0, 0x74, flags, 7 + len(head) + len(raw)) + head + raw + payload
    return out + struct.pack("<HBHH", 0, 0x7B, 0x4000, 7)


def patch_all_entries(data: bytes, *, flag: int = 0, usize: int | None = None) -> bytes:
    """Set bits in every entry's general-purpose flags (and optionally its declared size)."""
    b = bytearray(data)
    for sig, flag_off, usize_off in ((b"PK\x01\x02", 8, 24), (b"PK\x03\x04", 6, 22)):
        pos = b.find(sig)
        while pos >= 0:
            struct.pack_into(
                "<H", b, pos + flag_off, struct.unpack_from("<H", b, pos + flag_off)[0] | flag
            )
            if usize is not None:
                struct.pack_into("<I", b, pos + usize_off, usize)
            pos = b.find(sig, pos + 4)
    return bytes(b)
