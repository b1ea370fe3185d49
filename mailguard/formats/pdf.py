"""PDF: the /Encrypt dictionary, and whether the empty user password opens the file.

A PDF with only an owner password (permissions: no printing, no copying) opens in every viewer
without a password, so it is not protection. With the standard security handler we try the empty
user password exactly as a viewer does (ISO 32000 algorithms 2, 4, 5 for R2-R4, 2.A/2.B for R5/R6):
if it validates, the file is readable by anyone.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

from mailguard.formats.base import FileInfo

PAD = bytes.fromhex("28BF4E5E4E758A4164004E56FFFA01082E2E00B6D0683E802F0CA9FE6453697A")
MIME = "application/pdf"
WS = b" \t\r\n\f\x00"
DELIM = b"()<>[]{}/%"
MAX_SEARCH = 2000  # /Encrypt candidates examined, newest first

Obj = Any  # bytes (string), str (name), int/float, bool, None, list, dict, ("ref", n, g)


class _Parser:
    """Just enough of the PDF object syntax for the encryption dictionary and the /ID array."""

    def __init__(self, data: bytes, pos: int, end: int) -> None:
        self.d = data
        self.i = pos
        self.end = min(end, len(data))

    def ws(self) -> None:
        d, i = self.d, self.i
        while i < self.end:
            c = d[i]
            if c in WS:
                i += 1
            elif c == 0x25:  # % comment to end of line
                while i < self.end and d[i] not in b"\r\n":
                    i += 1
            else:
                break
        self.i = i

    def value(self, depth: int = 0) -> Obj:
        if depth > 20:
            raise ValueError("too deep")
        self.ws()
        d, i = self.d, self.i
        if i >= self.end:
            raise ValueError("eof")
        if d.startswith(b"<<", i):
            self.i += 2
            out: dict[str, Obj] = {}
            while True:
                self.ws()
                if self.d.startswith(b">>", self.i):
                    self.i += 2
                    return out
                key = self.value(depth + 1)
                if not isinstance(key, str):
                    raise ValueError("dict key")
                out[key] = self.value(depth + 1)
        c = d[i]
        if c == 0x2F:  # /Name
            j = i + 1
            while j < self.end and d[j] not in WS and d[j] not in DELIM:
                j += 1
            self.i = j
            return d[i + 1 : j].decode("latin-1")
        if c == 0x28:  # (literal string)
            return self._literal()
        if c == 0x3C:  # <hex string>
            j = d.find(b">", i)
            if j < 0 or j > self.end:
                raise ValueError("hex")
            self.i = j + 1
            hx = bytes(ch for ch in d[i + 1 : j] if ch not in WS)
            if len(hx) % 2:
                hx += b"0"
            return bytes.fromhex(hx.decode("ascii"))
        if c == 0x5B:  # [array]
            self.i += 1
            arr: list[Obj] = []
            while True:
                self.ws()
                if self.i >= self.end:
                    raise ValueError("array")
                if self.d[self.i] == 0x5D:
                    self.i += 1
                    return arr
                arr.append(self.value(depth + 1))
        m = re.compile(rb"[+-]?(\d+\.?\d*|\.\d+)").match(d, i, self.end)
        if m:
            self.i = m.end()
            num = m.group()
            if b"." in num:
                return float(num)
            ref = re.compile(rb"\s+(\d+)\s+R(?![A-Za-z])").match(d, self.i, self.end)
            if ref:
                self.i = ref.end()
                return ("ref", int(num), int(ref.group(1)))
            return int(num)
        for word, val in ((b"true", True), (b"false", False), (b"null", None)):
            if d.startswith(word, i):
                self.i += len(word)
                return val
        raise ValueError(f"unexpected byte {c:#x}")

    def _literal(self) -> bytes:
        d = self.d
        i = self.i + 1
        out = bytearray()
        nest = 1
        esc = {ord("n"): 10, ord("r"): 13, ord("t"): 9, ord("b"): 8, ord("f"): 12}
        while i < self.end:
            c = d[i]
            if c == 0x5C:  # backslash
                i += 1
                if i >= self.end:
                    break
                c = d[i]
                if c in esc:
                    out.append(esc[c])
                elif 0x30 <= c <= 0x37:
                    j = i
                    while j < min(i + 3, self.end) and 0x30 <= d[j] <= 0x37:
                        j += 1
                    out.append(int(d[i:j], 8) & 0xFF)
                    i = j - 1
                elif c == 0x0D:  # line continuation
                    if i + 1 < self.end and d[i + 1] == 0x0A:
                        i += 1
                elif c != 0x0A:
                    out.append(c)
            elif c == 0x28:
                nest += 1
                out.append(c)
            elif c == 0x29:
                nest -= 1
                if nest == 0:
                    self.i = i + 1
                    return bytes(out)
                out.append(c)
            else:
                out.append(c)
            i += 1
        raise ValueError("unterminated string")


def _find_object(data: bytes, num: int, gen: int) -> int:
    """Offset just after `num gen obj` (the newest definition), or -1."""
    needle = b"%d %d obj" % (num, gen)
    end = len(data)
    for _ in range(MAX_SEARCH):
        i = data.rfind(needle, 0, end)
        if i < 0:
            break
        if i == 0 or data[i - 1] not in b"0123456789":
            return i + len(needle)
        end = i
    last = -1
    for m in re.finditer(rb"(?<!\d)%d\s+%d\s+obj" % (num, gen), data):
        last = m.end()
    return last


def _encrypt_dict(data: bytes) -> tuple[dict[str, Obj] | None, bool]:
    """(the newest /Encrypt dictionary, whether any /Encrypt key was seen at all)."""
    end = len(data)
    seen = False
    for _ in range(MAX_SEARCH):
        i = data.rfind(b"/Encrypt", 0, end)
        if i < 0:
            return None, seen
        end = i
        j = i + 8
        if j < len(data) and (data[j] in WS or data[j] in b"<0123456789"):
            try:
                p = _Parser(data, j, j + 4096)
                val = p.value()
            except ValueError:
                continue
            seen = True
            if isinstance(val, tuple):
                at = _find_object(data, val[1], val[2])
                if at < 0:
                    continue
                try:
                    val = _Parser(data, at, at + (1 << 16)).value()
                except ValueError:
                    continue
            if isinstance(val, dict):
                return val, True
    return None, seen


def _first_id(data: bytes) -> bytes:
    end = len(data)
    for _ in range(MAX_SEARCH):
        i = data.rfind(b"/ID", 0, end)
        if i < 0:
            return b""
        end = i
        try:
            val = _Parser(data, i + 3, i + 3 + 1024).value()
        except ValueError:
            continue
        if isinstance(val, list) and val and isinstance(val[0], bytes):
            return val[0]
    return b""


def _rc4(key: bytes, data: bytes) -> bytes:
    s = list(range(256))
    j = 0
    for i in range(256):
        j = (j + s[i] + key[i % len(key)]) & 0xFF
        s[i], s[j] = s[j], s[i]
    out = bytearray()
    i = j = 0
    for byte in data:
        i = (i + 1) & 0xFF
        j = (j + s[i]) & 0xFF
        s[i], s[j] = s[j], s[i]
        out.append(byte ^ s[(s[i] + s[j]) & 0xFF])
    return bytes(out)


def _empty_password_r2_4(d: dict[str, Obj], r: int, id0: bytes) -> bool:
    o, u = d.get("O"), d.get("U")
    if not isinstance(o, bytes) or not isinstance(u, bytes):
        raise ValueError("/O or /U missing")
    length = d.get("Length", 40)
    n = 5 if r == 2 else max(5, min(16, int(length) // 8 if isinstance(length, int) else 16))
    if r == 4:
        n = 16 if not isinstance(length, int) or length < 40 else n
    p = int(d.get("P", 0)) & 0xFFFFFFFF
    h = hashlib.md5(PAD + o[:32] + p.to_bytes(4, "little") + id0)
    if r >= 4 and d.get("EncryptMetadata") is False:
        h.update(b"\xff\xff\xff\xff")
    key = h.digest()
    if r >= 3:
        for _ in range(50):
            key = hashlib.md5(key[:n]).digest()
    key = key[:n]
    if r == 2:
        return _rc4(key, PAD) == u[:32]
    x = _rc4(key, hashlib.md5(PAD + id0).digest())
    for i in range(1, 20):
        x = _rc4(bytes(b ^ i for b in key), x)
    return x == u[:16]


def _aes128_cbc(key: bytes, iv: bytes, data: bytes) -> bytes:
    try:
        from Cryptodome.Cipher import AES  # pycryptodomex: already required by pyzipper

        return bytes(AES.new(key, AES.MODE_CBC, iv).encrypt(data))
    except ImportError:
        from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

        enc = Cipher(algorithms.AES(key), modes.CBC(iv)).encryptor()
        return enc.update(data) + enc.finalize()


def _hash_r6(password: bytes, salt: bytes, udata: bytes) -> bytes:
    """ISO 32000-2 algorithm 2.B."""
    k = hashlib.sha256(password + salt + udata).digest()
    i = 0
    while True:
        e = _aes128_cbc(k[:16], k[16:32], (password + k + udata) * 64)
        k = (hashlib.sha256, hashlib.sha384, hashlib.sha512)[sum(e[:16]) % 3](e).digest()
        i += 1
        if i >= 64 and e[-1] <= i - 32:
            return k[:32]
        if i > 2000:  # the loop ends after a few hundred rounds at most; guard anyway
            raise ValueError("hash did not converge")


def _empty_password_r5_6(d: dict[str, Obj], r: int) -> bool:
    u = d.get("U")
    if not isinstance(u, bytes) or len(u) < 40:
        raise ValueError("/U missing")
    if r == 5:
        return hashlib.sha256(u[32:40]).digest() == u[:32]
    return _hash_r6(b"", u[32:40], b"") == u[:32]


def _cipher_name(d: dict[str, Obj], r: int) -> str:
    if r >= 5:
        return "AES-256"
    cf = d.get("CF")
    stmf = d.get("StmF", "Identity")
    if isinstance(cf, dict):
        sub = cf.get(stmf) if isinstance(stmf, str) else None
        if isinstance(sub, dict) and sub.get("CFM") == "AESV2":
            return "AES-128"
    length = d.get("Length", 40)
    return f"RC4-{length if isinstance(length, int) and r > 2 else 40}"


def sniff_pdf(data: bytes) -> FileInfo:
    d, seen = _encrypt_dict(data)
    if d is None:
        if seen:
            return FileInfo("pdf", MIME, None, "PDF has /Encrypt but its dictionary is unreadable")
        return FileInfo("pdf", MIME, False, "PDF without encryption")
    flt = d.get("Filter")
    if flt != "Standard":
        # Public-key (certificate) security and third-party handlers: no password opens them.
        return FileInfo("pdf", MIME, True, f"PDF encrypted with the {flt} security handler")
    r = d.get("R")
    if not isinstance(r, int) or not 2 <= r <= 6:
        return FileInfo("pdf", MIME, None, f"PDF standard security revision {r} not understood")
    cipher = _cipher_name(d, r)
    try:
        opens = (
            _empty_password_r2_4(d, r, _first_id(data)) if r <= 4 else _empty_password_r5_6(d, r)
        )
    except (ValueError, TypeError, ImportError) as e:
        return FileInfo("pdf", MIME, None, f"PDF encrypted ({cipher}); could not test: {e}")
    if opens:
        return FileInfo(
            "pdf",
            MIME,
            False,
            f"owner password only: opens without a password ({cipher}, restrictions only)",
        )
    return FileInfo("pdf", MIME, True, f"PDF needs a password to open ({cipher})")
