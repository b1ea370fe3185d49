"""Message view: Japanese mail as real clients write it, MIME roles, filenames, lazy bodies.

Every test runs twice: raw as bytes and raw as an mmap of a temp file (the relay spools big
messages to disk and maps them).
"""

from __future__ import annotations

import base64
import mmap
from collections.abc import Callable, Iterator
from email.header import Header
from pathlib import Path

import pytest

from mailguard.checks.context import CheckContext
from mailguard.checks.structure import analyze
from mailguard.envelope import Envelope
from mailguard.message import Limits, MessageView, Part

Make = Callable[..., MessageView]


@pytest.fixture(params=["bytes", "mmap"])
def make(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Make]:
    maps: list[tuple[mmap.mmap, object]] = []

    def _make(
        raw: bytes, envelope: Envelope | None = None, limits: Limits | None = None
    ) -> MessageView:
        limits = limits or Limits()
        if request.param == "bytes" or not raw:
            return MessageView.parse(raw, envelope, limits)
        path = tmp_path / f"m{len(maps)}.eml"
        path.write_bytes(raw)
        f = path.open("rb")
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        maps.append((mm, f))
        return MessageView.parse(mm, envelope, limits)

    yield _make
    for mm, f in maps:
        mm.close()
        f.close()  # type: ignore[attr-defined]


def crlf(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return b.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def b64(data: bytes) -> str:
    return base64.encodebytes(data).decode()


def ew(text: str, charset: str) -> str:
    """An RFC 2047 encoded word as the stdlib (and most clients) write it."""
    return Header(text, charset).encode()


def kinds(view: MessageView) -> list[tuple[str, str, str]]:
    return [(p.path, p.content_type, p.role) for p in view.parts]


# --- headers -------------------------------------------------------------------------------


def test_iso2022jp_subject_and_from_like_outlook(make: Make) -> None:
    subj = "【至急】見積書の送付について（再送）"
    raw = crlf(
        f"From: {ew('山田 太郎', 'iso-2022-jp')} <taro@example.co.jp>\n"
        f"To: {ew('佐藤 花子', 'iso-2022-jp')} <hanako@partner.co.jp>, jiro@other.co.jp\n"
        f"Subject: {ew(subj, 'iso-2022-jp')}\n"
        "Message-ID: <abc.123@example.co.jp>\n"
        "MIME-Version: 1.0\n"
        'Content-Type: text/plain; charset="iso-2022-jp"\n'
        "Content-Transfer-Encoding: 7bit\n\n"
    ) + "お世話になっております。\r\n".encode("iso-2022-jp")
    v = make(raw)
    assert v.subject == subj
    assert v.header("from") == "山田 太郎 <taro@example.co.jp>"
    assert v.message_id == "<abc.123@example.co.jp>"
    assert v.defects == []
    assert [a.addr for a in v.to] == ["hanako@partner.co.jp", "jiro@other.co.jp"]
    assert v.to[0].display_name == "佐藤 花子"
    assert [a.addr for a in v.visible] == ["hanako@partner.co.jp", "jiro@other.co.jp"]
    assert v.root.role == "body" and v.root.charset == "iso-2022-jp"
    assert v.text_of(v.root) == "お世話になっております。\r\n"
    assert v.headers["Message-ID"] == "<abc.123@example.co.jp>"  # a real email Message


def test_iso2022jp_nec_special_characters_decode(make: Make) -> None:
    # Outlook writes ① and ㈱ (NEC row 13) into ISO-2022-JP; Python's codec refuses them
    jis = b"\x1b$B-!-j\x1b(B"
    word = "=?ISO-2022-JP?B?" + base64.b64encode(jis).decode() + "?="
    v = make(crlf(f"Subject: {word}\n\nx\n"))
    assert v.subject == "①㈱"


def test_shift_jis_and_cp932_subject_and_body(make: Make) -> None:
    subj = "ご請求書～①番"  # ～ and ① exist only in CP932, clients still label it Shift_JIS
    word = "=?Shift_JIS?B?" + base64.b64encode(subj.encode("cp932")).decode() + "?="
    body = "本文です。～①\r\n".encode("cp932")
    raw = (
        crlf(
            f"Subject: {word}\nContent-Type: text/plain; charset=Shift_JIS\n"
            "Content-Transfer-Encoding: 8bit\n\n"
        )
        + body
    )
    v = make(raw)
    assert v.subject == subj
    assert v.body_of(v.root) == body
    assert v.text_of(v.root) == "本文です。～①\r\n"


def test_utf8_words_split_inside_a_character(make: Make) -> None:
    data = "日本語の件名".encode()
    w1 = base64.b64encode(data[:4]).decode()  # cuts 本 in half
    w2 = base64.b64encode(data[4:]).decode()
    v = make(crlf(f"Subject: =?UTF-8?B?{w1}?=\n =?UTF-8?B?{w2}?=\n\n"))
    assert v.subject == "日本語の件名"


def test_q_encoding_and_mixed_plain_text(make: Make) -> None:
    v = make(crlf("Subject: Re: =?utf-8?q?=E4=BC=9A=E8=AD=B0?= (10:00_JST)\n\nx\n"))
    assert v.subject == "Re: 会議 (10:00_JST)"


def test_folded_header_is_unfolded(make: Make) -> None:
    v = make(crlf("Subject: a very\n long\n\tsubject\nX-A: 1\nX-A: 2\n\nbody\n"))
    assert v.subject == "a very long\tsubject"
    assert v.header_all("x-a") == ["1", "2"]
    assert v.raw_header_all("X-A") == ["1", "2"]
    assert v.header("missing") is None


def test_raw_utf8_header_with_smtputf8_is_not_a_defect(make: Make) -> None:
    raw = "Subject: 日本語\r\nTo: 宛先 <user@例え.jp>\r\n\r\nbody\r\n".encode()
    env = Envelope("a@example.co.jp", ["user@例え.jp"], mail_options=["SMTPUTF8"])
    v = make(raw, env)
    assert v.subject == "日本語"
    assert v.defects == []
    assert v.envelope is env
    assert v.to[0].domain == "xn--r8jz45g.jp"
    plain = make(raw)
    assert plain.defects == ["header.8bit"]
    assert plain.subject == "日本語"


def test_raw_cp932_subject_is_decoded(make: Make) -> None:
    v = make(b"Subject: " + "見積書".encode("cp932") + b"\r\n\r\nx\r\n")
    assert v.subject == "見積書"
    assert v.raw_header_all("subject")[0].encode("ascii", "surrogateescape") == "見積書".encode(
        "cp932"
    )


def test_raw_jis_subject_without_encoded_word(make: Make) -> None:
    v = make(b"Subject: " + "確認".encode("iso-2022-jp") + b"\r\n\r\nx\r\n")
    assert v.subject == "確認"


def test_unix_from_line_and_bare_lf(make: Make) -> None:
    v = make(b"From taro@example.co.jp Mon Jan 15 10:00:00 2024\nSubject: hi\n\nbody\n")
    assert v.subject == "hi"
    assert v.headers.get_unixfrom() is not None
    assert v.body_of(v.root) == b"body\n"
    assert v.defects == []


# --- MIME structure and roles ---------------------------------------------------------------

OUTLOOK = """\
From: taro@example.co.jp
To: hanako@partner.co.jp
Subject: {subject}
MIME-Version: 1.0
Content-Type: multipart/mixed;
\tboundary="----=_NextPart_000_0010_01DA4734.1A2B3C40"

This is a multipart message in MIME format.

------=_NextPart_000_0010_01DA4734.1A2B3C40
Content-Type: multipart/related;
\tboundary="----=_NextPart_001_0011_01DA4734.1A2B3C40"


------=_NextPart_001_0011_01DA4734.1A2B3C40
Content-Type: multipart/alternative;
\tboundary="----=_NextPart_002_0012_01DA4734.1A2B3C40"


------=_NextPart_002_0012_01DA4734.1A2B3C40
Content-Type: text/plain;
\tcharset="iso-2022-jp"
Content-Transfer-Encoding: 7bit

{text}
------=_NextPart_002_0012_01DA4734.1A2B3C40
Content-Type: text/html;
\tcharset="iso-2022-jp"
Content-Transfer-Encoding: quoted-printable

<html><body><img src=3D"cid:image001.png@01DA4734.1A2B3C40"></body></html>

------=_NextPart_002_0012_01DA4734.1A2B3C40--

------=_NextPart_001_0011_01DA4734.1A2B3C40
Content-Type: image/png;
\tname="image001.png"
Content-Transfer-Encoding: base64
Content-ID: <image001.png@01DA4734.1A2B3C40>

{png}
------=_NextPart_001_0011_01DA4734.1A2B3C40--

------=_NextPart_000_0010_01DA4734.1A2B3C40
Content-Type: application/vnd.openxmlformats-officedocument.spreadsheetml.sheet;
\tname="{name}"
Content-Transfer-Encoding: base64
Content-Disposition: attachment;
\tfilename="{name}"

{xlsx}
------=_NextPart_000_0010_01DA4734.1A2B3C40--
"""


def test_outlook_mixed_related_alternative(make: Make) -> None:
    png = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4
    xlsx = b"PK\x03\x04" + bytes(200)
    name = ew("顧客リスト2024.xlsx", "iso-2022-jp")
    raw = crlf(
        OUTLOOK.format(
            subject=ew("資料送付", "iso-2022-jp"),
            text="お世話になっております。".encode("iso-2022-jp").decode("ascii"),
            png=b64(png),
            xlsx=b64(xlsx),
            name=name,
        )
    )
    v = make(raw)
    assert v.defects == []
    assert kinds(v) == [
        ("", "multipart/mixed", "container"),
        ("1", "multipart/related", "container"),
        ("1.1", "multipart/alternative", "container"),
        ("1.1.1", "text/plain", "body"),
        ("1.1.2", "text/html", "body"),
        ("1.2", "image/png", "inline"),
        ("2", "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet", "attachment"),
    ]
    img, att = v.parts[5], v.parts[6]
    assert img.content_id == "image001.png@01DA4734.1A2B3C40"
    assert v.body_of(img) == png
    assert att.filename == "顧客リスト2024.xlsx"
    assert v.body_of(att) == xlsx
    assert v.attachments == [att]
    assert [p.path for p in v.leaves] == ["1.1.1", "1.1.2", "1.2", "2"]
    html = v.body_of(v.parts[4])
    assert b'src="cid:image001.png' in html  # quoted-printable decoded
    assert v.text_of(v.parts[3]) == "お世話になっております。"
    assert v.header_block(att).startswith(b"Content-Type: application/vnd.openxml")
    assert v.header_block(att).endswith(b"\r\n\r\n")
    assert v.header_end == raw.index(b"\r\n\r\n") + 4
    assert v.to_json() == {
        "size": len(raw),
        "subject": "資料送付",
        "message_id": None,
        "parts": 7,
        "defects": [],
        "limited": False,
    }


def _mixed(*parts: str, boundary: str = "b1") -> bytes:
    out = f'From: a@example.co.jp\nContent-Type: multipart/mixed; boundary="{boundary}"\n\n'
    for p in parts:
        out += f"--{boundary}\n{p}\n"
    return crlf(out + f"--{boundary}--\n")


def test_thunderbird_rfc2231_filenames(make: Make) -> None:
    long = "令和6年度_第3四半期_営業報告書_最終版.pdf"
    enc = "".join(f"%{b:02X}" for b in long.encode())
    half = len(enc) // 2 // 3 * 3
    raw = _mixed(
        "Content-Type: text/plain; charset=UTF-8; format=flowed\n\nhi\n",
        f"Content-Type: application/pdf;\n name*=UTF-8''{enc}\n"
        f"Content-Disposition: attachment;\n filename*0*=UTF-8''{enc[:half]};\n"
        f" filename*1*={enc[half:]}\nContent-Transfer-Encoding: base64\n\n{b64(b'%PDF-1.7')}",
        'Content-Type: text/plain; charset=UTF-8;\n name="memo.txt"\n'
        'Content-Disposition: attachment;\n filename*0="me";\n filename*1="mo.txt"\n\nnote\n',
    )
    v = make(raw)
    pdf, memo = v.parts[2], v.parts[3]
    assert pdf.filename == long
    assert pdf.params["name"] == long
    assert v.body_of(pdf) == b"%PDF-1.7"
    assert memo.filename == "memo.txt"
    assert [p.role for p in v.parts] == ["container", "body", "attachment", "attachment"]


def test_rfc2231_in_shift_jis_and_language_tag(make: Make) -> None:
    enc = "".join(f"%{b:02X}" for b in "請求書.pdf".encode("cp932"))
    raw = _mixed(
        f"Content-Type: application/pdf\nContent-Disposition: attachment;"
        f" filename*=shift_jis'ja'{enc}\n\nx\n"
    )
    assert make(raw).parts[1].filename == "請求書.pdf"


def test_raw_8bit_filenames_cp932_and_utf8(make: Make) -> None:
    sjis = "見積書_表計算.xls".encode("cp932")  # 表 = 0x95 0x5C: a backslash trail byte
    utf8 = "議事録.docx".encode()
    raw = (
        b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n--b\r\n'
        b'Content-Type: application/vnd.ms-excel; name="' + sjis + b'"\r\n'
        b'Content-Disposition: attachment; filename="' + sjis + b'"\r\n\r\nx\r\n--b\r\n'
        b"Content-Type: application/octet-stream\r\n"
        b'Content-Disposition: attachment; filename="' + utf8 + b'"\r\n\r\ny\r\n--b--\r\n'
    )
    v = make(raw)
    assert [p.filename for p in v.attachments] == ["見積書_表計算.xls", "議事録.docx"]
    assert "header.8bit" in v.defects


def test_outlook_rfc2047_filename_split_words(make: Make) -> None:
    name = "【社外秘】2024年度 予算案（修正版）.xlsx"
    words = Header(name, "iso-2022-jp", maxlinelen=40).encode()  # several words, folded
    raw = _mixed(
        f'Content-Type: application/octet-stream;\n\tname="{words}"\n'
        f'Content-Disposition: attachment;\n\tfilename="{words}"\n'
        f"Content-Transfer-Encoding: base64\n\n{b64(b'data')}"
    )
    assert make(raw).parts[1].filename == name


def test_forwarded_message_rfc822_with_attachment(make: Make) -> None:
    inner = (
        "From: x@partner.co.jp\nSubject: inner\n"
        'Content-Type: multipart/mixed; boundary="inner"\n\n'
        "--inner\nContent-Type: text/plain\n\nfwd body\n"
        '--inner\nContent-Type: application/zip; name="a.zip"\n'
        f"Content-Transfer-Encoding: base64\n\n{b64(b'PK' + bytes(30))}--inner--\n"
    )
    raw = _mixed(
        "Content-Type: text/plain\n\nsee below\n",
        'Content-Type: message/rfc822\nContent-Disposition: attachment; filename="fw.eml"\n\n'
        + inner,
    )
    v = make(raw)
    assert kinds(v) == [
        ("", "multipart/mixed", "container"),
        ("1", "text/plain", "body"),
        ("2", "message/rfc822", "container"),
        ("2.1", "multipart/mixed", "container"),
        ("2.1.1", "text/plain", "body"),
        ("2.1.2", "application/zip", "attachment"),
    ]
    inner_root = v.parts[3]
    assert inner_root.depth == 2 and v.parts[5].depth == 3
    assert v.parts[2].filename == "fw.eml"
    assert [p.filename for p in v.attachments] == ["a.zip"]
    assert v.body_of(v.parts[5]) == b"PK" + bytes(30)
    assert v.header_block(inner_root).startswith(b"From: x@partner.co.jp")


def test_smime_signed_and_enveloped(make: Make) -> None:
    signed = crlf(
        "From: a@example.co.jp\nMIME-Version: 1.0\n"
        'Content-Type: multipart/signed; protocol="application/pkcs7-signature";'
        ' micalg=sha-256; boundary="sig"\n\n'
        "This is an S/MIME signed message\n\n--sig\n"
        'Content-Type: multipart/mixed; boundary="mix"\n\n'
        "--mix\nContent-Type: text/plain\n\nsigned text\n"
        '--mix\nContent-Type: application/pdf; name="a.pdf"\n'
        'Content-Disposition: attachment; filename="a.pdf"\n\n%PDF\n--mix--\n\n'
        '--sig\nContent-Type: application/pkcs7-signature; name="smime.p7s"\n'
        "Content-Transfer-Encoding: base64\n"
        'Content-Disposition: attachment; filename="smime.p7s"\n\nMIIB\n--sig--\n'
    )
    v = make(signed)
    assert [p.role for p in v.parts] == [
        "container",
        "container",
        "body",
        "attachment",
        "signature",
    ]
    enveloped = crlf(
        "From: a@example.co.jp\nMIME-Version: 1.0\n"
        'Content-Type: application/pkcs7-mime; smime-type=enveloped-data; name="smime.p7m"\n'
        'Content-Disposition: attachment; filename="smime.p7m"\n'
        "Content-Transfer-Encoding: base64\n\nMIAGCSqGSIb3DQEHA6CAMIACAQAx\n"
    )
    e = make(enveloped)
    assert e.root.role == "encrypted" and e.attachments == []


def test_pgp_mime_encrypted_and_calendar(make: Make) -> None:
    pgp = crlf(
        'Content-Type: multipart/encrypted; protocol="application/pgp-encrypted"; boundary="p"\n\n'
        "--p\nContent-Type: application/pgp-encrypted\n\nVersion: 1\n"
        '--p\nContent-Type: application/octet-stream; name="encrypted.asc"\n\n'
        "-----BEGIN PGP MESSAGE-----\nhQEM\n-----END PGP MESSAGE-----\n--p--\n"
    )
    assert [p.role for p in make(pgp).parts] == ["container", "encrypted", "encrypted"]
    cal = _mixed(
        "Content-Type: text/plain\n\ninvite\n",
        "Content-Type: text/calendar; method=REQUEST; charset=UTF-8\n\nBEGIN:VCALENDAR\n",
        'Content-Type: application/ics; name="invite.ics"\n'
        'Content-Disposition: attachment; filename="invite.ics"\n\nBEGIN:VCALENDAR\n',
    )
    assert [p.role for p in make(cal).parts] == ["container", "body", "calendar", "attachment"]


def test_apple_mail_inline_pdf_and_text_csv_are_attachments(make: Make) -> None:
    raw = _mixed(
        "Content-Type: text/plain\n\nhello\n",
        'Content-Type: application/pdf; name="a.pdf"\n'
        'Content-Disposition: inline; filename="a.pdf"\n\n%PDF\n',
        "Content-Type: text/plain\n\nsecond body chunk\n",
        'Content-Type: text/csv; name="list.csv"\n\na,b\n',
        'Content-Type: text/plain; name="notes.txt"\n\nnamed text\n',
    )
    v = make(raw)
    assert [p.role for p in v.parts] == [
        "container",
        "body",
        "attachment",
        "body",
        "attachment",
        "attachment",
    ]


def test_multipart_digest_defaults_to_rfc822(make: Make) -> None:
    raw = crlf(
        'Content-Type: multipart/digest; boundary="d"\n\n--d\n\n'
        "From: a@x.jp\nSubject: one\n\nfirst\n--d\n\nFrom: b@x.jp\n\nsecond\n--d--\n"
    )
    v = make(raw)
    assert [p.content_type for p in v.parts] == [
        "multipart/digest",
        "message/rfc822",
        "text/plain",
        "message/rfc822",
        "text/plain",
    ]
    assert v.body_of(v.parts[2]) == b"first"


def test_body_of_is_bounded_and_reports(make: Make) -> None:
    blob = bytes(range(256)) * 400
    raw = _mixed(
        f"Content-Type: application/octet-stream\nContent-Transfer-Encoding: base64\n\n{b64(blob)}",
        "Content-Type: text/plain\nContent-Transfer-Encoding: quoted-printable\n\n"
        + "=E3=81=82" * 500,
    )
    v = make(raw, limits=Limits(max_decoded_bytes=1000))
    assert v.body_of(v.parts[1]) == blob[:1000]
    assert v.body_of(v.parts[2]) == ("あ" * 500).encode()[:1000]
    assert "mime.decoded_limit" in v.defects and v.limited
    full = make(raw)
    assert full.body_of(full.parts[1]) == blob
    assert full.body_of(full.parts[1]) is full.body_of(full.parts[1])  # decoded once


def test_bad_base64_and_uuencode(make: Make) -> None:
    raw = _mixed(
        "Content-Type: application/octet-stream\nContent-Transfer-Encoding: base64\n\n"
        "SGVsbG8gd29y!!bGQ=\nQUJDRA=\n",
        "Content-Type: application/octet-stream\nContent-Transfer-Encoding: base64\n\nQUJDR\n",
        "Content-Type: application/octet-stream\nContent-Transfer-Encoding: x-uuencode\n\n"
        "begin 644 a.txt\n&:&5L;&\\*\n`\nend\n",
    )
    v = make(raw)
    assert v.body_of(v.parts[1]).startswith(b"Hello wor")
    assert v.body_of(v.parts[2]) == b"ABC"
    assert "mime.bad_base64" in v.defects
    assert v.body_of(v.parts[3]) == b"hello\n"


def test_structure_check_findings(make: Make) -> None:
    ok = make(_mixed("Content-Type: text/plain\n\nx\n"))
    rep = analyze(ok, CheckContext())
    assert rep.findings == [] and rep.to_json() == {"defects": [], "limited": False, "parts": 2}
    bad = make(crlf('Content-Type: multipart/mixed; boundary="zz"\n\n--zz\n\nunterminated\n'))
    rep = analyze(bad, CheckContext())
    assert [f.code for f in rep.findings] == ["message.malformed"]
    assert rep.findings[0].count == 1 and rep.findings[0].evidence == ("mime.unterminated",)
    assert rep.findings[0].reason_ja and rep.to_json()["defects"] == ["mime.unterminated"]
    nest = "".join(
        f'Content-Type: multipart/mixed; boundary="b{i}"\r\n\r\n--b{i}\r\n' for i in range(50)
    )
    deep = make(nest.encode(), limits=Limits(max_depth=5))
    rep = analyze(deep, CheckContext())
    codes = {f.code: f for f in rep.findings}
    assert codes["message.limit"].count == 1
    assert codes["message.limit"].evidence == ("mime.depth_limit",)


def test_part_offsets_cover_the_raw_bytes(make: Make) -> None:
    raw = _mixed("Content-Type: text/plain\n\nA\n", "Content-Type: text/plain\n\nB\n")
    v = make(raw)
    a, b = v.parts[1], v.parts[2]
    assert raw[a.body_start : a.body_end] == b"A\r\n"  # the last CRLF belongs to the delimiter
    assert raw[b.body_start : b.body_end] == b"B\r\n"
    assert isinstance(a, Part) and a.encoded_size == 3
