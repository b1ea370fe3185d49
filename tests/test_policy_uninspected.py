"""Issue 13 part 1 — a policy that lets uninspected mail pass to external recipients is usable
but warned about: `mailguard policy check` prints FILE:LINE: warning: CODE: … (exit 0), and the
shipped policies (and the built-in one) have no such gap."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from mailguard.policy import builtin_policy, load_policy, parse_policy, uninspected_gaps

ROOT = Path(__file__).resolve().parents[1]
POLICIES = sorted(
    [ROOT / "policies" / "default.toml", *(ROOT / "policies/examples").glob("*.toml")]
)

WEAK = """\
[organization]
internal_domains = ["ourco.co.jp"]

[[rule]]
name = "zip"
when = "attachment.unencrypted and recipient.external"
action = "zip"

[[rule]]
name = "unknown"
when = "attachment.unknown >= 2"
action = "confirm"

[[rule]]
name = "lim"
when = "attachment.limit"
action = "hold"

[[rule]]
name = "inline"
when = "attachment.inline"
action = "confirm"
on_timeout = "send"

[[rule]]
name = "deep"
when = "message.limit"
action = "confirm"
except_senders = ["robot@ourco.co.jp"]
"""


@pytest.mark.parametrize("policy", POLICIES, ids=[p.stem for p in POLICIES])
def test_shipped_policies_have_no_gap(policy: Path) -> None:
    assert uninspected_gaps(load_policy(policy)) == []
    r = subprocess.run(
        [sys.executable, "-m", "mailguard", "policy", "check", str(policy)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == 0 and "warning" not in r.stderr, r.stderr


def test_builtin_policy_has_no_gap() -> None:
    assert uninspected_gaps(builtin_policy()) == []


def test_gaps_are_named_with_their_line() -> None:
    gaps = {w.code: w for w in uninspected_gaps(parse_policy(WEAK, "weak.toml"))}
    assert set(gaps) == {
        "message.limit",
        "attachment.limit",
        "attachment.unknown",
        "attachment.inline",
    }
    assert gaps["attachment.unknown"].line == 9  # the rule that names it needs a count of 2
    assert gaps["attachment.limit"].line == 14 and "hold" in gaps["attachment.limit"].text
    assert 'on_timeout = "send"' in gaps["attachment.inline"].text
    assert "only some senders" in gaps["message.limit"].text


def test_empty_policy_warns_at_line_1() -> None:
    gaps = uninspected_gaps(parse_policy('[organization]\ninternal_domains = ["a.jp"]\n', "p.toml"))
    assert {w.code for w in gaps} == {
        "message.limit",
        "attachment.limit",
        "attachment.unknown",
        "attachment.inline",
    }
    assert all(str(w).startswith("p.toml:1: warning: ") for w in gaps)


def test_policy_check_warns_and_exits_0(tmp_path: Path) -> None:
    p = tmp_path / "weak.toml"
    p.write_text(WEAK, encoding="utf-8")
    r = subprocess.run(
        [sys.executable, "-m", "mailguard", "policy", "check", str(p)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    warned = [ln for ln in r.stderr.splitlines() if ": warning: " in ln]
    assert len(warned) == 4
    assert any(f"{p}:14: warning: attachment.limit:" in ln for ln in warned), warned
