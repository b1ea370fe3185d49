"""Checks stage: pure functions from a message view (+ context) to findings.

Each check module exposes `analyze(view, ctx) -> Report` where the report has `.findings`
(list[Finding]) and `.to_json()` (the block `mailguard check --json` prints under its key).

Finding codes (stable: policy files name them; `count` is what thresholds compare against):

  recipient.visible_external   external addresses visible in To/Cc        count = addresses
  recipient.external_parties   distinct external parties visible in To/Cc count = parties
  recipient.external           any external envelope recipient            count = recipients
  recipient.bcc_header         a Bcc: header left in the message           count = addresses
  recipient.hidden             envelope recipients named in no header     count = recipients
  domain.external              external domain not trusted                count = domains
  domain.first_time            external domain never written to before    count = domains
  domain.lookalike             domain resembles an internal/trusted/known  count = domains
  domain.nonexistent           NXDOMAIN / no MX-A-AAAA                    count = domains
  domain.null_mx               domain says it takes no mail (MX 0 .)      count = domains
  domain.dns_unavailable       DNS timeout/SERVFAIL: could not check      count = domains
  domain.history_unavailable   history store down: first-time unchecked   count = domains
  attachment.present           user files attached                        count = files
  attachment.unencrypted       user files sent in clear                   count = files
  attachment.encrypted         user files already encrypted               count = files
  attachment.unknown           encryption could not be determined         count = files
  attachment.limit             a bound was hit (zip bomb, depth, size)     count = files
  attachment.inline            unencrypted files in a text body (uuencode) count = files
  message.malformed            defects in the MIME structure or headers    count = defects
  message.limit                MIME depth/part-count limit hit            count = 1
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mailguard.checks.context import CheckContext, DnsStatus, Org
from mailguard.checks.finding import Finding

if TYPE_CHECKING:
    from mailguard.message import MessageView

__all__ = ["CheckContext", "CheckResult", "DnsStatus", "Finding", "Org", "run_checks"]


@dataclass(slots=True)
class CheckResult:
    findings: list[Finding] = field(default_factory=list)
    blocks: dict[str, Any] = field(default_factory=dict)  # "recipients", "domains", "attachments"


def run_checks(view: MessageView, ctx: CheckContext) -> CheckResult:
    """Every check, in a fixed order. Pure: the same view and context give the same result."""
    from mailguard.checks import attachments, domains, recipients, structure

    result = CheckResult()
    for key, mod in (
        ("recipients", recipients),
        ("domains", domains),
        ("attachments", attachments),
        ("message", structure),
    ):
        report = mod.analyze(view, ctx)
        result.findings.extend(report.findings)
        result.blocks[key] = report.to_json()
    return result
