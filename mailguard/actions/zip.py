"""Zip transform: put the selected attachments in one password zip; the password leaves separately.

All selected files go into ONE zip per message (the usual Japanese practice: "添付ファイル.zip" +
a password mail). The zip part takes the place of the first selected attachment; the other
selected parts are cut out with their delimiter lines. Everything else — the body, inline
images, calendar parts, signatures, the header block — is spliced through byte-for-byte.

Options (all optional):
  method               "aes" (default, AES-256) | "zipcrypto" (Windows Explorer can open it)
  filename_charset     "utf-8" (default, flag bit 11) | "cp932" (+ Unicode Path field 0x7075)
  zip_name             template for one file, default "{stem}.zip"
  zip_name_multi       template for several files, default "attachments_{date}.zip"
                       ({stem}: first file's name without extension, {date}: YYYYMMDD of the
                       Date header, {count}: number of files)
  password_length      default 12;  password_alphabet: default without 0/O/o, 1/l/I
  password_to          "sender" (default) | "recipients"
  password_delay       seconds before the password notice goes out (default 0)
  per_domain_passwords bool: one password, zip and delivery per recipient domain (splits)
  select               "unencrypted" (default: skip files already encrypted) | "all"
  min_size             bytes; smaller attachments stay as they are (default 0)
  scan                 callable(data, filename) -> None, raising scan.ScanRejected to refuse
                       (a scan.Scanner)
  compresslevel        deflate level for compressible files (default 6)
  lang                 language of the password notice (default "ja")
"""

from __future__ import annotations

import base64
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from mailguard.actions.archive import (
    MAX_NAME,
    Member,
    Method,
    NameCharset,
    build_zip,
    clean_name,
    fit_name,
)
from mailguard.actions.base import Notice, Rewritten
from mailguard.actions.headers import RawField, field_value, header_end, line_ending, split_fields
from mailguard.actions.passwords import DEFAULT_ALPHABET, DEFAULT_LENGTH, generate_password
from mailguard.actions.scan import Scanner
from mailguard.formats import is_encrypted
from mailguard.message.addresses import normalize_domain
from mailguard.message.types import Part

if TYPE_CHECKING:
    from mailguard.message import MessageView

TRACE_HEADER = "X-MailGuard-Zip"

_METHODS: tuple[Method, ...] = ("aes", "zipcrypto")
_CHARSETS: tuple[NameCharset, ...] = ("utf-8", "cp932")


# --- options ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ZipOptions:
    """The transform's options (module docstring), read once from the policy's mapping."""

    method: Method = "aes"
    filename_charset: NameCharset = "utf-8"
    zip_name: str = "{stem}.zip"
    zip_name_multi: str = "attachments_{date}.zip"
    password_length: int = DEFAULT_LENGTH
    password_alphabet: str = DEFAULT_ALPHABET
    password_to: str = "sender"
    password_delay: float = 0.0
    per_domain_passwords: bool = False
    select: str = "unencrypted"
    min_size: int = 0
    scan: Scanner | None = None
    compresslevel: int = 6
    lang: str = "ja"

    @classmethod
    def of(cls, options: Mapping[str, Any] | ZipOptions) -> ZipOptions:
        """Raises ValueError on an unknown method or filename charset, or a non-number."""
        if isinstance(options, ZipOptions):
            return options
        method = options.get("method", "aes")
        charset = options.get("filename_charset", "utf-8")
        for m in _METHODS:
            if method == m:
                break
        else:
            raise ValueError(f"unknown zip method {method!r} (expected aes, zipcrypto)")
        for c in _CHARSETS:
            if charset == c:
                break
        else:
            raise ValueError(f"unknown filename_charset {charset!r} (expected utf-8, cp932)")
        scan = options.get("scan")
        if scan is not None and not callable(scan):
            raise ValueError(f"scan must be callable, got {scan!r}")
        return cls(
            method=m,
            filename_charset=c,
            zip_name=str(options.get("zip_name", "{stem}.zip")),
            zip_name_multi=str(options.get("zip_name_multi", "attachments_{date}.zip")),
            password_length=int(options.get("password_length", DEFAULT_LENGTH)),
            password_alphabet=str(options.get("password_alphabet", DEFAULT_ALPHABET)),
            password_to=str(options.get("password_to", "sender")),
            password_delay=float(options.get("password_delay", 0) or 0),
            per_domain_passwords=bool(options.get("per_domain_passwords")),
            select=str(options.get("select", "unencrypted")),
            min_size=int(options.get("min_size", 0)),
            scan=scan,
            compresslevel=int(options.get("compresslevel", 6)),
            lang=str(options.get("lang", "ja")),
        )


# --- which parts ------------------------------------------------------------------------------


def _all_parts(view: MessageView) -> list[Part]:
    out: list[Part] = []
    stack = [*view.parts, view.root]
    seen: set[int] = set()
    while stack:
        p = stack.pop()
        if id(p) in seen:
            continue
        seen.add(id(p))
        out.append(p)
        stack.extend(p.children)
    return out


_FORWARDS = frozenset({"message/rfc822", "message/global"})


def _default_name(p: Part, i: int) -> str:
    return f"forwarded-{i + 1}.eml" if p.content_type in _FORWARDS else f"attachment{i + 1}"


def _inside_message(part: Part, parents: Mapping[int, Part]) -> bool:
    p = parents.get(id(part))
    while p is not None:
        if p.content_type in _FORWARDS:
            return True
        p = parents.get(id(p))
    return False


# --- the zip part -----------------------------------------------------------------------------


def _safe_name(name: str, charset: str = "utf-8") -> str:
    """A member or zip name: hidden characters dropped, slashes and look-alikes, controls and
    reserved punctuation as "_", at most 255 bytes in `charset` with the extension kept."""
    return fit_name(clean_name(name), charset)


def _stem(filename: str) -> str:
    base = filename.rsplit("/", 1)[-1].rsplit("\\", 1)[-1]
    stem, dot, _ = base.rpartition(".")
    return stem if dot and stem else base


_WORD = 68  # an encoded word on its own folded line: ' name="' + word stays within 78


def _encoded_word(text: str) -> list[str]:
    """RFC 2047 B-words of ≤ 68 chars, split on character boundaries (Outlook reads name=)."""
    words: list[str] = []
    cur = ""
    for ch in text:
        if cur and len(base64.b64encode((cur + ch).encode("utf-8"))) > _WORD - 12:
            words.append(cur)
            cur = ""
        cur += ch
    if cur:
        words.append(cur)
    return [f"=?UTF-8?B?{base64.b64encode(w.encode('utf-8')).decode('ascii')}?=" for w in words]


def part_headers(zip_name: str, nl: bytes) -> bytes:
    """Content-Type/-Disposition of the zip part, readable by Outlook, Thunderbird and the stdlib.

    RFC 2231 filename* (the standard) in Content-Disposition, RFC 2047 in name= (what Outlook
    and older Japanese clients read), as Thunderbird writes them; short ASCII names stay plain.
    A long name is folded: RFC 2231 continuations (filename*0*=, filename*1*=, …) and one
    encoded word per line, every line within 78 octets (RFC 5322 2.1.1), never a 10 000-octet
    header line.
    """
    sep = nl + b" "
    plain = f'Content-Disposition: attachment; filename="{zip_name}"'
    if zip_name.isascii() and len(plain) + zip_name.count('"') + zip_name.count("\\") <= 78:
        q = zip_name.replace("\\", "\\\\").replace('"', '\\"')
        ct = f'Content-Type: application/zip; name="{q}"'.encode("ascii")
        cd = f'Content-Disposition: attachment; filename="{q}"'.encode("ascii")
    else:
        words = _encoded_word(zip_name)
        ct = (
            b"Content-Type: application/zip;"
            + sep
            + b'name="'
            + sep.join(w.encode("ascii") for w in words)
            + b'"'
        )
        pct = quote(zip_name.encode("utf-8"), safe="")
        # ' filename*NN*=' (≤ 15) or " filename*0*=UTF-8''" (20) + 54 + ";" ≤ 78
        chunks = [pct[i : i + 54] for i in range(0, len(pct), 54)]
        # don't split a %XX escape across continuations
        fixed: list[str] = []
        carry = ""
        for c in chunks:
            c = carry + c
            cut = c.rfind("%", max(0, len(c) - 2))
            carry, c = (c[cut:], c[:cut]) if cut >= 0 else ("", c)
            fixed.append(c)
        if carry:
            fixed.append(carry)
        fixed = [c for c in fixed if c]
        params = [
            f"filename*{i}*={'UTF-8' + chr(39) * 2 if i == 0 else ''}{c}"
            for i, c in enumerate(fixed)
        ]
        if len(params) == 1:
            params = [f"filename*=UTF-8''{fixed[0]}"]
        cd = (
            b"Content-Disposition: attachment;"
            + sep
            + (b";" + sep).join(p.encode("ascii") for p in params)
        )
    return ct + nl + cd + nl + b"Content-Transfer-Encoding: base64" + nl


_B64_BLOCK = 57 * 1024  # 1024 lines of 76 characters per piece


def b64_body(data: bytes | memoryview, nl: bytes) -> list[bytes]:
    """Base64 in 76-character lines with the message's own line ending (no final line end).

    Returned as pieces of ~78 KiB so the caller joins the whole message once: one full-size
    copy of the encoded zip instead of three (encode, CRLF, trim).
    """
    mv = memoryview(data)
    pieces = []
    for i in range(0, len(mv), _B64_BLOCK):
        enc = base64.encodebytes(mv[i : i + _B64_BLOCK])
        pieces.append(enc.replace(b"\n", b"\r\n") if nl == b"\r\n" else enc)
    if pieces:
        pieces[-1] = pieces[-1][: -len(nl)]
    return pieces


# --- the transform ----------------------------------------------------------------------------


class ZipAttachments:
    """The "zip" transform (see module docstring for options)."""

    name = "zip"

    def apply(self, raw: bytes, view: MessageView, options: Mapping[str, Any]) -> Rewritten:
        opts = ZipOptions.of(options)
        parts = _all_parts(view)
        parents = {id(c): p for p in parts for c in p.children}
        chosen: list[tuple[Part, bytes]] = []
        skipped: list[str] = []
        # A forwarded message is enclosed whole (as .eml): the files inside it cannot be cut
        # out one by one, and leaving them out would send them unencrypted after a zip decision.
        forwards = [
            p
            for p in parts
            if p.content_type in _FORWARDS
            and p is not view.root
            and id(p) in parents
            and not _inside_message(p, parents)
        ]
        for part in sorted([*view.attachments, *forwards], key=lambda p: p.header_start):
            if part.content_type in _FORWARDS and part in forwards:
                data = view.body_of(part)
                if {"mime.decoded_limit", "mime.bad_base64"} & set(part.defects):
                    skipped.append(f"{part.filename or part.path}: damaged forwarded message")
                    continue
                chosen.append((part, data))
                continue
            if part.role != "attachment" or part is view.root:
                continue
            if part.path == "" or id(part) not in parents or _inside_message(part, parents):
                skipped.append(f"{part.filename or part.path}: not a top-level attachment")
                continue
            data = view.body_of(part)
            damaged = {"mime.decoded_limit", "mime.bad_base64"} & set(part.defects)
            if damaged:  # zipping what we could decode would change the file: leave it
                skipped.append(f"{part.filename}: {', '.join(sorted(damaged))}")
                continue
            if len(data) < opts.min_size:
                continue
            if opts.select != "all" and is_encrypted(data, part.filename):
                skipped.append(f"{part.filename}: already encrypted")
                continue
            chosen.append((part, data))
        if not chosen:
            return Rewritten(raw, trace="zip: nothing to zip" + _why(skipped))

        charset = opts.filename_charset
        names = _unique(
            [
                _safe_name(p.filename or _default_name(p, i), charset)
                for i, (p, _) in enumerate(chosen)
            ],
            charset,
        )
        if opts.scan is not None:
            for (_, data), name in zip(chosen, names, strict=True):
                opts.scan(data, name)

        end = view.header_end or header_end(raw)
        date = _message_date(raw, split_fields(raw, end))
        subject = view.subject
        members = [Member(n, d, date) for (_, d), n in zip(chosen, names, strict=True)]
        zip_name = _zip_name(opts, names, date)
        nl = line_ending(raw)
        if view.envelope is None:  # notices and splits are addressed from the envelope
            raise ValueError("zip transform needs the message's envelope")
        sender = view.envelope.mail_from
        rcpts = list(view.envelope.rcpt_tos)

        groups: list[tuple[str, list[str]]]
        if opts.per_domain_passwords:
            by_dom: dict[str, list[str]] = {}
            for r in rcpts:
                by_dom.setdefault(normalize_domain(r.rpartition("@")[2])[0], []).append(r)
            groups = list(by_dom.items())
        else:
            groups = [("", rcpts)]

        notices: list[Notice] = []
        splits: list[tuple[tuple[str, ...], bytes]] = []
        out = raw
        for _dom, who in groups:
            password = generate_password(opts.password_length, opts.password_alphabet)
            archive = build_zip(
                members,
                password,
                method=opts.method,
                names=opts.filename_charset,
                compresslevel=opts.compresslevel,
            )
            body = b64_body(archive, nl)
            del archive  # only the encoded pieces are needed from here on
            out = _splice(raw, [p for p, _ in chosen], parents, body, zip_name, nl, len(names))
            del body
            notices.append(_notice(opts, password, names, zip_name, subject, who, sender))
            if len(groups) > 1:
                splits.append((tuple(who), out))
        trace = (
            f"zip: {len(names)} file(s) into {zip_name} ({opts.method}"
            f"{', per-domain passwords' if len(groups) > 1 else ''}); "
            f"password to {opts.password_to}" + _why(skipped)
        )
        return Rewritten(out, notices=tuple(notices), trace=trace, splits=tuple(splits))


def _why(skipped: list[str]) -> str:
    return f"; skipped: {', '.join(skipped)}" if skipped else ""


def _unique(names: list[str], charset: str = "utf-8") -> list[str]:
    seen: set[str] = set()
    out = []
    for n in names:
        cand, k = n, 1
        while cand.lower() in seen:
            k += 1
            cand = fit_name(n, charset, tail=f" ({k})")  # still within 255 bytes
        seen.add(cand.lower())
        out.append(cand)
    return out


def _message_date(raw: bytes, fields: Iterable[RawField]) -> datetime:
    """The Date header's wall-clock time (the sender's), else now: used for mtime and {date}."""
    for f in fields:
        if f.key() == "date":
            try:
                dt = parsedate_to_datetime(field_value(raw, f).decode("ascii", "replace").strip())
                return dt.replace(tzinfo=None)
            except (TypeError, ValueError, IndexError):
                break
    return datetime.now()


def _zip_name(opts: ZipOptions, names: list[str], date: datetime) -> str:
    tpl = opts.zip_name if len(names) == 1 else opts.zip_name_multi
    try:
        name = tpl.format(stem=_stem(names[0]), date=date.strftime("%Y%m%d"), count=len(names))
    except (KeyError, IndexError, ValueError):
        name = f"{_stem(names[0])}.zip"
    name = clean_name(name)
    if not name.lower().endswith(".zip"):
        name += ".zip"
    # the zip's own name obeys the member rules (it is also a file name at the recipient)
    return fit_name(name, "utf-8", limit=MAX_NAME)


def _notice(
    options: ZipOptions | Mapping[str, Any],
    password: str,
    names: list[str],
    zip_name: str,
    subject: str,
    recipients: list[str],
    sender: str,
) -> Notice:
    opts = ZipOptions.of(options)
    to_recipients = opts.password_to == "recipients"
    delay = opts.password_delay
    return Notice(
        kind="zip-password",
        to=tuple(recipients) if to_recipients else (sender,),
        data={
            "password": password,
            "filenames": list(names),
            "zip_name": zip_name,
            "subject": subject,
            "recipients": list(recipients),
            "lang": opts.lang,
        },
        send_after=timedelta(seconds=delay) if to_recipients else timedelta(0),
    )


def _splice(
    raw: bytes,
    chosen: list[Part],
    parents: Mapping[int, Part],
    body: list[bytes],
    zip_name: str,
    nl: bytes,
    count: int,
) -> bytes:
    """raw with the first chosen part replaced by the zip part and the others cut out."""
    cuts: list[tuple[int, int, list[bytes]]] = []
    first = chosen[0]
    cuts.append((first.header_start, first.body_end, [part_headers(zip_name, nl) + nl, *body]))
    for p in chosen[1:]:
        parent = parents[id(p)]
        # the delimiter line before the part, with the line break before it (RFC 2046 5.1.1)
        line_start = raw.rfind(b"\n", 0, max(p.header_start - 1, 0)) + 1
        if line_start > parent.body_start:
            lo = line_start - 1
            if lo > 0 and raw[lo - 1 : lo] == b"\r":
                lo -= 1
            cuts.append((lo, p.body_end, []))
        else:  # first delimiter of the multipart: take the line break after the part instead
            hi = p.body_end
            if raw[hi : hi + 2] == b"\r\n":
                hi += 2
            elif raw[hi : hi + 1] == b"\n":
                hi += 1
            cuts.append((line_start, hi, []))
    cuts.sort(key=lambda c: c[0])
    trace = f"{TRACE_HEADER}: {count} attachment{'s' if count != 1 else ''} zipped with a password"
    out: list[bytes] = [trace.encode("ascii") + nl]
    pos = 0
    for lo, hi, new in cuts:
        out.append(raw[pos:lo])
        out += new
        pos = hi
    out.append(raw[pos:])
    return b"".join(out)


__all__ = ["ZipAttachments", "ZipOptions", "b64_body", "part_headers"]
