"""`mailguard history import|list`: teach the guard past deliveries, show what it knows.

    mailguard history import [--store PATH | -c CONFIG] (--postfix-log FILE | --mbox FILE)...
    mailguard history list   [--store PATH | -c CONFIG] [--min N] [--json]

Imports are idempotent (see mailguard.history): running one twice counts nothing twice.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from mailguard.errors import ConfigError

if TYPE_CHECKING:
    from mailguard.history import DomainHistory

DEFAULT_STORE = Path("var/mailguard.db")


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "history",
        help="import or list the delivery history (first-time / look-alike domains)",
        description="Delivery history (送信履歴): which domains the organisation has written to. "
        "Import it from a Postfix mail log or an mbox of sent mail so that day one is not all "
        "'first-time'.",
    )
    sub = p.add_subparsers(dest="history_command", metavar="SUBCOMMAND")

    def store_args(sp: argparse.ArgumentParser) -> None:
        g = sp.add_mutually_exclusive_group()
        g.add_argument(
            "--store", type=Path, help=f"SQLite file (default: {DEFAULT_STORE}, or the config's)"
        )
        g.add_argument("-c", "--config", type=Path, help="service config file (uses store.path)")

    imp = sub.add_parser(
        "import",
        help="learn domains from a Postfix log or an mbox",
        description="Learn recipient domains from Postfix `status=sent` log lines (remote "
        "deliveries only) or from the To/Cc/Bcc of an mbox of sent mail. Idempotent.",
    )
    store_args(imp)
    imp.add_argument(
        "--postfix-log",
        action="append",
        type=Path,
        default=[],
        metavar="FILE",
        help="Postfix mail log (maillog, mail.log, .gz accepted); repeatable",
    )
    imp.add_argument(
        "--mbox", action="append", type=Path, default=[], metavar="FILE", help="mbox; repeatable"
    )
    imp.set_defaults(func=run_import)

    ls = sub.add_parser("list", help="list known domains, most used first")
    store_args(ls)
    ls.add_argument("--min", type=int, default=1, metavar="N", help="only domains seen N+ times")
    ls.add_argument("--json", action="store_true", help="JSON Lines output")
    ls.set_defaults(func=run_list)

    def usage(_args: argparse.Namespace) -> int:
        p.print_help(sys.stderr)
        return 2

    p.set_defaults(func=usage)


def store_path(args: argparse.Namespace) -> Path:
    """--store, else the config file's store.path, else ./var/mailguard.db."""
    if args.store is not None:
        return Path(args.store)
    if args.config is not None:
        from mailguard import config

        return Path(config.load(args.config).store.path)
    return DEFAULT_STORE


def _open(args: argparse.Namespace) -> DomainHistory:
    from mailguard.history import DomainHistory  # lazy: `mailguard --help` stays fast

    return DomainHistory(store_path(args))


def run_import(args: argparse.Namespace) -> int:
    sources = [("postfix-log", p) for p in args.postfix_log] + [("mbox", p) for p in args.mbox]
    if not sources:
        print("mailguard history import: give --postfix-log FILE or --mbox FILE", file=sys.stderr)
        return 2
    for _, path in sources:
        if not path.is_file():
            print(f"mailguard history import: {path}: no such file", file=sys.stderr)
            return 2
    try:
        hist = _open(args)
    except (ConfigError, OSError) as e:
        print(f"mailguard history import: {e}", file=sys.stderr)
        return 2
    with hist:
        for kind, path in sources:
            try:
                importer = hist.import_mbox if kind == "mbox" else hist.import_postfix_log
                res = importer(path)
            except (OSError, UnicodeError) as e:
                print(f"mailguard history import: {path}: {e}", file=sys.stderr)
                return 2
            print(
                f"{path}: {res.messages} new deliveries, {len(res.domains)} domains, "
                f"{res.skipped} skipped (already imported or not outbound)"
            )
    return 0


def run_list(args: argparse.Namespace) -> int:
    path = store_path(args)
    if not path.exists():
        print(f"mailguard history list: {path}: no store yet", file=sys.stderr)
        return 2
    with _open(args) as hist:
        rows = hist.rows(args.min)
    out = sys.stdout
    if args.json:
        for d, n, first, last in rows:
            out.write(
                json.dumps({"domain": d, "count": n, "first_seen": first, "last_seen": last}) + "\n"
            )
        return 0
    if not rows:
        print("(no domains)")
        return 0
    width = max(len(r[0]) for r in rows)
    print(f"{'COUNT':>7}  {'DOMAIN':<{width}}  FIRST SEEN                 LAST SEEN")
    for d, n, first, last in rows:
        print(f"{n:>7}  {d:<{width}}  {first:<25}  {last}")
    return 0
