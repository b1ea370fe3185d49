"""The engine: every matching rule fires; transforms accumulate; the strongest gate wins."""

from __future__ import annotations

from datetime import timedelta

import pytest

from mailguard.checks.finding import Finding
from mailguard.envelope import Envelope
from mailguard.policy import Decision, Gate, decide, evaluate, parse_policy

SENDER = Envelope("tanaka@example.co.jp", ["a@customer-a.co.jp"])


def f(code: str, count: int = 1) -> Finding:
    return Finding(code, f"{code} x{count}", f"{code} ×{count}", count=count)


def policy(rules: str, head: str = ""):  # type: ignore[no-untyped-def]
    return parse_policy(head + rules, "test.toml")


GATES = """
[defaults]
approvers = ["boss@example.co.jp"]
confirm_timeout = "2h"

[[rule]]
name = "cool-down"
when = "recipient.external"
action = "hold"
hold_for = "5m"

[[rule]]
name = "long-cool-down"
when = "attachment.present"
action = "hold"
hold_for = "1h"

[[rule]]
name = "first-time"
when = "domain.first_time"
action = "confirm"

[[rule]]
name = "many-parties"
when = "recipient.external_parties >= 5"
action = "approve"

[[rule]]
name = "no-such-domain"
when = "domain.nonexistent"
action = "reject"
reject_message = "No such domain"

[[rule]]
name = "bcc-fix"
when = "recipient.external_parties >= 2"
action = "bcc"

[[rule]]
name = "zip-it"
when = "attachment.unencrypted"
action = "zip"
options = { method = "zipcrypto" }
"""


def test_no_findings_pass() -> None:
    d = decide(policy(GATES), [], SENDER)
    assert d == Decision()
    assert d.to_json() == {"action": "pass", "transforms": [], "rules": []}


def test_findings_no_rule_pass() -> None:
    d = decide(policy(GATES), [f("message.malformed", 3)], SENDER)
    assert d.gate is Gate.PASS and d.rules == () and d.findings == ()


@pytest.mark.parametrize(
    ("findings", "gate", "rules"),
    [
        ([f("recipient.external")], Gate.HOLD, ("cool-down",)),
        (
            [f("recipient.external"), f("domain.first_time")],
            Gate.CONFIRM,
            ("cool-down", "first-time"),
        ),
        (
            [f("domain.first_time"), f("recipient.external_parties", 6)],
            Gate.APPROVE,
            ("first-time", "many-parties", "bcc-fix"),
        ),
        (
            [f("recipient.external_parties", 6), f("domain.nonexistent"), f("recipient.external")],
            Gate.REJECT,
            ("cool-down", "many-parties", "no-such-domain", "bcc-fix"),
        ),
    ],
)
def test_strongest_gate_wins(findings: list[Finding], gate: Gate, rules: tuple[str, ...]) -> None:
    d = decide(policy(GATES), findings, SENDER)
    assert d.gate is gate
    assert d.rules == rules  # every matching rule fired, in file order


def test_hold_for_is_the_longest() -> None:
    d = decide(policy(GATES), [f("recipient.external"), f("attachment.present")], SENDER)
    assert d.gate is Gate.HOLD
    assert d.hold_for == timedelta(hours=1)
    assert d.to_json()["hold_for_seconds"] == 3600


def test_hold_uses_default_duration() -> None:
    p = policy('[[rule]]\nname = "h"\nwhen = "recipient.external"\naction = "hold"\n')
    assert decide(p, [f("recipient.external")], SENDER).hold_for == timedelta(minutes=5)


def test_confirm_deadline_and_timeout() -> None:
    d = decide(policy(GATES), [f("domain.first_time")], SENDER)
    assert d.gate is Gate.CONFIRM
    assert d.hold_for == timedelta(hours=2)  # defaults.confirm_timeout
    assert d.on_timeout == "cancel"
    assert d.to_json() == {
        "action": "confirm",
        "transforms": [],
        "rules": ["first-time"],
        "hold_for_seconds": 7200,
        "on_timeout": "cancel",
    }


def test_cancel_on_timeout_wins_over_send() -> None:
    p = policy(
        """
        [defaults]
        on_timeout = "send"
        [[rule]]
        name = "a"
        when = "domain.first_time"
        action = "confirm"
        confirm_timeout = "30m"
        [[rule]]
        name = "b"
        when = "domain.lookalike"
        action = "confirm"
        on_timeout = "cancel"
        confirm_timeout = "3h"
        """.replace("\n        ", "\n")
    )
    only_a = decide(p, [f("domain.first_time")], SENDER)
    assert (only_a.on_timeout, only_a.hold_for) == ("send", timedelta(minutes=30))
    both = decide(p, [f("domain.first_time"), f("domain.lookalike")], SENDER)
    assert (both.on_timeout, both.hold_for) == ("cancel", timedelta(hours=3))


def test_approvers_union_from_rules_with_the_winning_gate() -> None:
    p = policy(
        """
[defaults]
approvers = ["boss@example.co.jp"]
[[rule]]
name = "a"
when = "recipient.external_parties >= 5"
action = "approve"
[[rule]]
name = "b"
when = "attachment.unencrypted"
action = "approve"
approvers = ["legal@example.co.jp", "boss@example.co.jp"]
"""
    )
    d = decide(p, [f("recipient.external_parties", 5), f("attachment.unencrypted")], SENDER)
    assert d.gate is Gate.APPROVE
    assert d.approvers == ("boss@example.co.jp", "legal@example.co.jp")
    assert d.to_json()["approvers"] == ["boss@example.co.jp", "legal@example.co.jp"]


def test_transforms_accumulate_in_canonical_order_with_a_gate() -> None:
    d = decide(
        policy(GATES),
        [f("attachment.unencrypted"), f("recipient.external_parties", 3), f("recipient.external")],
        SENDER,
    )
    assert d.gate is Gate.HOLD
    assert d.transforms == ("bcc", "zip")
    # rule options, plus what the transforms need from the policy (internal domains); the
    # language is the policy's only when [defaults] names one (else the service's notify.lang)
    assert d.options == {"zip": {"method": "zipcrypto"}, "bcc": {"internal": []}}
    assert d.to_json()["transforms"] == ["bcc", "zip"]


def test_reject_drops_transforms_and_uses_first_message() -> None:
    p = policy(
        GATES
        + """
[[rule]]
name = "lookalike"
when = "domain.lookalike"
action = "reject"
"""
    )
    d = decide(
        p, [f("domain.lookalike"), f("domain.nonexistent"), f("attachment.unencrypted")], SENDER
    )
    assert d.gate is Gate.REJECT
    assert d.transforms == ()
    assert d.reject_message == "No such domain"
    d2 = decide(p, [f("domain.lookalike")], SENDER)
    assert d2.reject_message == "Message refused by the mail policy of the sending organisation"


def test_later_rule_options_override_key_by_key() -> None:
    p = policy(
        """
[defaults]
lang = "en"
[[rule]]
name = "a"
when = "attachment.unencrypted"
action = "zip"
options = { method = "aes", password_to = "sender" }
[[rule]]
name = "b"
when = "attachment.unencrypted and domain.external"
action = "zip"
options = { method = "zipcrypto" }
"""
    )
    d = decide(p, [f("attachment.unencrypted"), f("domain.external")], SENDER)
    assert d.options == {"zip": {"method": "zipcrypto", "password_to": "sender", "lang": "en"}}
    assert decide(p, [f("attachment.unencrypted")], SENDER).options == {
        "zip": {"method": "aes", "password_to": "sender", "lang": "en"}
    }


@pytest.mark.parametrize(
    ("when", "count", "fires"),
    [
        ("recipient.external_parties", 1, True),
        ("recipient.external_parties", 0, False),  # a zero-count finding is not "present"
        ("recipient.external_parties >= 2", 1, False),
        ("recipient.external_parties >= 2", 2, True),
        ("recipient.external_parties > 2", 2, False),
        ("recipient.external_parties > 2", 3, True),
        ("recipient.external_parties <= 2", 2, True),
        ("recipient.external_parties <= 2", 3, False),
        ("recipient.external_parties < 2", 1, True),
        ("recipient.external_parties == 3", 3, True),
        ("recipient.external_parties == 3", 4, False),
        ("recipient.external_parties != 3", 4, True),
        ("recipient.external_parties != 3", 3, False),
    ],
)
def test_comparisons(when: str, count: int, fires: bool) -> None:
    p = policy(f'[[rule]]\nname = "r"\nwhen = "{when}"\naction = "hold"\n')
    assert (decide(p, [f("recipient.external_parties", count)], SENDER).gate is Gate.HOLD) == fires


def test_absent_finding_never_matches_less_than() -> None:
    p = policy('[[rule]]\nname = "r"\nwhen = "recipient.external_parties < 5"\naction = "hold"\n')
    assert decide(p, [], SENDER).gate is Gate.PASS


def test_counts_of_the_same_code_add_up() -> None:
    p = policy('[[rule]]\nname = "r"\nwhen = "attachment.unencrypted >= 3"\naction = "zip"\n')
    findings = [f("attachment.unencrypted", 1), f("attachment.unencrypted", 2)]
    assert decide(p, findings, SENDER).transforms == ("zip",)
    assert decide(p, findings[:1], SENDER).transforms == ()


def test_and_within_a_string_any_of_a_list() -> None:
    p = policy(
        '[[rule]]\nname = "r"\nwhen = ["attachment.unencrypted and recipient.external", '
        '"domain.lookalike"]\naction = "confirm"\n'
    )
    assert decide(p, [f("attachment.unencrypted")], SENDER).gate is Gate.PASS
    assert decide(p, [f("recipient.external")], SENDER).gate is Gate.PASS
    both = evaluate(p, [f("attachment.unencrypted"), f("recipient.external")], SENDER)
    assert both.decision.gate is Gate.CONFIRM
    assert [str(c) for c in both.hits[0].conditions] == [
        "attachment.unencrypted",
        "recipient.external",
    ]
    other = evaluate(p, [f("domain.lookalike")], SENDER)
    assert other.decision.gate is Gate.CONFIRM
    assert other.hits[0].to_json() == {
        "rule": "r",
        "actions": ["confirm"],
        "when": ["domain.lookalike"],
    }


def test_decision_findings_are_the_ones_behind_fired_rules() -> None:
    fs = [f("message.malformed"), f("domain.first_time", 2), f("attachment.encrypted")]
    d = decide(policy(GATES), fs, SENDER)
    assert d.findings == (fs[1],)


def test_pass_rule_fires_and_is_recorded() -> None:
    p = policy('[[rule]]\nname = "log-dns"\nwhen = "domain.dns_unavailable"\naction = "pass"\n')
    d = decide(p, [f("domain.dns_unavailable")], SENDER)
    assert d.gate is Gate.PASS and d.rules == ("log-dns",)
    assert d.to_json() == {"action": "pass", "transforms": [], "rules": ["log-dns"]}


# ---- scoping by sender ------------------------------------------------------------------

SCOPED = """
[groups]
sales = ["*@sales.example.co.jp", "suzuki@example.co.jp"]
execs = ["ceo@example.co.jp"]

[[rule]]
name = "sales-hold"
when = "recipient.external"
action = "hold"
senders = ["group:sales"]

[[rule]]
name = "everyone-confirm-first-time"
when = "domain.first_time"
action = "confirm"
except_senders = ["support@example.co.jp", "*@*.example.co.jp"]

[[rule]]
name = "zip"
when = "attachment.unencrypted"
action = "zip"

[[rule]]
name = "idn-sender"
when = "domain.lookalike"
action = "reject"
senders = ["*@営業.example.co.jp"]

[[exception]]
name = "executives"
senders = ["group:execs"]

[[exception]]
senders = ["suzuki@example.co.jp"]
rules = ["sales-hold"]
"""


@pytest.mark.parametrize(
    ("sender", "gate"),
    [
        ("yamada@sales.example.co.jp", Gate.HOLD),
        ("<Yamada@SALES.Example.co.jp>", Gate.HOLD),  # case and angle brackets do not matter
        ("suzuki@example.co.jp", Gate.PASS),  # in the group, but exempted from sales-hold
        ("tanaka@example.co.jp", Gate.PASS),  # not in the group
        ("", Gate.PASS),  # null sender (bounces) is in no group
    ],
)
def test_senders_scope(sender: str, gate: Gate) -> None:
    d = decide(policy(SCOPED), [f("recipient.external")], Envelope(sender, ["x@y.jp"]))
    assert d.gate is gate


def test_except_senders_and_exceptions() -> None:
    p = policy(SCOPED)
    first = [f("domain.first_time")]
    assert decide(p, first, SENDER).gate is Gate.CONFIRM
    support = evaluate(p, first, Envelope("support@example.co.jp", []))
    assert support.decision.gate is Gate.PASS
    assert support.exempted == ("everyone-confirm-first-time",)
    assert decide(p, first, Envelope("x@dev.example.co.jp", [])).gate is Gate.PASS
    # an [[exception]] without `rules` covers every rule
    ceo = evaluate(p, [*first, f("attachment.unencrypted")], Envelope("CEO@example.co.jp", []))
    assert ceo.decision == Decision()
    assert ceo.exempted == ("everyone-confirm-first-time", "zip")


def test_idn_sender_matches_a_label_and_u_label() -> None:
    p = policy(SCOPED)
    for sender in ("kato@営業.example.co.jp", "kato@xn--j2rs27b.example.co.jp"):
        assert decide(p, [f("domain.lookalike")], Envelope(sender, [])).gate is Gate.REJECT
    assert decide(p, [f("domain.lookalike")], SENDER).gate is Gate.PASS
