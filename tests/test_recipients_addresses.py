"""parse_addresses / parse_envelope: the header shapes and encodings real mail clients produce."""

from __future__ import annotations

import base64
from email import _header_value_parser as hvp
from email.header import Header

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailguard.message.addresses import (
    address_key,
    decode_words,
    normalize_domain,
    parse_addresses,
    parse_addresses_with_defects,
    parse_envelope,
)


def ew(text: str, charset: str, enc: str = "B") -> str:
    """An RFC 2047 encoded word as a client would write it."""
    data = text.encode(charset)
    if enc == "B":
        return f"=?{charset}?B?{base64.b64encode(data).decode()}?="
    q = "".join(
        chr(b) if chr(b).isalnum() and b < 128 else "_" if b == 32 else f"={b:02X}" for b in data
    )
    return f"=?{charset}?Q?{q}?="


def raw8(b: bytes) -> str:
    """A raw 8-bit header value as the view hands it over (surrogateescape)."""
    return b.decode("ascii", "surrogateescape")


def addrs(header: str, *values: str) -> list[tuple[str, str, str]]:
    return [(a.addr, a.display_name, a.domain) for a in parse_addresses(header, list(values))]


# --- plain shapes ---------------------------------------------------------------------------


def test_plain_list_keeps_order_and_display_names() -> None:
    got = parse_addresses(
        "to", ['"Yamada, Taro" <taro@example.co.jp>, Hanako Sato <hanako@partner.co.jp>, b@x.com']
    )
    assert [(a.addr, a.display_name, a.header, a.recovered) for a in got] == [
        ("taro@example.co.jp", "Yamada, Taro", "to", False),
        ("hanako@partner.co.jp", "Hanako Sato", "to", False),
        ("b@x.com", "", "to", False),
    ]


def test_folded_value_and_repeated_headers() -> None:
    got = addrs("cc", "a@x.com,\r\n\tb@y.com", "c@z.com")
    assert [a for a, _, _ in got] == ["a@x.com", "b@y.com", "c@z.com"]


def test_domain_is_lowercased_and_trailing_dot_dropped() -> None:
    (a,) = parse_addresses("to", ["Jiro <Jiro@Partner.CO.JP.>"])
    assert (a.addr, a.local, a.domain) == ("Jiro@partner.co.jp", "Jiro", "partner.co.jp")
    (b,) = parse_addresses("to", ["Team: jiro@partner.co.jp.;"])
    assert b.domain == "partner.co.jp"


def test_empty_and_whitespace_values() -> None:
    assert parse_addresses("to", ["", "   ", "\r\n "]) == []


# --- encodings ------------------------------------------------------------------------------

NAME = "山田太郎"


@pytest.mark.parametrize(
    "display",
    [
        ew(NAME, "iso-2022-jp"),
        ew(NAME, "ISO-2022-JP", "Q"),
        ew(NAME, "shift_jis"),
        ew(NAME, "Shift_JIS", "Q"),
        ew(NAME, "cp932"),
        ew(NAME, "euc-jp"),
        ew(NAME, "utf-8"),
        ew(NAME, "UTF-8", "Q"),
        Header(NAME, "iso-2022-jp").encode(),  # the stdlib's own encoder
        Header(NAME, "utf-8").encode(),
        f'"{ew(NAME, "iso-2022-jp")}"',  # encoded word inside quotes (Outlook, old Becky!)
        # a long name split into two encoded words across a fold: the space between goes away
        f"{ew('山田', 'iso-2022-jp')}\r\n {ew('太郎', 'iso-2022-jp')}",
        f"{ew('山田', 'utf-8')} {ew('太郎', 'utf-8')}",
    ],
)
def test_encoded_display_names(display: str) -> None:
    (a,) = parse_addresses("to", [f"{display} <taro@example.co.jp>"])
    assert a.display_name == NAME
    assert a.addr == "taro@example.co.jp"


def test_iso_2022_jp_with_nec_extensions_decodes_via_cp932() -> None:
    # ① and ㈱ are NEC row-13 characters: Python's iso2022_jp refuses them, Windows sends them.
    jis = b"\x1b$B-!-j\x1b(B"  # ①㈱ in JIS row 13
    word = f"=?ISO-2022-JP?B?{base64.b64encode(jis).decode()}?="
    (a,) = parse_addresses("to", [f"{word} <a@x.co.jp>"])
    assert a.display_name == "①㈱"


def test_shift_jis_label_decodes_ibm_and_nec_characters() -> None:
    word = f"=?Shift_JIS?B?{base64.b64encode('髙橋①'.encode('cp932')).decode()}?="
    (a,) = parse_addresses("to", [f"{word} <takahashi@x.co.jp>"])
    assert a.display_name == "髙橋①"


@pytest.mark.parametrize("codec", ["utf-8", "cp932", "euc_jp"])
def test_raw_8bit_headers(codec: str) -> None:
    value = raw8(f"{NAME} <taro@example.co.jp>, 佐藤 <sato@partner.co.jp>".encode(codec))
    got = parse_addresses("to", [value])
    assert [(a.display_name, a.addr) for a in got] == [
        (NAME, "taro@example.co.jp"),
        ("佐藤", "sato@partner.co.jp"),
    ]


def test_raw_jis_header_without_encoded_words() -> None:
    value = f"{NAME} <taro@example.co.jp>".encode("iso2022_jp").decode("ascii")
    (a,) = parse_addresses("to", [value])
    assert (a.display_name, a.addr) == (NAME, "taro@example.co.jp")


def test_smtputf8_local_part_and_domain() -> None:
    (a,) = parse_addresses("to", [raw8("山田 <たろう@例え.jp>".encode())])
    assert a.local == "たろう"
    assert a.domain == "xn--r8jz45g.jp"
    assert a.domain_unicode == "例え.jp"
    assert address_key(a) == "たろう@xn--r8jz45g.jp"


def test_undecodable_encoded_word_never_raises() -> None:
    got = parse_addresses("to", ["=?x-unknown?B?////?= <a@x.com>", "=?utf-8?B?***?= <b@y.com>"])
    assert [a.addr for a in got] == ["a@x.com", "b@y.com"]


def test_decode_words_unknown_charset_and_q_underscore() -> None:
    assert decode_words("=?utf-8?Q?Taro_Yamada?=") == "Taro Yamada"
    assert decode_words("plain text") == "plain text"


# --- IDN ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("written", "alabel", "ulabel"),
    [
        ("例え.jp", "xn--r8jz45g.jp", "例え.jp"),
        ("XN--R8JZ45G.JP", "xn--r8jz45g.jp", "例え.jp"),
        ("ｅｘａｍｐｌｅ.jp", "example.jp", "example.jp"),  # full-width: UTS #46 maps to ASCII
        ("例え。jp", "xn--r8jz45g.jp", "例え.jp"),  # ideographic full stop
        ("Bücher.example", "xn--bcher-kva.example", "bücher.example"),
        ("exаmple.co.jp", "xn--exmple-4nf.co.jp", "exаmple.co.jp"),  # Cyrillic а: kept apart
    ],
)
def test_idn_domains(written: str, alabel: str, ulabel: str) -> None:
    (a,) = parse_addresses("to", [f"<user@{written}>"])
    assert (a.domain, a.domain_unicode) == (alabel, ulabel)


def test_invalid_idna_keeps_lowercase_and_reports_a_defect() -> None:
    got, defects = parse_addresses_with_defects("to", ["a@xn--zz.COM", "b@-bad-.example"])
    assert [a.domain for a in got] == ["xn--zz.com", "-bad-.example"]
    assert any("IDNA" in d for d in defects)


def test_normalize_domain_literal() -> None:
    assert normalize_domain("[192.0.2.1]") == ("[192.0.2.1]", "[192.0.2.1]", True)


# --- groups, comments, routes ---------------------------------------------------------------


def test_undisclosed_recipients_group_is_empty() -> None:
    assert parse_addresses("to", ["undisclosed-recipients:;"]) == []
    assert parse_addresses("to", [ew("宛先なし", "iso-2022-jp") + ": ;"]) == []


def test_named_group_members_carry_the_group() -> None:
    got = parse_addresses(
        "to",
        ['Project X: "Sato, Jiro" <jiro@partner.co.jp>, kim@customer.jp;, solo@example.co.jp'],
    )
    assert [(a.addr, a.group, a.display_name) for a in got] == [
        ("jiro@partner.co.jp", "Project X", "Sato, Jiro"),
        ("kim@customer.jp", "Project X", ""),
        ("solo@example.co.jp", None, ""),
    ]


def test_group_name_encoded() -> None:
    got = parse_addresses("cc", [ew("営業部", "iso-2022-jp") + ": a@x.co.jp, b@y.co.jp;"])
    assert [a.group for a in got] == ["営業部", "営業部"]


def test_comments_routes_literals_and_quoted_locals() -> None:
    got = addrs(
        "to",
        "taro@example.co.jp (Taro Yamada), <@relay.example:jiro@partner.co.jp>, "
        'user@[192.0.2.1], "john doe"@x.com, "a@evil.com" <b@y.com>',
    )
    assert [a for a, _, _ in got] == [
        "taro@example.co.jp",
        "jiro@partner.co.jp",
        "user@[192.0.2.1]",
        '"john doe"@x.com',
        "b@y.com",  # an address used as a display name is not a recipient
    ]


def test_quoted_comma_and_escaped_quote_in_display_name() -> None:
    got = addrs("to", r'"Sato \"Jiro\", Sales" <jiro@partner.co.jp>, c@z.com')
    assert got[0][:2] == ("jiro@partner.co.jp", 'Sato "Jiro", Sales')
    assert got[1][0] == "c@z.com"


# --- malformed headers: recover what the stdlib loses --------------------------------------


@pytest.mark.parametrize(
    ("value", "expected", "recovered"),
    [
        ('"Yamada <a@x.com>, b@y.com', ["a@x.com", "b@y.com"], {"a@x.com", "b@y.com"}),
        ("a@x.com b@y.com", ["a@x.com", "b@y.com"], {"b@y.com"}),  # missing comma
        ("Taro <a@x.com> Hanako <b@y.com>", ["a@x.com", "b@y.com"], {"b@y.com"}),
        ("a@x.com; b@y.com; c@z.com", ["a@x.com", "b@y.com", "c@z.com"], {"b@y.com", "c@z.com"}),
        ("<a@x.com, b@y.com", ["a@x.com", "b@y.com"], set()),  # unbalanced <
        ("a@x.com>, b@y.com", ["a@x.com", "b@y.com"], set()),
        ("Yamada, Taro <a@x.com>", ["a@x.com"], set()),  # unquoted comma in the name
        ("(unclosed comment a@x.com", ["a@x.com"], {"a@x.com"}),
    ],
)
def test_malformed_headers_lose_nothing(
    value: str, expected: list[str], recovered: set[str]
) -> None:
    got, defects = parse_addresses_with_defects("to", [value])
    assert sorted(a.addr for a in got) == sorted(expected)
    assert {a.addr for a in got if a.recovered} == recovered
    assert defects  # malformed input is reported, not silently accepted


def test_recovery_skips_addresses_used_as_display_names() -> None:
    got = parse_addresses("to", ['"taro@old.example" <taro@new.example> b@y.com'])
    assert {a.addr for a in got} == {"taro@new.example", "b@y.com"}


def test_well_formed_headers_are_never_marked_recovered() -> None:
    values = [
        '"Yamada, Taro" <a@x.com>',
        "Team: a@x.com, b@y.com;",
        "a@x.com (comment)",
        f"{ew(NAME, 'iso-2022-jp')} <c@z.com>",
    ]
    got, defects = parse_addresses_with_defects("to", values)
    assert not any(a.recovered for a in got)
    assert defects == []


def test_garbage_never_raises() -> None:
    for v in [
        '"',
        "<",
        ">",
        ":",
        ";",
        "@",
        "@@",
        '"\\',
        "=?",
        "a@",
        "@b",
        "\x00\x01",
        "(((",
        "<<>>",
    ]:
        parse_addresses("to", [v])


# --- envelope -------------------------------------------------------------------------------


def test_parse_envelope() -> None:
    got = parse_envelope(
        ["<Taro@Example.CO.JP>", "jiro@例え.jp", '"a b"@c.com', "<@r.example:x@y.jp>"]
    )
    assert [(a.addr, a.domain, a.header) for a in got] == [
        ("Taro@example.co.jp", "example.co.jp", "envelope"),
        ("jiro@例え.jp", "xn--r8jz45g.jp", "envelope"),
        ('"a b"@c.com', "c.com", "envelope"),
        ("x@y.jp", "y.jp", "envelope"),
    ]
    assert address_key(got[0]) == address_key(parse_addresses("to", ["taro@example.co.jp"])[0])


def test_unknown_header_name_is_refused() -> None:
    with pytest.raises(ValueError):
        parse_addresses("subject", ["a@x.com"])
    assert parse_addresses("Resent-To", ["a@x.com"])[0].header == "to"


# --- differential: the fast path agrees with the stdlib parser ------------------------------

_atom = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_+", min_size=1, max_size=8)
_local = st.lists(_atom, min_size=1, max_size=3).map(".".join)
_domain = st.lists(
    st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789", min_size=1, max_size=8),
    min_size=2,
    max_size=4,
).map(".".join)
_name = st.one_of(
    st.just(""),
    st.text(alphabet="ABCxyz 山田太郎", min_size=1, max_size=10).map(str.strip),
    st.text(alphabet='ABC, xyz.山田@"\\', min_size=0, max_size=10).map(
        lambda s: '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'
    ),
)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(_name, _local, _domain), min_size=1, max_size=5))
def test_fast_path_matches_stdlib(items: list[tuple[str, str, str]]) -> None:
    parts = []
    for name, local, domain in items:
        if name and name.strip('"').strip():
            parts.append(f"{name} <{local}@{domain}>")
        else:
            parts.append(f"{local}@{domain}")
    value = ", ".join(parts)
    ours = [(a.local, a.domain, a.display_name) for a in parse_addresses("to", [value])]
    lst, _ = hvp.get_address_list(value)
    theirs = [
        (m.local_part, m.domain, m.display_name or "")
        for m in lst.all_mailboxes
        if m.token_type == "mailbox"
    ]
    assert ours == theirs


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(list('ab@.,;:<>"()\\ \t\r\n=?[]山\udc8e')), max_size=40))
def test_any_input_never_raises(value: str) -> None:
    for a in parse_addresses("to", [value]):
        assert a.header == "to"
