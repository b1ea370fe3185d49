"""Zip writer for the zip transform: AES-256 (pyzipper) or ZipCrypto (libarchive), Japanese names.

Two backends, one result shape:

- AES-256 (WinZip AE-2, method 99) through pyzipper, the default. 7-Zip, WinRAR, Info-ZIP's
  successors and macOS/Windows third-party tools open it; Windows Explorer and macOS Archive
  Utility do not.
- ZipCrypto (traditional PKWARE encryption, APPNOTE 6.1) through libarchive (libarchive-c), for
  destinations that must open the zip with Windows Explorer. pyzipper cannot write it and the
  cipher is inherently byte-serial: a pure-Python loop runs at < 1 MB/s (30 s for 25 MB, holding
  the GIL); libarchive does it in C, in memory, with the passphrase passed through its API
  (not on a command line visible in /proc like `zip -P` / `7z -p`).

Names: UTF-8 with general-purpose flag bit 11 by default. The "cp932" profile rewrites each entry
name to CP932 without bit 11 (what Japanese Windows Explorer and old archivers expect) and adds
the Info-ZIP Unicode Path extra field (0x7075) with the UTF-8 name, which Info-ZIP unzip and
7-Zip prefer when its CRC matches the CP932 name.

Names are made safe before they go in (`clean_name`, `fit_name`, also applied by `build_zip`):
control, bidi (U+202E …) and invisible format characters are dropped, slashes, backslashes and
their look-alikes (∕ ／ ⁄ ＼ ∖ …) become "_", so no entry can spoof its extension or reach another
directory, and a name is cut to 255 bytes in the archive's filename charset on a character
boundary, keeping its extension (a 16-bit length field; Info-ZIP and Windows stop at 255 too).

Each member is stored when a 64 KiB sample does not deflate (JPEG, PDF, OOXML are already
compressed: deflating 25 MB of them costs ~1 s for nothing), deflated otherwise.
"""

from __future__ import annotations

import io
import itertools
import re
import struct
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

import pyzipper

Method = Literal["aes", "zipcrypto"]
NameCharset = Literal["utf-8", "cp932"]

CHUNK = 1 << 20  # feed the writers 1 MiB at a time: no extra whole-file copies
_SAMPLE = 64 * 1024
_FLAG_UTF8 = 0x800
_FLAG_DESCRIPTOR = 0x8
_UNICODE_PATH = 0x7075


MAX_NAME = 255  # bytes of a member (or zip) name in its charset
_MAX_EXT = 16  # a longer ".suffix" is not an extension worth keeping
# bidi controls and invisible format characters (they reorder or hide what the reader sees)
_HIDDEN = re.compile(
    "[\u00ad\u061c\u115f\u1160\u180e\u200b-\u200f\u202a-\u202e\u2060-\u206f"
    "\u3164\ufeff\ufff9-\ufffb\U000e0000-\U000e007f]"
)
# C0/C1 controls, characters Windows refuses in a name, slashes and their look-alikes
_UNSAFE = re.compile(
    '[\x00-\x1f\x7f-\x9f:*?"<>|'
    "/\u2044\u2215\u2571\u29f8\u2afb\u2afd\uff0f"  # / ⁄ ∕ ╱ ⧸ ⫻ ⫽ ／
    "\\\\\u2216\u2572\u29f5\u29f9\ufe68\uff3c"  # \ ∖ ╲ ⧵ ⧹ ﹨ ＼
    "\u2028\u2029]"
)


def clean_name(name: str) -> str:
    """`name` without hidden characters, with unsafe ones (controls, slashes and look-alikes,
    Windows' reserved punctuation) as "_" and no leading/trailing spaces or dots."""
    name = _UNSAFE.sub("_", _HIDDEN.sub("", name)).strip(" .")
    return name or "attachment"


def name_size(name: str, charset: str) -> int:
    """Bytes of `name` as written in the archive (cp932: an unencodable character is "_")."""
    if charset == "utf-8":
        return len(name.encode("utf-8", "surrogatepass"))
    return len(_encode_name(name, charset))


def fit_name(name: str, charset: str = "utf-8", *, tail: str = "", limit: int = MAX_NAME) -> str:
    """`name` + `tail` within `limit` bytes in `charset`: the stem is cut on a character
    boundary, its extension (and `tail`, which goes before the extension) kept."""
    stem, dot, ext = name.rpartition(".")
    if dot and stem and len(ext) <= _MAX_EXT and name_size(ext, charset) <= _MAX_EXT:
        end = tail + "." + ext
    else:
        stem, end = name, tail
    if name_size(stem + end, charset) <= limit:
        return stem + end
    budget = limit - name_size(end, charset) - name_size("…", charset)
    out: list[str] = []
    used = 0
    for ch in stem:
        n = name_size(ch, charset)
        if used + n > budget:
            break
        out.append(ch)
        used += n
    return "".join(out).rstrip(" .") + "…" + end


@dataclass(frozen=True, slots=True)
class Member:
    name: str
    data: bytes | memoryview
    mtime: datetime


def compressible(data: bytes | memoryview) -> bool:
    """True when deflate saves at least 5% on a sample from the start and the middle."""
    if len(data) < 256:
        return False
    mid = len(data) // 2
    sample = bytes(data[:_SAMPLE]) + bytes(data[mid : mid + _SAMPLE])
    return len(zlib.compress(sample, 1)) < 0.95 * len(sample)


def _chunks(data: bytes | memoryview) -> Iterator[memoryview]:
    mv = memoryview(data)
    for i in range(0, len(mv), CHUNK):
        yield mv[i : i + CHUNK]


def build_zip(
    members: Sequence[Member],
    password: str,
    *,
    method: Method = "aes",
    names: NameCharset = "utf-8",
    compresslevel: int = 6,
) -> bytes:
    """An encrypted zip of `members`; raises ValueError on an unknown method or charset.

    Member names are cleaned and cut to 255 bytes in `names` (see the module docstring), so a
    hostile name can neither overflow a length field nor hide its extension."""
    if names not in ("utf-8", "cp932"):
        raise ValueError(f"unknown filename_charset {names!r} (expected utf-8, cp932)")
    members = [
        m if (n := fit_name(clean_name(m.name), names)) == m.name else Member(n, m.data, m.mtime)
        for m in members
    ]
    if method == "aes":
        out = _aes(members, password, compresslevel)
    elif method == "zipcrypto":
        out = _zipcrypto(members, password, compresslevel)
    else:
        raise ValueError(f"unknown zip method {method!r} (expected aes, zipcrypto)")
    if names == "cp932":
        return rebuild([out], "cp932")
    if names != "utf-8":
        raise ValueError(f"unknown filename_charset {names!r} (expected utf-8, cp932)")
    return out


def _dos_time(dt: datetime) -> tuple[int, int, int, int, int, int]:
    dt = max(dt.replace(tzinfo=None), datetime(1980, 1, 1))
    return (dt.year, dt.month, dt.day, dt.hour, dt.minute, dt.second)


def _aes(members: Sequence[Member], password: str, level: int) -> bytes:
    buf = io.BytesIO()
    with pyzipper.AESZipFile(buf, "w", encryption=pyzipper.WZ_AES) as zf:
        zf.setpassword(password.encode("utf-8"))
        zf.setencryption(pyzipper.WZ_AES, nbits=256)
        for m in members:
            zi = pyzipper.zipfile_aes.AESZipInfo(m.name, _dos_time(m.mtime))
            zi.external_attr = 0o644 << 16
            if compressible(m.data):
                zi.compress_type = pyzipper.ZIP_DEFLATED
                zi._compresslevel = level  # what ZipFile.writestr sets from compresslevel=
            else:
                zi.compress_type = pyzipper.ZIP_STORED
            with zf.open(zi, "w") as w:
                for chunk in _chunks(m.data):
                    w.write(chunk)
    return buf.getvalue()


def _zipcrypto(members: Sequence[Member], password: str, level: int) -> bytes:
    import libarchive  # libarchive-c; needs the libarchive13 shared library

    # libarchive takes options only before the first entry: one archive per member (each with
    # its own store/deflate choice), merged afterwards by rebuild().
    archives = []
    for m in members:
        parts: list[bytes] = []

        def sink(data: bytes, parts: list[bytes] = parts) -> int:
            parts.append(bytes(data))
            return len(data)

        comp = f"deflate,zip:compression-level={level}" if compressible(m.data) else "store"
        opts = f"zip:encryption=zipcrypt,zip:hdrcharset=UTF-8,zip:compression={comp}"
        with libarchive.custom_writer(sink, "zip", options=opts, passphrase=password) as ar:
            ar.add_file_from_memory(
                m.name,
                len(m.data),
                (bytes(c) for c in _chunks(m.data)),
                permission=0o644,
                mtime=int(m.mtime.timestamp()),
            )
        archives.append(b"".join(parts))
        del parts
    return archives[0] if len(archives) == 1 else rebuild(archives)


# --- name re-coding ---------------------------------------------------------------------------

_EOCD = struct.Struct("<4s4H2LH")
_CEN = struct.Struct("<4s6H3L5H2L")
_LOC = struct.Struct("<4s5H3L2H")
_LOC_SIG = b"PK\x03\x04"
_LOC_FLAGS, _LOC_NAME_LEN, _LOC_EXTRA_LEN = 1, 8, 9  # in the fields after the signature


def _encode_name(name: str, charset: str) -> bytes:
    out = bytearray()
    for ch in name:
        try:
            out += ch.encode(charset)
        except UnicodeEncodeError:
            out += b"_"  # the Unicode Path field still carries the real character
    return bytes(out)


def _unicode_path_field(local_name: bytes, utf8: bytes) -> bytes:
    body = b"\x01" + struct.pack("<L", zlib.crc32(local_name)) + utf8
    return struct.pack("<HH", _UNICODE_PATH, len(body)) + body


def rebuild(archives: Sequence[bytes], charset: str | None = None) -> bytes:
    """One zip holding every entry of `archives`, in order; names re-coded when `charset` is set.

    With a charset, each name is written in it without flag bit 11, plus a 0x7075 Unicode Path
    field with the UTF-8 name. Names lie outside the encrypted data and the CRC, so this is a
    header-only rewrite: entry data (and any data descriptor) is copied through as it is.
    ZIP64 is not expected (messages are far below 4 GiB) and is refused.
    """
    out: list[bytes | memoryview] = []
    size = 0
    count = 0
    central = bytearray()
    for data in archives:
        for cen, name_b, extra, comment, body in _entries(data):
            flags = int(cen[3])
            name_field = b""
            new_name = name_b
            if charset is not None:
                name = name_b.decode("utf-8") if flags & _FLAG_UTF8 else name_b.decode("cp437")
                new_name = _encode_name(name, charset)
                if new_name != name.encode("utf-8"):
                    name_field = _unicode_path_field(new_name, name.encode("utf-8"))
                flags &= ~_FLAG_UTF8
            # version, flags, method, time, date, crc, sizes, name length, extra length
            loc = [int(v) for v in _LOC.unpack_from(body)[1:]]
            nlen, xlen = loc[_LOC_NAME_LEN], loc[_LOC_EXTRA_LEN]
            local_extra = bytes(body[30 + nlen : 30 + nlen + xlen])
            payload = body[30 + nlen + xlen :]
            loc[_LOC_FLAGS] = (loc[_LOC_FLAGS] & ~_FLAG_UTF8) | (flags & _FLAG_UTF8)
            loc[_LOC_NAME_LEN] = len(new_name)
            loc[_LOC_EXTRA_LEN] = len(local_extra) + len(name_field)
            head = _LOC.pack(_LOC_SIG, *loc) + new_name + local_extra + name_field
            cen[3] = flags
            cen[10], cen[11], cen[16] = len(new_name), len(extra) + len(name_field), size
            central += _CEN.pack(*cen) + new_name + extra + name_field + comment
            out += [head, payload]
            size += len(head) + len(payload)
            if name_field and loc[_LOC_FLAGS] & _FLAG_DESCRIPTOR:
                # Debian's unzip 6.0 counts the data descriptor of an entry with a 0x7075
                # field 8 bytes long (as if ZIP64) and its overlap check (CVE-2019-13232)
                # then rejects the archive; readers find entries through the central
                # directory, so a gap of 8 bytes is harmless and keeps unzip working.
                out.append(b"\0" * 8)
                size += 8
            count += 1
    out.append(bytes(central))
    out.append(_EOCD.pack(b"PK\x05\x06", 0, 0, count, count, len(central), size, 0))
    return b"".join(out)


def _entries(
    data: bytes,
) -> Iterator[tuple[list[int | bytes], bytes, bytes, bytes, memoryview]]:
    """(central fields, name, central extra, comment, local header + data) per entry."""
    eocd_at = data.rfind(b"PK\x05\x06", max(0, len(data) - 65557))
    if eocd_at < 0:
        raise ValueError("not a zip: no end of central directory")
    _, _, _, _, count, _, cd_off, _ = _EOCD.unpack_from(data, eocd_at)
    if cd_off == 0xFFFFFFFF or count == 0xFFFF:
        raise ValueError("zip64 archives are not rebuilt")
    cens = []
    pos = cd_off
    for _ in range(count):
        cen: list[int | bytes] = list(_CEN.unpack_from(data, pos))
        nlen, xlen, clen = int(cen[10]), int(cen[11]), int(cen[12])
        p = pos + 46
        cens.append(
            (
                cen,
                data[p : p + nlen],
                data[p + nlen : p + nlen + xlen],
                data[p + nlen + xlen : p + nlen + xlen + clen],
            )
        )
        pos = p + nlen + xlen + clen
    starts = [*sorted(int(c[0][16]) for c in cens), cd_off]
    nxt = dict(itertools.pairwise(starts))
    mv = memoryview(data)
    for cen, name_b, extra, comment in cens:
        off = int(cen[16])
        if data[off : off + 4] != b"PK\x03\x04":
            raise ValueError("zip: central directory points at no local header")
        yield cen, name_b, extra, comment, mv[off : nxt[off]]
