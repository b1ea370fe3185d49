"""Issue 13 at the user's boundary: `mailguard serve` with the shipped default policy (our
domain put in) holds what it could not inspect or cannot zip, instead of relaying it; a weak
policy is warned about in the server's log at start; a look-alike that extends a partner's
name is held for confirmation. Each case is also checked with `mailguard check --json`."""

from __future__ import annotations

import sys
import uuid
from pathlib import Path

import pytest
from e2e_support import INTERNAL, SENDER, Guard, check_json, policy, stays_false

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))

from bench_depth import forward_chain  # noqa: E402
from test_attachments_inline import PDF, uuencode  # noqa: E402

DEFAULT = (
    (ROOT / "policies" / "default.toml")
    .read_text("utf-8")
    .replace(
        'internal_domains = ["example.co.jp", "*.example.co.jp"]',
        f'internal_domains = ["{INTERNAL}"]',
    )
    .replace(
        'trusted_domains = ["example-group.co.jp"]', 'trusted_domains = ["fuji-trading.co.jp"]'
    )
)
RCPT = "tanaka@customer-a.co.jp"
WEB = {"web": {"admin_token": "e2e-admin-token-" + "t" * 32}}  # long enough for any config check


def with_headers(raw: bytes, subject: str, to: str = RCPT) -> tuple[bytes, str]:
    """Replace the generated message's top From/To/Subject; add a Message-ID."""
    mid = f"{uuid.uuid4().hex}@e2e.test"
    head, _, body = raw.partition(b"\r\n\r\n")
    keep = [
        ln
        for ln in head.split(b"\r\n")
        if not ln.lower().startswith((b"from:", b"to:", b"subject:", b"message-id:"))
    ]
    top = [
        f"From: {SENDER}".encode(),
        f"To: {to}".encode(),
        f"Subject: {subject}".encode(),
        f"Message-ID: <{mid}>".encode(),
    ]
    return b"\r\n".join(top + keep) + b"\r\n\r\n" + body, mid


@pytest.fixture(scope="module")
def guard(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    with Guard(tmp_path_factory.mktemp("i13"), policy_text=DEFAULT, config_extra=WEB) as g:
        yield g


def held(g: Guard, raw: bytes, mid: str, rcpt: str = RCPT) -> str:
    code, text = g.send_bytes(raw, SENDER, [rcpt])
    assert code == 250 and "held as" in text, text
    assert stays_false(lambda: g.mail_with(mid), 0.5), "relayed although it had to be confirmed"
    return text


def test_deep_forward_past_the_bound_is_held(guard: Guard) -> None:
    raw, mid = with_headers(forward_chain(1100), "deep forward")  # 2200 MIME levels > 2048
    held(guard, raw, mid)
    out = check_json(guard, raw, SENDER, [RCPT])
    assert "message.limit" in {f["code"] for f in out["findings"]}
    assert out["decision"]["action"] == "confirm"


def test_deep_forward_within_the_bound_finds_the_file(guard: Guard) -> None:
    raw, _ = with_headers(forward_chain(300), "forward chain 300")
    out = check_json(guard, raw, SENDER, [RCPT])
    assert [a["filename"] for a in out["attachments"]] == ["secret.pdf"]
    assert "message.limit" not in {f["code"] for f in out["findings"]}


def test_uuencoded_file_is_held(guard: Guard) -> None:
    body = b"Hello,\r\n\r\n" + uuencode("report.pdf", PDF)
    raw = (
        f"From: {SENDER}\r\nTo: {RCPT}\r\nSubject: uu\r\n".encode()
        + b"Message-ID: <uu-"
        + uuid.uuid4().hex.encode()
        + b"@e2e.test>\r\n\r\n"
        + body
    )
    mid = raw.split(b"Message-ID: <", 1)[1].split(b">", 1)[0].decode()
    held(guard, raw, mid)
    out = check_json(guard, raw, SENDER, [RCPT])
    assert out["attachments"][0]["inline"] == "uuencode"
    assert "attachment.inline" in {f["code"] for f in out["findings"]}


def test_lookalike_extending_a_partner_is_held(guard: Guard) -> None:
    rcpt = "sato@fuji-trading-co.jp"
    sent = guard.send(to=[rcpt], subject="lookalike extended")
    assert sent.held_id, sent.text
    rec = guard.decision_record(sent)
    assert "lookalike-domain" in rec["rules"]


def test_server_logs_policy_gaps_at_start(tmp_path: Path) -> None:
    weak = policy('[[rule]]\nname = "zip"\nwhen = "attachment.unencrypted"\naction = "zip"\n')
    with Guard(tmp_path, policy_text=weak, config_extra=WEB) as g:
        pass
    warned = [ln for ln in g.log_text().splitlines() if ": warning: message.limit:" in ln]
    assert warned and "policy.toml:" in warned[0], g.log_text()[-2000:]


def test_server_logs_no_gap_for_the_default(guard: Guard) -> None:
    assert ": warning: " not in guard.log_text()
