"""Checks stage: report what the message view found wrong with the message's own structure.

`message.malformed` counts the defects the view recorded (broken headers, missing boundaries,
bad base64...); `message.limit` says a hard bound (MIME depth, part count, header size) stopped
the scan, so later checks did not see the whole message. Limit defects count only towards
`message.limit`, so a policy can treat "too big to check" apart from "broken".
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mailguard.checks.finding import Finding

if TYPE_CHECKING:
    from mailguard.checks.context import CheckContext
    from mailguard.message import MessageView

LIMIT_DEFECTS = frozenset(
    {"mime.depth_limit", "mime.parts_limit", "header.too_large", "mime.decoded_limit"}
)


@dataclass(frozen=True, slots=True)
class StructureReport:
    findings: list[Finding] = field(default_factory=list)
    defects: tuple[str, ...] = ()
    limited: bool = False
    parts: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"defects": list(self.defects), "limited": self.limited, "parts": self.parts}


def analyze(view: MessageView, ctx: CheckContext) -> StructureReport:
    """Defects → message.malformed; a hit Limits bound → message.limit."""
    defects = tuple(view.defects)
    malformed = [d for d in defects if d not in LIMIT_DEFECTS]
    limits = sorted({d for d in defects if d in LIMIT_DEFECTS})
    findings: list[Finding] = []
    if malformed:
        counts = Counter(malformed)
        summary = ", ".join(f"{c} ×{n}" if n > 1 else c for c, n in sorted(counts.items()))
        findings.append(
            Finding(
                "message.malformed",
                f"The message is malformed ({len(malformed)} defects: {summary}); "
                "recipients may not see it as intended.",
                f"メールの構造に不備があります（{len(malformed)}件: {summary}）。"
                "受信者の環境で正しく表示されない可能性があります。",
                count=len(malformed),
                evidence=tuple(sorted(counts)),
                data={"defects": dict(sorted(counts.items()))},
            )
        )
    if view.limited or limits:
        findings.append(
            Finding(
                "message.limit",
                "The message is too deeply nested or has too many parts or too large headers "
                f"to check completely ({', '.join(limits) or 'limit'}).",
                "メールの入れ子が深すぎるか、パートやヘッダーが多すぎるため、"
                f"すべてを検査できませんでした（{', '.join(limits) or 'limit'}）。",
                count=1,
                evidence=tuple(limits),
            )
        )
    return StructureReport(findings, defects, view.limited, len(view.parts))
