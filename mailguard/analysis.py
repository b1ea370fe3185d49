"""One message through parse → checks → policy, as data (what `mailguard check` prints). Pure.

The server and the `check` command share this, so a dry run shows exactly what the server would
decide. I/O (DNS answers, delivery history) is looked up by the caller and passed in.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from mailguard.checks import CheckContext, DnsStatus, run_checks
from mailguard.checks.context import Org
from mailguard.checks.finding import Finding
from mailguard.envelope import Envelope
from mailguard.message import MessageView
from mailguard.message.types import Address
from mailguard.policy import Decision, Evaluation, Policy, evaluate

__all__ = ["Analysis", "analyze_message", "analyze_view"]


@dataclass(frozen=True, slots=True)
class Analysis:
    view: MessageView
    envelope: Envelope
    findings: tuple[Finding, ...]
    blocks: Mapping[str, Any]  # per-check JSON blocks: recipients, domains, attachments, message
    evaluation: Evaluation
    org: Org  # whose recipients are internal (the policy's organisation)

    @property
    def decision(self) -> Decision:
        return self.evaluation.decision

    def to_json(self, file: str | None = None) -> dict[str, Any]:
        """The `mailguard check --json` object (schema in docs/policy.md and README)."""
        ev = self.evaluation
        decision = {
            **ev.decision.to_json(),
            "fired": [h.to_json() for h in ev.hits],
            "exempted": list(ev.exempted),
        }
        message: dict[str, Any] = {
            **self.view.to_json(),
            "from": [_addr(a) for a in self.view.from_],
        }
        structure = self.blocks.get("message")
        if isinstance(structure, Mapping):
            message.update(structure)
        elif structure is not None:
            message["structure"] = structure
        return {
            "file": file,
            "decision": decision,
            "findings": [f.to_json() for f in self.findings],
            "envelope": self.envelope.to_json(),
            "recipients": self.blocks.get("recipients", {}),
            "domains": self.blocks.get("domains", {}),
            "attachments": self.blocks.get("attachments", []),
            "message": message,
        }


def _addr(a: Address) -> str:
    return a.addr if a.domain_unicode == a.domain else f"{a.local}@{a.domain_unicode}"


def analyze_view(
    view: MessageView,
    envelope: Envelope,
    policy: Policy,
    *,
    history: Mapping[str, int] | None = None,
    dns: Mapping[str, DnsStatus] | None = None,
    history_unavailable: bool = False,
) -> Analysis:
    """Checks and policy on an already-parsed view (the server parses once per message)."""
    ctx = CheckContext(
        org=policy.org, history=history, dns=dns, history_unavailable=history_unavailable
    )
    result = run_checks(view, ctx)
    findings = tuple(result.findings)
    return Analysis(
        view, envelope, findings, result.blocks, evaluate(policy, findings, envelope), policy.org
    )


def analyze_message(
    raw: bytes,
    envelope: Envelope,
    policy: Policy,
    *,
    history: Mapping[str, int] | None = None,
    dns: Mapping[str, DnsStatus] | None = None,
) -> Analysis:
    """Parse, check and decide one message. Never raises on malformed mail (defects instead)."""
    view = MessageView.parse(raw, envelope)
    return analyze_view(view, envelope, policy, history=history, dns=dns)
