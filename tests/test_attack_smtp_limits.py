"""Issue 12 item 6, SMTP side, attacked through `mailguard serve` (tests/e2e_support.py Guard):

* XFORWARD with control characters (ESC, NUL, bare CR) is refused at parse with 501 and never
  reaches a log line (text logs: the held line printed the IDENT raw before the fix);
* a client that opens connections beyond `smtp.max_connections` gets `421 4.7.0` and is closed
  (before the fix: 220 and a session for everyone), and a slot freed is served again;
* a session that only sends NOOP/RSET/… is closed with `421 4.7.0` after `max_idle_commands`
  (before the fix: it could hold a slot for ever, 250 after 250), while a Postfix-like client
  reusing one connection for many messages (RSET + XFORWARD + MAIL/RCPT/DATA each) is not.
"""

from __future__ import annotations

import contextlib
import socket
import time
from pathlib import Path

from e2e_support import Guard, build_message, policy, wait_for

HOLD = """
[[rule]]
name = "hold-out"
when = "recipient.external"
action = "hold"
hold_for = "1h"
"""


CAP = 200  # the default smtp.max_connections


class Raw:
    """A hand-driven SMTP client on a plain socket (bytes exactly as written)."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.buf = b""
        self.greeting = self.reply()

    def reply(self) -> bytes:
        """One (possibly multi-line) reply; b"" at EOF."""
        out = b""
        while True:
            while b"\r\n" not in self.buf:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return out
                self.buf += chunk
            line, self.buf = self.buf.split(b"\r\n", 1)
            out += line + b"\r\n"
            if line[3:4] != b"-":
                return out

    def cmd(self, line: bytes) -> bytes:
        self.sock.sendall(line + b"\r\n")
        return self.reply()

    def closed(self) -> bool:
        """The server hung up (EOF, or a reset because our last command went unread)."""
        try:
            self.sock.settimeout(5)
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


def test_xforward_control_characters_are_refused_and_never_logged(tmp_path: Path) -> None:
    with Guard(tmp_path, policy_text=policy(HOLD), config_extra={"log": {"json": False}}) as g:
        c = Raw(g.smtp_port)
        c.cmd(b"EHLO postfix.test")
        for evil in (
            b"XFORWARD IDENT=3CF6B\x1b[2J\x1b[31mFORGED",  # terminal escapes
            b"XFORWARD IDENT=ABC\x00DEF",
            b"XFORWARD NAME=x\rFAKE: 3CF6B2AAE8: reject",  # bare CR: a forged line in a terminal
            b"XFORWARD HELO=\xe5\xb1\xb1\xe7\x94\xb0",  # raw 8-bit, not xtext
        ):
            r = c.cmd(evil)
            assert r.startswith(b"501 5.5.4"), (evil, r)
        assert c.cmd(b"XFORWARD IDENT=3CF6B2AAE8 NAME=client.test ADDR=192.0.2.1").startswith(
            b"250"
        )
        data = build_message(to=["tanaka@customer-a.co.jp"], subject="xf").as_bytes()
        assert c.cmd(b"MAIL FROM:<yamada@ourco.co.jp>").startswith(b"250")
        assert c.cmd(b"RCPT TO:<tanaka@customer-a.co.jp>").startswith(b"250")
        assert c.cmd(b"DATA").startswith(b"354")
        r = c.cmd(data.replace(b"\n", b"\r\n").replace(b"\r\r\n", b"\r\n") + b".")
        assert r.startswith(b"250") and b"held" in r, r
        c.cmd(b"QUIT")
        c.close()
        wait_for(lambda: "3CF6B2AAE8" in g.log_text(), what="the held line with the queue id")
        log = g.log_path.read_bytes()
        for raw in (b"\x1b", b"\x00", b"\rFAKE", b"FORGED"):
            assert raw not in log, (raw, log[-2000:])


def test_connections_over_the_cap_get_421_and_a_freed_slot_is_served(tmp_path: Path) -> None:
    with Guard(tmp_path, policy_text=policy("")) as g:  # default max_connections = 200
        held = [Raw(g.smtp_port) for _ in range(CAP)]
        assert all(c.greeting.startswith(b"220") for c in held), [c.greeting for c in held]
        over = [Raw(g.smtp_port) for _ in range(20)]  # a flood beyond the cap
        for c in over:
            assert c.greeting.startswith(b"421 4.7.0"), c.greeting
            assert b"too many connections" in c.greeting
            assert c.closed()
            c.close()
        # the sessions under the cap still work
        assert all(c.cmd(b"NOOP").startswith(b"250") for c in held)
        held.pop().close()

        def served() -> bool:
            c = Raw(g.smtp_port)
            ok = c.greeting.startswith(b"220")
            if ok:
                held.append(c)
            else:
                c.close()
            return ok

        wait_for(served, what="a connection served once a slot is free")
        for c in held:
            c.close()
        # refused connections did not eat slots: a full set of fresh sessions is served again
        time.sleep(0.3)
        again = [Raw(g.smtp_port) for _ in range(CAP)]
        assert all(c.greeting.startswith(b"220") for c in again)
        for c in again:
            c.close()
        assert f"smtp.max_connections = {CAP}" in g.log_text()


def test_idle_session_is_closed_after_max_idle_commands(tmp_path: Path) -> None:
    with Guard(tmp_path, policy_text=policy("")) as g:  # default max_idle_commands = 20
        c = Raw(g.smtp_port)
        assert c.cmd(b"EHLO idle.test").startswith(b"250")  # 1
        replies: list[bytes] = []
        for cmd in [b"NOOP", b"RSET", b"VRFY x", b"HELP"] * 10:
            replies.append(c.cmd(cmd))
            if not replies[-1].startswith((b"250", b"252", b"214", b"502")):
                break
        assert len(replies) == 20, replies  # EHLO + 19 answered, the 21st command is refused
        assert replies[-1].startswith(b"421 4.7.0"), replies[-1]
        assert c.closed()
        c.close()
        # refused MAILs count too (MAIL, MAIL, MAIL … never a message)
        c = Raw(g.smtp_port)
        c.cmd(b"EHLO idle.test")
        assert c.cmd(b"MAIL FROM:<a@ourco.co.jp>").startswith(b"250")
        got = []
        for _ in range(25):
            got.append(c.cmd(b"MAIL FROM:<a@ourco.co.jp>"))
            if not got[-1].startswith(b"503"):
                break
        assert got[-1].startswith(b"421 4.7.0"), got
        assert c.closed()
        c.close()


def test_postfix_like_connection_reuse_is_not_cut(tmp_path: Path) -> None:
    """Postfix's connection cache: one connection, per message RSET (the reuse probe), two
    XFORWARD commands, MAIL, RCPT, DATA: far more commands than the idle limit in total."""
    with Guard(tmp_path, policy_text=policy("")) as g:
        c = Raw(g.smtp_port)
        assert c.cmd(b"EHLO postfix.test").startswith(b"250")
        for i in range(15):
            assert c.cmd(b"RSET").startswith(b"250")
            assert c.cmd(b"XFORWARD NAME=mua.test ADDR=192.0.2.7 PORT=51234").startswith(b"250")
            assert c.cmd(f"XFORWARD PROTO=ESMTP HELO=mua.test IDENT=Q{i}".encode()).startswith(
                b"250"
            )
            assert c.cmd(b"MAIL FROM:<yamada@ourco.co.jp>").startswith(b"250")
            assert c.cmd(b"RCPT TO:<sato@ourco.co.jp>").startswith(b"250")
            assert c.cmd(b"DATA").startswith(b"354")
            body = f"From: yamada@ourco.co.jp\r\nSubject: reuse {i}\r\n\r\nhi\r\n.".encode()
            r = c.cmd(body)
            assert r.startswith(b"250"), (i, r)
        assert c.cmd(b"QUIT").startswith(b"221")
        c.close()
        assert len(g.mails()) == 15
