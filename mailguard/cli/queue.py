"""`mailguard queue list|show|release|cancel`: the held queue from the shell, on the server's store.

The CLI only moves messages in the store (with who/why in the audit trail); the running server's
scheduler delivers what was released, so the CLI never talks SMTP and works while the server runs.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import sys
import unicodedata
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from mailguard.config import load, parse_duration
from mailguard.errors import ConfigError, StoreError
from mailguard.queue.backends import is_url, make_store
from mailguard.queue.service import HoldService
from mailguard.queue.store import Held, State, TransitionError
from mailguard.summary import Summary

_EXIT_OK, _EXIT_FAIL, _EXIT_USAGE = 0, 1, 2


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    common = argparse.ArgumentParser(add_help=False)
    src = common.add_mutually_exclusive_group()
    src.add_argument("--store", metavar="PATH|URL", help="the SQLite store file, or postgresql://…")
    src.add_argument(
        "-c", "--config", metavar="FILE", help="service config (uses store.url or store.path)"
    )
    common.add_argument("--json", action="store_true", help="machine-readable output")

    p = subparsers.add_parser(
        "queue",
        help="list, show, release or cancel held messages",
        description="The held-message queue (保留キュー). Release and cancel are recorded in the "
        "audit trail with your user name; the running server delivers released messages.",
    )
    sub = p.add_subparsers(dest="queue_command", metavar="ACTION")
    ls = sub.add_parser("list", parents=[common], help="list messages, newest first")
    ls.add_argument("--state", choices=[s.value for s in State], help="only this state")
    ls.add_argument("--sender", metavar="ADDR", help="only this envelope sender")
    ls.add_argument("--since", metavar="WHEN", help="ISO time, or an age such as 2h, 3d")
    ls.add_argument(
        "--limit", type=_limit, default=50, metavar="N", help="page size, 1-1000 (default 50)"
    )
    ls.add_argument("--before", metavar="ID", help="the page after this id (from a previous list)")
    show = sub.add_parser("show", parents=[common], help="one message with its audit trail")
    show.add_argument("id")
    for verb, text in (("release", "send a held message now"), ("cancel", "never send it")):
        v = sub.add_parser(verb, parents=[common], help=text)
        v.add_argument("id")
        v.add_argument("--why", default="", help="reason for the audit trail")
    p.set_defaults(func=main, queue_parser=p)


def _limit(value: str) -> int:
    n = int(value)
    if not 1 <= n <= 1000:
        raise argparse.ArgumentTypeError(f"{value}: must be 1 to 1000")
    return n


def _store_path(args: argparse.Namespace) -> str:
    """A path or a PostgreSQL URL: --store, else the config's store.url or store.path."""
    if args.store:
        return str(args.store)
    st = load(args.config).store
    return st.url or str(st.path)


def _since(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        d = datetime.fromisoformat(value)
        return d if d.tzinfo else d.astimezone()
    except ValueError:
        return datetime.now(UTC) - timedelta(seconds=parse_duration(value))


def _cut(s: str, width: int) -> str:
    """Cut to `width` terminal columns (CJK characters take two)."""
    out: list[str] = []
    used = 0
    for ch in s:
        w = 2 if unicodedata.east_asian_width(ch) in "WF" else 1
        if used + w > width:
            return "".join(out)[:-1] + "…"
        out.append(ch)
        used += w
    return "".join(out)


def _local(d: datetime | None) -> str:
    return d.astimezone().strftime("%m-%d %H:%M") if d else "-"


def _table(items: tuple[Held, ...]) -> str:
    head = (
        f"{'ID':16}  {'STATE':10}  {'GATE':7}  {'CREATED':11}  {'DUE':11}  {'RCPT':>4}  "
        "FROM / SUBJECT"
    )
    rows = [head]
    for h in items:
        subject = str(h.summary.get("subject", ""))
        rows.append(
            f"{h.id:16}  {h.state.value:10}  {h.gate:7}  {_local(h.created):11}  "
            f"{_local(h.due):11}  {len(h.rcpt_tos):>4}  {_cut(h.mail_from or '<>', 30)}  "
            f"{_cut(subject, 40)}"
        )
    return "\n".join(rows)


def _count_line(args: argparse.Namespace, shown: int, total: int, nxt: str | None) -> str:
    """ "50 of 100000 messages (state=held), newest first; next page: --before ID"."""
    pairs = (("state", args.state), ("sender", args.sender), ("since", args.since))
    filters = [f"{k}={v}" for k, v in pairs if v]
    line = f"{shown} of {total} messages" + (f" ({', '.join(filters)})" if filters else "")
    line += ", newest first" + (f", older than {args.before}" if args.before else "")
    return line + (f"; next page: --before {nxt}" if nxt else "")


def _show(h: Held, audit: list[dict[str, Any]]) -> str:
    s = Summary.from_json(h.summary)
    lines = [
        f"id:        {h.id}  (postfix {h.queue_id})",
        f"state:     {h.state.value}  gate={h.gate}  on_timeout={h.on_timeout}",
        f"created:   {h.created.astimezone().isoformat(timespec='seconds')}",
        f"due:       {h.due.astimezone().isoformat(timespec='seconds')}",
        f"from:      {h.mail_from or '<>'}",
        f"to:        {', '.join(h.rcpt_tos)}",
        f"subject:   {s.subject}",
        f"external:  {', '.join(r.label() for r in s.external) or '-'}",
        f"internal:  {', '.join(r.label() for r in s.internal) or '-'}",
        f"rules:     {', '.join(h.decision.get('rules', [])) or '-'}",
        f"size:      {h.size} bytes   attempts: {h.attempts}   last reply: {h.last_reply or '-'}",
    ]
    for f in s.findings:
        lines.append(f"finding:   {f.code}: {f.en}")
    for att in s.attachments:
        lines.append(f"attached:  {att.name} ({att.size} bytes)")
    lines.append("audit:")
    for a in audit:
        lines.append(f"  {a['at']}  {a['from'] or '-':>10} → {a['to']:10}  {a['by']}  {a['why']}")
    return "\n".join(lines)


async def _run(args: argparse.Namespace, path: str) -> int:
    # No migrations from the CLI: a store older than this MailGuard says so (store migrate).
    async with make_store(path, pool_size=2, migrate=False) as store:
        cmd = args.queue_command
        if cmd == "list":
            state = State(args.state) if args.state else None
            since = _since(args.since)
            page = await store.list_messages(
                state=state, sender=args.sender, since=since, before=args.before, limit=args.limit
            )
            # the same filters, counted: the line below says how much the page is of
            total = await store.count(state, sender=args.sender, since=since)
            if args.json:
                out: dict[str, object] = {
                    "items": [h.to_json() for h in page.items],
                    "next": page.next,
                    "total": total,
                }
                print(json.dumps(out, ensure_ascii=False, indent=2))
            else:
                print(_table(page.items))
                print(_count_line(args, len(page.items), total, page.next))
            return _EXIT_OK
        if cmd == "show":
            h = await store.get(args.id)
            if h is None:
                print(f"mailguard queue: no message {args.id}", file=sys.stderr)
                return _EXIT_FAIL
            audit = [a.to_json() for a in await store.audit(args.id)]
            if args.json:
                out = {
                    **h.to_json(),
                    "summary": dict(h.summary),
                    "decision": dict(h.decision),
                    "audit": audit,
                }
                print(json.dumps(out, ensure_ascii=False, indent=2))
            else:
                print(_show(h, audit))
            return _EXIT_OK
        service = HoldService(store)
        by = f"cli:{getpass.getuser()}"
        try:
            if cmd == "release":
                h = await service.release(args.id, by=by, why=args.why or "released from CLI")
            else:
                h = await service.cancel(args.id, by=by, why=args.why or "cancelled from CLI")
        except TransitionError as e:
            what = "no such message" if e.current is None else f"it is {e.current.value}"
            print(f"mailguard queue: cannot {cmd} {args.id}: {what}", file=sys.stderr)
            return _EXIT_FAIL
        if args.json:
            print(json.dumps(h.to_json(), ensure_ascii=False, indent=2))
        else:
            print(f"{h.id}: {h.state.value}")
        return _EXIT_OK


def main(args: argparse.Namespace) -> int:
    if not getattr(args, "queue_command", None):
        args.queue_parser.print_help(sys.stderr)
        return _EXIT_USAGE
    try:
        path = _store_path(args)
    except ConfigError as e:
        print(f"mailguard queue: {e}", file=sys.stderr)
        return _EXIT_USAGE
    if not is_url(path) and not Path(path).exists():
        print(f"mailguard queue: no store at {path} (nothing was ever held?)", file=sys.stderr)
        return _EXIT_FAIL
    try:
        return asyncio.run(_run(args, path))
    except (StoreError, ValueError) as e:
        print(f"mailguard queue: {e}", file=sys.stderr)
        return _EXIT_FAIL
