"""Logs: the one structured line per message, and the process's logging set-up (text or JSON).

The per-message line leads with Postfix's queue id, as Postfix's own lines do, so
`grep 3CF6B2AAE8 /var/log/mail.log` finds Postfix's and MailGuard's lines for one message:

    3CF6B2AAE8: id=mg-01H… message-id=<…> decision=hold rules=cool-down findings=recipient.external
      transforms=- size=5120 nrcpt=3 reply=250 elapsed_ms=4.2

(one line). Addresses (from=, to=) appear only with `log_addresses=True` (config
`log.log_addresses`); finding evidence, tokens and passwords never do. Every record that reaches
the handler `setup_logging` installs passes `TokenRedactingFilter` first: a confirm-link token
(`/m/<token>`) anywhere in a message, its arguments or an exception text — aiohttp's error log
quotes a bad request line — is written as `/m/…`. `install_redaction()` puts the same filter on
aiohttp's own loggers (for handlers other than ours). With `json=True` the
same fields come as one JSON object; `setup_logging(json=True)` then merges that object into the
JSON log record instead of quoting it as a string.
"""

from __future__ import annotations

import json as _json
import logging
import re
import sys
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any, Final, TextIO

MAX_FIELD: Final = 200  # a hostile Message-ID must not make a 1 MB log line
MAX_ADDRESSES: Final = 50  # to= lists at most this many, then "+N more"
_UNSAFE = re.compile(r"[\x00-\x1f\x7f]")  # control characters: log injection (CR/LF)
_NEEDS_QUOTES = re.compile(r'[\s"=]')
_HANDLER_MARK: Final = "_mailguard_handler"


def _clean(value: str) -> str:
    v = _UNSAFE.sub(lambda m: f"\\x{ord(m.group()):02x}", value)
    return v if len(v) <= MAX_FIELD else v[: MAX_FIELD - 1] + "…"


def _text_value(value: str) -> str:
    v = _clean(value)
    if not v:
        return "-"
    if _NEEDS_QUOTES.search(v):
        return '"' + v.replace('"', '\\"') + '"'
    return v


def safe_id(s: str) -> str:
    """An id from outside (Postfix's queue id from XFORWARD, an upstream's "queued as") made
    safe for a log line: control, C1 and bidi characters escaped as \\xNN / \\uNNNN, at most 64
    characters, "-" when empty."""
    v = re.sub(
        r"[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069]",
        lambda m: f"\\x{ord(m[0]):02x}" if ord(m[0]) < 0x100 else f"\\u{ord(m[0]):04x}",
        s or "-",
    )
    return v if len(v) <= 64 else v[:63] + "…"


# A confirm-page path and its token: /m/<token>, also percent-encoded (%2Fm%2F<token>).
_TOKEN_PATH = re.compile(r"((?:/|%2[fF])m(?:/|%2[fF]))[A-Za-z0-9_\-%]{6,}")
AIOHTTP_LOGGERS: Final = (
    "aiohttp.access",
    "aiohttp.client",
    "aiohttp.internal",
    "aiohttp.server",
    "aiohttp.web",
    "aiohttp.websocket",
)


def redact_tokens(text: str) -> str:
    """`text` with every /m/<token> written as /m/…"""
    return _TOKEN_PATH.sub(lambda m: f"{m[1]}…", text) if "m" in text else text


class TokenRedactingFilter(logging.Filter):
    """Rewrites a record so that no confirm-link token survives in it: the formatted message
    (its arguments merged in), the exception text and the stack text. Never drops a record."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            msg = record.getMessage()
        except Exception:  # a broken %-format: let the handler report it, token-free
            msg = f"{record.msg!r} % {record.args!r}"
        red = redact_tokens(msg)
        if red != msg or record.args:
            record.msg, record.args = red, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact_tokens(record.exc_text)
        if record.stack_info:
            record.stack_info = redact_tokens(record.stack_info)
        return True


_REDACTOR: Final = TokenRedactingFilter()


def install_redaction() -> None:
    """Put the token filter on aiohttp's loggers (idempotent)."""
    for name in AIOHTTP_LOGGERS:
        lg = logging.getLogger(name)
        if _REDACTOR not in lg.filters:
            lg.addFilter(_REDACTOR)


def _joined(items: Iterable[str]) -> str:
    return ",".join(dict.fromkeys(items)) or "-"


def message_log_fields(
    *,
    queue_id: str,
    mg_id: str,
    message_id: str = "",
    decision: str,
    rules: Sequence[str] = (),
    codes: Sequence[str] = (),
    transforms: Sequence[str] = (),
    size: int,
    recipients: int,
    elapsed: float,
    reply: int | None = None,
    sender: str | None = None,
    rcpts: Sequence[str] = (),
    log_addresses: bool = False,
) -> dict[str, Any]:
    """The fields of one message's log line, in order (see `message_log_line`)."""
    fields: dict[str, Any] = {
        "queue_id": _clean(queue_id or "-"),
        "id": _clean(mg_id or "-"),
        "message_id": _clean(message_id),
        "decision": decision,
        "rules": list(dict.fromkeys(rules)),
        "findings": list(dict.fromkeys(codes)),
        "transforms": list(dict.fromkeys(transforms)),
        "size": size,
        "nrcpt": recipients,
    }
    if reply is not None:
        fields["reply"] = reply
    fields["elapsed_ms"] = round(elapsed * 1000.0, 1)
    if log_addresses:
        fields["from"] = _clean(sender or "")
        shown = [_clean(a) for a in rcpts[:MAX_ADDRESSES]]
        fields["to"] = shown
        if len(rcpts) > MAX_ADDRESSES:
            fields["to_more"] = len(rcpts) - MAX_ADDRESSES
    return fields


def message_log_line(
    *,
    queue_id: str,
    mg_id: str,
    message_id: str = "",
    decision: str,
    rules: Sequence[str] = (),
    codes: Sequence[str] = (),
    transforms: Sequence[str] = (),
    size: int,
    recipients: int,
    elapsed: float,
    reply: int | None = None,
    sender: str | None = None,
    rcpts: Sequence[str] = (),
    log_addresses: bool = False,
    json: bool = False,
) -> str:
    """One line for one message: Postfix queue id first, then our id, Message-ID, decision,
    fired rules, finding codes, rewrites, size, recipient count, SMTP reply, elapsed time.

    `elapsed` is in seconds (printed as ms). `sender`/`rcpts` are printed only when
    `log_addresses` is true. `json=True` returns a JSON object on one line instead.
    """
    f = message_log_fields(
        queue_id=queue_id,
        mg_id=mg_id,
        message_id=message_id,
        decision=decision,
        rules=rules,
        codes=codes,
        transforms=transforms,
        size=size,
        recipients=recipients,
        elapsed=elapsed,
        reply=reply,
        sender=sender,
        rcpts=rcpts,
        log_addresses=log_addresses,
    )
    if json:
        return _json.dumps(f, ensure_ascii=False, separators=(",", ":"))
    parts = [
        f"id={_text_value(f['id'])}",
        f"message-id={_text_value(f['message_id'])}",
        f"decision={_text_value(f['decision'])}",
        f"rules={_text_value(_joined(f['rules']))}",
        f"findings={_text_value(_joined(f['findings']))}",
        f"transforms={_text_value(_joined(f['transforms']))}",
        f"size={f['size']}",
        f"nrcpt={f['nrcpt']}",
    ]
    if "reply" in f:
        parts.append(f"reply={f['reply']}")
    parts.append(f"elapsed_ms={f['elapsed_ms']}")
    if log_addresses:
        parts.append(f"from=<{_clean(f['from'])}>")
        to = ",".join(f"<{a}>" for a in f["to"]) or "-"
        if "to_more" in f:
            to += f",+{f['to_more']}"
        parts.append(f"to={_text_value(to)}")
    return f"{_text_value(f['queue_id'])}: " + " ".join(parts)


class JsonFormatter(logging.Formatter):
    """One JSON object per record. A message that is itself a JSON object (the per-message
    line with json=True) is merged into the record instead of being quoted as a string."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        msg = record.getMessage()
        merged = False
        if msg.startswith("{") and msg.endswith("}"):
            try:
                obj = _json.loads(msg)
            except ValueError:
                obj = None
            if isinstance(obj, dict):
                for k, v in obj.items():
                    out.setdefault(k, v)
                merged = True
        if not merged:
            out["message"] = msg  # json.dumps escapes CR/LF: nothing breaks out
        if record.exc_text:  # set (and redacted) by TokenRedactingFilter
            out["exception"] = record.exc_text
        elif record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack"] = record.stack_info
        return _json.dumps(out, ensure_ascii=False, separators=(",", ":"))


TEXT_FORMAT: Final = "%(asctime)s %(name)s[%(process)d]: %(levelname)s: %(message)s"


def setup_logging(
    level: str | int = "info", json: bool = False, stream: TextIO | None = None
) -> logging.Handler:
    """Send log records at `level` and above to stderr (journald adds its own metadata), as
    text or one JSON object per line. Calling it again (SIGHUP reload) replaces the handler it
    installed before rather than adding a second one."""
    lvl = logging.getLevelName(level.upper()) if isinstance(level, str) else level
    if not isinstance(lvl, int):
        raise ValueError(f"unknown log level {level!r}")
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, _HANDLER_MARK, False):
            root.removeHandler(h)
            h.close()
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    setattr(handler, _HANDLER_MARK, True)
    handler.addFilter(_REDACTOR)
    handler.setFormatter(JsonFormatter() if json else logging.Formatter(TEXT_FORMAT))
    root.addHandler(handler)
    root.setLevel(lvl)
    install_redaction()
    return handler
