"""Service configuration: one TOML file (listen, upstream, store, web, notify, log), validated.

A bad file is refused as `FILE:LINE: section.key: what is wrong` (ConfigError), never a traceback.
Command-line overrides are applied with `dataclasses.replace` by the CLI after loading.
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, TypeVar

from mailguard.errors import ConfigError

HostPort = tuple[str, int]

_SIZE = re.compile(r"^\s*(\d+)\s*([KMG]i?B?|B)?\s*$", re.IGNORECASE)
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}


def parse_hostport(value: str, *, default_port: int | None = None) -> HostPort:
    """'127.0.0.1:10025', '[::1]:10025', 'localhost:25' → (host, port)."""
    v = value.strip()
    m = re.fullmatch(r"\[([^\]]+)\](?::(\d+))?", v) or re.fullmatch(r"([^:\s]*):(\d+)", v)
    if m:
        host, port = m.group(1), m.group(2)
    elif default_port is not None and v and ":" not in v:
        host, port = v, str(default_port)
    else:
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    if port is None:
        if default_port is None:
            raise ValueError(f"expected HOST:PORT, got {value!r}")
        port = str(default_port)
    p = int(port)
    if not 0 <= p <= 65535:
        raise ValueError(f"port out of range in {value!r}")
    return host or "127.0.0.1", p


def parse_size(value: int | str) -> int:
    """Bytes from 1048576, "10MiB", "10M", "512KB"; binary multiples (mail admins mean MiB)."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as 10MiB")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("size must not be negative")
        return value
    m = _SIZE.match(str(value))
    if not m:
        raise ValueError(f"expected a size such as 10MiB, got {value!r}")
    mult = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[(m.group(2) or "")[:1].upper()]
    return int(m.group(1)) * mult


def parse_duration(value: int | float | str) -> float:
    """Seconds from 30, "30s", "5m", "2h", "1d", "250ms"."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 30s")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("duration must not be negative")
        return float(value)
    m = _DURATION.match(str(value))
    if not m:
        raise ValueError(f"expected a duration such as 30s, 5m, 2h, got {value!r}")
    return float(m.group(1)) * _DURATION_UNITS[m.group(2)]


@dataclass(frozen=True, slots=True)
class SmtpConfig:
    listen: HostPort = ("127.0.0.1", 10025)
    # Greeting/EHLO name; differs from Postfix's myhostname so Received: lines and logs tell the
    # guard and Postfix apart.
    hostname: str = "mailguard.localdomain"
    # No open relay: only these client networks may connect.
    allowed_networks: tuple[str, ...] = ("127.0.0.0/8", "::1/128")
    max_message_size: int = 50 << 20  # 552 above it; 0 = no limit
    spool_threshold: int = 8 << 20  # DATA above this goes to a temp file, not RAM
    spool_dir: str = ""  # "" = the system temp dir
    max_recipients: int = 1000
    timeout: float = 300.0  # idle client, as Postfix's smtpd_timeout
    # DATA must average this many bytes/s on top of `timeout` (Postfix's smtpd_min_data_rate):
    # a client trickling a byte per (timeout - ε) is cut instead of holding a slot for ever.
    min_data_rate: int = 500
    xforward: bool = True
    # Concurrent client connections per process; over it 421 4.7.0 and close (0 = no limit).
    max_connections: int = 200
    # Commands that move no mail (NOOP, RSET, EHLO, VRFY, XFORWARD, a refused MAIL …) since the
    # last DATA; over it 421 4.7.0 and close (0 = no limit).
    max_idle_commands: int = 20


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    address: HostPort = ("127.0.0.1", 10026)
    connect_timeout: float = 10.0
    command_timeout: float = 60.0  # per SMTP command
    data_timeout: float = 300.0  # the final "." of a large message
    pool_size: int = 64  # idle connections kept
    idle_timeout: float = 30.0  # close pooled connections idle longer than this
    max_uses: int = 1000  # messages per connection before it is renewed


@dataclass(frozen=True, slots=True)
class PolicyConfig:
    file: str = ""  # "" = the shipped policies/default.toml


@dataclass(frozen=True, slots=True)
class StoreConfig:
    path: Path = Path("var/mailguard.db")  # the embedded SQLite store (one node)
    # "postgresql://user@host/db": the shared store of several guards (path is then unused)
    url: str = ""
    pool_size: int = 10  # PostgreSQL connections per process
    lease: float = 60.0  # PostgreSQL: a dead node's deliveries are taken over after this


@dataclass(frozen=True, slots=True)
class WebConfig:
    listen: HostPort = ("127.0.0.1", 8025)
    enabled: bool = True
    public_url: str = ""  # base of links in notices; "" = http://<listen>
    admin_token: str = ""  # "" = admin API disabled
    secret: str = ""  # CSRF/HMAC key; "" = random per start (pages outlive no restart)
    # a POST sooner than this after its page was served is a scanner, not a person
    min_dwell: float = 1.5
    # GET /metrics on this port: "open", "token" (admin Bearer token) or "off" ([metrics] listen)
    metrics: str = "open"
    # peers whose client_ip_header names the real client (a reverse proxy); [] = the TCP peer
    trusted_proxies: tuple[str, ...] = ()
    client_ip_header: str = "X-Forwarded-For"
    # unknown tokens per client and from all clients together, per miss_window; over → 429
    miss_limit: int = 20
    miss_limit_global: int = 200
    miss_window: float = 600.0
    # failed admin-API logins per client and from all clients together, per login_fail_window
    login_fail_limit: int = 10
    login_fail_limit_global: int = 100
    login_fail_window: float = 600.0


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    listen: HostPort | None = None  # its own /metrics listener ("" = none)


@dataclass(frozen=True, slots=True)
class MilterConfig:
    # Postfix calls MailGuard over the milter protocol here (smtpd_milters); "" = no milter
    listen: HostPort | None = None


@dataclass(frozen=True, slots=True)
class NotifyConfig:
    sender: str = "mailguard@localhost"  # From of the guard's own notices
    charset: str = "utf-8"  # or "iso-2022-jp"
    lang: str = "ja"  # default language of notices: ja, en, or "ja+en" (both)
    templates: str = ""  # a directory overriding the shipped templates
    # Notices (links, outcomes, zip passwords, bounces) go only to senders the organisation owns:
    # MAIL FROM in the policy's internal domains or matching one of these patterns
    # (case-insensitive, shell-style: "*@example.co.jp", "noreply@partner.example").
    senders: tuple[str, ...] = ()
    # Where the notice goes instead for a null or foreign MAIL FROM (the message stays held);
    # "" = nobody is told (logged; `mailguard queue list` shows the message).
    admin: str = ""


@dataclass(frozen=True, slots=True)
class DnsConfig:
    enabled: bool = False
    nameservers: tuple[str, ...] = ()  # "" = the system resolver
    port: int = 53
    timeout: float = 3.0


@dataclass(frozen=True, slots=True)
class LogConfig:
    level: str = "info"
    json: bool = False
    log_addresses: bool = False  # addresses in log lines only when the admin enables it


@dataclass(frozen=True, slots=True)
class Config:
    smtp: SmtpConfig = field(default_factory=SmtpConfig)
    upstream: UpstreamConfig = field(default_factory=UpstreamConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    web: WebConfig = field(default_factory=WebConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    milter: MilterConfig = field(default_factory=MilterConfig)
    notify: NotifyConfig = field(default_factory=NotifyConfig)
    dns: DnsConfig = field(default_factory=DnsConfig)
    log: LogConfig = field(default_factory=LogConfig)
    source: str = ""  # the file it came from, for messages


Section = (
    SmtpConfig
    | UpstreamConfig
    | PolicyConfig
    | StoreConfig
    | WebConfig
    | MetricsConfig
    | MilterConfig
    | NotifyConfig
    | DnsConfig
    | LogConfig
)


def _hostport(value: object) -> HostPort:
    if not isinstance(value, str):
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    return parse_hostport(value)


def _opt_hostport(value: object) -> HostPort | None:
    return None if value == "" else _hostport(value)


def _size(value: object) -> int:
    return parse_size(value if isinstance(value, int) else str(value))


def _duration(value: object) -> float:
    return parse_duration(value if isinstance(value, int | float) else str(value))


def _path(value: object) -> Path:
    if not isinstance(value, str):
        raise ValueError("expected a path string")
    return Path(value)


PG_SCHEMES = ("postgresql://", "postgres://")


def _pg_url(value: object) -> str:
    if not isinstance(value, str) or (value and not value.startswith(PG_SCHEMES)):
        raise ValueError("expected postgresql://user@host[:port]/database")
    return value


# How each key is converted; anything not listed takes the field's own type.
_CONVERT: dict[tuple[str, str], Callable[[object], object]] = {
    ("smtp", "listen"): _hostport,
    ("upstream", "address"): _hostport,
    ("web", "listen"): _hostport,
    ("smtp", "max_message_size"): _size,
    ("smtp", "spool_threshold"): _size,
    ("smtp", "timeout"): _duration,
    ("upstream", "connect_timeout"): _duration,
    ("upstream", "command_timeout"): _duration,
    ("upstream", "data_timeout"): _duration,
    ("upstream", "idle_timeout"): _duration,
    ("dns", "timeout"): _duration,
    ("web", "min_dwell"): _duration,
    ("web", "miss_window"): _duration,
    ("web", "login_fail_window"): _duration,
    ("metrics", "listen"): _opt_hostport,
    ("milter", "listen"): _opt_hostport,
    ("store", "path"): _path,
    ("store", "url"): _pg_url,
    ("store", "lease"): _duration,
}
# The [section] tables and the class each one builds.
_SECTIONS: dict[str, type[Section]] = {
    "smtp": SmtpConfig,
    "upstream": UpstreamConfig,
    "policy": PolicyConfig,
    "store": StoreConfig,
    "web": WebConfig,
    "metrics": MetricsConfig,
    "milter": MilterConfig,
    "notify": NotifyConfig,
    "dns": DnsConfig,
    "log": LogConfig,
}
assert set(_SECTIONS) == {f.name for f in fields(Config) if f.name != "source"}
_CHOICES = {
    ("notify", "charset"): ("utf-8", "iso-2022-jp"),
    ("web", "metrics"): ("open", "token", "off"),
    ("notify", "lang"): ("ja", "en", "ja+en"),
    ("log", "level"): ("debug", "info", "warning", "error"),
}


def key_line(text: str, section: str, key: str | None = None) -> int | None:
    """Line number of `[section]` (or of `key` inside it) in TOML text, for error messages."""
    in_section = False
    for no, line in enumerate(text.splitlines(), 1):
        s = line.strip()
        if s.startswith("["):
            in_section = s.strip("[] ").split("#")[0].strip() == section
            if in_section and key is None:
                return no
            continue
        if in_section and key and re.match(rf"{re.escape(key)}\s*=", s):
            return no
    return None


def _convert(section: str, key: str, value: object, default: object) -> object:
    conv = _CONVERT.get((section, key))
    if conv is not None:
        return conv(value)
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ValueError(f"expected true or false, got {value!r}")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"expected a non-negative integer, got {value!r}")
        return value
    if isinstance(default, float):
        return _duration(value)
    if isinstance(default, tuple):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ValueError("expected a list of strings")
        return tuple(value)
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {value!r}")
    choices = _CHOICES.get((section, key))
    if choices and value not in choices:
        raise ValueError(f"{value!r} is not one of {', '.join(choices)}")
    return value


def from_dict(data: Mapping[str, object], *, source: str = "", text: str = "") -> Config:
    store = data.get("store")
    if isinstance(store, dict) and str(store.get("path", "")).startswith(PG_SCHEMES):
        # `[store] path = "postgresql://…"` means the same as `url = …`, as `--store` does
        store = {k: v for k, v in store.items() if k != "path"}
        data = {**data, "store": {"url": data["store"]["path"], **store}}  # type: ignore[index]
    sections: dict[str, Section] = {}
    for name, value in data.items():
        if name not in _SECTIONS:
            raise ConfigError(
                f"unknown section (expected {', '.join(_SECTIONS)})",
                file=source,
                line=key_line(text, name),
                key=name,
            )
        if not isinstance(value, dict):
            raise ConfigError("expected a table", file=source, key=name)
        sections[name] = _section(name, value, source, text)
    cfg = Config(
        smtp=_pick(sections, "smtp", SmtpConfig),
        upstream=_pick(sections, "upstream", UpstreamConfig),
        policy=_pick(sections, "policy", PolicyConfig),
        store=_pick(sections, "store", StoreConfig),
        web=_pick(sections, "web", WebConfig),
        metrics=_pick(sections, "metrics", MetricsConfig),
        milter=_pick(sections, "milter", MilterConfig),
        notify=_pick(sections, "notify", NotifyConfig),
        dns=_pick(sections, "dns", DnsConfig),
        log=_pick(sections, "log", LogConfig),
        source=source,
    )
    _validate(cfg, source, text)
    return cfg


def _section(name: str, table: dict[str, object], source: str, text: str) -> Section:
    """One [section] table: its defaults with the file's keys converted and put in."""
    defaults = _SECTIONS[name]()
    known = {f.name: getattr(defaults, f.name) for f in fields(defaults)}
    # Values differ in type by key (checked by _convert): Any only between here and replace().
    changes: dict[str, Any] = {}
    for key, v in table.items():
        if key not in known:
            raise ConfigError(
                f"unknown key (expected {', '.join(known)})",
                file=source,
                line=key_line(text, name, key),
                key=f"{name}.{key}",
            )
        try:
            changes[key] = _convert(name, key, v, known[key])
        except ValueError as e:
            raise ConfigError(
                str(e), file=source, line=key_line(text, name, key), key=f"{name}.{key}"
            ) from None
    return replace(defaults, **changes)


_S = TypeVar("_S", bound=Section)


def _pick(sections: Mapping[str, Section], name: str, cls: type[_S]) -> _S:
    got = sections.get(name)
    if got is None:
        return cls()
    assert isinstance(got, cls), (name, got)
    return got


ADMIN_TOKEN_MIN = 32


def _validate_networks(nets: Iterable[str], table: str, key: str, source: str, text: str) -> None:
    for net in nets:
        try:
            ipaddress.ip_network(net, strict=False)
        except ValueError:
            raise ConfigError(
                f"not an IP network: {net!r}",
                file=source,
                line=key_line(text, table, key),
                key=f"{table}.{key}",
            ) from None


def _validate_web(cfg: Config, source: str, text: str) -> None:
    w = cfg.web
    if w.admin_token and len(w.admin_token) < ADMIN_TOKEN_MIN:
        raise ConfigError(
            f"too short ({len(w.admin_token)} characters, at least {ADMIN_TOKEN_MIN}: "
            "use e.g. `python3 -c 'import secrets; print(secrets.token_urlsafe(32))'`)",
            file=source,
            line=key_line(text, "web", "admin_token"),
            key="web.admin_token",
        )
    _validate_networks(w.trusted_proxies, "web", "trusted_proxies", source, text)
    if not re.fullmatch(r"[A-Za-z0-9-]+", w.client_ip_header):
        raise ConfigError(
            f"not a header name: {w.client_ip_header!r}",
            file=source,
            line=key_line(text, "web", "client_ip_header"),
            key="web.client_ip_header",
        )
    if w.metrics == "token" and not w.admin_token:
        raise ConfigError(
            '"token" needs web.admin_token',
            file=source,
            line=key_line(text, "web", "metrics"),
            key="web.metrics",
        )


def _validate(cfg: Config, source: str, text: str) -> None:
    _validate_web(cfg, source, text)
    _validate_networks(cfg.smtp.allowed_networks, "smtp", "allowed_networks", source, text)
    if cfg.upstream.pool_size > 10000:
        raise ConfigError("pool_size above 10000", file=source, key="upstream.pool_size")


def load(path: str | Path | None) -> Config:
    """Read and validate a config file; None = built-in defaults."""
    if path is None:
        return Config()
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read: {e.strerror or e}", file=str(p)) from None
    except UnicodeDecodeError:
        raise ConfigError("not UTF-8 text", file=str(p)) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        m = re.search(r"\(at line (\d+), column (\d+)\)", str(e))
        msg = re.sub(r"\s*\(at line \d+, column \d+\)", "", str(e))
        line = int(m[1]) if m else None
        raise ConfigError(f"TOML syntax: {msg}", file=str(p), line=line) from None
    return from_dict(data, source=str(p), text=text)
