"""Milter (one queue pass, issue 15 item 5): sender → Postfix submission smtpd, which shows each
message to `mailguard serve --milter` over the milter protocol → cleanup → queue → sink, with a
private Postfix built from the shipped deploy/postfix/milter snippets.

What the sender's mail program sees is the point here, as before-queue: 250 with Postfix's queue
id, the policy's 550, a 4xx while MailGuard is down; held mail is kept by MailGuard (Postfix
discards its copy) and reaches the sink through the reinjection smtpd after release; rewritten
mail is relayed by MailGuard. Runs as root where Debian's `postfix` package is installed; skipped
otherwise, unless MAILGUARD_REQUIRE_POSTFIX is set (CI). The tests run in file order.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import free_port, wait_port

from tests.postfix_onepass_support import (
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
    arrived,
    one_pass_rig,
    parsed,
    rewrite_message,
    send,
    wait_arrival,
)
from tests.postfix_support import SNIPPETS, _sub_once, postfix_workdir
from tests.test_postfix_integration import MailGuard, make_message, split

pytestmark = pytest.mark.postfix

MILTER = SNIPPETS / "milter"


def adapt_milter(text: str, *, submission: int, filter_port: int, reinject: int) -> str:
    """deploy/postfix/milter/master.cf.snippet with the test's ports."""
    text = _sub_once(r"^submission(?= +inet )", f"127.0.0.1:{submission}", text, "submission")
    text = _sub_once(
        r"smtpd_milters=inet:127\.0\.0\.1:10035\b",
        f"smtpd_milters=inet:127.0.0.1:{filter_port}",
        text,
        "smtpd_milters",
    )
    return _sub_once(
        r"^127\.0\.0\.1:10026(?= +inet )", f"127.0.0.1:{reinject}", text, "reinjection smtpd"
    )


class MilterGuard(MailGuard):
    """`mailguard serve --milter`: its SMTP port is unused here, the milter port is Postfix's."""

    def __init__(self, workdir: Path, milter: int, upstream: int) -> None:
        super().__init__(workdir, free_port(), upstream)
        self.milter = milter
        self.args += ["--milter", f"127.0.0.1:{milter}"]

    def start(self) -> None:
        super().start()
        try:
            wait_port(self.milter, 20)
        except TimeoutError:
            self.stop()
            raise AssertionError(f"no milter port:\n{self.log()}") from None


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    yield from postfix_workdir("mg-postfix-milter.")


@pytest.fixture(scope="module")
def rig(workdir: Path) -> Iterator[Rig]:
    with one_pass_rig(
        workdir, POLICY, MILTER, adapt_milter, submission=free_port(), guard=MilterGuard
    ) as r:
        yield r


def test_pass_postfix_queues_it_once_with_the_bytes_the_sender_sent(rig: Rig) -> None:
    pf = rig.postfix
    mid, raw = make_message(CLEAN_SENDER, "ml-clean")
    code, text = send(pf.submission, CLEAN_SENDER, [RCPT], raw)
    assert code == 250, (code, text)
    m = re.search(r"queued as ([0-9A-Za-z]+)", text)
    assert m, text
    qid = m.group(1)
    got = wait_arrival(rig, mid)
    assert split(got)[1] == split(raw)[1], "body changed on the way through Postfix + MailGuard"
    assert got.endswith(raw), "submitted message is not an exact suffix of what arrived"
    assert pf.queue_ids(mid) == [qid], pf.queue_ids(mid)  # one pass through cleanup
    # MailGuard's decision line carries Postfix's queue id (milter macro "i")
    deadline = time.monotonic() + 5
    rx = re.compile(rf"(^|[\s\"]){qid}: .*decision=pass", re.MULTILINE)
    while not rx.search(rig.mailguard.log()):
        assert time.monotonic() < deadline, rig.mailguard.log()[-3000:]
        time.sleep(0.1)


def test_reject_the_sender_sees_the_policys_550_and_nothing_is_queued(rig: Rig) -> None:
    pf = rig.postfix
    mid, raw = make_message(REJECT_SENDER, "ml-reject")
    code, text = send(pf.submission, REJECT_SENDER, [RCPT], raw)
    assert code == 550, (code, text)
    assert "5.7.1" in text and REJECT_TEXT in text, text
    pf.wait_log(r"milter-reject: END-OF-MESSAGE .*: 5\.7\.1 MailGuard: ", 5, "milter-reject")
    time.sleep(1.5)
    assert not arrived(rig, mid) and not arrived(rig, mid, null_sender=True), "delivered or bounced"
    assert "MAILER-DAEMON" not in pf.queue_listing()


def test_held_message_is_kept_by_mailguard_and_arrives_after_release(rig: Rig) -> None:
    pf, mg = rig.postfix, rig.mailguard
    mid, raw = make_message(HOLD_SENDER, "ml-hold")
    code, text = send(pf.submission, HOLD_SENDER, [RCPT], raw)
    assert code == 250, (code, text)  # Postfix's own 250: it discards its copy
    pf.wait_log(r"milter-discard: END-OF-MESSAGE", 5, "milter-discard")
    out = mg.queue("list", "--json")
    assert out.returncode == 0, out.stderr
    held = [h for h in json.loads(out.stdout)["items"] if h["state"] == "held"]
    assert len(held) == 1, out.stdout
    time.sleep(2)  # the scheduler ticks every second: it must not send a held message
    assert not arrived(rig, mid), "held message reached the sink"
    out = mg.queue("release", held[0]["id"])
    assert out.returncode == 0, out.stderr
    got = wait_arrival(rig, mid)
    assert split(got)[1] == split(raw)[1]
    # kept bytes are what the milter rebuilt; released through the reinjection smtpd
    assert any("mailguard-reinject" in ln for q in pf.queue_ids(mid) for ln in pf.lines_of(q))


def test_bcc_and_zip_rewrites_are_relayed_by_mailguard(rig: Rig) -> None:
    pf = rig.postfix
    mid, raw = rewrite_message("ml-rewrite")
    code, text = send(pf.submission, REWRITE_SENDER, REWRITE_RCPTS, raw)
    assert code == 250, (code, text)
    m = parsed(wait_arrival(rig, mid, rcpts=REWRITE_RCPTS))
    assert "client-a" not in str(m["To"]) and "client-b" not in str(m["To"]), m["To"]
    names = [p.get_filename() for p in m.iter_attachments()]
    assert any(n.endswith(".zip") for n in names) and not any(n.endswith(".csv") for n in names)
    deadline = time.monotonic() + DELIVERY_TIMEOUT
    while not [g for g in rig.sink.sink.got if g[1] == [REWRITE_SENDER]]:
        assert time.monotonic() < deadline, f"no password notice\n{rig.mailguard.log()[-3000:]}"
        time.sleep(0.1)
    # the original was discarded by Postfix: only the rewritten copy was delivered
    assert len(arrived(rig, mid)) == 1, [r for _f, r, _b in arrived(rig, mid)]


def test_mailguard_down_the_sender_gets_4xx_and_nothing_passes(rig: Rig) -> None:
    pf, mg = rig.postfix, rig.mailguard
    mg.stop()
    try:
        mid, raw = make_message(CLEAN_SENDER, "ml-down")
        code, text = send(pf.submission, CLEAN_SENDER, [RCPT], raw)
        assert 400 <= code < 500 and "4.7.1" in text, (code, text)  # milter_default_action
        time.sleep(1)
        assert not arrived(rig, mid), "milter bypassed"
    finally:
        mg.start()
    code, text = send(pf.submission, CLEAN_SENDER, [RCPT], raw)  # the sender's retry
    assert code == 250, (code, text)
    got = wait_arrival(rig, mid)
    assert split(got)[1] == split(raw)[1]
    time.sleep(1)
    assert len(arrived(rig, mid)) == 1
