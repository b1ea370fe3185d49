"""analyze_message / analyze_view: the pure parse → checks → policy pipeline the server shares."""

from __future__ import annotations

import json
from pathlib import Path

from mailguard.analysis import analyze_message, analyze_view
from mailguard.envelope import Envelope
from mailguard.message import MessageView
from mailguard.policy import Gate, decide, load_policy
from tests.test_check_cli_mail import MULTI_COMPANY, WITH_PDF

ROOT = Path(__file__).resolve().parent.parent
POLICY = load_policy(ROOT / "policies" / "default.toml")


def test_analysis_matches_decide_and_is_json() -> None:
    env = Envelope("tanaka@example.co.jp", ["hanako.yamada@customer-a.co.jp", "bcc@rival.co.jp"])
    a = analyze_message(WITH_PDF, env, POLICY)
    assert a.decision == decide(POLICY, a.findings, env)
    assert a.decision.gate is Gate.PASS and a.decision.transforms == ("zip",)
    codes = [f.code for f in a.findings]
    assert "recipient.hidden" in codes  # the real envelope names someone the headers do not
    obj = a.to_json(file="x.eml")
    json.dumps(obj, ensure_ascii=False)  # serialisable as is
    assert obj["file"] == "x.eml"
    assert obj["envelope"]["rcpt_tos"] == env.rcpt_tos
    assert obj["recipients"]["hidden"] == ["bcc@rival.co.jp"]
    assert obj["attachments"][0]["filename"] == "御見積書.pdf"
    assert obj["message"]["defects"] == [] and obj["message"]["limited"] is False


def test_history_and_dns_are_passed_through() -> None:
    env = Envelope(
        "tanaka@example.co.jp", ["hanako.yamada@customer-a.co.jp", "suzuki@customer-b.co.jp"]
    )
    view = MessageView.parse(MULTI_COMPANY, env)
    a = analyze_view(
        view,
        env,
        POLICY,
        history={"customer-a.co.jp": 1},
        dns={"customer-a.co.jp": "ok", "customer-b.co.jp": "nonexistent"},
    )
    assert a.decision.gate is Gate.REJECT
    assert a.decision.transforms == ()
    assert "nonexistent-domain" in a.decision.rules
    domains = a.to_json()["domains"]
    assert domains["customer-a.co.jp"]["class"] == "known"
    assert domains["customer-b.co.jp"]["class"] == "nonexistent"


def test_garbage_never_raises() -> None:
    for raw in (
        b"",
        b"\x00\xff" * 100,
        b"Content-Type: multipart/mixed; boundary=x\r\n\r\n--x\r\n" * 50,
    ):
        a = analyze_message(raw, Envelope("", []), POLICY)
        assert a.decision.gate in (Gate.PASS, Gate.CONFIRM)
