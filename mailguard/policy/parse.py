"""Policy files: TOML text → a checked Policy, or a ConfigError naming file, line and key.

Every mistake an admin can make in a policy file is refused here, at start-up or by
`mailguard policy check`, never discovered on a live message. Syntax errors come with tomllib's
line; for semantic errors the key's line is found in the raw text (`_Locator`).
"""

from __future__ import annotations

import difflib
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any, NoReturn

import idna

from mailguard.checks.context import Org
from mailguard.errors import ConfigError
from mailguard.policy.codes import KNOWN_CODES
from mailguard.policy.decision import Gate
from mailguard.policy.model import (
    ACTIONS,
    GATES,
    TRANSFORMS,
    Condition,
    Defaults,
    Exemption,
    Policy,
    Rule,
    When,
    with_patterns,
)

Path_ = tuple[str | int, ...]  # ("rule", 1, "action"): ints are 0-based array indexes

TOP_KEYS = ("organization", "defaults", "groups", "rule", "exception")
ORG_KEYS = ("name", "internal_domains", "trusted_domains", "freemail_domains")
DEFAULT_KEYS = ("lang", "hold_for", "confirm_timeout", "on_timeout", "approvers", "reject_message")
RULE_KEYS = (
    "name",
    "description",
    "when",
    "action",
    "hold_for",
    "confirm_timeout",
    "on_timeout",
    "approvers",
    "reject_message",
    "senders",
    "except_senders",
    "options",
    "allow_send_now",
)
EXCEPTION_KEYS = ("name", "description", "senders", "rules")
ON_TIMEOUT = ("cancel", "send")
LANGS = ("ja", "en", "ja+en")

# Transform options the actions stage understands (mailguard/actions/zip.py, bcc.py docstrings):
# key -> allowed values, "duration" (stored as seconds), "bool", "str", or an int range.
TRANSFORM_OPTIONS: dict[str, dict[str, tuple[str, ...] | str | range]] = {
    "zip": {
        "method": ("aes", "zipcrypto"),
        "password_to": ("sender", "recipients"),
        "password_delay": "duration",
        "per_domain_passwords": "bool",
        "filename_charset": ("utf-8", "cp932"),
        "zip_name": "str",
        "zip_name_multi": "str",
        "password_length": range(8, 129),
        "password_alphabet": "str",
        "select": ("unencrypted", "all"),
        "min_size": range(0, 1 << 40),
        "compresslevel": range(0, 10),
        "lang": ("ja", "en", "ja+en"),
    },
    "bcc": {
        "keep_internal_visible": "bool",
        "to_placeholder": ("undisclosed", "sender"),
    },
}

_DURATION_RE = re.compile(r"(\d+)\s*([smhd])")
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_MAX_DURATION = timedelta(days=365)
_COND_RE = re.compile(r"([a-z][a-z0-9_]*\.[a-z0-9_]+)(?:\s*(>=|<=|==|!=|>|<)\s*(-?\d+))?")
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_LABEL_RE = re.compile(r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?")
_TOML_POS_RE = re.compile(r"\s*\(at line (\d+), column (\d+)\)$")
_LOCAL_RE = re.compile(r"[^\s@\"<>(),;:\\\[\]]+")
_BARE_KEY = r'(?:[A-Za-z0-9_-]+|"[^"]*"|\'[^\']*\')'
_KEY_RE = re.compile(rf"({_BARE_KEY}(?:\s*\.\s*{_BARE_KEY})*)\s*=")
_AOT_RE = re.compile(rf"\[\[\s*({_BARE_KEY}(?:\s*\.\s*{_BARE_KEY})*)\s*\]\]")
_TABLE_RE = re.compile(rf"\[\s*({_BARE_KEY}(?:\s*\.\s*{_BARE_KEY})*)\s*\]")


def load_policy(path: str | Path) -> Policy:
    """Read and check one policy file. Raises ConfigError (file, line, key) when it is unusable."""
    source = str(path)
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read policy file: {e.strerror or e}", file=source) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise ConfigError("not UTF-8 (TOML files must be UTF-8)", file=source, line=line) from None
    return parse_policy(text, source)


def parse_policy(text: str, source: str = "<string>") -> Policy:
    """Check a policy given as TOML text; `source` names it in error messages."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        msg = str(e)
        m = _TOML_POS_RE.search(msg)
        line = int(m.group(1)) if m else None
        if m:
            msg = f"{msg[: m.start()]} (column {m.group(2)})"
        raise ConfigError(f"TOML syntax error: {msg}", file=source, line=line) from None
    return _Parser(text, source).policy(doc)


def domain_pattern(value: str, key: str = "") -> str:
    """One domain or `*.domain` from outside a file (e.g. `--internal`) → A-label form."""
    return _Parser("", "").domain((key,) if key else (), value)


def parse_duration(text: str) -> timedelta:
    """'30s', '5m', '2h', '1d' or combinations like '1h30m'. Raises ValueError."""
    s = text.strip().lower()
    pos, total = 0, 0
    for m in _DURATION_RE.finditer(s):
        if s[pos : m.start()].strip():
            break
        total += int(m.group(1)) * _DURATION_UNITS[m.group(2)]
        pos = m.end()
    if not s or pos == 0 or s[pos:].strip():
        raise ValueError(f"cannot read duration {text!r} (expected e.g. '30s', '5m', '2h', '1d')")
    return timedelta(seconds=total)


def format_duration(d: timedelta) -> str:
    secs = int(d.total_seconds())
    out = ""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if secs >= size:
            out += f"{secs // size}{unit}"
            secs %= size
    return out or "0s"


def _suggest(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _keystr(path: Path_) -> str:
    out = ""
    for p in path:
        if isinstance(p, int):
            out += f"[{p + 1}]"  # admins count rules from 1
        else:
            out += f".{p}" if out else p
    return out


def _unquote(key: str) -> tuple[str, ...]:
    parts = re.findall(r'"([^"]*)"|\'([^\']*)\'|([A-Za-z0-9_-]+)', key)
    return tuple(a or b or c for a, b, c in parts)


class _Locator:
    """Maps key paths to the line where they are written (first occurrence), by a light scan."""

    def __init__(self, text: str):
        self.lines = text.splitlines()
        self.keys: dict[Path_, int] = {}
        aot_count: dict[tuple[str, ...], int] = {}
        ctx: Path_ = ()
        in_multiline: str | None = None
        for n, raw in enumerate(self.lines, 1):
            line = raw.strip()
            if in_multiline:
                if line.count(in_multiline) % 2 == 1:
                    in_multiline = None
                continue
            if not line or line.startswith("#"):
                continue
            if m := _AOT_RE.match(line):
                name = _unquote(m.group(1))
                idx = aot_count.get(name, 0)
                aot_count[name] = idx + 1
                ctx = (*self._resolve(name[:-1], aot_count), name[-1], idx)
                self.keys.setdefault(ctx[:-1], n)  # the array itself: its first table
                self.keys.setdefault(ctx, n)
                continue
            if m := _TABLE_RE.match(line):
                ctx = self._resolve(_unquote(m.group(1)), aot_count)
                self.keys.setdefault(ctx, n)
                continue
            if m := _KEY_RE.match(line):
                self.keys.setdefault((*ctx, *_unquote(m.group(1))), n)
                rest = line[m.end() :]
                for delim in ('"""', "'''"):
                    if rest.count(delim) % 2 == 1:
                        in_multiline = delim

    @staticmethod
    def _resolve(name: tuple[str, ...], aot_count: Mapping[tuple[str, ...], int]) -> Path_:
        # `[rule.options]` after the 3rd `[[rule]]` means rule[2].options
        out: list[str | int] = []
        for i, part in enumerate(name):
            out.append(part)
            if (n := aot_count.get(name[: i + 1])) is not None:
                out.append(n - 1)
        return tuple(out)

    def line(self, path: Path_, needle: str | None = None) -> int | None:
        for end in range(len(path), 0, -1):
            if (n := self.keys.get(path[:end])) is not None:
                break
        else:
            return None
        if needle is not None:
            stop = min((v for v in self.keys.values() if v > n), default=len(self.lines) + 1)
            quoted = (f'"{needle}"', f"'{needle}'")
            for i in range(n, stop):
                if any(q in self.lines[i - 1] for q in quoted):
                    return i
        return n


class _Parser:
    def __init__(self, text: str, source: str):
        self.source = source
        self.loc = _Locator(text)
        self.groups: dict[str, tuple[str, ...]] = {}

    def fail(self, path: Path_, message: str, needle: str | None = None) -> NoReturn:
        raise ConfigError(
            message, file=self.source, line=self.loc.line(path, needle), key=_keystr(path)
        )

    # ---- typed getters ------------------------------------------------------------------

    def table(self, path: Path_, value: Any, allowed: tuple[str, ...]) -> dict[str, Any]:
        if not isinstance(value, dict):
            self.fail(path, f"expected a table, got {_tname(value)}")
        for key in value:
            if key not in allowed:
                self.fail(
                    (*path, key),
                    f"unknown key {key!r}{_suggest(key, allowed)} (expected {', '.join(allowed)})",
                )
        return value

    def string(self, path: Path_, value: Any) -> str:
        if not isinstance(value, str):
            self.fail(path, f"expected a string, got {_tname(value)}")
        return value

    def strings(self, path: Path_, value: Any) -> list[str]:
        """A string or a list of strings (a single string is a list of one)."""
        if isinstance(value, str):
            return [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            self.fail(path, f"expected a string or a list of strings, got {_tname(value)}")
        return value

    def choice(self, path: Path_, value: Any, allowed: tuple[str, ...]) -> str:
        s = self.string(path, value)
        if s not in allowed:
            self.fail(
                path, f"unknown value {s!r}{_suggest(s, allowed)} (expected {', '.join(allowed)})"
            )
        return s

    def duration(self, path: Path_, value: Any) -> timedelta:
        if not isinstance(value, str):
            self.fail(
                path,
                f"expected a duration string like '30s', '5m', '2h', '1d', got {_tname(value)}",
            )
        try:
            d = parse_duration(value)
        except ValueError as e:
            self.fail(path, str(e))
        if d <= timedelta(0) or d > _MAX_DURATION:
            self.fail(path, f"duration {value!r} out of range (more than 0s, at most 365d)")
        return d

    def domain(self, path: Path_, value: str) -> str:
        """A domain or `*.domain` pattern → lowercase A-label form."""
        s = value.strip().lower().rstrip(".")
        wild = s.startswith("*.")
        body = s[2:] if wild else s
        if body.startswith(".") or body.startswith("@"):
            hint = (
                f" (write '*.{body.lstrip('.@')}' for subdomains)" if body.startswith(".") else ""
            )
            self.fail(path, f"{value!r} is not a domain name{hint}", needle=value)
        try:
            ascii_ = body if body.isascii() else idna.encode(body, uts46=True).decode("ascii")
        except idna.IDNAError as e:
            self.fail(path, f"{value!r} is not a valid domain name: {e}", needle=value)
        labels = ascii_.split(".")
        if "*" in ascii_ or len(labels) < 2 or not all(_LABEL_RE.fullmatch(lb) for lb in labels):
            self.fail(
                path,
                f"{value!r} is not a domain name "
                "(expected e.g. 'example.co.jp' or '*.example.co.jp')",
                needle=value,
            )
        return f"*.{ascii_}" if wild else ascii_

    def domains(self, path: Path_, value: Any) -> tuple[str, ...]:
        return tuple(dict.fromkeys(self.domain(path, v) for v in self.strings(path, value)))

    def sender_patterns(self, path: Path_, value: Any, *, groups: bool = True) -> tuple[str, ...]:
        out: list[str] = []
        for raw in self.strings(path, value):
            if raw.startswith("group:"):
                name = raw[len("group:") :]
                if not groups:
                    self.fail(path, f"{raw!r}: a group cannot contain another group", needle=raw)
                if name not in self.groups:
                    self.fail(
                        path,
                        f"unknown group {name!r}{_suggest(name, self.groups)} "
                        "(define it under [groups])",
                        needle=raw,
                    )
                out.extend(self.groups[name])
                continue
            out.append(self.sender_pattern(path, raw))
        return tuple(dict.fromkeys(out))

    def sender_pattern(self, path: Path_, raw: str) -> str:
        s = raw.strip().lower()
        local, at, dom = s.rpartition("@")
        if not at or not local or not dom or any(c.isspace() for c in s):
            self.fail(
                path,
                f"sender pattern {raw!r} must look like an address: 'tanaka@example.co.jp', "
                "'*@sales.example.co.jp' or 'group:NAME'",
                needle=raw,
            )
        if not dom.isascii():
            labels = dom.split(".")
            try:
                dom = ".".join(
                    lb if lb == "*" or lb.isascii() else idna.encode(lb, uts46=True).decode("ascii")
                    for lb in labels
                )
            except idna.IDNAError as e:
                self.fail(path, f"{raw!r}: bad domain: {e}", needle=raw)
        return f"{local}@{dom}"

    def addresses(self, path: Path_, value: Any) -> tuple[str, ...]:
        out = []
        for raw in self.strings(path, value):
            local, at, dom = raw.strip().rpartition("@")
            if not at or not _LOCAL_RE.fullmatch(local) or "*" in raw:
                self.fail(path, f"{raw!r} is not a mail address", needle=raw)
            out.append(f"{local}@{self.domain(path, dom)}")
        return tuple(dict.fromkeys(out))

    # ---- sections -----------------------------------------------------------------------

    def policy(self, doc: dict[str, Any]) -> Policy:
        self.table((), doc, TOP_KEYS)
        org_t = self.table(("organization",), doc.get("organization", {}), ORG_KEYS)
        internal = self.domains(
            ("organization", "internal_domains"), org_t.get("internal_domains", [])
        )
        trusted = self.domains(
            ("organization", "trusted_domains"), org_t.get("trusted_domains", [])
        )
        extra_free = self.domains(
            ("organization", "freemail_domains"), org_t.get("freemail_domains", [])
        )
        name = self.string(("organization", "name"), org_t.get("name", ""))
        # the shipped free-mail list (mailguard/data/freemail.txt) always applies; these add to it
        org = Org(internal=internal, trusted=trusted, freemail=extra_free)

        defaults = self.defaults(doc.get("defaults", {}))

        groups_t = doc.get("groups", {})
        if not isinstance(groups_t, dict):
            self.fail(("groups",), f"expected a table, got {_tname(groups_t)}")
        for gname, members in groups_t.items():
            if not _NAME_RE.fullmatch(gname):
                self.fail(
                    ("groups", gname), f"group name {gname!r}: use letters, digits, '.', '_', '-'"
                )
            self.groups[gname] = self.sender_patterns(("groups", gname), members, groups=False)

        rules_v = doc.get("rule", [])
        if not isinstance(rules_v, list):
            self.fail(("rule",), "rules are written as [[rule]] tables")
        rules = [self.rule(i, r, defaults) for i, r in enumerate(rules_v)]
        seen: dict[str, int] = {}
        for i, r in enumerate(rules):
            if r.name in seen:
                self.fail(
                    ("rule", i, "name"),
                    f"duplicate rule name {r.name!r} (also rule[{seen[r.name] + 1}])",
                )
            seen[r.name] = i

        exc_v = doc.get("exception", [])
        if not isinstance(exc_v, list):
            self.fail(("exception",), "exceptions are written as [[exception]] tables")
        exceptions = tuple(self.exception(i, e, seen) for i, e in enumerate(exc_v))
        for ex in exceptions:
            rules = [
                replace(r, except_senders=tuple(dict.fromkeys((*r.except_senders, *ex.senders))))
                if not ex.rules or r.name in ex.rules
                else r
                for r in rules
            ]
        return Policy(
            org=org,
            rules=tuple(with_patterns(r) for r in rules),
            defaults=defaults,
            source=self.source,
            name=name,
            groups=dict(self.groups),
            exceptions=exceptions,
        )

    def defaults(self, value: Any) -> Defaults:
        p: Path_ = ("defaults",)
        t = self.table(p, value, DEFAULT_KEYS)
        d = Defaults()
        if "lang" in t:
            d = replace(d, lang=self.choice((*p, "lang"), t["lang"], LANGS))
        if "hold_for" in t:
            d = replace(d, hold_for=self.duration((*p, "hold_for"), t["hold_for"]))
        if "confirm_timeout" in t:
            d = replace(
                d, confirm_timeout=self.duration((*p, "confirm_timeout"), t["confirm_timeout"])
            )
        if "on_timeout" in t:
            d = replace(d, on_timeout=self.choice((*p, "on_timeout"), t["on_timeout"], ON_TIMEOUT))
        if "approvers" in t:
            d = replace(d, approvers=self.addresses((*p, "approvers"), t["approvers"]))
        if "reject_message" in t:
            d = replace(
                d, reject_message=self.reject_message((*p, "reject_message"), t["reject_message"])
            )
        return d

    def reject_message(self, path: Path_, value: Any) -> str:
        s = " ".join(self.string(path, value).split())
        if not s:
            self.fail(path, "must not be empty")
        if not s.isascii() or not s.isprintable():
            # SMTP replies are ASCII: a 5xx text in Japanese would reach the sender as mojibake
            self.fail(
                path,
                "must be plain ASCII (it goes into the SMTP 5xx reply); "
                "explain in Japanese in the rule's description",
            )
        if len(s) > 400:
            self.fail(path, "too long for an SMTP reply (at most 400 characters)")
        return s

    def when(self, path: Path_, value: Any) -> When:
        items = self.strings(path, value)
        if not items:
            self.fail(path, "must name at least one finding code")
        clauses: list[tuple[Condition, ...]] = []
        for item in items:
            if re.search(r"\s(or|OR|\|\|)\s", item):
                self.fail(
                    path, f'{item!r}: write \'any of\' as a list: when = ["a", "b"]', needle=item
                )
            conds: list[Condition] = []
            for part in re.split(r"\s+(?:and|AND|&&)\s+", item.strip()):
                conds.append(self.condition(path, part.strip(), item))
            clauses.append(tuple(conds))
        return tuple(clauses)

    def condition(self, path: Path_, text: str, item: str) -> Condition:
        m = _COND_RE.fullmatch(text)
        if not m:
            self.fail(
                path,
                f"cannot read condition {text!r} (expected CODE [OP N] with OP one of "
                ">=, >, <=, <, ==, !=, e.g. 'recipient.external_parties >= 2')",
                needle=item,
            )
        code = m.group(1)
        if code not in KNOWN_CODES:
            self.fail(
                path, f"unknown finding code {code!r}{_suggest(code, KNOWN_CODES)}", needle=item
            )
        cond = Condition(code, m.group(2) or ">=", int(m.group(3)) if m.group(3) else 1)
        if cond.value < 0 or not any(cond.test(n) for n in (1, cond.value, cond.value + 1)):
            self.fail(
                path,
                f"{str(cond)!r} can never match: "
                "a rule only sees findings that are present (count >= 1)",
                needle=item,
            )
        return cond

    def actions(self, path: Path_, value: Any) -> tuple[Gate, tuple[str, ...]]:
        names = self.strings(path, value)
        if not names:
            self.fail(path, f"must name an action ({', '.join(ACTIONS)})")
        for a in names:
            if a not in ACTIONS:
                self.fail(path, f"unknown action {a!r} (expected {', '.join(ACTIONS)})", needle=a)
        if len(set(names)) != len(names):
            self.fail(path, "an action is listed twice")
        if "pass" in names and len(names) > 1:
            self.fail(path, "'pass' cannot be combined with other actions")
        gates = [a for a in names if a in GATES and a != "pass"]
        if len(gates) > 1:
            self.fail(
                path,
                f"at most one of hold, confirm, approve, reject per rule (got {', '.join(gates)}); "
                "the strongest gate of all matching rules wins anyway",
            )
        gate = GATES[gates[0]] if gates else Gate.PASS
        # transforms in the policy's canonical order (bcc before zip), whatever the list order
        return gate, tuple(t for t in TRANSFORMS if t in names)

    def rule(self, i: int, value: Any, defaults: Defaults) -> Rule:
        p: Path_ = ("rule", i)
        t = self.table(p, value, RULE_KEYS)
        for key in ("name", "when", "action"):
            if key not in t:
                self.fail(p, f"missing key {key!r} (every rule needs name, when and action)")
        name = self.string((*p, "name"), t["name"])
        if not _NAME_RE.fullmatch(name):
            self.fail(
                (*p, "name"),
                f"rule name {name!r}: use letters, digits, '.', '_', '-' "
                "(it is logged and counted)",
            )
        when = self.when((*p, "when"), t["when"])
        gate, transforms = self.actions((*p, "action"), t["action"])
        only = {
            "hold_for": (gate is Gate.HOLD, "'hold'"),
            "confirm_timeout": (gate in (Gate.CONFIRM, Gate.APPROVE), "'confirm' or 'approve'"),
            "on_timeout": (gate in (Gate.CONFIRM, Gate.APPROVE), "'confirm' or 'approve'"),
            "approvers": (gate is Gate.APPROVE, "'approve'"),
            "reject_message": (gate is Gate.REJECT, "'reject'"),
            "options": (bool(transforms), "'bcc' or 'zip'"),
            "allow_send_now": (gate is Gate.HOLD, "'hold'"),
        }
        for key, (ok, what) in only.items():
            if key in t and not ok:
                self.fail((*p, key), f"only used with action {what}")
        rule = Rule(
            name=name,
            when=when,
            gate=gate,
            transforms=transforms,
            description=self.string((*p, "description"), t.get("description", "")),
            line=self.loc.line(p),
        )
        if "hold_for" in t:
            rule = replace(rule, hold_for=self.duration((*p, "hold_for"), t["hold_for"]))
        if "confirm_timeout" in t:
            rule = replace(
                rule, confirm_timeout=self.duration((*p, "confirm_timeout"), t["confirm_timeout"])
            )
        if "on_timeout" in t:
            rule = replace(
                rule, on_timeout=self.choice((*p, "on_timeout"), t["on_timeout"], ON_TIMEOUT)
            )
        if "approvers" in t:
            rule = replace(rule, approvers=self.addresses((*p, "approvers"), t["approvers"]))
        if gate is Gate.APPROVE and not (rule.approvers or defaults.approvers):
            self.fail(
                (*p, "action"), "action 'approve' needs approvers (in the rule or in [defaults])"
            )
        if "reject_message" in t:
            rule = replace(
                rule,
                reject_message=self.reject_message((*p, "reject_message"), t["reject_message"]),
            )
        if "senders" in t:
            senders = self.sender_patterns((*p, "senders"), t["senders"])
            if not senders:
                self.fail(
                    (*p, "senders"),
                    "an empty list would match nobody; remove the key to match everyone",
                )
            rule = replace(rule, senders=senders)
        if "except_senders" in t:
            rule = replace(
                rule,
                except_senders=self.sender_patterns((*p, "except_senders"), t["except_senders"]),
            )
        if "options" in t:
            rule = replace(rule, options=self.options((*p, "options"), t["options"], transforms))
        if "allow_send_now" in t:
            v = t["allow_send_now"]
            if not isinstance(v, bool):
                self.fail((*p, "allow_send_now"), "expected true or false")
            rule = replace(rule, allow_send_now=v)
        return rule

    def options(
        self, path: Path_, value: Any, transforms: tuple[str, ...]
    ) -> dict[str, dict[str, Any]]:
        if not isinstance(value, dict):
            self.fail(path, f"expected a table, got {_tname(value)}")
        per_transform = bool(value) and all(
            k in TRANSFORMS and isinstance(v, dict) for k, v in value.items()
        )
        if per_transform:
            for k in value:
                if k not in transforms:
                    self.fail((*path, k), f"options for {k!r}, but the rule's action has no {k!r}")
            raw = value
        elif len(transforms) == 1:
            raw = {transforms[0]: value}
        else:
            self.fail(
                path,
                "with several transforms, give options per transform: "
                "options = { zip = { ... }, bcc = { ... } }",
            )
        out: dict[str, dict[str, Any]] = {}
        for tname, opts in raw.items():
            spec = TRANSFORM_OPTIONS[tname]
            base = (*path, tname) if per_transform else path
            checked: dict[str, Any] = {}
            for key, v in opts.items():
                kp = (*base, key)
                if key not in spec:
                    self.fail(
                        kp,
                        f"unknown {tname} option {key!r}{_suggest(key, spec)} "
                        f"(expected {', '.join(spec)})",
                    )
                kind = spec[key]
                if isinstance(kind, tuple):
                    checked[key] = self.choice(kp, v, kind)
                elif kind == "duration":
                    checked[key] = int(self.duration(kp, v).total_seconds())
                elif kind == "bool":
                    if not isinstance(v, bool):
                        self.fail(kp, f"expected true or false, got {_tname(v)}")
                    checked[key] = v
                elif isinstance(kind, range):
                    if not isinstance(v, int) or isinstance(v, bool) or v not in kind:
                        self.fail(
                            kp, f"expected a whole number from {kind.start} to {kind.stop - 1}"
                        )
                    checked[key] = v
                else:
                    checked[key] = self.string(kp, v)
            out[tname] = checked
        return out

    def exception(self, i: int, value: Any, rule_names: Mapping[str, int]) -> Exemption:
        p: Path_ = ("exception", i)
        t = self.table(p, value, EXCEPTION_KEYS)
        if "senders" not in t:
            self.fail(p, "missing key 'senders' (who is exempt)")
        senders = self.sender_patterns((*p, "senders"), t["senders"])
        if not senders:
            self.fail((*p, "senders"), "must name at least one sender")
        names = self.strings((*p, "rules"), t.get("rules", []))
        for n in names:
            if n not in rule_names:
                self.fail((*p, "rules"), f"unknown rule {n!r}{_suggest(n, rule_names)}", needle=n)
        self.string((*p, "description"), t.get("description", ""))
        return Exemption(
            senders=senders, rules=tuple(names), name=self.string((*p, "name"), t.get("name", ""))
        )


def _tname(v: Any) -> str:
    return {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "a table",
    }.get(type(v), type(v).__name__)
