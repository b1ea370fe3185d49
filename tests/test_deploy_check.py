"""deploy/: every file checked by the real tool it configures (scripts/check_deploy.sh), and the
checks shown to catch a broken file.

A piece whose tool is missing is skipped only when MAILGUARD_REQUIRE_TOOLS is unset (CI sets it:
then check_deploy.sh itself fails). Tools: promtool (Debian `prometheus`), systemd-analyze
(`systemd`), postconf (`postfix`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "check_deploy.sh"
SKIP = 77


def run_check(piece: str, root: Path = ROOT) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "MAILGUARD_BIN": str(Path(sys.executable).parent / "mailguard"),
    }
    out = subprocess.run(
        ["bash", str(root / "scripts" / "check_deploy.sh"), piece],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if out.returncode == SKIP:
        assert not os.environ.get("MAILGUARD_REQUIRE_TOOLS"), out.stderr
        pytest.skip(f"{piece}: tool missing ({out.stderr.strip()})")
    return out


@pytest.mark.parametrize("piece", ["rules", "rules-test", "systemd", "postfix"])
def test_shipped_deploy_files_pass(piece: str) -> None:
    out = run_check(piece)
    assert out.returncode == 0, out.stderr


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A copy of scripts/ and deploy/ to break on purpose."""
    shutil.copytree(ROOT / "scripts", tmp_path / "scripts")
    shutil.copytree(ROOT / "deploy", tmp_path / "deploy")
    return tmp_path


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new, 1))


def test_alert_threshold_change_fails_rule_tests(tree: Path) -> None:
    edit(tree / "deploy/prometheus/alerts.yml", "> 2 * 86400", "> 3 * 86400")
    out = run_check("rules-test", tree)
    assert out.returncode == 1 and "MailGuardOldestHeldTooOld" in out.stderr


def test_broken_rule_syntax_fails_check(tree: Path) -> None:
    edit(tree / "deploy/prometheus/alerts.yml", "== 0", "=== 0")
    assert run_check("rules", tree).returncode == 1


def test_systemd_typo_is_caught(tree: Path) -> None:
    # systemd-analyze verify exits 0 on an unknown key; the script treats the warning as failure
    edit(tree / "deploy/systemd/mailguard.service", "ProtectHome=yes", "ProtectHomes=yes")
    out = run_check("systemd", tree)
    assert out.returncode == 1 and "ProtectHomes" in out.stderr


def test_postfix_parameter_typo_is_caught(tree: Path) -> None:
    edit(
        tree / "deploy/postfix/master.cf.snippet",
        "-o smtp_send_xforward_command=yes",
        "-o smtp_send_xforward_commands=yes",
    )
    out = run_check("postfix", tree)
    assert out.returncode == 1
    assert "unused parameter: smtp_send_xforward_commands" in out.stderr


def test_global_content_filter_is_refused(tree: Path) -> None:
    with (tree / "deploy/postfix/main.cf.snippet").open("a") as f:
        f.write("content_filter = scan:[127.0.0.1]:10025\n")
    out = run_check("postfix", tree)
    assert out.returncode == 1 and "content_filter globally" in out.stderr


# --------------------------------------------------------------- dashboard, without the script


def _exprs(obj: object) -> list[str]:
    if isinstance(obj, dict):
        out: list[str] = []
        for k, v in obj.items():
            out += [v] if k == "expr" and isinstance(v, str) else _exprs(v)
        return out
    if isinstance(obj, list):
        return [e for v in obj for e in _exprs(v)]
    return []


def test_dashboard_panels_are_well_formed() -> None:
    dash = json.loads((ROOT / "deploy/grafana/mailguard-dashboard.json").read_text())
    exprs = _exprs(dash)
    assert len(exprs) >= 20
    used = {n for e in exprs for n in re.findall(r"\bmailguard_\w*[A-Za-z0-9]", e)}
    assert used, "no MailGuard metric in the dashboard"  # names: tests/test_metrics_exported.py
    # panel ids unique (Grafana silently merges duplicates)
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
