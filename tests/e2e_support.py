"""End-to-end machinery for the user-boundary tests (tests/test_e2e_*.py, issue 11).

Everything here is black-box: `mailguard serve -c <tmp config>` runs as a subprocess on free
loopback ports, a real receiving SMTP server (aiosmtpd, in a thread of the test process) is its
upstream, mail is sent with smtplib, notices are read where they arrive (at that same upstream),
the confirm page is fetched and POSTed with urllib, `/metrics` is scraped and parsed with
prometheus_client's parser, and `mailguard queue` / `mailguard check` run as CLI subprocesses on
the server's store. Nothing from `mailguard` is imported.

    with Guard(tmp_path, policy_text=POLICY, config_extra={"notify": {"lang": "en"}}) as g:
        r = g.send(to=["Tanaka <tanaka@customer-a.co.jp>"], subject="hi")
        assert r.held_id
        notice = g.wait_notice("confirm")
        g.post(g.link(notice), "send")
        g.wait_mail(subject="hi")

Every wait is bounded (a deadline, at most 10 s).
"""

from __future__ import annotations

import asyncio
import contextlib
import email
import email.policy
import html
import json
import os
import re
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import threading
import time
import tomllib
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from email.message import EmailMessage, Message
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

INTERNAL = "ourco.co.jp"
SENDER = "yamada@ourco.co.jp"
NOTIFY_FROM = "mailguard@ourco.co.jp"
ADMIN_TOKEN = "e2e-admin-token-0123456789abcdefghijklmnop"  # web.admin_token: >= 32 characters
MAX_WAIT = 10.0


# -- small helpers -----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


_FROM_SOURCE = (
    "import sys; sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in "
    "getattr(f, '__module__', '')]; sys.path.insert(0, sys.argv.pop(1)); "
    "from mailguard.cli import main; sys.exit(main())"
)


def mailguard_cmd() -> list[str]:
    """The `mailguard` command of this venv. MAILGUARD_E2E_SOURCE=<dir> runs the package from
    another checkout instead (e.g. `git archive HEAD` unpacked), to compare two versions."""
    src = os.environ.get("MAILGUARD_E2E_SOURCE")
    if src:
        return [sys.executable, "-c", _FROM_SOURCE, src]
    exe = shutil.which("mailguard", path=os.path.dirname(sys.executable))
    return [exe] if exe else [sys.executable, "-m", "mailguard"]


def wait_for(
    pred: Callable[[], Any], timeout: float = MAX_WAIT, interval: float = 0.05, what: str = ""
) -> Any:
    """Poll `pred` until it returns something truthy (returned); TimeoutError after `timeout`."""
    timeout = min(timeout, MAX_WAIT)
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() >= deadline:
            raise TimeoutError(f"waited {timeout:.1f}s for {what or pred}")
        time.sleep(interval)


def stays_false(pred: Callable[[], Any], seconds: float, interval: float = 0.05) -> bool:
    """True if `pred` stayed falsy for `seconds` (bounded negative wait)."""
    deadline = time.monotonic() + min(seconds, MAX_WAIT)
    while time.monotonic() < deadline:
        if pred():
            return False
        time.sleep(interval)
    return not pred()


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {v!r} as TOML")


def toml_text(sections: Mapping[str, Mapping[str, Any]]) -> str:
    out: list[str] = []
    for name, keys in sections.items():
        out.append(f"[{name}]")
        out += [f"{k} = {_toml_value(v)}" for k, v in keys.items()]
        out.append("")
    return "\n".join(out)


def text_of(msg: Message) -> str:
    """Every text part of a message, decoded (text/plain and text/html, HTML unescaped), plus
    the decoded Subject: what a reader of the mail sees."""
    parts: list[str] = [str(msg.get("Subject", ""))]
    for part in msg.walk():
        if part.get_content_maintype() != "text":
            continue
        try:
            body = part.get_content()  # type: ignore[attr-defined]
        except (LookupError, KeyError, AttributeError):
            payload = part.get_payload(decode=True) or b""
            body = payload.decode(part.get_content_charset() or "utf-8", "replace")
        if part.get_content_subtype() == "html":
            body = html.unescape(re.sub(r"<[^>]+>", " ", body))
        parts.append(body)
    return "\n".join(parts)


# -- the receiving SMTP server (stands in for Postfix's reinjection smtpd) ---------------------


@dataclass
class Got:
    """One message the sink accepted (or refused: `reply` is not 250)."""

    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    at: float  # time.monotonic() when DATA was answered
    reply: str = "250 2.0.0 Ok: queued"

    @property
    def msg(self) -> Message:
        return email.message_from_bytes(self.data, policy=email.policy.default)

    @property
    def notice_kind(self) -> str:
        """The guard's own notice kind (X-MailGuard-Notice: <kind>; sig=...), "" for user mail."""
        h = self.msg.get("X-MailGuard-Notice")
        return str(h).split(";")[0].strip() if h else ""

    @property
    def subject(self) -> str:
        return str(self.msg.get("Subject", ""))

    @property
    def text(self) -> str:
        return text_of(self.msg)

    def header(self, name: str) -> str:
        return str(self.msg.get(name, ""))


class ReceivingSink:
    """aiosmtpd on loopback in its own thread. `refuse(data) -> reply | None` scripts a refusal
    for some messages (e.g. those carrying an X-E2E-Refuse header). `smtputf8=False`: an
    upstream that does not announce SMTPUTF8 (RFC 6531)."""

    def __init__(
        self, refuse: Callable[[bytes], str | None] | None = None, *, smtputf8: bool = True
    ) -> None:
        self.smtputf8 = smtputf8
        self.accepted: list[Got] = []
        self.refused: list[Got] = []
        self.refuse = refuse
        self.lock = threading.Lock()
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self.port = 0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        if not self._ready.wait(5):
            raise RuntimeError("sink did not start")

    def _run(self) -> None:
        from aiosmtpd.smtp import SMTP

        asyncio.set_event_loop(self.loop)
        owner = self

        class Handler:
            async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
                data = bytes(envelope.original_content or envelope.content or b"")
                reply = owner.refuse(data) if owner.refuse else None
                got = Got(
                    str(envelope.mail_from or ""),
                    list(envelope.rcpt_tos),
                    data,
                    time.monotonic(),
                    reply or "250 2.0.0 Ok: queued",
                )
                with owner.lock:
                    (owner.refused if reply else owner.accepted).append(got)
                return got.reply

        async def main() -> None:
            self.server = await self.loop.create_server(
                lambda: SMTP(Handler(), hostname="sink.test", enable_SMTPUTF8=self.smtputf8),
                "127.0.0.1",
                0,
            )
            self.port = int(self.server.sockets[0].getsockname()[1])
            self._ready.set()

        self.loop.run_until_complete(main())
        self.loop.run_forever()

    def snapshot(self) -> list[Got]:
        with self.lock:
            return list(self.accepted)

    def stop(self) -> None:
        async def close() -> None:
            self.server.close()

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(close(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def refuse_marked(data: bytes) -> str | None:
    """Refuse (with the header's own reply) user mail carrying `X-E2E-Refuse: <reply>`;
    the guard's notices are always accepted."""
    head = data.split(b"\r\n\r\n", 1)[0]
    if re.search(rb"^X-MailGuard-Notice:", head, re.M | re.I):
        return None
    m = re.search(rb"^X-E2E-Refuse:\s*(.+?)\r?$", head, re.M | re.I)
    return m.group(1).decode() if m else None


# -- SMTP client -------------------------------------------------------------------------------


@dataclass
class Sent:
    code: int
    text: str
    message_id: str
    subject: str
    data: bytes = field(default=b"", repr=False)
    mail_from: str = ""
    rcpts: list[str] = field(default_factory=list)

    @property
    def held_id(self) -> str:
        """The id in `250 ... held as <ID> (...)`, "" when not held."""
        m = re.search(r"held as (\S+)", self.text)
        return m.group(1).rstrip(")(,;") if m and self.code == 250 else ""

    @property
    def relayed(self) -> bool:
        """Answered 250 and not kept by the guard."""
        return self.code == 250 and "held" not in self.text.lower()


def build_message(
    *,
    sender: str = SENDER,
    to: Iterable[str] = (),
    cc: Iterable[str] = (),
    subject: str = "",
    body: str = "Hello,\nplease find the document attached.\n",
    attachments: Iterable[tuple[str, bytes, str]] = (),
    headers: Mapping[str, str] | None = None,
) -> EmailMessage:
    m = EmailMessage()
    m["From"] = sender
    to, cc = list(to), list(cc)
    if to:
        m["To"] = ", ".join(to)
    if cc:
        m["Cc"] = ", ".join(cc)
    m["Subject"] = subject or f"e2e {uuid.uuid4().hex[:8]}"
    m["Message-ID"] = f"<{uuid.uuid4().hex}@e2e.test>"
    m["Date"] = email.utils.formatdate(localtime=True)
    for k, v in (headers or {}).items():
        m[k] = v
    m.set_content(body)
    for name, content, ctype in attachments:
        maintype, _, subtype = ctype.partition("/")
        m.add_attachment(content, maintype=maintype, subtype=subtype, filename=name)
    return m


def addr_of(s: str) -> str:
    return email.utils.parseaddr(s)[1]


def smtp_send(
    port: int, mail_from: str, rcpts: list[str], data: bytes, *, timeout: float = 20
) -> tuple[int, str]:
    """One SMTP transaction; the reply to the final dot (or to the step that failed)."""
    with smtplib.SMTP("127.0.0.1", port, timeout=timeout) as c:
        c.ehlo("client.test")
        code, resp = c.mail(mail_from)
        if code != 250:
            return code, resp.decode("utf-8", "replace")
        for r in rcpts:
            code, resp = c.rcpt(r)
            if code not in (250, 251):
                return code, resp.decode("utf-8", "replace")
        try:
            code, resp = c.data(data)
        except smtplib.SMTPDataError as e:
            return e.smtp_code, e.smtp_error.decode("utf-8", "replace")
        return code, resp.decode("utf-8", "replace")


# -- HTML forms --------------------------------------------------------------------------------


class _FormParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.hidden: dict[str, str] = {}
        self.buttons: list[tuple[str, str]] = []  # (name, value) of submit buttons
        self.sections: dict[str, list[str]] = {}  # id -> text inside the element with that id
        self._stack: list[tuple[str, str | None]] = []
        self._open: dict[str, list[str]] = {}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: (v or "") for k, v in attrs}
        if tag == "input" and a.get("type") == "hidden" and a.get("name"):
            self.hidden[a["name"]] = a.get("value", "")
        if tag == "button" and a.get("type", "submit") == "submit" and a.get("name"):
            self.buttons.append((a["name"], a.get("value", "")))
        if tag == "input" and a.get("type") == "submit" and a.get("name"):
            self.buttons.append((a["name"], a.get("value", "")))
        if tag in ("input", "br", "meta", "link", "img", "hr"):
            return
        ident = a.get("id")
        self._stack.append((tag, ident))
        if ident:
            self._open[ident] = []

    def handle_endtag(self, tag: str) -> None:
        while self._stack:
            t, ident = self._stack.pop()
            if ident and ident in self._open:
                self.sections[ident] = self._open.pop(ident)
            if t == tag:
                break

    def handle_data(self, data: str) -> None:
        for chunks in self._open.values():
            chunks.append(data)


@dataclass
class Page:
    status: int
    html: str
    hidden: dict[str, str] = field(default_factory=dict)
    buttons: list[tuple[str, str]] = field(default_factory=list)
    sections: dict[str, str] = field(default_factory=dict)
    fetched_at: float = 0.0

    @property
    def text(self) -> str:
        """The page as a reader sees it: tags removed, entities decoded."""
        t = re.sub(r"<(script|style)\b.*?</\1>", " ", self.html, flags=re.S | re.I)
        return html.unescape(re.sub(r"<[^>]+>", " ", t))

    @property
    def actions(self) -> list[str]:
        return [v for n, v in self.buttons if n == "action"]

    def section(self, ident: str) -> str:
        return self.sections.get(ident, "")


def parse_page(status: int, body: str) -> Page:
    p = _FormParser()
    p.feed(body)
    p.close()
    sections = {k: html.unescape(" ".join(v)) for k, v in p.sections.items()}
    return Page(status, body, p.hidden, p.buttons, sections, time.monotonic())


# -- the guard ---------------------------------------------------------------------------------


def _merge(base: dict[str, dict[str, Any]], extra: Mapping[str, Mapping[str, Any]]) -> None:
    for sec, keys in extra.items():
        base.setdefault(sec, {}).update(keys)


class Guard:
    """`mailguard serve` as a subprocess between an smtplib client and a ReceivingSink.

    `policy_text`: the policy file's TOML (else `policy_file`, else the shipped default).
    `config_extra`: a dict {section: {key: value}} or TOML text, merged over the base config
    (base: web on with min_dwell 0.2s, notify.sender, JSON logs, the sink as upstream).
    `refuse`: passed to the sink (default: refuse mail with an X-E2E-Refuse header).
    `sink_smtputf8=False`: the sink does not offer SMTPUTF8.
    """

    def __init__(
        self,
        tmp_path: Path,
        *,
        policy_text: str | None = None,
        policy_file: Path | None = None,
        config_extra: Mapping[str, Mapping[str, Any]] | str | None = None,
        refuse: Callable[[bytes], str | None] | None = refuse_marked,
        web: bool = True,
        sink_smtputf8: bool = True,
    ) -> None:
        self.dir = tmp_path
        self.dir.mkdir(parents=True, exist_ok=True)
        self.smtp_port = free_port()
        self.web_port = free_port()
        self.store = self.dir / "mg.db"
        self.log_path = self.dir / "serve.log"
        self.config_path = self.dir / "mailguard.toml"
        if policy_text is not None:
            self.policy_path: Path | None = self.dir / "policy.toml"
            self.policy_path.write_text(policy_text, encoding="utf-8")
        else:
            self.policy_path = policy_file
        self._refuse = refuse
        self._web = web
        self._sink_smtputf8 = sink_smtputf8
        self._extra = config_extra
        self.sink: ReceivingSink | None = None
        self.proc: subprocess.Popen[bytes] | None = None

    # -- lifecycle

    def config(self) -> dict[str, dict[str, Any]]:
        assert self.sink is not None
        cfg: dict[str, dict[str, Any]] = {
            "smtp": {"listen": f"127.0.0.1:{self.smtp_port}", "hostname": "guard.test"},
            "upstream": {
                "address": f"127.0.0.1:{self.sink.port}",
                "connect_timeout": "2s",
                "command_timeout": "5s",
                "data_timeout": "10s",
            },
            "store": {"path": str(self.store)},
            "policy": {"file": str(self.policy_path) if self.policy_path else ""},
            "web": {
                "enabled": self._web,
                "listen": f"127.0.0.1:{self.web_port}",
                "public_url": f"http://127.0.0.1:{self.web_port}",
                "secret": "e2e-secret-" + "x" * 32,
                "admin_token": ADMIN_TOKEN,
                "min_dwell": "0.2s",
            },
            "notify": {"sender": NOTIFY_FROM, "charset": "utf-8"},
            "log": {"level": "info", "json": True},
        }
        extra = self._extra
        if isinstance(extra, str):
            extra = tomllib.loads(extra)
        if extra:
            _merge(cfg, extra)
        return cfg

    def __enter__(self) -> Guard:
        self.sink = ReceivingSink(self._refuse, smtputf8=self._sink_smtputf8)
        self.config_path.write_text(toml_text(self.config()), encoding="utf-8")
        self._log_fh = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [*mailguard_cmd(), "serve", "-c", str(self.config_path)],
            stdout=self._log_fh,
            stderr=subprocess.STDOUT,
            cwd=self.dir,
        )
        try:
            self._wait_up()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _wait_up(self) -> None:
        ports = [self.smtp_port] + ([self.web_port] if self._web else [])
        deadline = time.monotonic() + MAX_WAIT
        for port in ports:
            while True:
                if self.proc is not None and self.proc.poll() is not None:
                    raise RuntimeError(
                        f"mailguard serve exited with {self.proc.returncode}:\n{self.log_text()}"
                    )
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                        break
                except OSError:
                    if time.monotonic() > deadline:
                        raise TimeoutError(
                            f"mailguard serve not listening on {port}:\n{self.log_text()}"
                        ) from None
                    time.sleep(0.05)

    def __exit__(self, *exc: Any) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.sink is not None:
            self.sink.stop()
        with contextlib.suppress(Exception):
            self._log_fh.close()

    # -- ports and received mail

    @property
    def ports(self) -> dict[str, int]:
        assert self.sink is not None
        return {"smtp": self.smtp_port, "web": self.web_port, "sink": self.sink.port}

    @property
    def received(self) -> list[Got]:
        """Everything the upstream accepted: user mail and the guard's notices, in order."""
        assert self.sink is not None
        return self.sink.snapshot()

    @property
    def refused(self) -> list[Got]:
        assert self.sink is not None
        with self.sink.lock:
            return list(self.sink.refused)

    def mails(self) -> list[Got]:
        return [g for g in self.received if not g.notice_kind]

    def notices(self, kind: str | None = None) -> list[Got]:
        return [
            g for g in self.received if g.notice_kind and (kind is None or g.notice_kind == kind)
        ]

    def mail_with(self, message_id: str) -> Got | None:
        """The user mail (not a notice) whose Message-ID is `message_id`."""
        for g in self.mails():
            if message_id and message_id in g.header("Message-ID"):
                return g
        return None

    def wait_mail(self, sent: Sent, timeout: float = MAX_WAIT) -> Got:
        return wait_for(
            lambda: self.mail_with(sent.message_id),
            timeout,
            what=f"delivery of {sent.subject!r} at the sink",
        )

    def notices_about(self, sent: Sent, kind: str | None = None) -> list[Got]:
        """Notices whose text names the subject of `sent` (subjects are unique per test)."""
        return [n for n in self.notices(kind) if sent.subject in n.text]

    def wait_notice(
        self, kind: str | None = None, *, about: Sent | None = None, timeout: float = MAX_WAIT
    ) -> Got:
        def find() -> Got | None:
            got = self.notices_about(about, kind) if about else self.notices(kind)
            return got[0] if got else None

        return wait_for(find, timeout, what=f"a {kind or 'any'} notice")

    # -- sending

    def send(
        self,
        *,
        sender: str = SENDER,
        to: Iterable[str] = (),
        cc: Iterable[str] = (),
        bcc: Iterable[str] = (),
        subject: str = "",
        body: str = "Hello,\nplease find the document attached.\n",
        attachments: Iterable[tuple[str, bytes, str]] = (),
        headers: Mapping[str, str] | None = None,
        rcpts: Iterable[str] | None = None,
    ) -> Sent:
        to, cc, bcc = list(to), list(cc), list(bcc)
        m = build_message(
            sender=sender,
            to=to,
            cc=cc,
            subject=subject,
            body=body,
            attachments=attachments,
            headers=headers,
        )
        data = m.as_bytes(policy=email.policy.SMTP)
        env_rcpts = list(rcpts) if rcpts is not None else [addr_of(a) for a in to + cc + bcc]
        code, text = smtp_send(self.smtp_port, addr_of(sender), env_rcpts, data)
        return Sent(
            code,
            text,
            str(m["Message-ID"]).strip("<>"),
            str(m["Subject"]),
            data,
            addr_of(sender),
            env_rcpts,
        )

    def send_bytes(self, data: bytes, mail_from: str, rcpts: list[str]) -> tuple[int, str]:
        return smtp_send(self.smtp_port, mail_from, rcpts, data)

    # -- web

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.web_port}{path}"

    def link(self, notice: Got) -> str:
        """The confirm/approve page link in a notice (a /m/<token> URL)."""
        m = re.search(r"https?://[^\s<>\"']+/m/[A-Za-z0-9_\-]+", notice.text)
        assert m, f"no /m/ link in the {notice.notice_kind} notice:\n{notice.text}"
        return m.group(0)

    def _http(
        self, url: str, data: bytes | None = None, headers: Mapping[str, str] | None = None
    ) -> tuple[int, str]:
        req = urllib.request.Request(url, data=data, headers=dict(headers or {}))
        try:
            with urllib.request.urlopen(req, timeout=MAX_WAIT) as r:
                return r.status, r.read().decode("utf-8", "replace")
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode("utf-8", "replace")

    def request(
        self, url: str, data: bytes | None = None, headers: Mapping[str, str] | None = None
    ) -> tuple[int, dict[str, str], str]:
        """One HTTP request: (status, response headers, body text); errors are answers too."""
        if url.startswith("/"):
            url = self.url(url)
        req = urllib.request.Request(url, data=data, headers=dict(headers or {}))
        try:
            with urllib.request.urlopen(req, timeout=MAX_WAIT) as r:
                return r.status, dict(r.headers.items()), r.read().decode("utf-8", "replace")
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers.items()), e.read().decode("utf-8", "replace")

    def raw_http(self, payload: bytes, port: int | None = None) -> bytes:
        """Send raw bytes to the web port (malformed requests); what came back until close."""
        with socket.create_connection(("127.0.0.1", port or self.web_port), timeout=5) as s:
            s.sendall(payload)
            out = b""
            with contextlib.suppress(OSError):
                while chunk := s.recv(65536):
                    out += chunk
            return out

    def page(self, url: str, lang: str = "en") -> Page:
        status, body = self._http(url, headers={"Accept-Language": lang})
        return parse_page(status, body)

    def post(self, url: str, action: str, *, lang: str = "en", reason: str = "") -> Page:
        """GET the page, take its CSRF hidden inputs, wait web.min_dwell, POST `action`."""
        pg = self.page(url, lang)
        assert pg.status == 200, f"GET {url} -> {pg.status}\n{pg.text[:500]}"
        form = dict(pg.hidden)
        form["action"] = action
        if reason:
            form["reason"] = reason
        time.sleep(max(0.0, pg.fetched_at + 0.3 - time.monotonic()))  # min_dwell is 0.2s
        status, body = self._http(
            url,
            urllib.parse.urlencode(form).encode(),
            {"Content-Type": "application/x-www-form-urlencoded", "Accept-Language": lang},
        )
        return parse_page(status, body)

    def metrics(self) -> dict[str, list[tuple[dict[str, str], float]]]:
        """/metrics parsed: sample name -> [(labels, value)]."""
        from prometheus_client.parser import text_string_to_metric_families

        status, body = self._http(self.url("/metrics"))
        assert status == 200, f"/metrics -> {status}"
        out: dict[str, list[tuple[dict[str, str], float]]] = {}
        for fam in text_string_to_metric_families(body):
            for s in fam.samples:
                out.setdefault(s.name, []).append((dict(s.labels), float(s.value)))
        return out

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples of `name` whose labels include `labels` (0 if none)."""
        return sum(
            v
            for lb, v in self.metrics().get(name, [])
            if all(lb.get(k) == want for k, want in labels.items())
        )

    # -- logs and CLI

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def log_lines(self) -> list[str]:
        return self.log_text().splitlines()

    def log_records(self) -> list[dict[str, Any]]:
        """The log lines that are JSON objects (config log.json = true)."""
        out = []
        for ln in self.log_lines():
            ln = ln.strip()
            if ln.startswith("{"):
                with contextlib.suppress(ValueError):
                    obj = json.loads(ln)
                    if isinstance(obj, dict):
                        out.append(obj)
        return out

    def decision_record(self, sent: Sent, timeout: float = 5.0) -> dict[str, Any]:
        """The per-message JSON log line of `sent` (found by its Message-ID)."""

        def find() -> dict[str, Any] | None:
            for r in self.log_records():
                if "decision" in r and sent.message_id in str(r.get("message_id", "")):
                    return r
            return None

        return wait_for(find, timeout, what=f"the decision log line of {sent.subject!r}")

    def run_cli(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*mailguard_cmd(), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=self.dir,
        )

    def queue(self, *args: str) -> subprocess.CompletedProcess[str]:
        """`mailguard queue <args> --store <the server's store>`."""
        return self.run_cli("queue", *args, "--store", str(self.store))

    def queue_items(self) -> list[dict[str, Any]]:
        r = self.queue("list", "--json", "--limit", "500")
        assert r.returncode == 0, r.stderr
        return list(json.loads(r.stdout)["items"])

    def state_of(self, msg_id: str) -> str:
        for it in self.queue_items():
            if it.get("id") == msg_id:
                return str(it.get("state"))
        return ""

    def wait_state(self, msg_id: str, *states: str, timeout: float = MAX_WAIT) -> str:
        return wait_for(
            lambda: s if (s := self.state_of(msg_id)) in states else "",
            timeout,
            interval=0.2,
            what=f"{msg_id} in state {states}",
        )


# -- policies and test data --------------------------------------------------------------------

ORG = f"""[organization]
name = "OurCo"
internal_domains = ["{INTERNAL}"]
"""


def policy(rules: str, *, defaults: str = 'lang = "en"') -> str:
    """A policy file: our organisation (ourco.co.jp), [defaults] and the given [[rule]] tables."""
    return ORG + (f"\n[defaults]\n{defaults}\n" if defaults else "") + "\n" + rules


def pdf_bytes(size: int) -> bytes:
    """An unencrypted PDF-looking file of exactly `size` bytes."""
    head = b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\n"
    tail = b"\n%%EOF\n"
    return head + b"%" * (size - len(head) - len(tail)) + tail


KANA = re.compile(r"[\u3040-\u30ff]")  # hiragana + katakana
CJK = re.compile(r"[\u3040-\u30ff\u3400-\u9fff\uff00-\uffef]")
EN_WORDS = ("your", "message", "the", "will", "to", "is", "and", "recipients", "sent", "it")


def english_words(text: str) -> set[str]:
    """Common English words present in `text` (outside URLs)."""
    t = re.sub(r"https?://\S+", " ", text).lower()
    return {w for w in EN_WORDS if re.search(rf"\b{w}\b", t)}


def check_json(
    g: Guard, data: bytes, mail_from: str, rcpts: list[str], *extra: str
) -> dict[str, Any]:
    """`mailguard check --json --policy <the guard's policy> --store <its store>` on `data`."""
    path = g.dir / f"check-{uuid.uuid4().hex[:8]}.eml"
    path.write_bytes(data)
    args = ["check", "--json", "--store", str(g.store), "--mail-from", mail_from]
    if g.policy_path:
        args += ["--policy", str(g.policy_path)]
    for r in rcpts:
        args += ["--rcpt", r]
    r = g.run_cli(*args, *extra, str(path))
    assert r.returncode == 0, f"mailguard check failed ({r.returncode}):\n{r.stderr}"
    return dict(json.loads(r.stdout.splitlines()[0]))
