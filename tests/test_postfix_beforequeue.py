"""Before-queue (one queue pass): sender → Postfix submission smtpd → `smtpd_proxy_filter` →
`mailguard serve` → reinjection smtpd → cleanup → queue → sink, with a private Postfix built from
the shipped deploy/postfix/before-queue snippets (tests/postfix_onepass_support.py).

What the sender's mail program sees is the point here: MailGuard's answer to the final "." is
the sender's answer (250 with Postfix's queue id, the policy's 550, a 4xx while MailGuard is
down). Runs as root where Debian's `postfix` package is installed; skipped otherwise, unless
MAILGUARD_REQUIRE_POSTFIX is set (CI). Module fixtures: one instance, sink and MailGuard; the
tests run in file order and tell messages apart by Message-ID.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import free_port

from tests.postfix_onepass_support import (
    BEFORE_QUEUE,
    CLEAN_SENDER,
    DELIVERY_TIMEOUT,
    HOLD_SENDER,
    POLICY,
    RCPT,
    REJECT_SENDER,
    REJECT_TEXT,
    REWRITE_RCPTS,
    REWRITE_SENDER,
    Rig,
    adapt_before_queue,
    arrived,
    one_pass_rig,
    parsed,
    rewrite_message,
    send,
    wait_arrival,
)
from tests.postfix_support import POSTFIX_HOSTNAME, postfix_workdir
from tests.test_postfix_integration import make_message, split

pytestmark = pytest.mark.postfix


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    yield from postfix_workdir("mg-postfix-bq.")


@pytest.fixture(scope="module")
def rig(workdir: Path) -> Iterator[Rig]:
    with one_pass_rig(
        workdir, POLICY, BEFORE_QUEUE, adapt_before_queue, submission=free_port()
    ) as r:
        yield r


def mailguard_line(rig: Rig, pattern: str) -> str:
    rx = re.compile(pattern, re.MULTILINE)
    deadline = time.monotonic() + 5
    while not (m := rx.search(rig.mailguard.log())) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert m, f"no MailGuard log line /{pattern}/\n{rig.mailguard.log()[-3000:]}"
    return m.group(0)


def test_pass_one_queue_pass_and_the_senders_250_carries_postfixs_queue_id(rig: Rig) -> None:
    pf = rig.postfix
    mid, raw = make_message(CLEAN_SENDER, "bq-clean")
    code, text = send(pf.submission, CLEAN_SENDER, [RCPT], raw)
    assert code == 250, (code, text)
    m = re.search(r"queued as ([0-9A-Za-z]+)", text)
    assert m, f"the sender's 250 does not name Postfix's queue id: {text}"
    qid = m.group(1)
    got = wait_arrival(rig, mid)
    assert split(got)[1] == split(raw)[1], "body changed on the way through Postfix + MailGuard"
    assert got.endswith(raw), "submitted message is not an exact suffix of what arrived"
    assert b"by " + POSTFIX_HOSTNAME.encode() in got
    # one pass through cleanup: one queue id, the one the sender was told
    assert pf.queue_ids(mid) == [qid], pf.queue_ids(mid)
    # the submission smtpd logged MailGuard's answer (proxy-accept), and the reinjection smtpd
    # got the original client from MailGuard's XFORWARD
    pf.wait_log(rf"proxy-accept: END-OF-MESSAGE: 250 .*queued as {qid}", 5, "proxy-accept")
    assert any("orig_client=" in ln for ln in pf.lines_of(qid)), pf.lines_of(qid)
    # log correlation: MailGuard's decision line starts with the same id, not [UNAVAILABLE]
    mailguard_line(rig, rf"(^|[\s\"]){qid}: .*decision=pass")


def test_reject_the_sender_sees_the_policys_550_and_nothing_is_queued(rig: Rig) -> None:
    pf = rig.postfix
    mid, raw = make_message(REJECT_SENDER, "bq-reject")
    code, text = send(pf.submission, REJECT_SENDER, [RCPT], raw)
    assert code == 550, (code, text)
    assert "5.7.1" in text and REJECT_TEXT in text, text
    pf.wait_log(r"proxy-reject: END-OF-MESSAGE: 550 5\.7\.1 MailGuard: " + re.escape(REJECT_TEXT),
                5, "proxy-reject")  # fmt: skip
    time.sleep(1.5)
    assert pf.queue_ids(mid) == [], "a rejected message reached cleanup"
    assert not arrived(rig, mid) and not arrived(rig, mid, null_sender=True), "delivered or bounced"
    assert "MAILER-DAEMON" not in pf.queue_listing()


def test_held_message_waits_then_arrives_after_release(rig: Rig) -> None:
    pf, mg = rig.postfix, rig.mailguard
    mid, raw = make_message(HOLD_SENDER, "bq-hold")
    code, text = send(pf.submission, HOLD_SENDER, [RCPT], raw)
    assert code == 250, (code, text)
    m = re.search(r"held as (\S+)", text)
    assert m, f"the sender is not told the message is held: {text}"
    held_id = m.group(1)
    out = mg.queue("list", "--json")
    assert out.returncode == 0, out.stderr
    held = [h for h in json.loads(out.stdout)["items"] if h["id"] == held_id]
    assert held and held[0]["state"] == "held", out.stdout
    time.sleep(2)  # the scheduler ticks every second: it must not send a held message
    assert not arrived(rig, mid) and pf.queue_ids(mid) == [], "held message reached Postfix"
    out = mg.queue("release", held_id)
    assert out.returncode == 0, out.stderr
    got = wait_arrival(rig, mid)
    assert split(got)[1] == split(raw)[1]
    assert len(pf.queue_ids(mid)) == 1  # released: one pass through cleanup


def test_bcc_and_zip_rewrites_reach_the_queue(rig: Rig) -> None:
    pf = rig.postfix
    mid, raw = rewrite_message("bq-rewrite")
    code, text = send(pf.submission, REWRITE_SENDER, REWRITE_RCPTS, raw)
    assert code == 250 and "queued as" in text, (code, text)
    m = parsed(wait_arrival(rig, mid, rcpts=REWRITE_RCPTS))
    assert "client-a" not in str(m["To"]) and "client-b" not in str(m["To"]), m["To"]
    names = [p.get_filename() for p in m.iter_attachments()]
    assert any(n.endswith(".zip") for n in names) and not any(n.endswith(".csv") for n in names)
    # the password goes to the sender in a separate notice, through the same reinjection smtpd
    deadline = time.monotonic() + DELIVERY_TIMEOUT
    while not [g for g in rig.sink.sink.got if g[1] == [REWRITE_SENDER]]:
        assert time.monotonic() < deadline, f"no password notice\n{rig.mailguard.log()[-3000:]}"
        time.sleep(0.1)
    assert len(pf.queue_ids(mid)) == 1


def test_mailguard_down_the_sender_gets_4xx_and_nothing_is_lost(rig: Rig) -> None:
    pf, mg = rig.postfix, rig.mailguard
    mg.stop()
    try:
        mid, raw = make_message(CLEAN_SENDER, "bq-down")
        code, text = send(pf.submission, CLEAN_SENDER, [RCPT], raw)
        assert 400 <= code < 500, (code, text)
        assert "queue file write error" in text, text  # what the sender's program shows
        time.sleep(1)
        assert pf.queue_ids(mid) == [] and not arrived(rig, mid), "filter bypassed"
        pf.wait_log(r"warning: connect to proxy filter 127\.0\.0\.1:\d+: Connection refused",
                    5, "Postfix's warning")  # fmt: skip
        # notify_classes (default resource, software): postmaster gets the session transcript
        deadline = time.monotonic() + DELIVERY_TIMEOUT
        notices: list[bytes] = []
        while not notices and time.monotonic() < deadline:
            notices = [
                raw_
                for _f, rcpts, raw_ in list(rig.sink.sink.got)
                if any(r.startswith("postmaster@") for r in rcpts) and mid.encode() not in raw_
                and b"queue file write error" in raw_
            ]  # fmt: skip
            time.sleep(0.1)
        assert notices, f"no postmaster notice\n{pf.log_tail()}"
    finally:
        mg.start()
    # the sender's program keeps the message and retries: the retry goes through MailGuard
    code, text = send(pf.submission, CLEAN_SENDER, [RCPT], raw)
    assert code == 250, (code, text)
    got = wait_arrival(rig, mid)
    assert split(got)[1] == split(raw)[1]
    assert len(pf.queue_ids(mid)) == 1
