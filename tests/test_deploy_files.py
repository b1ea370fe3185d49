"""deploy/ files that no tool here can run (no container engine): keep them consistent with the
repository and the CLI they start."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from mailguard.cli import build_parser
from mailguard.config import load

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"


def _logical_lines(text: str) -> list[str]:
    """Dockerfile lines with backslash continuations joined, comments dropped."""
    out: list[str] = []
    buf = ""
    for line in text.splitlines():
        if line.lstrip().startswith("#") and not buf:
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        out.append(buf + line)
        buf = ""
    return [ln for ln in out if ln.strip()]


def test_containerfile_multistage_nonroot_healthcheck() -> None:
    lines = _logical_lines((DEPLOY / "container/Containerfile").read_text())
    froms = [ln for ln in lines if ln.startswith("FROM ")]
    assert len(froms) >= 2 and " AS build" in froms[0]
    user = [ln.split()[1] for ln in lines if ln.startswith("USER ")]
    assert user and user[-1].split(":")[0] not in ("root", "0")
    assert any(ln.startswith("HEALTHCHECK ") and "/healthz" in ln for ln in lines)
    # every COPY from the build context exists in the repository
    for ln in lines:
        if ln.startswith("COPY ") and "--from=" not in ln:
            for src in shlex.split(ln)[1:-1]:
                assert (ROOT / src).exists(), f"Containerfile copies missing {src}"
    cmd = next(ln for ln in lines if ln.startswith("CMD "))
    argv = re.findall(r'"([^"]*)"', cmd)
    assert argv[0] == "mailguard"
    build_parser().parse_args(argv[1:])  # the CLI accepts the image's command line


def test_container_config_loads() -> None:
    cfg = load(DEPLOY / "container/mailguard.toml")
    assert cfg.smtp.listen == ("0.0.0.0", 10025)
    assert cfg.upstream.address == ("postfix", 10026)
    assert cfg.smtp.hostname and cfg.smtp.hostname != "postfix.demo.test"  # loop detection
    policy = cfg.policy.file.replace("/etc/mailguard/policies", str(ROOT / "policies"))
    assert Path(policy).is_file()


def test_systemd_execstart_matches_cli() -> None:
    unit = (DEPLOY / "systemd/mailguard.service").read_text()
    start = re.search(r"^ExecStart=(.*)$", unit, re.M)
    assert start
    argv = shlex.split(start.group(1))
    assert argv[0].endswith("/mailguard")
    build_parser().parse_args(argv[1:])
    for key in ("NoNewPrivileges=yes", "ProtectSystem=strict", "ProtectHome=yes",
                "PrivateTmp=yes", "ReadWritePaths=/var/lib/mailguard", "User=mailguard",
                "ExecReload=/bin/kill -HUP $MAINPID", "Restart=on-failure",
                "KillSignal=SIGTERM"):  # fmt: skip
        assert re.search(rf"^{re.escape(key)}$", unit, re.M), key


def test_compose_paths_exist() -> None:
    compose_dir = DEPLOY / "container"
    text = (compose_dir / "compose.yaml").read_text()
    for svc in ("postfix", "mailguard", "prometheus"):
        assert re.search(rf"^  {svc}:$", text, re.M), svc
    for ctx in re.findall(r"context: (\S+)", text):
        assert (compose_dir / ctx).resolve() == ROOT
    for df in re.findall(r"dockerfile: (\S+)", text):
        assert (ROOT / df).is_file(), df
    for src in re.findall(r"- (\.\./[^:]+):", text):
        assert (compose_dir / src).is_file(), src
