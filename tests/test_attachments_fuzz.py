"""Hostile bytes: every sniffer, without the safety net, on random and mutated real files."""

from __future__ import annotations

import io
import zipfile
from functools import cache

import pyzipper
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_attachments_make import (
    excel_xls,
    minimal_pdf,
    ooxml,
    powerpoint_ppt,
    rar4,
    rar5,
    tnef,
    word_doc,
)

from mailguard.formats import Budget, FileInfo, SniffLimits, sniff, sniff_unguarded

LIMITS = SniffLimits(max_inner_bytes=1 << 20)
MAGICS = [
    b"PK\x03\x04",
    b"PK\x05\x06",
    b"%PDF-1.7\n",
    b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1",
    b"7z\xbc\xaf\x27\x1c",
    b"Rar!\x1a\x07\x00",
    b"Rar!\x1a\x07\x01\x00",
    b"\x78\x9f\x3e\x22",
    b"0\x80\x06\x09\x2a\x86\x48\x86\xf7\x0d\x01\x07\x03",
    b"-----BEGIN PGP MESSAGE-----\n\n",
    b"\x8c\x0d\x04",
    b"MZ",
    b"\x1f\x8b",
]
FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _check(data: bytes) -> FileInfo:
    info = sniff_unguarded(data, "x.bin", Budget(LIMITS), 0)
    assert info.encrypted in (True, False, None)
    assert isinstance(info.kind, str) and info.kind
    return info


@cache
def corpus() -> tuple[bytes, ...]:
    def aes() -> bytes:
        b = io.BytesIO()
        with pyzipper.AESZipFile(b, "w", encryption=pyzipper.WZ_AES) as z:
            z.setpassword(b"pw")
            z.writestr("顧客.csv", b"a,b\n")
        return b.getvalue()

    def nested() -> bytes:
        b = io.BytesIO()
        with zipfile.ZipFile(b, "w", zipfile.ZIP_DEFLATED) as z:
            z.writestr("in.zip", aes())
            z.writestr("doc.pdf", minimal_pdf())
        return b.getvalue()

    return (
        aes(),
        nested(),
        ooxml(),
        minimal_pdf(),
        word_doc(True),
        excel_xls(True),
        powerpoint_ppt(True),
        rar4([("a", True)]),
        rar5([("a", True), ("b", False)]),
        tnef([("資料.zip", aes())]),
    )


@FAST
@given(st.binary(max_size=4096))
def test_random_bytes(data: bytes) -> None:
    _check(data)


@FAST
@given(st.sampled_from(MAGICS), st.binary(max_size=2048))
def test_random_bytes_behind_a_magic(magic: bytes, rest: bytes) -> None:
    _check(magic + rest)


@FAST
@given(st.data())
def test_mutated_real_files(data: st.DataObject) -> None:
    src = bytearray(data.draw(st.sampled_from(corpus())))
    for _ in range(data.draw(st.integers(1, 8))):
        pos = data.draw(st.integers(0, len(src) - 1))
        src[pos] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(1, len(src)))
    _check(bytes(src[:cut]))


def test_every_prefix_of_real_files() -> None:
    for src in corpus():
        for cut in range(0, len(src), max(1, len(src) // 200)):
            _check(src[:cut])


def test_safety_net_never_raises() -> None:
    info = sniff(object())  # type: ignore[arg-type]  # not bytes: the parser itself fails
    assert info.encrypted is None and info.limited
