"""A private Postfix instance built from the shipped deploy/postfix snippets, for the tests.

Everything lives under one temp directory (config, queue, data, `maillog_file`); the system
instance (/etc/postfix/main.cf, /var/spool/postfix) is never read or touched: only
`meta_directory = /etc/postfix` is shared, as the package's postfix-files live there. The
snippets are used exactly as shipped, adapted only where a test must differ from a real server:

* ports: submission, MailGuard (`scan:[127.0.0.1]:10025`) and the reinjection smtpd
  (`127.0.0.1:10026`) move to free loopback ports; each substitution must match exactly once,
  so a changed snippet fails the test instead of silently testing something else;
* the submission entry gets no TLS/SASL (no certificates here), loopback clients instead, set
  with `postconf -P` as deploy/container/postfix/configure.sh does; its
  smtpd_sender_login_maps (`$config_directory/sender_logins`) is written from `sender_logins`
  (empty by default) and postmapped. Without SASL, Postfix skips reject_sender_login_mismatch
  altogether, so `own_senders` (domains or addresses) puts a static
  `check_sender_access hash:sender_access` (listed → OK) followed by `reject` in front of it:
  a MAIL FROM outside the organisation is refused at submission, as the login map does for
  logged-in users in production;
* all final delivery goes to a local sink (`relayhost`), never anywhere else.

Needs root (Postfix's master runs as root) and Debian's `postfix` package. Pitfalls handled
(see ../shared/bench/README.md): `postlog` service + `maillog_file_prefixes` for logging without
syslog, a temp dir searchable by user `postfix`, PATH appended to, never prepended.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SNIPPETS = ROOT / "deploy" / "postfix"
SBIN_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/bin", "/sbin", "/bin"])
POSTFIX_HOSTNAME = "postfix.mg-test.invalid"  # must differ from MailGuard's smtp.hostname

# Services a private instance needs besides the snippets' ones. No "smtp inet" (port 25) and
# chroot n everywhere: the private queue directory is no chroot jail.
BASE_MASTER_CF = """\
# private test instance (tests/postfix_support.py); the MailGuard part follows, from
# deploy/postfix/master.cf.snippet
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


def postfix_tool(name: str) -> str | None:
    return shutil.which(name, path=SBIN_PATH)


def postfix_missing() -> str:
    """Why a private instance cannot run here ("" when it can)."""
    missing = [t for t in ("postfix", "postconf", "postqueue") if postfix_tool(t) is None]
    if missing or not Path("/usr/lib/postfix/sbin/master").exists():
        return (
            "Debian's postfix package is not installed (missing: "
            + (", ".join(missing) or "/usr/lib/postfix/sbin/master")
            + ")"
        )
    if os.geteuid() != 0:
        return "a private Postfix instance needs root (its master runs as root)"
    return ""


def _sub_once(pattern: str, repl: str, text: str, what: str, *, every: bool = False) -> str:
    new, n = re.subn(pattern, repl, text, flags=re.MULTILINE)
    if n != 1 and not (every and n > 1):
        raise AssertionError(f"master.cf.snippet: expected exactly one {what}, found {n}")
    return new


def adapt_master_snippet(text: str, *, submission: int, filter_port: int, reinject: int) -> str:
    """The shipped master.cf snippet with the test's ports (nothing else changed)."""
    text = _sub_once(r"^submission(?= +inet )", f"127.0.0.1:{submission}", text, "submission")
    # every mention, the commented-out pickup example included
    text = _sub_once(
        r"scan:\[127\.0\.0\.1\]:10025\b",
        f"scan:[127.0.0.1]:{filter_port}",
        text,
        "content_filter",
        every=True,
    )
    return _sub_once(
        r"^127\.0\.0\.1:10026(?= +inet )", f"127.0.0.1:{reinject}", text, "reinjection smtpd"
    )


@dataclass
class PostfixInstance:
    """One private instance: `build()` writes its files, `start()`/`stop()` run its master."""

    submission: int
    filter_port: int
    reinject: int
    sink: int
    dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="mg-postfix.")))
    started: bool = False
    # which set-up: the after-queue snippets (default), or deploy/postfix/before-queue or
    # gateway with their own port adapter; submission 0 = the set-up has no submission entry
    snippets: Path = SNIPPETS
    adapt: Callable[..., str] = adapt_master_snippet
    # smtpd_sender_login_maps: MAIL FROM address -> owning login(s)
    sender_logins: dict[str, str] = field(default_factory=dict)
    # without SASL: the MAIL FROM domains/addresses submission accepts (empty = any)
    own_senders: tuple[str, ...] = ()

    @property
    def config(self) -> Path:
        return self.dir / "etc"

    @property
    def queue(self) -> Path:
        return self.dir / "spool"

    @property
    def maillog(self) -> Path:
        return self.dir / "log" / "maillog"

    def _run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        tool = postfix_tool(args[0]) or args[0]
        return subprocess.run(
            [tool, *args[1:]],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            env={**os.environ, "PATH": SBIN_PATH},
        )

    def _ok(self, *args: str, timeout: float = 60) -> str:
        out = self._run(*args, timeout=timeout)
        if out.returncode != 0:
            raise RuntimeError(
                f"{' '.join(args)} failed ({out.returncode}): {out.stdout}{out.stderr}"
                f"\n--- maillog ---\n{self.log_tail()}"
            )
        return out.stdout + out.stderr

    def build(self) -> None:
        d = self.dir
        d.chmod(0o755)  # mkdtemp is 700: Postfix's unprivileged daemons must get in
        for p in [d, *d.parents]:
            if not os.access(p, os.X_OK):
                raise RuntimeError(f"{p} is not searchable")
        for sub in (self.config, self.queue, self.maillog.parent):
            sub.mkdir(mode=0o755)
        data = d / "data"
        data.mkdir(mode=0o700)
        shutil.chown(data, "postfix", "postfix")
        main = f"""\
# private test instance (tests/postfix_support.py); the MailGuard part follows, from
# deploy/postfix/main.cf.snippet
compatibility_level = 3.6
config_directory = {self.config}
queue_directory = {self.queue}
data_directory = {data}
meta_directory = /etc/postfix
mail_owner = postfix
setgid_group = postdrop
maillog_file = {self.maillog}
maillog_file_prefixes = {d}
syslog_name = mg-test-{d.name}
myhostname = {POSTFIX_HOSTNAME}
mydomain = mg-test.invalid
myorigin = $myhostname
mydestination =
local_recipient_maps =
alias_maps =
alias_database =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
smtp_bind_address = 127.0.0.1
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject
relayhost = [127.0.0.1]:{self.sink}
smtp_tls_security_level = none
smtpd_tls_security_level = none
biff = no
append_dot_mydomain = no

"""
        (self.config / "main.cf").write_text(
            main + (self.snippets / "main.cf.snippet").read_text(encoding="utf-8"),
            encoding="utf-8",
        )
        master = self.adapt(
            (self.snippets / "master.cf.snippet").read_text(encoding="utf-8"),
            submission=self.submission,
            filter_port=self.filter_port,
            reinject=self.reinject,
        )
        (self.config / "master.cf").write_text(BASE_MASTER_CF + "\n" + master, encoding="utf-8")
        logins = self.config / "sender_logins"
        logins.write_text("".join(f"{a} {u}\n" for a, u in self.sender_logins.items()))
        self._ok("postmap", "-c", str(self.config), f"hash:{logins}")
        svc = f"127.0.0.1:{self.submission}/inet"
        if self.submission:
            self._ok(
                "postconf",
                "-c",
                str(self.config),
                "-P",
                f"{svc}/smtpd_tls_security_level=none",
                f"{svc}/smtpd_sasl_auth_enable=no",
                f"{svc}/smtpd_client_restrictions=permit_mynetworks,reject",
                f"{svc}/smtpd_relay_restrictions=permit_mynetworks,reject",
            )
        if self.submission and self.own_senders:
            access = self.config / "sender_access"
            access.write_text("".join(f"{a} OK\n" for a in self.own_senders))
            self._ok("postmap", "-c", str(self.config), f"hash:{access}")
            self._ok(
                "postconf",
                "-c",
                str(self.config),
                "-P",
                f"{svc}/smtpd_sender_restrictions=check_sender_access,hash:{access},"
                "reject_sender_login_mismatch,reject",
            )
        self.maillog.touch(mode=0o644)
        warnings = self._ok("postfix", "-c", str(self.config), "check")
        if "unused parameter" in warnings or "unknown" in warnings:
            raise RuntimeError(f"postfix check complains about the snippets:\n{warnings}")

    def start(self) -> None:
        self._ok("postfix", "-c", str(self.config), "start")
        self.started = True
        if self.submission:
            wait_listening(self.submission, 20, what=f"Postfix submission :{self.submission}")
        wait_listening(self.reinject, 20, what=f"Postfix reinjection :{self.reinject}")

    def master_pid(self) -> int | None:
        try:
            pid = int((self.queue / "pid" / "master.pid").read_text().strip())
        except (OSError, ValueError):
            return None
        try:
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            return None
        return pid if comm == "master" else None

    def stop(self) -> None:
        """Stop this instance's master (never another one), then remove its directory."""
        pid = self.master_pid()
        if self.started and pid is not None:
            self._run("postfix", "-c", str(self.config), "stop", timeout=30)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
                time.sleep(0.1)
            if self.master_pid() == pid:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)
        self.started = False
        shutil.rmtree(self.dir, ignore_errors=True)

    def flush(self) -> None:
        """Retry deferred mail now (and forget that a destination was dead)."""
        self._ok("postfix", "-c", str(self.config), "flush")

    def queue_listing(self) -> str:
        return self._run("postqueue", "-c", str(self.config), "-p").stdout

    def log(self) -> str:
        try:
            return self.maillog.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.log().splitlines()[-n:])

    def queue_ids(self, message_id: str) -> list[str]:
        """Postfix queue ids of a message (by Message-ID), in the order cleanup saw them: the
        submission's first, then the reinjected copy's."""
        pat = re.compile(r"\]: ([0-9A-Za-z]+): message-id=<" + re.escape(message_id) + ">")
        return list(dict.fromkeys(m.group(1) for m in pat.finditer(self.log())))

    def lines_of(self, queue_id: str) -> list[str]:
        return [ln for ln in self.log().splitlines() if f": {queue_id}: " in ln]

    def wait_log(self, pattern: str, timeout: float, what: str) -> re.Match[str]:
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            m = rx.search(self.log())
            if m:
                return m
            if time.monotonic() >= deadline:
                raise AssertionError(
                    f"timed out after {timeout:.0f}s waiting for {what} in Postfix's log "
                    f"(/{pattern}/)\n--- maillog ---\n{self.log_tail()}\n--- queue ---\n"
                    f"{self.queue_listing()}"
                )
            time.sleep(0.1)


def wait_listening(port: int, timeout: float, *, what: str) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{what}: nothing listens after {timeout:.0f}s") from None
            time.sleep(0.05)


def postfix_workdir(prefix: str) -> Iterator[Path]:
    """A module fixture's body: a temp dir for a private Postfix, or skip when Postfix is
    missing (fail instead when MAILGUARD_REQUIRE_POSTFIX is set, as CI does)."""
    why = postfix_missing()
    if why:
        if os.environ.get("MAILGUARD_REQUIRE_POSTFIX"):
            pytest.fail(f"MAILGUARD_REQUIRE_POSTFIX is set but {why}")
        pytest.skip(why)
    d = Path(tempfile.mkdtemp(prefix=prefix))
    yield d
    shutil.rmtree(d, ignore_errors=True)
