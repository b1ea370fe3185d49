"""Behind a real Postfix: submission → queue → scan transport → `mailguard serve` → reinjection
smtpd → queue → sink, with a private Postfix instance built from the shipped deploy/postfix
snippets (tests/postfix_support.py).

Runs as root where Debian's `postfix` package is installed; skipped otherwise, unless
MAILGUARD_REQUIRE_POSTFIX is set (CI), where a missing Postfix is a failure.
The tests share one instance, one sink and one MailGuard process (module fixtures) and run in
file order; each message is told apart by its Message-ID.
"""

from __future__ import annotations

import json
import re
import signal
import smtplib
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import ThreadSink, free_port, mailguard_cmd, wait_port

from tests.postfix_support import POSTFIX_HOSTNAME, PostfixInstance, postfix_workdir

pytestmark = pytest.mark.postfix

MAILGUARD_HOSTNAME = "mailguard.mg-test.invalid"  # not Postfix's myhostname: loop detection
RCPT = "someone@partner.example"
CLEAN_SENDER = "clean@example.co.jp"
REJECT_SENDER = "refused@example.co.jp"
HOLD_SENDER = "held@example.co.jp"
REJECT_TEXT = "Test policy refuses mail from this sender"
DELIVERY_TIMEOUT = 20.0

POLICY = f"""\
[organization]
internal_domains = ["example.co.jp"]

[[rule]]
name = "refuse-sender"
when = "recipient.external"
action = "reject"
reject_message = "{REJECT_TEXT}"
senders = ["{REJECT_SENDER}"]

[[rule]]
name = "hold-sender"
when = "recipient.external"
action = "hold"
hold_for = "1h"
senders = ["{HOLD_SENDER}"]
"""


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    yield from postfix_workdir("mg-postfix-test.")


@pytest.fixture(scope="module")
def sink() -> Iterator[ThreadSink]:
    s = ThreadSink()
    yield s
    s.stop()


class MailGuard:
    """A real `mailguard serve` process on a fixed port (so Postfix's content_filter finds it
    again after a restart); its log goes to a file the tests read."""

    def __init__(self, workdir: Path, port: int, upstream: int) -> None:
        self.port = port
        self.store = workdir / "mailguard.db"
        self.logfile = workdir / "mailguard.log"
        self.policy = workdir / "policy.toml"
        self.policy.write_text(POLICY, encoding="utf-8")
        self.config = workdir / "mailguard.toml"
        self.config.write_text(f'[smtp]\nhostname = "{MAILGUARD_HOSTNAME}"\n', encoding="utf-8")
        self.args = [
            "serve",
            "-c",
            str(self.config),
            "--listen",
            f"127.0.0.1:{port}",
            "--upstream",
            f"127.0.0.1:{upstream}",
            "--policy",
            str(self.policy),
            "--store",
            str(self.store),
            "--web",
            f"127.0.0.1:{free_port()}",
            "--log-level",
            "info",
            "--grace",
            "5",
        ]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        assert self.proc is None
        with open(self.logfile, "ab") as fh:
            self.proc = subprocess.Popen(
                [*mailguard_cmd(), *self.args], stdout=fh, stderr=subprocess.STDOUT
            )
        try:
            wait_port(self.port, 20)
        except TimeoutError:
            self.stop()
            raise AssertionError(f"mailguard serve did not start:\n{self.log()}") from None

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self.proc = None

    def log(self) -> str:
        try:
            return self.logfile.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""

    def queue(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*mailguard_cmd(), "queue", *args, "--store", str(self.store)],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )


@dataclass
class Rig:
    postfix: PostfixInstance
    mailguard: MailGuard
    sink: ThreadSink


@pytest.fixture(scope="module")
def rig(workdir: Path, sink: ThreadSink) -> Iterator[Rig]:
    pf = PostfixInstance(
        submission=free_port(),
        filter_port=free_port(),
        reinject=free_port(),
        sink=sink.port,
        own_senders=("example.co.jp",),
    )
    mg = MailGuard(workdir, pf.filter_port, pf.reinject)
    try:
        pf.build()
        pf.start()
        mg.start()
        yield Rig(pf, mg, sink)
    finally:
        mg.stop()
        pf.stop()


def make_message(sender: str, tag: str) -> tuple[str, bytes]:
    """A message whose body would be damaged by any re-encoding: 8-bit UTF-8 Japanese, a
    leading dot (SMTP dot-stuffing), trailing blanks, a long line, ISO-2022-JP escapes."""
    mid = f"{tag}-{uuid.uuid4().hex}@example.co.jp"
    body = (
        "お世話になっております。テストです。\r\n"
        ".a line with a leading dot\r\n"
        "..two dots\r\n"
        "trailing blanks   \t\r\n"
        + "x" * 900
        + "\r\n"
        + "\x1b$B$3$s$K$A$O\x1b(B (ISO-2022-JP bytes in an 8bit body)\r\n"
        "\r\n"
        "-- \r\n"
        "end\r\n"
    ).encode("utf-8")
    head = (
        f"From: Sender <{sender}>\r\n"
        f"To: Someone <{RCPT}>\r\n"
        f"Subject: =?UTF-8?B?6KaL56mN5pu4?= {tag}\r\n"
        f"Message-ID: <{mid}>\r\n"
        "Date: Mon, 24 Nov 2025 10:00:00 +0900\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=UTF-8\r\n"
        "Content-Transfer-Encoding: 8bit\r\n"
    ).encode("ascii")
    return mid, head + b"\r\n" + body


def submit(rig: Rig, sender: str, raw: bytes) -> None:
    with smtplib.SMTP("127.0.0.1", rig.postfix.submission, timeout=30) as s:
        s.ehlo("client.mg-test.invalid")
        s.sendmail(sender, [RCPT], raw, mail_options=["BODY=8BITMIME"])


def arrived(rig: Rig, mid: str, *, null_sender: bool = False) -> list[bytes]:
    needle = mid.encode()
    return [
        raw
        for frm, _rcpts, raw in list(rig.sink.sink.got)
        if needle in raw and (frm in ("", "<>")) == null_sender
    ]


def wait_arrival(
    rig: Rig, mid: str, timeout: float = DELIVERY_TIMEOUT, *, null_sender: bool = False
) -> bytes:
    deadline = time.monotonic() + timeout
    while True:
        got = arrived(rig, mid, null_sender=null_sender)
        if got:
            return got[0]
        if time.monotonic() >= deadline:
            raise AssertionError(
                f"<{mid}> did not reach the sink in {timeout:.0f}s\n--- maillog ---\n"
                f"{rig.postfix.log_tail()}\n--- mailguard ---\n{rig.mailguard.log()[-3000:]}"
            )
        time.sleep(0.1)


def first_queue_id(rig: Rig, mid: str) -> str:
    """Postfix's queue id of the submitted copy, the one Postfix hands to MailGuard (cleanup
    logs it before the reinjected copy's)."""
    rig.postfix.wait_log(r"message-id=<" + re.escape(mid) + ">", 10, f"cleanup of <{mid}>")
    return rig.postfix.queue_ids(mid)[0]


def split(raw: bytes) -> tuple[bytes, bytes]:
    head, sep, body = raw.partition(b"\r\n\r\n")
    assert sep, "no header/body separator"
    return head, body


def test_clean_message_passes_through_mailguard_byte_identical(rig: Rig) -> None:
    mid, raw = make_message(CLEAN_SENDER, "clean")
    submit(rig, CLEAN_SENDER, raw)
    got = wait_arrival(rig, mid)
    assert split(got)[1] == split(raw)[1], "body changed on the way through Postfix + MailGuard"
    # every header we sent is still there, in order and byte for byte, under the Received: lines
    assert got.endswith(raw), "submitted message is not an exact suffix of what arrived"
    # ... and it did go through MailGuard: Postfix delivered to it, then took it back on :reinject
    pf = rig.postfix
    qid = first_queue_id(rig, mid)
    relay = [ln for ln in pf.lines_of(qid) if "status=sent" in ln]
    assert relay and f"relay=127.0.0.1[127.0.0.1]:{pf.filter_port}" in relay[0], relay
    qids = pf.queue_ids(mid)
    assert len(qids) == 2, f"expected the submitted and the reinjected copy: {qids}"
    # XFORWARD the other way: MailGuard passed Postfix's attributes on to the reinjection smtpd
    assert any(f"orig_queue_id={qid}," in ln for ln in pf.lines_of(qids[1])), pf.lines_of(qids[1])
    assert b"by " + POSTFIX_HOSTNAME.encode() in got  # Postfix's Received: lines


def test_postfix_queue_id_in_mailguard_log_line(rig: Rig) -> None:
    """XFORWARD IDENT: MailGuard's per-message line starts with Postfix's queue id."""
    mid, raw = make_message(CLEAN_SENDER, "qid")
    submit(rig, CLEAN_SENDER, raw)
    wait_arrival(rig, mid)
    qid = first_queue_id(rig, mid)
    deadline = time.monotonic() + 5
    pat = re.compile(rf"(^|[\s\"]){re.escape(qid)}: .*decision=pass", re.MULTILINE)
    while not pat.search(rig.mailguard.log()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert pat.search(rig.mailguard.log()), (
        f"no MailGuard log line starting with Postfix's queue id {qid} (decision=pass)\n"
        f"--- mailguard log ---\n{rig.mailguard.log()[-3000:]}"
    )


def test_rejected_message_bounces_with_mailguards_reason(rig: Rig) -> None:
    mid, raw = make_message(REJECT_SENDER, "reject")
    submit(rig, REJECT_SENDER, raw)  # Postfix accepts: the filter runs after the queue
    pf = rig.postfix
    qid = first_queue_id(rig, mid)
    line = pf.wait_log(
        rf"{qid}: to=<{re.escape(RCPT)}>.*status=bounced \(.*550 5\.7\.1 MailGuard: "
        + re.escape(REJECT_TEXT),
        DELIVERY_TIMEOUT,
        "the bounce",
    )
    assert f":{pf.filter_port}" in line.group(0)
    # the non-delivery report goes to the envelope sender (null sender), carrying the reason
    bounce = wait_arrival(rig, mid, null_sender=True)
    assert REJECT_TEXT.encode() in bounce
    assert next(r for _f, r, c in rig.sink.sink.got if c is bounce) == [REJECT_SENDER]
    assert not arrived(rig, mid), "the rejected message itself was delivered"


def test_mailguard_down_postfix_defers_then_delivers(rig: Rig) -> None:
    pf, mg = rig.postfix, rig.mailguard
    mg.stop()
    try:
        mid, raw = make_message(CLEAN_SENDER, "deferred")
        submit(rig, CLEAN_SENDER, raw)
        qid = first_queue_id(rig, mid)
        pf.wait_log(
            rf"{qid}: to=<{re.escape(RCPT)}>.*dsn=4\.[0-9.]+, status=deferred",
            DELIVERY_TIMEOUT,
            "a 4xx deferral while MailGuard is down",
        )
        time.sleep(1)
        assert not arrived(rig, mid), "delivered while MailGuard was down: the filter was bypassed"
        assert qid in pf.queue_listing()
    finally:
        mg.start()
    pf.flush()
    got = wait_arrival(rig, mid)
    assert split(got)[1] == split(raw)[1]
    sent = [ln for ln in pf.lines_of(qid) if "status=sent" in ln]
    assert sent and f":{pf.filter_port}," in sent[0], sent


def test_held_message_waits_then_arrives_after_release(rig: Rig) -> None:
    pf, mg = rig.postfix, rig.mailguard
    mid, raw = make_message(HOLD_SENDER, "hold")
    submit(rig, HOLD_SENDER, raw)
    qid = first_queue_id(rig, mid)
    m = pf.wait_log(
        rf"{qid}: to=<{re.escape(RCPT)}>.*status=(sent|deferred|bounced) \(.*",
        DELIVERY_TIMEOUT,
        "MailGuard's answer to the held message",
    )
    assert "status=sent" in m.group(0), (
        f"MailGuard did not take the held message (hold path not wired?): {m.group(0)}"
    )
    # Postfix is done with it (250 from MailGuard = stored durably); MailGuard keeps it
    held = []
    deadline = time.monotonic() + 10
    while not held and time.monotonic() < deadline:
        out = mg.queue("list", "--json")
        assert out.returncode == 0, out.stderr
        held = [h for h in json.loads(out.stdout)["items"] if h["queue_id"] == qid]
        if not held:
            time.sleep(0.2)
    assert held, f"queue list shows no message with Postfix queue id {qid}: {out.stdout}"
    assert held[0]["state"] == "held", held[0]
    time.sleep(2)  # the scheduler ticks every second: it must not send a held message
    assert not arrived(rig, mid), "held message was delivered before release"
    out = mg.queue("release", held[0]["id"])
    assert out.returncode == 0, out.stderr
    got = wait_arrival(rig, mid)
    assert split(got)[1] == split(raw)[1]


# -- submission: a forged MAIL FROM is refused (issue 12 item 2) -----------------------------

FORGED = "victim@thirdparty.example"


def submit_reply(rig: Rig, mail_from: str, raw: bytes) -> tuple[int, str]:
    """One submission without AUTH: the first refusal, or the reply to DATA."""
    with smtplib.SMTP("127.0.0.1", rig.postfix.submission, timeout=30) as s:
        s.ehlo("client.mg-test.invalid")
        code, resp = s.mail(mail_from, ["BODY=8BITMIME"])
        if code == 250:
            code, resp = s.rcpt(RCPT)
        if code in (250, 251):
            code, resp = s.data(raw)
        return code, resp.decode("utf-8", "replace")


def test_submission_refuses_a_forged_mail_from(rig: Rig) -> None:
    """A third party's address as MAIL FROM is refused by Postfix at submission (nothing reaches
    MailGuard or the sink); the organisation's address still goes through. The private
    instance has no SASL, and Postfix skips reject_sender_login_mismatch without SASL, so the
    refusal comes from a static check_sender_access map of the organisation's domain followed
    by `reject` (tests/postfix_support.py `own_senders`), with the shipped
    smtpd_sender_login_maps / reject_sender_login_mismatch lines in place and the map built;
    in production the login map refuses the same MAIL FROM for a logged-in user."""
    mid, raw = make_message(FORGED, "forged")
    code, text = submit_reply(rig, FORGED, raw)
    assert code == 554 and "Sender address rejected: Access denied" in text, f"{code} {text}"
    rig.postfix.wait_log(re.escape(f"<{FORGED}>: Sender address rejected"), 10, "the refusal")
    mid2, raw2 = make_message(CLEAN_SENDER, "own-sender")
    code, text = submit_reply(rig, CLEAN_SENDER, raw2)
    assert code == 250, f"{code} {text}"
    wait_arrival(rig, mid2)
    assert not arrived(rig, mid)
    assert (
        "smtpd_sender_login_maps=hash:$config_directory/sender_logins"
        in (rig.postfix.config / "master.cf").read_text()
    )
