"""Policy stage: policy files (TOML) → rules; the engine turns findings into one Decision.

load_policy(path) -> Policy          check a file (ConfigError with file:line: key: reason)
decide(policy, findings, envelope)   -> Decision (pure)
evaluate(...)                        -> Evaluation (decision + which rules fired and why)
"""

from mailguard.policy.builtin import builtin_policy
from mailguard.policy.codes import KNOWN_CODES
from mailguard.policy.decision import PASS, Decision, Gate
from mailguard.policy.engine import Evaluation, Hit, decide, evaluate, normalize_sender
from mailguard.policy.lint import PolicyWarning, uninspected_gaps, warn_uninspected
from mailguard.policy.model import Condition, Defaults, Exemption, Policy, Rule
from mailguard.policy.parse import format_duration, load_policy, parse_duration, parse_policy

__all__ = [
    "KNOWN_CODES",
    "PASS",
    "Condition",
    "Decision",
    "Defaults",
    "Evaluation",
    "Exemption",
    "Gate",
    "Hit",
    "Policy",
    "PolicyWarning",
    "Rule",
    "builtin_policy",
    "decide",
    "evaluate",
    "format_duration",
    "load_policy",
    "normalize_sender",
    "parse_duration",
    "parse_policy",
    "uninspected_gaps",
    "warn_uninspected",
]
