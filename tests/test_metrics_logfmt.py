"""mailguard.logfmt: the per-message log line (text and JSON) and the logging set-up."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from mailguard.logfmt import MAX_FIELD, message_log_line, setup_logging

FIELDS = dict(
    queue_id="3CF6B2AAE8",
    mg_id="mg-7",
    message_id="<20240401.123@example.co.jp>",
    decision="hold",
    rules=["cool-down", "bcc-mistake"],
    codes=["recipient.visible_external", "domain.first_time", "recipient.visible_external"],
    transforms=["bcc"],
    size=5120,
    recipients=3,
    elapsed=0.0042,
    reply=250,
    sender="taro@example.co.jp",
    rcpts=["a@customer-a.example", "b@customer-b.example", "c@example.co.jp"],
)


def test_text_line_order_and_content() -> None:
    line = message_log_line(**FIELDS)
    assert line == (
        "3CF6B2AAE8: id=mg-7 message-id=<20240401.123@example.co.jp> decision=hold "
        "rules=cool-down,bcc-mistake findings=recipient.visible_external,domain.first_time "
        "transforms=bcc size=5120 nrcpt=3 reply=250 elapsed_ms=4.2"
    )


def test_addresses_only_when_enabled() -> None:
    line = message_log_line(**FIELDS)
    assert "taro@" not in line and "customer-a" not in line
    js = json.loads(message_log_line(**FIELDS, json=True))
    assert "from" not in js and "to" not in js
    line = message_log_line(**FIELDS, log_addresses=True)
    assert line.endswith(
        "from=<taro@example.co.jp> "
        "to=<a@customer-a.example>,<b@customer-b.example>,<c@example.co.jp>"
    )
    js = json.loads(message_log_line(**FIELDS, log_addresses=True, json=True))
    assert js["from"] == "taro@example.co.jp" and len(js["to"]) == 3


def test_json_line() -> None:
    js = json.loads(message_log_line(**FIELDS, json=True))
    assert list(js)[:3] == ["queue_id", "id", "message_id"]
    assert js["queue_id"] == "3CF6B2AAE8"
    assert js["findings"] == ["recipient.visible_external", "domain.first_time"]
    assert js["rules"] == ["cool-down", "bcc-mistake"]
    assert js["size"] == 5120 and js["nrcpt"] == 3 and js["elapsed_ms"] == 4.2


def test_no_queue_id_and_empty_lists() -> None:
    line = message_log_line(
        queue_id="", mg_id="mg-1", decision="pass", size=10, recipients=1, elapsed=0.001
    )
    assert line.startswith("-: id=mg-1 message-id=- decision=pass rules=- findings=-")


def test_hostile_message_id_cannot_forge_lines() -> None:
    evil = "<x@y>\r\nABCDEF1234: id=forged decision=pass" + "A" * 5000
    line = message_log_line(**{**FIELDS, "message_id": evil})
    assert "\n" not in line and "\r" not in line
    assert len(line) < MAX_FIELD + 300
    assert 'message-id="<x@y>\\x0d\\x0aABCDEF1234: id=forged' in line  # quoted, one field
    js = json.loads(message_log_line(**{**FIELDS, "message_id": evil}, json=True))
    assert "\n" not in js["message_id"]


@pytest.fixture
def root_logging() -> Iterator[None]:
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    yield
    for h in list(root.handlers):
        if h not in saved[0]:
            root.removeHandler(h)
    root.setLevel(saved[1])


def test_setup_logging_json_merges_message_object(root_logging: None) -> None:
    buf = io.StringIO()
    setup_logging("info", json=True, stream=buf)
    log = logging.getLogger("mailguard.smtp")
    log.info("%s", message_log_line(**FIELDS, json=True))
    log.debug("not shown")
    log.warning("%s: upstream down\nsecond line", "3CF6B2AAE8")
    lines = buf.getvalue().splitlines()
    assert len(lines) == 2
    first, second = (json.loads(x) for x in lines)
    assert first["level"] == "info" and first["logger"] == "mailguard.smtp"
    assert first["queue_id"] == "3CF6B2AAE8" and "message" not in first
    assert second["message"] == "3CF6B2AAE8: upstream down\nsecond line"


def test_setup_logging_text_and_idempotent(root_logging: None) -> None:
    first, second = io.StringIO(), io.StringIO()
    setup_logging("warning", stream=first)
    setup_logging("info", stream=second)  # SIGHUP: replaces, does not add
    logging.getLogger("mailguard.relay").info("%s: relayed", "3CF6B2AAE8")
    assert first.getvalue() == ""
    assert "mailguard.relay[" in second.getvalue()
    assert second.getvalue().rstrip().endswith("INFO: 3CF6B2AAE8: relayed")
    with pytest.raises(ValueError):
        setup_logging("loud")
