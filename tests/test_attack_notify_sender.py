"""Issue 12 items 2 and 4 — the guard's notices cannot be aimed at third parties.

The attack: whoever can hand mail to the guard (an authenticated user forging MAIL FROM, an
internal server on the FILTER network, a bounce) chooses the envelope sender, and every notice —
the held/confirm link, the outcome, the zip password, the bounce — went to that address as a
"From: MailGuard" mail of the company with working send/cancel links: a backscatter and phishing
relay. Performed against `mailguard serve` (tests/e2e_support.py); what reaches the receiving
server is what the victim or the admin would get.

* a foreign MAIL FROM (victim@thirdparty.example) on a confirm, a hold whose delivery fails (the
  bounce) and a zipped pass (the password): nothing ever reaches the victim; the admin
  (notify.admin) gets a notice of kind `unowned-sender` with the link / the bounce / the password,
  and the message stays held until someone with the link acts;
* MAIL FROM:<> on a confirm: the admin gets a `null-sender` notice with the link, and when the
  deadline passes, the outcome (before: nobody was told and the message expired silently);
* a sender in `notify.senders` or an internal domain still gets its own notices;
* without notify.admin a foreign sender's message is held and nobody is mailed.

Each test fails on the code before the fix: there the victim received the notices.
"""

from __future__ import annotations

from pathlib import Path

from e2e_support import (
    INTERNAL,
    Got,
    Guard,
    build_message,
    pdf_bytes,
    policy,
    stays_false,
    wait_for,
)

ADMIN = f"postmaster@{INTERNAL}"
VICTIM = "victim@thirdparty.example"
RCPT = "tanaka@customer-a.co.jp"

CONFIRM = """
[[rule]]
name = "confirm-out"
when = "recipient.external"
action = "confirm"
"""


def cfg(**notify: object) -> dict[str, dict[str, object]]:
    """notify.* keys, and an admin token long enough for any version of the token rule."""
    return {"notify": dict(notify), "web": {"admin_token": "e2e-admin-token-" + "y" * 32}}


def to_whom(g: Guard, addr: str) -> list[Got]:
    """Everything the upstream accepted for `addr` (the guard's notices included)."""
    return [m for m in g.received if addr.lower() in (r.lower() for r in m.rcpt_tos)]


def send_as(g: Guard, mail_from: str, subject: str, **kw: object) -> tuple[int, str]:
    """Header From: an internal user; envelope sender: `mail_from` (forged, or <>)."""
    m = build_message(sender=f"yamada@{INTERNAL}", to=[RCPT], subject=subject, **kw)  # type: ignore[arg-type]
    return g.send_bytes(bytes(m), mail_from, [RCPT])


def held_id(text: str) -> str:
    assert "held as " in text, text
    return text.split("held as ", 1)[1].split()[0]


def test_forged_sender_never_gets_the_link_the_admin_does(tmp_path: Path) -> None:
    extra = cfg(admin=ADMIN)
    with Guard(tmp_path, policy_text=policy(CONFIRM), config_extra=extra) as g:
        code, text = send_as(g, VICTIM, "forged confirm")
        assert code == 250, text
        msg_id = held_id(text)
        notice = g.wait_notice("unowned-sender")
        assert notice.rcpt_tos == [ADMIN]
        assert VICTIM in notice.text and "not an address of the organisation" in notice.text
        assert stays_false(lambda: to_whom(g, VICTIM), 1.5), (
            "the forged sender got the guard's mail:\n" + to_whom(g, VICTIM)[0].text[:600]
        )
        assert g.state_of(msg_id) == "held"  # held until someone with the link acts
        assert g.mails() == []
        done = g.post(g.link(notice), "send")  # the admin's link works
        assert done.status == 200, done.text[:400]
        wait_for(lambda: g.mails(), what="the released mail")
        assert to_whom(g, VICTIM) == []


def test_forged_sender_bounce_goes_to_the_admin(tmp_path: Path) -> None:
    hold = '[[rule]]\nname = "hold-out"\nwhen = "recipient.external"\naction = "hold"\n'
    hold += 'hold_for = "1s"\n'
    extra = cfg(admin=ADMIN)
    with Guard(tmp_path, policy_text=policy(hold), config_extra=extra) as g:
        refuse = {"X-E2E-Refuse": "550 5.1.1 <tanaka@customer-a.co.jp>: no such user"}
        code, text = send_as(g, VICTIM, "forged hold, refused", headers=refuse)
        assert code == 250, text
        dsn = g.wait_notice("dsn")
        assert dsn.rcpt_tos == [ADMIN] and dsn.mail_from in ("", "<>")
        assert "not one the organisation owns" in dsn.text
        assert g.wait_notice("unowned-sender").rcpt_tos == [ADMIN]  # the held notice
        assert stays_false(lambda: to_whom(g, VICTIM), 1.0)


def test_forged_sender_zip_password_goes_to_the_admin(tmp_path: Path) -> None:
    zip_rule = """
[[rule]]
name = "zip-out"
when = "attachment.unencrypted and recipient.external"
action = "zip"
options = { method = "aes", password_to = "sender" }
"""
    extra = cfg(admin=ADMIN)
    with Guard(tmp_path, policy_text=policy(zip_rule), config_extra=extra) as g:
        pdf = [("price-list.pdf", pdf_bytes(4000), "application/pdf")]
        code, text = send_as(g, VICTIM, "forged zip", attachments=pdf)
        assert code == 250 and "held" not in text, text
        wait_for(lambda: g.mails(), what="the zipped mail")
        pw = g.wait_notice("unowned-sender")
        assert pw.rcpt_tos == [ADMIN] and "Password:" in pw.text
        assert stays_false(lambda: to_whom(g, VICTIM), 1.5), "the password went to the forger"
        assert g.notices("zip-password") == []


def test_null_sender_admin_gets_the_link_and_the_expiry(tmp_path: Path) -> None:
    rule = CONFIRM + 'confirm_timeout = "2s"\n'
    extra = cfg(admin=ADMIN)
    with Guard(tmp_path, policy_text=policy(rule), config_extra=extra) as g:
        code, text = send_as(g, "", "null sender confirm")
        assert code == 250, text
        msg_id = held_id(text)
        link = g.wait_notice("null-sender")
        assert link.rcpt_tos == [ADMIN] and "/m/" in link.text
        assert "MAIL FROM:<>" in link.text
        g.wait_state(msg_id, "expired")
        outcome = wait_for(
            lambda: [n for n in g.notices("null-sender") if n is not link and "/m/" not in n.text],
            what="the expiry notice for the admin",
        )[0]
        assert outcome.rcpt_tos == [ADMIN] and outcome.mail_from in ("", "<>")
        assert all(r == [ADMIN] for r in (n.rcpt_tos for n in g.notices()))


def test_owned_senders_still_get_their_notices(tmp_path: Path) -> None:
    extra = cfg(admin=ADMIN, senders=["*@Group-Company.example"])
    with Guard(tmp_path, policy_text=policy(CONFIRM), config_extra=extra) as g:
        code, text = send_as(g, "Sato@group-company.example", "listed sender")
        assert code == 250, text
        code, text = send_as(g, f"yamada@{INTERNAL}", "internal sender")
        assert code == 250, text
        got = wait_for(lambda: len(g.notices("confirm")) >= 2 and g.notices("confirm"))
        assert sorted(r for n in got for r in n.rcpt_tos) == [
            "Sato@group-company.example",
            f"yamada@{INTERNAL}",
        ]
        assert g.notices("unowned-sender") == []


def test_without_an_admin_nobody_is_mailed_and_the_message_stays_held(tmp_path: Path) -> None:
    with Guard(tmp_path, policy_text=policy(CONFIRM), config_extra=cfg()) as g:
        code, text = send_as(g, VICTIM, "forged, no admin")
        assert code == 250, text
        assert stays_false(lambda: g.received, 1.5), g.received[0].text[:400]
        assert g.state_of(held_id(text)) == "held"
        assert "unowned-sender" in g.log_text()
