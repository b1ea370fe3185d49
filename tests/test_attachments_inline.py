"""Issue 13 part 2 — files written into the text body (uuencode, yEnc, BinHex 4.0) are
attachments: found, named, judged by their bytes, shown in `mailguard check --json`, and —
because the zip rewrite encloses MIME parts only — reported as `attachment.inline`, which every
shipped policy stops for external recipients (confirm/approve)."""

from __future__ import annotations

import binascii
import json
import subprocess
import sys
from pathlib import Path

import pytest

from mailguard.formats.inline import find_encoded

ROOT = Path(__file__).resolve().parents[1]
POLICIES = sorted(
    [ROOT / "policies" / "default.toml", *(ROOT / "policies/examples").glob("*.toml")]
)
PDF = b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\n" + bytes(range(256)) * 8 + b"\n%%EOF\n"


def uuencode(name: str, data: bytes) -> bytes:
    out = [f"begin 644 {name}".encode()]
    out += [binascii.b2a_uu(data[i : i + 45]).rstrip(b"\n") for i in range(0, len(data), 45)]
    return b"\r\n".join([*out, b"`", b"end"]) + b"\r\n"


def yenc(name: str, data: bytes) -> bytes:
    enc = bytearray()
    for b in data:
        c = (b + 42) % 256
        enc += bytes([0x3D, (c + 64) % 256]) if c in (0, 10, 13, 0x3D) else bytes([c])
    body = b"\r\n".join(bytes(enc[i : i + 128]) for i in range(0, len(enc), 128))
    head = b"=ybegin line=128 size=%d name=%s\r\n" % (len(data), name.encode())
    return head + body + b"\r\n=yend size=%d\r\n" % len(data)


_HQX = b"!\"#$%&'()*+,-012345689@ABCDEFGHIJKLMNPQRSTUVXYZ[`abcdefhijklmpqr"


def binhex(name: str, data: bytes) -> bytes:
    def crc(b: bytes) -> bytes:
        return binascii.crc_hqx(b + b"\0\0", 0).to_bytes(2, "big")

    nb = name.encode("mac_roman")
    hdr = bytes([len(nb)]) + nb + b"\0" + b"PDF CARO" + b"\0\0"
    hdr += len(data).to_bytes(4, "big") + (0).to_bytes(4, "big")
    stream = hdr + crc(hdr) + data + crc(data) + crc(b"")
    stream = stream.replace(b"\x90", b"\x90\x00")  # RLE: a literal 0x90
    bits = "".join(f"{b:08b}" for b in stream)
    bits += "0" * (-len(bits) % 6)
    chars = bytes(_HQX[int(bits[i : i + 6], 2)] for i in range(0, len(bits), 6))
    lines = b"\r\n".join(chars[i : i + 64] for i in range(0, len(chars), 64))
    return b"(This file must be converted with BinHex 4.0)\r\n\r\n:" + lines + b":\r\n"


def message(block: bytes, to: str = "tanaka@customer.co.jp") -> bytes:
    return (
        b"From: yamada@ourco.co.jp\r\nTo: " + to.encode() + b"\r\nSubject: report\r\n"
        b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n"
        b"Hello,\r\nthe report is below.\r\n\r\n" + block + b"\r\nRegards\r\n"
    )


ENCODERS = {"uuencode": uuencode, "yenc": yenc, "binhex": binhex}


@pytest.mark.parametrize("encoding", ENCODERS)
def test_decoders_round_trip(encoding: str) -> None:
    text = b"before\r\n" + ENCODERS[encoding]("report.pdf", PDF) + b"after\r\n"
    (f,) = find_encoded(text)
    assert (f.encoding, f.name, f.data, f.complete) == (encoding, "report.pdf", PDF, True)
    assert text[f.start :].startswith((b"begin", b"=ybegin", b"(This"))


def test_prose_is_not_a_block() -> None:
    assert find_encoded(b"we begin 644 tests\r\nbegin 644 plans on monday\r\nthe end\r\n") == []


def run_check(tmp_path: Path, data: bytes, *extra: str) -> dict[str, object]:
    eml = tmp_path / "m.eml"
    eml.write_bytes(data)
    r = subprocess.run(
        [sys.executable, "-m", "mailguard", "check", "--json", *extra, str(eml)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    out: dict[str, object] = json.loads(r.stdout)
    return out


@pytest.mark.parametrize("encoding", ENCODERS)
def test_inline_file_in_check_json(tmp_path: Path, encoding: str) -> None:
    out = run_check(
        tmp_path,
        message(ENCODERS[encoding]("見積.pdf" if encoding != "binhex" else "quote.pdf", PDF)),
        "--internal",
        "ourco.co.jp",
    )
    atts = out["attachments"]
    assert isinstance(atts, list) and len(atts) == 1
    a = atts[0]
    assert a["inline"] == encoding and a["kind"] == "pdf" and a["encrypted"] is False
    assert a["filename"] in ("見積.pdf", "quote.pdf") and a["size"] == len(PDF)
    found = {f["code"] for f in out["findings"]}  # type: ignore[union-attr]
    assert {"attachment.present", "attachment.unencrypted", "attachment.inline"} <= found
    assert out["decision"]["action"] == "confirm"  # type: ignore[index]


def test_encrypted_inline_file_is_not_gated(tmp_path: Path) -> None:
    enc_pdf = PDF.replace(
        b"<< /Type /Catalog >>", b"<< /Type /Catalog >> trailer << /Encrypt 5 0 R >>"
    )
    out = run_check(tmp_path, message(uuencode("locked.pdf", enc_pdf)), "--internal", "ourco.co.jp")
    atts = out["attachments"]
    assert isinstance(atts, list) and atts[0]["inline"] == "uuencode"
    found = {f["code"] for f in out["findings"]}  # type: ignore[union-attr]
    if atts[0]["encrypted"] is True:
        assert "attachment.inline" not in found


@pytest.mark.parametrize("policy", POLICIES, ids=[p.stem for p in POLICIES])
def test_every_shipped_policy_stops_inline_files(tmp_path: Path, policy: Path) -> None:
    out = run_check(
        tmp_path,
        message(uuencode("data.xlsx", b"PK\x03\x04" + b"\0" * 200)),
        "--policy",
        str(policy),
        "--internal",
        "ourco.co.jp",
    )
    assert "attachment.inline" in {f["code"] for f in out["findings"]}  # type: ignore[union-attr]
    assert out["decision"]["action"] in ("confirm", "approve", "reject")  # type: ignore[index]
