"""Issue 11, promise 6 — a hold rule can allow "send now", and the page offers it. Through
`mailguard serve` (tests/e2e_support.py).

Assumed syntax (not settled yet): `allow_send_now = true` is a rule-level key next to
`action = "hold"`. The page's buttons are `<button name="action" value="...">`; "send now" is
value "send" (as the confirm page's send button), cancel is value "cancel".
"""

from __future__ import annotations

from pathlib import Path

from e2e_support import Guard, policy

HOLD = """
[[rule]]
name = "cool-down"
when = "recipient.external"
action = "hold"
hold_for = "1h"
{extra}
"""


def test_hold_with_allow_send_now_offers_send_and_delivers_early(tmp_path: Path) -> None:
    pol = policy(HOLD.format(extra="allow_send_now = true"))
    with Guard(tmp_path, policy_text=pol) as g:
        sent = g.send(to=["Tanaka <tanaka@customer-a.co.jp>"], subject="cool down, then send")
        assert sent.held_id, f"{sent.code} {sent.text}"
        link = g.link(g.wait_notice("held", about=sent))
        page = g.page(link)
        assert page.status == 200
        assert sorted(page.actions) == ["cancel", "send"], page.actions
        done = g.post(link, "send")
        assert done.status == 200, done.text[:500]
        g.wait_mail(sent, timeout=5)  # long before the hour is over
        assert g.wait_state(sent.held_id, "delivered", timeout=5) == "delivered"


def test_hold_without_the_key_offers_only_cancel(tmp_path: Path) -> None:
    with Guard(tmp_path, policy_text=policy(HOLD.format(extra=""))) as g:
        sent = g.send(to=["Tanaka <tanaka@customer-a.co.jp>"], subject="cool down")
        assert sent.held_id, f"{sent.code} {sent.text}"
        page = g.page(g.link(g.wait_notice("held", about=sent)))
        assert page.status == 200
        assert page.actions == ["cancel"], page.actions
