"""Command line: `mailguard serve|check|policy|queue|history`.

Each sub-command lives in its own module with `register(subparsers)`; the handler it sets with
`set_defaults(func=...)` returns the process exit code.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from types import ModuleType

from mailguard import __version__

# command → its module (mailguard.cli.<name>), in the order `--help` lists them
COMMANDS = ("serve", "check", "policy", "queue", "store", "history", "demo")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser; `only` = just that command's module is imported (start-up time: `check`
    pulls in the whole pipeline, `mailguard queue list` should not wait for it)."""
    parser = argparse.ArgumentParser(
        prog="mailguard",
        description="Outbound mail mis-send guard (メール誤送信防止ゲートウェイ) for Postfix.",
    )
    parser.add_argument("--version", action="version", version=f"mailguard {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in (only,) if only in COMMANDS else COMMANDS:
        _module(name).register(sub)
    return parser


def _module(name: str) -> ModuleType:
    """The command's module, imported now (plain imports: every one is a known sibling)."""
    if name == "serve":
        from mailguard.cli import serve

        return serve
    if name == "check":
        from mailguard.cli import check

        return check
    if name == "policy":
        from mailguard.cli import policy

        return policy
    if name == "queue":
        from mailguard.cli import queue

        return queue
    if name == "store":
        from mailguard.cli import store

        return store
    if name == "history":
        from mailguard.cli import history

        return history
    from mailguard.cli import demo

    return demo


def main(argv: Sequence[str] | None = None) -> int:
    args_in = list(sys.argv[1:] if argv is None else argv)
    # the command named first (top-level options are only -h/--version): load only its module
    first = next((a for a in args_in if not a.startswith("-")), None)
    parser = build_parser(first)
    args = parser.parse_args(args_in)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    rc: int = args.func(args)
    return rc
