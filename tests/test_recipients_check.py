"""recipients.analyze on whole messages: visible external recipients, parties, Bcc, hidden."""

from __future__ import annotations

import base64

import pytest

from mailguard.checks import recipients
from mailguard.checks.context import CheckContext, Org
from mailguard.envelope import Envelope
from mailguard.message import MessageView

ORG = Org(internal=("example.co.jp", "*.example.co.jp"), trusted=("partner.co.jp",))
CTX = CheckContext(org=ORG)


def msg(headers: str | bytes, env: list[str] | None = None) -> MessageView:
    head = headers.encode() if isinstance(headers, str) else headers
    raw = (
        b"From: taro@example.co.jp\r\n" + head.replace(b"\n", b"\r\n") + b"Subject: s\r\n\r\nhi\r\n"
    )
    return MessageView.parse(raw, Envelope("taro@example.co.jp", env) if env is not None else None)


def codes(rep: recipients.RecipientReport) -> dict[str, int]:
    return {f.code: f.count for f in rep.findings}


def jis(text: str) -> str:
    return f"=?ISO-2022-JP?B?{base64.b64encode(text.encode('iso2022_jp')).decode()}?="


def test_bcc_mistake_many_customers_in_to() -> None:
    to = ",\n ".join(f"{jis(f'顧客{i}様')} <c{i}@customer{i}.co.jp>" for i in range(5))
    rep = recipients.analyze(msg(f"To: {to}\n"), CTX)
    assert codes(rep)["recipient.visible_external"] == 5
    assert codes(rep)["recipient.external_parties"] == 5
    f = rep.findings[0]
    assert f.reason_ja == "To/Ccに社外の宛先が5件(5組織)見えています"
    assert "5 external" in f.reason_en


def test_one_customer_company_is_one_party() -> None:
    rep = recipients.analyze(
        msg("To: a@customer.co.jp, b@sales.customer.co.jp\nCc: boss@example.co.jp\n"), CTX
    )
    assert codes(rep)["recipient.visible_external"] == 2
    assert codes(rep)["recipient.external_parties"] == 1
    assert rep.to_json()["external_parties"] == 1


def test_freemail_mailboxes_are_separate_parties() -> None:
    rep = recipients.analyze(
        msg(
            "To: a@gmail.com, b@gmail.com, c@docomo.ne.jp\nCc: d@ab.auone-net.jp, e@i.softbank.jp\n"
        ),
        CTX,
    )
    assert codes(rep)["recipient.external_parties"] == 5
    assert set(rep.parties) == {
        "a@gmail.com",
        "b@gmail.com",
        "c@docomo.ne.jp",
        "d@ab.auone-net.jp",
        "e@i.softbank.jp",
    }


def test_policy_freemail_domains_add_to_the_shipped_list() -> None:
    ctx = CheckContext(org=Org(internal=("example.co.jp",), freemail=("club.example.org",)))
    rep = recipients.analyze(msg("To: a@club.example.org, b@club.example.org\n"), ctx)
    assert codes(rep)["recipient.external_parties"] == 2


def test_internal_only_has_no_findings() -> None:
    rep = recipients.analyze(
        msg(
            "To: a@example.co.jp, b@tokyo.example.co.jp\n",
            ["a@example.co.jp", "b@tokyo.example.co.jp"],
        ),
        CTX,
    )
    assert rep.findings == []
    assert rep.to_json()["visible_external"] == []


def test_wildcard_does_not_cover_lookalike_parent() -> None:
    # *.example.co.jp covers subdomains, not "badexample.co.jp"
    rep = recipients.analyze(msg("To: x@badexample.co.jp\n"), CTX)
    assert codes(rep)["recipient.visible_external"] == 1


def test_same_address_in_to_and_cc_counts_once() -> None:
    rep = recipients.analyze(msg("To: A@Customer.jp\nCc: a@customer.jp\nTo: a@CUSTOMER.JP.\n"), CTX)
    assert codes(rep)["recipient.visible_external"] == 1


def test_bcc_header_left_in_message() -> None:
    rep = recipients.analyze(msg("To: a@customer.jp\nBcc: x@other.jp, y@example.co.jp\n"), CTX)
    assert codes(rep)["recipient.bcc_header"] == 2
    assert rep.to_json()["bcc"] == ["x@other.jp", "y@example.co.jp"]
    assert codes(rep)["recipient.external"] == 2  # no envelope: header recipients count


def test_hidden_envelope_recipients_true_bcc() -> None:
    view = msg(
        "To: undisclosed-recipients:;\n",
        ["c1@customer1.jp", "c2@customer2.jp", "archive@example.co.jp"],
    )
    rep = recipients.analyze(view, CTX)
    assert "recipient.visible_external" not in codes(rep)  # the right way to mail many people
    assert codes(rep)["recipient.hidden"] == 3
    assert codes(rep)["recipient.external"] == 2
    hidden = next(f for f in rep.findings if f.code == "recipient.hidden")
    assert hidden.data["external"] == ["c1@customer1.jp", "c2@customer2.jp"]
    assert "Bcc" in hidden.reason_ja
    assert rep.to_json()["hidden"] == [
        "c1@customer1.jp",
        "c2@customer2.jp",
        "archive@example.co.jp",
    ]


def test_envelope_matches_headers_case_insensitively() -> None:
    rep = recipients.analyze(msg("To: Jiro <JIRO@Partner.co.jp>\n", ["jiro@partner.co.jp"]), CTX)
    assert rep.hidden == []


def test_idn_recipient_compared_as_a_label_shown_as_u_label() -> None:
    view = msg(b"To: =?UTF-8?B?5L6L?= <info@xn--r8jz45g.jp>\n", ["info@例え.jp"])
    rep = recipients.analyze(view, CTX)
    assert rep.hidden == []  # U-label envelope == A-label header
    f = rep.findings[0]
    assert f.evidence == ("info@例え.jp",)
    assert rep.to_json()["display"]["visible_external"] == ["info@例え.jp"]


def test_raw_utf8_smtputf8_headers() -> None:
    view = msg("To: 山田様 <yamada@顧客.jp>, 佐藤様 <sato@customer.co.jp>\n".encode())
    rep = recipients.analyze(view, CTX)
    assert codes(rep)["recipient.external_parties"] == 2
    assert rep.to[0].display_name == "山田様"


def test_raw_shift_jis_header() -> None:
    view = msg("To: 山田 <a@c1.jp>, 佐藤 <b@c2.jp>\n".encode("cp932"))
    rep = recipients.analyze(view, CTX)
    assert [a.display_name for a in rep.to] == ["山田", "佐藤"]
    assert codes(rep)["recipient.external_parties"] == 2


def test_malformed_to_still_counts_every_address() -> None:
    rep = recipients.analyze(msg('To: "Yamada <a@c1.jp>, b@c2.jp; c@c3.jp\n'), CTX)
    assert codes(rep)["recipient.visible_external"] == 3


def test_group_members_are_visible() -> None:
    rep = recipients.analyze(msg("To: Customers: a@c1.jp, b@c2.jp;\n"), CTX)
    assert codes(rep)["recipient.visible_external"] == 2
    assert {a.group for a in rep.to} == {"Customers"}


@pytest.mark.parametrize(
    "key", ["to", "cc", "bcc", "visible_external", "external_parties", "hidden"]
)
def test_json_keys(key: str) -> None:
    assert key in recipients.analyze(msg("To: a@c1.jp\n"), CTX).to_json()
