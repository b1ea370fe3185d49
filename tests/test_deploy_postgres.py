"""deploy/container/compose.postgres.yaml (two Postfix, two guards, one PostgreSQL, a load
balancer, Mailpit): no container engine runs here, so check what can be checked — the YAML
parses, the paths it names exist, every guard command parses with the real CLI and names its own
Postfix, each Postfix is built for its own guard, the guards' shared config loads and its
[store]/[web] sections run a real guard on a private PostgreSQL."""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

import yaml
from e2e_support import Guard, policy, wait_for
from pg_support import pg_cluster, pg_url

from mailguard.cli import build_parser
from mailguard.config import load

__all__ = ["pg_cluster", "pg_url"]

ROOT = Path(__file__).resolve().parent.parent
DIR = ROOT / "deploy" / "container"
COMPOSE = DIR / "compose.postgres.yaml"
NODE_CFG = DIR / "mailguard-pg.toml"
NODES = ("1", "2")


def _block(text: str, service: str) -> str:
    """The lines of one service (two-space indented key) up to the next service."""
    m = re.search(rf"^  {re.escape(service)}:\n((?:    .*\n|\s*\n)*)", text, re.M)
    assert m, f"no service {service}"
    return m.group(1)


def test_compose_yaml_parses() -> None:
    doc = yaml.safe_load(COMPOSE.read_text())
    services = doc["services"]
    assert {"postgres", "lb", "mailpit"} <= set(services)
    for n in NODES:
        g = services[f"mailguard-{n}"]
        build_parser().parse_args(g["command"][1:])
        assert g["depends_on"]["postgres"] == {"condition": "service_healthy"}
        assert services[f"postfix-{n}"]["build"]["args"] == {"GUARD_HOST": f"mailguard-{n}"}


def test_compose_services_paths_and_commands() -> None:
    text = COMPOSE.read_text()
    for ctx in re.findall(r"context: (\S+)", text):
        assert (DIR / ctx).resolve() == ROOT
    for df in re.findall(r"dockerfile: (\S+)", text):
        assert (ROOT / df).is_file(), df
    for src in re.findall(r"- (\.\.?/[^:]+):", text):
        assert (DIR / src).is_file(), src
    pg = _block(text, "postgres")
    cfg = load(NODE_CFG)
    user = re.search(r"POSTGRES_USER: (\S+)", pg)
    password = re.search(r"POSTGRES_PASSWORD: (\S+)", pg)
    db = re.search(r"POSTGRES_DB: (\S+)", pg)
    assert user and password and db
    # the guards' store.url names the postgres service and its credentials
    assert cfg.store.url == f"postgresql://{user[1]}:{password[1]}@postgres:5432/{db[1]}"
    lb = _block(text, "lb")
    for n in NODES:
        block = _block(text, f"mailguard-{n}")
        m = re.search(r"command: \[(.*?)\]", block, re.S)
        assert m, f"mailguard-{n}: no command"
        argv = [shlex.split(a.strip())[0] for a in m.group(1).split(",")]
        assert argv[:2] == ["mailguard", "serve"]
        args = build_parser().parse_args(argv[1:])
        assert args.upstream == f"postfix-{n}:10026"  # its own Postfix's reinjection port
        assert args.config == "/etc/mailguard/mailguard-pg.toml"
        assert f"./mailguard-pg.toml:{args.config}:ro" in block
        assert f"GUARD_HOST: mailguard-{n}" in _block(text, f"postfix-{n}")
        assert f"mailguard-{n}:{cfg.web.listen[1]}" in lb  # the balancer reaches every node
    published = re.search(r'"127\.0\.0\.1:(\d+):\d+"', lb)
    assert published and cfg.web.public_url == f"http://localhost:{published[1]}"


def test_postfix_configure_takes_the_guard_host() -> None:
    conf = (DIR / "postfix" / "Containerfile").read_text()
    assert "ARG GUARD_HOST=mailguard" in conf
    run = 'mailguard-postfix-configure /etc/postfix /usr/local/share/mailguard "$GUARD_HOST"'
    assert run in conf
    script = (DIR / "postfix" / "configure.sh").read_text()
    assert "GUARD=${3:-mailguard}" in script and "scan:[$GUARD]:10025" in script


def test_node_config_is_a_shared_store_config() -> None:
    cfg = load(NODE_CFG)
    assert cfg.store.url.startswith("postgresql://")
    assert cfg.store.lease == 60.0 and cfg.store.pool_size == 10
    assert len(cfg.web.secret) >= 32  # the same on every node (one file for both)
    assert cfg.web.trusted_proxies
    policy_file = cfg.policy.file.replace("/etc/mailguard/policies", str(ROOT / "policies"))
    assert Path(policy_file).is_file()


CONFIRM = """
[[rule]]
name = "confirm-external"
when = "recipient.external >= 1"
action = "confirm"
"""


def test_node_config_runs_on_postgresql(tmp_path: Path, pg_url: str) -> None:
    """The demo's [store] and [web] as they are, only the database URL and the ports replaced."""
    demo = tomllib.loads(NODE_CFG.read_text())
    extra = {
        "store": {**demo["store"], "url": pg_url},
        "web": {k: v for k, v in demo["web"].items() if k != "listen"},
    }
    with Guard(tmp_path, policy_text=policy(CONFIRM), config_extra=extra) as g:
        sent = g.send(to=["Partner <a@partner.example>"], subject="demo config")
        assert sent.held_id, sent.text
        notice = wait_for(
            lambda: next((n for n in g.received if n.notice_kind == "confirm"), None),
            30,
            what="the confirm notice",
        )
        assert g.link(notice).startswith(demo["web"]["public_url"] + "/m/")
        out = g.run_cli("queue", "show", sent.held_id, "--store", pg_url)
        assert out.returncode == 0 and "held" in out.stdout, out.stdout + out.stderr
