"""Gateway (one queue pass): an internal mail server → `mailguard serve` (its smarthost) →
the outbound Postfix's listener for MailGuard → cleanup → queue → sink, with a private Postfix
built from the shipped deploy/postfix/gateway snippets (tests/postfix_onepass_support.py).
The test plays the internal server: MailGuard's answer to the final "." is what it gets.

Runs as root where Debian's `postfix` package is installed; skipped otherwise, unless
MAILGUARD_REQUIRE_POSTFIX is set (CI). Module fixtures, file order, one Message-ID per test.
"""

from __future__ import annotations

import json
import re
import smtplib
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.postfix_onepass_support import (
    CLEAN_SENDER,
    DELIVERY_TIMEOUT,
    GATEWAY,
    HOLD_SENDER,
    POLICY,
    RCPT,
    REJECT_SENDER,
    REJECT_TEXT,
    REWRITE_RCPTS,
    REWRITE_SENDER,
    Rig,
    adapt_gateway,
    arrived,
    one_pass_rig,
    parsed,
    rewrite_message,
    send,
    wait_arrival,
)
from tests.postfix_support import POSTFIX_HOSTNAME, postfix_workdir, wait_listening
from tests.test_postfix_integration import make_message, split

pytestmark = pytest.mark.postfix


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    yield from postfix_workdir("mg-postfix-gw.")


@pytest.fixture(scope="module")
def rig(workdir: Path) -> Iterator[Rig]:
    with one_pass_rig(workdir, POLICY, GATEWAY, adapt_gateway, submission=0) as r:
        yield r


def test_pass_mailguard_answers_with_postfixs_queue_id(rig: Rig) -> None:
    pf, mg = rig.postfix, rig.mailguard
    mid, raw = make_message(CLEAN_SENDER, "gw-clean")
    code, text = send(mg.port, CLEAN_SENDER, [RCPT], raw)
    assert code == 250, (code, text)
    m = re.search(r"queued as ([0-9A-Za-z]+)", text)
    assert m, f"the internal server is not told Postfix's queue id: {text}"
    qid = m.group(1)
    got = wait_arrival(rig, mid)
    assert split(got)[1] == split(raw)[1]
    assert got.endswith(raw)
    assert b"by " + POSTFIX_HOSTNAME.encode() in got
    assert pf.queue_ids(mid) == [qid]
    rx = re.compile(rf"(^|[\s\"]){qid}: .*decision=pass", re.MULTILINE)
    deadline = time.monotonic() + 5
    while not rx.search(mg.log()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert rx.search(mg.log()), f"MailGuard's line does not start with {qid}\n{mg.log()[-2000:]}"


def test_reject_the_internal_server_gets_the_policys_550(rig: Rig) -> None:
    pf, mg = rig.postfix, rig.mailguard
    mid, raw = make_message(REJECT_SENDER, "gw-reject")
    code, text = send(mg.port, REJECT_SENDER, [RCPT], raw)
    assert code == 550 and "5.7.1" in text and REJECT_TEXT in text, (code, text)
    time.sleep(1)
    assert (
        pf.queue_ids(mid) == []
        and not arrived(rig, mid)
        and not arrived(rig, mid, null_sender=True)
    )


def test_held_message_waits_then_arrives_after_release(rig: Rig) -> None:
    pf, mg = rig.postfix, rig.mailguard
    mid, raw = make_message(HOLD_SENDER, "gw-hold")
    code, text = send(mg.port, HOLD_SENDER, [RCPT], raw)
    assert code == 250, (code, text)
    held_id = re.search(r"held as (\S+)", text)
    assert held_id, text
    out = mg.queue("list", "--json")
    assert out.returncode == 0, out.stderr
    assert [h["state"] for h in json.loads(out.stdout)["items"] if h["id"] == held_id[1]] == [
        "held"
    ]
    time.sleep(2)
    assert not arrived(rig, mid) and pf.queue_ids(mid) == []
    out = mg.queue("release", held_id[1])
    assert out.returncode == 0, out.stderr
    assert split(wait_arrival(rig, mid))[1] == split(raw)[1]
    assert len(pf.queue_ids(mid)) == 1


def test_bcc_and_zip_rewrites_reach_the_queue(rig: Rig) -> None:
    mg = rig.mailguard
    mid, raw = rewrite_message("gw-rewrite")
    code, text = send(mg.port, REWRITE_SENDER, REWRITE_RCPTS, raw)
    assert code == 250 and "queued as" in text, (code, text)
    m = parsed(wait_arrival(rig, mid, rcpts=REWRITE_RCPTS))
    assert "client-a" not in str(m["To"]) and "client-b" not in str(m["To"]), m["To"]
    names = [p.get_filename() for p in m.iter_attachments()]
    assert any(n.endswith(".zip") for n in names) and not any(n.endswith(".csv") for n in names)
    deadline = time.monotonic() + DELIVERY_TIMEOUT
    while not [g for g in rig.sink.sink.got if g[1] == [REWRITE_SENDER]]:
        assert time.monotonic() < deadline, f"no password notice\n{mg.log()[-3000:]}"
        time.sleep(0.1)


def test_postfix_down_mailguard_answers_4xx_then_mail_goes_through(rig: Rig) -> None:
    """The outbound Postfix is down: MailGuard answers the final "." with a 4xx (the internal
    server keeps the message and retries), never 250 for mail nobody has."""
    pf, mg = rig.postfix, rig.mailguard
    mid, raw = make_message(CLEAN_SENDER, "gw-pfdown")
    pf._ok("postfix", "-c", str(pf.config), "stop")
    deadline = time.monotonic() + 15
    while pf.master_pid() is not None and time.monotonic() < deadline:
        time.sleep(0.1)
    try:
        code, text = send(mg.port, CLEAN_SENDER, [RCPT], raw)
        assert 400 <= code < 500, (code, text)
    finally:
        pf.start()
    wait_listening(pf.reinject, 20, what="Postfix listener for MailGuard")
    code, text = send(mg.port, CLEAN_SENDER, [RCPT], raw)  # the internal server's retry
    assert code == 250, (code, text)
    assert split(wait_arrival(rig, mid))[1] == split(raw)[1]


def test_mailguard_down_the_internal_server_cannot_connect(rig: Rig) -> None:
    """Nothing can bypass the guard: with MailGuard stopped the internal server's smarthost is
    unreachable, it keeps its mail queued and retries (its own queue)."""
    mg = rig.mailguard
    mg.stop()
    try:
        with pytest.raises(OSError):
            smtplib.SMTP("127.0.0.1", mg.port, timeout=5)
    finally:
        mg.start()
    mid, raw = make_message(CLEAN_SENDER, "gw-mgback")
    assert send(mg.port, CLEAN_SENDER, [RCPT], raw)[0] == 250
    wait_arrival(rig, mid)
