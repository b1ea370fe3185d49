"""Issue 12 item 4 (SMTPUTF8): a sender with a non-ASCII address, attacked through `mailguard
serve` (tests/e2e_support.py: a subprocess between an smtplib client and a receiving sink).

* upstream offers SMTPUTF8: the guard's notice to `山田@ourco.co.jp` is delivered (before the fix
  relay/smtp.py raised UnicodeEncodeError on the RCPT and the scheduler retried it for days), and
  a passed SMTPUTF8 message is relayed as it came, envelope and bytes;
* upstream without SMTPUTF8: the notice fails once and for good (550 5.6.7, never "deferred",
  never "transport raised"), and a passed message is answered 550 5.6.7 to the client, not 451
  (which Postfix would retry for days).
"""

from __future__ import annotations

import email.policy
import smtplib
from pathlib import Path

from e2e_support import Guard, build_message, policy, wait_for

YAMADA = "山田@ourco.co.jp"
HOLD = """
[[rule]]
name = "hold-out"
when = "recipient.external"
action = "hold"
hold_for = "1h"
"""


def send_utf8(g: Guard, mail_from: str, rcpts: list[str], data: bytes) -> tuple[int, str]:
    """One transaction with MAIL FROM:<…> SMTPUTF8 (smtplib then writes the command in UTF-8)."""
    with smtplib.SMTP("127.0.0.1", g.smtp_port, timeout=20) as c:
        c.ehlo("client.test")
        assert c.has_extn("smtputf8"), "the guard must announce SMTPUTF8"
        code, resp = c.mail(mail_from, ["SMTPUTF8", "BODY=8BITMIME"])
        assert code == 250, (code, resp)
        for r in rcpts:
            code, resp = c.rcpt(r)
            assert code == 250, (code, resp)
        try:
            code, resp = c.data(data)
        except smtplib.SMTPDataError as e:
            return e.smtp_code, e.smtp_error.decode("utf-8", "replace")
        return code, resp.decode("utf-8", "replace")


def message(to: str, subject: str) -> bytes:
    m = build_message(sender=f"山田 <{YAMADA}>", to=[to], subject=subject)
    return m.as_bytes(policy=email.policy.SMTP.clone(utf8=True))


def test_notice_to_an_international_sender_is_delivered_with_smtputf8(tmp_path: Path) -> None:
    with Guard(tmp_path, policy_text=policy(HOLD)) as g:
        code, text = send_utf8(
            g, YAMADA, ["tanaka@customer-a.co.jp"], message("tanaka@customer-a.co.jp", "utf8 held")
        )
        assert code == 250 and "held" in text, (code, text)
        notice = wait_for(
            lambda: [n for n in g.notices() if n.rcpt_tos == [YAMADA]],
            what="a notice addressed to 山田@ourco.co.jp at the upstream",
        )[0]
        assert notice.notice_kind == "held"
        log = g.log_text()
        assert "UnicodeEncodeError" not in log and "transport raised" not in log, log[-3000:]


def test_smtputf8_message_is_relayed_as_it_came(tmp_path: Path) -> None:
    with Guard(tmp_path, policy_text=policy("")) as g:
        data = message("sato@ourco.co.jp", "utf8 pass")
        code, text = send_utf8(g, YAMADA, ["佐藤@ourco.co.jp"], data)
        assert code == 250 and "held" not in text, (code, text)
        got = wait_for(lambda: g.mails(), what="the relayed message")[0]
        assert got.mail_from == YAMADA and got.rcpt_tos == ["佐藤@ourco.co.jp"]
        assert got.data.replace(b"\r\n", b"\n") == data.replace(b"\r\n", b"\n")


def test_upstream_without_smtputf8_is_a_permanent_5xx_never_a_retry(tmp_path: Path) -> None:
    with Guard(tmp_path, policy_text=policy(HOLD), sink_smtputf8=False) as g:
        # the passed path: the client (Postfix) gets 550 5.6.7 and bounces, instead of a 451
        # it would retry until maximal_queue_lifetime
        code, text = send_utf8(
            g, YAMADA, ["佐藤@ourco.co.jp"], message("sato@ourco.co.jp", "utf8 no upstream")
        )
        assert code == 550 and "5.6.7" in text, (code, text)
        # the notice path: the scheduler records a permanent failure at the first attempt
        code, text = send_utf8(
            g, YAMADA, ["tanaka@customer-a.co.jp"], message("tanaka@customer-a.co.jp", "held")
        )
        assert code == 250 and "held" in text, (code, text)
        line = wait_for(
            lambda: [ln for ln in g.log_lines() if "notice" in ln and "5.6.7" in ln],
            what="the notice's failure in the log",
        )[0]
        assert "failed" in line and "deferred" not in line, line
        log = g.log_text()
        assert "transport raised" not in log and "UnicodeEncodeError" not in log, log[-3000:]
        assert g.received == []
