"""Zip transform: attachments → one password zip; the rest of the MIME tree byte-for-byte."""

from __future__ import annotations

import io
import os
import shutil
import socket
import struct
import subprocess
import sys
import threading
import zlib
from datetime import timedelta
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
import pyzipper
from conftest import missing_tool

from mailguard.actions import ClamdScanner, ScanRejected, apply_all
from mailguard.actions.passwords import DEFAULT_ALPHABET, generate_password
from mailguard.actions.zip import ZipAttachments
from mailguard.envelope import Envelope
from mailguard.message import MessageView

XLSX = "見積書①_2024年度.xlsx"
CSV = "顧客リスト.csv"
XLSX_DATA = b"PK\x03\x04" + os.urandom(200_000)  # an unencrypted OOXML-looking file
CSV_DATA = "氏名,メール\n山田,yamada@example.co.jp\n".encode("cp932") * 500
ICS = b"BEGIN:VCALENDAR\r\nVERSION:2.0\r\nEND:VCALENDAR\r\n"
PNG = b"\x89PNG\r\n\x1a\n" + os.urandom(3000)
ENV = Envelope("yamada@example.co.jp", ["tanaka@partner.co.jp", "suzuki@client.jp", "x@client.jp"])
UNZIP = shutil.which("unzip")
SEVENZ = shutil.which("7z")


def encrypted_zip() -> bytes:
    buf = io.BytesIO()
    with pyzipper.AESZipFile(buf, "w", encryption=pyzipper.WZ_AES) as z:
        z.setpassword(b"already")
        z.writestr("secret.txt", b"x" * 100)
    return buf.getvalue()


ENC = encrypted_zip()


def message(linesep: str = "\r\n") -> bytes:
    m = EmailMessage()
    m["From"] = "山田 太郎 <yamada@example.co.jp>"
    m["To"] = "tanaka@partner.co.jp"
    m["Subject"] = "お見積りの件"
    m["Date"] = "Mon, 01 Apr 2024 10:00:00 +0900"
    m.set_content("お世話になっております。\n見積書を添付します。\n")
    m.add_alternative("<p>お世話になっております。<img src='cid:logo'></p>", subtype="html")
    m.get_payload()[1].add_related(PNG, "image", "png", cid="<logo>")
    m.add_attachment(XLSX_DATA, "application", "octet-stream", filename=XLSX)
    m.add_attachment(ICS, "text", "calendar", disposition="inline")
    m.add_attachment(CSV_DATA, "text", "csv", filename=CSV)
    m.add_attachment(ENC, "application", "zip", filename="secret.zip")
    return m.as_bytes(policy=policy.SMTP.clone(linesep=linesep))


def zip_it(raw: bytes, **opts: Any) -> Any:
    return ZipAttachments().apply(raw, MessageView.parse(raw, ENV), opts)


def zip_part(raw: bytes) -> tuple[str, bytes]:
    msg = message_from_bytes(raw, policy=policy.default)
    parts = [p for p in msg.walk() if p.get_content_type() == "application/zip"]
    named = {p.get_filename(): p.get_payload(decode=True) for p in parts}
    named.pop("secret.zip")
    ((name, data),) = named.items()
    return name, data


def test_attachments_become_one_zip_rest_byte_identical() -> None:
    raw = message()
    view = MessageView.parse(raw, ENV)
    keep = [p for p in view.parts if p.role in ("body", "inline", "calendar")]
    keep += [p for p in view.attachments if p.filename == "secret.zip"]
    res = zip_it(raw)
    for p in keep:  # body, inline image, calendar, the already-encrypted zip: same bytes
        assert raw[p.header_start : p.body_end] in res.raw
    assert res.raw.startswith(b"X-MailGuard-Zip: 2 attachments zipped with a password\r\n")
    assert res.raw[res.raw.index(b"\r\n") + 2 :].startswith(raw[: view.header_end])
    msg = message_from_bytes(res.raw, policy=policy.default)
    assert not msg.defects and all(not p.defects for p in msg.walk())
    names = [p.get_filename() for p in msg.walk() if p.get_filename()]
    assert names == ["attachments_20240401.zip", "secret.zip"]
    # a second trip through the stdlib gives the same tree
    again = message_from_bytes(msg.as_bytes(), policy=policy.default)
    assert [p.get_content_type() for p in again.walk()] == [
        p.get_content_type() for p in msg.walk()
    ]
    (notice,) = res.notices
    assert notice.kind == "zip-password" and notice.to == ("yamada@example.co.jp",)
    assert notice.data["filenames"] == [XLSX, CSV]
    assert notice.data["subject"] == "お見積りの件"
    assert notice.data["zip_name"] == "attachments_20240401.zip"
    assert notice.data["recipients"] == ENV.rcpt_tos and notice.send_after == timedelta(0)
    _name, data = zip_part(res.raw)
    with pyzipper.AESZipFile(io.BytesIO(data)) as z:
        z.setpassword(notice.data["password"].encode())
        assert z.namelist() == [XLSX, CSV]
        assert z.read(XLSX) == XLSX_DATA and z.read(CSV) == CSV_DATA
        assert all(i.wz_aes_strength == 3 for i in z.infolist())  # WinZip AES-256
    with pyzipper.AESZipFile(io.BytesIO(data)) as z:
        z.setpassword(b"wrong-password")
        with pytest.raises(RuntimeError):
            z.read(XLSX)
    assert "secret.zip: already encrypted" in res.trace


def test_single_file_name_template_and_japanese_zip_name() -> None:
    raw = message()
    res = zip_it(raw, min_size=150_000, zip_name="{stem}_{date}.zip")
    name, _data = zip_part(res.raw)
    assert name == "見積書①_2024年度_20240401.zip"
    # the CSV (under min_size) is still there in clear, with its own bytes
    msg = message_from_bytes(res.raw, policy=policy.default)
    csv = [p for p in msg.walk() if p.get_filename() == CSV]
    assert csv[0].get_payload(decode=True) == CSV_DATA
    assert b'name="=?UTF-8?B?' in res.raw and b"filename*0*=UTF-8''" in res.raw


def test_nothing_selected_leaves_message_alone() -> None:
    raw = message()
    res = zip_it(raw, min_size=10_000_000)
    assert res.raw is raw and res.notices == ()


def test_lf_message_stays_lf() -> None:
    raw = message("\n")
    res = zip_it(raw)
    assert b"\r\n" not in res.raw
    assert zip_part(res.raw)[0] == "attachments_20240401.zip"


def _extract(tool: str, archive: Path, password: str, dest: Path) -> subprocess.CompletedProcess:
    if tool == "unzip":
        cmd = [UNZIP or "unzip", "-q", "-o", "-P", password, "-d", str(dest), str(archive)]
    else:
        cmd = [SEVENZ or "7z", "x", "-y", f"-p{password}", f"-o{dest}", str(archive)]
    env = dict(os.environ, LANG="C.UTF-8", LC_ALL="C.UTF-8")
    return subprocess.run(cmd, capture_output=True, env=env, timeout=60, stdin=subprocess.DEVNULL)


@pytest.mark.parametrize(
    ("method", "charset", "tool"),
    [
        ("zipcrypto", "utf-8", "unzip"),
        ("zipcrypto", "cp932", "unzip"),
        ("aes", "utf-8", "7z"),
        ("aes", "cp932", "7z"),
        ("zipcrypto", "cp932", "7z"),
    ],
)
def test_zip_opens_in_real_tools(method: str, charset: str, tool: str, tmp_path: Path) -> None:
    if (UNZIP if tool == "unzip" else SEVENZ) is None:
        missing_tool(f"{tool} not installed (Debian: unzip / p7zip-full)")
    res = zip_it(message(), method=method, filename_charset=charset)
    password = res.notices[0].data["password"]
    archive = tmp_path / "a.zip"
    archive.write_bytes(zip_part(res.raw)[1])
    ok = _extract(tool, archive, password, tmp_path / "ok")
    assert ok.returncode == 0, ok.stderr
    assert sorted(p.name for p in (tmp_path / "ok").iterdir()) == sorted([XLSX, CSV])
    assert (tmp_path / "ok" / XLSX).read_bytes() == XLSX_DATA
    assert (tmp_path / "ok" / CSV).read_bytes() == CSV_DATA
    bad = _extract(tool, archive, "Wrong-Passw0rd", tmp_path / "bad")
    assert bad.returncode != 0
    bad_dir = tmp_path / "bad"
    assert not bad_dir.exists() or all(
        p.read_bytes() not in (XLSX_DATA, CSV_DATA) for p in bad_dir.iterdir()
    )


def test_cp932_profile_writes_cp932_names_and_unicode_path_field() -> None:
    res = zip_it(message(), method="zipcrypto", filename_charset="cp932")
    data = zip_part(res.raw)[1]
    infos = pyzipper.ZipFile(io.BytesIO(data)).infolist()
    for info, want in zip(infos, [XLSX, CSV], strict=True):
        assert not info.flag_bits & 0x800 and info.flag_bits & 0x1
        assert info.filename.encode("cp437").decode("cp932") == want
        extra = info.extra
        at = extra.find(b"up")  # 0x7075: version 1, CRC32 of the CP932 name, UTF-8 name
        (size,) = struct.unpack_from("<H", extra, at + 2)
        body = extra[at + 4 : at + 4 + size]
        assert body[0] == 1 and body[5:].decode("utf-8") == want
        assert struct.unpack_from("<L", body, 1)[0] == zlib.crc32(want.encode("cp932"))


def test_per_domain_passwords_split_the_delivery() -> None:
    res = zip_it(message(), per_domain_passwords=True, password_to="recipients", password_delay=600)
    assert [s[0] for s in res.splits] == [
        ("tanaka@partner.co.jp",),
        ("suzuki@client.jp", "x@client.jp"),
    ]
    pw = [n.data["password"] for n in res.notices]
    assert len(set(pw)) == 2
    for (rcpts, raw), notice in zip(res.splits, res.notices, strict=True):
        assert notice.to == rcpts and notice.send_after == timedelta(seconds=600)
        with pyzipper.AESZipFile(io.BytesIO(zip_part(raw)[1])) as z:
            z.setpassword(notice.data["password"].encode())
            assert z.read(CSV) == CSV_DATA


def test_apply_all_runs_bcc_then_zip() -> None:
    raw = message()
    res = apply_all(
        raw,
        MessageView.parse(raw, ENV),
        ["bcc", "zip"],
        {"bcc": {"internal": ["example.co.jp"]}, "zip": {"method": "aes"}},
        reparse=lambda b: MessageView.parse(b, ENV),
    )
    assert res.raw.startswith(b"X-MailGuard-Zip:")
    assert b"X-MailGuard-Bcc: moved 1 external recipient to Bcc" in res.raw
    assert "bcc:" in res.trace and "zip:" in res.trace and len(res.notices) == 1


def test_scan_hook_sees_clear_bytes_and_can_refuse() -> None:
    seen: dict[str, bytes] = {}

    def scanner(data: bytes, filename: str) -> None:
        seen[filename] = data

    zip_it(message(), scan=scanner)
    assert seen == {XLSX: XLSX_DATA, CSV: CSV_DATA}

    def refuse(data: bytes, filename: str) -> None:
        raise ScanRejected(filename, "Eicar-Test-Signature")

    with pytest.raises(ScanRejected, match="Eicar"):
        zip_it(message(), scan=refuse)


def _fake_clamd(answer: bytes) -> tuple[socket.socket, list[bytes]]:
    """A loopback server speaking clamd's INSTREAM (the external service at our seam)."""
    srv = socket.create_server(("127.0.0.1", 0))
    got: list[bytes] = []

    def serve() -> None:
        conn, _ = srv.accept()
        with conn:
            conn.settimeout(10)
            buf = b""
            while b"\0\0\0\0" not in buf[10:] or len(buf) < 14:
                chunk = conn.recv(65536)
                if not chunk:
                    break
                buf += chunk
            assert buf.startswith(b"zINSTREAM\0")
            pos, data = 10, b""
            while True:
                (n,) = struct.unpack_from("!L", buf, pos)
                if n == 0:
                    break
                data += buf[pos + 4 : pos + 4 + n]
                pos += 4 + n
            got.append(data)
            conn.sendall(answer)

    threading.Thread(target=serve, daemon=True).start()
    return srv, got


def test_clamd_scanner_protocol() -> None:
    srv, got = _fake_clamd(b"stream: OK\0")
    with srv:
        ClamdScanner(srv.getsockname()[:2], timeout=10)(b"clean" * 30000, "a.txt")
    assert got == [b"clean" * 30000]
    srv, _ = _fake_clamd(b"stream: Eicar-Test-Signature FOUND\0")
    with srv, pytest.raises(ScanRejected, match="Eicar-Test-Signature FOUND"):
        ClamdScanner(srv.getsockname()[:2], timeout=10)(b"X5O!P%@AP", "eicar.com")
    free = socket.create_server(("127.0.0.1", 0))
    addr = free.getsockname()[:2]
    free.close()
    with pytest.raises(ScanRejected, match="unavailable"):
        ClamdScanner(addr, timeout=2)(b"x", "a.txt")
    ClamdScanner(addr, timeout=2, fail_open=True)(b"x", "a.txt")


def test_password_generator() -> None:
    pws = {generate_password() for _ in range(200)}
    assert len(pws) == 200
    for pw in pws:
        assert len(pw) == 12 and set(pw) <= set(DEFAULT_ALPHABET)
        assert not set(pw) & set("0Oo1lI")
        assert any(c.islower() for c in pw) and any(c.isupper() for c in pw)
        assert any(c.isdigit() for c in pw)
    assert len(generate_password(20, "abcdefghijk")) == 20
    with pytest.raises(ValueError):
        generate_password(4)


# -- hostile names (issue 12 item 5) -----------------------------------------------------------


def test_name_rules_cap_strip_and_keep_the_extension() -> None:
    from mailguard.actions.archive import clean_name, fit_name, name_size

    def safe(name: str, charset: str = "utf-8") -> str:
        return fit_name(clean_name(name), charset)

    assert safe("invoice\u202efdp.exe") == "invoicefdp.exe"
    assert safe("a\u2066b\u200fc\u200bd.pdf") == "abcd.pdf"
    assert safe("..\uff0f..\uff0fetc\u2215passwd\u2044x\uff3cy\u2216z/\\w.pdf") == (
        "_.._etc_passwd_x_y_z__w.pdf"
    )
    long = safe("a" * 70000 + ".pdf")
    assert len(long.encode()) == 255 and long.endswith("….pdf")
    for charset in ("utf-8", "cp932"):
        ja = safe("見積書" * 100 + ".xlsx", charset)
        assert name_size(ja, charset) <= 255 and ja.endswith(".xlsx") and ja.startswith("見積書")
        ja.encode(charset)  # cut on a character boundary: still encodes
    assert safe("short.pdf") == "short.pdf"
    assert safe("\u202e") == "attachment"


@pytest.mark.parametrize("method", ["aes", "zipcrypto"])
@pytest.mark.parametrize("charset", ["utf-8", "cp932"])
def test_build_zip_survives_a_70000_byte_name(method: str, charset: str, tmp_path: Path) -> None:
    """Before: struct.error (AES, 16-bit name length) or a heap corruption abort inside
    libarchive 3.6 (ZipCrypto: `malloc(): corrupted top size`, the whole process died). Run in
    a child so an abort cannot take the test run with it."""
    code = (
        "from datetime import datetime\n"
        "from mailguard.actions.archive import Member, build_zip\n"
        "import sys\n"
        f"z = build_zip([Member('a' * 69996 + '.pdf', b'x' * 4000, datetime(2024, 1, 1))], 'pw',"
        f" method={method!r}, names={charset!r})\n"
        "sys.stdout.buffer.write(z)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    with pyzipper.AESZipFile(io.BytesIO(r.stdout)) as zf:
        (info,) = zf.infolist()
        assert len(info.orig_filename.encode("utf-8" if info.flag_bits & 0x800 else "cp437")) <= 255
        zf.setpassword(b"pw")
        assert zf.read(info) == b"x" * 4000
    if shutil.which("unzip"):
        path = tmp_path / "a.zip"
        path.write_bytes(r.stdout)
        assert subprocess.run(["unzip", "-l", str(path)], capture_output=True).returncode == 0


def test_long_names_fold_per_rfc2231_and_round_trip() -> None:
    m = EmailMessage()
    m["From"] = "a@example.co.jp"
    m["To"] = "b@partner.co.jp"
    m["Subject"] = "long"
    m.set_content("hi")
    for name in ("b" * 9996 + ".pdf", "見積書" * 40 + ".pdf"):
        m.add_attachment(b"%PDF-1.4\n" + b"x" * 3000, "application", "pdf", filename=name)
    raw = m.as_bytes(policy=policy.SMTP)
    out = zip_it(raw, zip_name_multi="{stem}.zip").raw
    assert max(len(ln) for ln in out.split(b"\r\n")) <= 998
    msg = message_from_bytes(out, policy=policy.default)
    (zpart,) = [p for p in msg.walk() if p.get_content_type() == "application/zip"]
    head = zpart.as_bytes(policy=policy.SMTP).split(b"\r\n\r\n", 1)[0]
    assert max(len(ln) for ln in head.split(b"\r\n")) <= 78, head
    assert b"filename*0*=UTF-8''" in head and b"filename*1*=" in head
    zname = zpart.get_filename()
    assert zname == zpart.get_param("name") and zname.endswith(".zip")
    assert zname.startswith("bbbb") and len(zname.encode()) <= 255
    with pyzipper.AESZipFile(io.BytesIO(zpart.get_payload(decode=True))) as zf:
        names = zf.namelist()
    assert [len(n.encode()) <= 255 and n.endswith(".pdf") for n in names] == [True, True]


def test_forwarded_message_with_a_file_is_zipped_whole() -> None:
    """A file inside a forwarded message cannot be cut out on its own; leaving it would send it
    unencrypted after a zip decision. The forwarded message goes into the zip as an .eml."""
    inner = EmailMessage()
    inner["From"] = "tanaka@partner.co.jp"
    inner["To"] = "yamada@example.co.jp"
    inner["Subject"] = "元のメール"
    inner.set_content("転送します\n")
    inner.add_attachment(XLSX_DATA, "application", "octet-stream", filename=XLSX)
    outer = EmailMessage()
    outer["From"] = "yamada@example.co.jp"
    outer["To"] = "tanaka@partner.co.jp"
    outer["Subject"] = "Fwd: 元のメール"
    outer.set_content("ご確認ください\n")
    outer.add_attachment(inner)  # message/rfc822, Content-Disposition: attachment
    raw = outer.as_bytes(policy=policy.SMTP)
    res = zip_it(raw)
    msg = message_from_bytes(res.raw, policy=policy.default)
    types = [p.get_content_type() for p in msg.walk()]
    assert "message/rfc822" not in types, types  # nothing of the forward left in clear
    (z,) = [p for p in msg.walk() if p.get_content_type() == "application/zip"]
    password = res.notices[0].data["password"]
    with pyzipper.AESZipFile(io.BytesIO(z.get_payload(decode=True))) as zf:
        zf.setpassword(password.encode())
        (name,) = zf.namelist()
        assert name.endswith(".eml")
        forwarded = message_from_bytes(zf.read(name), policy=policy.default)
    (att,) = list(forwarded.iter_attachments())
    assert att.get_filename() == XLSX and att.get_payload(decode=True) == XLSX_DATA
