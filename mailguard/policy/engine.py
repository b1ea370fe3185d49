"""Policy engine: findings + envelope → one Decision (transforms plus at most one gate). Pure.

The model, in one paragraph (docs/policy.md says the same): every rule whose `when` matches and
whose sender scope includes the envelope sender fires; there is no rule order to get wrong for
gates. Transforms of all fired rules accumulate (bcc before zip). The gate is the strongest of
the fired rules: reject > approve > confirm > hold > pass. A HOLD lasts the longest `hold_for`
of the fired hold rules; a CONFIRM/APPROVE deadline is the longest timeout of the rules with the
winning gate, and it is cancelled on timeout if any of them says so. A reject drops transforms.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import idna

from mailguard.checks.finding import Finding
from mailguard.envelope import Envelope
from mailguard.policy.decision import Decision, Gate
from mailguard.policy.model import TRANSFORMS, Condition, Policy, Rule


@dataclass(frozen=True, slots=True)
class Hit:
    """A rule that fired, and the conditions that made it fire (for explanations)."""

    rule: Rule
    conditions: tuple[Condition, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "rule": self.rule.name,
            "actions": list(self.rule.actions),
            "when": [str(c) for c in self.conditions],
        }


@dataclass(frozen=True, slots=True)
class Evaluation:
    decision: Decision
    hits: tuple[Hit, ...]
    exempted: tuple[str, ...]  # rules that matched but the sender is excepted from


def normalize_sender(mail_from: str) -> str:
    """Lowercase address with an A-label domain, as sender patterns are stored."""
    s = mail_from.strip().strip("<>").lower()
    local, at, dom = s.rpartition("@")
    if not at:
        return s
    dom = dom.rstrip(".")
    if not dom.isascii():
        # on failure keep the raw form: it then matches only raw patterns, never a wrong one
        with contextlib.suppress(idna.IDNAError):
            dom = idna.encode(dom, uts46=True).decode("ascii")
    return f"{local}@{dom}"


def evaluate(policy: Policy, findings: Sequence[Finding], envelope: Envelope) -> Evaluation:
    counts: dict[str, int] = {}
    for f in findings:
        counts[f.code] = counts.get(f.code, 0) + max(f.count, 0)
    sender = normalize_sender(envelope.mail_from)
    hits: list[Hit] = []
    exempted: list[str] = []
    for rule in policy.rules:
        conds = rule.match(counts)
        if conds is None or not rule.in_scope(sender):
            continue
        if rule.exempt(sender):
            exempted.append(rule.name)
            continue
        hits.append(Hit(rule, conds))
    return Evaluation(_combine(policy, hits, findings), tuple(hits), tuple(exempted))


def decide(policy: Policy, findings: Sequence[Finding], envelope: Envelope) -> Decision:
    """The one decision the server acts on and `mailguard check` prints."""
    return evaluate(policy, findings, envelope).decision


def _combine(policy: Policy, hits: list[Hit], findings: Sequence[Finding]) -> Decision:
    if not hits:
        return Decision()
    d = policy.defaults
    gate = max(h.rule.gate for h in hits)
    winners = [h.rule for h in hits if h.rule.gate is gate]
    used_codes = {c.code for h in hits for c in h.conditions}
    why = tuple(f for f in findings if f.code in used_codes)
    names = tuple(h.rule.name for h in hits)
    if gate is Gate.REJECT:
        msg = next((r.reject_message for r in winners if r.reject_message), d.reject_message)
        return Decision(gate=gate, rules=names, findings=why, reject_message=msg, lang=d.lang)

    wanted = {t for h in hits for t in h.rule.transforms}
    transforms = tuple(t for t in TRANSFORMS if t in wanted)
    options: dict[str, Any] = {}
    for h in hits:  # later rules override earlier ones key by key
        for tname, opts in h.rule.options.items():
            options.setdefault(tname, {}).update(opts)
    # what the transforms need from the policy itself, so a queued Decision is self-contained
    if "bcc" in transforms:
        options.setdefault("bcc", {}).setdefault("internal", list(policy.org.internal))
    if "zip" in transforms and d.lang:
        options.setdefault("zip", {}).setdefault("lang", d.lang)

    hold_for: timedelta | None = None
    on_timeout = d.on_timeout
    approvers: tuple[str, ...] = ()
    allow_now = False
    if gate is Gate.HOLD:
        hold_for = max(r.hold_for or d.hold_for for r in winners)
        allow_now = all(r.allow_send_now for r in winners)  # any rule that says "wait" wins
    elif gate in (Gate.CONFIRM, Gate.APPROVE):
        hold_for = max(r.confirm_timeout or d.confirm_timeout for r in winners)
        # "cancel" wins: an unanswered question must not send mail someone wanted stopped
        timeouts = {r.on_timeout or d.on_timeout for r in winners}
        on_timeout = "cancel" if "cancel" in timeouts else "send"
        if gate is Gate.APPROVE:
            approvers = tuple(
                dict.fromkeys(a for r in winners for a in (r.approvers or d.approvers))
            )
    return Decision(
        gate=gate,
        transforms=transforms,
        hold_for=hold_for,
        rules=names,
        findings=why,
        approvers=approvers,
        on_timeout=on_timeout,
        options=options,
        allow_send_now=allow_now,
        lang=d.lang,
    )
