"""Policy values: what a parsed policy file is (organisation, defaults, rules, exceptions)."""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import timedelta
from typing import Any

from mailguard.checks.context import Org
from mailguard.policy.decision import Gate

OPS: dict[str, Callable[[int, int], bool]] = {
    ">=": operator.ge,
    ">": operator.gt,
    "<=": operator.le,
    "<": operator.lt,
    "==": operator.eq,
    "!=": operator.ne,
}

GATES: dict[str, Gate] = {
    "pass": Gate.PASS,
    "hold": Gate.HOLD,
    "confirm": Gate.CONFIRM,
    "approve": Gate.APPROVE,
    "reject": Gate.REJECT,
}
TRANSFORMS: tuple[str, ...] = ("bcc", "zip")
ACTIONS: tuple[str, ...] = ("pass", "bcc", "zip", "hold", "confirm", "approve", "reject")


@dataclass(frozen=True, slots=True)
class Condition:
    """`code [op N]`: true when the finding is present and its summed count compares true."""

    code: str
    op: str = ">="
    value: int = 1

    def test(self, count: int) -> bool:
        return count > 0 and OPS[self.op](count, self.value)

    def __str__(self) -> str:
        return (
            self.code
            if (self.op, self.value) == (">=", 1)
            else f"{self.code} {self.op} {self.value}"
        )


# `when`: any of the clauses; a clause is all of its conditions ("a and b").
When = tuple[tuple[Condition, ...], ...]


@dataclass(frozen=True, slots=True)
class Rule:
    """One `[[rule]]` table."""

    name: str
    when: When
    gate: Gate = Gate.PASS
    transforms: tuple[str, ...] = ()
    hold_for: timedelta | None = None  # HOLD only; None = the policy default
    confirm_timeout: timedelta | None = None  # CONFIRM/APPROVE only; None = the policy default
    on_timeout: str | None = None  # CONFIRM/APPROVE only
    approvers: tuple[str, ...] = ()
    reject_message: str = ""
    senders: tuple[str, ...] = ()  # patterns as written (groups expanded); () = every sender
    except_senders: tuple[str, ...] = ()  # own except_senders plus matching [[exception]]s
    options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # transform -> options
    allow_send_now: bool = False  # HOLD only: the sender may send before the hold time is up
    description: str = ""
    line: int | None = field(default=None, compare=False)  # its [[rule]] header, for messages
    _senders_re: re.Pattern[str] | None = field(default=None, repr=False, compare=False)
    _except_re: re.Pattern[str] | None = field(default=None, repr=False, compare=False)

    @property
    def actions(self) -> tuple[str, ...]:
        gate = () if self.gate is Gate.PASS and self.transforms else (self.gate.label,)
        return (*self.transforms, *gate)

    def match(self, counts: Mapping[str, int]) -> tuple[Condition, ...] | None:
        """The conditions of the first clause that holds, or None when the rule does not match."""
        for clause in self.when:
            if all(c.test(counts.get(c.code, 0)) for c in clause):
                return clause
        return None

    def in_scope(self, sender: str) -> bool:
        return self._senders_re is None or bool(self._senders_re.fullmatch(sender))

    def exempt(self, sender: str) -> bool:
        return self._except_re is not None and bool(self._except_re.fullmatch(sender))


def compile_senders(patterns: tuple[str, ...]) -> re.Pattern[str] | None:
    """Glob patterns (`*`, `?`) over lowercase addresses, as one alternation."""
    if not patterns:
        return None
    alts = (
        "".join(".*" if ch == "*" else "." if ch == "?" else re.escape(ch) for ch in p)
        for p in patterns
    )
    return re.compile("|".join(f"(?:{a})" for a in alts))


def with_patterns(rule: Rule) -> Rule:
    return replace(
        rule,
        _senders_re=compile_senders(rule.senders),
        _except_re=compile_senders(rule.except_senders),
    )


@dataclass(frozen=True, slots=True)
class Exemption:
    """One `[[exception]]`: these senders are exempt from these rules (() = every rule)."""

    senders: tuple[str, ...]
    rules: tuple[str, ...] = ()
    name: str = ""


@dataclass(frozen=True, slots=True)
class Defaults:
    lang: str = ""  # notices about mail this policy decided: "ja", "en", "ja+en"; "" = notify.lang
    hold_for: timedelta = timedelta(minutes=5)
    confirm_timeout: timedelta = timedelta(days=1)
    on_timeout: str = "cancel"  # unanswered confirm/approve: "cancel" (safe) or "send"
    approvers: tuple[str, ...] = ()
    reject_message: str = "Message refused by the mail policy of the sending organisation"


@dataclass(frozen=True, slots=True)
class Policy:
    org: Org
    rules: tuple[Rule, ...]
    defaults: Defaults = field(default_factory=Defaults)
    source: str = "<builtin>"
    name: str = ""  # organization.name, for notices
    groups: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    exceptions: tuple[Exemption, ...] = ()

    def with_org(
        self, *, internal: tuple[str, ...] | None = None, trusted: tuple[str, ...] | None = None
    ) -> Policy:
        """The same rules for another organisation (`mailguard check --internal/--trusted`)."""
        org = Org(
            internal=self.org.internal if internal is None else internal,
            trusted=self.org.trusted if trusted is None else trusted,
            freemail=self.org.freemail,
        )
        return replace(self, org=org)

    def rule(self, name: str) -> Rule | None:
        return next((r for r in self.rules if r.name == name), None)
