"""`mailguard serve`: run the guard (SMTP front, relay, queue, web) until SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import secrets
import signal
import sys
import time
from dataclasses import replace
from pathlib import Path

from mailguard.config import Config, load, parse_hostport
from mailguard.errors import ConfigError

log = logging.getLogger("mailguard.cli")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "serve",
        help="run the guard: SMTP in (from Postfix), checks, relay/hold out",
        description="Run MailGuard until SIGTERM (SIGHUP reloads config and policy).",
    )
    p.add_argument("-c", "--config", metavar="FILE", help="service config (TOML)")
    p.add_argument("--listen", metavar="HOST:PORT", help="SMTP listen address [127.0.0.1:10025]")
    p.add_argument("--upstream", metavar="HOST:PORT", help="upstream MTA [127.0.0.1:10026]")
    p.add_argument("--policy", metavar="FILE", help="policy file [policies/default.toml]")
    p.add_argument(
        "--milter",
        metavar="HOST:PORT",
        help="also take mail from Postfix's smtpd_milters here ([milter] listen) [off]",
    )
    p.add_argument(
        "--store",
        metavar="PATH|URL",
        help="queue/history SQLite file [var/mailguard.db], or postgresql://… shared by several "
        "guards",
    )
    p.add_argument("--web", metavar="HOST:PORT", help="web pages, API, /metrics [127.0.0.1:8025]")
    p.add_argument("--no-web", action="store_true", help="do not start the web side")
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="SMTP worker processes sharing the port with SO_REUSEPORT [1]",
    )
    p.add_argument("--grace", type=float, default=30.0, help="seconds to finish on SIGTERM [30]")
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
    p.add_argument("--log-json", action="store_true", help="one JSON object per log line")
    p.set_defaults(func=run)


def apply_overrides(cfg: Config, args: argparse.Namespace) -> Config:
    """Command-line flags win over the file; errors name the flag."""
    try:
        if args.listen:
            cfg = replace(cfg, smtp=replace(cfg.smtp, listen=parse_hostport(args.listen)))
        if getattr(args, "milter", None):
            cfg = replace(cfg, milter=replace(cfg.milter, listen=parse_hostport(args.milter)))
        if args.upstream:
            up = parse_hostport(args.upstream)
            cfg = replace(cfg, upstream=replace(cfg.upstream, address=up))
        if getattr(args, "web", None):
            cfg = replace(cfg, web=replace(cfg.web, listen=parse_hostport(args.web)))
    except ValueError as e:
        raise ConfigError(str(e), key="command line") from None
    if getattr(args, "no_web", False):
        cfg = replace(cfg, web=replace(cfg.web, enabled=False))
    if getattr(args, "policy", None):
        cfg = replace(cfg, policy=replace(cfg.policy, file=args.policy))
    if getattr(args, "store", None):
        if str(args.store).startswith(("postgresql://", "postgres://")):
            cfg = replace(cfg, store=replace(cfg.store, url=str(args.store)))
        else:
            cfg = replace(cfg, store=replace(cfg.store, path=Path(args.store), url=""))
    if getattr(args, "log_level", None):
        cfg = replace(cfg, log=replace(cfg.log, level=args.log_level))
    if getattr(args, "log_json", False):
        cfg = replace(cfg, log=replace(cfg.log, json=True))
    return cfg


def load_all(args: argparse.Namespace) -> Config:
    cfg = apply_overrides(load(args.config), args)
    if not cfg.web.secret:
        # One random key per start, shared by all workers (drawn before forking): CSRF values
        # and notice seals then agree across processes; confirm links survive no restart only
        # for their POST form, the token itself stays valid.
        cfg = replace(cfg, web=replace(cfg.web, secret=_SECRET))
    return cfg


_SECRET = secrets.token_hex(32)


def _setup_logging(cfg: Config) -> None:
    # aiosmtpd logs every command at INFO under "mail.log": only useful when debugging
    if cfg.log.level != "debug":
        logging.getLogger("mail.log").setLevel(logging.WARNING)
    _setup_root(cfg)


def _setup_root(cfg: Config) -> None:
    try:
        from mailguard.logfmt import setup_logging
    except ImportError:
        logging.basicConfig(
            level=cfg.log.level.upper(),
            format="%(asctime)s %(name)s %(levelname)s %(message)s",
            stream=sys.stderr,
        )
        return
    setup_logging(cfg.log.level, cfg.log.json)


def run(args: argparse.Namespace) -> int:
    from mailguard.app import build_server

    try:
        cfg = load_all(args)
        # validate the policy before forking or binding anything
        build_server(cfg, lambda: load_all(args))
    except ConfigError as e:
        print(f"mailguard: {e}", file=sys.stderr)
        return 2
    _setup_logging(cfg)
    if args.workers < 1:
        print("mailguard: --workers must be at least 1", file=sys.stderr)
        return 2
    if args.workers == 1:
        return _run_one(cfg, args, worker=0)
    return _supervise(cfg, args)


def _run_one(cfg: Config, args: argparse.Namespace, *, worker: int) -> int:
    from mailguard.app import build_server

    async def main() -> int:
        import gc

        from mailguard.metrics import Metrics

        # A message allocates thousands of short-lived objects: collect young ones less often.
        gc.set_threshold(20000, 20, 20)

        server = build_server(
            cfg,
            lambda: load_all(args),
            worker=worker,
            reuse_port=args.workers > 1,
            metrics=Metrics(),
        )
        try:
            return await server.run(grace=args.grace)
        except OSError as e:
            log.error("cannot start: %s", e)
            return 1

    try:
        return asyncio.run(main())
    except KeyboardInterrupt:
        return 0


def _supervise(cfg: Config, args: argparse.Namespace) -> int:
    """Pre-fork N workers, each with its own SO_REUSEPORT socket; restart any that dies."""
    children: dict[int, int] = {}  # pid -> worker index
    stopping = False

    def spawn(i: int) -> None:
        pid = os.fork()
        if pid == 0:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGHUP, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent forwards SIGTERM
            code = 1
            try:
                code = _run_one(cfg, args, worker=i)
            finally:
                os._exit(code)
        children[pid] = i

    def forward(sig: int, _frame: object) -> None:
        nonlocal stopping
        if sig in (signal.SIGTERM, signal.SIGINT):
            stopping = True
            sig = signal.SIGTERM
        for pid in list(children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    from mailguard.metrics import mark_process_dead, prepare_multiproc_dir

    # prometheus_client multi-process mode: worker 0 serves /metrics for all of them
    mp_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or str(cfg.store.path.parent / "metrics")
    prepare_multiproc_dir(mp_dir)
    for i in range(args.workers):
        spawn(i)
    log.info("started %d workers: %s", args.workers, sorted(children))
    failures: list[float] = []
    worst = 0
    while children:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        except InterruptedError:
            continue
        if pid not in children:
            continue
        i = children.pop(pid)
        mark_process_dead(pid)
        code = os.waitstatus_to_exitcode(status)
        if stopping:
            worst = max(worst, code if code > 0 else 0)
            continue
        log.error("worker %d (pid %d) exited with %d; restarting", i, pid, code)
        now = time.monotonic()
        failures = [t for t in failures if now - t < 60] + [now]
        if len(failures) > 10:
            log.error("workers keep dying; giving up")
            stopping = True
            forward(signal.SIGTERM, None)
            worst = 1
            continue
        spawn(i)
    return worst
