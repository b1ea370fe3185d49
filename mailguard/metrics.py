"""Metrics: Prometheus counters, gauges and histograms (`mailguard_*`) for every stage.

One `Metrics` object owns its own `CollectorRegistry`; the CLI builds it and passes it to the
server, store, relay and web parts, and tests build their own (no module-level registry).

Conventions (https://prometheus.io/docs/practices/naming/): `mailguard_` prefix, base units
(seconds, bytes), `_total` on counters, and label values from small fixed sets — never an
address or a domain. Every known label value is created at start (value 0), so dashboards and
`rate()` see a series before the first event. A value outside a fixed set is counted under
`other` instead of growing the label set.

Several worker processes (`mailguard serve --workers N`, SO_REUSEPORT): set
PROMETHEUS_MULTIPROC_DIR to an empty directory before the workers start (`prepare_multiproc_dir`
empties it). Each process then writes its values to mmap files there, and `render()` merges all
files with prometheus_client's MultiProcessCollector. Gauge modes in that case:

  queue_messages, queue_oldest_held_age_seconds   mostrecent  the store is shared: the last
                                                              process to look is right
  upstream_connections_open                       livesum     each process has its own pool
  policy_last_reload_successful                   mostrecent  every process reloads on SIGHUP
  build_info                                      max         1 in every process

Call `mark_process_dead(pid)` when a worker exits so its `live*` gauge files are removed.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Final

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    values,
)
from prometheus_client import multiprocess as _mp
from prometheus_client import start_http_server as _start_http_server

from mailguard import __version__

MULTIPROC_ENV: Final = "PROMETHEUS_MULTIPROC_DIR"
OTHER: Final = "other"  # the label value for anything outside a fixed set
# Text format 0.0.4: what every Prometheus 2.x scrapes; our names are ASCII, so the newer
# 1.0.0 text format would be byte-identical anyway.
CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"

# Label value sets. They are part of the metrics interface: dashboards and alerts use them.
DECISIONS: Final = ("pass", "hold", "confirm", "approve", "reject", "error")
TRANSFORMS: Final = ("bcc", "zip")
# The finding catalogue of mailguard/checks/__init__.py (kept here as data, not parsed).
FINDING_CODES: Final = (
    "recipient.visible_external",
    "recipient.external_parties",
    "recipient.external",
    "recipient.bcc_header",
    "recipient.hidden",
    "domain.external",
    "domain.first_time",
    "domain.lookalike",
    "domain.nonexistent",
    "domain.null_mx",
    "domain.dns_unavailable",
    "domain.history_unavailable",
    "attachment.present",
    "attachment.unencrypted",
    "attachment.encrypted",
    "attachment.unknown",
    "attachment.limit",
    "attachment.inline",
    "message.malformed",
    "message.limit",
)
RELAY_OUTCOMES: Final = ("accepted", "tempfail", "permfail", "partial")
QUEUE_STATES: Final = (
    "held",
    "released",
    "cancelled",
    "expired",
    "delivering",
    "delivered",
    "failed",
)
HUMAN_KINDS: Final = ("confirm", "approve", "hold")
STAGES: Final = ("parse", "checks", "relay", "store")
DNS_RESULTS: Final = ("ok", "nonexistent", "null_mx", "timeout", "servfail", "error")
CONFIRM_OUTCOMES: Final = (
    "released",  # the sender confirmed, or pressed "send now" on a hold
    "cancelled",  # the sender cancelled
    "approved",
    "denied",
    "expired",  # the deadline had passed
    "used",  # the token was already used (second click)
    "invalid",  # unknown token or bad form / CSRF token
    "rate_limited",
)
NOTICE_KINDS: Final = ("hold", "confirm", "approve", "outcome", "bounce", "zip-password")
RELOAD_RESULTS: Final = ("ok", "failed")
CONNECTION_RESULTS: Final = ("accepted", "refused")
REPLY_CLASSES: Final = ("2xx", "4xx", "5xx")

# Bucket bounds, in base units.
STAGE_BUCKETS: Final = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 300.0,
)  # fmt: skip
DNS_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
HUMAN_BUCKETS: Final = (
    10.0, 30.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 4 * 3600.0, 8 * 3600.0, 86400.0,
    3 * 86400.0, 7 * 86400.0,
)  # fmt: skip
SIZE_BUCKETS: Final = tuple(float(1 << n) for n in range(10, 27, 2))  # 1 KiB … 64 MiB, ×4


def _pick(value: str, allowed: tuple[str, ...]) -> str:
    return value if value in allowed else OTHER


def multiproc_dir() -> str | None:
    """The multi-process directory from the environment, or None (single process)."""
    return os.environ.get(MULTIPROC_ENV) or None


def prepare_multiproc_dir(path: str | Path) -> Path:
    """Create or empty the directory and export it; the parent calls this before forking workers.

    Stale files from an earlier run would be merged into the new run's counters, hence emptying.
    """
    p = Path(path)
    if p.exists():
        for child in p.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
    p.mkdir(parents=True, exist_ok=True)
    os.environ[MULTIPROC_ENV] = str(p)
    _use_mmap_values()
    return p


def _use_mmap_values() -> None:
    # prometheus_client picks file-backed values once, when it is first imported. If the
    # variable was exported later (the CLI parses --workers after importing us), switch now,
    # before any metric exists: otherwise every worker would export zeros.
    if not getattr(values.ValueClass, "_multiprocess", False):
        values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call]


def mark_process_dead(pid: int) -> None:
    """Forget a dead worker's live* gauges (upstream_connections_open); counters stay summed."""
    path = multiproc_dir()
    if path:
        _mp.mark_process_dead(pid, path)  # type: ignore[no-untyped-call]


class Metrics:
    """Every MailGuard metric, registered in one registry of its own."""

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        version: str = __version__,
        rule_names: Iterable[str] = (),
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self.multiprocess = multiproc_dir() is not None
        if self.multiprocess:
            _use_mmap_values()
        r = self.registry

        # --- messages, decisions, findings
        self.messages = Counter(
            "mailguard_messages",
            "Messages handled, by the decision taken (error = answered 451 before deciding).",
            ["decision"],
            registry=r,
        )
        self.rule_hits = Counter(
            "mailguard_rule_hits",
            "Policy rules that fired, by rule name (names come from the policy file).",
            ["rule"],
            registry=r,
        )
        self.findings = Counter(
            "mailguard_findings",
            "Messages with at least one finding of this code.",
            ["code"],
            registry=r,
        )
        self.transforms = Counter(
            "mailguard_transforms",
            "Rewrites applied to messages, by transform.",
            ["transform"],
            registry=r,
        )
        self.message_size = Histogram(
            "mailguard_message_size_bytes",
            "Size of messages received, in bytes.",
            buckets=SIZE_BUCKETS,
            registry=r,
        )
        self.stage_seconds = Histogram(
            "mailguard_stage_seconds",
            "Time spent in the guard per message, by stage.",
            ["stage"],
            buckets=STAGE_BUCKETS,
            registry=r,
        )

        # --- relay to the upstream MTA
        self.relay = Counter(
            "mailguard_relay",
            "Relay attempts to the upstream MTA, by outcome (partial = some recipients refused).",
            ["outcome"],
            registry=r,
        )
        self.upstream_connection_errors = Counter(
            "mailguard_upstream_connection_errors",
            "Connections to the upstream MTA that failed (refused, timeout, dropped).",
            registry=r,
        )
        self.upstream_connections_open = Gauge(
            "mailguard_upstream_connections_open",
            "Open connections to the upstream MTA (in use or pooled).",
            registry=r,
            multiprocess_mode="livesum",
        )

        # --- held-message store and the humans who decide
        self.queue_messages = Gauge(
            "mailguard_queue_messages",
            "Messages in the durable store, by state.",
            ["state"],
            registry=r,
            multiprocess_mode="mostrecent",
        )
        self.queue_oldest_held_age = Gauge(
            "mailguard_queue_oldest_held_age_seconds",
            "Age of the oldest message waiting in state held (0 when none).",
            registry=r,
            multiprocess_mode="mostrecent",
        )
        self.store_up = Gauge(
            "mailguard_store_up",
            "1 if the durable store answered its last probe (every 15 s, and each /healthz), "
            "else 0.",
            registry=r,
            multiprocess_mode="mostrecent",
        )
        self.human_decision = Histogram(
            "mailguard_human_decision_seconds",
            "Time from holding a message to a person's decision (confirm, approve, cancel).",
            ["kind"],
            buckets=HUMAN_BUCKETS,
            registry=r,
        )
        self.confirm_posts = Counter(
            "mailguard_confirm_posts",
            "POSTs to the confirm/approve pages, by outcome.",
            ["outcome"],
            registry=r,
        )
        self.notices_sent = Counter(
            "mailguard_notices_sent",
            "Mails the guard itself sent (notices to senders and approvers), by kind.",
            ["kind"],
            registry=r,
        )

        # --- DNS
        self.dns_lookups = Counter(
            "mailguard_dns_lookups",
            "DNS lookups for recipient domains, by result (cache hits are not counted).",
            ["result"],
            registry=r,
        )
        self.dns_lookup_seconds = Histogram(
            "mailguard_dns_lookup_seconds",
            "Time per DNS lookup for a recipient domain.",
            buckets=DNS_BUCKETS,
            registry=r,
        )

        # --- SMTP front, reloads, build
        self.smtp_connections = Counter(
            "mailguard_smtp_connections",
            "SMTP client connections, accepted or refused (client not in allowed_networks).",
            ["result"],
            registry=r,
        )
        self.smtp_replies = Counter(
            "mailguard_smtp_replies",
            "Final replies to DATA given to the SMTP client (Postfix), by class.",
            ["class"],
            registry=r,
        )
        self.policy_reloads = Counter(
            "mailguard_policy_reloads",
            "Policy file loads at start and on SIGHUP; failed = the last good policy stays.",
            ["result"],
            registry=r,
        )
        self.policy_last_reload_ok = Gauge(
            "mailguard_policy_last_reload_successful",
            "1 if the last policy load succeeded, 0 if it failed (the previous policy is in use).",
            registry=r,
            multiprocess_mode="mostrecent",
        )
        self.config_reloads = Counter(
            "mailguard_config_reloads",
            "Service configuration reloads on SIGHUP.",
            ["result"],
            registry=r,
        )
        self.build_info = Gauge(
            "mailguard_build_info",
            "Always 1; the labels say which MailGuard and Python are running.",
            ["version", "python"],
            registry=r,
            multiprocess_mode="max",
        )

        self._queue_other = False  # an unknown state was seen: keep its series current
        self._precreate()
        py = ".".join(str(n) for n in sys.version_info[:3])
        self.build_info.labels(version=version, python=py).set(1)
        self.prepare(rule_names)

    def _precreate(self) -> None:
        for metric, label_values in (
            (self.messages, DECISIONS),
            (self.findings, FINDING_CODES),
            (self.transforms, TRANSFORMS),
            (self.relay, RELAY_OUTCOMES),
            (self.queue_messages, QUEUE_STATES),
            (self.human_decision, HUMAN_KINDS),
            (self.stage_seconds, STAGES),
            (self.confirm_posts, CONFIRM_OUTCOMES),
            (self.notices_sent, NOTICE_KINDS),
            (self.dns_lookups, DNS_RESULTS),
            (self.smtp_connections, CONNECTION_RESULTS),
            (self.smtp_replies, REPLY_CLASSES),
            (self.policy_reloads, RELOAD_RESULTS),
            (self.config_reloads, RELOAD_RESULTS),
        ):
            for v in label_values:
                metric.labels(v)
        # Hot-path children, looked up once: .labels() costs a lock and a dict build per call.
        self._by_decision = {v: self.messages.labels(v) for v in DECISIONS}
        self._by_code = {v: self.findings.labels(v) for v in FINDING_CODES}
        self._by_outcome = {v: self.relay.labels(v) for v in RELAY_OUTCOMES}
        self._by_class = {v: self.smtp_replies.labels(v) for v in REPLY_CLASSES}
        self._conn_ok = self.smtp_connections.labels("accepted")  # once per client connection
        self._conn_refused = self.smtp_connections.labels("refused")
        self._by_stage = {v: self.stage_seconds.labels(v) for v in STAGES}

    # ------------------------------------------------------------------ recording helpers

    def prepare(self, rule_names: Iterable[str]) -> None:
        """Create rule_hits series (at 0) for the rules of a newly loaded policy."""
        for name in rule_names:
            self.rule_hits.labels(name)

    def observe_message(
        self,
        decision: str,
        *,
        rules: Iterable[str] = (),
        codes: Iterable[str] = (),
        transforms: Iterable[str] = (),
        size: int | None = None,
    ) -> None:
        """Count one decided message: its decision, fired rules, finding codes, rewrites, size."""
        child = self._by_decision.get(decision)
        (child if child is not None else self.messages.labels(OTHER)).inc()
        for name in dict.fromkeys(rules):
            self.rule_hits.labels(name).inc()
        for code in dict.fromkeys(c if c in self._by_code else OTHER for c in codes):
            (self._by_code.get(code) or self.findings.labels(OTHER)).inc()
        for t in dict.fromkeys(transforms):
            self.transforms.labels(_pick(t, TRANSFORMS)).inc()
        if size is not None:
            self.message_size.observe(size)

    @contextmanager
    def time_stage(self, stage: str) -> Iterator[None]:
        """`with metrics.time_stage("checks"): ...` observes the block's wall time."""
        start = time.perf_counter()
        try:
            yield
        finally:
            (self._by_stage.get(stage) or self.stage_seconds.labels(OTHER)).observe(
                time.perf_counter() - start
            )

    def relay_result(self, code: int, *, partial: bool = False) -> None:
        """Count a relay attempt from the upstream's reply code (partial: some RCPTs refused)."""
        if partial and 200 <= code < 300:
            outcome = "partial"
        elif 200 <= code < 300:
            outcome = "accepted"
        elif 500 <= code < 600:
            outcome = "permfail"
        else:
            outcome = "tempfail"  # 4xx and anything odd: Postfix will retry
        self._by_outcome[outcome].inc()

    def smtp_reply(self, code: int) -> None:
        """Count the final reply to the SMTP client by class (2xx, 4xx, 5xx)."""
        child = self._by_class.get(f"{code // 100}xx")
        (child if child is not None else self.smtp_replies.labels(OTHER)).inc()

    def set_queue(self, counts: Mapping[str, int], oldest_age: float | None) -> None:
        """Store callback: messages per state, and the oldest held message's age in seconds.

        States missing from `counts` are set to 0 (a state that drained must not keep its
        last value).
        """
        other = 0
        for state, n in counts.items():
            if state in QUEUE_STATES:
                continue
            other += n
        for state in QUEUE_STATES:
            self.queue_messages.labels(state).set(counts.get(state, 0))
        if other or self._queue_other:
            self._queue_other = True
            self.queue_messages.labels(OTHER).set(other)
        self.queue_oldest_held_age.set(max(0.0, oldest_age) if oldest_age is not None else 0.0)

    def human_decided(self, kind: str, seconds: float) -> None:
        self.human_decision.labels(_pick(kind, HUMAN_KINDS)).observe(max(0.0, seconds))

    def confirm_post(self, outcome: str) -> None:
        self.confirm_posts.labels(_pick(outcome, CONFIRM_OUTCOMES)).inc()

    def notice_sent(self, kind: str) -> None:
        self.notices_sent.labels(_pick(kind, NOTICE_KINDS)).inc()

    def dns_lookup(self, result: str, seconds: float) -> None:
        self.dns_lookups.labels(_pick(result, DNS_RESULTS)).inc()
        self.dns_lookup_seconds.observe(max(0.0, seconds))

    def policy_reload(self, ok: bool) -> None:
        self.policy_reloads.labels("ok" if ok else "failed").inc()
        self.policy_last_reload_ok.set(1 if ok else 0)

    def config_reload(self, ok: bool) -> None:
        self.config_reloads.labels("ok" if ok else "failed").inc()

    def smtp_connection(self, accepted: bool) -> None:
        (self._conn_ok if accepted else self._conn_refused).inc()

    # ------------------------------------------------------------------ exposition

    def collect_registry(self) -> CollectorRegistry:
        """The registry to expose: ours, or a fresh one merging every worker's files."""
        if not self.multiprocess:
            return self.registry
        reg = CollectorRegistry()
        _mp.MultiProcessCollector(reg, path=multiproc_dir())  # type: ignore[no-untyped-call]
        return reg

    def render(self) -> tuple[bytes, str]:
        """The Prometheus text exposition and its Content-Type, for the web `/metrics` route.

        aiohttp: `web.Response(body=body, headers={"Content-Type": ctype})` (the type carries
        parameters, which `content_type=` refuses).
        """
        return generate_latest(self.collect_registry()), CONTENT_TYPE

    def serve(self, host: str, port: int) -> tuple[object, object]:
        """A standalone metrics HTTP port in a daemon thread; returns (server, thread).

        With several workers, only one process (the parent) may serve it: it renders every
        worker's files.
        """
        server, thread = _start_http_server(port, addr=host, registry=self.collect_registry())
        return server, thread
