"""Message stage: header blocks → fields, decoded values, MIME parameters and filenames.

Line rules follow the stdlib feedparser (`email.feedparser`): a header line is `From `, a field
name and a colon, or a continuation; the first line that is none of these ends the block (the
stdlib's MissingHeaderBodySeparatorDefect). Decoding is Japanese-aware: RFC 2047 words are joined
at the byte level before decoding (encoders split multibyte characters across words), RFC 2231
continuations are collected, and raw 8-bit bytes are tried as UTF-8, then CP932.
"""

from __future__ import annotations

import binascii
import mmap
import re
from typing import TypeAlias
from urllib.parse import unquote_to_bytes

from mailguard.message.addresses import decode_bytes, guess_decode

Raw: TypeAlias = bytes | bytearray | mmap.mmap

# A whole run of header lines, matched in C over bytes or an mmap (pos/endpos bound the block).
_HEADER_LINES = re.compile(rb"(?:(?:From |[\x21-\x39\x3b-\x7e]*:|[ \t])[^\n]*(?:\n|\Z))*")
_HIGH = re.compile(rb"[\x80-\xff]")
_FOLD = re.compile(r"\r?\n(?=[ \t])|\r\n?$|\n$")
_SURROGATE = re.compile(r"[\udc80-\udcff]")
# The four fields the scan needs from a part header (first occurrence wins, as Message.get).
# No space before the colon: the stdlib keeps "Content-Type :" as a different field name.
_MIME_FIELDS = re.compile(
    r"^(content-(?:type|disposition|transfer-encoding|id)):[ \t]*([^\r\n]*(?:\r?\n[ \t][^\r\n]*)*)",
    re.IGNORECASE | re.MULTILINE,
)


def split_header(buf: Raw, start: int, end: int) -> tuple[int, int, bool]:
    """Header block at `start` → (header_end, body_start, separator_missing)."""
    m = _HEADER_LINES.match(buf, start, end)
    p: int = m.end() if m else start
    if p >= end:
        return end, end, False
    c = buf[p]
    if c == 0x0A:
        return p, p + 1, False
    if c == 0x0D:
        nxt = p + 1
        if nxt < end and buf[nxt] == 0x0A:
            nxt += 1
        return p, nxt, False
    return p, p, True


def parse_fields(text: str, defects: list[str]) -> tuple[list[tuple[str, str]], str | None]:
    """Header text → [(name, raw value)] with compat32 semantics, and the unix From_ line."""
    fields: list[tuple[str, str]] = []
    unixfrom: str | None = None
    cur: list[str] = []
    for lineno, line in enumerate(text.splitlines(True)):
        c = line[0]
        if c == " " or c == "\t":
            if cur:
                cur.append(line)
            else:
                defects.append("header.malformed")  # first line is a continuation
            continue
        if cur:
            fields.append(_source_parse(cur))
            cur = []
        if line.startswith("From "):
            if lineno == 0:
                unixfrom = line.rstrip("\r\n")
            else:
                defects.append("header.malformed")  # misplaced envelope header
            continue
        i = line.find(":")
        if i <= 0:
            defects.append("header.malformed")  # ": value" with no field name
            continue
        cur = [line]
    if cur:
        fields.append(_source_parse(cur))
    return fields, unixfrom


def _source_parse(lines: list[str]) -> tuple[str, str]:
    # email.policy.compat32.header_source_parse, inlined (it is called once per field)
    name, value = lines[0].split(":", 1)
    value = value.lstrip(" \t") + "".join(lines[1:])
    return name, value.rstrip("\r\n")


def mime_fields(text: str) -> dict[str, str]:
    """Just the Content-* fields of a part header: lowercase name → raw value (first wins)."""
    out: dict[str, str] = {}
    for m in _MIME_FIELDS.finditer(text):
        out.setdefault(m.group(1).lower(), m.group(2))
    return out


def unfold(value: str) -> str:
    return _FOLD.sub("", value) if ("\n" in value or "\r" in value) else value


def to_bytes(s: str) -> bytes:
    """A surrogateescape-decoded str back to its bytes (latin-1 for percent-decoded RFC 2231)."""
    try:
        return s.encode("latin-1", "surrogateescape")
    except UnicodeEncodeError:
        return s.encode("utf-8", "surrogateescape")


def decode_8bit(value: str) -> str:
    """Raw 8-bit bytes (surrogateescape) → text: UTF-8, then CP932/EUC-JP; raw JIS via CP932."""
    if value.isascii():
        if "\x1b" in value:
            return decode_bytes(value.encode("ascii"), "iso-2022-jp")
        return value
    if _SURROGATE.search(value) is None:
        return value
    return guess_decode(to_bytes(value))


_EW = re.compile(r"=\?([^?\s]*)\?([bBqQ])\?(.*?)\?=")


_B64_WORD = re.compile(rb"[A-Za-z0-9+/]*={0,2}")


def _ew_bytes(enc: str, text: str) -> bytes | None:
    raw = text.encode("ascii", "surrogateescape")
    try:
        if enc in "bB":
            raw = raw.replace(b" ", b"")
            if _B64_WORD.fullmatch(raw) is None:
                return None
            return binascii.a2b_base64(raw + b"=" * (-len(raw) % 4))
        return binascii.a2b_qp(raw, header=True)
    except (binascii.Error, ValueError):
        return None


def decode_words(value: str) -> str:
    """RFC 2047: decode encoded words; adjacent words of one charset are joined as bytes first."""
    if "=?" not in value:
        return value
    out: list[str] = []
    pend_cs: str | None = None
    pend = bytearray()
    pos = 0
    for m in _EW.finditer(value):
        gap = value[pos : m.start()]
        data = _ew_bytes(m.group(2), m.group(3))
        if data is None:  # undecodable word stays as written
            if pend_cs is not None:
                out.append(decode_bytes(bytes(pend), pend_cs))
                pend_cs, pend = None, bytearray()
            out.append(gap + m.group(0))
            pos = m.end()
            continue
        cs = m.group(1).lower()
        if pend_cs is not None and gap and not gap.isspace():
            out.append(decode_bytes(bytes(pend), pend_cs))
            pend_cs, pend = None, bytearray()
        if pend_cs is None:
            out.append(gap)
        elif cs != pend_cs:  # whitespace between encoded words is dropped (RFC 2047 §6.2)
            out.append(decode_bytes(bytes(pend), pend_cs))
            pend = bytearray()
        pend_cs = cs
        pend += data
        pos = m.end()
    if pend_cs is not None:
        out.append(decode_bytes(bytes(pend), pend_cs))
    out.append(value[pos:])
    return "".join(out)


def decode_value(raw: str) -> str:
    """A raw header value → unfolded, 8-bit-decoded, RFC 2047-decoded text."""
    return decode_words(decode_8bit(unfold(raw))).strip()


# --- MIME parameters (RFC 2045 / 2231) ---------------------------------------------------------

_PARAM = re.compile(
    r"""\s*;?\s*([^\s=;"]+)\s*(?:=\s*("(?:[\udc81-\udc9f\udce0-\udcfc]\\|[^"\\]|\\.)*"?|[^;]*))?""",
    re.DOTALL,
)
_SIMPLE_PARAM = re.compile(r"""([^\s=;"]+)\s*=\s*(?:"([^"]*)"?|([^;]*))""")
# In a quoted string a backslash escapes, except as the trail byte of a raw Shift_JIS
# character (表 = 0x95 0x5C): clients sending raw CP932 names never escape.
_UNESCAPE = re.compile(r"([\udc81-\udc9f\udce0-\udcfc]\\)|\\(.)", re.DOTALL)
_SECTION = re.compile(r"^(.*?)\*(\d+)(\*?)$")
_PCT = re.compile(r"%([0-9A-Fa-f]{2})")


def split_params(value: str) -> tuple[str, dict[str, str]]:
    """`type/sub; k=v; k*0*=...` → (first token, {lowercase key: decoded value}); never raises."""
    if "\n" in value or "\r" in value:
        value = unfold(value)
    main, sep, rest = value.partition(";")
    if not sep:
        return main.strip(), {}
    if "*" not in rest and "\\" not in rest:  # the common case: plain k=v / k="v" pairs
        simple: dict[str, str] = {}
        for k, quoted, bare in _SIMPLE_PARAM.findall(rest):
            k = k.lower()
            if k not in simple:
                v = quoted or bare.strip()
                simple[k] = v if v.isascii() and "=?" not in v else _decode_param(v)
        return main.strip(), simple
    plain: dict[str, str] = {}
    ext: dict[str, str] = {}  # key → "charset'lang'pct" (RFC 2231 single part)
    sections: dict[str, dict[int, tuple[bool, str]]] = {}
    for m in _PARAM.finditer(rest):
        key, val = m.group(1).lower(), (m.group(2) or "").strip()
        if val.startswith('"'):
            val = val[1:-1] if len(val) > 1 and val.endswith('"') else val[1:]
            if "\\" in val:
                val = _UNESCAPE.sub(lambda m: m.group(1) or m.group(2), val)
        sec = _SECTION.match(key)
        if sec:
            sections.setdefault(sec.group(1), {})[int(sec.group(2)[:6])] = (bool(sec.group(3)), val)
        elif key.endswith("*"):
            ext.setdefault(key[:-1], val)
        else:
            plain.setdefault(key, val)
    params = {k: _decode_param(v) for k, v in plain.items()}
    for key, val in ext.items():
        params[key] = _decode_2231(val, True)
    for key, parts in sections.items():
        chunks = [parts[i] for i in sorted(parts)]
        first_enc = chunks[0][0]
        if not first_enc:
            params[key] = _decode_param("".join(v for _, v in chunks))
            continue
        cs, _, rest0 = chunks[0][1].partition("'")
        _, _, rest0 = rest0.partition("'")
        data = bytearray(_pct_bytes(rest0))
        for enc, v in chunks[1:]:
            data += _pct_bytes(v) if enc else to_bytes(v)
        params[key] = decode_bytes(bytes(data), cs) if cs else guess_decode(bytes(data))
    return main.strip(), params


def _pct_bytes(s: str) -> bytes:
    if s.isascii():
        return unquote_to_bytes(s)
    return _PCT.sub(lambda m: chr(int(m.group(1), 16)), s).encode("latin-1", "surrogateescape")


def _decode_2231(val: str, encoded: bool) -> str:
    if val.count("'") < 2:
        return _decode_param(val)
    cs, _, rest = val.partition("'")
    _, _, rest = rest.partition("'")
    data = _pct_bytes(rest) if encoded else to_bytes(rest)
    return decode_bytes(data, cs) if cs else guess_decode(data)


def _decode_param(val: str) -> str:
    # Outlook and Japanese clients put RFC 2047 words inside name="..."; others send raw 8-bit.
    return decode_words(decode_8bit(val))
