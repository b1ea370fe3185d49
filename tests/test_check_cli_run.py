"""`mailguard check` end to end: .eml, dir, mbox, Maildir; JSON schema; ja/en; exit codes."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import dns.flags
import dns.message
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import dns.zone
import pytest

from mailguard.cli import main
from mailguard.history import DomainHistory
from tests.test_check_cli_mail import (
    INTERNAL,
    MASS_BCC,
    MULTI_COMPANY,
    WITH_PDF,
    WITH_ZIP,
    jis,
    mail,
    sjis_raw,
)

ROOT = Path(__file__).resolve().parent.parent
DEFAULT = str(ROOT / "policies" / "default.toml")


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(["check", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def jsonl(out: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.splitlines()]


DOMAIN_CLASSES = {
    "internal",
    "trusted",
    "known",
    "first_time",
    "lookalike",
    "nonexistent",
    "unchecked",
}
GATES = {"pass", "hold", "confirm", "approve", "reject"}


def assert_schema(obj: dict[str, Any]) -> None:
    """The documented --json schema (docs/policy.md): keys, types, allowed values."""
    assert set(obj) >= {
        "file",
        "decision",
        "findings",
        "envelope",
        "recipients",
        "domains",
        "attachments",
        "message",
    }
    d = obj["decision"]
    assert d["action"] in GATES
    assert all(t in ("bcc", "zip") for t in d["transforms"])
    assert all(isinstance(r, str) for r in d["rules"])
    assert [h["rule"] for h in d["fired"]] == d["rules"]
    assert isinstance(d["exempted"], list)
    if d["action"] in ("hold", "confirm", "approve"):
        assert isinstance(d["hold_for_seconds"], int) and d["hold_for_seconds"] > 0
    for f in obj["findings"]:
        assert isinstance(f["code"], str) and "." in f["code"]
        assert isinstance(f["reason"], str) and f["reason"]
        assert isinstance(f["reason_ja"], str) and f["reason_ja"]
        assert isinstance(f["count"], int) and f["count"] >= 1
        assert isinstance(f["evidence"], list)
    env = obj["envelope"]
    assert isinstance(env["mail_from"], str) and isinstance(env["rcpt_tos"], list)
    r = obj["recipients"]
    for key in ("to", "cc", "bcc", "visible_external"):
        assert isinstance(r[key], list)
    assert isinstance(r["external_parties"], int)
    for dom, info in obj["domains"].items():
        assert dom.isascii() and dom == dom.lower()  # keys are A-labels
        assert info["class"] in DOMAIN_CLASSES
        assert "lookalike_of" in info
    for att in obj["attachments"]:
        assert set(att) >= {"filename", "content_type", "size", "kind", "encrypted"}
        assert att["encrypted"] in (True, False, None)
    m = obj["message"]
    assert isinstance(m["size"], int) and isinstance(m["subject"], str)


@pytest.fixture
def eml_dir(tmp_path: Path) -> Path:
    d = tmp_path / "sent"
    d.mkdir()
    (d / "01-mass.eml").write_bytes(MASS_BCC)
    (d / "02-multi.eml").write_bytes(MULTI_COMPANY)
    sub = d / "2026" / "11"
    sub.mkdir(parents=True)
    (sub / "03-pdf.eml").write_bytes(WITH_PDF)
    (sub / "04-zip.eml").write_bytes(WITH_ZIP)
    (sub / "05-internal").write_bytes(INTERNAL)  # no extension: still mail
    (d / "README.txt").write_text("これはメールではありません\n", encoding="utf-8")
    (d / ".hidden.eml").write_bytes(MASS_BCC)
    return d


# ---- one message -----------------------------------------------------------------------


def test_single_eml_human_english(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "multi.eml"
    path.write_bytes(MULTI_COMPANY)
    rc, out, err = run(capsys, "--policy", DEFAULT, "--lang", "en", str(path))
    assert rc == 0, err
    assert f"== {path}" in out
    assert "From: tanaka@example.co.jp → 3 recipient(s)  (envelope from To/Cc/Bcc)" in out
    assert "Subject: 新製品のご案内" in out
    assert "Decision: CONFIRM\n" in out
    assert "sender must confirm within 1d; cancelled if unanswered" in out
    assert "several-companies-visible  recipient.external_parties >= 2 and " in out
    assert "* recipient.external_parties (2):" in out  # * = behind a fired rule
    assert "- domain.external (2):" in out
    assert "hanako.yamada@customer-a.co.jp, suzuki@customer-b.co.jp" in out
    assert "customer-a.co.jp: not checked (no history)" in out
    assert "example.co.jp: internal" in out
    assert "Summary" not in out  # one message: no summary
    assert err == ""


def test_japanese_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "pdf.eml"
    path.write_bytes(WITH_PDF)
    rc, out, _ = run(capsys, "--policy", DEFAULT, "--lang", "ja", str(path))
    assert rc == 0
    assert "差出人: tanaka@example.co.jp → 宛先 1 件  (エンベロープ: To/Cc/Bcc)" in out
    assert "件名: お見積書の送付" in out
    assert "判定: 送信 (問題なし) + 添付ファイルのパスワード付き ZIP 化" in out
    assert "適用されたルール:" in out and "protect-attachments" in out
    assert "検出事項:" in out
    assert "暗号化されていない添付ファイル" in out  # the check's Japanese reason
    assert "添付ファイル:\n    御見積書.pdf [pdf, " in out
    assert "]: 暗号化なし" in out
    assert "customer-a.co.jp: 未確認 (送信履歴なし)" in out


def test_lang_from_environment(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "m.eml"
    path.write_bytes(INTERNAL)
    monkeypatch.delenv("LC_ALL", raising=False)
    monkeypatch.delenv("LC_MESSAGES", raising=False)
    monkeypatch.setenv("LANG", "ja_JP.UTF-8")
    assert "判定: 送信 (問題なし)" in run(capsys, "--policy", DEFAULT, str(path))[1]
    monkeypatch.setenv("LC_ALL", "C.UTF-8")
    assert "Decision: PASS" in run(capsys, "--policy", DEFAULT, str(path))[1]


@pytest.mark.parametrize(
    ("raw", "action", "transforms", "rules"),
    [
        (MASS_BCC, "pass", ["bcc"], ["bulk-to-bcc"]),
        (MULTI_COMPANY, "confirm", [], ["several-companies-visible"]),
        (WITH_PDF, "pass", ["zip"], ["protect-attachments"]),
        (WITH_ZIP, "pass", [], []),  # already an AES zip: nothing to do
        (INTERNAL, "pass", [], []),
    ],
    ids=["mass", "multi", "pdf", "aes-zip", "internal"],
)
def test_json_decisions(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    raw: bytes,
    action: str,
    transforms: list[str],
    rules: list[str],
) -> None:
    path = tmp_path / "m.eml"
    path.write_bytes(raw)
    rc, out, err = run(capsys, "--policy", DEFAULT, "--json", str(path))
    assert rc == 0, err
    (obj,) = jsonl(out)
    assert_schema(obj)
    assert obj["file"] == str(path)
    assert (obj["decision"]["action"], obj["decision"]["transforms"], obj["decision"]["rules"]) == (
        action,
        transforms,
        rules,
    )


def test_json_details(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "zip.eml"
    path.write_bytes(WITH_ZIP)
    (obj,) = jsonl(run(capsys, "--policy", DEFAULT, "--json", str(path))[1])
    codes = {f["code"] for f in obj["findings"]}
    assert {"attachment.present", "attachment.encrypted", "recipient.external"} <= codes
    assert "attachment.unencrypted" not in codes
    (att,) = obj["attachments"]
    assert att["filename"] == "資料.zip" and att["encrypted"] is True
    assert obj["recipients"]["to"] == ["hanako.yamada@customer-a.co.jp"]
    assert obj["domains"]["customer-a.co.jp"]["class"] == "unchecked"
    assert obj["envelope"]["mail_from"] == "tanaka@example.co.jp"
    assert obj["message"]["subject"] == "資料送付"
    assert obj["message"]["from"] == ["tanaka@example.co.jp"]


def test_options_and_fired_in_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "m.eml"
    path.write_bytes(MASS_BCC)
    (obj,) = jsonl(run(capsys, "--policy", DEFAULT, "--json", str(path))[1])
    assert obj["decision"]["options"] == {
        "bcc": {
            "to_placeholder": "undisclosed",
            "keep_internal_visible": True,
            "internal": ["example.co.jp", "*.example.co.jp"],
        }
    }
    assert obj["decision"]["fired"] == [
        {"rule": "bulk-to-bcc", "actions": ["bcc"], "when": ["recipient.visible_external >= 10"]}
    ]
    assert obj["recipients"]["external_parties"] == 12


# ---- organisation from the command line -----------------------------------------------


def test_builtin_policy_and_internal_flag(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MAILGUARD_POLICY", raising=False)
    path = tmp_path / "m.eml"
    path.write_bytes(INTERNAL)
    # without any organisation, colleagues are "external"
    rc, out, err = run(capsys, "--json", str(path))
    (obj,) = jsonl(out)
    assert obj["recipients"]["external_parties"] == 1
    assert "recipient.external" in {f["code"] for f in obj["findings"]}
    rc, out, err = run(capsys, str(path))
    assert rc == 0
    assert "note: no internal domains" in err
    _rc, out, err = run(
        capsys, "--json", "--internal", "example.co.jp", "--internal", "*.example.co.jp", str(path)
    )
    (obj,) = jsonl(out)
    assert obj["findings"] == [] and obj["decision"]["action"] == "pass"


def test_trusted_flag_replaces_policy_list(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "m.eml"
    path.write_bytes(WITH_PDF)
    (obj,) = jsonl(
        run(capsys, "--policy", DEFAULT, "--json", "--trusted", "customer-a.co.jp", str(path))[1]
    )
    assert obj["domains"]["customer-a.co.jp"]["class"] == "trusted"
    assert "domain.external" not in {f["code"] for f in obj["findings"]}


def test_policy_from_environment(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    pol = tmp_path / "hold.toml"
    pol.write_text(
        '[organization]\ninternal_domains = ["example.co.jp"]\n[[rule]]\n'
        'name = "cool"\nwhen = "recipient.external"\naction = "hold"\nhold_for = "2m"\n'
    )
    monkeypatch.setenv("MAILGUARD_POLICY", str(pol))
    path = tmp_path / "m.eml"
    path.write_bytes(WITH_PDF)
    (obj,) = jsonl(run(capsys, "--json", str(path))[1])
    assert obj["decision"]["action"] == "hold" and obj["decision"]["hold_for_seconds"] == 120


# ---- envelope ------------------------------------------------------------------------


def test_envelope_headers_and_hidden_recipients(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    raw = mail(
        to=["hanako.yamada@customer-a.co.jp"],
        extra_headers=[
            "Return-Path: <bounce@example.co.jp>",
            "X-Envelope-From: <tanaka@example.co.jp>",
            "X-Envelope-To: hanako.yamada@customer-a.co.jp, secret@rival.co.jp",
        ],
    )
    path = tmp_path / "m.eml"
    path.write_bytes(raw)
    _rc, out, _ = run(capsys, "--policy", DEFAULT, "--json", str(path))
    (obj,) = jsonl(out)
    assert obj["envelope"]["mail_from"] == "tanaka@example.co.jp"
    assert obj["envelope"]["rcpt_tos"] == ["hanako.yamada@customer-a.co.jp", "secret@rival.co.jp"]
    hidden = next(f for f in obj["findings"] if f["code"] == "recipient.hidden")
    assert hidden["evidence"] == ["secret@rival.co.jp"]
    _rc, out, _ = run(capsys, "--policy", DEFAULT, "--lang", "en", str(path))
    assert "(envelope from X-Envelope-To)" in out


def test_return_path_null_sender_and_overrides(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    raw = mail(to=["a@customer-a.co.jp"], extra_headers=["Return-Path: <>"])
    path = tmp_path / "m.eml"
    path.write_bytes(raw)
    (obj,) = jsonl(run(capsys, "--policy", DEFAULT, "--json", str(path))[1])
    assert obj["envelope"]["mail_from"] == ""
    (obj,) = jsonl(
        run(
            capsys,
            "--policy",
            DEFAULT,
            "--json",
            "--mail-from",
            "x@example.co.jp",
            "--rcpt",
            "a@customer-a.co.jp",
            "--rcpt",
            "b@other.co.jp",
            str(path),
        )[1]
    )
    assert obj["envelope"] == {
        "mail_from": "x@example.co.jp",
        "rcpt_tos": ["a@customer-a.co.jp", "b@other.co.jp"],
        "mail_options": [],
        "queue_id": "-",
    }


def test_sender_scoped_rule_uses_envelope_sender(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pol = tmp_path / "p.toml"
    pol.write_text(
        '[organization]\ninternal_domains = ["example.co.jp", "*.example.co.jp"]\n'
        '[groups]\nsales = ["*@sales.example.co.jp"]\n'
        '[[rule]]\nname = "sales-cool-down"\nwhen = "recipient.external"\naction = "hold"\n'
        'senders = ["group:sales"]\n'
        '[[exception]]\nsenders = ["boss@sales.example.co.jp"]\n'
    )
    path = tmp_path / "m.eml"
    path.write_bytes(mail(frm="yamada@sales.example.co.jp", to=["a@customer-a.co.jp"]))
    (obj,) = jsonl(run(capsys, "--policy", str(pol), "--json", str(path))[1])
    assert obj["decision"]["action"] == "hold"
    (obj,) = jsonl(
        run(
            capsys,
            "--policy",
            str(pol),
            "--json",
            "--mail-from",
            "boss@sales.example.co.jp",
            str(path),
        )[1]
    )
    assert obj["decision"]["action"] == "pass"
    assert obj["decision"]["exempted"] == ["sales-cool-down"]
    _rc, out, _ = run(
        capsys,
        "--policy",
        str(pol),
        "--lang",
        "ja",
        "--mail-from",
        "boss@sales.example.co.jp",
        str(path),
    )
    assert "例外により適用外: sales-cool-down" in out


def test_sjis_display_names_survive(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    head = (
        b"From: "
        + sjis_raw("田中")
        + b" <tanaka@example.co.jp>\r\nTo: "
        + sjis_raw("山田様")
        + b" <yamada@customer-a.co.jp>, "
        + sjis_raw("佐藤様")
        + b" <sato@customer-b.co.jp>\r\nSubject: "
        + sjis_raw("ご案内")
        + b"\r\n\r\nbody\r\n"
    )
    path = tmp_path / "sjis.eml"
    path.write_bytes(head)
    (obj,) = jsonl(run(capsys, "--policy", DEFAULT, "--json", str(path))[1])
    assert obj["recipients"]["visible_external"] == [
        "yamada@customer-a.co.jp",
        "sato@customer-b.co.jp",
    ]
    assert obj["decision"]["action"] == "confirm"


# ---- many messages ---------------------------------------------------------------------


def test_directory_replay_summary(eml_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = run(capsys, "--policy", DEFAULT, "--lang", "en", str(eml_dir))
    assert rc == 0, err
    labels = [ln[3:] for ln in out.splitlines() if ln.startswith("== ")]
    assert labels == [
        str(eml_dir / p)
        for p in (
            "01-mass.eml",
            "02-multi.eml",
            "2026/11/03-pdf.eml",
            "2026/11/04-zip.eml",
            "2026/11/05-internal",
        )
    ]  # name order, README.txt and the hidden file skipped
    summary = out[out.index("Summary:") :]
    assert summary.startswith("Summary: 5 messages (skipped (not mail) 1)\n")
    assert row(summary, "PASS") == 4
    assert row(summary, "CONFIRM") == 1
    assert row(summary, "HOLD") == row(summary, "APPROVE") == row(summary, "REJECT") == 0
    assert row(summary, "rewrite To/Cc to Bcc") == 1
    assert row(summary, "zip attachments with a password") == 1
    assert "By rule:" in summary
    assert row(summary, "bulk-to-bcc") == 1
    assert row(summary, "several-companies-visible") == 1
    assert row(summary, "protect-attachments") == 1


def row(summary: str, label: str) -> int:
    m = re.search(rf"^ +{re.escape(label)} +(\d+)$", summary, re.M)
    assert m, (label, summary)
    return int(m.group(1))


def test_directory_replay_japanese_quiet(eml_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(capsys, "--policy", DEFAULT, "--lang", "ja", "-q", str(eml_dir))
    assert rc == 0
    assert out.startswith("集計: 5 通 (スキップ (メールではない) 1)\n")
    assert "送信確認" in out and "Bcc 変換" in out and "ルール別:" in out
    assert "== " not in out


def test_directory_json_lines_summary_on_stderr(
    eml_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, out, err = run(capsys, "--policy", DEFAULT, "--json", "--lang", "en", str(eml_dir))
    assert rc == 0
    objs = jsonl(out)  # stdout is pure JSON Lines
    assert len(objs) == 5
    for obj in objs:
        assert_schema(obj)
    assert err.startswith("Summary: 5 messages")


MBOX = (
    b"From tanaka@example.co.jp Tue Nov 17 10:00:00 2026\n"
    + MULTI_COMPANY.replace(b"\r\n", b"\n")
    + b">From the desk of Tanaka\n"  # mboxrd-escaped body line
    + b"\nFrom - Tue Nov 17 10:05:00 2026\n"  # Thunderbird's Sent folder
    + INTERNAL.replace(b"\r\n", b"\n")
    + b"\nFrom sato@example.co.jp Tue Nov 17 10:06:00 2026\n"
    + mail(frm="", to=["x@customer-a.co.jp"]).replace(b"From: \r\n", b"").replace(b"\r\n", b"\n")
)


def test_mbox(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "Sent"
    path.write_bytes(MBOX)
    rc, out, err = run(capsys, "--policy", DEFAULT, "--json", str(path))
    assert rc == 0, err
    objs = jsonl(out)
    assert [o["file"] for o in objs] == [f"{path}#1", f"{path}#2", f"{path}#3"]
    first, second, third = objs
    assert first["decision"]["action"] == "confirm"
    # the escaped ">From " line is unescaped, and the separator's blank line is not part of it
    assert first["message"]["size"] == len(MULTI_COMPANY.replace(b"\r\n", b"\n")) + len(
        b"From the desk of Tanaka\n"
    )
    assert second["envelope"]["mail_from"] == "tanaka@example.co.jp"  # "From -": From: header
    assert third["envelope"]["mail_from"] == "sato@example.co.jp"  # no From:, "From " line
    assert "Summary: 3 messages" in err or "集計: 3 通" in err


def test_maildir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    md = tmp_path / "Maildir"
    for sub in ("cur", "new", "tmp", ".Sent/cur", ".Sent/new", ".Sent/tmp"):
        (md / sub).mkdir(parents=True)
    (md / "cur" / "1700000000.M1P1.host:2,S").write_bytes(MASS_BCC)
    (md / "new" / "1700000001.M2P1.host").write_bytes(WITH_PDF)
    (md / "tmp" / "1700000002.M3P1.host").write_bytes(b"From: half-written")
    (md / ".Sent" / "cur" / "1700000003.M4P1.host:2,S").write_bytes(MULTI_COMPANY)
    (md / "dovecot-uidlist").write_text("3 V1 N4\n")
    rc, out, err = run(capsys, "--policy", DEFAULT, "--json", "--lang", "en", str(md))
    assert rc == 0, err
    files = [o["file"] for o in jsonl(out)]
    assert files == [
        str(md / ".Sent" / "cur" / "1700000003.M4P1.host:2,S"),
        str(md / "cur" / "1700000000.M1P1.host:2,S"),
        str(md / "new" / "1700000001.M2P1.host"),
    ]
    assert err.startswith("Summary: 3 messages (skipped (not mail) 1)")


# ---- DNS and history -------------------------------------------------------------------

ZONE = """\
$ORIGIN test.
$TTL 300
@            SOA   ns.test. hostmaster.test. 1 3600 600 86400 120
@            NS    ns.test.
customer     MX    10 mail.customer
mail.customer A    192.0.2.1
nomail       MX    0 .
"""


@pytest.fixture
def dns_port() -> Iterator[int]:
    """A real authoritative DNS server for zone `test.` on loopback UDP, in a thread."""
    zone = dns.zone.from_text(ZONE, origin="test.", relativize=False)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                data, addr = sock.recvfrom(4096)
            except TimeoutError:
                continue
            q = dns.message.from_wire(data)
            qname, rdtype = q.question[0].name, q.question[0].rdtype
            r = dns.message.make_response(q)
            r.flags |= dns.flags.AA
            node = zone.get_node(qname)
            rds = node.get_rdataset(dns.rdataclass.IN, rdtype) if node else None
            if rds is not None:
                rrset = dns.rrset.RRset(qname, dns.rdataclass.IN, rdtype)
                rrset.update(rds)
                r.answer.append(rrset)
            elif node is None:
                r.set_rcode(dns.rcode.NXDOMAIN)
            sock.sendto(r.to_wire(), addr)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield sock.getsockname()[1]
    stop.set()
    t.join(timeout=2)
    sock.close()


def test_dns_findings(tmp_path: Path, capsys: pytest.CaptureFixture[str], dns_port: int) -> None:
    path = tmp_path / "m.eml"
    path.write_bytes(mail(to=["a@customer.test", "b@nomail.test", "c@missing.test"]))
    # offline: no DNS findings
    (obj,) = jsonl(run(capsys, "--policy", DEFAULT, "--json", str(path))[1])
    assert not {f["code"] for f in obj["findings"]} & {"domain.nonexistent", "domain.null_mx"}
    rc, out, err = run(
        capsys,
        "--policy",
        DEFAULT,
        "--json",
        "--dns",
        "--dns-server",
        f"127.0.0.1:{dns_port}",
        str(path),
    )
    assert rc == 0, err
    (obj,) = jsonl(out)
    assert obj["domains"]["customer.test"]["dns"] == "ok"
    assert obj["domains"]["nomail.test"]["dns"] == "null_mx"
    assert obj["domains"]["missing.test"]["class"] == "nonexistent"
    codes = {f["code"]: f for f in obj["findings"]}
    assert codes["domain.nonexistent"]["evidence"] == ["missing.test"]
    assert codes["domain.null_mx"]["evidence"] == ["nomail.test"]
    assert obj["decision"]["action"] == "reject"
    assert "nonexistent-domain" in obj["decision"]["rules"]
    assert obj["decision"]["reject_message"].startswith("Recipient domain does not exist")


def test_history_store_first_time(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = tmp_path / "history.db"
    with DomainHistory(store) as h:
        h.record(["customer-a.co.jp"], datetime(2026, 11, 1, tzinfo=UTC))
    path = tmp_path / "m.eml"
    path.write_bytes(mail(to=["a@customer-a.co.jp", "b@newcomer.co.jp"]))
    rc, out, err = run(capsys, "--policy", DEFAULT, "--json", "--store", str(store), str(path))
    assert rc == 0, err
    (obj,) = jsonl(out)
    assert obj["domains"]["customer-a.co.jp"]["class"] == "known"
    assert obj["domains"]["newcomer.co.jp"]["class"] == "first_time"
    first = next(f for f in obj["findings"] if f["code"] == "domain.first_time")
    assert first["evidence"] == ["newcomer.co.jp"]
    assert "first-time-domain" in obj["decision"]["rules"]
    rc, out, err = run(
        capsys, "--policy", DEFAULT, "--lang", "ja", "--store", str(store), str(path)
    )
    assert "newcomer.co.jp: 初めての送信先" in out
    assert "customer-a.co.jp: 送信実績あり" in out


# ---- exit codes ------------------------------------------------------------------------


def test_missing_path_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ok = tmp_path / "m.eml"
    ok.write_bytes(INTERNAL)
    rc, out, err = run(capsys, str(ok), str(tmp_path / "nope.eml"))
    assert rc == 2 and out == ""
    assert err == f"mailguard check: {tmp_path}/nope.eml: no such file or directory\n"


def test_bad_policy_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pol = tmp_path / "bad.toml"
    pol.write_text('[[rule]]\nname = "x"\nwhen = "domain.first_time"\naction = "zipp"\n')
    path = tmp_path / "m.eml"
    path.write_bytes(INTERNAL)
    rc, out, err = run(capsys, "--policy", str(pol), str(path))
    assert rc == 2 and out == ""
    assert err == (
        f"mailguard check: {pol}:4: rule[1].action: unknown action 'zipp' "
        "(expected pass, bcc, zip, hold, confirm, approve, reject)\n"
    )


def test_bad_internal_flag_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "m.eml"
    path.write_bytes(INTERNAL)
    rc, _, err = run(capsys, "--internal", "@example.co.jp", str(path))
    assert rc == 2
    assert err == "mailguard check: --internal: '@example.co.jp' is not a domain name\n"


def test_missing_store_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "m.eml"
    path.write_bytes(INTERNAL)
    rc, _, err = run(capsys, "--store", str(tmp_path / "none.db"), str(path))
    assert rc == 2
    assert err == f"mailguard check: {tmp_path}/none.db: --store: no such store file\n"


def test_unreadable_file_exit_2(eml_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = eml_dir / "00-dangling.eml"
    bad.symlink_to(eml_dir / "gone.eml")  # listed by the walk, cannot be read
    rc, out, err = run(capsys, "--policy", DEFAULT, "-q", "--lang", "en", str(eml_dir))
    assert rc == 2
    assert f"mailguard check: {bad}: No such file or directory" in err
    assert out.startswith("Summary: 5 messages (skipped (not mail) 1, unreadable 1)")


def test_empty_directory_and_garbage(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "d"
    d.mkdir()
    (d / "photo.jpg").write_bytes(b"\xff\xd8\xff\xe0garbage")
    rc, out, _ = run(capsys, "--policy", DEFAULT, "--lang", "en", str(d))
    assert rc == 0
    assert out.startswith("Summary: 0 messages (skipped (not mail) 1)")
    # a file named on the command line that is not mail is refused, never judged "pass"
    # (issue 13; it used to be analysed as a header-less message and passed)
    rc, out, err = run(capsys, "--policy", DEFAULT, "--json", str(d / "photo.jpg"))
    assert rc == 2 and out == ""
    assert f"not an e-mail message: {d / 'photo.jpg'}" in err


def test_console_script_subprocess(tmp_path: Path) -> None:
    path = tmp_path / "m.eml"
    path.write_bytes(MULTI_COMPANY)
    env = {**os.environ, "LANG": "ja_JP.UTF-8", "LC_ALL": "", "LC_MESSAGES": ""}
    env.pop("MAILGUARD_POLICY", None)
    p = subprocess.run(
        [sys.executable, "-m", "mailguard", "check", "--policy", DEFAULT, str(path)],
        capture_output=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert p.returncode == 0, p.stderr
    assert "判定: 送信確認".encode() in p.stdout
    p = subprocess.run(
        [sys.executable, "-m", "mailguard", "check", str(tmp_path / "x.eml")],
        capture_output=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert p.returncode == 2
    assert b"no such file or directory" in p.stderr


def test_jis_helper_is_really_iso_2022_jp() -> None:
    assert jis("田中").startswith("=?iso-2022-jp?b?")
