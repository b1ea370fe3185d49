"""A finding: one named fact about a message, with its evidence and a reason in ja/en."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class Finding:
    code: str  # stable name the policy uses, e.g. "recipient.visible_external"
    reason_en: str  # one plain sentence for the sender page and the log
    reason_ja: str
    count: int = 1  # what thresholds compare against
    evidence: tuple[str, ...] = ()  # the addresses / domains / file names behind it
    data: Mapping[str, Any] = field(default_factory=dict)  # structured detail for --json

    def reason(self, lang: str = "en") -> str:
        return self.reason_ja if lang.startswith("ja") else self.reason_en

    def to_json(self) -> dict[str, Any]:
        return {
            "code": self.code,
            "count": self.count,
            "reason": self.reason_en,
            "reason_ja": self.reason_ja,
            "evidence": list(self.evidence),
            **({"data": dict(self.data)} if self.data else {}),
        }
