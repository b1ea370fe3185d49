"""S/MIME (CMS) and OpenPGP: encrypted for recipients, or only signed/compressed.

CMS is recognised by its ContentInfo OID (DER or BER, bare or PEM). OpenPGP by its packets, bare
or ASCII-armoured; binary packets are claimed only when a whole run of key packets is followed by
an encrypted-data packet, so random bytes are not mistaken for a message.
"""

from __future__ import annotations

import base64
import binascii

from mailguard.formats.base import FileInfo

P7 = b"\x2a\x86\x48\x86\xf7\x0d\x01\x07"  # 1.2.840.113549.1.7
P9_CT = b"\x2a\x86\x48\x86\xf7\x0d\x01\x09\x10\x01"  # 1.2.840.113549.1.9.16.1
CMS_TYPES = {
    P7 + b"\x01": ("data", False),
    P7 + b"\x02": ("signed-data", False),
    P7 + b"\x03": ("enveloped-data", True),
    P7 + b"\x06": ("encrypted-data", True),
    P9_CT + b"\x17": ("authenticated-enveloped-data", True),
    P9_CT + b"\x09": ("compressed-data", False),
}
SMIME = "application/pkcs7-mime"
PGP = "application/pgp-encrypted"

ESK = {1: (3, 6), 3: (4, 5, 6)}  # key packets: tag -> valid versions
ENC_DATA = {9, 18, 20}  # symmetrically encrypted data packets
PLAIN_FIRST = {2, 4, 8, 11}  # signature, one-pass signature, compressed, literal


def _der_len(b: bytes, i: int) -> tuple[int, int] | None:
    """(length or -1 for indefinite, offset after the length) or None."""
    if i >= len(b):
        return None
    first = b[i]
    if first < 0x80:
        return first, i + 1
    if first == 0x80:
        return -1, i + 1
    n = first & 0x7F
    if n > 4 or i + 1 + n > len(b):
        return None
    return int.from_bytes(b[i + 1 : i + 1 + n], "big"), i + 1 + n


def cms_type(b: bytes) -> tuple[str, bool] | None:
    """ContentInfo's content type, if `b` starts with one."""
    if len(b) < 13 or b[0] != 0x30:
        return None
    ln = _der_len(b, 1)
    if ln is None or b[ln[1]] != 0x06:
        return None
    olen = _der_len(b, ln[1] + 1)
    if olen is None or not 0 < olen[0] <= 16:
        return None
    oid = b[olen[1] : olen[1] + olen[0]]
    found = CMS_TYPES.get(oid)
    if found and found[0] == "signed-data":
        head = b[: 1 << 12]  # sign-then-encrypt: the signed content is itself enveloped
        for inner, (name, enc) in CMS_TYPES.items():
            if enc and head.find(b"\x06" + bytes([len(inner)]) + inner, olen[1]) >= 0:
                return f"signed {name}", True
    return found


def sniff_cms(b: bytes) -> FileInfo | None:
    t = cms_type(b)
    if t is None:
        return None
    name, enc = t
    if enc:
        return FileInfo("smime", SMIME, True, f"S/MIME {name}: only the recipients can open it")
    return FileInfo("smime", SMIME, False, f"S/MIME {name}: not encrypted")


def _packet(b: bytes, i: int) -> tuple[int, int, int] | None:
    """(tag, body offset, body length or -1 when partial/indeterminate) of the packet at i."""
    if i >= len(b) or not b[i] & 0x80:
        return None
    h = b[i]
    if h & 0x40:
        tag = h & 0x3F
        if i + 1 >= len(b):
            return None
        l1 = b[i + 1]
        if l1 < 192:
            return tag, i + 2, l1
        if l1 < 224:
            if i + 2 >= len(b):
                return None
            return tag, i + 3, ((l1 - 192) << 8) + b[i + 2] + 192
        if l1 == 255:
            return tag, i + 6, int.from_bytes(b[i + 2 : i + 6], "big")
        return tag, i + 2, -1
    tag, lt = (h >> 2) & 0x0F, h & 3
    if lt == 3:
        return tag, i + 1, -1
    n = (1, 2, 4)[lt]
    return tag, i + 1 + n, int.from_bytes(b[i + 1 : i + 1 + n], "big")


def pgp_packets(b: bytes) -> tuple[bool, str] | None:
    """(encrypted, description) when `b` is a plausible OpenPGP message, else None."""
    i = 0
    keys = 0
    for _ in range(64):
        p = _packet(b, i)
        if p is None:
            return None
        tag, body, ln = p
        if body >= len(b):
            return None
        if tag in ESK:
            if b[body] not in ESK[tag] or not 4 <= ln <= 2048 or body + ln > len(b):
                return None
            keys += 1
            i = body + ln
            continue
        if tag in ENC_DATA:
            if tag == 18 and b[body] not in (1, 2):
                return None
            if keys == 0 and tag != 18:
                return None
            who = f"{keys} key packet{'s' if keys != 1 else ''}"
            return True, f"OpenPGP encrypted message ({who})"
        if keys == 0 and tag in PLAIN_FIRST:
            ok = {8: b[body] <= 3, 4: b[body] == 3, 2: b[body] in (3, 4, 5, 6), 11: True}[tag]
            if ok:
                return False, "OpenPGP signed or compressed message: not encrypted"
        return None
    return None


ARMOR = b"-----BEGIN PGP "


def sniff_armor(b: bytes) -> FileInfo | None:
    """ASCII-armoured OpenPGP near the start of a text file."""
    at = b.find(ARMOR, 0, 4096)
    if at < 0:
        return None
    line_end = b.find(b"-----", at + len(ARMOR))
    label = b[at + len(ARMOR) : line_end].decode("ascii", "replace") if line_end > 0 else ""
    if label == "SIGNED MESSAGE":
        return FileInfo("pgp", "text/plain", False, "OpenPGP clear-signed text: not encrypted")
    if label in ("PUBLIC KEY BLOCK", "SIGNATURE"):
        return FileInfo("pgp", "application/pgp-keys", False, f"OpenPGP {label.lower()}")
    if label != "MESSAGE":
        return None
    lines = b[at : at + (1 << 16)].splitlines()[1:]
    while lines and lines[0].strip() and b":" in lines[0]:  # armour headers
        lines = lines[1:]
    body = bytearray()
    for ln in lines:
        s = ln.strip()
        if s.startswith((b"=", b"-----")) or len(body) > 4096:
            break
        body += s
    try:
        raw = base64.b64decode(bytes(body[: len(body) // 4 * 4]))
    except (binascii.Error, ValueError):
        raw = b""
    got = pgp_packets(raw)
    if got is None:
        return FileInfo("pgp", PGP, None, "OpenPGP message whose packets could not be read")
    enc, what = got
    return FileInfo("pgp", PGP if enc else "application/pgp-signature", enc, what)


def sniff_pem_cms(b: bytes) -> FileInfo | None:
    for label in (b"PKCS7", b"CMS", b"PKCS #7 SIGNED DATA"):
        at = b.find(b"-----BEGIN " + label + b"-----", 0, 4096)
        if at < 0:
            continue
        end = b.find(b"-----END", at)
        blob = b"".join(b[at : end if end > 0 else at + 8192].splitlines()[1:])[:8192]
        try:  # the ContentInfo header is all we need: decode a whole number of quads
            der = base64.b64decode(blob[: len(blob) // 4 * 4])
        except (binascii.Error, ValueError):
            return None
        return sniff_cms(der)
    return None
