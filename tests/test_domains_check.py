"""domains.analyze: internal/trusted/known/first-time, look-alikes (both ways), DNS verdicts."""

from __future__ import annotations

import pytest

from mailguard.checks import domains
from mailguard.checks.context import CheckContext, DnsStatus, Org
from mailguard.envelope import Envelope
from mailguard.message import MessageView
from mailguard.message.addresses import normalize_domain

ORG = Org(
    internal=("example.co.jp", "*.example.co.jp"),
    trusted=("partner.co.jp", "*.group-kaisha.jp"),
)
HISTORY = {"customer-shop.com": 12, "acme-industries.co.jp": 5, "sony.co.jp": 3, "rare.jp": 1}


def view(*rcpts: str, headers: str = "") -> MessageView:
    to = ", ".join(rcpts)
    raw = f"From: a@example.co.jp\r\nTo: {to}\r\n{headers}Subject: s\r\n\r\nhi\r\n".encode()
    return MessageView.parse(raw, Envelope("a@example.co.jp", list(rcpts)))


def classify(domain: str, history: dict[str, int] | None = None) -> domains.DomainInfo:
    ctx = CheckContext(org=ORG, history=HISTORY if history is None else history)
    rep = domains.analyze(view(f"user@{domain}"), ctx)
    (info,) = rep.domains.values()
    return info


@pytest.mark.parametrize(
    ("domain", "cls"),
    [
        ("example.co.jp", "internal"),
        ("tokyo.example.co.jp", "internal"),
        ("partner.co.jp", "trusted"),
        ("osaka.group-kaisha.jp", "trusted"),
        ("customer-shop.com", "known"),
        ("rare.jp", "known"),
        ("mail.rare.jp", "known"),  # a new subdomain of a known organisation
        ("brand-new.co.jp", "first_time"),
    ],
)
def test_classes(domain: str, cls: str) -> None:
    assert classify(domain).cls == cls


@pytest.mark.parametrize(
    ("domain", "of", "kind"),
    [
        ("example.jp", "example.co.jp", "swapped_suffix"),
        ("example.com", "example.co.jp", "swapped_suffix"),
        ("example.ne.jp", "example.co.jp", "swapped_suffix"),
        ("examp1e.co.jp", "example.co.jp", "homoglyph"),
        ("exarnple.co.jp", "example.co.jp", "homoglyph"),  # rn → m
        ("exаmple.co.jp", "example.co.jp", "homoglyph"),  # Cyrillic а (IDN)
        ("ехample.co.jp", "example.co.jp", "homoglyph"),  # Cyrillic е and х
        ("ex-ample.co.jp", "example.co.jp", "homoglyph"),
        ("exmaple.co.jp", "example.co.jp", "edit_distance"),  # transposition
        ("partnre.co.jp", "partner.co.jp", "edit_distance"),
        ("partner.com", "partner.co.jp", "swapped_suffix"),
        ("gmial.com", "gmail.com", "edit_distance"),
        ("gmai.com", "gmail.com", "edit_distance"),
        ("gmail.co.jp", "gmail.com", "swapped_suffix"),
        ("yahoo.jp", "yahoo.co.jp", "swapped_suffix"),
        ("hotmial.co.jp", "hotmail.co.jp", "edit_distance"),
        ("customer-shop.co.jp", "customer-shop.com", "swapped_suffix"),  # frequent domain
        ("custorner-shop.com", "customer-shop.com", "homoglyph"),
        ("s0ny.co.jp", "sony.co.jp", "homoglyph"),
        ("example.co.jp.mail-secure.com", "example.co.jp", "subdomain"),
    ],
)
def test_lookalikes_are_flagged(domain: str, of: str, kind: str) -> None:
    info = classify(domain)
    assert info.cls == "lookalike", info
    assert info.lookalike is not None
    assert (info.lookalike.of, info.lookalike.kind) == (of, kind)


@pytest.mark.parametrize(
    "domain",
    [
        "sample.co.jp",  # two letters off a 7-letter name: a different company
        "google.com",
        "microsoft.com",
        "toyota.co.jp",
        "hitachi.co.jp",
        "amazon.co.jp",
        "rakuten.co.jp",  # a real company, not a typo of the free-mail rakuten.jp
        "nifty.co.jp",
        "docomo.ne.jp",  # free-mail domains themselves are real
        "outlook.jp",
        "i.softbank.jp",
        "ezweb.ne.jp",
        "sonny.co.jp",  # 4-letter names: no edit distance (nec/nhk/ntt are all real)
        "nec.co.jp",
        "ntt.co.jp",
        "acme-industry.co.jp",  # 3 edits from a frequent domain
        "mail.partner.co.jp",  # subdomain of the trusted partner: same organisation
        "kyoto-u.ac.jp",
        "city.yokohama.lg.jp",
    ],
)
def test_unrelated_domains_are_not_flagged(domain: str) -> None:
    info = classify(domain)
    assert info.cls != "lookalike", info


def test_known_domain_is_never_a_lookalike() -> None:
    # the organisation really writes to gmial.com: history wins
    assert classify("gmial.com", {"gmial.com": 4}).cls == "known"


def test_without_history_classes_are_unchecked_but_lookalikes_still_found() -> None:
    ctx = CheckContext(org=ORG)
    rep = domains.analyze(view("a@brand-new.co.jp", "b@examp1e.co.jp"), ctx)
    assert rep.domains["brand-new.co.jp"].cls == "unchecked"
    assert rep.domains["examp1e.co.jp"].cls == "lookalike"
    assert rep.domains["brand-new.co.jp"].history is None
    assert "domain.first_time" not in {f.code for f in rep.findings}


def test_findings_and_json() -> None:
    ctx = CheckContext(org=ORG, history=HISTORY)
    rep = domains.analyze(
        view(
            "a@example.co.jp", "b@partner.co.jp", "c@customer-shop.com", "d@gmial.com", "e@new.jp"
        ),
        ctx,
    )
    by = {f.code: f for f in rep.findings}
    assert by["domain.external"].count == 3
    assert set(by["domain.external"].evidence) == {"customer-shop.com", "gmial.com", "new.jp"}
    assert by["domain.first_time"].evidence == ("gmial.com", "new.jp")
    assert by["domain.lookalike"].data["lookalike_of"] == {"gmial.com": "gmail.com"}
    assert "gmail.com" in by["domain.lookalike"].reason_ja
    js = rep.to_json()
    assert js["gmial.com"] == {
        "class": "lookalike",
        "unicode": "gmial.com",
        "lookalike_of": "gmail.com",
        "lookalike_kind": "edit_distance",
        "dns": None,
        "history": 0,
    }
    assert js["example.co.jp"]["class"] == "internal"
    assert not any(f.code.startswith("domain.n") or "dns" in f.code for f in rep.findings)


def test_idn_domain_keyed_by_a_label_shown_as_u_label() -> None:
    a, u, _ = normalize_domain("exаmple.co.jp")
    ctx = CheckContext(org=ORG, history={})
    rep = domains.analyze(view(f"x@{a}"), ctx)
    assert rep.to_json()[a]["unicode"] == u
    f = next(f for f in rep.findings if f.code == "domain.lookalike")
    assert u in f.reason_en and a in f.reason_en


def test_envelope_and_header_domains_are_both_classified() -> None:
    raw = b"From: a@example.co.jp\r\nTo: x@visible.jp\r\nCc: y@cc.jp\r\n\r\nhi\r\n"
    v = MessageView.parse(raw, Envelope("a@example.co.jp", ["x@visible.jp", "z@hidden.jp"]))
    rep = domains.analyze(v, CheckContext(org=ORG, history={}))
    assert set(rep.domains) == {"visible.jp", "cc.jp", "hidden.jp"}


@pytest.mark.parametrize(
    ("status", "code", "cls"),
    [
        ("nonexistent", "domain.nonexistent", "nonexistent"),
        ("null_mx", "domain.null_mx", "nonexistent"),
        ("unavailable", "domain.dns_unavailable", "first_time"),
    ],
)
def test_dns_findings(status: DnsStatus, code: str, cls: str) -> None:
    ctx = CheckContext(org=ORG, history={}, dns={"nowhere.jp": status, "fine.jp": "ok"})
    rep = domains.analyze(view("a@nowhere.jp", "b@fine.jp"), ctx)
    f = next(f for f in rep.findings if f.code == code)
    assert f.evidence == ("nowhere.jp",)
    assert rep.domains["nowhere.jp"].cls == cls
    assert rep.domains["nowhere.jp"].dns == status
    assert rep.domains["fine.jp"].dns == "ok"
    others = {"domain.nonexistent", "domain.null_mx", "domain.dns_unavailable"} - {code}
    assert not others & {f.code for f in rep.findings}


def test_dns_unavailable_is_never_nonexistent() -> None:
    ctx = CheckContext(org=ORG, history={}, dns={"slow.jp": "unavailable"})
    rep = domains.analyze(view("a@slow.jp"), ctx)
    assert "domain.nonexistent" not in {f.code for f in rep.findings}
    assert rep.domains["slow.jp"].cls != "nonexistent"


def test_internal_domains_get_no_dns_findings() -> None:
    ctx = CheckContext(org=ORG, dns={"example.co.jp": "unavailable"})
    assert domains.analyze(view("a@example.co.jp"), ctx).findings == []


def test_index_is_reused_for_the_same_org_and_known_set() -> None:
    domains._INDEX_CACHE.clear()
    for _ in range(3):
        domains.analyze(view("a@new.jp"), CheckContext(org=ORG, history=dict(HISTORY)))
    assert len(domains._INDEX_CACHE) == 1


def test_registrable_and_skeleton_helpers() -> None:
    assert domains.split_registrable("mail.example.co.jp") == ("example.co.jp", "example", "co.jp")
    assert domains.registrable("a.b.city.kawasaki.jp") == "city.kawasaki.jp"
    assert domains.skeleton("paypa1") == domains.skeleton("paypal")
    assert domains.skeleton("ѕоnу") == "sony"
    assert domains.is_freemail("x.auone-net.jp") and not domains.is_freemail("example.co.jp")
    assert len(domains.freemail_domains()) >= 60


@pytest.mark.parametrize(
    ("domain", "kind"),
    [
        # issue 13: a name that extends ours is a look-alike (formerly "examplestore.jp" was
        # listed as unrelated; a suffixed protected name of 6+ letters now counts as extended)
        ("examplestore.jp", "extended"),
        ("my-example.co.jp", "extended"),
        ("example-osaka.co.jp", "extended"),
        ("example-co.jp", "extended"),
        ("example.mail-secure.net", "subdomain"),
        ("partner-co-jp.evil.com", "subdomain"),
    ],
)
def test_names_that_extend_ours(domain: str, kind: str) -> None:
    info = classify(domain)
    assert info.cls == "lookalike" and info.lookalike is not None, info
    assert info.lookalike.kind == kind, info
