"""Every alert in deploy/prometheus/alerts.yml fires on series a real `mailguard serve` exported.

Each scenario starts the real server (tests/fault_support.serve_config, web on for /metrics),
creates the condition for real — upstream down, upstream refusing, a DNS server answering
SERVFAIL or nothing, held messages piling up, a released message the upstream will not take, a
bad policy or config reloaded with SIGHUP, the process killed — and scrapes `/metrics` over HTTP
at least twice. The two scrapes become promtool `input_series`: counters (and the gauges a
scenario says grow) continue at the rate observed between the scrapes ("v+rate×n"); other
gauges step from the first scraped value to the last and stay there. `promtool test rules` then
checks that the alert fires, and that it stays quiet on a healthy server's scrapes.

`up` is the one series MailGuard does not export: Prometheus writes it per scrape (1 = the
scrape succeeded). MailGuardDown's input is synthesised from real scrape attempts the way
Prometheus would: 1 for a scrape that answered, 0 for one that failed after the process died.

The rules are tested from a copy with the `annotations:` blocks removed: promtool compares
annotations exactly, and here they would quote extrapolated values (deploy/prometheus/
alerts_test.yml checks the annotation texts on hand-written series).

promtool is Debian's `prometheus` package; missing, the tests skip unless MAILGUARD_REQUIRE_TOOLS
is set (then they fail).
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import shutil
import signal
import smtplib
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import dns.flags
import dns.message
import dns.rcode
import pytest
from conftest import ROOT, ThreadSink, free_port, mailguard_cmd, missing_tool, start_serve
from conftest import wait_port as _wait_port
from fault_support import serve_config
from prometheus_client.parser import text_string_to_metric_families

ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
JOB, INSTANCE = "mailguard", "mg:8025"
NAME = re.compile(r"\bmailguard_[A-Za-z0-9_]*[A-Za-z0-9]")

Key = tuple[str, tuple[tuple[str, str], ...]]

# A policy under which the test mail passes, with one rule so rule_hits has a series.
PASS_POLICY = """\
[organization]
name = "Test"
internal_domains = ["example.co.jp"]

[[rule]]
name = "encrypted-attachment"
when = "attachment.encrypted"
action = "hold"
"""
HOLD_POLICY = """\
[organization]
name = "Test"
internal_domains = ["example.co.jp"]

[defaults]
hold_for = "1d"

[[rule]]
name = "hold-external"
when = "recipient.external"
action = "hold"
"""
MSG = b"From: a@example.co.jp\r\nTo: %s\r\nSubject: alert test %d\r\n\r\nbody %d\r\n"


# ------------------------------------------------------------------------------- the server


@dataclass
class Scrape:
    t: float  # monotonic time of the scrape
    samples: dict[Key, float] | None  # None: the scrape failed (what makes up = 0)


class Guard:
    """`mailguard serve` as a real process with the web port (and /metrics) on."""

    def __init__(
        self, tmp: Path, *, upstream: int, policy: str, extra: str = "", name: str = "mg"
    ) -> None:
        self.tmp = tmp
        self.port, self.web = free_port(), free_port()
        self.policy = tmp / "policy.toml"
        self.policy.write_text(policy)
        self.store = tmp / "mg.db"
        self.extra = extra
        self.upstream = upstream
        self.config = tmp / f"{name}.toml"
        self.write_config()
        self.log = tmp / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def write_config(self, tail: str = "") -> None:
        serve_config(
            self.config,
            listen=self.port,
            upstream=self.upstream,
            store=self.store,
            policy=self.policy,
            extra=f'[web]\nenabled = true\nlisten = "127.0.0.1:{self.web}"\n{self.extra}{tail}',
        )

    def start(self) -> Guard:
        self.proc = start_serve(["-c", str(self.config)], log=self.log)
        try:
            wait_port(self.port, self.proc)
            wait_port(self.web, self.proc)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def scrape(self) -> Scrape:
        t = time.monotonic()
        url = f"http://127.0.0.1:{self.web}/metrics"
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
                body = r.read().decode()
        except urllib.error.HTTPError as e:  # it answered, wrongly: not a down server
            raise AssertionError(f"GET {url}: {e.code} {e.reason}\n{self.log_text()}") from e
        except (urllib.error.URLError, ConnectionError):
            return Scrape(t, None)  # nothing answered: Prometheus would record up = 0
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): float(s.value)
            for fam in text_string_to_metric_families(body)
            for s in fam.samples
        }
        return Scrape(t, samples)

    def send(self, rcpt: str, i: int) -> int:
        """One message through the real SMTP port; the final reply code (0: no connection)."""
        try:
            with smtplib.SMTP("127.0.0.1", self.port, timeout=20) as c:
                c.sendmail("a@example.co.jp", [rcpt], MSG % (rcpt.encode(), i, i))
                return 250
        except smtplib.SMTPDataError as e:
            return e.smtp_code
        except smtplib.SMTPRecipientsRefused as e:
            return next(iter(e.recipients.values()))[0]
        except (smtplib.SMTPException, OSError):
            return 0

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    if proc.poll() is not None:
        raise RuntimeError(f"mailguard serve exited with {proc.returncode}")
    _wait_port(port, timeout)


def dead_port() -> int:
    """A loopback port nothing listens on: connecting is refused."""
    return free_port()


def wait_for(cond: Callable[[], bool], timeout: float = 10.0, step: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(step)
    return cond()


def value(s: Scrape, name: str, **labels: str) -> float:
    assert s.samples is not None, "the scrape failed"
    return s.samples.get((name, tuple(sorted(labels.items()))), 0.0)


# ------------------------------------------------------------- a DNS server that fails for real


class FailingDns:
    """UDP DNS server on loopback (dnspython messages): SERVFAIL for every name, except names
    starting with `silent` which get no answer at all (the resolver times out)."""

    def __init__(self) -> None:
        self.queries = 0
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        owner = self

        class Proto(asyncio.DatagramProtocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                self.transport = cast(asyncio.DatagramTransport, transport)

            def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
                owner.queries += 1
                q = dns.message.from_wire(data)
                if q.question and q.question[0].name.labels[0].startswith(b"silent"):
                    return
                r = dns.message.make_response(q)
                r.flags |= dns.flags.RA
                r.set_rcode(dns.rcode.SERVFAIL)
                self.transport.sendto(r.to_wire(), addr)

        def run() -> None:
            asyncio.set_event_loop(self.loop)

            async def main() -> None:
                self.transport, _ = await self.loop.create_datagram_endpoint(
                    Proto, local_addr=("127.0.0.1", 0)
                )
                self.port = int(self.transport.get_extra_info("sockname")[1])
                ready.set()

            self.loop.run_until_complete(main())
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        if not ready.wait(5):
            raise RuntimeError("DNS server did not start")

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.transport.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


# ---------------------------------------------------------------- scrapes → promtool input


def alert_metric_names(text: str | None = None) -> set[str]:
    """mailguard_* names in the rules' expressions (comment lines and annotations skipped)."""
    names: set[str] = set()
    for line in (text if text is not None else ALERTS.read_text()).splitlines():
        s = line.strip()
        if s.startswith(("#", "summary:", "description:")):
            continue
        names.update(NAME.findall(line))
    return names


def _num(x: float) -> str:
    out = f"{x:.6f}".rstrip("0").rstrip(".")
    return "0" if out in ("", "-0") else out


def _labels(labels: tuple[tuple[str, str], ...]) -> str:
    pairs = [("job", JOB), ("instance", INSTANCE), *labels]
    return "{" + ",".join(f'{k}="{v}"' for k, v in pairs) + "}"


def input_series(
    first: Scrape,
    last: Scrape,
    *,
    steps: int,
    grow: Callable[[Key], bool] = lambda key: key[0].endswith("_total"),
) -> list[dict[str, str]]:
    """promtool input series (1 m apart) for every sample the alert rules use.

    grow((name, labels)): continue at the rate seen between the scrapes (counters by default);
    else the first scraped value, then the last one for the rest of the series.
    """
    assert first.samples is not None and last.samples is not None
    dt = last.t - first.t
    assert dt > 0
    wanted = alert_metric_names()
    out = []
    for (name, labels), v2 in sorted(last.samples.items()):
        if name not in wanted:
            continue
        v1 = first.samples.get((name, labels), 0.0)
        if grow((name, labels)):
            per_min = (v2 - v1) / dt * 60
            sign = "+" if per_min >= 0 else "-"
            values = f"{_num(v1)}{sign}{_num(abs(per_min))}x{steps}"
        else:
            values = f"{_num(v1)} {_num(v2)}x{steps}"
        out.append({"series": name + _labels(labels), "values": values})
    return out


def up_series(scrapes: list[Scrape], steps: int) -> dict[str, str]:
    """`up` as Prometheus writes it: 1 per answered scrape, 0 per failed one (then held)."""
    vals = ["1" if s.samples is not None else "0" for s in scrapes]
    return {
        "series": f'up{{job="{JOB}",instance="{INSTANCE}"}}',
        "values": " ".join([*vals[:-1], f"{vals[-1]}x{steps}"]),
    }


def rules_without_annotations(tmp: Path) -> Path:
    """alerts.yml minus its `annotations:` blocks (see the module docstring)."""
    out: list[str] = []
    skip_deeper_than: int | None = None
    for line in ALERTS.read_text().splitlines():
        indent = len(line) - len(line.lstrip())
        if skip_deeper_than is not None:
            if not line.strip() or indent > skip_deeper_than:
                continue
            skip_deeper_than = None
        if line.strip() == "annotations:":
            skip_deeper_than = indent
            continue
        out.append(line)
    path = tmp / "alerts-no-annotations.yml"
    path.write_text("\n".join(out) + "\n")
    return path


@dataclass
class Case:
    """One alert_rule_test: at eval_minutes, `alert` fires with `labels` (None: stays quiet)."""

    alert: str
    eval_minutes: int
    labels: dict[str, str] | None = None


@dataclass
class Scenario:
    name: str
    series: list[dict[str, str]]
    steps: int
    scrapes: list[Scrape] = field(default_factory=list)
    crossing: int = 0  # queue-growing: the minute the oldest held message turns 2 days old


def run_promtool(tmp: Path, scenario: Scenario, cases: list[Case]) -> None:
    promtool = shutil.which("promtool")
    assert promtool is not None
    for c in cases:
        assert c.eval_minutes < scenario.steps, "the series must outlast the evaluation"
    severity = _severities()
    test = {
        "rule_files": [str(rules_without_annotations(tmp))],
        "evaluation_interval": "1m",
        "tests": [
            {
                "name": scenario.name,
                "interval": "1m",
                "input_series": scenario.series,
                "alert_rule_test": [
                    {
                        "eval_time": f"{c.eval_minutes}m",
                        "alertname": c.alert,
                        "exp_alerts": []
                        if c.labels is None
                        else [
                            {
                                "exp_labels": {
                                    "severity": severity[c.alert],
                                    "job": JOB,
                                    "instance": INSTANCE,
                                    **c.labels,
                                }
                            }
                        ],
                    }
                    for c in cases
                ],
            }
        ],
    }
    path = tmp / f"{scenario.name}-{'-'.join(c.alert for c in cases)}.json"
    path.write_text(json.dumps(test, indent=1))  # YAML is a superset of JSON
    r = subprocess.run(
        [promtool, "test", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    series = "\n".join(f"  {s['series']} {s['values']}" for s in scenario.series)
    assert r.returncode == 0, (
        f"{scenario.name}: {r.stdout}{r.stderr}\ninput series from the real scrapes:\n{series}"
    )


def _severities() -> dict[str, str]:
    sev: dict[str, str] = {}
    alert = None
    for line in ALERTS.read_text().splitlines():
        m = re.match(r"\s*- alert:\s*(\S+)", line)
        if m:
            alert = m.group(1)
        m = re.match(r"\s*severity:\s*(\S+)", line)
        if m and alert:
            sev[alert] = m.group(1)
    return sev


def alert_names() -> list[str]:
    return list(_severities())


# ------------------------------------------------------------------------------- scenarios


@pytest.fixture(scope="module")
def promtool() -> None:
    if shutil.which("promtool") is None:
        missing_tool("promtool (Debian package prometheus)")


def _two_scrapes(g: Guard, between: Callable[[], None], *, settle: float = 0.3) -> list[Scrape]:
    first = g.scrape()
    assert first.samples is not None, g.log_text()
    between()
    time.sleep(settle)
    last = g.scrape()
    assert last.samples is not None, g.log_text()
    return [first, last]


@pytest.fixture(scope="module")
def healthy(tmp_path_factory: pytest.TempPathFactory, promtool: None) -> Iterator[Scenario]:
    """Mail flows: the upstream takes everything, nothing is held, nothing reloaded."""
    tmp = tmp_path_factory.mktemp("healthy")
    sink = ThreadSink()
    g = Guard(tmp, upstream=sink.port, policy=PASS_POLICY).start()
    try:

        def mail() -> None:
            for i in range(6):
                assert g.send("b@partner.example", i) == 250

        scrapes = _two_scrapes(g, mail)
    finally:
        g.stop()
        sink.stop()
    assert len(sink.sink.got) == 6
    first, last = scrapes
    assert (
        value(last, "mailguard_relay_total", outcome="accepted")
        - value(first, "mailguard_relay_total", outcome="accepted")
        == 6
    )
    steps = 120
    series = [*input_series(first, last, steps=steps), up_series(scrapes, steps)]
    yield Scenario("healthy", series, steps, scrapes)


@pytest.fixture(scope="module")
def upstream_down(tmp_path_factory: pytest.TempPathFactory, promtool: None) -> Scenario:
    """Nothing listens on the upstream port: every relay attempt is a refused connection."""
    tmp = tmp_path_factory.mktemp("upstream-down")
    g = Guard(tmp, upstream=dead_port(), policy=PASS_POLICY).start()
    try:

        def mail() -> None:
            for i in range(12):
                assert g.send("b@partner.example", i) == 451

        scrapes = _two_scrapes(g, mail)
    finally:
        g.stop()
    first, last = scrapes
    assert value(last, "mailguard_relay_total", outcome="tempfail") >= 12, g.log_text()
    errors = "mailguard_upstream_connection_errors_total"
    assert value(last, errors) - value(first, errors) >= 12, "a refused connection not counted"
    steps = 60
    return Scenario("upstream-down", input_series(first, last, steps=steps), steps, scrapes)


@pytest.fixture(scope="module")
def upstream_refuses(tmp_path_factory: pytest.TempPathFactory, promtool: None) -> Scenario:
    """The upstream answers 554 to every message."""
    tmp = tmp_path_factory.mktemp("upstream-refuses")
    sink = ThreadSink(reply="554 5.7.1 rejected by the upstream")
    g = Guard(tmp, upstream=sink.port, policy=PASS_POLICY).start()
    try:

        def mail() -> None:
            for i in range(8):
                assert g.send("b@partner.example", i) == 554

        scrapes = _two_scrapes(g, mail)
    finally:
        g.stop()
        sink.stop()
    first, last = scrapes
    assert value(last, "mailguard_relay_total", outcome="permfail") == 8
    steps = 60
    return Scenario("upstream-refuses", input_series(first, last, steps=steps), steps, scrapes)


@pytest.fixture(scope="module")
def dns_failing(tmp_path_factory: pytest.TempPathFactory, promtool: None) -> Iterator[Scenario]:
    """[dns] on, pointed at a loopback server answering SERVFAIL (or nothing) for every name."""
    tmp = tmp_path_factory.mktemp("dns-failing")
    dns_server = FailingDns()
    sink = ThreadSink()
    extra = (
        f'[dns]\nenabled = true\nnameservers = ["127.0.0.1"]\nport = {dns_server.port}\n'
        'timeout = "0.4s"\n'
    )
    g = Guard(tmp, upstream=sink.port, policy=PASS_POLICY, extra=extra).start()
    try:

        def mail() -> None:
            # distinct domains: an unavailable verdict is cached briefly per domain
            for i in range(8):
                domain = f"silent{i}.example" if i % 4 == 0 else f"d{i}.example"
                g.send(f"b@{domain}", i)

        scrapes = _two_scrapes(g, mail)
    finally:
        g.stop()
        sink.stop()
        dns_server.stop()
    assert dns_server.queries >= 8, "the server never asked our DNS server"
    first, last = scrapes
    failed = sum(
        value(last, "mailguard_dns_lookups_total", result=r) for r in ("timeout", "servfail")
    )
    assert failed >= 8, "failed look-ups not counted (one per domain)"
    steps = 60
    yield Scenario("dns-failing", input_series(first, last, steps=steps), steps, scrapes)


@pytest.fixture(scope="module")
def queue_growing(tmp_path_factory: pytest.TempPathFactory, promtool: None) -> Scenario:
    """Held messages pile up (a hold-everything policy) and age.

    The server is restarted between the batches: the queue gauges are read from the store at
    start-up (then only every 15 s), so each scrape follows a fresh start on the same store, as
    Prometheus sees a server restarted while its held queue grows.
    """
    tmp = tmp_path_factory.mktemp("queue-growing")
    sink = ThreadSink()
    g = Guard(tmp, upstream=sink.port, policy=HOLD_POLICY)
    scrapes: list[Scrape] = []
    try:
        n = 0
        for batch in range(3):
            g.start()
            if batch:
                wait_for(lambda want=float(n): held(g.scrape()) >= want, timeout=5)
                scrapes.append(g.scrape())
            if batch < 2:
                for _ in range(4):
                    assert g.send("b@partner.example", n) == 250, g.log_text()
                    n += 1
            g.stop()
    finally:
        g.stop()
        sink.stop()
    first, last = scrapes
    assert (held(first), held(last)) == (4, 8), g.log_text()
    a1 = value(first, "mailguard_queue_oldest_held_age_seconds")
    a2 = value(last, "mailguard_queue_oldest_held_age_seconds")
    assert a2 > a1 > 0
    # continued at the ageing rate seen between the scrapes (about 60 s a minute), the oldest
    # held message turns 2 days old at this minute of the series
    crossing = math.ceil((2 * 86400 - a1) / ((a2 - a1) / (last.t - first.t) * 60))
    steps = crossing + 60

    def grows(key: Key) -> bool:
        return key[0].endswith("_total") or key in (
            ("mailguard_queue_oldest_held_age_seconds", ()),
            ("mailguard_queue_messages", (("state", "held"),)),
        )

    series = input_series(first, last, steps=steps, grow=grows)
    return Scenario("queue-growing", series, steps, scrapes, crossing=crossing)


def held(s: Scrape) -> float:
    return value(s, "mailguard_queue_messages", state="held") if s.samples is not None else -1


@pytest.fixture(scope="module")
def released_stuck(tmp_path_factory: pytest.TempPathFactory, promtool: None) -> Scenario:
    """Held messages released with `mailguard queue release` while the upstream is down: the
    scheduler cannot deliver them, they stay released."""
    tmp = tmp_path_factory.mktemp("released-stuck")
    g = Guard(tmp, upstream=dead_port(), policy=HOLD_POLICY)
    try:
        g.start()
        for i in range(2):
            assert g.send("b@partner.example", i) == 250, g.log_text()
        g.stop()
        listing = subprocess.run(
            [*mailguard_cmd(), "queue", "list", "--store", str(g.store), "--json"],
            capture_output=True, text=True, timeout=30, check=True,
        )  # fmt: skip
        ids = [m["id"] for m in _json_items(listing.stdout)]
        assert len(ids) == 2, listing.stdout
        for mid in ids:
            subprocess.run(
                [*mailguard_cmd(), "queue", "release", "--store", str(g.store), mid],
                capture_output=True, text=True, timeout=30, check=True,
            )  # fmt: skip
        g.start()
        scrapes = _two_scrapes(g, lambda: time.sleep(1.0))
    finally:
        g.stop()
    first, last = scrapes
    stuck = sum(
        value(last, "mailguard_queue_messages", state=st) for st in ("released", "delivering")
    )
    # >= 2: the states are counted one query each while the scheduler moves them between
    # released and delivering, so one message may be counted in both
    assert stuck >= 2, g.log_text()
    steps = 60
    return Scenario("released-stuck", input_series(first, last, steps=steps), steps, scrapes)


def _json_items(text: str) -> list[dict[str, Any]]:
    data = json.loads(text)
    if isinstance(data, dict):
        for k in ("messages", "items", "held"):
            if isinstance(data.get(k), list):
                return list(data[k])
    return list(data)


def _reload(tmp_path_factory: pytest.TempPathFactory, what: str) -> Scenario:
    """A healthy server, then a SIGHUP with a broken policy or config file."""
    tmp = tmp_path_factory.mktemp(f"reload-{what}")
    sink = ThreadSink()
    g = Guard(tmp, upstream=sink.port, policy=PASS_POLICY).start()
    try:

        def break_it() -> None:
            if what == "policy":
                g.policy.write_text(PASS_POLICY.replace('action = "hold"', 'action = "hodl"'))
            else:
                g.write_config("bogus_key = 1\n")  # [web].bogus_key: refused
            assert g.proc is not None
            g.proc.send_signal(signal.SIGHUP)
            assert wait_for(lambda: "reload refused" in g.log_text(), timeout=10), g.log_text()
            assert g.send("b@partner.example", 1) == 250  # still serving on the old set

        scrapes = _two_scrapes(g, break_it)
    finally:
        g.stop()
        sink.stop()
    first, last = scrapes
    # a bad policy fails the policy reload only; a bad config file fails the config reload
    failed = (
        "mailguard_policy_reloads_total" if what == "policy" else "mailguard_config_reloads_total"
    )
    assert value(last, failed, result="failed") == 1, g.log_text()
    other = (
        "mailguard_config_reloads_total" if what == "policy" else "mailguard_policy_reloads_total"
    )
    assert value(last, other, result="failed") == 0, g.log_text()
    steps = 60
    # a reload is one event, not a rate: every series steps from the first scrape to the last
    series = input_series(first, last, steps=steps, grow=lambda key: False)
    return Scenario(f"reload-{what}", series, steps, scrapes)


@pytest.fixture(scope="module")
def bad_policy_reload(tmp_path_factory: pytest.TempPathFactory, promtool: None) -> Scenario:
    return _reload(tmp_path_factory, "policy")


@pytest.fixture(scope="module")
def bad_config_reload(tmp_path_factory: pytest.TempPathFactory, promtool: None) -> Scenario:
    return _reload(tmp_path_factory, "config")


@pytest.fixture(scope="module")
def store_down(tmp_path_factory: pytest.TempPathFactory, promtool: None) -> Scenario:
    """A server on a private PostgreSQL store; the database is stopped (pg_ctl stop -m fast)
    under it and `/healthz` is asked (it probes the store, as the 15 s gauge loop does)."""
    from pg_support import PgCluster, require_pg

    tmp = tmp_path_factory.mktemp("store-down")
    cluster = PgCluster(require_pg()).start()
    sink = ThreadSink()
    try:
        url = cluster.new_database()
        g = Guard(tmp, upstream=sink.port, policy=PASS_POLICY)
        g.config.write_text(g.config.read_text().replace(f'path = "{g.store}"', f'url = "{url}"'))
        g.start()
        try:

            def stop_database() -> None:
                cluster.server_stop("fast")
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{g.web}/healthz", timeout=15)
                    raise AssertionError("/healthz answered 200 with the database down")
                except urllib.error.HTTPError as e:
                    assert e.code == 503, e.code

            scrapes = _two_scrapes(g, stop_database)
        finally:
            g.stop()
    finally:
        sink.stop()
        cluster.stop()
    first, last = scrapes
    assert value(first, "mailguard_store_up") == 1, g.log_text()
    assert value(last, "mailguard_store_up") == 0, g.log_text()
    steps = 30
    return Scenario("store-down", input_series(first, last, steps=steps), steps, scrapes)


@pytest.fixture(scope="module")
def killed(tmp_path_factory: pytest.TempPathFactory, promtool: None) -> Scenario:
    """Scrapes of a server that answers, then of the same one after SIGKILL."""
    tmp = tmp_path_factory.mktemp("killed")
    sink = ThreadSink()
    g = Guard(tmp, upstream=sink.port, policy=PASS_POLICY).start()
    try:
        scrapes = [g.scrape(), g.scrape()]
        g.kill()
        scrapes += [g.scrape(), g.scrape()]
    finally:
        g.stop()
        sink.stop()
    assert [s.samples is not None for s in scrapes] == [True, True, False, False]
    steps = 30
    return Scenario("killed", [up_series(scrapes, steps)], steps, scrapes)


# ----------------------------------------------------------------------------------- tests

# alert → (scenario fixture, [firing case, quiet cases...])
FIRING: dict[str, tuple[str, list[Case]]] = {
    "MailGuardDown": (
        "killed",
        [Case("MailGuardDown", 3), Case("MailGuardDown", 10, {})],
    ),
    "MailGuardStoreDown": (
        "store_down",
        # `for: 2m`: quiet at first, firing once the store has been down that long
        [Case("MailGuardStoreDown", 1), Case("MailGuardStoreDown", 10, {})],
    ),
    "MailGuardQueueGrowing": (
        "queue_growing",
        [Case("MailGuardQueueGrowing", 45, {"state": "held"})],
    ),
    "MailGuardReleasedNotDelivered": (
        "released_stuck",
        [Case("MailGuardReleasedNotDelivered", 10), Case("MailGuardReleasedNotDelivered", 40, {})],
    ),
    "MailGuardOldestHeldTooOld": ("queue_growing", []),  # cases built from the observed age
    "MailGuardUpstreamFailing": (
        "upstream_down",
        [Case("MailGuardUpstreamFailing", 20, {})],
    ),
    "MailGuardRelayTempfailRatio": (
        "upstream_down",
        [Case("MailGuardRelayTempfailRatio", 40, {}), Case("MailGuardRelayPermfailRatio", 40)],
    ),
    "MailGuardRelayPermfailRatio": (
        "upstream_refuses",
        [Case("MailGuardRelayPermfailRatio", 40, {}), Case("MailGuardRelayTempfailRatio", 40)],
    ),
    "MailGuardDnsFailing": (
        "dns_failing",
        [Case("MailGuardDnsFailing", 40, {})],
    ),
    "MailGuardPolicyReloadFailed": (
        "bad_policy_reload",
        [Case("MailGuardPolicyReloadFailed", 10, {})],
    ),
    "MailGuardConfigReloadFailed": (
        "bad_config_reload",
        # fires at once (no `for`), resolves once the failure is 30 minutes old
        [
            Case("MailGuardConfigReloadFailed", 5, {"result": "failed"}),
            Case("MailGuardConfigReloadFailed", 45),
        ],
    ),
}


def test_every_alert_has_a_scenario() -> None:
    assert sorted(FIRING) == sorted(alert_names())


@pytest.mark.parametrize("alert", [a for a in alert_names() if a in FIRING])
def test_alert_fires_on_real_scrapes(
    alert: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    fixture, cases = FIRING[alert]
    scenario: Scenario = request.getfixturevalue(fixture)
    if alert == "MailGuardOldestHeldTooOld":
        # quiet well before 2 days, firing once past them for longer than the rule's `for: 15m`
        cases = [Case(alert, scenario.crossing - 10), Case(alert, scenario.crossing + 20, {})]
    run_promtool(tmp_path, scenario, cases)


# Alerts a healthy server (mail flowing, nothing held, no reload) must not raise. For
# MailGuardPolicyReloadFailed this needs the start-up policy load recorded (gauge 1 from start).
@pytest.mark.parametrize("alert", alert_names())
def test_alert_quiet_on_a_healthy_server(alert: str, healthy: Scenario, tmp_path: Path) -> None:
    run_promtool(tmp_path, healthy, [Case(alert, 10), Case(alert, 60)])


def test_alert_inputs_are_exported_by_a_running_server(healthy: Scenario) -> None:
    """Every mailguard_* name the alert rules use is in a real /metrics scrape."""
    exported = {name for s in healthy.scrapes if s.samples for name, _ in s.samples}
    missing = alert_metric_names() - exported
    assert not missing, f"alerts.yml uses names the server does not export: {sorted(missing)}"
