"""mailguard.metrics: names, units, label hygiene, pre-created series, exposition, multi-process."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import urllib.request
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from mailguard import metrics as m
from mailguard.metrics import Metrics

# Every label name MailGuard may use; an address or domain label would be a new name here.
ALLOWED_LABELS = {
    "decision", "rule", "code", "transform", "outcome", "state", "kind", "stage", "result",
    "class", "version", "python", "le",
}  # fmt: skip


def families(metrics: Metrics) -> dict[str, object]:
    body, _ = metrics.render()
    return {f.name: f for f in text_string_to_metric_families(body.decode())}


def samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    body, _ = metrics.render()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(body.decode())
        for s in f.samples
    }


def value(metrics: Metrics, name: str, **labels: str) -> float:
    return samples(metrics)[(name, tuple(sorted(labels.items())))]


def exercise(mx: Metrics) -> None:
    """Drive every recording helper once, with realistic inputs."""
    mx.observe_message(
        "confirm",
        rules=["new-domain", "new-domain"],
        codes=["domain.first_time", "recipient.external", "domain.first_time"],
        transforms=["bcc"],
        size=5120,
    )
    with mx.time_stage("parse"):
        pass
    mx.relay_result(250)
    mx.relay_result(250, partial=True)
    mx.relay_result(451)
    mx.relay_result(554)
    mx.smtp_reply(250)
    mx.smtp_reply(451)
    mx.set_queue({"held": 4, "released": 1}, 42.0)
    mx.human_decided("confirm", 30.0)
    mx.confirm_post("released")
    mx.notice_sent("confirm")
    mx.dns_lookup("timeout", 3.0)
    mx.policy_reload(True)
    mx.config_reload(False)
    mx.smtp_connection(accepted=False)
    mx.upstream_connection_errors.inc()
    mx.upstream_connections_open.set(3)


def test_names_units_and_suffixes() -> None:
    mx = Metrics()
    exercise(mx)
    fams = families(mx)
    assert fams, "nothing exposed"
    for name, fam in fams.items():
        assert name.startswith("mailguard_"), name
        if fam.type == "counter":  # the parser strips _total from the family name
            assert all(s.name.endswith(("_total", "_created")) for s in fam.samples), name
        if fam.type == "histogram":
            assert name.endswith(("_seconds", "_bytes")), f"{name}: histogram without a base unit"
        assert not name.endswith(("_ms", "_milliseconds", "_kb", "_kilobytes")), name
    expected = {
        "mailguard_messages", "mailguard_rule_hits", "mailguard_findings", "mailguard_relay",
        "mailguard_queue_messages", "mailguard_queue_oldest_held_age_seconds",
        "mailguard_human_decision_seconds", "mailguard_stage_seconds",
        "mailguard_upstream_connection_errors", "mailguard_upstream_connections_open",
        "mailguard_dns_lookups", "mailguard_dns_lookup_seconds", "mailguard_confirm_posts",
        "mailguard_notices_sent", "mailguard_policy_reloads", "mailguard_config_reloads",
        "mailguard_smtp_connections", "mailguard_smtp_replies", "mailguard_message_size_bytes",
        "mailguard_build_info", "mailguard_policy_last_reload_successful",
    }  # fmt: skip
    assert expected <= set(fams), expected - set(fams)


def test_no_address_or_domain_in_labels() -> None:
    mx = Metrics(rule_names=["bcc-mistake"])
    exercise(mx)
    # Inputs outside the fixed sets must not become label values (they could be anything).
    mx.observe_message("x@evil.example", codes=["taro@example.co.jp"], transforms=["a@b"])
    mx.confirm_post("victim@example.co.jp")
    mx.notice_sent("example.co.jp")
    mx.set_queue({"held": 1, "someone@example.co.jp": 2}, None)
    for (name, labels), _v in samples(mx).items():
        for k, v in labels:
            assert k in ALLOWED_LABELS, f"{name}: label {k}"
            assert "@" not in v and "example" not in v, f"{name}{{{k}={v!r}}}"
    assert value(mx, "mailguard_findings_total", code="other") == 1
    assert value(mx, "mailguard_queue_messages", state="other") == 2


def test_label_values_are_precreated_at_zero() -> None:
    mx = Metrics(rule_names=["bcc-mistake", "cool-down"])
    s = samples(mx)
    for metric, label, values in (
        ("mailguard_messages_total", "decision", m.DECISIONS),
        ("mailguard_findings_total", "code", m.FINDING_CODES),
        ("mailguard_relay_total", "outcome", m.RELAY_OUTCOMES),
        ("mailguard_queue_messages", "state", m.QUEUE_STATES),
        ("mailguard_confirm_posts_total", "outcome", m.CONFIRM_OUTCOMES),
        ("mailguard_notices_sent_total", "kind", m.NOTICE_KINDS),
        ("mailguard_dns_lookups_total", "result", m.DNS_RESULTS),
        ("mailguard_policy_reloads_total", "result", m.RELOAD_RESULTS),
        ("mailguard_config_reloads_total", "result", m.RELOAD_RESULTS),
        ("mailguard_smtp_connections_total", "result", m.CONNECTION_RESULTS),
        ("mailguard_smtp_replies_total", "class", m.REPLY_CLASSES),
        ("mailguard_rule_hits_total", "rule", ("bcc-mistake", "cool-down")),
        ("mailguard_stage_seconds_count", "stage", m.STAGES),
        ("mailguard_human_decision_seconds_count", "kind", m.HUMAN_KINDS),
    ):
        for v in values:
            assert s[(metric, ((label, v),))] == 0, f"{metric}{{{label}={v}}}"
    # the finding catalogue constant matches the documented catalogue
    import mailguard.checks as checks

    documented = [
        ln.split()[0]
        for ln in (checks.__doc__ or "").splitlines()
        if ln.startswith("  ") and "." in ln
    ]
    assert tuple(documented) == m.FINDING_CODES


def test_prepare_adds_rules_of_a_reloaded_policy() -> None:
    mx = Metrics(rule_names=["a"])
    mx.prepare(["b"])
    assert value(mx, "mailguard_rule_hits_total", rule="b") == 0
    mx.observe_message("hold", rules=["b", "b"])
    assert value(mx, "mailguard_rule_hits_total", rule="b") == 1  # once per message


def test_recording_helpers_count_what_they_say() -> None:
    mx = Metrics()
    exercise(mx)
    assert value(mx, "mailguard_messages_total", decision="confirm") == 1
    assert value(mx, "mailguard_findings_total", code="domain.first_time") == 1
    assert value(mx, "mailguard_transforms_total", transform="bcc") == 1
    assert value(mx, "mailguard_message_size_bytes_sum") == 5120
    assert value(mx, "mailguard_stage_seconds_count", stage="parse") == 1
    for outcome in ("accepted", "partial", "tempfail", "permfail"):
        assert value(mx, "mailguard_relay_total", outcome=outcome) == 1
    assert value(mx, "mailguard_smtp_replies_total", **{"class": "4xx"}) == 1
    assert value(mx, "mailguard_queue_messages", state="held") == 4
    assert value(mx, "mailguard_queue_oldest_held_age_seconds") == 42
    assert value(mx, "mailguard_policy_last_reload_successful") == 1
    assert value(mx, "mailguard_config_reloads_total", result="failed") == 1
    assert value(mx, "mailguard_smtp_connections_total", result="refused") == 1
    # a state that drained goes back to 0; no held message = age 0
    mx.set_queue({"released": 2}, None)
    assert value(mx, "mailguard_queue_messages", state="held") == 0
    assert value(mx, "mailguard_queue_oldest_held_age_seconds") == 0
    mx.policy_reload(False)
    assert value(mx, "mailguard_policy_last_reload_successful") == 0


def test_registries_are_independent() -> None:
    a, b = Metrics(), Metrics(registry=CollectorRegistry())
    a.observe_message("pass")
    assert value(a, "mailguard_messages_total", decision="pass") == 1
    assert value(b, "mailguard_messages_total", decision="pass") == 0


def test_build_info() -> None:
    mx = Metrics(version="9.9.9")
    py = ".".join(str(n) for n in sys.version_info[:3])
    assert value(mx, "mailguard_build_info", version="9.9.9", python=py) == 1


def test_render_content_type_and_standalone_port() -> None:
    mx = Metrics()
    body, ctype = mx.render()
    assert ctype.startswith("text/plain; version=0.0.4")
    assert b"mailguard_messages_total" in body
    server, thread = mx.serve("127.0.0.1", 0)
    try:
        port = server.server_port  # type: ignore[attr-defined]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            got = r.read()
        assert b'mailguard_messages_total{decision="pass"} 0.0' in got
    finally:
        server.shutdown()  # type: ignore[attr-defined]
        server.server_close()  # type: ignore[attr-defined]
        thread.join(5)  # type: ignore[attr-defined]


# --------------------------------------------------------------------------- multi-process

WORKER = textwrap.dedent(
    """
    import os, sys
    from mailguard.metrics import Metrics
    mx = Metrics(rule_names=["r1"])
    n = int(sys.argv[1])
    for _ in range(n):
        mx.observe_message("pass", rules=["r1"], size=1000)
    mx.upstream_connections_open.set(n)
    mx.set_queue({"held": n}, float(n))
    print(os.getpid())
    """
)
RENDER = textwrap.dedent(
    """
    import sys
    from mailguard.metrics import Metrics, mark_process_dead
    for pid in sys.argv[1:]:
        mark_process_dead(int(pid))
    sys.stdout.write(Metrics().render()[0].decode())
    """
)


def _run(code: str, args: list[str], env: dict[str, str]) -> str:
    out = subprocess.run(
        [sys.executable, "-c", code, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def _parse(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }


def test_multiprocess_two_workers_merge(tmp_path: Path) -> None:
    mpdir = tmp_path / "mp"
    mpdir.mkdir()
    env = {**os.environ, m.MULTIPROC_ENV: str(mpdir)}
    pid2 = _run(WORKER, ["2"], env).strip()
    pid3 = _run(WORKER, ["3"], env).strip()
    assert pid2 != pid3
    s = _parse(_run(RENDER, [], env))
    assert s[("mailguard_messages_total", (("decision", "pass"),))] == 5  # summed
    assert s[("mailguard_messages_total", (("decision", "hold"),))] == 0  # pre-created
    assert s[("mailguard_rule_hits_total", (("rule", "r1"),))] == 5
    assert s[("mailguard_message_size_bytes_count", ())] == 5
    assert s[("mailguard_upstream_connections_open", ())] == 5  # livesum
    assert s[("mailguard_queue_messages", (("state", "held"),))] == 3  # mostrecent
    assert s[("mailguard_queue_oldest_held_age_seconds", ())] == 3
    builds = [k for k in s if k[0] == "mailguard_build_info"]
    assert len(builds) == 1 and s[builds[0]] == 1  # one series, not one per process
    # a dead worker's pool no longer counts; its counters still do
    s = _parse(_run(RENDER, [pid3], env))
    assert s[("mailguard_upstream_connections_open", ())] == 2
    assert s[("mailguard_messages_total", (("decision", "pass"),))] == 5


def test_multiproc_dir_exported_after_import(tmp_path: Path) -> None:
    """The CLI may export the directory after prometheus_client is imported: values still go
    to files (else every worker would export zeros)."""
    mpdir = tmp_path / "late"
    (mpdir / "stale").mkdir(parents=True)
    (mpdir / "counter_1.db").write_bytes(b"stale")
    env = {k: v for k, v in os.environ.items() if k != m.MULTIPROC_ENV}
    code = textwrap.dedent(
        f"""
        import prometheus_client
        from mailguard.metrics import Metrics, prepare_multiproc_dir
        prepare_multiproc_dir({str(mpdir)!r})
        mx = Metrics()
        mx.observe_message("reject")
        """
    )
    _run(code, [], env)
    files = sorted(p.name for p in mpdir.iterdir())
    assert "stale" not in files and "counter_1.db" not in files  # emptied first
    assert any(f.startswith("counter_") for f in files), files
    s = _parse(_run(RENDER, [], {**env, m.MULTIPROC_ENV: str(mpdir)}))
    assert s[("mailguard_messages_total", (("decision", "reject"),))] == 1


@pytest.mark.parametrize("code", [250, 421, 550])
def test_smtp_reply_classes(code: int) -> None:
    mx = Metrics()
    mx.smtp_reply(code)
    assert value(mx, "mailguard_smtp_replies_total", **{"class": f"{code // 100}xx"}) == 1
