"""`mailguard check`: the dry run — what the server would decide for messages on disk, and why.

PATH may be a message file (.eml), an mbox, a Maildir (cur/ and new/, Maildir++ folders too) or a
directory holding any of these (walked recursively). Nothing is sent and nothing is written.

The envelope of a message on disk comes from its headers, unless `--mail-from` / `--rcpt` give it:
sender = X-Envelope-From, else Return-Path, else the mbox "From " line, else Sender, else From;
recipients = every X-Envelope-To (as written by archiving filters), else To + Cc + Bcc.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from mailguard.analysis import Analysis
from mailguard.envelope import Envelope
from mailguard.errors import ConfigError, MailGuardError
from mailguard.lookups import HistoryCache, Lookups
from mailguard.message import MessageView
from mailguard.message.addresses import parse_addresses
from mailguard.pipeline import analyze
from mailguard.policy import Gate, Policy, builtin_policy, format_duration, load_policy
from mailguard.policy.parse import domain_pattern

if TYPE_CHECKING:
    from mailguard.history import DomainHistory

_HEADER_LINE = re.compile(rb"[!-9;-~]+[ \t]*:")  # a header field name, then a colon
_MBOXRD_ESCAPE = re.compile(rb"^>(>*From )")
_EXIT_OK, _EXIT_INTERNAL, _EXIT_USAGE = 0, 1, 2


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "check",
        help="dry run: show what the guard would do with messages on disk",
        description="Dry run (送信前チェックの試行): parse, check and decide each message as the "
        "server would, and print the decision and the findings. PATH: .eml file, mbox, Maildir, "
        "or a directory of them. Nothing is sent.",
    )
    p.add_argument("paths", nargs="+", metavar="PATH")
    p.add_argument(
        "--policy",
        metavar="FILE",
        help="policy file (default: $MAILGUARD_POLICY, "
        "else the built-in rules of policies/default.toml with no internal domains)",
    )
    p.add_argument("--json", action="store_true", help="one JSON object per message (JSON Lines)")
    p.add_argument("--lang", choices=("ja", "en"), help="language of the output (default: $LANG)")
    p.add_argument(
        "--internal",
        action="append",
        metavar="DOMAIN",
        default=[],
        help="our domain (repeatable, '*.' wildcards); replaces the policy's list",
    )
    p.add_argument(
        "--trusted",
        action="append",
        metavar="DOMAIN",
        default=[],
        help="trusted partner domain (repeatable); replaces the policy's list",
    )
    p.add_argument("--mail-from", metavar="ADDR", help="envelope sender for every message")
    p.add_argument(
        "--rcpt",
        action="append",
        metavar="ADDR",
        default=[],
        help="envelope recipient for every message (repeatable)",
    )
    p.add_argument("--dns", action="store_true", help="look recipient domains up in DNS")
    p.add_argument(
        "--dns-server",
        metavar="HOST[:PORT]",
        action="append",
        default=[],
        help="nameserver for --dns (default: /etc/resolv.conf)",
    )
    p.add_argument(
        "--store",
        metavar="PATH",
        help="guard store with delivery history (enables first-time findings); nothing is recorded",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="print only the summary")
    p.set_defaults(func=run)


# ---- inputs -------------------------------------------------------------------------------


@dataclass(slots=True)
class Item:
    label: str  # file name, or "file.mbox#3"
    raw: bytes
    from_line: str | None = None  # sender on the mbox "From " line


@dataclass(slots=True)
class Inputs:
    skipped: list[str] = field(default_factory=list)  # files that are not messages
    errors: list[str] = field(default_factory=list)  # files that could not be read


def _looks_like_message(head: bytes) -> bool:
    return head.startswith(b"From ") or bool(_HEADER_LINE.match(head))


_CONTROL = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1a\x1c-\x1f\x7f]")  # not TAB CR LF ESC
_MAX_HEADER_LINES = 500


def is_mail(data: bytes) -> bool:
    """An RFC 5322 message (or an mbox): it starts with header fields — every line up to the
    first blank one is a `Name: value` field or its continuation, with no control bytes.
    An empty file, random bytes, an image or a document are not mail."""
    if data.startswith(b"From "):
        return True
    if not data.strip():
        return False
    head = data[: 1 << 16]
    lines = head.split(b"\n", _MAX_HEADER_LINES)
    if len(lines) > 1 or len(head) < len(data):
        lines = lines[:-1]  # the last piece may be cut (or the header cap reached)
    fields = 0
    for i, ln in enumerate(lines):
        ln = ln.rstrip(b"\r")
        if not ln:
            break
        if _CONTROL.search(ln):
            return False
        if ln[:1] in (b" ", b"\t") and i > 0:
            continue
        if not _HEADER_LINE.match(ln):
            return False
        fields += 1
    return fields > 0


def _is_maildir(d: Path) -> bool:
    return (d / "cur").is_dir() and (d / "new").is_dir()


def iter_messages(paths: Sequence[str], inputs: Inputs) -> Iterator[Item]:
    for p in paths:
        path = Path(p)
        if path.is_dir():
            yield from _walk(path, inputs)
        else:
            yield from _read_file(path, inputs, explicit=True, named=True)


def _walk(top: Path, inputs: Inputs) -> Iterator[Item]:
    for dirpath, dirnames, filenames in os.walk(top):
        d = Path(dirpath)
        maildir = _is_maildir(d)
        # Maildir tmp/ holds half-delivered files; other hidden dirs (.git) are not mail, but
        # Maildir++ folders (.Sent) are
        dirnames[:] = sorted(
            n
            for n in dirnames
            if not (maildir and n == "tmp") and (not n.startswith(".") or _is_maildir(d / n))
        )
        in_maildir = d.name in ("cur", "new") and _is_maildir(d.parent)
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            yield from _read_file(d / name, inputs, explicit=in_maildir)


def _read_file(
    path: Path, inputs: Inputs, *, explicit: bool, named: bool = False
) -> Iterator[Item]:
    """`explicit`: a message file by its place (a path given, a Maildir's cur/new); `named`:
    given on the command line — a file there that is not mail is an error (exit 2), not a pass."""
    try:
        data = path.read_bytes()
    except OSError as e:
        inputs.errors.append(f"{path}: {e.strerror or e}")
        return
    if not explicit and not _looks_like_message(data[:1000]):
        inputs.skipped.append(str(path))
        return
    if explicit and not is_mail(data):
        if named:
            inputs.errors.append(f"not an e-mail message: {path}")
        else:
            inputs.skipped.append(str(path))
        return
    if data.startswith(b"From "):
        yield from _split_mbox(str(path), data)
    else:
        yield Item(str(path), data)


def _split_mbox(label: str, data: bytes) -> Iterator[Item]:
    """mboxrd/mboxo: a message starts at a "From " line at the start or after a blank line."""
    lines = data.splitlines(keepends=True)
    starts = [
        i
        for i, ln in enumerate(lines)
        if ln.startswith(b"From ") and (i == 0 or lines[i - 1] in (b"\n", b"\r\n"))
    ]
    for n, (a, b) in enumerate(zip(starts, [*starts[1:], len(lines)], strict=True), 1):
        body = lines[a + 1 : b]
        if b < len(lines) and body and body[-1] in (b"\n", b"\r\n"):
            body = body[:-1]  # the blank line before the next "From " belongs to the mbox
        raw = b"".join(_MBOXRD_ESCAPE.sub(rb"\1", ln) if ln.startswith(b">") else ln for ln in body)
        parts = lines[a].split()
        sender = parts[1].decode("utf-8", "replace") if len(parts) > 1 else None
        yield Item(f"{label}#{n}", raw, sender)


# ---- envelope -----------------------------------------------------------------------------


def envelope_for(view: MessageView, item: Item, args: argparse.Namespace) -> tuple[Envelope, str]:
    """The envelope to check with, and where it came from (for the human output)."""
    rcpts: list[str] = list(args.rcpt)
    src = "command line" if rcpts else ""
    if not rcpts:
        env_to = view.raw_header_all("x-envelope-to")
        if env_to:
            rcpts = [a.addr for a in parse_addresses("to", env_to)]
            src = "X-Envelope-To"
        else:
            addrs = (*view.to, *view.cc, *view.bcc)
            rcpts = list(dict.fromkeys(a.addr for a in addrs if a.domain))
            src = "To/Cc/Bcc"
    sender = args.mail_from
    if sender is None:
        sender = _header_sender(view, "x-envelope-from")
    if sender is None:
        rp = view.raw_header_all("return-path")
        if rp:
            got = parse_addresses("from", rp[:1])
            sender = got[0].addr if got else ""  # Return-Path: <> is the null sender
    # Thunderbird writes "From - <date>": only an address (or MAILER-DAEMON) is an envelope sender
    if sender is None and item.from_line == "MAILER-DAEMON":
        sender = ""
    elif sender is None and item.from_line and "@" in item.from_line:
        sender = item.from_line
    if sender is None:
        sender = _header_sender(view, "sender") or _header_sender(view, "from") or ""
    return Envelope(sender, rcpts), src


def _header_sender(view: MessageView, name: str) -> str | None:
    vals = view.raw_header_all(name)
    if not vals:
        return None
    got = parse_addresses("from", vals[:1])
    return got[0].addr if got else None


# ---- context: DNS and history -------------------------------------------------------------


def open_lookups(args: argparse.Namespace) -> Lookups:
    """The server's lookups (mailguard.lookups), opened from the command line."""
    resolver = None
    if args.dns or args.dns_server:
        from mailguard.dns import DomainResolver

        servers, port = _nameservers(args.dns_server)
        resolver = DomainResolver(servers or None, port=port)
    history = HistoryCache(_open_history(args.store)) if args.store else None
    return Lookups(history, resolver)


def _nameservers(specs: Sequence[str]) -> tuple[list[str], int]:
    servers, port = [], 53
    for s in specs:
        host, sep, p = s.rpartition(":")
        if sep and p.isdigit() and host and (host.count(":") == 0 or host.startswith("[")):
            servers.append(host.strip("[]"))
            port = int(p)
        else:
            servers.append(s)
    return servers, port


def _open_history(path: str) -> DomainHistory:
    if not Path(path).is_file():
        raise ConfigError("no such store file", key="--store", file=path)
    from mailguard.history import DomainHistory

    return DomainHistory(path)


# ---- output -------------------------------------------------------------------------------

GATE_LABEL = {
    "en": {
        "pass": "PASS",
        "hold": "HOLD",
        "confirm": "CONFIRM",
        "approve": "APPROVE",
        "reject": "REJECT",
    },
    "ja": {
        "pass": "送信 (問題なし)",
        "hold": "一時保留",
        "confirm": "送信確認",
        "approve": "上長承認",
        "reject": "送信拒否",
    },
}
TRANSFORM_LABEL = {
    "en": {"bcc": "rewrite To/Cc to Bcc", "zip": "zip attachments with a password"},
    "ja": {"bcc": "Bcc 変換", "zip": "添付ファイルのパスワード付き ZIP 化"},
}
DOMAIN_CLASS = {
    "en": {
        "internal": "internal",
        "trusted": "trusted",
        "known": "known (written to before)",
        "first_time": "first time",
        "lookalike": "LOOK-ALIKE",
        "nonexistent": "NONEXISTENT",
        "unchecked": "not checked (no history)",
    },
    "ja": {
        "internal": "社内",
        "trusted": "信頼済み",
        "known": "送信実績あり",
        "first_time": "初めての送信先",
        "lookalike": "類似ドメイン",
        "nonexistent": "存在しない",
        "unchecked": "未確認 (送信履歴なし)",
    },
}
TEXT = {
    "en": {
        "decision": "Decision",
        "findings": "Findings",
        "rules": "Rules fired",
        "domains": "Domains",
        "attachments": "Attachments",
        "subject": "Subject",
        "head": "From: {sender} → {n} recipient(s)  (envelope from {src})",
        "none": "none",
        "exempted": "Sender exempted from",
        "hold": "held for {d}, then sent",
        "confirm": "sender must confirm within {d}",
        "approve": "needs approval by {who} within {d}",
        "timeout_cancel": "cancelled if unanswered",
        "timeout_send": "sent if unanswered",
        "reject": "refused: {msg}",
        "encrypted": "encrypted",
        "unencrypted": "NOT encrypted",
        "unknown": "encryption unknown",
        "like": "looks like {of}",
        "summary": "Summary",
        "messages": "messages",
        "skipped": "skipped (not mail)",
        "unreadable": "unreadable",
        "by_rule": "By rule",
        "failed": "analysis failed",
    },
    "ja": {
        "decision": "判定",
        "findings": "検出事項",
        "rules": "適用されたルール",
        "domains": "ドメイン",
        "attachments": "添付ファイル",
        "subject": "件名",
        "head": "差出人: {sender} → 宛先 {n} 件  (エンベロープ: {src})",
        "none": "なし",
        "exempted": "例外により適用外",
        "hold": "{d}保留後に送信",
        "confirm": "{d}以内に送信者の確認が必要",
        "approve": "{d}以内に {who} の承認が必要",
        "timeout_cancel": "期限切れで取り消し",
        "timeout_send": "期限切れで送信",
        "reject": "送信拒否: {msg}",
        "encrypted": "暗号化済み",
        "unencrypted": "暗号化なし",
        "unknown": "暗号化の有無不明",
        "like": "{of} に類似",
        "summary": "集計",
        "messages": "通",
        "skipped": "スキップ (メールではない)",
        "unreadable": "読めないファイル",
        "by_rule": "ルール別",
        "failed": "解析失敗",
    },
}


def duration_text(seconds: int, lang: str) -> str:
    if lang != "ja":
        from datetime import timedelta

        return format_duration(timedelta(seconds=seconds))
    out = ""
    for unit, size in (("日", 86400), ("時間", 3600), ("分", 60), ("秒", 1)):
        if seconds >= size:
            out += f"{seconds // size}{unit}"
            seconds %= size
    return out or "0秒"


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    size = float(n)
    for unit in ("KB", "MB", "GB"):
        size /= 1024
        if size < 1024 or unit == "GB":
            break
    return f"{size:.1f} {unit}"


def _list(items: Sequence[str], limit: int = 6) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", … (+{len(items) - limit})" if len(items) > limit else "")


def print_human(a: Analysis, label: str, env_src: str, lang: str, out: TextIO) -> None:
    t, d = TEXT[lang], a.decision
    js = a.to_json()
    w = out.write
    w(f"== {label}\n")
    sender = a.envelope.mail_from or "<>"
    n = len(a.envelope.rcpt_tos)
    w("  " + t["head"].format(sender=sender, n=n, src=env_src) + "\n")
    if a.view.subject:
        w(f"  {t['subject']}: {a.view.subject}\n")
    gate = GATE_LABEL[lang][d.action]
    tr = " + ".join(TRANSFORM_LABEL[lang][x] for x in d.transforms)
    w(f"  {t['decision']}: {gate}{' + ' + tr if tr else ''}\n")
    secs = int(d.hold_for.total_seconds()) if d.hold_for else 0
    dur = duration_text(secs, lang)
    timeout = t["timeout_cancel"] if d.on_timeout == "cancel" else t["timeout_send"]
    if d.gate is Gate.HOLD:
        w(f"    {t['hold'].format(d=dur)}\n")
    elif d.gate is Gate.CONFIRM:
        w(f"    {t['confirm'].format(d=dur)}; {timeout}\n")
    elif d.gate is Gate.APPROVE:
        w(f"    {t['approve'].format(d=dur, who=', '.join(d.approvers))}; {timeout}\n")
    elif d.gate is Gate.REJECT:
        w(f"    {t['reject'].format(msg=d.reject_message)}\n")
    if a.evaluation.hits:
        w(f"  {t['rules']}:\n")
        width = max(len(h.rule.name) for h in a.evaluation.hits)
        for h in a.evaluation.hits:
            cond = " and ".join(str(c) for c in h.conditions)
            w(f"    {h.rule.name:<{width}}  {cond} → {'+'.join(h.rule.actions)}\n")
            if h.rule.description:
                w(f"    {'':<{width}}  {h.rule.description}\n")
    if a.evaluation.exempted:
        w(f"  {t['exempted']}: {', '.join(a.evaluation.exempted)}\n")
    w(f"  {t['findings']}:{'' if a.findings else ' ' + t['none']}\n")
    used = {f.code for f in d.findings}
    for f in a.findings:
        mark = "*" if f.code in used else "-"
        w(f"    {mark} {f.code} ({f.count}): {f.reason(lang)}\n")
        if f.evidence:
            w(f"        {_list(list(f.evidence))}\n")
    domains = js.get("domains") or {}
    if isinstance(domains, Mapping) and domains:
        w(f"  {t['domains']}:\n")
        for dom, info in domains.items():
            if not isinstance(info, Mapping):
                continue
            cls = str(info.get("class", ""))
            shown = info.get("unicode") or dom
            name = shown if shown == dom else f"{shown} ({dom})"
            desc = DOMAIN_CLASS[lang].get(cls, cls)
            if info.get("lookalike_of"):
                desc += ", " + t["like"].format(of=info["lookalike_of"])
            if info.get("dns"):
                desc += f", DNS {info['dns']}"
            w(f"    {name}: {desc}\n")
    atts = js.get("attachments") or []
    if isinstance(atts, Sequence) and atts:
        w(f"  {t['attachments']}:\n")
        for att in atts:
            if not isinstance(att, Mapping):
                continue
            enc = att.get("encrypted")
            state = (
                t["encrypted"]
                if enc is True
                else t["unencrypted"]
                if enc is False
                else t["unknown"]
            )
            size = att.get("size")
            kind = att.get("kind") or att.get("content_type") or ""
            size_s = f", {_size(size)}" if isinstance(size, int) else ""
            w(f"    {att.get('filename') or '(no name)'} [{kind}{size_s}]: {state}\n")
    w("\n")


@dataclass(slots=True)
class Summary:
    messages: int = 0
    failed: int = 0
    gates: Counter[str] = field(default_factory=Counter)
    transforms: Counter[str] = field(default_factory=Counter)
    rules: Counter[str] = field(default_factory=Counter)

    def add(self, a: Analysis) -> None:
        self.messages += 1
        d = a.decision
        self.gates[d.action] += 1
        self.transforms.update(d.transforms)
        self.rules.update(d.rules)

    def print(self, inputs: Inputs, lang: str, out: TextIO) -> None:
        t = TEXT[lang]
        w = out.write
        w(f"{t['summary']}: {self.messages} {t['messages']}")
        extra = [f"{t['skipped']} {len(inputs.skipped)}"] if inputs.skipped else []
        if inputs.errors:
            extra.append(f"{t['unreadable']} {len(inputs.errors)}")
        if self.failed:
            extra.append(f"{t['failed']} {self.failed}")
        w(f" ({', '.join(extra)})\n" if extra else "\n")
        rows = [(GATE_LABEL[lang][g.label], self.gates[g.label]) for g in Gate]
        rows += [(TRANSFORM_LABEL[lang][x], self.transforms[x]) for x in ("bcc", "zip")]
        width = max(len(r[0]) for r in rows)
        for name, n in rows:
            w(f"  {name:<{width}}  {n:>6}\n")
        if self.rules:
            w(f"  {t['by_rule']}:\n")
            rw = max(len(r) for r in self.rules)
            for rule, n in self.rules.most_common():
                w(f"    {rule:<{rw}}  {n:>6}\n")


# ---- the command --------------------------------------------------------------------------


def detect_lang(env: Mapping[str, str]) -> str:
    for var in ("LC_ALL", "LC_MESSAGES", "LANG"):
        if env.get(var):
            return "ja" if env[var].lower().startswith("ja") else "en"
    return "en"


def choose_policy(args: argparse.Namespace) -> Policy:
    path = args.policy or os.environ.get("MAILGUARD_POLICY")
    policy = load_policy(path) if path else builtin_policy()
    if args.internal or args.trusted:
        policy = policy.with_org(
            internal=tuple(domain_pattern(d, "--internal") for d in args.internal) or None,
            trusted=tuple(domain_pattern(d, "--trusted") for d in args.trusted) or None,
        )
    return policy


def run(args: argparse.Namespace) -> int:
    lang = args.lang or detect_lang(os.environ)
    missing = [p for p in args.paths if not os.path.exists(p)]
    if missing:
        for p in missing:
            print(f"mailguard check: {p}: no such file or directory", file=sys.stderr)
        return _EXIT_USAGE
    try:
        policy = choose_policy(args)
        lookups = open_lookups(args)
    except (ConfigError, ImportError) as e:
        print(f"mailguard check: {e}", file=sys.stderr)
        return _EXIT_USAGE
    if not policy.org.internal and not args.json and not args.quiet:
        print(
            "mailguard check: note: no internal domains (use --policy or --internal): "
            "every recipient counts as external",
            file=sys.stderr,
        )
    inputs = Inputs()
    summary = Summary()
    many = len(args.paths) > 1 or any(os.path.isdir(p) for p in args.paths)
    out = sys.stdout
    runner = asyncio.Runner()
    try:
        for item in iter_messages(args.paths, inputs):
            try:
                a, src = _analyze(item, args, policy, lookups, runner)
            except MailGuardError as e:
                print(f"mailguard check: {item.label}: {e}", file=sys.stderr)
                summary.failed += 1
                continue
            except Exception as e:  # a bug in a check must not stop a replay of 10 000 mails
                print(
                    f"mailguard check: {item.label}: internal error: {type(e).__name__}: {e}",
                    file=sys.stderr,
                )
                summary.failed += 1
                continue
            summary.add(a)
            many = many or "#" in item.label
            if args.json:
                out.write(json.dumps(a.to_json(file=item.label), ensure_ascii=False) + "\n")
            elif not args.quiet:
                print_human(a, item.label, src, lang, out)
    except BrokenPipeError:  # `mailguard check dir/ | head`: the reader has seen enough
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return _EXIT_OK
    finally:
        runner.run(lookups.close())
        runner.close()
    for err in inputs.errors:
        print(f"mailguard check: {err}", file=sys.stderr)
    if many or args.quiet:
        summary.print(inputs, lang, sys.stderr if args.json else out)
    if inputs.errors:
        return _EXIT_USAGE
    if summary.failed:
        return _EXIT_INTERNAL
    return _EXIT_OK


def _analyze(
    item: Item, args: argparse.Namespace, policy: Policy, lookups: Lookups, runner: asyncio.Runner
) -> tuple[Analysis, str]:
    bare = MessageView.parse(item.raw)
    env, src = envelope_for(bare, item, args)
    view = MessageView.parse(item.raw, env)
    return runner.run(analyze(view, policy, lookups)), src
