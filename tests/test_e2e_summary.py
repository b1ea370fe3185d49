"""Issue 11, promise 1 — at the user's boundary: the confirm page and the confirm notice list the
recipients split internal / external, external grouped by organisation, with display names,
plus the attachment's name and size and the finding in plain words.

Black-box: `mailguard serve` subprocess, smtplib in, notices read at the receiving SMTP server,
the page fetched over HTTP (tests/e2e_support.py).

Assumed where not settled:
* the page keeps today's element ids: the external recipients inside an element with
  id="external", the internal ones inside id="internal", findings inside id="findings",
  attachments inside id="attachments" (nested markup inside them is fine);
* an attachment's size is the file's decoded size in the notify.human_size format ("5.0 KB"
  for 5120 bytes), on the page and in the notice;
* the finding's plain words are the same sentence `mailguard check --json` gives as the
  finding's `reason` (English: the policy says lang = "en", the page is asked for en);
* the organisation of a non-free-mail domain is shown as its domain ("customer-b.co.jp").
"""

from __future__ import annotations

from pathlib import Path

from e2e_support import Guard, check_json, pdf_bytes, policy

POLICY = policy(
    """
[[rule]]
name = "several-companies"
description = "two or more outside organisations can see each other"
when = "recipient.external_parties >= 2"
action = "confirm"
"""
)

TO = ["Tanaka Taro <tanaka@customer-a.co.jp>"]
CC = ["佐藤 <sato@customer-b.co.jp>", "Suzuki <suzuki@ourco.co.jp>"]
ATTACHMENT = ("quote-2024.pdf", pdf_bytes(5120), "application/pdf")
SIZE = "5.0 KB"

EXTERNAL = ("tanaka@customer-a.co.jp", "Tanaka Taro", "佐藤", "sato@customer-b.co.jp")
ORGS = ("customer-a.co.jp", "customer-b.co.jp")


def test_page_and_notice_list_recipients_by_organisation(tmp_path: Path) -> None:
    with Guard(tmp_path, policy_text=POLICY, config_extra={"notify": {"lang": "en"}}) as g:
        sent = g.send(to=TO, cc=CC, subject="Quotation 2024", attachments=[ATTACHMENT])
        assert sent.held_id, f"expected a confirm hold, got {sent.code} {sent.text}"
        reason = next(
            f["reason"]
            for f in check_json(g, sent.data, sent.mail_from, sent.rcpts)["findings"]
            if f["code"] == "recipient.external_parties"
        )

        notice = g.wait_notice("confirm", about=sent)
        page = g.page(g.link(notice), lang="en")
        assert page.status == 200

        external, internal = page.section("external"), page.section("internal")
        for s in (*EXTERNAL, *ORGS):
            assert s in external, f"{s!r} not in the page's external section: {external!r}"
        assert "suzuki@ourco.co.jp" in internal and "Suzuki" in internal, internal
        for s in EXTERNAL:
            assert s not in internal, f"external {s!r} listed as internal: {internal!r}"
        assert "suzuki@ourco.co.jp" not in external, external
        attachments = page.section("attachments")
        assert ATTACHMENT[0] in attachments and SIZE in attachments, attachments
        assert reason in page.section("findings"), (reason, page.section("findings"))

        text = notice.text
        for s in (*EXTERNAL, *ORGS, "suzuki@ourco.co.jp", "Suzuki", ATTACHMENT[0], SIZE, reason):
            assert s in text, f"{s!r} missing from the confirm notice:\n{text}"
        # grouped: each external address sits under a line naming its organisation (its domain
        # without an "@"), and the external group comes before the internal recipients
        plain = notice.msg.get_body(("plain",))
        body = plain.get_content() if plain is not None else text
        assert body.index("tanaka@customer-a.co.jp") < body.index("suzuki@ourco.co.jp"), body
        lines = body.splitlines()
        for addr in ("tanaka@customer-a.co.jp", "sato@customer-b.co.jp"):
            org = addr.split("@")[1]
            at = next(i for i, ln in enumerate(lines) if addr in ln)
            heads = [
                i
                for i, ln in enumerate(lines[:at])
                if any(o in ln and "@" + o not in ln for o in ORGS)
            ]
            assert heads and org in lines[heads[-1]], f"{addr} not under its organisation:\n{body}"
