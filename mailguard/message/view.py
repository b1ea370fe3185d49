"""Message stage: a parsed, read-only view of one message, built once per message and never raising.

Cost model (the relay builds a view for every message): header blocks are parsed with the
stdlib's compat32 rules (the `email` package stays the authority on header semantics: `headers`
is a real `email.message.Message`); the MIME tree comes from a boundary scan over the raw bytes
(`mime.py`), so a 1 MB base64 attachment is searched, not decoded. Bodies are transfer-decoded only
when `body_of()` asks, and addresses only when a check reads `to`/`cc`/...

Malformed input never raises: it leaves stable defect codes in `defects`
("header.malformed", "header.missing_separator", "header.too_large", "header.8bit",
"mime.bad_content_type", "mime.missing_boundary", "mime.boundary_not_found", "mime.unterminated",
"mime.encoded_message", "mime.depth_limit", "mime.parts_limit", "mime.bad_base64",
"mime.decoded_limit", "message.parse_error") and `limited` says whether a `Limits` bound was hit.
"""

from __future__ import annotations

import binascii
import logging
import mmap
import re
from dataclasses import dataclass
from email import policy as email_policy
from email.message import Message
from typing import TYPE_CHECKING, Any

from mailguard.message._headers import Raw, decode_value
from mailguard.message.addresses import decode_bytes
from mailguard.message.mime import Scan, ScanLimits, scan, walk
from mailguard.message.types import Address, Part

if TYPE_CHECKING:
    from mailguard.envelope import Envelope

log = logging.getLogger(__name__)

_B64_JUNK = re.compile(rb"[^A-Za-z0-9+/=]")
_B64_ALPHABET_ONLY = re.compile(rb"[^A-Za-z0-9+/]")
_ADDRESS_HEADERS = ("from", "sender", "reply-to", "to", "cc", "bcc")


@dataclass(frozen=True, slots=True)
class Limits:
    # MIME nesting (multipart + message/rfc822): a forward of a forward takes 2 levels, so 2048
    # holds a chain of 1000 forwards (3000 parts). Worst case measured by bench/bench_depth.py:
    # a 2038-deep nest with 5000 parts at the bottom, ~0.15 s and ~25 MB of Python heap.
    max_depth: int = 2048
    max_parts: int = 5000
    max_header_bytes: int = 1 << 20  # per header block; 0 = no limit
    max_decoded_bytes: int = 64 << 20  # body_of() returns at most this much (+ a defect)


class MessageView:
    """One message: raw bytes (bytes or mmap), envelope, decoded headers, MIME tree, lazy bodies."""

    __slots__ = (
        "_addr",
        "_bodies",
        "_fields",
        "_index",
        "_msg",
        "_parts",
        "_unixfrom",
        "defects",
        "envelope",
        "header_end",
        "limited",
        "limits",
        "raw",
        "root",
        "size",
    )

    def __init__(self, raw: Raw, envelope: Envelope | None, limits: Limits, sc: Scan) -> None:
        self.raw = raw
        self.envelope = envelope
        self.limits = limits
        self.size = len(raw)
        self.root: Part = sc.root
        self.header_end: int = sc.root.body_start
        self.defects: list[str] = sc.defects
        self.limited: bool = sc.limited
        self._fields = sc.fields
        self._unixfrom = sc.unixfrom
        self._index: dict[str, list[str]] | None = None
        self._msg: Message | None = None
        self._parts: list[Part] | None = None
        self._addr: dict[str, tuple[Address, ...]] = {}
        self._bodies: dict[tuple[int, int], bytes] = {}

    @classmethod
    def parse(
        cls,
        raw: Raw | memoryview | str,
        envelope: Envelope | None = None,
        limits: Limits = Limits(),
    ) -> MessageView:
        """Build the view. Never raises: malformed input becomes defects."""
        if isinstance(raw, str):
            raw = raw.encode("utf-8", "surrogateescape")
        elif not isinstance(raw, bytes | bytearray | mmap.mmap):
            raw = bytes(raw)
        smtputf8 = bool(envelope is not None and envelope.smtputf8)
        lim = ScanLimits(limits.max_depth, limits.max_parts, limits.max_header_bytes, smtputf8)
        try:
            sc = scan(raw, lim)
        except Exception:  # a scanner bug must cost a defect, never the message
            log.exception("message view: scan failed, falling back to a flat view")
            sc = _flat(len(raw))
        return cls(raw, envelope, limits, sc)

    # --- headers -------------------------------------------------------------------------------

    @property
    def headers(self) -> Message:
        """The top-level header block as a stdlib Message (compat32; payload not set)."""
        if self._msg is None:
            msg = Message(email_policy.compat32)
            if self._unixfrom:
                msg.set_unixfrom(self._unixfrom)
            for name, value in self._fields:
                msg.set_raw(name, value)
            self._msg = msg
        return self._msg

    def raw_header_all(self, name: str) -> list[str]:
        """Undecoded values (8-bit bytes as surrogateescape), every occurrence, in order."""
        if self._index is None:
            idx: dict[str, list[str]] = {}
            for n, v in self._fields:
                idx.setdefault(n.lower(), []).append(v)
            self._index = idx
        return list(self._index.get(name.lower(), ()))

    def header_all(self, name: str) -> list[str]:
        return [decode_value(v) for v in self.raw_header_all(name)]

    def header(self, name: str) -> str | None:
        """First value, unfolded and decoded (RFC 2047, raw UTF-8/CP932, raw JIS), or None."""
        vals = self.raw_header_all(name)
        return decode_value(vals[0]) if vals else None

    @property
    def subject(self) -> str:
        return self.header("subject") or ""

    @property
    def message_id(self) -> str | None:
        return (self.header("message-id") or "").strip() or None

    # --- addresses (parsed on first use) -------------------------------------------------------

    def _addresses(self, name: str) -> tuple[Address, ...]:
        got = self._addr.get(name)
        if got is None:
            from mailguard.message.addresses import parse_addresses

            got = tuple(parse_addresses(name, self.raw_header_all(name)))
            self._addr[name] = got
        return got

    @property
    def from_(self) -> tuple[Address, ...]:
        return self._addresses("from")

    @property
    def sender(self) -> tuple[Address, ...]:
        return self._addresses("sender")

    @property
    def reply_to(self) -> tuple[Address, ...]:
        return self._addresses("reply-to")

    @property
    def to(self) -> tuple[Address, ...]:
        return self._addresses("to")

    @property
    def cc(self) -> tuple[Address, ...]:
        return self._addresses("cc")

    @property
    def bcc(self) -> tuple[Address, ...]:
        return self._addresses("bcc")

    @property
    def rcpts(self) -> tuple[Address, ...]:
        """The envelope recipients (RCPT TO) as addresses; () without an envelope."""
        got = self._addr.get("envelope")
        if got is None:
            from mailguard.message.addresses import parse_envelope

            env = self.envelope
            got = tuple(parse_envelope(env.rcpt_tos)) if env is not None else ()
            self._addr["envelope"] = got
        return got

    @property
    def visible(self) -> tuple[Address, ...]:
        """What every recipient sees: To + Cc."""
        return self.to + self.cc

    # --- MIME tree -----------------------------------------------------------------------------

    @property
    def parts(self) -> list[Part]:
        """Every part, tree order (root first)."""
        if self._parts is None:
            self._parts = walk(self.root)
        return self._parts

    @property
    def leaves(self) -> list[Part]:
        return [p for p in self.parts if p.role != "container"]

    @property
    def attachments(self) -> list[Part]:
        return [p for p in self.parts if p.role == "attachment"]

    def header_block(self, part: Part) -> bytes:
        """Raw header bytes of a part (with the blank line that ends them)."""
        return bytes(self.raw[part.header_start : part.body_start])

    def body_of(self, part: Part) -> bytes:
        """Transfer-decoded body (base64, quoted-printable, uuencode), at most max_decoded_bytes."""
        key = (part.body_start, part.body_end)
        got = self._bodies.get(key)
        if got is None:
            got, defects = _decode_body(self.raw, part, self.limits.max_decoded_bytes)
            for d in defects:
                if d not in part.defects:
                    part.defects.append(d)
                    self.defects.append(d)
                if d == "mime.decoded_limit":
                    self.limited = True
            self._bodies[key] = got
        return got

    def text_of(self, part: Part) -> str:
        """body_of() decoded with the part's charset (Japanese-aware, never raises)."""
        return decode_bytes(self.body_of(part), part.charset or "us-ascii")

    def to_json(self) -> dict[str, Any]:
        return {
            "size": self.size,
            "subject": self.subject,
            "message_id": self.message_id,
            "parts": len(self.parts),
            "defects": list(self.defects),
            "limited": self.limited,
        }

    def __repr__(self) -> str:
        return f"<MessageView size={self.size} parts={len(self.parts)} defects={self.defects}>"


def _flat(size: int) -> Scan:
    root = Part(
        path="",
        depth=0,
        content_type="text/plain",
        params={},
        disposition="",
        filename="",
        charset="",
        transfer_encoding="7bit",
        content_id="",
        role="body",
        header_start=0,
        body_start=0,
        body_end=size,
        defects=["message.parse_error"],
    )
    return Scan(root, [], None, ["message.parse_error"], False, 1)


def _decode_body(raw: Raw, part: Part, limit: int) -> tuple[bytes, list[str]]:
    start, end = part.body_start, part.body_end
    cte = part.transfer_encoding
    defects: list[str] = []
    if limit <= 0:
        limit = end - start
    if cte == "base64":
        # 4 chars → 3 bytes, plus line breaks (76 + CRLF): read just enough for `limit`
        need = (limit + 2) // 3 * 4
        need += need // 38 + 8
        cut = end - start > need
        data, ok = _b64(bytes(raw[start : start + need if cut else end]), cut)
        if not ok:
            defects.append("mime.bad_base64")
    elif cte == "quoted-printable":
        cut = end - start > 3 * limit
        data = binascii.a2b_qp(bytes(raw[start : start + 3 * limit if cut else end]))
    elif cte in ("x-uuencode", "uuencode", "uue", "x-uue"):
        cut = end - start > 2 * limit
        data = _uu(bytes(raw[start : start + 2 * limit if cut else end]))
    else:  # 7bit, 8bit, binary, unknown: as sent
        cut = end - start > limit
        data = bytes(raw[start : start + limit if cut else end])
    if cut or len(data) > limit:
        defects.append("mime.decoded_limit")
        data = data[:limit]
    return data, defects


def _b64(data: bytes, truncated: bool) -> tuple[bytes, bool]:
    """Lenient base64 (as the stdlib's decode_b): non-alphabet bytes skipped, padding repaired."""
    if truncated:  # cut mid-stream: decode whole quanta only
        clean = _B64_JUNK.sub(b"", data)
        clean = clean[: len(clean) // 4 * 4]
        try:
            return binascii.a2b_base64(clean), True
        except binascii.Error:
            pass
    else:
        try:
            return binascii.a2b_base64(data), True
        except binascii.Error:
            pass
        try:
            return binascii.a2b_base64(data + b"=="), False
        except binascii.Error:
            pass
    clean = _B64_ALPHABET_ONLY.sub(b"", data)
    return binascii.a2b_base64(clean[: len(clean) // 4 * 4]), False


def _uu(data: bytes) -> bytes:
    out = bytearray()
    lines = iter(data.splitlines())
    for line in lines:
        if line.startswith(b"begin"):
            break
    for line in lines:
        if line.strip() == b"end" or not line:
            break
        try:
            out += binascii.a2b_uu(line)
        except binascii.Error:
            # broken encoders pad badly; the stdlib's uu module recovers the same way
            nbytes = (((line[0] - 32) & 63) * 4 + 5) // 3
            try:
                out += binascii.a2b_uu(line[:nbytes])
            except binascii.Error:
                break
    return bytes(out)
