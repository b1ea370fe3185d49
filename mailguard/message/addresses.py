"""Message stage: turn To/Cc/Bcc/From header values and envelope recipients into Address values.

Two tiers, so the relay's per-message cost stays small:

1. a single-regex pass that accepts only the plain shapes (`addr`, `Name <addr>`,
   `"Quoted, Name" <addr>`, comma separated) — the vast majority of real headers;
2. anything else (groups, comments, routes, domain literals, malformed input) goes to the stdlib
   parser (`email._header_value_parser`, what `email.policy.default` uses), which is the authority.
   When that parser reports defects, a conservative scan for `local@domain` recovers the
   addresses it lost (unbalanced quotes or brackets, missing commas, `;` used as a separator) and
   marks them `recovered=True`: for a mis-send guard, an address seen twice is better than one lost.

Display names are RFC 2047-decoded with Japanese-aware fallbacks (ISO-2022-JP with NEC/IBM
extensions decodes via CP932, Shift_JIS means CP932); raw 8-bit headers are tried as UTF-8, then
CP932/EUC-JP. Domains are compared as lowercase A-labels (IDNA 2008 with UTS #46 mapping) and
shown as U-labels.
"""

from __future__ import annotations

import binascii
import codecs
import re
from collections.abc import Iterable
from email import _header_value_parser as hvp
from email.errors import ObsoleteHeaderDefect

import idna

from mailguard.message.types import Address, HeaderName

__all__ = [
    "address_key",
    "decode_header_text",
    "decode_words",
    "normalize_domain",
    "parse_addresses",
    "parse_addresses_with_defects",
    "parse_envelope",
]

_HEADERS: frozenset[str] = frozenset({"from", "sender", "reply-to", "to", "cc", "bcc", "envelope"})

# ---------------------------------------------------------------------------------------------
# Charsets and RFC 2047
# ---------------------------------------------------------------------------------------------

# MIME charset label → Python codec. Japanese labels map to the Microsoft supersets that real
# mail uses (Shift_JIS mail from Windows contains ①, ㈱, IBM kanji, which plain shift_jis refuses).
_CHARSETS: dict[str, str] = {
    "shift_jis": "cp932",
    "shift-jis": "cp932",
    "sjis": "cp932",
    "x-sjis": "cp932",
    "ms_kanji": "cp932",
    "windows-31j": "cp932",
    "cp932": "cp932",
    "ms932": "cp932",
    "x-ms-cp932": "cp932",
    "euc-jp": "euc_jp",
    "x-euc-jp": "euc_jp",
    "utf8": "utf-8",
    "unicode-1-1-utf-8": "utf-8",
    "gb2312": "gb18030",
    "gbk": "gb18030",
    "ks_c_5601-1987": "cp949",
    "euc-kr": "cp949",
    "iso-8859-1": "cp1252",  # what senders mean in practice (HTML5 does the same)
    "us-ascii": "cp1252",
    "ascii": "cp1252",
    "big5": "big5hkscs",
}

_JIS_ESC = re.compile(rb"\x1b(\$@|\$B|\$\(D|\$\(Q|\$\(O|\(B|\(J|\(I|\(H)")


def _jis_to_cp932(data: bytes) -> str:
    """Decode ISO-2022-JP through CP932, so NEC row 13 (①, ㈱) and IBM extensions survive.

    Python's iso2022_jp codecs reject those characters, but Japanese Windows clients send them.
    Each JIS X 0208 pair is converted arithmetically to its Shift_JIS code and decoded as CP932.
    """
    out = bytearray()
    mode = "ascii"
    pos = 0
    for m in _JIS_ESC.finditer(data):
        out += _jis_chunk(data[pos : m.start()], mode)
        seq = m.group(1)
        mode = "kanji" if seq.startswith(b"$") else ("kana" if seq == b"(I" else "ascii")
        pos = m.end()
    out += _jis_chunk(data[pos:], mode)
    return out.decode("cp932", "replace")


def _jis_chunk(chunk: bytes, mode: str) -> bytes:
    if mode == "ascii":
        return chunk
    if mode == "kana":
        return bytes(b | 0x80 if 0x21 <= b <= 0x5F else b for b in chunk)
    out = bytearray()
    for i in range(0, len(chunk) - 1, 2):
        j1, j2 = chunk[i], chunk[i + 1]
        if not (0x21 <= j1 <= 0x7E and 0x21 <= j2 <= 0x7E):
            out += b"?"
            continue
        s1 = ((j1 + 1) >> 1) + (0x70 if j1 <= 0x5E else 0xB0)
        s2 = j2 + (0x1F if j1 & 1 else 0x7E)
        if j1 & 1 and s2 >= 0x7F:
            s2 += 1
        out += bytes((s1, s2))
    return bytes(out)


def _decode_jis(data: bytes) -> str:
    try:
        return data.decode("iso2022_jp_2")
    except UnicodeDecodeError:
        return _jis_to_cp932(data)


def _codec(charset: str) -> str:
    cs = charset.strip().lower().split("*", 1)[0]  # RFC 2231 language suffix: utf-8*ja
    return _CHARSETS.get(cs, cs)


def decode_bytes(data: bytes, charset: str) -> str:
    """Bytes in a declared MIME charset → str. Never raises: unknown charsets are guessed."""
    cs = _codec(charset)
    if cs.startswith("iso-2022-jp") or cs.startswith("iso2022"):
        return _decode_jis(data)
    try:
        return data.decode(cs)
    except (LookupError, UnicodeDecodeError):
        pass
    return guess_decode(data)


def guess_decode(data: bytes) -> str:
    """Undeclared 8-bit bytes: UTF-8, then Japanese legacy encodings, then cp1252 as last resort."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        pass
    if b"\x1b" in data:
        return _decode_jis(data)
    candidates: list[str] = []
    for cs in ("cp932", "euc_jp"):
        try:
            candidates.append(data.decode(cs))
        except UnicodeDecodeError:
            continue
    if candidates:
        # EUC-JP usually also decodes as CP932, but into half-width katakana soup: prefer the
        # reading with the fewest half-width katakana.
        return min(candidates, key=lambda s: sum(1 for c in s if "\uff61" <= c <= "\uff9f"))
    return data.decode("utf-8", "replace")


_EW = re.compile(r"=\?([^?\s]+)\?([bBqQ])\?([^?\s]*)\?=")
_EW_GAP = re.compile(r"(\?=)[ \t\r\n]+(?==\?[^?\s]+\?[bBqQ]\?)")
_QHEX = re.compile(rb"=([0-9A-Fa-f]{2})")


def _decode_ew(m: re.Match[str]) -> str:
    charset, enc, text = m.group(1), m.group(2), m.group(3)
    try:
        if enc in "bB":
            raw = text.encode("ascii", "replace")
            data = binascii.a2b_base64(raw + b"=" * (-len(raw) % 4))
        else:
            data = _QHEX.sub(
                lambda q: bytes((int(q.group(1), 16),)),
                text.replace("_", " ").encode("ascii", "replace"),
            )
    except (binascii.Error, ValueError):
        return m.group(0)
    return decode_bytes(data, charset)


def decode_words(text: str) -> str:
    """Decode RFC 2047 encoded words; whitespace between adjacent encoded words is dropped."""
    if "=?" not in text:
        return text
    if text.count("=?") > 1:
        text = _EW_GAP.sub(r"\1", text)
    return _EW.sub(_decode_ew, text)


_SURROGATE = re.compile(r"[\udc80-\udcff]")


def decode_header_text(value: str) -> str:
    """A raw header value (str with surrogateescape for 8-bit bytes) → unfolded Unicode text.

    Raw JIS (ESC sequences, sent unencoded by old Japanese clients) and raw 8-bit bytes are
    decoded here; RFC 2047 encoded words are left for the caller (they are syntax-dependent).
    """
    if "\n" in value or "\r" in value:
        value = value.replace("\r\n", "\n").replace("\r", "\n")
        value = re.sub(r"\n(?=[ \t])", "", value).replace("\n", " ")
    if value.isascii():
        if "\x1b" in value:
            return _decode_jis(value.encode("ascii"))
        return value
    if _SURROGATE.search(value):
        return guess_decode(value.encode("utf-8", "surrogateescape"))
    return value


# ---------------------------------------------------------------------------------------------
# Domains
# ---------------------------------------------------------------------------------------------


def normalize_domain(domain: str) -> tuple[str, str, bool]:
    """(A-label lowercase, U-label, ok). A domain that is not valid IDNA stays lowercase as is."""
    d = domain.strip().rstrip(".").lower()
    if not d or d.startswith("["):
        return d, d, True
    if d.isascii():
        if "xn--" not in d:
            return d, d, True
        try:
            return d, idna.decode(d), True
        except (idna.IDNAError, UnicodeError, ValueError):
            return d, d, False
    try:
        a = idna.encode(d, uts46=True).decode("ascii").lower()
        return a, idna.decode(a), True
    except (idna.IDNAError, UnicodeError, ValueError):
        pass
    try:  # IDNA 2008 refuses some names browsers and MTAs still accept; IDNA 2003 as a fallback
        a = d.encode("idna").decode("ascii").lower()
        return a, d, False
    except UnicodeError:
        return d, d, False


def address_key(a: Address) -> str:
    """Comparison key: lowercase local part (as the MTA would fold it) @ A-label domain."""
    return f"{a.local.lower()}@{a.domain}"


_DOT_ATOM = re.compile(r"[^\s\"(),.:;<>@\[\]\\]+(?:\.[^\s\"(),.:;<>@\[\]\\]+)*")


def _quote(local: str) -> str:
    return '"' + local.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _make(
    local: str,
    domain: str,
    display: str,
    header: HeaderName,
    group: str | None,
    recovered: bool,
    defects: list[str],
) -> Address:
    if "=?" in domain:  # Python's email package writes c@=?utf-8?b?...?=.jp for IDNs
        domain = decode_words(domain)
        defects.append(f"{header}: encoded word inside an address")
    a_label, u_label, ok = normalize_domain(domain)
    if not ok:
        defects.append(f"{header}: domain {domain!r} is not valid IDNA")
    written = domain.strip().rstrip(".").lower()
    shown = local if _DOT_ATOM.fullmatch(local) else _quote(local)
    # positional: this runs for every address of every message
    return Address(
        f"{shown}@{written}" if written else shown,
        local,
        a_label,
        u_label,
        display,
        header,
        group,
        recovered,
    )


# ---------------------------------------------------------------------------------------------
# Tier 1: the plain shapes, one regex
# ---------------------------------------------------------------------------------------------

_A = r'[^\s"(),.:;<>@\[\]\\]+'  # dot-atom label: anything but specials (Unicode allowed)
_ADDR_LOCAL = rf"{_A}(?:\.{_A})*"
_ADDR_DOMAIN = rf"{_A}(?:\.{_A})*\.?"  # trailing dot: seen in the wild, dropped on normalising
_PLAIN = re.compile(
    rf"""[ \t]*(?:
        (?P<dn>"(?:[^"\\]|\\.)*"|[^"(),:;<>@\[\]\\]*?)[ \t]*
            <[ \t]*(?P<l1>{_ADDR_LOCAL})@(?P<d1>{_ADDR_DOMAIN})[ \t]*>
        |(?P<l2>{_ADDR_LOCAL})@(?P<d2>{_ADDR_DOMAIN})
        |(?=,)
    )[ \t]*(?:,|\Z)""",
    re.VERBOSE,
)
_UNESCAPE = re.compile(r"\\(.)")
_WS = re.compile(r"\s+")


def _display(raw: str) -> str:
    if raw.startswith('"'):
        text = raw[1:-1]
        if "\\" in text:
            text = _UNESCAPE.sub(r"\1", text)
    else:
        text = _WS.sub(" ", raw).strip()
    return decode_words(text)


def _plain(value: str, header: HeaderName, defects: list[str]) -> list[Address] | None:
    out: list[Address] = []
    pos, end = 0, len(value)
    while pos < end:
        m = _PLAIN.match(value, pos)
        if m is None or m.end() == pos:
            return None
        pos = m.end()
        if m.group("l1") is not None:
            out.append(_make(m["l1"], m["d1"], _display(m["dn"]), header, None, False, defects))
        elif m.group("l2") is not None:
            out.append(_make(m["l2"], m["d2"], "", header, None, False, defects))
    return out


# ---------------------------------------------------------------------------------------------
# Tier 2: the stdlib parser, plus recovery of what it loses
# ---------------------------------------------------------------------------------------------

_TRAILING_DOT = re.compile(r"(@[^\s\"(),:;<>@\[\]\\]+?)\.+(?=[ \t]*(?:>|,|;|\(|$))")
_SCAN = re.compile(
    r"""(?<![^\s<>,;:"'(\[])
        ([^\s"(),:;<>@\[\]\\']+)
        @((?:[^\s"(),:;<>@\[\]\\'.]+\.)+[^\s"(),:;<>@\[\]\\'.]{2,})\.?
        (?![^\s<>,;:"')\]])""",
    re.VERBOSE,
)


def _stdlib(value: str, header: HeaderName, defects: list[str]) -> list[Address]:
    fixed = _TRAILING_DOT.sub(r"\1", value)
    found: list[Address] = []
    names: set[str] = set()
    bad = False
    try:
        parsed, rest = hvp.get_address_list(fixed)
    except Exception as e:  # the stdlib parser has crash bugs on hostile input; never raise
        defects.append(f"{header}: unparsable ({e!r})")
        parsed, rest, bad = None, fixed, True
    if parsed is not None:
        try:
            if rest.strip():
                bad = True
                defects.append(f"{header}: unparsed text after address list")
            for d in parsed.all_defects:
                if not isinstance(d, ObsoleteHeaderDefect):
                    bad = True
                    defects.append(f"{header}: {d}")
            for addr in parsed.addresses:
                group = None
                if addr[0].token_type == "group":
                    group = decode_words(str(getattr(addr[0], "display_name", "") or ""))
                for mb in addr.all_mailboxes:
                    local, domain = mb.local_part, mb.domain
                    display = mb.display_name or ""
                    if display:
                        display = decode_words(display)
                        names.add(display.lower())
                    if not local or not domain or not _sane(local, domain):
                        bad = True
                        continue
                    found.append(_make(local, domain, display, header, group, False, defects))
        except Exception as e:
            # the stdlib's token properties trip over some garbage ('"\\' ...)
            bad = True
            defects.append(f"{header}: unparsable ({e!r})")
    if not bad:
        return found
    seen = {address_key(a) for a in found}
    for m in _SCAN.finditer(value):
        local, domain = m.group(1), m.group(2)
        if f"{local}@{domain}".lower() in names:
            continue  # an address used as a display name: not a recipient
        a = _make(local, domain, "", header, None, True, defects)
        if address_key(a) not in seen:
            seen.add(address_key(a))
            found.append(a)
    return found


_BAD_IN_DOMAIN = re.compile(r'[\s<>,;:"()\\@]')
_BAD_IN_LOCAL = re.compile(r"[<>@\r\n]")


def _sane(local: str, domain: str) -> bool:
    """Reject what an invalid-mailbox token swallowed (e.g. the rest of the line after a `"`)."""
    if _BAD_IN_LOCAL.search(local):
        return False
    return domain.startswith("[") or not _BAD_IN_DOMAIN.search(domain)


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


def _header_name(header: str) -> HeaderName:
    h = header.strip().lower()
    if h.startswith("resent-"):
        h = h[7:]
    if h not in _HEADERS:
        raise ValueError(f"not an address header: {header!r}")
    return h  # type: ignore[return-value]


def parse_addresses_with_defects(
    header: str, raw_values: Iterable[str]
) -> tuple[list[Address], list[str]]:
    """Like parse_addresses, plus the defects met (for message.malformed)."""
    name = _header_name(header)
    out: list[Address] = []
    defects: list[str] = []
    for raw in raw_values:
        value = decode_header_text(raw)
        if not value.strip():
            continue
        got = _plain(value, name, defects)
        if got is None:
            got = _stdlib(value, name, defects)
        out.extend(got)
    return out, defects


def parse_addresses(header: str, raw_values: Iterable[str]) -> list[Address]:
    """Every mailbox in every occurrence of an address header, in order (duplicates kept).

    `header` is "to", "cc", "bcc", "from", "sender", "reply-to" (a "resent-" prefix is accepted);
    `raw_values` are the undecoded values (8-bit bytes as surrogateescape), one per occurrence.
    """
    return parse_addresses_with_defects(header, raw_values)[0]


def parse_envelope(rcpts: Iterable[str]) -> list[Address]:
    """SMTP RCPT TO addresses (with or without <>) → Address values with header="envelope"."""
    out: list[Address] = []
    sink: list[str] = []
    for r in rcpts:
        s = decode_header_text(r).strip()
        if s.startswith("<") and s.endswith(">"):
            s = s[1:-1]
        if s.startswith("@") and ":" in s:  # source route <@a,@b:user@host>
            s = s.split(":", 1)[1]
        local, sep, domain = s.rpartition("@")
        if not sep:
            local, domain = s, ""
        if len(local) >= 2 and local.startswith('"') and local.endswith('"'):
            local = _UNESCAPE.sub(r"\1", local[1:-1])
        out.append(_make(local, domain, "", "envelope", None, False, sink))
    return out


# The codec registry lookup is the only per-call cost for known charsets; warm the common ones.
for _cs in ("cp932", "euc_jp", "iso2022_jp_2", "utf-8", "cp1252"):
    codecs.lookup(_cs)
