"""Issue 13 part 1 — deep MIME nesting is inspected in full, and past the bound never passes.

A forward chain (each forward multipart/mixed holding a text part and the previous message as
message/rfc822) with an unencrypted PDF in the original: at 300 levels (600 MIME levels) the
file is found; past the bound the part not entered is listed as an uninspected attachment and
`message.limit`, `attachment.unknown`, `attachment.limit` are reported — and every shipped
policy stops the message for external recipients. Through `mailguard check --json`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from bench_depth import bare_nest, forward_chain

from mailguard.checks import CheckContext, Org, run_checks
from mailguard.envelope import Envelope
from mailguard.message import MessageView
from mailguard.message.view import Limits

ROOT = Path(__file__).resolve().parents[1]
POLICIES = sorted(
    [ROOT / "policies" / "default.toml", *(ROOT / "policies/examples").glob("*.toml")]
)


def check_json(path: Path, *extra: str) -> dict[str, object]:
    r = subprocess.run(
        [sys.executable, "-m", "mailguard", "check", "--json", *extra, str(path)],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    out: dict[str, object] = json.loads(r.stdout)
    return out


def codes(out: dict[str, object]) -> set[str]:
    findings = out["findings"]
    assert isinstance(findings, list)
    return {f["code"] for f in findings}


@pytest.mark.parametrize("levels", [20, 300])
def test_forward_chain_is_fully_inspected(tmp_path: Path, levels: int) -> None:
    eml = tmp_path / "chain.eml"
    eml.write_bytes(forward_chain(levels))
    out = check_json(eml, "--internal", "ourco.co.jp")
    atts = out["attachments"]
    assert isinstance(atts, list)
    assert [(a["filename"], a["encrypted"]) for a in atts] == [("secret.pdf", False)]
    assert "message.limit" not in codes(out)
    assert "attachment.unencrypted" in codes(out)


def test_past_the_bound_the_rest_is_listed_and_judged() -> None:
    lim = Limits(max_depth=40)
    raw = forward_chain(30)  # 60 MIME levels
    env = Envelope("yamada@ourco.co.jp", ["x@customer.co.jp"])
    view = MessageView.parse(raw, env, lim)
    res = run_checks(view, CheckContext(Org(internal=("ourco.co.jp",))))
    found = {f.code for f in res.findings}
    assert {"message.limit", "attachment.unknown", "attachment.limit"} <= found
    atts = res.blocks["attachments"]
    assert len(atts) == 1 and atts[0]["uninspected"] is True and atts[0]["encrypted"] is None
    # the parts before the bound were all reached: 3 parts per forward level
    assert len(view.parts) >= 3 * 19


def test_parts_bound_lists_what_it_did_not_enter() -> None:
    raw = forward_chain(30)
    view = MessageView.parse(raw, None, Limits(max_parts=20))
    assert "mime.parts_limit" in view.defects
    res = run_checks(view, CheckContext())
    assert any(a.get("uninspected") for a in res.blocks["attachments"])
    assert {"message.limit", "attachment.limit"} <= {f.code for f in res.findings}


@pytest.mark.parametrize("policy", POLICIES, ids=[p.stem for p in POLICIES])
def test_every_shipped_policy_stops_a_message_past_the_bound(tmp_path: Path, policy: Path) -> None:
    eml = tmp_path / "nest.eml"
    eml.write_bytes(bare_nest(Limits().max_depth + 10))
    out = check_json(eml, "--policy", str(policy), "--internal", "ourco.co.jp")
    assert "message.limit" in codes(out)
    decision = out["decision"]
    assert isinstance(decision, dict)
    assert decision["action"] in ("confirm", "approve", "reject"), decision


def test_deep_nest_is_linear_not_quadratic() -> None:
    """A 10 MB file at the bottom of a 2000-deep nest: every level's body holds it."""
    import time

    raw = bare_nest(2000, 1, 10 << 20)
    t0 = time.perf_counter()
    view = MessageView.parse(raw)
    took = time.perf_counter() - t0
    assert not view.limited and any(p.filename == "big.pdf" for p in view.attachments)
    assert took < 3.0, took  # searching each level's body again: ~2000 × 14 MB
