"""Policy files: what is accepted, and every refusal with its exact file:line: key: message."""

from __future__ import annotations

import textwrap
from datetime import timedelta
from pathlib import Path

import pytest

import mailguard.checks
from mailguard.errors import ConfigError
from mailguard.policy import (
    KNOWN_CODES,
    Gate,
    builtin_policy,
    format_duration,
    load_policy,
    parse_duration,
)
from mailguard.policy.codes import parse_catalogue

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = sorted((ROOT / "policies").rglob("*.toml"))


def write(tmp_path: Path, text: str, name: str = "p.toml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    return path


def refused(tmp_path: Path, text: str) -> str:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_policy(path)
    # messages name the file as given; strip the tmp dir for readable expectations
    return str(err.value).replace(str(tmp_path) + "/", "")


RULE = """
[[rule]]
name = "r1"
when = "domain.first_time"
action = "confirm"
"""


def test_catalogue_matches_checks_docstring() -> None:
    assert mailguard.checks.__doc__
    assert parse_catalogue(mailguard.checks.__doc__) == dict(KNOWN_CODES)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_policies_load(path: Path) -> None:
    policy = load_policy(path)
    assert policy.rules
    assert "example.co.jp" in policy.org.internal
    assert policy.source == str(path)


def test_builtin_rules_are_default_toml_rules() -> None:
    shipped = load_policy(ROOT / "policies" / "default.toml")
    builtin = builtin_policy()
    assert builtin.rules == shipped.rules
    assert builtin.defaults == shipped.defaults
    assert builtin.org.internal == ()


def test_full_policy_parses(tmp_path: Path) -> None:
    policy = load_policy(
        write(
            tmp_path,
            """
            [organization]
            name = "Example K.K."
            internal_domains = ["Example.CO.JP.", "*.example.co.jp", "例え.jp"]
            trusted_domains = "partner.co.jp"
            freemail_domains = ["mail.example.net"]

            [defaults]
            lang = "en"
            hold_for = "10m"
            confirm_timeout = "4h"
            on_timeout = "send"
            approvers = ["boss@example.co.jp"]

            [groups]
            sales = ["*@sales.example.co.jp", "Tanaka@example.co.jp"]

            [[rule]]
            name = "bcc-mistake"
            when = ["recipient.external_parties >= 2", "recipient.visible_external > 5"]
            action = ["zip", "bcc", "hold"]
            hold_for = "1h30m"
            options.bcc = { to_placeholder = "sender" }
            options.zip = { method = "zipcrypto", password_delay = "2m" }
            senders = ["group:sales", "*@部署.example.co.jp"]

            [[rule]]
            name = "approve-big"
            when = "recipient.external_parties >= 10 and attachment.present"
            action = "approve"

            [[exception]]
            senders = ["ceo@example.co.jp"]
            rules = ["approve-big"]
            """,
        )
    )
    assert policy.name == "Example K.K."
    assert policy.org.internal == ("example.co.jp", "*.example.co.jp", "xn--r8jz45g.jp")
    assert policy.org.trusted == ("partner.co.jp",)
    assert policy.org.freemail == ("mail.example.net",)  # added to the shipped list by checks
    assert policy.defaults.lang == "en"
    assert policy.defaults.hold_for == timedelta(minutes=10)
    assert policy.defaults.confirm_timeout == timedelta(hours=4)
    assert policy.defaults.on_timeout == "send"
    bcc, big = policy.rules
    assert bcc.gate is Gate.HOLD
    assert bcc.transforms == ("bcc", "zip")  # canonical order, whatever the list order
    assert bcc.actions == ("bcc", "zip", "hold")
    assert bcc.hold_for == timedelta(hours=1, minutes=30)
    assert bcc.options == {
        "bcc": {"to_placeholder": "sender"},
        "zip": {"method": "zipcrypto", "password_delay": 120},
    }
    assert bcc.senders == (
        "*@sales.example.co.jp",
        "tanaka@example.co.jp",
        "*@xn--ss0ao17a.example.co.jp",
    )
    assert [[str(c) for c in clause] for clause in bcc.when] == [
        ["recipient.external_parties >= 2"],
        ["recipient.visible_external > 5"],
    ]
    assert big.gate is Gate.APPROVE
    assert big.except_senders == ("ceo@example.co.jp",)
    assert bcc.except_senders == ()
    assert bcc.line == 17 and big.line == 26


def test_flat_options_go_to_the_single_transform(tmp_path: Path) -> None:
    policy = load_policy(
        write(
            tmp_path,
            """
            [[rule]]
            name = "z"
            when = "attachment.unencrypted"
            action = "zip"
            options = { method = "aes", password_to = "recipients", per_domain_passwords = true }
            """,
        )
    )
    assert policy.rules[0].options == {
        "zip": {"method": "aes", "password_to": "recipients", "per_domain_passwords": True}
    }


def test_options_as_subtable_after_rule(tmp_path: Path) -> None:
    policy = load_policy(
        write(
            tmp_path,
            """
            [[rule]]
            name = "z"
            when = "attachment.unencrypted"
            action = "zip"
            [rule.options]
            method = "zipcrypto"
            """,
        )
    )
    assert policy.rules[0].options == {"zip": {"method": "zipcrypto"}}


def test_empty_policy_is_valid(tmp_path: Path) -> None:
    policy = load_policy(write(tmp_path, "# nothing yet\n"))
    assert policy.rules == ()
    assert policy.org.internal == ()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("30s", timedelta(seconds=30)),
        ("5m", timedelta(minutes=5)),
        ("2h", timedelta(hours=2)),
        ("1d", timedelta(days=1)),
        ("1h30m", timedelta(hours=1, minutes=30)),
        (" 1d 2h ", timedelta(days=1, hours=2)),
        ("90M", timedelta(minutes=90)),
    ],
)
def test_durations(text: str, expected: timedelta) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize("text", ["", "5", "m5", "5 minutes", "5m x", "-5m", "1.5h", "5w"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError, match="cannot read duration"):
        parse_duration(text)


def test_format_duration() -> None:
    assert format_duration(timedelta(minutes=5)) == "5m"
    assert format_duration(timedelta(days=1, hours=2, seconds=3)) == "1d2h3s"
    assert format_duration(timedelta(0)) == "0s"


# Every refusal: (policy text, exact message). Lines are those of the dedented text.
ERRORS = [
    pytest.param(
        '[[rule]]\nname = "x"\nwhen = "domain.first_time"\naction =\n',
        "p.toml:4: TOML syntax error: Invalid value (column 9)",
        id="toml-syntax",
    ),
    pytest.param(
        RULE + 'action = "hold"\n',
        "p.toml:5: TOML syntax error: Cannot overwrite a value (column 16)",
        id="toml-duplicate-key",
    ),
    pytest.param(
        "[organisation]\n",
        "p.toml:1: organisation: unknown key 'organisation' (did you mean 'organization'?) "
        "(expected organization, defaults, groups, rule, exception)",
        id="unknown-top-table",
    ),
    pytest.param(
        '[[rules]]\nname = "x"\n',
        "p.toml:1: rules: unknown key 'rules' (did you mean 'rule'?) "
        "(expected organization, defaults, groups, rule, exception)",
        id="rules-plural",
    ),
    pytest.param(
        "[organization]\ninternal = []\n",
        "p.toml:2: organization.internal: unknown key 'internal' "
        "(did you mean 'internal_domains'?) "
        "(expected name, internal_domains, trusted_domains, freemail_domains)",
        id="unknown-org-key",
    ),
    pytest.param(
        '[organization]\ninternal_domains = [\n  "example.co.jp",\n  ".example.co.jp",\n]\n',
        "p.toml:4: organization.internal_domains: '.example.co.jp' is not a domain name "
        "(write '*.example.co.jp' for subdomains)",
        id="leading-dot-domain",
    ),
    pytest.param(
        '[organization]\ntrusted_domains = ["partner"]\n',
        "p.toml:2: organization.trusted_domains: 'partner' is not a domain name "
        "(expected e.g. 'example.co.jp' or '*.example.co.jp')",
        id="single-label-domain",
    ),
    pytest.param(
        '[organization]\ntrusted_domains = ["exa mple.co.jp"]\n',
        "p.toml:2: organization.trusted_domains: 'exa mple.co.jp' is not a domain name "
        "(expected e.g. 'example.co.jp' or '*.example.co.jp')",
        id="space-in-domain",
    ),
    pytest.param(
        "[organization]\ninternal_domains = 3\n",
        "p.toml:2: organization.internal_domains: expected a string or a list of strings, "
        "got an integer",
        id="domains-type",
    ),
    pytest.param(
        '[defaults]\nlang = "jp"\n',
        "p.toml:2: defaults.lang: unknown value 'jp' (expected ja, en, ja+en)",
        id="bad-lang",
    ),
    pytest.param(
        "[defaults]\nhold_for = 300\n",
        "p.toml:2: defaults.hold_for: expected a duration string like '30s', '5m', '2h', '1d', "
        "got an integer",
        id="duration-int",
    ),
    pytest.param(
        '[defaults]\nconfirm_timeout = "5 minutes"\n',
        "p.toml:2: defaults.confirm_timeout: cannot read duration '5 minutes' "
        "(expected e.g. '30s', '5m', '2h', '1d')",
        id="duration-words",
    ),
    pytest.param(
        '[defaults]\nhold_for = "0s"\n',
        "p.toml:2: defaults.hold_for: duration '0s' out of range (more than 0s, at most 365d)",
        id="duration-zero",
    ),
    pytest.param(
        '[defaults]\non_timeout = "release"\n',
        "p.toml:2: defaults.on_timeout: unknown value 'release' (expected cancel, send)",
        id="bad-on-timeout",
    ),
    pytest.param(
        '[defaults]\napprovers = ["boss"]\n',
        "p.toml:2: defaults.approvers: 'boss' is not a mail address",
        id="bad-approver",
    ),
    pytest.param(
        '[defaults]\nreject_message = "宛先が存在しません"\n',
        "p.toml:2: defaults.reject_message: must be plain ASCII (it goes into the SMTP 5xx "
        "reply); explain in Japanese in the rule's description",
        id="reject-message-japanese",
    ),
    pytest.param(
        '[groups]\nsales = ["sales.example.co.jp"]\n',
        "p.toml:2: groups.sales: sender pattern 'sales.example.co.jp' must look like an "
        "address: 'tanaka@example.co.jp', '*@sales.example.co.jp' or 'group:NAME'",
        id="group-member-not-address",
    ),
    pytest.param(
        '[groups]\na = ["x@example.co.jp"]\nb = ["group:a"]\n',
        "p.toml:3: groups.b: 'group:a': a group cannot contain another group",
        id="nested-group",
    ),
    pytest.param(
        '[[rule]]\nname = "x"\naction = "hold"\n',
        "p.toml:1: rule[1]: missing key 'when' (every rule needs name, when and action)",
        id="missing-when",
    ),
    pytest.param(
        RULE + '\n[[rule]]\nname = "r2"\nwhen = "domain.first_time"\n',
        "p.toml:6: rule[2]: missing key 'action' (every rule needs name, when and action)",
        id="missing-action-second-rule",
    ),
    pytest.param(
        RULE + '\n[[rule]]\nname = "r1"\nwhen = "domain.lookalike"\naction = "hold"\n',
        "p.toml:7: rule[2].name: duplicate rule name 'r1' (also rule[1])",
        id="duplicate-name",
    ),
    pytest.param(
        '[[rule]]\nname = "bcc mistake"\nwhen = "domain.first_time"\naction = "hold"\n',
        "p.toml:2: rule[1].name: rule name 'bcc mistake': use letters, digits, '.', '_', '-' "
        "(it is logged and counted)",
        id="bad-rule-name",
    ),
    pytest.param(
        RULE + 'acton = "hold"\n',
        "p.toml:5: rule[1].acton: unknown key 'acton' (did you mean 'action'?) (expected name, "
        "description, when, action, hold_for, confirm_timeout, on_timeout, approvers, "
        "reject_message, senders, except_senders, options, allow_send_now)",
        id="unknown-rule-key",
    ),
    pytest.param(
        RULE
        + '\n[[rule]]\nname = "r2"\nwhen = "attachment.unencrypted"\naction = "zipp"\n'
        + '\n[[rule]]\nname = "r3"\nwhen = "domain.first_time"\naction = "hold"\n',
        "p.toml:9: rule[2].action: unknown action 'zipp' "
        "(expected pass, bcc, zip, hold, confirm, approve, reject)",
        id="unknown-action",
    ),
    pytest.param(
        '[[rule]]\nname = "x"\nwhen = "domain.first_time"\naction = [\n  "bcc",\n  "zipp",\n]\n',
        "p.toml:6: rule[1].action: unknown action 'zipp' "
        "(expected pass, bcc, zip, hold, confirm, approve, reject)",
        id="unknown-action-in-multiline-list",
    ),
    pytest.param(
        '[[rule]]\nname = "x"\nwhen = "domain.first_time"\naction = ["hold", "confirm"]\n',
        "p.toml:4: rule[1].action: at most one of hold, confirm, approve, reject per rule "
        "(got hold, confirm); the strongest gate of all matching rules wins anyway",
        id="two-gates",
    ),
    pytest.param(
        '[[rule]]\nname = "x"\nwhen = "domain.first_time"\naction = ["pass", "bcc"]\n',
        "p.toml:4: rule[1].action: 'pass' cannot be combined with other actions",
        id="pass-combined",
    ),
    pytest.param(
        '[[rule]]\nname = "x"\nwhen = "domain.first_time"\naction = ["bcc", "bcc"]\n',
        "p.toml:4: rule[1].action: an action is listed twice",
        id="action-twice",
    ),
    pytest.param(
        '[[rule]]\nname = "x"\nwhen = "domain.first_time"\naction = []\n',
        "p.toml:4: rule[1].action: must name an action "
        "(pass, bcc, zip, hold, confirm, approve, reject)",
        id="action-empty",
    ),
    pytest.param(
        '[[rule]]\nname = "x"\nwhen = "domain.frist_time"\naction = "hold"\n',
        "p.toml:3: rule[1].when: unknown finding code 'domain.frist_time' "
        "(did you mean 'domain.first_time'?)",
        id="unknown-code",
    ),
    pytest.param(
        '[[rule]]\nname = "x"\nwhen = [\n  "domain.first_time",\n  "visible_external >= 2",\n]\n'
        'action = "hold"\n',
        "p.toml:5: rule[1].when: cannot read condition 'visible_external >= 2' (expected CODE "
        "[OP N] with OP one of >=, >, <=, <, ==, !=, e.g. 'recipient.external_parties >= 2')",
        id="bad-condition-in-list",
    ),
    pytest.param(
        '[[rule]]\nname = "x"\nwhen = "recipient.external_parties => 2"\naction = "hold"\n',
        "p.toml:3: rule[1].when: cannot read condition 'recipient.external_parties => 2' "
        "(expected CODE [OP N] with OP one of >=, >, <=, <, ==, !=, "
        "e.g. 'recipient.external_parties >= 2')",
        id="bad-operator",
    ),
    pytest.param(
        '[[rule]]\nname = "x"\nwhen = "domain.first_time or domain.lookalike"\naction = "hold"\n',
        "p.toml:3: rule[1].when: 'domain.first_time or domain.lookalike': write 'any of' as a "
        'list: when = ["a", "b"]',
        id="or-in-string",
    ),
    pytest.param(
        '[[rule]]\nname = "x"\nwhen = "recipient.external < 1"\naction = "hold"\n',
        "p.toml:3: rule[1].when: 'recipient.external < 1' can never match: a rule only sees "
        "findings that are present (count >= 1)",
        id="never-matches",
    ),
    pytest.param(
        '[[rule]]\nname = "x"\nwhen = []\naction = "hold"\n',
        "p.toml:3: rule[1].when: must name at least one finding code",
        id="when-empty",
    ),
    pytest.param(
        '[[rule]]\nname = "x"\nwhen = 2\naction = "hold"\n',
        "p.toml:3: rule[1].when: expected a string or a list of strings, got an integer",
        id="when-type",
    ),
    pytest.param(
        RULE + 'hold_for = "5m"\n',
        "p.toml:5: rule[1].hold_for: only used with action 'hold'",
        id="hold-for-on-confirm",
    ),
    pytest.param(
        '[[rule]]\nname = "x"\nwhen = "domain.first_time"\naction = "hold"\n'
        'confirm_timeout = "1h"\n',
        "p.toml:5: rule[1].confirm_timeout: only used with action 'confirm' or 'approve'",
        id="timeout-on-hold",
    ),
    pytest.param(
        RULE + 'reject_message = "no"\n',
        "p.toml:5: rule[1].reject_message: only used with action 'reject'",
        id="reject-message-on-confirm",
    ),
    pytest.param(
        RULE + 'options = { method = "aes" }\n',
        "p.toml:5: rule[1].options: only used with action 'bcc' or 'zip'",
        id="options-without-transform",
    ),
    pytest.param(
        '[[rule]]\nname = "x"\nwhen = "domain.first_time"\naction = "approve"\n',
        "p.toml:4: rule[1].action: action 'approve' needs approvers (in the rule or in [defaults])",
        id="approve-without-approvers",
    ),
    pytest.param(
        '[[rule]]\nname = "x"\nwhen = "domain.first_time"\naction = "hold"\nhold_for = "5 mins"\n',
        "p.toml:5: rule[1].hold_for: cannot read duration '5 mins' "
        "(expected e.g. '30s', '5m', '2h', '1d')",
        id="rule-duration",
    ),
    pytest.param(
        '[[rule]]\nname = "x"\nwhen = "attachment.unencrypted"\naction = "zip"\n'
        'options = { method = "zipcryto" }\n',
        "p.toml:5: rule[1].options.method: unknown value 'zipcryto' (did you mean 'zipcrypto'?) "
        "(expected aes, zipcrypto)",
        id="zip-method",
    ),
    pytest.param(
        '[[rule]]\nname = "x"\nwhen = "attachment.unencrypted"\naction = "zip"\n'
        '[rule.options]\npasword_to = "sender"\n',
        "p.toml:6: rule[1].options.pasword_to: unknown zip option 'pasword_to' (did you mean "
        "'password_to'?) (expected method, password_to, password_delay, per_domain_passwords, "
        "filename_charset, zip_name, zip_name_multi, password_length, password_alphabet, select, "
        "min_size, compresslevel, lang)",
        id="zip-option-typo-subtable",
    ),
    pytest.param(
        '[[rule]]\nname = "x"\nwhen = "attachment.unencrypted"\naction = ["bcc", "zip"]\n'
        'options = { method = "aes" }\n',
        "p.toml:5: rule[1].options: with several transforms, give options per transform: "
        "options = { zip = { ... }, bcc = { ... } }",
        id="flat-options-two-transforms",
    ),
    pytest.param(
        '[[rule]]\nname = "x"\nwhen = "attachment.unencrypted"\naction = "bcc"\n'
        'options = { zip = { method = "aes" } }\n',
        "p.toml:5: rule[1].options.zip: options for 'zip', but the rule's action has no 'zip'",
        id="options-for-missing-transform",
    ),
    pytest.param(
        '[[rule]]\nname = "x"\nwhen = "attachment.unencrypted"\naction = "zip"\n'
        "options = { password_length = 4 }\n",
        "p.toml:5: rule[1].options.password_length: expected a whole number from 8 to 128",
        id="password-length",
    ),
    pytest.param(
        '[[rule]]\nname = "x"\nwhen = "recipient.visible_external"\naction = "bcc"\n'
        'options = { keep_internal_visible = "yes" }\n',
        "p.toml:5: rule[1].options.keep_internal_visible: expected true or false, got a string",
        id="bool-option",
    ),
    pytest.param(
        RULE + 'senders = ["group:sale"]\n\n[groups]\nsales = ["*@sales.example.co.jp"]\n',
        "p.toml:5: rule[1].senders: unknown group 'sale' (did you mean 'sales'?) "
        "(define it under [groups])",
        id="unknown-group",
    ),
    pytest.param(
        RULE + "senders = []\n",
        "p.toml:5: rule[1].senders: an empty list would match nobody; "
        "remove the key to match everyone",
        id="empty-senders",
    ),
    pytest.param(
        RULE + 'except_senders = ["tanaka"]\n',
        "p.toml:5: rule[1].except_senders: sender pattern 'tanaka' must look like an address: "
        "'tanaka@example.co.jp', '*@sales.example.co.jp' or 'group:NAME'",
        id="bad-except-sender",
    ),
    pytest.param(
        RULE + '\n[[exception]]\nsenders = ["a@example.co.jp"]\nrules = ["r2"]\n',
        "p.toml:8: exception[1].rules: unknown rule 'r2'",
        id="exception-unknown-rule",
    ),
    pytest.param(
        RULE + '\n[[exception]]\nrules = ["r1"]\n',
        "p.toml:6: exception[1]: missing key 'senders' (who is exempt)",
        id="exception-no-senders",
    ),
    pytest.param(
        "[rule]\nname = 1\n",
        "p.toml:1: rule: rules are written as [[rule]] tables",
        id="rule-not-array",
    ),
    pytest.param(
        RULE + 'description = """\nline one\nname = "fake"\n"""\nwhen2 = 1\n',
        "p.toml:9: rule[1].when2: unknown key 'when2' (did you mean 'when'?) (expected name, "
        "description, when, action, hold_for, confirm_timeout, on_timeout, approvers, "
        "reject_message, senders, except_senders, options, allow_send_now)",
        id="key-after-multiline-string",
    ),
]


@pytest.mark.parametrize(("text", "message"), ERRORS)
def test_refused_with_file_line_key(tmp_path: Path, text: str, message: str) -> None:
    assert refused(tmp_path, text) == message


def test_error_carries_fields(tmp_path: Path) -> None:
    path = write(tmp_path, RULE.replace('"confirm"', '"zipp"'))
    with pytest.raises(ConfigError) as err:
        load_policy(path)
    assert (err.value.file, err.value.line, err.value.key) == (str(path), 4, "rule[1].action")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_policy(tmp_path / "nope.toml")
    assert (
        str(err.value)
        == f"{tmp_path}/nope.toml: cannot read policy file: No such file or directory"
    )


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "sjis.toml"
    path.write_bytes('[organization]\nname = "株式会社"\n'.encode("cp932"))
    with pytest.raises(ConfigError) as err:
        load_policy(path)
    assert str(err.value) == f"{path}:2: not UTF-8 (TOML files must be UTF-8)"
