"""Policy warnings: a usable policy that still lets uninspected mail leave the organisation.

What the guard could not inspect is never to be treated as harmless. For each of UNINSPECTED,
a message that has that finding (any count) and an external recipient must meet a rule that
stops it for every sender: confirm, approve or reject, not cancelled into "send" on timeout.
`uninspected_gaps(policy)` names every code for which that is not so; `mailguard policy check`
prints the warnings and `mailguard serve` logs them at start. A warning never refuses a policy.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from mailguard.policy.decision import Gate
from mailguard.policy.model import Condition, Policy, Rule

__all__ = ["UNINSPECTED", "PolicyWarning", "uninspected_gaps", "warn_uninspected"]

log = logging.getLogger("mailguard.policy")

# code -> what it means, for the warning text
UNINSPECTED: dict[str, str] = {
    "message.limit": "a message too deeply nested or with too many parts to inspect fully",
    "attachment.limit": "an attachment that hit a size, count or nesting bound",
    "attachment.unknown": "an attachment whose encryption could not be determined",
    "attachment.inline": "an unencrypted file written into the text body (uuencode/yEnc/BinHex)",
}
# Present whenever the key is present (every limited or unknown item is an attached file).
_IMPLIED: dict[str, frozenset[str]] = {
    "attachment.limit": frozenset({"attachment.present"}),
    "attachment.unknown": frozenset({"attachment.present"}),
    "attachment.inline": frozenset({"attachment.present"}),
}
_EXTERNAL = "recipient.external"
_STOPS = (Gate.CONFIRM, Gate.APPROVE, Gate.REJECT)


@dataclass(frozen=True, slots=True)
class PolicyWarning:
    source: str
    line: int
    code: str
    text: str

    def __str__(self) -> str:
        return f"{self.source}:{self.line}: warning: {self.code}: {self.text}"


def _always(c: Condition) -> bool:
    """True for every count >= 1 (the finding is present, whatever its count)."""
    if c.op == ">=":
        return c.value <= 1
    if c.op in (">", "!="):
        return c.value <= 0
    return False  # <, <=, == hold only for some counts


def _clause_covers(clause: tuple[Condition, ...], code: str) -> bool:
    """Every message with `code` and an external recipient satisfies this clause."""
    ok = {code, _EXTERNAL} | _IMPLIED.get(code, frozenset())
    return all(c.code in ok and _always(c) for c in clause)


def _stops(rule: Rule, policy: Policy) -> bool:
    if rule.gate not in _STOPS:
        return False
    if rule.gate is Gate.REJECT:
        return True
    return (rule.on_timeout or policy.defaults.on_timeout) == "cancel"


def uninspected_gaps(policy: Policy) -> list[PolicyWarning]:
    """One warning per UNINSPECTED code that the policy lets pass to external recipients."""
    out: list[PolicyWarning] = []
    for code, what in UNINSPECTED.items():
        covering = [r for r in policy.rules if any(_clause_covers(cl, code) for cl in r.when)]
        stopping = [r for r in covering if _stops(r, policy)]
        if any(not r.senders and not r.except_senders for r in stopping):
            continue
        naming = [r for r in policy.rules if any(c.code == code for cl in r.when for c in cl)]
        near = stopping or covering or naming
        line = next((r.line for r in near if r.line), None) or 1
        if stopping:
            names = ", ".join(r.name for r in stopping)
            why = f"only some senders are stopped (rule {names} has senders/except_senders)"
        elif covering:
            r = covering[0]
            why = (
                f"rule {r.name} does not stop it (action {'+'.join(r.actions)})"
                if r.gate not in _STOPS
                else f"rule {r.name} sends it when the {r.gate.label} times out"
                f' (on_timeout = "send")'
            )
        elif naming:
            why = (
                f"rule {naming[0].name} names it but does not match every such message "
                "(it needs other findings, or a count above 1)"
            )
        else:
            why = "no rule names it"
        out.append(
            PolicyWarning(
                policy.source,
                line,
                code,
                f"{what} is passed to external recipients: {why}; add a rule such as "
                f'when = "{code} and {_EXTERNAL}", action = "confirm"',
            )
        )
    return out


def warn_uninspected(policy: Policy) -> list[PolicyWarning]:
    """Log each gap as a warning (the server, at start); returns them."""
    gaps = uninspected_gaps(policy)
    for w in gaps:
        log.warning("policy: %s", w)
    return gaps
