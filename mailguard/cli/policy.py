"""`mailguard policy check FILE...` (validate policy files) and `mailguard policy codes`."""

from __future__ import annotations

import argparse
import sys
from typing import TextIO

from mailguard.errors import ConfigError
from mailguard.policy import KNOWN_CODES, Gate, Policy, format_duration, load_policy
from mailguard.policy.lint import uninspected_gaps


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "policy",
        help="check policy files, list finding codes",
        description="Policy file tools (ポリシーファイルの検証).",
    )
    sub = p.add_subparsers(dest="policy_command", metavar="SUBCOMMAND")
    c = sub.add_parser(
        "check",
        help="validate policy files (exit 0 = usable, 2 = refused)",
        description="Validate policy files: print a summary of the rules, or the first error "
        "as FILE:LINE: KEY: what is wrong (exit 2). Warnings (FILE:LINE: warning: CODE: ...) "
        "name uninspected mail a usable policy lets pass to external recipients (exit 0).",
    )
    c.add_argument("files", nargs="+", metavar="FILE")
    c.add_argument("-q", "--quiet", action="store_true", help="print only errors")
    c.set_defaults(func=run_check)
    codes = sub.add_parser("codes", help="list the finding codes `when` may name")
    codes.set_defaults(func=run_codes)

    def usage(_args: argparse.Namespace) -> int:
        p.print_help(sys.stderr)
        return 2

    p.set_defaults(func=usage)


def run_check(args: argparse.Namespace) -> int:
    rc = 0
    for path in args.files:
        try:
            policy = load_policy(path)
        except ConfigError as e:
            print(f"mailguard: {e}", file=sys.stderr)
            rc = 2
            continue
        if not args.quiet:
            print_summary(policy, sys.stdout)
        for w in uninspected_gaps(policy):  # usable, but lets uninspected mail out: exit 0
            print(f"mailguard: {w}", file=sys.stderr)
    return rc


def print_summary(policy: Policy, out: TextIO) -> None:
    org = policy.org
    n = len(policy.rules)
    print(
        f"{policy.source}: OK: {n} rule{'s' if n != 1 else ''}, "
        f"{len(org.internal)} internal / {len(org.trusted)} trusted / "
        f"{len(org.freemail)} extra free-mail domain patterns",
        file=out,
    )
    if not org.internal:
        print("  warning: no internal_domains: every recipient counts as external", file=out)
    width = max((len(r.name) for r in policy.rules), default=0)
    d = policy.defaults
    for r in policy.rules:
        when = " | ".join(" and ".join(str(c) for c in clause) for clause in r.when)
        extra = []
        if r.gate is Gate.HOLD:
            extra.append(f"for {format_duration(r.hold_for or d.hold_for)}")
        if r.gate in (Gate.CONFIRM, Gate.APPROVE):
            extra.append(f"within {format_duration(r.confirm_timeout or d.confirm_timeout)}")
        if r.gate is Gate.APPROVE:
            extra.append("by " + ", ".join(r.approvers or d.approvers))
        if r.senders:
            extra.append("senders " + ", ".join(r.senders))
        if r.except_senders:
            extra.append("except " + ", ".join(r.except_senders))
        tail = f"  ({'; '.join(extra)})" if extra else ""
        print(f"  {r.name:<{width}}  {when} -> {'+'.join(r.actions)}{tail}", file=out)


def run_codes(_args: argparse.Namespace) -> int:
    for code, unit in KNOWN_CODES.items():
        print(f"{code:<28} count = {unit}")
    return 0
