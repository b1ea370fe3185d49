"""Issue 11, promise 8 — a dry run equals the server: the same message, checked with
`mailguard check --json --policy P --store DB` on the running server's store after the server
learnt some history, gets the same decision action and rules as the server took for it (read
from the server's JSON decision log line, fields `decision` and `rules`).

History is taught the user's way: messages from an exempt sender are delivered, and the test
waits until `mailguard history list` shows their domain 3 times (a frequent domain). The
messages then cover a known domain (pass), a known + a first-time domain (confirm, several
rules), an address literal, an upper-case domain, look-alikes of our own and of the frequent
domain, and a first-time domain only in the envelope (Bcc).

Assumed: the decision log line (`[log] json = true`) carries `decision` (pass | hold | confirm |
approve | reject) and `rules` (fired rule names), as today; `check` is given the same envelope
with --mail-from / --rcpt.
"""

from __future__ import annotations

import json

import pytest
from e2e_support import Guard, Sent, check_json, policy, wait_for

ROBOT = "robot@ourco.co.jp"
TAUGHT = 3
POLICY = policy(
    f"""
[[rule]]
name = "first-time"
when = "domain.first_time"
action = "confirm"
except_senders = ["{ROBOT}"]

[[rule]]
name = "several-companies"
when = "recipient.external_parties >= 2"
action = "hold"
hold_for = "1h"

[[rule]]
name = "lookalike"
when = "domain.lookalike"
action = "confirm"

[[rule]]
name = "outside"
when = "domain.external"
action = "pass"
"""
)

CASES: dict[str, list[str]] = {
    "known domain": ["A <a2@known-a.co.jp>"],
    "known + first-time": ["A <a3@known-a.co.jp>", "B <b@new-b.co.jp>"],
    "address literal": ["L <user@[192.0.2.1]>"],
    "upper-case known domain": ["A <A4@KNOWN-A.CO.JP>"],
    "look-alike of our domain": ["O <someone@0urco.co.jp>"],
    "look-alike of a frequent domain": ["K <k@kn0wn-a.co.jp>"],
}
HIDDEN = {"hidden first-time recipient": (["A <a5@known-a.co.jp>"], ["c@new-c.co.jp"])}


def known(g: Guard, domain: str, times: int) -> bool:
    """`mailguard history list` shows `domain` written to at least `times` times."""
    r = g.run_cli("history", "list", "--json", "--store", str(g.store))
    return r.returncode == 0 and any(
        (rec := json.loads(ln)).get("domain") == domain and int(rec.get("count", 0)) >= times
        for ln in r.stdout.splitlines()
        if ln.strip()
    )


def server_decision(g: Guard, sent: Sent) -> tuple[str, list[str]]:
    rec = g.decision_record(sent)
    return str(rec["decision"]), sorted(rec["rules"])


@pytest.fixture(scope="module")
def taught(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    g = Guard(tmp_path_factory.mktemp("dry-run"), policy_text=POLICY)
    with g:
        for i in range(TAUGHT):  # often enough to be a frequent domain (look-alike protected)
            first = g.send(sender=ROBOT, to=["A <a@known-a.co.jp>"], subject=f"teach {i}")
            assert first.relayed, f"{first.code} {first.text}"
            g.wait_mail(first)
        wait_for(lambda: known(g, "known-a.co.jp", TAUGHT), what="known-a.co.jp in the history")
        yield g


@pytest.mark.parametrize("case", [*CASES, *HIDDEN])
def test_check_decides_as_the_server(taught: Guard, case: str) -> None:
    g = taught
    to, bcc = (CASES[case], []) if case in CASES else HIDDEN[case]
    sent = g.send(to=to, bcc=bcc, subject=f"dry run: {case}")
    assert sent.code in (250, 550), f"{sent.code} {sent.text}"
    action, rules = server_decision(g, sent)
    dry = check_json(g, sent.data, sent.mail_from, sent.rcpts)["decision"]
    assert (dry["action"], sorted(dry["rules"])) == (action, rules), (
        f"server: {action} {rules}; mailguard check: {dry['action']} {sorted(dry['rules'])}"
    )
