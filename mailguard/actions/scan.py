"""Scan seam of the zip transform: look at each clear attachment before it is encrypted.

Once a file is inside a password zip, no scanner on the way can read it any more (one of the
reasons "PPAP" is criticised), so the guard offers one last look at the clear bytes. A scanner is
any callable `(data, filename) -> None` that raises `ScanRejected` to refuse a file; the zip
transform lets the exception through, and the caller decides (reject or hold the message).

`ClamdScanner` speaks clamd's INSTREAM protocol over a Unix or TCP socket. It does blocking I/O
with a timeout: run the transform in a worker thread (as the guard does for zips anyway).
"""

from __future__ import annotations

import socket
import struct
from typing import Protocol


class ScanRejected(Exception):
    """The scanner refused a file (malware found, or the scanner failed and policy says refuse)."""

    def __init__(self, filename: str, reason: str):
        self.filename = filename
        self.reason = reason
        super().__init__(f"{filename}: {reason}")


class Scanner(Protocol):
    def __call__(self, data: bytes, filename: str) -> None: ...


class ClamdScanner:
    """clamd INSTREAM client: `ClamdScanner("/run/clamav/clamd.ctl")` or `(("127.0.0.1", 3310))`.

    `fail_open=False` (default) turns a scanner outage into ScanRejected, so nothing is
    encrypted unscanned; set True to zip anyway when clamd is down.
    """

    CHUNK = 1 << 16

    def __init__(
        self,
        address: str | tuple[str, int],
        *,
        timeout: float = 30.0,
        fail_open: bool = False,
    ):
        self.address = address
        self.timeout = timeout
        self.fail_open = fail_open

    def _connect(self) -> socket.socket:
        if isinstance(self.address, str):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        else:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        s.connect(self.address)
        return s

    def __call__(self, data: bytes, filename: str) -> None:
        try:
            with self._connect() as s:
                s.sendall(b"zINSTREAM\0")
                mv = memoryview(data)
                for i in range(0, len(mv), self.CHUNK):
                    chunk = mv[i : i + self.CHUNK]
                    s.sendall(struct.pack("!L", len(chunk)) + chunk)
                s.sendall(struct.pack("!L", 0))
                reply = bytearray()
                while not reply.endswith(b"\0"):
                    got = s.recv(4096)
                    if not got:
                        break
                    reply += got
        except OSError as e:
            if self.fail_open:
                return
            raise ScanRejected(filename, f"virus scanner unavailable ({e})") from e
        text = reply.rstrip(b"\0").decode("utf-8", "replace").strip()
        if text.endswith("OK"):
            return
        if text.endswith("FOUND"):
            raise ScanRejected(filename, text.split(":", 1)[-1].strip())
        if self.fail_open:
            return
        raise ScanRejected(filename, f"virus scanner error: {text or 'no answer'}")
