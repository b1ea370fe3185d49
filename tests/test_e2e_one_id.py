"""Issue 11, promise 7 — one id per message, through `mailguard serve` (tests/e2e_support.py):
the id in the SMTP reply (`250 2.0.0 Ok: held as <ID> (...)`), in `mailguard queue list`
(--json and plain), in the message's decision log line, in the confirm notice and on the
confirm page are the same string.

Assumed (not settled yet): with `[log] json = true` the per-message decision line is one JSON
object carrying `"id": "<ID>"` and `"message_id": "<Message-ID>"` (today's field names); the
confirm notice's text and the confirm page's text show the id somewhere (lead, footer, ...).
"""

from __future__ import annotations

from pathlib import Path

from e2e_support import Guard, policy

POLICY = policy(
    """
[[rule]]
name = "confirm-out"
when = "recipient.external"
action = "confirm"
"""
)


def test_one_id_across_reply_queue_log_notice_and_page(tmp_path: Path) -> None:
    with Guard(tmp_path, policy_text=POLICY, config_extra={"log": {"json": True}}) as g:
        sent = g.send(to=["Tanaka <tanaka@customer-a.co.jp>"], subject="one id")
        mid = sent.held_id
        assert mid, f"{sent.code} {sent.text}"

        wrong: list[str] = []  # every place that disagrees, not just the first
        items = g.queue_items()
        if [it["id"] for it in items] != [mid]:
            wrong.append(f"queue list --json: {[it['id'] for it in items]}")
        plain = g.queue("list")
        if plain.returncode != 0 or mid not in plain.stdout:
            wrong.append(f"queue list: {plain.stdout!r}")
        record = g.decision_record(sent)
        if record.get("id") != mid:
            wrong.append(f"decision log line: id={record.get('id')!r}")
        notice = g.wait_notice("confirm", about=sent)
        if mid not in notice.text:
            wrong.append("the confirm notice does not show it")
        page = g.page(g.link(notice))
        if page.status != 200 or mid not in page.text:
            wrong.append(f"the confirm page does not show it ({page.status})")
        assert not wrong, f"the SMTP reply says {mid}, but:\n" + "\n".join(wrong)
