"""Issue 12 item 5: attachment names that broke mail, sent through `mailguard serve` with a zip
rule (tests/e2e_support.py Guard: smtplib client → guard subprocess → receiving sink).

* a 70 000-byte name (the sender's client folds it per RFC 2231, so every line it sends is
  short): before the fix the zip writer raised struct.error (16-bit name length) → 451 on every
  retry, the mail was never delivered. Now: 250, delivered, member name cut to 255 bytes with its
  extension, the zip opens with pyzipper and `unzip -l`, the password from the notice opens it;
* a 10 000-character name: before the fix a 10 044-octet Content-Disposition line went upstream.
  Now every line of the delivered mail is ≤ 998 octets and the zip part's header lines ≤ 78;
* `invoice<U+202E>fdp.exe` (shows as "invoiceexe.pdf") and `..／..／etc∕passwd⁄x＼y.pdf`: no bidi
  control and no slash look-alike survives in member names or in the zip's own name.

Both profiles: AES with UTF-8 names, ZipCrypto (libarchive) with CP932 names (255 bytes counted
in CP932).
"""

from __future__ import annotations

import email.policy
import io
import re
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest
from e2e_support import Got, Guard, pdf_bytes, policy, wait_for

SLASHES = "/\\\u2215\uff0f\u2044\uff3c\u2216"  # / \ ∕ ／ ⁄ ＼ ∖
BIDI = "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u200e\u200f"
NAMES = {
    "70000-bytes": "a" * 69996 + ".pdf",
    "10000-chars": "b" * 9996 + ".pdf",
    "rlo": "invoice\u202efdp.exe",
    "lookalike-slashes": "..\uff0f..\uff0fetc\u2215passwd\u2044x\uff3cy.pdf",
    "long-japanese": "見積書" * 60 + ".xlsx",
}
PROFILES = {"aes-utf8": ("aes", "utf-8"), "zipcrypto-cp932": ("zipcrypto", "cp932")}


def zip_rule(method: str, charset: str) -> str:
    return f"""
[[rule]]
name = "zip-out"
when = "attachment.unencrypted and recipient.external"
action = "zip"
options = {{ method = "{method}", filename_charset = "{charset}" }}
"""


def zip_part(mail: Got) -> tuple[str, bytes, list[bytes]]:
    """(the zip part's file name, its bytes, its raw header lines)."""
    for part in mail.msg.walk():
        if part.get_content_type() == "application/zip":
            head = part.as_bytes(policy=email.policy.SMTP).split(b"\r\n\r\n", 1)[0]
            return str(part.get_filename()), part.get_payload(decode=True), head.split(b"\r\n")
    raise AssertionError(f"no zip in {[p.get_content_type() for p in mail.msg.walk()]}")


def raw_names(data: bytes) -> list[bytes]:
    """Member names as stored in the central directory (bytes, whatever the charset)."""
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        return [
            zi.filename.encode("utf-8" if zi.flag_bits & 0x800 else "cp437") for zi in zf.infolist()
        ]


@pytest.mark.parametrize("profile", list(PROFILES))
def test_hostile_attachment_names_are_delivered_in_a_sane_zip(profile: str, tmp_path: Path) -> None:
    method, charset = PROFILES[profile]
    if method == "zipcrypto":
        pytest.importorskip("libarchive", reason="ZipCrypto needs libarchive-c + libarchive13")
    import pyzipper

    with Guard(tmp_path, policy_text=policy(zip_rule(method, charset))) as g:
        for label, name in NAMES.items():
            sent = g.send(
                to=["Tanaka <tanaka@customer-a.co.jp>"],
                subject=f"zip {label}",
                attachments=[(name, pdf_bytes(4000), "application/pdf")],
            )
            assert max(len(ln) for ln in sent.data.split(b"\r\n")) <= 998  # the client is sane
            assert sent.code == 250 and sent.relayed, (label, sent.code, sent.text)
            mail = g.wait_mail(sent)
            # every line of what went upstream fits SMTP; the zip part's header lines fit 78
            assert max(len(ln) for ln in mail.data.split(b"\r\n")) <= 998, label
            zname, data, head = zip_part(mail)
            assert max(len(ln) for ln in head) <= 78, (label, head)
            assert zname.endswith(".zip") and len(zname.encode()) <= 255, (label, zname)
            assert not set(zname) & set(SLASHES + BIDI), (label, zname)

            members = raw_names(data)
            assert len(members) == 1, members
            stored = members[0]
            assert len(stored) <= 255, (label, len(stored))
            text = stored.decode(charset, "replace")
            assert not set(text) & set(SLASHES + BIDI), (label, text)
            ext = name.rsplit(".", 1)[1]
            assert text.endswith("." + ext), (label, text[-20:])
            if label == "rlo":
                assert text == "invoicefdp.exe"

            # it opens: names listed by Info-ZIP unzip, content extracted with the password
            if shutil.which("unzip"):
                path = tmp_path / f"{label}.zip"
                path.write_bytes(data)
                r = subprocess.run(["unzip", "-l", str(path)], capture_output=True, timeout=30)
                assert r.returncode == 0, (label, r.stdout[-500:], r.stderr[-500:])
            notice = wait_for(
                lambda s=sent: [n for n in g.notices("zip-password") if s.subject in n.text],
                what=f"the password notice for {label}",
            )[0]
            m = re.search(r"Password: (\S+)", notice.text) or re.search(
                r"パスワード: (\S+)", notice.text
            )
            assert m, notice.text
            with pyzipper.AESZipFile(io.BytesIO(data)) as zf:
                zf.setpassword(m.group(1).encode())
                assert zf.read(zf.infolist()[0]) == pdf_bytes(4000)
