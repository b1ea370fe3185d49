"""Message view on hostile and broken input: defects and limits, never an exception or a hang.

Includes a hypothesis property test (parse never raises; every offset stays inside the message
and inside its parent) over raw bytes and over line soups built from MIME-looking lines.
"""

from __future__ import annotations

import mmap
import os
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailguard.message import Limits, MessageView


def crlf(s: str) -> bytes:
    return s.replace("\n", "\r\n").encode()


def check_invariants(v: MessageView, limits: Limits) -> None:
    """Offsets inside the message and inside the parent; bounds respected; bodies decodable."""
    assert v.size == len(v.raw)
    assert 0 <= v.header_end <= v.size
    assert len(v.parts) <= limits.max_parts
    seen: set[str] = set()
    stack = [(v.root, 0, v.size)]
    while stack:
        p, lo, hi = stack.pop()
        assert lo <= p.header_start <= p.body_start <= p.body_end <= hi, p
        assert p.depth <= limits.max_depth
        assert p.path not in seen
        seen.add(p.path)
        assert p.role in (
            "body",
            "attachment",
            "inline",
            "calendar",
            "signature",
            "container",
            "encrypted",
        )
        if p.children:
            assert p.role == "container"
        for c in p.children:
            assert c.depth == p.depth + 1
            stack.append((c, p.body_start, p.body_end))
    for p in v.leaves:
        assert isinstance(v.body_of(p), bytes)
        assert isinstance(v.text_of(p), str)
    assert isinstance(v.subject, str)
    v.to_json()
    v.headers.items()
    assert all(isinstance(d, str) and "." in d for d in v.defects)


def parse(raw: bytes, limits: Limits | None = None) -> MessageView:
    limits = limits or Limits()
    v = MessageView.parse(raw, None, limits)
    check_invariants(v, limits)
    return v


def test_missing_closing_boundary() -> None:
    v = parse(crlf('Content-Type: multipart/mixed; boundary="x"\n\n--x\n\none\n--x\n\ntwo\n'))
    assert v.defects == ["mime.unterminated"]
    assert [v.body_of(p) for p in v.leaves] == [b"one", b"two"]  # last CRLF stripped, as stdlib


def test_boundary_never_present_and_boundary_missing() -> None:
    v = parse(crlf('Content-Type: multipart/mixed; boundary="x"\n\n--y\n\nbody\n--y--\n'))
    assert v.defects == ["mime.boundary_not_found"] and v.root.children == []
    v = parse(crlf("Content-Type: multipart/mixed\n\n--y\n\nbody\n"))
    assert v.defects == ["mime.missing_boundary"]


def test_inner_unterminated_multipart_ends_at_outer_delimiter() -> None:
    v = parse(
        crlf(
            'Content-Type: multipart/mixed; boundary="out"\n\n--out\n'
            'Content-Type: multipart/alternative; boundary="in"\n\n--in\n\ninner text\n'
            '--out\nContent-Type: application/pdf; name="a.pdf"\n\n%PDF\n--out--\n'
        )
    )
    assert [p.path for p in v.parts] == ["", "1", "1.1", "2"]
    assert v.body_of(v.parts[2]) == b"inner text"
    assert v.attachments[0].filename == "a.pdf"
    assert v.defects == ["mime.unterminated"]


def test_no_blank_line_after_headers() -> None:
    v = parse(b"Subject: hi\r\nFrom: a@b.jp\r\nthis is body text\r\nmore\r\n")
    assert v.defects == ["header.missing_separator"]
    assert v.subject == "hi"
    assert v.body_of(v.root) == b"this is body text\r\nmore\r\n"
    v = parse(b"Subject: only headers")
    assert v.subject == "only headers" and v.body_of(v.root) == b"" and v.defects == []


def test_bare_lf_gives_the_same_tree_as_crlf() -> None:
    text = (
        'Content-Type: multipart/mixed; boundary="b"\n\n--b\nContent-Type: text/plain\n\nhello\n'
        "--b\nContent-Type: application/octet-stream\nContent-Transfer-Encoding: base64\n\n"
        "AAEC\nAwQF\n--b--\n"
    )
    lf, cr = parse(text.encode()), parse(crlf(text))
    assert [(p.content_type, p.role) for p in lf.parts] == [
        (p.content_type, p.role) for p in cr.parts
    ]
    assert lf.body_of(lf.parts[2]) == cr.body_of(cr.parts[2]) == bytes(range(6))
    assert lf.body_of(lf.parts[1]) == b"hello"


def test_nul_bytes_and_garbage() -> None:
    parse(b"Sub\x00ject: x\r\n\r\nbody\x00\x00")
    v = parse(b"Subject: a\x00b\r\nContent-Type: text/pl\x00ain\r\n\r\n\x00")
    assert v.subject == "a\x00b"
    parse(b"")
    parse(b"\r\n\r\n")
    parse(b"\xff\xfe\x00garbage")
    parse(os.urandom(4096))
    parse(b":\r\n \r\n\tcontinued\r\n: no name\r\n\r\n")


def test_first_line_continuation_and_empty_name_are_defects() -> None:
    v = parse(b" folded first\r\nSubject: s\r\n: no name\r\n\r\nx")
    assert v.defects.count("header.malformed") == 2 and v.subject == "s"


def test_thousand_deep_multipart_is_parsed_in_full_and_deeper_hits_the_limit_fast() -> None:
    """Issue 13: realistic depths are inspected in full (no recursion); past max_depth the
    walk stops with a defect, fast."""

    def nest(n: int) -> bytes:
        return "".join(
            f'Content-Type: multipart/mixed; boundary="b{i}"\r\n\r\n--b{i}\r\n' for i in range(n)
        ).encode()

    t = time.perf_counter()
    v = parse(nest(1000) + b"Content-Type: text/plain\r\n\r\nleaf\r\n")
    assert time.perf_counter() - t < 2
    assert not v.limited and max(p.depth for p in v.parts) == 1000
    deep = Limits().max_depth + 100
    t = time.perf_counter()
    v = parse(nest(deep) + b"Content-Type: text/plain\r\n\r\nleaf\r\n")
    assert time.perf_counter() - t < 5
    assert "mime.depth_limit" in v.defects and v.limited
    assert max(p.depth for p in v.parts) == Limits().max_depth


def test_thousand_deep_rfc822_nesting() -> None:
    raw = b"Content-Type: message/rfc822\r\n\r\n" * 1000 + b"Subject: core\r\n\r\nx"
    v = parse(raw)
    assert not v.limited and len(v.parts) == 1001
    deep = Limits().max_depth + 100
    v = parse(b"Content-Type: message/rfc822\r\n\r\n" * deep + b"Subject: core\r\n\r\nx")
    assert v.limited and "mime.depth_limit" in v.defects
    assert len(v.parts) == Limits().max_depth + 1


def test_ten_thousand_parts_hit_parts_limit() -> None:
    body = "".join(f"--p\r\nContent-Type: text/plain\r\n\r\n{i}\r\n" for i in range(10_000))
    raw = ('Content-Type: multipart/mixed; boundary="p"\r\n\r\n' + body + "--p--\r\n").encode()
    t = time.perf_counter()
    v = parse(raw)
    assert time.perf_counter() - t < 5
    assert len(v.parts) == Limits().max_parts and v.limited and "mime.parts_limit" in v.defects
    small = parse(raw, Limits(max_parts=10_001))
    assert len(small.parts) == 10_001 and not small.limited


def test_huge_header_is_cut_and_body_still_found() -> None:
    raw = b"Subject: " + b"A" * (3 << 20) + b"\r\nX-Late: 1\r\n\r\nbody"
    v = parse(raw)
    assert v.defects == ["header.too_large"] and v.limited
    assert v.body_of(v.root) == b"body"
    assert v.header("x-late") is None  # beyond the bound: not parsed
    many = b"".join(b"X-H%d: v\r\n" % i for i in range(100_000)) + b"\r\nbody"
    v = parse(many, Limits(max_header_bytes=64 << 10))
    assert v.limited and v.body_of(v.root) == b"body"


def test_one_letter_boundary_with_many_false_delimiters_is_bounded() -> None:
    body = b"\r\n--ab" * 300_000
    raw = b'Content-Type: multipart/mixed; boundary="a"\r\n\r\n--a\r\n\r\n' + body
    t = time.perf_counter()
    v = parse(raw)
    assert time.perf_counter() - t < 5
    assert len(v.parts) >= 2


def test_base64_message_rfc822_is_kept_as_a_leaf() -> None:
    v = parse(
        crlf(
            "Content-Type: message/rfc822\nContent-Transfer-Encoding: base64\n\nU3ViamVjdDogeA==\n"
        )
    )
    assert v.defects == ["mime.encoded_message"] and v.root.role == "attachment"
    assert v.body_of(v.root) == b"Subject: x"


def test_broken_rfc2047_and_charsets_do_not_raise() -> None:
    v = parse(
        crlf(
            "Subject: =?x-unknown?B?5pel5pys?= =?utf-8?B?!!!?= =?iso-2022-jp?B?GyRC?=\n"
            'Content-Type: text/plain; charset="no-such-charset"\n\n\xff\n'
        )
    )
    assert "日本" in v.subject and "=?utf-8?B?!!!?=" in v.subject


# --- properties -----------------------------------------------------------------------------

LINES = [
    b"Content-Type: multipart/mixed; boundary=a",
    b'Content-Type: multipart/alternative; boundary="b"',
    b"Content-Type: message/rfc822",
    b"Content-Type: text/plain; charset=iso-2022-jp",
    b"Content-Type: application/pdf; name*0*=utf-8''%E3%81; name*1=x",
    b"Content-Disposition: attachment; filename==?utf-8?B?5pel?=",
    b"Content-Transfer-Encoding: base64",
    b"Content-Transfer-Encoding: quoted-printable",
    b"Content-ID: <x>",
    b"--a",
    b"--a--",
    b"--b",
    b"--b--  ",
    b"",
    b" folded",
    b"Subject: =?utf-8?q?=E3=81=82?=",
    b"QUJDRA==",
    b"=E3=81=",
    b"From here",
    b"\x00\xff\x1b$B",
]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.sampled_from(LINES) | st.binary(max_size=20), max_size=60),
    st.sampled_from([b"\r\n", b"\n"]),
    st.integers(min_value=1, max_value=6),
    st.integers(min_value=1, max_value=30),
)
def test_never_raises_on_mime_line_soup(lines: list[bytes], eol: bytes, depth: int, n: int) -> None:
    parse(eol.join(lines), Limits(max_depth=depth, max_parts=n, max_decoded_bytes=64))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2000))
def test_never_raises_on_random_bytes(raw: bytes) -> None:
    parse(raw)


def test_mmap_input_same_as_bytes(tmp_path: Path) -> None:
    raw = crlf(
        'Subject: s\nContent-Type: multipart/mixed; boundary="q"\n\n--q\n\nA\n'
        '--q\nContent-Type: application/pdf; name="x.pdf"\nContent-Transfer-Encoding: base64\n'
        "\nJVBERg==\n"
    )
    path = tmp_path / "m.eml"
    path.write_bytes(raw)
    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        a, b = MessageView.parse(raw), MessageView.parse(mm)
        check_invariants(b, Limits())
        assert [(p.path, p.body_start, p.body_end) for p in a.parts] == [
            (p.path, p.body_start, p.body_end) for p in b.parts
        ]
        assert b.body_of(b.attachments[0]) == b"%PDF" and b.defects == a.defects
        del a, b  # no exported buffers may outlive the map


@pytest.mark.parametrize("kind", [bytearray, memoryview, str])
def test_other_input_types(kind: type) -> None:
    raw = b"Subject: x\r\n\r\nbody"
    v = MessageView.parse(kind(raw) if kind is not str else raw.decode())  # type: ignore[arg-type]
    assert v.subject == "x" and v.body_of(v.root) == b"body"
