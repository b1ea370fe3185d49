"""Actions helper: byte-level access to a header block, so a rewrite touches only its own lines.

The stdlib `email` generator re-folds and re-encodes headers it rewrites (and sometimes ones it
does not); a mis-send guard must leave Subject, Received, DKIM-Signature … byte-for-byte, so the
rewrites splice raw bytes at offsets found here instead.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class RawField:
    """One header field: raw[start:end] is the whole field including folds and its line end."""

    name: str  # as written, e.g. "To", "CC"
    start: int
    end: int
    value_start: int  # first byte after the colon

    def key(self) -> str:
        return self.name.lower()


def line_ending(raw: bytes) -> bytes:
    """The message's own line ending (CRLF from SMTP, LF from a file): new lines must match it."""
    nl = raw.find(b"\n")
    return b"\r\n" if nl > 0 and raw[nl - 1 : nl] == b"\r" else b"\n"


def header_end(raw: bytes) -> int:
    """Offset of the first body byte (after the blank line); len(raw) if there is no body."""
    pos = 0
    n = len(raw)
    while pos < n:
        nl = raw.find(b"\n", pos)
        if nl < 0:
            return n
        line = raw[pos:nl]
        if line in (b"", b"\r"):
            return nl + 1
        pos = nl + 1
    return n


def split_fields(raw: bytes, end: int | None = None) -> list[RawField]:
    """Header fields of the block raw[:end], folds included; lines without a colon are skipped.

    A line that is neither a field nor a continuation (malformed input) is left where it is:
    splicing keeps it, since we only replace the byte ranges of fields we rewrite.
    """
    if end is None:
        end = header_end(raw)
    fields: list[RawField] = []
    pos = 0
    cur: tuple[str, int, int] | None = None  # name, start, value_start
    while pos < end:
        nl = raw.find(b"\n", pos, end)
        nxt = end if nl < 0 else nl + 1
        first = raw[pos : pos + 1]
        if first in (b" ", b"\t") and cur is not None:
            pos = nxt  # continuation of the current field
            continue
        if cur is not None:
            fields.append(RawField(cur[0], cur[1], pos, cur[2]))
            cur = None
        colon = raw.find(b":", pos, nxt)
        if colon > pos and raw[pos:nxt] not in (b"\r\n", b"\n"):
            name = raw[pos:colon].rstrip(b" \t")
            if name and all(33 <= c <= 126 for c in name):
                cur = (name.decode("ascii"), pos, colon + 1)
        pos = nxt
    if cur is not None:
        fields.append(RawField(cur[0], cur[1], end_of_block(raw, end), cur[2]))
    return fields


def end_of_block(raw: bytes, end: int) -> int:
    """End of the last field: `end` minus the blank separator line, if there is one."""
    if raw[:end].endswith(b"\r\n\r\n"):
        return end - 2
    if raw[:end].endswith(b"\n\n"):
        return end - 1
    return end


def field_value(raw: bytes, f: RawField) -> bytes:
    """The raw value bytes (folds kept, final line end dropped, leading blank kept)."""
    v = raw[f.value_start : f.end]
    if v.endswith(b"\r\n"):
        return v[:-2]
    if v.endswith(b"\n"):
        return v[:-1]
    return v


def fold_list(name: str, items: list[bytes], nl: bytes, width: int = 76) -> bytes:
    """`Name: a, b, c` + nl, breaking between items so lines stay near `width` (RFC 5322 2.1.1).

    Items keep their own bytes (encoded words, folds inside a display name): only the
    separators between items are chosen here.
    """
    out = bytearray(name.encode("ascii") + b":")
    line_len = len(out)
    for i, item in enumerate(items):
        sep = b"," if i < len(items) - 1 else b""
        piece = item + sep
        first_line = piece.split(b"\n", 1)[0]
        if i > 0 and line_len + 1 + len(first_line) > width:
            out += nl + b" "
            line_len = 1
        else:
            out += b" "
            line_len += 1
        out += piece
        line_len = len(piece) - piece.rfind(b"\n") - 1 if b"\n" in piece else line_len + len(piece)
    return bytes(out) + nl
