"""Formats without encryption of their own (images, media, text...), recognised by magic bytes."""

from __future__ import annotations

import math
import re
from collections import Counter

from mailguard.formats.base import FileInfo

# (offset, magic, kind, mime): first match wins; more specific entries come first.
MAGIC: tuple[tuple[int, bytes, str, str], ...] = (
    (0, b"\x89PNG\r\n\x1a\n", "image", "image/png"),
    (0, b"\xff\xd8\xff", "image", "image/jpeg"),
    (0, b"GIF87a", "image", "image/gif"),
    (0, b"GIF89a", "image", "image/gif"),
    (0, b"II*\x00", "image", "image/tiff"),
    (0, b"MM\x00*", "image", "image/tiff"),
    (0, b"8BPS", "image", "image/vnd.adobe.photoshop"),
    (0, b"\x00\x00\x01\x00", "image", "image/x-icon"),
    (0, b"%!PS", "other", "application/postscript"),
    (0, b"{\\rtf", "text", "application/rtf"),
    (0, b"\x1f\x8b", "gzip", "application/gzip"),
    (0, b"BZh", "bzip2", "application/x-bzip2"),
    (0, b"\xfd7zXZ\x00", "xz", "application/x-xz"),
    (0, b"\x28\xb5\x2f\xfd", "zstd", "application/zstd"),
    (0, b"MSCF", "cab", "application/vnd.ms-cab-compressed"),
    (0, b"MZ", "executable", "application/x-msdownload"),
    (0, b"\x7fELF", "executable", "application/x-executable"),
    (0, b"\xca\xfe\xba\xbe", "executable", "application/java-vm"),
    (0, b"SQLite format 3\x00", "other", "application/vnd.sqlite3"),
    (0, b"OggS", "media", "audio/ogg"),
    (0, b"fLaC", "media", "audio/flac"),
    (0, b"ID3", "media", "audio/mpeg"),
    (0, b"\x1aE\xdf\xa3", "media", "video/webm"),
    (257, b"ustar", "tar", "application/x-tar"),
)
RIFF = {
    b"WEBP": ("image", "image/webp"),
    b"WAVE": ("media", "audio/wav"),
    b"AVI ": ("media", "video/x-msvideo"),
}
HEIF_BRANDS = (b"heic", b"heix", b"mif1", b"msf1", b"avif")
# Encrypted-file formats identified by a fixed header (no password check possible or needed).
ENCRYPTED_MAGIC = (
    (b"Salted__", "openssl-enc", "OpenSSL enc file (password-encrypted)"),
    (b"age-encryption.org/v1\n", "age", "age-encrypted file"),
    (b"AxCrypt", "axcrypt", "AxCrypt-encrypted file"),
)
HEADER_LINE = re.compile(
    rb"^(From|To|Subject|Date|Received|Return-Path|Message-ID|MIME-Version"
    rb"|Content-Type|X-[A-Za-z0-9-]+|Delivered-To|Reply-To|Cc):",
    re.I | re.M,
)
TEXT_ENCODINGS = ("utf-8", "cp932", "euc-jp")
CONTROL = re.compile("[\x00-\x08\x0b\x0e-\x1a\x1c-\x1f]")  # not tab, CR, LF, FF, ESC


def sniff_magic(data: bytes) -> FileInfo | None:
    for magic, kind, what in ENCRYPTED_MAGIC:
        if data.startswith(magic):
            return FileInfo(kind, "application/octet-stream", True, what)
    for off, magic, kind, mime in MAGIC:
        if data.startswith(magic, off):
            if kind == "executable" and magic == b"MZ" and len(data) < 64:
                continue
            return FileInfo(kind, mime, False, f"{mime}: a format without encryption")
    if data.startswith(b"RIFF") and data[8:12] in RIFF:
        kind, mime = RIFF[data[8:12]]
        return FileInfo(kind, mime, False, f"{mime}: a format without encryption")
    if data[4:8] == b"ftyp":
        brand = data[8:12]
        if brand in HEIF_BRANDS:
            return FileInfo("image", "image/heic", False, "image/heic: a format without encryption")
        mime = "video/quicktime" if brand == b"qt  " else "video/mp4"
        return FileInfo("media", mime, False, f"{mime}: a format without encryption")
    if data[2:5] == b"-lh" and data[6:7] == b"-":  # LHA: still common in Japan
        return FileInfo("lzh", "application/x-lzh-compressed", False, "LHA archive (no encryption)")
    if data.startswith(b"BM") and len(data) > 26 and data[6:10] == b"\x00\x00\x00\x00":
        return FileInfo("image", "image/bmp", False, "image/bmp: a format without encryption")
    return None


def _as_text(head: bytes) -> str | None:
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        try:
            return head.decode("utf-16")
        except UnicodeDecodeError:
            return None
    if b"\x00" in head:
        return None
    if b"\x1b$B" in head or b"\x1b$@" in head:  # ISO-2022-JP
        return head.decode("iso-2022-jp", "replace")
    for enc in TEXT_ENCODINGS:
        try:
            # A multibyte character cut at the end of the head is not a decoding error.
            return head.decode(enc) if len(head) < 8192 else head[:8188].decode(enc)
        except UnicodeDecodeError:
            continue
    return None


def sniff_text(data: bytes, filename: str) -> FileInfo | None:
    head = data[:8192]
    text = _as_text(head)
    if text is None:
        return None
    controls = len(CONTROL.findall(text))
    if controls > len(text) // 50 + 1:
        return None
    low = text.lstrip("\ufeff \t\r\n").lower()
    ext = filename.rsplit(".", 1)[-1].lower() if "." in filename else ""
    if len(HEADER_LINE.findall(head[:4096])) >= 2 and HEADER_LINE.match(head.lstrip()):
        return FileInfo("message", "message/rfc822", False, "an e-mail message (.eml)")
    if low.startswith(("<!doctype html", "<html")):
        mime = "text/html"
    elif low.startswith("begin:vcalendar"):
        mime = "text/calendar"
    elif low.startswith("begin:vcard"):
        mime = "text/vcard"
    elif low.startswith("<?xml"):
        mime = "application/xml"
    elif ext in ("csv", "tsv"):
        mime = "text/csv" if ext == "csv" else "text/tab-separated-values"
    else:
        mime = "text/plain"
    return FileInfo("text", mime, False, "plain text, readable by anyone")


def entropy_bits(head: bytes) -> float:
    n = len(head)
    if not n:
        return 0.0
    return -sum(c / n * math.log2(c / n) for c in Counter(head).values())


def sniff_unknown(data: bytes) -> FileInfo:
    head = data[: 1 << 16]
    n = len(head)
    # Uniform random data of n bytes shows ~8 - 255/(2n ln 2) bits/byte; allow twice that bias.
    if n >= 1024 and entropy_bits(head) > 8 - 255 / (n * math.log(2)):
        return FileInfo(
            "other",
            "application/octet-stream",
            None,
            "unrecognised data that looks random: possibly encrypted, cannot tell",
        )
    return FileInfo("other", "application/octet-stream", False, "unrecognised binary data")
