"""The decision: data the server acts on and `mailguard check --json` prints."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from mailguard.checks.finding import Finding
from mailguard.gate import Gate

__all__ = ["PASS", "Decision", "Gate"]


@dataclass(frozen=True, slots=True)
class Decision:
    gate: Gate = Gate.PASS
    transforms: tuple[str, ...] = ()  # in order, e.g. ("bcc", "zip")
    hold_for: timedelta | None = None  # HOLD: cool-down; CONFIRM/APPROVE: deadline
    rules: tuple[str, ...] = ()  # names of the rules that fired
    findings: tuple[Finding, ...] = ()
    reject_message: str = ""  # REJECT: the human reason sent back in the 5xx
    approvers: tuple[str, ...] = ()  # APPROVE: who may approve
    on_timeout: str = "cancel"  # CONFIRM/APPROVE unanswered: "cancel" or "send"
    options: dict[str, Any] = field(default_factory=dict)  # transform options (zip method, …)
    allow_send_now: bool = False  # HOLD: the sender's page may send before the time is up
    lang: str = ""  # the policy's [defaults] lang for notices ("" = the service's notify.lang)

    @property
    def action(self) -> str:
        return self.gate.label

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "action": self.action,
            "transforms": list(self.transforms),
            "rules": list(self.rules),
        }
        if self.hold_for is not None:
            out["hold_for_seconds"] = int(self.hold_for.total_seconds())
        if self.reject_message:
            out["reject_message"] = self.reject_message
        if self.approvers:
            out["approvers"] = list(self.approvers)
        if self.gate in (Gate.CONFIRM, Gate.APPROVE):
            out["on_timeout"] = self.on_timeout
        if self.options:
            out["options"] = self.options
        if self.allow_send_now:
            out["allow_send_now"] = True
        return out


PASS = Decision()
