"""Message stage: find the MIME tree by a boundary scan over the raw bytes, within hard limits.

Only header blocks are decoded; bodies stay where they are (offsets into `raw`, which may be an
mmap). Delimiter rules follow the stdlib feedparser so the tree agrees with `email`'s:
a delimiter is a line `--boundary`, optionally `--`, optional blanks, end of line; the line break
before it belongs to it; repeated delimiter lines make no empty parts; an inner multipart that is
never closed ends at its parent's next delimiter. The walk is iterative (no recursion) and, from
depth 8 on, finds delimiters in one index of the "--" lines, so a forward chain hundreds of
levels deep is parsed in full in time linear in its size (bench/bench_depth.py); past
`max_depth` / `max_parts` the parts not entered carry `mime.depth_limit` / `mime.parts_limit`.

Part paths are IMAP-style section numbers ("1.2"); the message inside a message/rfc822 part is
its single child "<path>.1" (so every path is unique).
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass, field

from mailguard.message._headers import (
    Raw,
    decode_8bit,
    decode_words,
    mime_fields,
    parse_fields,
    split_header,
    split_params,
    unfold,
)
from mailguard.message.types import Part, PartRole

# After `--boundary`: optional close marker, transport padding, end of line (or end of region).
_TAIL = re.compile(rb"(--)?[ \t]*(\r\n|\n|\r|\Z)")
_ENCAPSULATED = frozenset({"message/rfc822", "message/global", "message/news"})
_SIGNATURES = frozenset(
    {"application/pkcs7-signature", "application/x-pkcs7-signature", "application/pgp-signature"}
)
_PKCS7_MIME = frozenset({"application/pkcs7-mime", "application/x-pkcs7-mime"})
_REPORTS = frozenset(
    {
        "message/delivery-status",
        "message/disposition-notification",
        "message/feedback-report",
        "text/rfc822-headers",
        "message/global-headers",
        "message/global-delivery-status",
    }
)
_LIMIT_CODES = frozenset({"mime.depth_limit", "mime.parts_limit", "header.too_large"})
# Failed delimiter candidates allowed per multipart ("\n--b" followed by more text): bounds the
# Python-level work a hostile one-letter boundary can cause.
_MAX_FALSE_DELIMITERS = 100_000
# From this MIME depth on, delimiters are looked up in one index of the message's "--" lines
# (built once) instead of searched for in each body: nesting stays linear in the message size.
_INDEX_FROM_DEPTH = 8
_MAX_DASH_LINES = 1_000_000  # more "--" lines than this: no index, search as usual


@dataclass(slots=True)
class ScanLimits:
    max_depth: int
    max_parts: int
    max_header_bytes: int
    smtputf8: bool = False


@dataclass(slots=True)
class Scan:
    """What the scan found: the tree, the top-level header fields, every defect."""

    root: Part
    fields: list[tuple[str, str]]
    unixfrom: str | None
    defects: list[str] = field(default_factory=list)
    limited: bool = False
    count: int = 1


class _Scanner:
    __slots__ = ("_dash", "_dash_done", "buf", "count", "defects", "lim", "limited", "stop")

    def __init__(self, buf: Raw, lim: ScanLimits) -> None:
        self.buf = buf
        self.lim = lim
        self.defects: list[str] = []
        self.limited = False
        self.count = 0
        self.stop = False
        self._dash: dict[bytes, list[int]] | None = None
        self._dash_done = False

    def dash_lines(self) -> dict[bytes, list[int]] | None:
        """Lines starting with "--", by what follows (up to CR/LF, trailing blanks cut; a line
        ending in "--" is filed under both forms): token -> line starts, ascending. Built once,
        in one pass; None when the message has too many such lines to index."""
        if self._dash_done:
            return self._dash
        self._dash_done = True
        buf = self.buf
        n = len(buf)
        out: dict[bytes, list[int]] = {}
        i = 0 if buf[:2] == b"--" else buf.find(b"\n--")
        lines = 0
        while i >= 0:
            ls = i if i == 0 and buf[:2] == b"--" else i + 1
            e = buf.find(b"\n", ls)
            tok = bytes(buf[ls + 2 : n if e < 0 else e]).split(b"\r", 1)[0].rstrip(b" \t")
            out.setdefault(tok, []).append(ls)
            if tok.endswith(b"--"):
                out.setdefault(tok[:-2], []).append(ls)
            lines += 1
            if lines > _MAX_DASH_LINES:
                return None
            if e < 0:
                break
            i = buf.find(b"\n--", e)
        self._dash = out
        return out

    def defect(self, part: Part, code: str) -> None:
        part.defects.append(code)
        self.defects.append(code)
        if code in _LIMIT_CODES:
            self.limited = True

    def header_text(self, part: Part, start: int, end: int) -> str:
        """Decode one header block (bounded by max_header_bytes) and note 8-bit bytes."""
        limit = self.lim.max_header_bytes
        if limit and end - start > limit:
            cut = self.buf.rfind(b"\n", start, start + limit)
            end = cut + 1 if cut > start else start + limit
            self.defect(part, "header.too_large")
        block = self.buf[start:end]
        if not block.isascii():
            valid_utf8 = False
            if self.lim.smtputf8:
                try:
                    block.decode("utf-8")
                    valid_utf8 = True
                except UnicodeDecodeError:
                    pass
            if not valid_utf8:
                self.defect(part, "header.8bit")
        return block.decode("ascii", "surrogateescape")

    def new_part(
        self, path: str, depth: int, start: int, end: int, default_type: str
    ) -> tuple[Part, str]:
        """Parse the header block at `start`; the body runs to `end`. Returns (part, text)."""
        self.count += 1
        hend, bstart, missing = split_header(self.buf, start, end)
        # positional: path, depth, content_type, params, disposition, filename, charset,
        # transfer_encoding, content_id, role, header_start, body_start, body_end
        part = Part(
            path, depth, default_type, {}, "", "", "", "7bit", "", "body", start, bstart, end
        )
        if missing:
            self.defect(part, "header.missing_separator")
        text = self.header_text(part, start, hend) if hend > start else ""
        return part, text

    def fill(self, part: Part, fields: dict[str, str]) -> None:
        """Content-* fields → the Part's type, parameters, disposition, filename."""
        ctv = fields.get("content-type")
        if ctv is not None:
            main, params = split_params(ctv)
            ctype = "".join(main.split()).lower()
            if ctype.count("/") != 1 or ctype.startswith("/") or ctype.endswith("/"):
                self.defect(part, "mime.bad_content_type")
                ctype = "text/plain"  # RFC 2045 §5.2, as the stdlib does
            part.content_type = ctype
            part.params = params
            part.charset = params.get("charset", "").strip().lower()
        dname = ""
        cdv = fields.get("content-disposition")
        if cdv is not None:
            disp, dparams = split_params(cdv)
            disp = disp.strip().lower()
            # RFC 2183 §2.8: an unknown disposition is treated as attachment
            part.disposition = "inline" if disp == "inline" else ("attachment" if disp else "")
            dname = dparams.get("filename", "")
        part.filename = (dname or part.params.get("name", "")).strip()
        cte = fields.get("content-transfer-encoding")
        if cte is not None:
            part.transfer_encoding = unfold(cte).strip().lower() or "7bit"
        cid = fields.get("content-id")
        if cid is not None:
            part.content_id = decode_8bit(unfold(cid)).strip().strip("<>").strip()

    def expand_multipart(self, part: Part, raw_end: bool) -> list[tuple[Part, bool]]:
        """Split a multipart body at its delimiters; returns children (with their raw_end flag)."""
        boundary = part.params.get("boundary", "").rstrip()
        if not boundary:
            self.defect(part, "mime.missing_boundary")
            return []
        try:
            delim = ("--" + boundary).encode("ascii", "surrogateescape")
        except UnicodeEncodeError:
            delim = ("--" + boundary).encode("utf-8", "surrogateescape")
        buf, start, end = self.buf, part.body_start, part.body_end
        nl_delim = b"\n" + delim
        dlen = len(delim)
        # (line_start, after_line, is_close) for every delimiter line, in order
        found: list[tuple[int, int, bool]] = []
        false_hits = 0
        pos = start
        # Deep inside a nest, every level's body holds all the levels below it: searching each
        # body again would cost depth × size. There, the delimiter lines come from one index of
        # the message's "--" lines instead (same candidates, same checks below).
        idx = self.dash_lines() if part.depth >= _INDEX_FROM_DEPTH else None
        hits = idx.get(delim[2:], []) if idx is not None else None
        k = 0

        def next_cand(after: int) -> int:
            """The next line start > after where `delim` begins, or -1 (as buf.find would)."""
            nonlocal k
            if hits is None:
                i = buf.find(nl_delim, after, end)
                return i + 1 if i >= 0 else -1
            k = bisect.bisect_right(hits, after, k)
            return hits[k] if k < len(hits) and hits[k] + dlen <= end else -1

        cand = start if buf.find(delim, start, start + dlen) == start else next_cand(start)
        while cand >= 0:
            m = _TAIL.match(buf, cand + dlen, end)
            if m is not None:
                close = m.group(1) is not None
                found.append((cand, m.end(), close))
                if close:
                    break
                pos = m.end() - 1 if m.group(2) == b"\n" or m.group(2) == b"\r\n" else m.end()
            else:
                false_hits += 1
                if false_hits > _MAX_FALSE_DELIMITERS:
                    self.defect(part, "mime.parts_limit")
                    break
                pos = cand + 1
            if pos >= end:
                break
            cand = next_cand(pos)
        if not found:
            self.defect(part, "mime.boundary_not_found")
            return []
        closed = found[-1][2]
        if not closed:
            self.defect(part, "mime.unterminated")
        children: list[tuple[Part, bool]] = []
        default = "message/rfc822" if part.content_type == "multipart/digest" else "text/plain"
        n = 0
        for k, (_, after, close) in enumerate(found):
            if close:
                break
            if k + 1 < len(found):
                nxt = found[k + 1][0]
                if nxt == after:  # repeated delimiter lines make no empty part (stdlib)
                    continue
                pend = _strip_eol(buf, after, nxt)
                child_raw_end = False
            else:  # unterminated: runs to the parent's end
                pend = _strip_eol(buf, after, end) if raw_end else end
                child_raw_end = raw_end
            if self.count >= self.lim.max_parts:
                self.defect(part, "mime.parts_limit")
                self.stop = True
                break
            n += 1
            path = f"{part.path}.{n}" if part.path else str(n)
            child, text = self.new_part(path, part.depth + 1, after, max(after, pend), default)
            self.fill(child, mime_fields(text) if text else {})
            children.append((child, child_raw_end))
        return children


def _strip_eol(buf: Raw, lo: int, hi: int) -> int:
    """The line break before a delimiter belongs to the delimiter (RFC 2046 §5.1.1)."""
    if hi > lo and buf[hi - 1] == 0x0A:
        hi -= 1
        if hi > lo and buf[hi - 1] == 0x0D:
            hi -= 1
    elif hi > lo and buf[hi - 1] == 0x0D:
        hi -= 1
    return hi


def scan(buf: Raw, lim: ScanLimits) -> Scan:
    """Build the whole tree: top-level headers with compat32 semantics, then a bounded walk."""
    s = _Scanner(buf, lim)
    size = len(buf)
    root, text = s.new_part("", 0, 0, size, "text/plain")
    hdefects: list[str] = []
    fields, unixfrom = parse_fields(text, hdefects) if text else ([], None)
    for d in hdefects:
        s.defect(root, d)
    mf: dict[str, str] = {}
    for name, value in fields:
        key = name.lower()
        if key.startswith("content-"):
            mf.setdefault(key, value)
    s.fill(root, mf)
    # (part, raw_end): raw_end = the part's end was not cut at a delimiter (its last line break
    # is still there), which matters for the last part of an unterminated multipart
    stack: list[tuple[Part, bool]] = [(root, True)]
    while stack and not s.stop:
        part, raw_end = stack.pop()
        ct = part.content_type
        is_multi = ct.startswith("multipart/")
        encaps = ct in _ENCAPSULATED
        if not (is_multi or encaps):
            continue
        if encaps and part.transfer_encoding not in ("7bit", "8bit", "binary", ""):
            s.defect(part, "mime.encoded_message")  # base64 message/rfc822: left as a leaf
            continue
        if part.depth + 1 > lim.max_depth:
            s.defect(part, "mime.depth_limit")
            continue
        if is_multi:
            kids = s.expand_multipart(part, raw_end)
        else:
            if s.count >= lim.max_parts:
                s.defect(part, "mime.parts_limit")
                s.stop = True
                break
            inner, itext = s.new_part(
                f"{part.path}.1" if part.path else "1",
                part.depth + 1,
                part.body_start,
                part.body_end,
                "text/plain",
            )
            idefects: list[str] = []
            ifields, _ = parse_fields(itext, idefects) if itext else ([], None)
            for d in idefects:
                s.defect(inner, d)
            imf: dict[str, str] = {}
            for name, value in ifields:
                key = name.lower()
                if key.startswith("content-"):
                    imf.setdefault(key, value)
            s.fill(inner, imf)
            kids = [(inner, raw_end)]
        part.children = [k for k, _ in kids]
        stack.extend(reversed(kids))
    # Containers left unexpanded when the part bound stopped the walk: each one says so, so
    # the checks list it as a region they could not look into (never as nothing at all).
    for part, _ in stack:
        ct = part.content_type
        if (ct.startswith("multipart/") or ct in _ENCAPSULATED) and "mime.parts_limit" not in (
            part.defects
        ):
            s.defect(part, "mime.parts_limit")
    assign_roles(root)
    return Scan(root, fields, unixfrom, s.defects, s.limited, s.count)


def _leaf_role(p: Part, first_body: list[bool], related: bool, alternative: bool) -> PartRole:
    ct = p.content_type
    if ct in _PKCS7_MIME:
        smime = p.params.get("smime-type", "").lower()
        if smime == "certs-only":
            return "signature"
        # opaque-signed data carries the content in clear: a file to look into, not protection
        return "attachment" if smime == "signed-data" else "encrypted"
    if ct in _SIGNATURES:
        return "signature"
    if ct == "text/calendar":
        return "calendar"
    if p.disposition == "attachment":
        return "attachment"
    if related and p.content_id and ct.startswith("image/"):
        return "inline"
    if alternative and ct.startswith("text/"):
        first_body[0] = True
        return "body"
    if ct == "text/plain" or ct == "text/html":
        if not first_body[0] or not p.filename:
            first_body[0] = True
            return "body"
        return "attachment"
    if ct in _REPORTS:
        return "body"
    return "attachment"


def assign_roles(root: Part) -> None:
    """Roles in tree order; "first body" is tracked per message (reset inside message/rfc822)."""
    # (part, first_body flag of its message, inside multipart/related, parent type)
    stack: list[tuple[Part, list[bool], bool, str]] = [(root, [False], False, "")]
    while stack:
        p, first, related, parent = stack.pop()
        ct = p.content_type
        if ct.startswith("multipart/") or (ct in _ENCAPSULATED and p.children):
            p.role = "container"
            if ct in _ENCAPSULATED:
                stack.extend((c, [False], False, ct) for c in reversed(p.children))
            else:
                rel = related or ct == "multipart/related"
                stack.extend((c, first, rel, ct) for c in reversed(p.children))
        elif parent == "multipart/encrypted":
            p.role = "encrypted"
        else:
            p.role = _leaf_role(p, first, related, parent == "multipart/alternative")


def walk(root: Part) -> list[Part]:
    """Every part in tree order (pre-order, as Message.walk)."""
    out: list[Part] = []
    stack = [root]
    while stack:
        p = stack.pop()
        out.append(p)
        if p.children:
            stack.extend(reversed(p.children))
    return out


__all__ = ["Scan", "ScanLimits", "assign_roles", "decode_words", "scan", "walk"]
