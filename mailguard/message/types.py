"""Value types of the message view: addresses and MIME parts (shared by checks and actions)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

HeaderName = Literal["from", "sender", "reply-to", "to", "cc", "bcc", "envelope"]

# What a MIME leaf is to the sender: only "attachment" is a user file that checks care about.
PartRole = Literal[
    "body",  # the text/plain or text/html body (or its alternative)
    "attachment",  # a user file (Content-Disposition attachment, or a named non-text leaf)
    "inline",  # inline image referenced by Content-ID (logos in HTML mail)
    "calendar",  # text/calendar invitations
    "signature",  # application/pkcs7-signature, application/pgp-signature
    "container",  # multipart/*, message/rfc822 (have children)
    "encrypted",  # application/pkcs7-mime enveloped-data, multipart/encrypted payload
]


@dataclass(frozen=True, slots=True)
class Address:
    """One mailbox as it appears in a header (or the envelope).

    `domain` is the comparison key: lowercase A-label (punycode), no trailing dot, "" if the
    address has no domain. `domain_unicode` is what people should be shown (U-label).
    """

    addr: str  # local@domain as written (domain normalised to lowercase, no trailing dot)
    local: str
    domain: str  # A-label, lowercase
    domain_unicode: str  # U-label for display
    display_name: str = ""  # RFC 2047-decoded
    header: HeaderName = "to"
    group: str | None = None  # RFC 5322 group name, e.g. "undisclosed-recipients"
    recovered: bool = False  # True when the stdlib parser lost it and we recovered it by scan

    def __str__(self) -> str:
        return self.addr


@dataclass(slots=True)
class Part:
    """One MIME part found by the boundary scan. Body bytes are decoded only on demand."""

    path: str  # "1", "1.2", "1.2.1" (IMAP-style section numbers); "" is the root
    depth: int
    content_type: str  # lowercase "type/subtype"
    params: dict[str, str]  # Content-Type params, decoded (RFC 2231 / 2047), lowercase keys
    disposition: str  # "attachment", "inline" or ""
    filename: str  # decoded filename ("" if none): filename*= / filename= / name=
    charset: str
    transfer_encoding: str  # lowercase: 7bit, 8bit, binary, base64, quoted-printable
    content_id: str
    role: PartRole
    header_start: int  # offsets into the raw message bytes
    body_start: int
    body_end: int
    children: list[Part] = field(default_factory=list)
    defects: list[str] = field(default_factory=list)

    @property
    def encoded_size(self) -> int:
        return self.body_end - self.body_start
