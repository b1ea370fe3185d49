"""Alerts and dashboards ask only for what a running server exports.

A real `mailguard serve` (web on) gets one message through, then its `/metrics` is scraped over
HTTP. Every `mailguard_*` name in deploy/prometheus/alerts.yml and deploy/grafana/*.json must be
in that scrape, every label a selector or `by (...)` names must be on the metric, and every
value an `=` / `=~"a|b"` selector asks for must be one the server exports (label values are
pre-created at 0, so a healthy scrape has them all). Names are never read from the source code.
"""

from __future__ import annotations

import json
import re
import signal
import smtplib
import subprocess
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from conftest import ROOT, ThreadSink, free_port, start_serve, wait_port
from fault_support import serve_config
from prometheus_client.parser import text_string_to_metric_families

ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
DASHBOARDS = sorted((ROOT / "deploy" / "grafana").glob("*.json"))
NAME = re.compile(r"\bmailguard_[A-Za-z0-9_]*[A-Za-z0-9]")
SELECTOR = re.compile(r"\b(mailguard_[A-Za-z0-9_]*[A-Za-z0-9])\s*\{([^}]*)\}")
MATCHER = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!~|!=|=)\s*"([^"]*)"')
BY = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
# Labels Prometheus adds to every scraped series, and histogram buckets' own label.
TARGET_LABELS = {"instance", "job"}
POLICY = """\
[organization]
name = "Test"
internal_domains = ["example.co.jp"]

[[rule]]
name = "encrypted-attachment"
when = "attachment.encrypted"
action = "hold"
"""


@dataclass
class Exported:
    """What one real scrape holds: sample name → label name → values seen."""

    labels: dict[str, dict[str, set[str]]]

    @property
    def names(self) -> set[str]:
        return set(self.labels)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Exported]:
    tmp = tmp_path_factory.mktemp("scrape")
    sink = ThreadSink()
    port, web = free_port(), free_port()
    (tmp / "policy.toml").write_text(POLICY)
    cfg = serve_config(
        tmp / "mg.toml",
        listen=port,
        upstream=sink.port,
        store=tmp / "mg.db",
        policy=tmp / "policy.toml",
        extra=f'[web]\nenabled = true\nlisten = "127.0.0.1:{web}"\n',
    )
    proc = start_serve(["-c", str(cfg)], log=tmp / "serve.log")
    try:
        wait_port(port, 15)
        wait_port(web, 15)
        with smtplib.SMTP("127.0.0.1", port, timeout=20) as c:
            c.sendmail("a@example.co.jp", ["b@partner.example"], b"Subject: s\r\n\r\nbody\r\n")
        with urllib.request.urlopen(f"http://127.0.0.1:{web}/metrics", timeout=5) as r:
            body = r.read().decode()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
        sink.stop()
    labels: dict[str, dict[str, set[str]]] = {}
    for fam in text_string_to_metric_families(body):
        for s in fam.samples:
            per = labels.setdefault(s.name, {})
            for k, v in s.labels.items():
                per.setdefault(k, set()).add(v)
    yield Exported(labels)


def alert_exprs(text: str) -> list[str]:
    """The rules' expressions (folded `>-` blocks joined), without comments and annotations."""
    exprs: list[str] = []
    current: list[str] | None = None
    indent = 0
    for line in text.splitlines():
        stripped = line.strip()
        if current is not None:
            if stripped and len(line) - len(line.lstrip()) > indent:
                current.append(stripped)
                continue
            exprs.append(" ".join(current))
            current = None
        m = re.match(r"(\s*)expr:\s*(.*)$", line)
        if m:
            indent = len(m.group(1))
            if m.group(2) in (">-", ">", "|", "|-"):
                current = []
            else:
                exprs.append(m.group(2))
    if current is not None:
        exprs.append(" ".join(current))
    return exprs


def dashboard_exprs(obj: object) -> list[str]:
    if isinstance(obj, dict):
        out: list[str] = []
        for k, v in obj.items():
            if k in ("expr", "query", "definition") and isinstance(v, str):
                out.append(v)
            else:
                out += dashboard_exprs(v)
        return out
    if isinstance(obj, list):
        return [e for v in obj for e in dashboard_exprs(v)]
    return []


def problems(expr: str, exp: Exported) -> list[str]:
    """What in one PromQL expression asks for something the scrape does not have."""
    out: list[str] = []
    names = set(NAME.findall(expr))
    for n in sorted(names - exp.names):
        out.append(f"{n} is not exported")
    for name, body in SELECTOR.findall(expr):
        have = exp.labels.get(name)
        if have is None:
            continue
        for label, op, val in MATCHER.findall(body):
            if label in TARGET_LABELS:
                continue
            if label not in have:
                out.append(f"{name} has no label {label!r}")
                continue
            if op == "=" or (op == "=~" and re.fullmatch(r"[\w.\-|]+", val)):
                for v in val.split("|") if op == "=~" else [val]:
                    if v not in have[label]:
                        out.append(f"{name}{{{label}}} never has the value {v!r}")
    for group in BY.findall(expr):
        for label in (x.strip() for x in group.split(",")):
            if not label or label in TARGET_LABELS:
                continue
            if not any(label in exp.labels.get(n, {}) for n in names):
                out.append(f"by ({label}): no metric of {sorted(names)} has it")
    return out


def all_exprs() -> list[tuple[str, str]]:
    out = [("prometheus/alerts.yml", e) for e in alert_exprs(ALERTS.read_text())]
    for path in DASHBOARDS:
        out += [(f"grafana/{path.name}", e) for e in dashboard_exprs(json.loads(path.read_text()))]
    return out


def test_alerts_and_dashboards_use_only_exported_series(exported: Exported) -> None:
    exprs = all_exprs()
    assert DASHBOARDS, "no Grafana dashboard in deploy/grafana"
    assert sum(1 for f, _ in exprs if f.startswith("prometheus")) >= 10
    assert sum(1 for f, _ in exprs if f.startswith("grafana")) >= 20
    used = {n for _, e in exprs for n in NAME.findall(e)}
    assert len(used) >= 15, used
    bad = [f"{f}: {p}    in: {e}" for f, e in exprs for p in problems(e, exported)]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize(
    ("expr", "why"),
    [
        ("rate(mailguard_relay_attempts_total[5m])", "mailguard_relay_attempts_total is not"),
        ("mailguard_upstream_connection_errors > 0", "mailguard_upstream_connection_errors is"),
        ('mailguard_queue_messages{status="held"}', "has no label 'status'"),
        ('mailguard_queue_messages{state="waiting"}', "never has the value 'waiting'"),
        ('rate(mailguard_dns_lookups_total{result=~"timeout|nxdomain"}[5m])', "'nxdomain'"),
        ("sum by (reason) (rate(mailguard_relay_total[5m]))", "by (reason)"),
    ],
)
def test_the_check_catches_a_wrong_name_label_or_value(
    exported: Exported, expr: str, why: str
) -> None:
    got = problems(expr, exported)
    assert any(why in p for p in got), got


def test_shipped_expressions_are_all_parsed(exported: Exported) -> None:
    # the folded (`>-`) alert expressions are joined, not cut at their first line
    exprs = alert_exprs(ALERTS.read_text())
    assert any("/ sum by (instance, job)" in e for e in exprs)
    assert len(exprs) == ALERTS.read_text().count("- alert:")
    assert exported.names  # the scrape was not empty
