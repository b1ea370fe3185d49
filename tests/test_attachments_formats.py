"""formats.sniff on files made by the real tools (zip, pyzipper, 7z, qpdf, msoffcrypto, gpg,
openssl) and on hand-built legacy Office / TNEF / RAR bytes; bombs and damaged files."""

from __future__ import annotations

import io
import os
import struct
import zipfile
from pathlib import Path

import pytest
import pyzipper
from test_attachments_make import (
    cfb,
    excel_xls,
    minimal_pdf,
    need,
    ooxml,
    ooxml_encrypted,
    outlook_msg,
    patch_all_entries,
    powerpoint_ppt,
    qpdf_encrypt,
    rar4,
    rar5,
    run,
    tnef,
    word_doc,
)

from mailguard.formats import FileInfo, SniffLimits, sniff

CSV = "氏名,メール\n山田太郎,taro@example.co.jp\n".encode("cp932")


def aes_zip(files: dict[str, bytes], password: bytes = b"pw") -> bytes:
    b = io.BytesIO()
    with pyzipper.AESZipFile(
        b, "w", compression=pyzipper.ZIP_DEFLATED, encryption=pyzipper.WZ_AES
    ) as z:
        z.setpassword(password)
        for name, data in files.items():
            z.writestr(name, data)
    return b.getvalue()


def plain_zip(files: dict[str, bytes]) -> bytes:
    b = io.BytesIO()
    with zipfile.ZipFile(b, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in files.items():
            z.writestr(name, data)
    return b.getvalue()


@pytest.fixture
def jp_files(tmp_path: Path) -> Path:
    (tmp_path / "顧客リスト.csv").write_bytes(CSV)
    (tmp_path / "見積書.txt").write_text("御見積金額 100万円", encoding="utf-8")
    return tmp_path


# --- ZIP -------------------------------------------------------------------------------------


def test_plain_zip_is_not_encrypted() -> None:
    info = sniff(plain_zip({"顧客リスト.csv": CSV, "見積書.txt": b"x"}), "資料.zip")
    assert (info.kind, info.mime, info.encrypted) == ("zip", "application/zip", False)
    assert {m.name for m in info.members} == {"顧客リスト.csv", "見積書.txt"}


def test_infozip_zipcrypto_with_japanese_names(jp_files: Path) -> None:
    zip_ = need("zip")
    run(zip_, "-q", "-P", "secret", "out.zip", "顧客リスト.csv", "見積書.txt", cwd=jp_files)
    info = sniff((jp_files / "out.zip").read_bytes(), "out.zip")
    assert info.encrypted is True
    assert "ZipCrypto" in info.detail and "all 2" in info.detail
    assert {m.name for m in info.members} == {"顧客リスト.csv", "見積書.txt"}


def test_infozip_without_password(jp_files: Path) -> None:
    run(need("zip"), "-q", "out.zip", "顧客リスト.csv", cwd=jp_files)
    assert sniff((jp_files / "out.zip").read_bytes()).encrypted is False


def test_pyzipper_aes256() -> None:
    info = sniff(aes_zip({"見積書.xlsx": ooxml()}))
    assert info.encrypted is True
    assert "AES-256" in info.detail


def test_7z_writes_aes_zip(jp_files: Path) -> None:
    run(
        need("7z"),
        "a",
        "-tzip",
        "-psecret",
        "-mem=AES256",
        "out.zip",
        "顧客リスト.csv",
        cwd=jp_files,
    )
    info = sniff((jp_files / "out.zip").read_bytes())
    assert info.encrypted is True and "AES-256" in info.detail


def test_mixed_zip_is_not_protected() -> None:
    b = io.BytesIO(plain_zip({"公開資料.txt": b"public"}))
    with pyzipper.AESZipFile(b, "a", encryption=pyzipper.WZ_AES) as z:
        z.setpassword(b"pw")
        z.writestr("顧客リスト.csv", CSV)
    info = sniff(b.getvalue())
    assert info.encrypted is False
    assert info.detail.startswith("mixed: 1 of 2")


def test_folders_do_not_count(jp_files: Path) -> None:
    (jp_files / "フォルダ").mkdir()
    (jp_files / "フォルダ" / "a.csv").write_bytes(CSV)
    run(need("zip"), "-q", "-r", "-P", "pw", "out.zip", "フォルダ", cwd=jp_files)
    info = sniff((jp_files / "out.zip").read_bytes())
    assert info.encrypted is True and "all 1 entries" in info.detail


def test_cp932_names_without_utf8_flag() -> None:
    # Japanese Windows writes CP932 names and no UTF-8 flag: rewrite the name in place.
    name = "顧客.csv".encode("cp932")
    data = plain_zip({"X" * len(name): CSV}).replace(b"X" * len(name), name)
    info = sniff(data)
    assert info.members[0].name == "顧客.csv"


def test_zip_of_encrypted_pdfs_counts_as_protected(tmp_path: Path) -> None:
    pdf = qpdf_encrypt(tmp_path, "user", "owner", "256")
    info = sniff(plain_zip({"契約書.pdf": pdf, "請求書.pdf": pdf}))
    assert info.encrypted is True
    assert "themselves encrypted" in info.detail
    assert info.members[0].kind == "pdf"


def test_zip_holding_a_plain_zip_and_an_encrypted_zip_is_mixed() -> None:
    info = sniff(plain_zip({"a.zip": aes_zip({"x.csv": CSV}), "b.zip": plain_zip({"y.csv": CSV})}))
    assert info.encrypted is False


def test_zip_bomb_by_entry_count_is_limited() -> None:
    data = plain_zip({f"{i}.txt": b"" for i in range(10_000)})
    info = sniff(data)
    assert info.limited is True and info.encrypted is False
    assert "10000 entries" in info.detail


def test_encrypted_entries_beyond_the_limit_leave_the_verdict_open() -> None:
    data = patch_all_entries(plain_zip({f"{i}.txt": b"" for i in range(300)}), flag=1)
    assert sniff(data).encrypted is True
    info = sniff(data, limits=SniffLimits(max_entries=100))
    assert info.limited is True and info.encrypted is None


def test_entry_declaring_4gb_is_limited() -> None:
    data = patch_all_entries(plain_zip({"bomb.bin": b"\0" * 1000}), usize=0xFFFF_FFFF)
    info = sniff(data)
    assert info.limited is True and "zip bomb" in info.detail


def test_nested_zip_bomb_is_bounded() -> None:
    data = plain_zip({"0.csv": CSV})
    for i in range(8):
        data = plain_zip({f"{i}.zip": data})
    info = sniff(data)
    assert info.limited is True
    assert info.encrypted is None  # the innermost level was not looked at


def test_member_larger_than_declared_is_limited() -> None:
    inner = plain_zip({"x.csv": CSV * 100})
    outer = bytearray(plain_zip({"in.zip": inner}))
    cd = outer.find(b"PK\x01\x02")
    struct.pack_into("<I", outer, cd + 24, 10)  # declare 10 bytes
    info = sniff(bytes(outer))
    assert info.limited is True and "larger than declared" in info.detail


def test_decompression_budget_is_shared() -> None:
    pdf = minimal_pdf()
    data = plain_zip({f"{i}.pdf": pdf for i in range(20)})
    info = sniff(data, limits=SniffLimits(max_inner_bytes=len(pdf) * 3))
    assert info.encrypted is False
    assert sum(m.kind == "pdf" for m in info.members) == 3


def test_truncated_zip_falls_back_to_local_headers(jp_files: Path) -> None:
    run(need("zip"), "-q", "-P", "pw", "out.zip", "顧客リスト.csv", "見積書.txt", cwd=jp_files)
    data = (jp_files / "out.zip").read_bytes()
    cut = data[: data.find(b"PK\x01\x02")]
    info = sniff(cut)
    assert info.encrypted is True and "local headers" in info.detail


def test_self_extracting_prefix_is_read() -> None:
    data = b"MZ" + b"\0" * 2000 + aes_zip({"a.csv": CSV})
    assert sniff(data).encrypted is True


def test_broken_zip_is_unknown_not_a_crash() -> None:
    info = sniff(b"PK\x03\x04" + b"\xff" * 20)
    assert info.kind == "zip" and info.encrypted is None


# --- OOXML / ODF / legacy Office ----------------------------------------------------------------


@pytest.mark.parametrize("app", ["xl", "word", "ppt"])
def test_plain_ooxml(app: str) -> None:
    info = sniff(ooxml(app), "資料.xlsx")
    assert info.kind == "ooxml" and info.encrypted is False
    assert "openxmlformats" in info.mime


@pytest.mark.parametrize(("app", "ext"), [("xl", "xlsx"), ("word", "docx"), ("ppt", "pptx")])
def test_encrypted_ooxml_made_by_msoffcrypto(app: str, ext: str) -> None:
    info = sniff(ooxml_encrypted(app), f"見積書.{ext}")
    assert info.kind == "ooxml" and info.encrypted is True
    assert "Agile" in info.detail
    assert (
        ext in info.mime
        or "sheet" in info.mime
        or "presentation" in info.mime
        or "word" in info.mime
    )


def test_encrypted_ooxml_from_hand_built_container() -> None:
    info = sniff(
        cfb({"EncryptionInfo": struct.pack("<HHI", 4, 4, 0x40), "EncryptedPackage": b"\x01" * 64})
    )
    assert (info.kind, info.encrypted) == ("ooxml", True)


def test_hand_built_cfb_is_readable_by_olefile() -> None:
    olefile = pytest.importorskip("olefile")
    ole = olefile.OleFileIO(io.BytesIO(word_doc(encrypted=True)))
    assert ["WordDocument"] in ole.listdir()


@pytest.mark.parametrize(
    ("data", "encrypted", "mime"),
    [
        (word_doc(False), False, "application/msword"),
        (word_doc(True), True, "application/msword"),
        (word_doc(True, obfuscated=True), True, "application/msword"),
        (excel_xls(False), False, "application/vnd.ms-excel"),
        (excel_xls(True), True, "application/vnd.ms-excel"),
        (powerpoint_ppt(False), False, "application/vnd.ms-powerpoint"),
        (powerpoint_ppt(True), True, "application/vnd.ms-powerpoint"),
    ],
)
def test_legacy_office(data: bytes, encrypted: bool, mime: str) -> None:
    info = sniff(data)
    assert (info.kind, info.encrypted, info.mime) == ("ole", encrypted, mime)


def test_outlook_msg_and_unknown_cfb() -> None:
    assert sniff(outlook_msg()).kind == "msg"
    other = sniff(cfb({"Something": b"x"}))
    assert other.kind == "ole" and other.encrypted is None


def test_odf_with_and_without_password() -> None:
    def odf(manifest: str) -> bytes:
        b = io.BytesIO()
        with zipfile.ZipFile(b, "w") as z:
            z.writestr(zipfile.ZipInfo("mimetype"), "application/vnd.oasis.opendocument.text")
            z.writestr("META-INF/manifest.xml", manifest, zipfile.ZIP_DEFLATED)
            z.writestr("content.xml", "<x/>")
        return b.getvalue()

    enc = (
        "<manifest:file-entry>"
        '<manifest:encryption-data manifest:checksum="x"/></manifest:file-entry>'
    )
    assert sniff(odf(enc)).encrypted is True
    assert sniff(odf("<manifest:file-entry/>")).encrypted is False


# --- PDF -------------------------------------------------------------------------------------


def test_plain_pdf() -> None:
    assert sniff(minimal_pdf()).encrypted is False


@pytest.mark.parametrize(
    ("user", "bits", "extra"),
    [
        ("user", "256", ()),
        ("user", "256", ("--force-R5",)),
        ("user", "128", ("--use-aes=y",)),
        ("user", "128", ("--use-aes=n",)),
        ("user", "40", ()),
        ("", "256", ()),
        ("", "256", ("--force-R5",)),
        ("", "128", ("--use-aes=y",)),
        ("", "128", ("--use-aes=n",)),
        ("", "40", ()),
    ],
)
def test_qpdf_user_vs_owner_password(
    tmp_path: Path, user: str, bits: str, extra: tuple[str, ...]
) -> None:
    info = sniff(qpdf_encrypt(tmp_path, user, "オーナー", bits, *extra), "契約書.pdf")
    assert info.kind == "pdf"
    if user:
        assert info.encrypted is True and "needs a password" in info.detail
    else:
        assert info.encrypted is False and "owner password only" in info.detail


def test_qpdf_with_object_streams(tmp_path: Path) -> None:
    data = qpdf_encrypt(tmp_path, "u", "o", "256", post=("--object-streams=generate",))
    assert sniff(data).encrypted is True


def test_pdf_public_key_security_is_encrypted() -> None:
    data = minimal_pdf().replace(
        b"/Root 1 0 R", b"/Root 1 0 R /Encrypt << /Filter /Adobe.PubSec /V 4 >>"
    )
    info = sniff(data)
    assert info.encrypted is True and "Adobe.PubSec" in info.detail


def test_pdf_with_unreadable_encrypt_reference() -> None:
    data = minimal_pdf().replace(b"/Root 1 0 R", b"/Root 1 0 R /Encrypt 99 0 R")
    assert sniff(data).encrypted is None


# --- 7z / RAR ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "encrypted", "words"),
    [
        ((), False, "without a password"),
        (("-psecret",), True, "names visible"),
        (("-psecret", "-mhe=on"), True, "names and contents hidden"),
        (("-psecret", "-mx=0"), True, "names visible"),
        (("-m0=lzma2", "-psecret"), True, "names visible"),
    ],
)
def test_7z(jp_files: Path, args: tuple[str, ...], encrypted: bool, words: str) -> None:
    run(need("7z"), "a", "-bso0", *args, "out.7z", "顧客リスト.csv", "見積書.txt", cwd=jp_files)
    info = sniff((jp_files / "out.7z").read_bytes())
    assert (info.kind, info.encrypted) == ("7z", encrypted)
    assert words in info.detail


def test_truncated_7z_is_unknown(jp_files: Path) -> None:
    run(need("7z"), "a", "-bso0", "-psecret", "out.7z", "顧客リスト.csv", cwd=jp_files)
    data = (jp_files / "out.7z").read_bytes()
    assert sniff(data[: len(data) // 2]).encrypted is None


@pytest.mark.parametrize("build", [rar4, rar5])
def test_rar(build) -> None:  # type: ignore[no-untyped-def]
    assert sniff(build([("a.csv", False), ("b.csv", False)])).encrypted is False
    assert sniff(build([("a.csv", True), ("b.csv", True)])).encrypted is True
    mixed = sniff(build([("a.csv", True), ("b.csv", False)]))
    assert mixed.encrypted is False and mixed.detail.startswith("mixed")
    hidden = sniff(build([], headers_encrypted=True))
    assert hidden.encrypted is True and "headers" in hidden.detail


# --- S/MIME / PGP ------------------------------------------------------------------------------


@pytest.fixture
def cert(tmp_path: Path) -> tuple[Path, Path]:
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
    return key, crt


@pytest.mark.parametrize("form", ["DER", "PEM"])
def test_smime_enveloped(tmp_path: Path, cert: tuple[Path, Path], form: str) -> None:
    src = tmp_path / "m.txt"
    src.write_bytes(CSV)
    out = tmp_path / "m.p7m"
    run(need("openssl"), "cms", "-encrypt", "-in", src, "-outform", form, "-out", out, cert[1])
    info = sniff(out.read_bytes(), "smime.p7m")
    assert (info.kind, info.encrypted) == ("smime", True)


def test_smime_signed_only_is_not_encrypted(tmp_path: Path, cert: tuple[Path, Path]) -> None:
    src, out = tmp_path / "m.txt", tmp_path / "s.p7m"
    src.write_bytes(CSV)
    run(
        need("openssl"),
        "cms",
        "-sign",
        "-nodetach",
        "-in",
        src,
        "-signer",
        cert[1],
        "-inkey",
        cert[0],
        "-outform",
        "DER",
        "-out",
        out,
    )
    info = sniff(out.read_bytes())
    assert (info.kind, info.encrypted) == ("smime", False)


@pytest.mark.parametrize("armor", [False, True])
def test_gpg_symmetric(tmp_path: Path, armor: bool) -> None:
    gpg = need("gpg")
    src, out = tmp_path / "顧客.csv", tmp_path / "out.gpg"
    src.write_bytes(CSV)
    run(
        gpg,
        "--homedir",
        tmp_path,
        "--batch",
        "--yes",
        "--pinentry-mode",
        "loopback",
        "--passphrase",
        "pw",
        *(["-a"] if armor else []),
        "-c",
        "-o",
        out,
        src,
    )
    info = sniff(out.read_bytes())
    assert (info.kind, info.encrypted) == ("pgp", True)


def test_gpg_public_key_encryption(tmp_path: Path) -> None:
    gpg = need("gpg")
    home = [
        "--homedir",
        str(tmp_path),
        "--batch",
        "--yes",
        "--pinentry-mode",
        "loopback",
        "--passphrase",
        "",
    ]
    run(
        gpg,
        *home,
        "--quick-gen-key",
        "テスト <t@example.co.jp>",
        "future-default",
        "default",
        "never",
    )
    src, out = tmp_path / "a.csv", tmp_path / "a.csv.gpg"
    src.write_bytes(CSV)
    run(gpg, *home, "--trust-model", "always", "-r", "t@example.co.jp", "-e", "-o", out, src)
    assert sniff(out.read_bytes()).encrypted is True
    signed = tmp_path / "a.csv.sig"
    run(gpg, *home, "-s", "-o", signed, src)
    assert sniff(signed.read_bytes(), "a.csv.sig").encrypted is False
    clear = tmp_path / "a.asc"
    run(gpg, *home, "--clearsign", "-o", clear, src)
    assert sniff(clear.read_bytes()).encrypted is False


def test_hand_built_openpgp_packets() -> None:
    skesk = bytes([0xC3, 13, 4, 9, 3, 2]) + b"\x01" * 8 + b"\x60"  # SKESK v4, AES-256, S2K
    seipd = bytes([0xD2, 20, 1]) + b"\x02" * 19
    assert sniff(skesk + seipd).encrypted is True
    assert sniff(skesk + b"\xff" * 30).kind != "pgp"  # key packet without data: not a message


# --- TNEF / misc -------------------------------------------------------------------------------


def test_tnef_members_are_sniffed() -> None:
    data = tnef([("顧客リスト.csv", CSV), ("見積書.zip", aes_zip({"a.xlsx": ooxml()}))])
    info = sniff(data, "winmail.dat")
    assert info.kind == "tnef" and info.encrypted is False
    names = {m.name: m for m in info.members}
    assert names["顧客リスト.csv"].encrypted is False
    assert names["見積書.zip"].encrypted is True and names["見積書.zip"].kind == "zip"


def test_tnef_short_names_decoded_with_cp932_and_truncation() -> None:
    data = tnef([("資料.pdf", minimal_pdf())], long_names=False)
    assert sniff(data).members[0].name == "資料.pdf"
    cut = sniff(data[:-200])
    assert "truncated" in cut.detail


def test_tnef_without_attachments() -> None:
    info = sniff(tnef([]))
    assert info.kind == "tnef" and not info.members


@pytest.mark.parametrize(
    ("data", "kind", "encrypted"),
    [
        (b"\x89PNG\r\n\x1a\n" + b"\0" * 100, "image", False),
        (b"\xff\xd8\xff\xe0" + b"\0" * 100, "image", False),
        ("件名,金額\n見積,100\n".encode("cp932"), "text", False),
        ("件名\n".encode("iso-2022-jp"), "text", False),
        (b"Salted__" + os.urandom(64), "openssl-enc", True),
        (os.urandom(20_000), "other", None),
        (b"\0\1\2\3" * 1000, "other", False),
        (b"", "empty", False),
        (b"From: a@example.co.jp\r\nSubject: x\r\nTo: b@example.jp\r\n\r\nbody", "message", False),
    ],
)
def test_simple_kinds(data: bytes, kind: str, encrypted: bool | None) -> None:
    info = sniff(data, "x.csv")
    assert (info.kind, info.encrypted) == (kind, encrypted)


def test_fileinfo_json_shape() -> None:
    info = sniff(plain_zip({"a.csv": CSV}))
    j = info.to_json()
    assert set(j) >= {"kind", "mime", "encrypted", "detail"}
    assert isinstance(info, FileInfo)
