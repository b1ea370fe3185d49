"""`mailguard policy check FILE...` and `mailguard policy codes`."""

from __future__ import annotations

from pathlib import Path

import pytest

from mailguard.cli import main
from mailguard.policy import KNOWN_CODES

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = sorted(str(p) for p in (ROOT / "policies").rglob("*.toml"))


def test_shipped_policies_check_ok(capsys: pytest.CaptureFixture[str]) -> None:
    assert len(SHIPPED) == 4
    assert main(["policy", "check", *SHIPPED]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    for path in SHIPPED:
        assert f"{path}: OK: " in out
    assert "  bulk-to-bcc " in out
    assert "confirm-every-external" in out and "(within 4h)" in out
    assert "cool-down  " in out and "(for 5m; except noreply@example.co.jp" in out
    assert "approve-many-parties" in out and "by joushi@example.co.jp" in out


def test_bad_file_exit_2_others_still_checked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[[rule]]\nname = "x"\nwhen = "domain.first_time"\naction = "zipp"\n')
    assert main(["policy", "check", str(bad), SHIPPED[0]]) == 2
    out, err = capsys.readouterr()
    assert err == (
        f"mailguard: {bad}:4: rule[1].action: unknown action 'zipp' "
        "(expected pass, bcc, zip, hold, confirm, approve, reject)\n"
    )
    assert f"{SHIPPED[0]}: OK" in out


def test_quiet_and_warning(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    assert main(["policy", "check", str(empty)]) == 0
    out, _ = capsys.readouterr()
    assert f"{empty}: OK: 0 rules" in out
    assert "warning: no internal_domains" in out
    assert main(["policy", "check", "-q", str(empty)]) == 0
    assert capsys.readouterr().out == ""


def test_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["policy", "check", str(tmp_path / "x.toml")]) == 2
    assert "cannot read policy file: No such file or directory" in capsys.readouterr().err


def test_codes(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["policy", "codes"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [ln.split()[0] for ln in lines] == list(KNOWN_CODES)
    assert "recipient.external_parties   count = parties" in lines


def test_policy_without_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["policy"]) == 2
