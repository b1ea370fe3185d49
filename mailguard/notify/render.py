"""Notify stage: render the guard's own mails (hold, confirm, approval, outcome, password).

A template `<kind>.txt.j2` renders the whole plain-text mail: the first line is `Subject: …`, then a
blank line, then the body. The HTML part comes from `<kind>.html.j2` when it exists, otherwise
from `_layout.html.j2` wrapping the escaped text; only the guard's own URLs (the notice's
`d.url` and `public_url`) become links there. Templates see:

* `d` (alias `data`): the notice data as queued (see docs/queue.md for each kind's keys), every
  string except `url` and `password` passed through `mailguard.textsafe.data_text`;
* `s`: the message's `mailguard.summary.Summary`, read from `d.summary` (empty when absent),
  every value from the message (subject, names, addresses, file names, finding texts) made one
  safe line by `data_text` (no CR/LF, controls or bidi characters; capped; URLs defanged);
* `q(value, lang)`: a value from the message in visible quotes (「…」 / “…”);
* `langs`: ["ja"], ["en"] or ["ja", "en"] (`ja+en`: both in one mail, Japanese first);
* `tr(ja, en)`: the strings of `langs` joined by " / " (subjects);
* `when(iso)`: a local date and time; `size(n)`: "47.1 KB"; `to`: the notice's recipients.

An admin directory (notify.templates) overrides any shipped file of the same name.

MIME: multipart/alternative, text/plain then text/html. With charset "iso-2022-jp" the text part is
ISO-2022-JP 7bit and the subject is RFC 2047 ISO-2022-JP (what older Japanese clients expect); a
text that JIS X 0208 cannot encode (emoji, rare kanji) falls back to UTF-8 rather than garble.
The HTML part is always UTF-8 (base64). Every notice carries `Auto-Submitted: auto-generated`
(RFC 3834: no auto-replies) and `X-MailGuard-Notice: <kind>; sig=<hmac>`: the signature covers
the kind and the body, so `is_own_notice` can tell the guard's own mail from a sender who merely
copied the header to slip past the guard.

Sending: the notifier does not know the relay. It hands the rendered bytes to any `MailSender`
(the server's upstream transport), with the envelope from `envelope_for`.
"""

from __future__ import annotations

import hashlib
import hmac
import html
import logging
import re
from collections.abc import Mapping, Sequence
from datetime import datetime, tzinfo
from email import policy as email_policy
from email.charset import BASE64, Charset
from email.header import Header
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from email.parser import BytesHeaderParser
from email.utils import format_datetime, formataddr, make_msgid
from pathlib import Path
from typing import Protocol
from zoneinfo import ZoneInfo

import jinja2
from markupsafe import Markup

from mailguard.envelope import Envelope, Reply
from mailguard.summary import Attachment, Reason, Recipient, Summary
from mailguard.textsafe import NAME_LIMIT, data_text, quoted

log = logging.getLogger("mailguard.notify")

SHIPPED = Path(__file__).with_name("templates")
HEADER = "X-MailGuard-Notice"
KINDS = (
    "held",
    "confirm",
    "approval-pending",
    "approval-request",
    "outcome",
    "zip-password",
)


# Notices about one message: they show its Summary (d.summary).
ABOUT_A_MESSAGE = frozenset(KINDS) - {"zip-password"}


class MailSender(Protocol):
    """Whatever hands a finished mail to the upstream MTA (the server's relay transport).

    Must not raise for upstream trouble: 2xx accepted, 4xx try later, 5xx refused.
    """

    async def send(self, env: Envelope, raw: bytes) -> Reply: ...


def langs_of(lang: str) -> list[str]:
    """ "ja" → ["ja"], "en" → ["en"], "ja+en" (or "both") → ["ja", "en"], "en+ja" → ["en", "ja"].

    Anything else (an unknown tag, "") falls back to Japanese rather than fail a notice.
    """
    lang = lang.strip().lower()
    if lang == "both":
        return ["ja", "en"]
    out: list[str] = []
    for tag in lang.replace(",", "+").split("+"):
        base = tag.strip()[:2]
        if base in ("ja", "en") and base not in out:
            out.append(base)
    return out or ["ja"]


def human_size(n: int) -> str:
    """Bytes for people: "512 B", "47.1 KB", "3.2 MB"."""
    size = float(max(n, 0))
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"  # not reached


def summary_of(data: Mapping[str, object]) -> Summary:
    """The Summary a notice carries (`data["summary"]`, i.e. `Summary.to_json()`)."""
    raw = data.get("summary")
    return Summary.from_json(raw) if isinstance(raw, Mapping) else Summary()


def safe_summary(s: Summary) -> Summary:
    """`s` with every value that came from the message made one safe line (`data_text`)."""

    def rcpt(r: Recipient) -> Recipient:
        return Recipient(
            data_text(r.addr, 320), data_text(r.name, NAME_LIMIT), r.field, data_text(r.org, 255)
        )

    return Summary(
        subject=data_text(s.subject),
        sender=data_text(s.sender, 320),
        internal=tuple(rcpt(r) for r in s.internal),
        external=tuple(rcpt(r) for r in s.external),
        attachments=tuple(
            Attachment(data_text(a.name, NAME_LIMIT), a.size, data_text(a.content_type, 100))
            for a in s.attachments
        ),
        findings=tuple(
            Reason(r.code, data_text(r.en, 400), data_text(r.ja, 400)) for r in s.findings
        ),
        rules=s.rules,
        domains=s.domains,
    )


# Notice data keys that are the guard's own values, not text from a message.
_OWN_KEYS = frozenset({"url", "password", "summary"})


def safe_data(data: Mapping[str, object]) -> dict[str, object]:
    """The notice data with every string (in lists and mappings too) passed through `data_text`,
    except the guard's own `url` and `password` (and `summary`, shown through `safe_summary`)."""

    def clean(v: object) -> object:
        if isinstance(v, str):
            return data_text(v, 400)
        if isinstance(v, list | tuple):
            return [clean(x) for x in v]
        if isinstance(v, Mapping):
            return {str(k): clean(x) for k, x in v.items()}
        return v

    return {k: (v if k in _OWN_KEYS else clean(v)) for k, v in data.items()}


def _body_digest(body: bytes) -> bytes:
    # Line ends and trailing blank lines may change in transit (CRLF/LF, a final newline).
    norm = body.replace(b"\r\n", b"\n").rstrip(b"\n \t")
    return hashlib.sha256(norm).digest()


def _sign(secret: bytes, kind: str, body: bytes) -> str:
    mac = hmac.new(secret, kind.encode() + b"\0" + _body_digest(body), hashlib.sha256)
    return mac.hexdigest()[:32]


def _split(raw: bytes) -> tuple[bytes, bytes]:
    for sep in (b"\r\n\r\n", b"\n\n"):
        i = raw.find(sep)
        if i >= 0:
            return raw[: i + len(sep)], raw[i + len(sep) :]
    return raw, b""


def own_notice_kind(raw: bytes, secret: bytes | str) -> str | None:
    """The notice kind if `raw` is a notice this guard signed with `secret`, else None."""
    if isinstance(secret, str):
        secret = secret.encode()
    if not secret:
        return None
    head, body = _split(raw)
    if HEADER.lower().encode() not in head.lower():
        return None
    msg = BytesHeaderParser(policy=email_policy.compat32).parsebytes(head)
    for value in msg.get_all(HEADER) or []:
        m = re.fullmatch(r"\s*([a-z0-9-]+)\s*;\s*sig=([0-9a-f]{32})\s*", str(value))
        if m and hmac.compare_digest(m[2], _sign(secret, m[1], body)):
            return m[1]
    return None


def is_own_notice(raw: bytes, secret: bytes | str) -> bool:
    """True for a mail the guard itself generated (pass it without guarding it again)."""
    return own_notice_kind(raw, secret) is not None


class Notifier:
    """Renders notices with jinja2 into complete mails and hands them to a `MailSender`."""

    def __init__(
        self,
        mailer: MailSender,
        sender: str,
        *,
        charset: str = "utf-8",
        lang: str = "ja",
        templates_dir: str | Path | None = None,
        public_url: str = "",
        secret: bytes | str = b"",
        timezone: str = "Asia/Tokyo",
        hostname: str = "",
    ) -> None:
        if charset not in ("utf-8", "iso-2022-jp"):
            raise ValueError(f"charset {charset!r} (expected utf-8 or iso-2022-jp)")
        self.mailer = mailer
        self.sender = sender
        self.charset = charset
        self.lang = lang  # "ja", "en" or "ja+en"; a notice's own data["lang"] wins
        self.public_url = public_url.rstrip("/")
        self.secret = secret.encode() if isinstance(secret, str) else secret
        self.tz: tzinfo | None
        try:
            self.tz = ZoneInfo(timezone)
        except Exception:  # no tzdata on the box: show UTC rather than fail a notice
            self.tz = None
        self.domain = hostname or (sender.rpartition("@")[2] or "localhost")
        loaders: list[jinja2.BaseLoader] = []
        if templates_dir:
            loaders.append(jinja2.FileSystemLoader(str(templates_dir)))
        loaders.append(jinja2.FileSystemLoader(str(SHIPPED)))
        self._text_env = jinja2.Environment(
            loader=jinja2.ChoiceLoader(loaders),
            autoescape=False,  # plain text; the HTML side escapes
            undefined=jinja2.StrictUndefined,
            keep_trailing_newline=True,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self._html_env = jinja2.Environment(
            loader=jinja2.ChoiceLoader(loaders),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        for env in (self._text_env, self._html_env):  # macros see globals, not the context
            env.globals["size"] = human_size
            env.globals["when"] = self._when
            env.globals["q"] = quoted

    # -- rendering -----------------------------------------------------------------------------

    def _when(self, value: str | datetime | None) -> str:
        if not value:
            return ""
        d = datetime.fromisoformat(value) if isinstance(value, str) else value
        if self.tz is not None:
            d = d.astimezone(self.tz)
        return d.strftime("%Y-%m-%d %H:%M %Z").strip()

    def lang_of(self, data: Mapping[str, object], lang: str | None = None) -> str:
        """The language a notice is rendered in: explicit, else the notice's, else the default."""
        return lang or str(data.get("lang") or "") or self.lang

    def _context(
        self, kind: str, data: Mapping[str, object], lang: str, to: Sequence[str]
    ) -> dict[str, object]:
        langs = langs_of(lang)

        def tr(ja: str, en: str) -> str:
            return " / ".join(s for s, lg in ((ja, "ja"), (en, "en")) if lg in langs)

        if kind in ABOUT_A_MESSAGE and not isinstance(data.get("summary"), Mapping):
            log.warning("%s notice (id=%s) carries no summary", kind, data.get("id", "-"))
        safe = safe_data(data)
        ctx: dict[str, object] = {
            "d": safe,
            "data": safe,
            "s": safe_summary(summary_of(data)),
            "to": list(to),
            "langs": langs,
            "tr": tr,
        }
        return ctx

    def own_urls(self, data: Mapping[str, object]) -> frozenset[str]:
        """The URLs the HTML part may turn into links: the notice's own link and public_url."""
        url = data.get("url")
        return frozenset(u for u in (url if isinstance(url, str) else "", self.public_url) if u)

    def render_text(
        self,
        kind: str,
        data: Mapping[str, object],
        lang: str | None = None,
        to: Sequence[str] = (),
    ) -> tuple[str, str, str]:
        """(subject, text body, html body) for one notice."""
        ctx = self._context(kind, data, self.lang_of(data, lang), to)
        full = self._text_env.get_template(f"{kind}.txt.j2").render(ctx)
        first, _, body = full.partition("\n")
        if not first.lower().startswith("subject:"):
            raise ValueError(f"{kind}.txt.j2: the first line must be 'Subject: …'")
        subject = first.split(":", 1)[1].strip()
        body = _tidy(body)
        try:
            page = self._html_env.get_template(f"{kind}.html.j2").render(ctx)
        except jinja2.TemplateNotFound:
            page = self._html_env.get_template("_layout.html.j2").render(
                ctx, subject=subject, body_html=_text_to_html(body, self.own_urls(data))
            )
        return subject, body, page

    def render(
        self,
        kind: str,
        to: Sequence[str],
        data: Mapping[str, object],
        lang: str | None = None,
    ) -> bytes:
        """The notice as a complete, sealed RFC 5322 message (CRLF line ends)."""
        subject, text, page = self.render_text(kind, data, lang, to)
        msg = MIMEMultipart("alternative")
        text_part = self._text_part(text)
        html_cs = Charset("utf-8")
        html_cs.body_encoding = BASE64
        html_part = MIMEText(page, "html", html_cs)  # type: ignore[arg-type]
        msg.attach(text_part)
        msg.attach(html_part)

        hcs = self.charset if _encodable(subject, self.charset) else "utf-8"
        msg["Subject"] = Header(subject, hcs)  # type: ignore[assignment]
        msg["From"] = formataddr(("MailGuard", self.sender))
        msg["To"] = ", ".join(to)
        msg["Date"] = format_datetime(datetime.now().astimezone())
        msg["Message-ID"] = make_msgid("mailguard", domain=self.domain)
        msg["Auto-Submitted"] = "auto-generated"
        msg["X-Auto-Response-Suppress"] = "All"  # Exchange/Outlook: no out-of-office replies
        msg["Precedence"] = "bulk"
        return self.seal(kind, _as_bytes(msg))

    def seal(self, kind: str, raw: bytes) -> bytes:
        """Prepend the signed X-MailGuard-Notice header (also used for DSNs built elsewhere)."""
        sig = _sign(self.secret, kind, _split(raw)[1]) if self.secret else "0" * 32
        return f"{HEADER}: {kind}; sig={sig}\r\n".encode() + raw

    def _text_part(self, text: str) -> MIMEText:
        if self.charset == "iso-2022-jp" and _encodable(text, "iso-2022-jp"):
            cs = Charset("iso-2022-jp")  # body 7bit as-is, headers base64: the JIS tradition
            return MIMEText(text, "plain", cs)  # type: ignore[arg-type]
        if self.charset == "iso-2022-jp":
            log.info("notice text not encodable in ISO-2022-JP; sending UTF-8")
        cs = Charset("utf-8")
        cs.body_encoding = BASE64
        return MIMEText(text, "plain", cs)  # type: ignore[arg-type]

    # -- sending -------------------------------------------------------------------------------

    def envelope_for(
        self, to: Sequence[str], *, null_sender: bool = False, msg_id: str = "-"
    ) -> Envelope:
        """The envelope a notice goes out with: MAIL FROM notify.sender, or <> (outcomes, DSNs:
        nothing may answer them); XFORWARD IDENT = the message id, for the upstream's log."""
        return Envelope(
            mail_from="" if null_sender else self.sender,
            rcpt_tos=list(to),
            xforward={"IDENT": msg_id} if msg_id and msg_id != "-" else {},
        )

    async def send(
        self,
        kind: str,
        to: Sequence[str],
        data: Mapping[str, object],
        *,
        null_sender: bool = False,
        lang: str | None = None,
        msg_id: str = "-",
    ) -> Reply:
        """Render and hand over one notice."""
        raw = self.render(kind, to, data, lang)
        return await self.send_raw(raw, to, null_sender=null_sender, msg_id=msg_id)

    async def send_raw(
        self, raw: bytes, to: Sequence[str], *, null_sender: bool = False, msg_id: str = "-"
    ) -> Reply:
        """Hand an already rendered (sealed) notice or DSN to the mailer."""
        return await self.mailer.send(
            self.envelope_for(to, null_sender=null_sender, msg_id=msg_id), raw
        )


def _encodable(s: str, charset: str) -> bool:
    try:
        s.encode(charset)
    except UnicodeEncodeError:
        return False
    return True


def _as_bytes(msg: MIMEMultipart) -> bytes:
    return msg.as_bytes(policy=email_policy.compat32.clone(linesep="\r\n", max_line_length=78))


def _tidy(body: str) -> str:
    """No leading blank lines, at most one blank line in a row (templates stay readable)."""
    return re.sub(r"\n{3,}", "\n\n", body.lstrip("\n"))


_URL = re.compile(r"https?://[^\s<>\"'「」“”]+")


def _text_to_html(text: str, own: frozenset[str] = frozenset()) -> Markup:
    """Escaped paragraphs (the default HTML part). Only a URL that is exactly one of `own` (the
    guard's own links) becomes a link; any other URL-looking text stays text."""
    out = []
    for para in re.split(r"\n\s*\n", text.strip()):
        pieces: list[str] = []
        pos = 0
        for m in _URL.finditer(para):
            pieces.append(html.escape(para[pos : m.start()]))
            url = html.escape(m[0])
            pieces.append(f'<a href="{url}">{url}</a>' if m[0] in own else url)
            pos = m.end()
        pieces.append(html.escape(para[pos:]))
        out.append("<p>" + "".join(pieces).replace("\n", "<br>\n") + "</p>")
    return Markup("\n".join(out))  # built from escaped text
