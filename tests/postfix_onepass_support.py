"""One-pass deployments against a private Postfix (tests/postfix_support.py): the before-queue
snippets (deploy/postfix/before-queue) and the gateway snippets (deploy/postfix/gateway), each
used as shipped with only their ports moved (each substitution must match exactly once, so a
changed snippet fails the test instead of silently testing something else).

Shared by tests/test_postfix_beforequeue.py and tests/test_postfix_gateway.py: the policy, the
SMTP client that reads MailGuard's (or Postfix's) answer to the final ".", and the message with
attachments for the bcc/zip rewrite.
"""

from __future__ import annotations

import contextlib
import email
import email.policy
import smtplib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path

from conftest import ThreadSink, free_port

from tests.postfix_support import SNIPPETS, PostfixInstance, _sub_once
from tests.test_postfix_integration import CLEAN_SENDER as CLEAN_SENDER
from tests.test_postfix_integration import HOLD_SENDER as HOLD_SENDER
from tests.test_postfix_integration import POLICY as BASE_POLICY
from tests.test_postfix_integration import RCPT as RCPT
from tests.test_postfix_integration import REJECT_SENDER as REJECT_SENDER
from tests.test_postfix_integration import REJECT_TEXT as REJECT_TEXT
from tests.test_postfix_integration import MailGuard

Adapt = Callable[..., str]

BEFORE_QUEUE = SNIPPETS / "before-queue"
GATEWAY = SNIPPETS / "gateway"

REWRITE_SENDER = "rewrite@example.co.jp"
REWRITE_RCPTS = ["tanaka@client-a.example", "suzuki@client-b.example"]

# the after-queue tests' policy (reject, hold) plus the two rewrites
POLICY = (
    BASE_POLICY
    + f"""
[[rule]]
name = "bcc-several-parties"
when = "recipient.external_parties >= 2"
action = "bcc"
senders = ["{REWRITE_SENDER}"]

[[rule]]
name = "zip-attachments"
when = "attachment.unencrypted"
action = "zip"
options = {{ method = "aes", password_to = "sender" }}
senders = ["{REWRITE_SENDER}"]
"""
)


def adapt_before_queue(text: str, *, submission: int, filter_port: int, reinject: int) -> str:
    """deploy/postfix/before-queue/master.cf.snippet with the test's ports."""
    text = _sub_once(r"^submission(?= +inet )", f"127.0.0.1:{submission}", text, "submission")
    text = _sub_once(
        r"smtpd_proxy_filter=127\.0\.0\.1:10025\b",
        f"smtpd_proxy_filter=127.0.0.1:{filter_port}",
        text,
        "smtpd_proxy_filter",
    )
    return _sub_once(
        r"^127\.0\.0\.1:10026(?= +inet )", f"127.0.0.1:{reinject}", text, "reinjection smtpd"
    )


def adapt_gateway(text: str, *, submission: int, filter_port: int, reinject: int) -> str:
    """deploy/postfix/gateway/master.cf.snippet with the test's port (it has no submission)."""
    assert submission == 0
    return _sub_once(
        r"^127\.0\.0\.1:10026(?= +inet )", f"127.0.0.1:{reinject}", text, "listener for MailGuard"
    )


def send(port: int, sender: str, rcpts: list[str], raw: bytes) -> tuple[int, str]:
    """One SMTP transaction; the answer to the final "." (code, text), whatever it is.
    A refusal earlier in the transaction is returned the same way."""
    with smtplib.SMTP("127.0.0.1", port, timeout=60) as s:
        s.ehlo("client.mg-test.invalid")
        code, text = s.mail(sender, ["BODY=8BITMIME"])
        if code != 250:
            return code, text.decode()
        for r in rcpts:
            code, text = s.rcpt(r)
            if code not in (250, 251):
                return code, text.decode()
        try:
            code, text = s.data(raw)
        except smtplib.SMTPDataError as e:
            return e.smtp_code, e.smtp_error.decode()
        return code, text.decode()


def rewrite_message(tag: str) -> tuple[str, bytes]:
    """Two outside parties visible in To (→ bcc) and a plain CSV attachment (→ zip)."""
    import uuid

    mid = f"{tag}-{uuid.uuid4().hex}@example.co.jp"
    m = EmailMessage()
    m["From"] = f"山田 <{REWRITE_SENDER}>"
    m["To"] = "田中様 <tanaka@client-a.example>, 鈴木様 <suzuki@client-b.example>"
    m["Subject"] = "見積書の送付"
    m["Message-ID"] = f"<{mid}>"
    m.set_content("見積書をお送りします。\n")
    m.add_attachment(
        "品名,金額\n部品,100\n".encode("cp932"),
        maintype="text",
        subtype="csv",
        filename="見積書.csv",
    )
    return mid, m.as_bytes(policy=email.policy.SMTP)


def parsed(raw: bytes) -> EmailMessage:
    return email.message_from_bytes(raw, policy=email.policy.default)  # type: ignore[return-value]


# -- the rig both one-pass test modules run: private Postfix + `mailguard serve` + a sink --------

DELIVERY_TIMEOUT = 20.0


@dataclass
class Rig:
    postfix: PostfixInstance
    mailguard: MailGuard
    sink: ThreadSink


@contextlib.contextmanager
def one_pass_rig(
    workdir: Path,
    policy: str,
    snippets: Path,
    adapt: Adapt,
    *,
    submission: int,
    guard: Callable[[Path, int, int], MailGuard] = MailGuard,
) -> Iterator[Rig]:
    """Build and start the private Postfix from `snippets`, MailGuard (`guard(workdir, filter
    port, reinjection port)`) on its filter port."""
    sink = ThreadSink()
    pf = PostfixInstance(
        submission=submission,
        filter_port=free_port(),
        reinject=free_port(),
        sink=sink.port,
        snippets=snippets,
        adapt=adapt,
    )
    mg = guard(workdir, pf.filter_port, pf.reinject)
    mg.policy.write_text(policy, encoding="utf-8")
    try:
        pf.build()
        pf.start()
        mg.start()
        yield Rig(pf, mg, sink)
    finally:
        with contextlib.suppress(Exception):  # a test may have stopped it already
            mg.stop()
        pf.stop()
        sink.stop()


def arrived(
    rig: Rig, needle: str, *, null_sender: bool = False
) -> list[tuple[str, list[str], bytes]]:
    return [
        (frm, rcpts, raw)
        for frm, rcpts, raw in list(rig.sink.sink.got)
        if needle.encode() in raw and (frm in ("", "<>")) == null_sender
    ]


def wait_arrival(rig: Rig, needle: str, *, rcpts: list[str] | None = None) -> bytes:
    deadline = time.monotonic() + DELIVERY_TIMEOUT
    while True:
        got = [g for g in arrived(rig, needle) if rcpts is None or g[1] == rcpts]
        if got:
            return got[0][2]
        if time.monotonic() >= deadline:
            raise AssertionError(
                f"{needle} did not reach the sink\n--- maillog ---\n{rig.postfix.log_tail()}"
                f"\n--- mailguard ---\n{rig.mailguard.log()[-3000:]}"
            )
        time.sleep(0.1)
