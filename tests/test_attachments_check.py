"""attachments.analyze on whole messages parsed by MessageView: which parts are user files,
forwarded messages, winmail.dat, S/MIME and PGP/MIME encrypted mail, findings in ja/en."""

from __future__ import annotations

import base64
import io
import time
from email.message import EmailMessage
from pathlib import Path

import pytest
import pyzipper
from test_attachments_make import minimal_pdf, need, ooxml, qpdf_encrypt, run, tnef

from mailguard.checks import CheckContext
from mailguard.checks.attachments import analyze
from mailguard.checks.finding import Finding
from mailguard.message import MessageView

CSV = "氏名,メール\n山田太郎,taro@example.co.jp\n".encode("cp932")


def aes_zip(files: dict[str, bytes]) -> bytes:
    b = io.BytesIO()
    with pyzipper.AESZipFile(
        b, "w", compression=pyzipper.ZIP_DEFLATED, encryption=pyzipper.WZ_AES
    ) as z:
        z.setpassword(b"pw")
        for n, d in files.items():
            z.writestr(n, d)
    return b.getvalue()


def message(*files: tuple[str, bytes, str], body: str = "お世話になっております。") -> EmailMessage:
    m = EmailMessage()
    m["From"] = "山田 <yamada@example.co.jp>"
    m["To"] = "tanaka@partner.co.jp"
    m["Subject"] = "お見積りの件"
    m.set_content(body)
    for name, data, ctype in files:
        maintype, subtype = ctype.split("/")
        m.add_attachment(data, maintype=maintype, subtype=subtype, filename=name)
    return m


def check(raw: bytes | EmailMessage) -> tuple[list[dict], dict[str, Finding]]:
    if isinstance(raw, EmailMessage):
        raw = raw.as_bytes()
    report = analyze(MessageView.parse(raw), CheckContext())
    return report.to_json(), {f.code: f for f in report.findings}


def test_unencrypted_files_reason_in_japanese() -> None:
    items, f = check(
        message(
            (
                "見積書.xlsx",
                ooxml(),
                "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
            ),
            ("顧客リスト.csv", CSV, "text/csv"),
        )
    )
    un = f["attachment.unencrypted"]
    assert un.count == 2
    assert un.evidence == ("見積書.xlsx", "顧客リスト.csv")
    assert (
        un.reason_ja == "暗号化されていない添付ファイルが2件あります: 見積書.xlsx, 顧客リスト.csv"
    )
    assert un.reason_en == "2 attached files are not encrypted: 見積書.xlsx, 顧客リスト.csv"
    assert f["attachment.present"].count == 2
    assert "attachment.encrypted" not in f
    assert items[0] == {
        "filename": "見積書.xlsx",
        "content_type": "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
        "size": len(ooxml()),
        "kind": "ooxml",
        "mime": "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
        "encrypted": False,
        "detail": "Office document (OOXML) without a password",
        "path": "2",
    }


def test_real_type_beats_the_declared_one(tmp_path: Path) -> None:
    # A password PDF sent as octet-stream with a .dat name, and a zip disguised as a PDF.
    pdf = qpdf_encrypt(tmp_path, "user", "owner", "256")
    items, f = check(
        message(
            ("scan.dat", pdf, "application/octet-stream"),
            ("請求書.pdf", aes_zip({"請求書.pdf": minimal_pdf()}), "application/pdf"),
        )
    )
    assert [(i["kind"], i["encrypted"]) for i in items] == [("pdf", True), ("zip", True)]
    assert (
        f["attachment.encrypted"].reason_ja
        == "暗号化された添付ファイルが2件あります: scan.dat, 請求書.pdf"
    )
    assert "attachment.unencrypted" not in f


def test_owner_password_pdf_and_mixed_zip_are_unencrypted(tmp_path: Path) -> None:
    owner_only = qpdf_encrypt(tmp_path, "", "owner", "256")
    b = io.BytesIO()
    with pyzipper.AESZipFile(b, "w") as z:
        z.writestr("readme.txt", "clear")
    with pyzipper.AESZipFile(b, "a", encryption=pyzipper.WZ_AES) as z:
        z.setpassword(b"pw")
        z.writestr("顧客.csv", CSV)
    items, f = check(
        message(
            ("契約書.pdf", owner_only, "application/pdf"),
            ("資料.zip", b.getvalue(), "application/zip"),
        )
    )
    assert f["attachment.unencrypted"].count == 2
    assert "owner password only" in items[0]["detail"]
    assert items[1]["detail"].startswith("mixed")


def test_inline_images_calendar_and_signature_are_not_files() -> None:
    m = EmailMessage()
    m["From"], m["To"], m["Subject"] = "a@example.co.jp", "b@partner.co.jp", "会議"
    m.set_content("本文")
    m.add_alternative('<p>本文<img src="cid:logo@x"></p>', subtype="html")
    html = m.get_payload()[1]
    html.add_related(
        b"\x89PNG\r\n\x1a\n" + b"\0" * 50, maintype="image", subtype="png", cid="<logo@x>"
    )
    m.add_attachment(
        b"BEGIN:VCALENDAR\r\nEND:VCALENDAR\r\n",
        maintype="text",
        subtype="calendar",
        filename="invite.ics",
    )
    m.add_attachment(
        b"0\x82\x01\x00", maintype="application", subtype="pkcs7-signature", filename="smime.p7s"
    )
    items, f = check(m)
    kinds = [(i["filename"], i["kind"]) for i in items]
    assert kinds == []
    assert f == {}


def test_forwarded_message_inside_is_looked_into() -> None:
    inner = message(("内部資料.csv", CSV, "text/csv"))
    outer = message()
    outer.add_attachment(inner, filename="転送.eml")
    items, f = check(outer)
    by_name = {i["filename"]: i for i in items}
    assert by_name["内部資料.csv"]["container"] == "転送.eml"
    assert by_name["内部資料.csv"]["encrypted"] is False
    assert "内部資料.csv" in f["attachment.unencrypted"].evidence


def test_base64_forwarded_message_is_parsed() -> None:
    inner = message(("社外秘.csv", CSV, "text/csv")).as_bytes()
    raw = (
        b"From: a@example.co.jp\r\nTo: b@partner.co.jp\r\nSubject: fw\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/mixed; boundary="B"\r\n\r\n'
        b"--B\r\nContent-Type: text/plain\r\n\r\nsee attached\r\n"
        b"--B\r\nContent-Type: message/rfc822\r\nContent-Transfer-Encoding: base64\r\n"
        b'Content-Disposition: attachment; filename="fw.eml"\r\n\r\n'
        + base64.encodebytes(inner).replace(b"\n", b"\r\n")
        + b"--B--\r\n"
    )
    items, f = check(raw)
    names = [i["filename"] for i in items]
    assert "社外秘.csv" in names and "fw.eml" in names
    assert f["attachment.unencrypted"].count == 2


def test_winmail_dat_members_are_files() -> None:
    data = tnef([("顧客リスト.csv", CSV), ("見積書.zip", aes_zip({"a.xlsx": ooxml()}))])
    items, f = check(message(("winmail.dat", data, "application/ms-tnef")))
    assert [(i["filename"], i["encrypted"], i["container"]) for i in items] == [
        ("顧客リスト.csv", False, "winmail.dat"),
        ("見積書.zip", True, "winmail.dat"),
    ]
    assert f["attachment.unencrypted"].evidence == ("顧客リスト.csv",)
    assert f["attachment.encrypted"].evidence == ("見積書.zip",)


def test_winmail_dat_without_files_is_not_a_file() -> None:
    items, f = check(message(("winmail.dat", tnef([]), "application/ms-tnef")))
    assert items == [] and f == {}


def test_smime_encrypted_mail_from_openssl(tmp_path: Path) -> None:
    openssl = need("openssl")
    key, crt = tmp_path / "k.pem", tmp_path / "c.pem"
    run(
        openssl,
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        key,
        "-out",
        crt,
        "-subj",
        "/CN=test",
        "-days",
        "1",
    )
    inner = tmp_path / "inner.eml"
    inner.write_bytes(message(("顧客リスト.csv", CSV, "text/csv")).as_bytes())
    out = tmp_path / "out.eml"
    run(
        openssl,
        "cms",
        "-encrypt",
        "-in",
        inner,
        "-out",
        out,
        "-from",
        "a@example.co.jp",
        "-to",
        "b@partner.co.jp",
        "-subject",
        "secret",
        crt,
    )
    items, f = check(out.read_bytes())
    assert len(items) == 1 and items[0]["encrypted_mail"] is True
    assert (items[0]["kind"], items[0]["encrypted"]) == ("smime", True)
    assert "attachment.unencrypted" not in f and f["attachment.encrypted"].count == 1


def test_pgp_mime_encrypted_mail(tmp_path: Path) -> None:
    gpg = need("gpg")
    src, out = tmp_path / "body.eml", tmp_path / "body.asc"
    src.write_bytes(message(("顧客リスト.csv", CSV, "text/csv")).as_bytes())
    run(
        gpg,
        "--homedir",
        tmp_path,
        "--batch",
        "--pinentry-mode",
        "loopback",
        "--passphrase",
        "pw",
        "-a",
        "-c",
        "-o",
        out,
        src,
    )
    raw = (
        b"From: a@example.co.jp\r\nTo: b@partner.co.jp\r\nSubject: x\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/encrypted; protocol="application/pgp-encrypted"; boundary="E"\r\n'
        b"\r\n--E\r\nContent-Type: application/pgp-encrypted\r\n\r\nVersion: 1\r\n\r\n--E\r\n"
        b'Content-Type: application/octet-stream; name="encrypted.asc"\r\n\r\n'
        + out.read_bytes()
        + b"\r\n--E--\r\n"
    )
    items, f = check(raw)
    assert [(i["kind"], i["encrypted"], i.get("encrypted_mail")) for i in items] == [
        ("pgp", True, True)
    ]
    assert "attachment.unencrypted" not in f


def test_declared_encrypted_but_garbage_is_unknown() -> None:
    raw = (
        b"From: a@example.co.jp\r\nTo: b@partner.co.jp\r\nSubject: x\r\nMIME-Version: 1.0\r\n"
        b"Content-Type: application/pkcs7-mime; smime-type=enveloped-data; name=smime.p7m\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\n" + base64.encodebytes(CSV * 5)
    )
    items, f = check(raw)
    assert items[0]["encrypted"] is None
    assert f["attachment.unknown"].reason_ja.startswith(
        "暗号化されているか判定できない添付ファイルが1件"
    )


def test_iso2022jp_rfc2047_and_rfc2231_names() -> None:
    name_2047 = (
        "=?ISO-2022-JP?B?" + base64.b64encode("見積書.zip".encode("iso-2022-jp")).decode() + "?="
    )
    body = base64.encodebytes(aes_zip({"a.csv": CSV})).decode()
    raw = (
        "From: a@example.co.jp\r\nTo: b@partner.co.jp\r\nSubject: x\r\nMIME-Version: 1.0\r\n"
        'Content-Type: multipart/mixed; boundary="B"\r\n\r\n--B\r\nContent-Type: text/plain\r\n\r\n'
        "body\r\n--B\r\n"
        f'Content-Type: application/octet-stream; name="{name_2047}"\r\n'
        "Content-Transfer-Encoding: base64\r\n"
        "Content-Disposition: attachment; filename*=UTF-8''%E9%A1%A7%E5%AE%A2.csv\r\n\r\n"
        f"{base64.encodebytes(CSV).decode()}--B\r\n"
        f'Content-Type: application/zip; name="{name_2047}"\r\n'
        "Content-Transfer-Encoding: base64\r\n"
        f"Content-Disposition: attachment\r\n\r\n{body}--B--\r\n"
    ).encode()
    items, _ = check(raw)
    assert [(i["filename"], i["encrypted"]) for i in items] == [
        ("顧客.csv", False),
        ("見積書.zip", True),
    ]


def test_zip_bomb_gives_a_limit_finding() -> None:
    b = io.BytesIO()
    with pyzipper.ZipFile(b, "w", pyzipper.ZIP_DEFLATED) as z:
        for i in range(6000):
            z.writestr(f"{i}.txt", b"")
    items, f = check(message(("bomb.zip", b.getvalue(), "application/zip")))
    assert f["attachment.limit"].evidence == ("bomb.zip",)
    assert f["attachment.limit"].reason_ja.startswith("サイズ・件数・入れ子の上限に達し")
    assert items[0]["limited"] is True


def test_many_attachments_are_bounded() -> None:
    m = message(*[(f"{i}.csv", CSV, "text/csv") for i in range(1500)])
    start = time.process_time()
    items, f = check(m)
    assert time.process_time() - start < 10
    assert 0 < len(items) <= 1000
    assert f["attachment.unencrypted"].count == len(items)
    assert f["attachment.unencrypted"].reason_en.endswith(f"and {len(items) - 5} more")


def test_message_without_attachments_has_no_findings() -> None:
    items, f = check(message())
    assert items == [] and f == {}


@pytest.mark.parametrize("n", [1, 3])
def test_present_equals_sum_of_verdicts(n: int) -> None:
    files = [(f"f{i}.bin", bytes(range(256)) * 40, "application/octet-stream") for i in range(n)]
    files.append(("x.zip", aes_zip({"a": b"b"}), "application/zip"))
    _, f = check(message(*files))
    total = sum(
        f[c].count
        for c in ("attachment.unencrypted", "attachment.encrypted", "attachment.unknown")
        if c in f
    )
    assert f["attachment.present"].count == total == n + 1
