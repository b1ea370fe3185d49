"""Issue 11, promise 3 — a zip-password notice is tied to its message: it goes out only after that
message was accepted upstream, and never for mail that did not go. Driven through `mailguard
serve` (tests/e2e_support.py); the password notice is recognised at the receiving server by its
`X-MailGuard-Notice: zip-password` header.

* zip + confirm, password_to = "recipients", password_delay 1 s (shorter than the confirmation):
  cancel on the page → no password notice, waited well past the delay; confirm on the page →
  the password arrives after the mail.
* zip + pass: the password arrives after the mail; the upstream refuses the mail (550 or 451,
  scripted by the sink for messages carrying an X-E2E-Refuse header) → no password ever.

Assumed: the zip rewrite keeps the message's other headers (X-E2E-Refuse survives it); the
password notice's envelope recipients are the mail's external recipients.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from e2e_support import Got, Guard, Sent, pdf_bytes, policy, stays_false

DELAY = 1.0
QUIET = DELAY + 2.0  # how long "never" is watched, from the moment the mail was decided

ZIP_RULE = f"""
[[rule]]
name = "zip-out"
when = "attachment.unencrypted and recipient.external"
action = "zip"
options = {{ method = "aes", password_to = "recipients", password_delay = "{int(DELAY)}s" }}
"""
CONFIRM_RULE = """
[[rule]]
name = "confirm-out"
when = "recipient.external"
action = "confirm"
"""
RCPT = "Tanaka <tanaka@customer-a.co.jp>"


def send_attachment(g: Guard, subject: str, headers: dict[str, str] | None = None) -> Sent:
    return g.send(
        to=[RCPT],
        subject=subject,
        attachments=[("price-list.pdf", pdf_bytes(4000), "application/pdf")],
        headers=headers,
    )


def passwords(g: Guard) -> list[Got]:
    return g.notices("zip-password")


def assert_zipped(mail: Got) -> None:
    types = [p.get_content_type() for p in mail.msg.walk()]
    assert any("zip" in t for t in types), f"the delivered mail carries no zip: {types}"


def test_cancelled_on_the_page_no_password_ever(tmp_path: Path) -> None:
    with Guard(tmp_path, policy_text=policy(ZIP_RULE + CONFIRM_RULE)) as g:
        sent = send_attachment(g, "zip then cancel")
        assert sent.held_id, f"{sent.code} {sent.text}"
        done = g.post(g.link(g.wait_notice("confirm", about=sent)), "cancel")
        assert done.status == 200, done.text[:500]
        assert stays_false(lambda: passwords(g), QUIET), (
            "a password went out for a cancelled message:\n" + passwords(g)[0].subject
        )
        assert g.mail_with(sent.message_id) is None


def test_confirmed_password_arrives_after_the_mail(tmp_path: Path) -> None:
    with Guard(tmp_path, policy_text=policy(ZIP_RULE + CONFIRM_RULE)) as g:
        sent = send_attachment(g, "zip then confirm")
        assert sent.held_id, f"{sent.code} {sent.text}"
        notice = g.wait_notice("confirm", about=sent)
        g.page(g.link(notice))  # the sender reads the page for a moment, longer than the delay
        assert stays_false(lambda: passwords(g), DELAY + 0.5), (
            "the password went out while the mail still waited for confirmation:\n"
            + passwords(g)[0].subject
        )
        done = g.post(g.link(notice), "send")
        assert done.status == 200, done.text[:500]
        mail = g.wait_mail(sent)
        assert_zipped(mail)
        pw = g.wait_notice("zip-password")
        assert pw.at >= mail.at, "the password arrived before the mail"
        assert "tanaka@customer-a.co.jp" in pw.rcpt_tos
        assert len(passwords(g)) == 1


def test_passed_password_arrives_after_the_mail(tmp_path: Path) -> None:
    with Guard(tmp_path, policy_text=policy(ZIP_RULE)) as g:
        sent = send_attachment(g, "zip and pass")
        assert sent.relayed, f"{sent.code} {sent.text}"
        mail = g.wait_mail(sent, timeout=5)
        assert_zipped(mail)
        pw = g.wait_notice("zip-password")
        assert pw.at >= mail.at, "the password arrived before the mail"
        assert "tanaka@customer-a.co.jp" in pw.rcpt_tos


@pytest.mark.parametrize(
    "refusal", ["550 5.7.1 refused by the e2e sink", "451 4.3.0 e2e sink: try again later"]
)
def test_upstream_refuses_the_mail_no_password_ever(tmp_path: Path, refusal: str) -> None:
    with Guard(tmp_path, policy_text=policy(ZIP_RULE)) as g:
        sent = send_attachment(g, "zip, refused upstream", {"X-E2E-Refuse": refusal})
        assert sent.code == int(refusal[:3]), f"{sent.code} {sent.text}"
        assert g.refused, "the sink never saw the mail"
        assert stays_false(lambda: passwords(g), QUIET), (
            "a password went out for mail the upstream refused:\n" + passwords(g)[0].subject
        )
