"""The boundary scan agrees with the stdlib email parser: same part tree, same content types,
same transfer-decoded payloads, same filenames — over generated messages (bytes and mmap)."""

from __future__ import annotations

import email
import mmap
import tempfile
from email import policy
from email.message import Message
from email.mime.application import MIMEApplication
from email.mime.message import MIMEMessage
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailguard.message import MessageView

TEXTS = ["plain ascii text\n", "日本語の本文です。\n", "line1\nline2\n\n", "", "=?not a word?=\n"]
NAMES = ["report.pdf", "a b.txt", "見積書.xlsx", "long-" + "x" * 90 + ".bin"]


def leaf(draw: st.DrawFn) -> Message:
    kind = draw(st.sampled_from(["text", "app", "html"]))
    if kind == "app":
        data = draw(st.binary(max_size=300))
        part: Message = MIMEApplication(data, draw(st.sampled_from(["pdf", "octet-stream", "zip"])))
        if draw(st.booleans()):
            part.add_header(
                "Content-Disposition", "attachment", filename=draw(st.sampled_from(NAMES))
            )
        return part
    charset = draw(st.sampled_from(["utf-8", "iso-2022-jp", "us-ascii"]))
    text = draw(st.sampled_from(TEXTS))
    if charset == "us-ascii":
        text = text.encode("ascii", "replace").decode()
    sub = "html" if kind == "html" else "plain"
    return MIMEText(text, sub, charset)


@st.composite
def tree(draw: st.DrawFn, depth: int = 0) -> Message:
    if depth >= 3 or draw(st.integers(0, 2)) == 0:
        return leaf(draw)
    if draw(st.integers(0, 4)) == 0:
        inner = draw(tree(depth + 1))
        inner["Subject"] = "inner"
        return MIMEMessage(inner)
    m = MIMEMultipart(draw(st.sampled_from(["mixed", "alternative", "related", "signed"])))
    for _ in range(draw(st.integers(1, 4))):
        m.attach(draw(tree(depth + 1)))
    if draw(st.booleans()):
        m.preamble = "This is a multi-part message in MIME format."
    if draw(st.booleans()):
        m.epilogue = "epilogue text"
    return m


def stdlib_parts(raw: bytes) -> list[tuple[str, bytes | None, str | None]]:
    msg = email.message_from_bytes(raw, policy=policy.compat32)
    out = []
    for p in msg.walk():
        payload = None if p.is_multipart() else p.get_payload(decode=True)
        out.append((p.get_content_type(), payload, p.get_filename()))
    return out


def view_parts(v: MessageView) -> list[tuple[str, bytes | None, str | None]]:
    return [
        (
            p.content_type,
            None if p.role == "container" else v.body_of(p),
            p.filename or None,
        )
        for p in v.parts
    ]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tree(), st.sampled_from(["\r\n", "\n"]))
def test_tree_and_payloads_agree_with_stdlib(msg: Message, linesep: str) -> None:
    msg["From"] = "a@example.co.jp"
    msg["Subject"] = "agreement"
    raw = msg.as_bytes(policy=policy.compat32.clone(linesep=linesep))
    want = stdlib_parts(raw)
    # the stdlib hands filenames back RFC 2231-decoded but leaves RFC 2047 as written
    want = [
        (
            ct,
            pl,
            fn
            if fn is None or "=?" not in fn
            else str(email.header.make_header(email.header.decode_header(fn))),
        )
        for ct, pl, fn in want
    ]
    v = MessageView.parse(raw)
    assert v.defects == []
    assert view_parts(v) == want
    with tempfile.TemporaryFile() as f:
        f.write(raw)
        f.flush()
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            m = MessageView.parse(mm)
            assert view_parts(m) == want
            del m


def test_cpython_style_edge_cases_agree() -> None:
    cases = [
        # preamble and epilogue, delimiter with transport padding, repeated delimiter lines
        b'Content-Type: multipart/mixed; boundary="x"\r\n\r\npre\r\n--x  \r\n\r\none\r\n'
        b"--x\r\n--x\r\nContent-Type: text/html\r\n\r\ntwo\r\n--x--\r\nepi\r\n",
        # boundary-like lines that are not delimiters
        b'Content-Type: multipart/mixed; boundary="x"\r\n\r\n--x\r\n\r\n--xy\r\n--x-\r\n'
        b"text\r\n--x--\r\n",
        # empty part bodies and no trailing newline
        b'Content-Type: multipart/mixed; boundary="x"\r\n\r\n--x\r\n\r\n\r\n--x\r\n\r\n--x--',
        # nested multipart sharing nothing with its parent
        b'Content-Type: multipart/mixed; boundary="o"\r\n\r\n--o\r\n'
        b'Content-Type: multipart/alternative; boundary="i"\r\n\r\n--i\r\n\r\na\r\n--i\r\n'
        b"Content-Type: text/html\r\n\r\nb\r\n--i--\r\nmid\r\n--o\r\n\r\nc\r\n--o--\r\n",
        # quoted-printable soft breaks and base64 with odd line lengths
        b'Content-Type: multipart/mixed; boundary="x"\r\n\r\n--x\r\n'
        b"Content-Transfer-Encoding: quoted-printable\r\n\r\nsoft=\r\nbreak =E3=81=82\r\n"
        b"--x\r\nContent-Transfer-Encoding: base64\r\n\r\nQU\r\nJD\r\nRA==\r\n--x--\r\n",
    ]
    for raw in cases:
        v = MessageView.parse(raw)
        assert view_parts(v) == stdlib_parts(raw), raw
