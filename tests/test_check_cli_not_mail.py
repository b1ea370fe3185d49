"""Issue 13 part 4 — input that is not mail: `mailguard check` says so (exit 2,
"not an e-mail message: FILE") instead of judging it "pass"."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest


def png() -> bytes:
    def chunk(t: bytes, d: bytes) -> bytes:
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))

    ihdr = struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0\xff\0\0"))
        + chunk(b"IEND", b"")
    )


INPUTS = {
    "empty": b"",
    "blank lines": b"\r\n\r\n  \r\n",
    "random": os.urandom(4096),
    "png": png(),
    "pdf": b"%PDF-1.4\n1 0 obj << >> endobj\n%%EOF\n",
    "zip": b"PK\x03\x04" + b"\0" * 100,
}


def check(*paths: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mailguard", "check", "--json", *map(str, paths)],
        capture_output=True,
        text=True,
        check=False,
    )


@pytest.mark.parametrize("name", INPUTS)
def test_not_mail_exits_2(tmp_path: Path, name: str) -> None:
    f = tmp_path / f"{name.replace(' ', '_')}.eml"
    f.write_bytes(INPUTS[name])
    r = check(f)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert f"not an e-mail message: {f}" in r.stderr
    assert r.stdout == ""  # no "pass" verdict


def test_mail_next_to_non_mail_is_still_checked(tmp_path: Path) -> None:
    good = tmp_path / "good.eml"
    good.write_bytes(b"From: a@ourco.co.jp\r\nTo: b@ourco.co.jp\r\nSubject: hi\r\n\r\nhello\r\n")
    bad = tmp_path / "bad.png"
    bad.write_bytes(png())
    r = check(good, bad)
    assert r.returncode == 2
    assert [json.loads(ln)["file"] for ln in r.stdout.splitlines()] == [str(good)]
    assert f"not an e-mail message: {bad}" in r.stderr


def test_headers_only_message_is_mail(tmp_path: Path) -> None:
    f = tmp_path / "h.eml"
    f.write_bytes(b"Subject: hi\nFrom: a@b.co.jp\n  (folded)\n")
    assert check(f).returncode == 0
