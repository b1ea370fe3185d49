"""Command line: `mailguard serve|check|policy|queue|history`.

Each sub-command lives in its own module with `register(subparsers)`; the handler it sets with
`set_defaults(func=...)` returns the process exit code.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from mailguard import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mailguard",
        description="Outbound mail mis-send guard (メール誤送信防止ゲートウェイ) for Postfix.",
    )
    parser.add_argument("--version", action="version", version=f"mailguard {__version__}")
    from mailguard.cli import check, demo, history, policy, queue, serve, store

    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for mod in (serve, check, policy, queue, store, history, demo):  # the order `--help` lists
        mod.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    rc: int = args.func(args)
    return rc


if __name__ == "__main__":
    sys.exit(main())
