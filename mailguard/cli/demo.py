"""`mailguard demo`: the whole story on the embedded defaults, in one process, on loopback.

Starts a local SMTP sink (standing in for Postfix's reinjection port), the guard with the
shipped policy, a SQLite store and the web pages in a temp directory; sends a clean message
(passed through) and a risky one (held for confirmation), follows the confirm link the guard
mailed to the sender — a GET that changes nothing, then the POST "send" — and shows the message
arriving at the sink.
"""

from __future__ import annotations

import argparse
import asyncio
import email
import email.policy
import re
import tempfile
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SENDER = "yamada@example.co.jp"
CLEAN = (
    "From: 山田太郎 <yamada@example.co.jp>\r\n"
    "To: 佐藤花子 <sato@example.co.jp>\r\n"
    "Subject: 社内連絡 / internal note\r\n"
    "Message-ID: <demo-1@example.co.jp>\r\n"
    "MIME-Version: 1.0\r\n"
    "Content-Type: text/plain; charset=utf-8\r\n\r\n"
    "明日の会議は10時からです。\r\n"
)
RISKY = (
    "From: 山田太郎 <yamada@example.co.jp>\r\n"
    "To: 取引先A <tanaka@client-a.co.jp>, 取引先B <suzuki@client-b.co.jp>\r\n"
    "Subject: 新製品のご案内 / product news\r\n"
    "Message-ID: <demo-2@example.co.jp>\r\n"
    "MIME-Version: 1.0\r\n"
    "Content-Type: text/plain; charset=utf-8\r\n\r\n"
    "各位\r\n新製品のご案内です。\r\n"
)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "demo",
        help="show a message passed, held, confirmed and delivered (local sink, temp store)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--interactive",
        action="store_true",
        help="do not click: print the confirm link and wait until you press send in a browser",
    )
    p.add_argument("--web", default="127.0.0.1:0", metavar="HOST:PORT", help="web address")
    p.add_argument("--dir", metavar="DIR", help="keep the store here instead of a temp dir")
    p.set_defaults(func=run)


@dataclass
class _Sink:
    got: list[tuple[str, list[str], bytes]] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.got.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.original_content))
        self.arrived.set()
        return "250 2.0.0 Ok: queued by demo sink"

    async def wait(self, pred: Any, within: float = 15.0) -> tuple[str, list[str], bytes]:
        async with asyncio.timeout(within):
            while True:
                for item in self.got:
                    if pred(item):
                        return item
                self.arrived.clear()
                await self.arrived.wait()


def say(ja: str, en: str) -> None:
    print(f"» {ja}\n  {en}", flush=True)


def run(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(_demo(args))
    except KeyboardInterrupt:
        return 130
    except TimeoutError:
        print("demo: timed out waiting for the guard (see the log lines above)")
        return 1


async def _demo(args: argparse.Namespace) -> int:
    import logging

    import aiohttp
    import aiosmtplib
    from aiosmtpd.smtp import SMTP

    from mailguard.app import build_server
    from mailguard.config import (
        Config,
        SmtpConfig,
        StoreConfig,
        UpstreamConfig,
        WebConfig,
        parse_hostport,
    )

    logging.basicConfig(level=logging.WARNING, format="   [%(name)s] %(message)s")
    workdir = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="mailguard-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    loop = asyncio.get_running_loop()
    sink = _Sink()
    sink_server = await loop.create_server(
        lambda: SMTP(sink, hostname="sink.demo", enable_SMTPUTF8=True), "127.0.0.1", 0
    )
    sink_port = sink_server.sockets[0].getsockname()[1]
    web_host, web_port = parse_hostport(args.web)
    if web_port == 0:
        import socket

        with socket.socket() as s:
            s.bind((web_host, 0))
            web_port = s.getsockname()[1]
    cfg = Config(
        smtp=SmtpConfig(listen=("127.0.0.1", 0), hostname="mailguard.demo"),
        upstream=UpstreamConfig(address=("127.0.0.1", sink_port)),
        store=StoreConfig(path=workdir / "mailguard.db"),
        web=WebConfig(listen=(web_host, web_port), secret="demo-" + workdir.name),
    )
    server = build_server(cfg, lambda: cfg)
    await server.start()
    say(
        f"MailGuard を起動しました: SMTP 127.0.0.1:{server.port} → シンク 127.0.0.1:{sink_port}",
        f"MailGuard started: SMTP 127.0.0.1:{server.port} -> sink 127.0.0.1:{sink_port}, "
        f"web http://{web_host}:{web_port}, store {cfg.store.path}",
    )
    try:
        # 1. a clean internal message goes straight through, byte for byte
        _, reply = await aiosmtplib.send(
            CLEAN.encode(), sender=SENDER, recipients=["sato@example.co.jp"],
            hostname="127.0.0.1", port=server.port,
        )  # fmt: skip
        got = await sink.wait(lambda g: b"demo-1@" in g[2])
        same = got[2] == CLEAN.encode()
        say(
            f"社内宛のメール: 即時配送 ({reply.strip()})、内容は無変更: {same}",
            f"Internal message: relayed at once ({reply.strip()}), bytes unchanged: {same}",
        )
        # 2. two companies visible in To: the default policy asks the sender to confirm
        rcpts = ["tanaka@client-a.co.jp", "suzuki@client-b.co.jp"]
        _, reply = await aiosmtplib.send(
            RISKY.encode(), sender=SENDER, recipients=rcpts, hostname="127.0.0.1",
            port=server.port,
        )  # fmt: skip
        say(
            f"複数の社外組織が To に見えるメール: 保留 → {reply.strip()}",
            f"Two outside companies visible in To: held -> {reply.strip()}",
        )
        notice = await sink.wait(lambda g: g[1] == [SENDER] and b"X-MailGuard-Notice" in g[2])
        msg = email.message_from_bytes(notice[2], policy=email.policy.default)
        body = msg.get_body(("plain",))
        text = body.get_content() if body is not None else ""
        link = re.search(r"https?://\S+/m/[A-Za-z0-9_\-]+", text)
        assert link, "no confirm link in the notice"
        url = link.group(0)
        say(
            f"送信者に確認メールが届きました (件名: {msg['Subject']})\n  確認リンク: {url}",
            f"The sender got a confirmation mail; confirm link: {url}",
        )
        if args.interactive:
            say(
                "ブラウザでリンクを開き「送信」を押してください (Ctrl-C で終了)",
                "Open the link in a browser and press send (Ctrl-C to stop)",
            )
            got = await sink.wait(lambda g: b"demo-2@" in g[2], within=3600)
        else:
            async with aiohttp.ClientSession() as http:
                async with http.get(url, headers={"Accept-Language": "ja"}) as r:
                    page = await r.text()
                held = not any(b"demo-2@" in g[2] for g in sink.got)
                say(
                    f"リンクを GET (リンクスキャナと同じ): HTTP {r.status}、まだ保留中: {held}",
                    f"GET on the link (as a link scanner would): HTTP {r.status}, "
                    f"still held: {held}",
                )
                ext = page.partition('id="external"')[2].partition("</div>")[0]
                orgs = re.findall(r'<h3 class="org">([^<]+)', ext)
                shown = [a for a in rcpts if a in ext]
                say(
                    f"確認ページの社外の宛先: {', '.join(shown)} (組織: {', '.join(orgs)})",
                    f"The page lists the external recipients {', '.join(shown)} "
                    f"by organisation ({', '.join(orgs)})",
                )
                assert shown == rcpts, "the confirm page must list every external recipient"
                await asyncio.sleep(cfg.web.min_dwell + 1)  # a person reads before clicking
                form = dict(re.findall(r'name="(csrf_send|lang)" value="([^"]*)"', page))
                form["action"] = "send"
                async with http.post(url, data=urllib.parse.urlencode(form), headers={
                    "Content-Type": "application/x-www-form-urlencoded",
                    "Origin": url.split("/m/")[0],
                }) as r:  # fmt: skip
                    status = r.status
                say(
                    f"「送信」ボタンを POST: HTTP {status}",
                    f"POST of the send button: HTTP {status}",
                )
            got = await sink.wait(lambda g: b"demo-2@" in g[2])
        say(
            f"保留していたメールが配送されました: 宛先 {', '.join(got[1])}",
            f"The held message was delivered to {', '.join(got[1])}",
        )
        print(f"\nqueue: mailguard queue list --store {cfg.store.path}")
        return 0
    finally:
        await server.stop(grace=2)
        sink_server.close()
