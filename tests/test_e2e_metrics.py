"""Issue 11, promise 4 — the metrics move, scraped from a running `mailguard serve`'s /metrics
(parsed with prometheus_client's parser; tests/e2e_support.py).

Assumed: `mailguard_relay_total{outcome="accepted"}` counts user mail delivered upstream —
passed in-transaction and released from the queue (confirmed, hold over, `queue release`) — and
not the guard's own notices (those are `mailguard_notices_sent_total{kind}`), so after N
deliveries it has grown by exactly N.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from e2e_support import Guard, policy, wait_for

POLICY = policy(
    """
[[rule]]
name = "confirm-out"
when = "recipient.external"
action = "confirm"
senders = ["confirmer@ourco.co.jp"]

[[rule]]
name = "hold-short"
when = "recipient.external"
action = "hold"
hold_for = "1s"
senders = ["holder@ourco.co.jp"]

[[rule]]
name = "hold-long"
when = "recipient.external"
action = "hold"
hold_for = "1h"
senders = ["waiter@ourco.co.jp"]
"""
)


def test_reload_gauge_is_true_right_after_start(tmp_path: Path) -> None:
    with Guard(tmp_path, policy_text=POLICY) as g:
        assert g.metric("mailguard_policy_last_reload_successful") == 1


def test_metrics_move_with_the_traffic(tmp_path: Path) -> None:
    with Guard(tmp_path, policy_text=POLICY) as g:
        relayed0 = g.metric("mailguard_relay_total", outcome="accepted")

        passed = g.send(to=["A <a@customer-a.co.jp>"], subject="passed")
        assert passed.relayed, f"{passed.code} {passed.text}"

        confirmed = g.send(
            sender="confirmer@ourco.co.jp", to=["B <b@customer-b.co.jp>"], subject="confirmed"
        )
        assert confirmed.held_id, f"{confirmed.code} {confirmed.text}"
        held = g.send(sender="holder@ourco.co.jp", to=["C <c@customer-c.co.jp>"], subject="held")
        assert held.held_id, f"{held.code} {held.text}"
        waiting = g.send(
            sender="waiter@ourco.co.jp", to=["D <d@customer-d.co.jp>"], subject="released by CLI"
        )
        assert waiting.held_id, f"{waiting.code} {waiting.text}"

        done = g.post(g.link(g.wait_notice("confirm", about=confirmed)), "send")
        assert done.status == 200, done.text[:500]
        r = g.queue("release", waiting.held_id)
        assert r.returncode == 0, r.stderr
        for s in (passed, confirmed, held, waiting):
            g.wait_mail(s)
        deliveries = 4

        # counters are bumped right after the upstream's 250: give the scrape a moment
        def relayed() -> float:
            return g.metric("mailguard_relay_total", outcome="accepted") - relayed0

        with contextlib.suppress(TimeoutError):
            wait_for(lambda: relayed() >= deliveries, timeout=3, what="relay_total")
        wrong: list[str] = []  # every metric that did not move, not just the first
        if relayed() != deliveries:
            wrong.append(
                f"mailguard_relay_total{{outcome=accepted}} grew by {relayed()}, "
                f"expected {deliveries} (1 passed + 3 released)"
            )
        m = g.metrics()
        notices = {lb.get("kind"): v for lb, v in m.get("mailguard_notices_sent_total", [])}
        if notices.get("confirm", 0) <= 0:
            wrong.append(f"mailguard_notices_sent_total has no confirm notice: {notices}")
        checks = [
            ("mailguard_confirm_posts_total", {}),
            ("mailguard_human_decision_seconds_count", {}),
            ("mailguard_smtp_connections_total", {"result": "accepted"}),
        ]
        for name, labels in checks:
            if g.metric(name, **labels) <= 0:
                wrong.append(f"{name}{labels or ''} is 0")
        if g.metric("mailguard_policy_last_reload_successful") != 1:
            wrong.append("mailguard_policy_last_reload_successful is not 1")
        assert not wrong, "metrics that did not move:\n" + "\n".join(wrong)
