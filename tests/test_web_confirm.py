"""Confirm pages and admin API over real HTTP (aiohttp TestServer) on a real store and sink."""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from aiohttp.test_utils import TestClient, TestServer

from mailguard.policy.decision import Gate
from mailguard.queue.store import State
from mailguard.web.app import RedactingAccessLogger, make_app
from tests._queue_support import (
    RAW,
    RCPTS,
    SECRET,
    SENDER,
    SUMMARY,
    Rig,
    Sink,
    close,
    decision,
    envelope,
    link_of,
    rig,
    serve,
    stop,
)

ADMIN = "admin-token-for-tests-0123456789"
SCANNER = {
    "User-Agent": "Mozilla/5.0 (compatible; SafeLinks-Scanner/1.0; +https://example.net/bot)",
    "Accept": "text/html,application/xhtml+xml,*/*;q=0.8",
    "Sec-Purpose": "prefetch",
    "Purpose": "prefetch",
    "X-Moz": "prefetch",
}


@dataclass
class Web:
    r: Rig
    sink: Sink
    client: TestClient[Any, Any]
    woke: list[int]
    healthy: dict[str, bool]

    async def keep(self, gate: Gate, **kw: Any) -> tuple[str, dict[str, str]]:
        """Keep a message, send its notices; return (id, {kind or role: link path})."""
        reply = await self.r.service.keep(envelope(), RAW, decision(gate, **kw), SUMMARY)
        assert reply.code == 250
        before = len(self.sink.got)
        await self.r.scheduler.tick()
        links = {}
        for *_, raw in self.sink.got[before:]:
            kind = re.search(rb"X-MailGuard-Notice: ([a-z-]+);", raw)[1].decode()  # type: ignore[index]
            links[kind] = link_of(raw)
        return reply.text.split("held as ")[1].split()[0], links

    async def state(self, qid: str) -> State:
        h = await self.r.store.get(qid)
        assert h is not None
        return h.state


@pytest_asyncio.fixture
async def web(tmp_path: Path) -> AsyncIterator[Web]:
    sink = Sink()
    server, port = await serve(sink)
    r = await rig(tmp_path / "q.db", port)
    woke: list[int] = []
    healthy = {"up": True}

    async def upstream_check() -> bool:
        return healthy["up"]

    app = make_app(
        r.store,
        r.service,
        secret=SECRET,
        admin_token=ADMIN,
        public_url="http://guard.test",
        rate_limit=(5, 600.0),
        upstream_check=upstream_check,
        on_change=lambda: woke.append(1),
    )
    srv = TestServer(app)
    await srv.start_server(
        access_log_class=RedactingAccessLogger, access_log=logging.getLogger("mailguard.web.access")
    )
    client = TestClient(srv)
    await client.start_server()
    try:
        yield Web(r, sink, client, woke, healthy)
    finally:
        await client.close()
        await close(r)
        await stop(server)


def csrf(html: str, action: str) -> str:
    m = re.search(rf'name="csrf_{action}" value="([^"]+)"', html)
    assert m, f"no {action} button"
    return m[1]


@pytest.mark.asyncio
async def test_page_shows_what_is_about_to_happen(web: Web) -> None:
    _, links = await web.keep(Gate.CONFIRM)
    resp = await web.client.get(links["confirm"])
    assert resp.status == 200
    html = await resp.text()
    assert "月次報告" in html and "送信確認" in html
    ext = html.split('id="external"')[1].split("</ul>")[0]
    assert "a@partner.co.jp" in ext and "b@other.example.com" in ext and "c@example" not in ext
    assert "c@example.co.jp" in html.split('id="internal"')[1]
    assert SUMMARY["findings"][0]["reason_ja"] in html
    assert "顧客リスト.xlsx" in html and "47.1 KB" in html
    assert "body line 1" not in html  # never the content
    assert 'id="btn-send"' in html and 'id="btn-cancel"' in html
    assert "<script" not in html and "http://" not in html.split("<body>")[1].split("<footer>")[0]
    h = resp.headers
    assert h["Referrer-Policy"] == "no-referrer" and h["Cache-Control"] == "no-store"
    assert "noindex" in h["X-Robots-Tag"] and "default-src 'none'" in h["Content-Security-Policy"]
    en = await (
        await web.client.get(links["confirm"], headers={"Accept-Language": "en-US,en;q=0.9"})
    ).text()
    assert "Confirm your message" in en and "External recipients" in en
    assert SUMMARY["findings"][0]["reason_en"] in en
    switched = await (
        await web.client.get(links["confirm"] + "?lang=ja", headers={"Accept-Language": "en"})
    ).text()
    assert "送信確認" in switched


@pytest.mark.asyncio
async def test_get_head_options_and_scanners_never_change_state(web: Web) -> None:
    qid, links = await web.keep(
        Gate.HOLD, hold_for=timedelta(minutes=5), options={"allow_send_now": True}
    )
    url = links["held"]
    for _ in range(3):
        assert (await web.client.get(url, headers=SCANNER)).status == 200
    head = await web.client.head(url)
    assert head.status == 200 and (await head.read()) == b""
    assert (await web.client.options(url)).status == 405
    assert (await web.client.get(url + "?action=send")).status == 200
    assert await web.state(qid) is State.HELD
    await web.r.scheduler.tick()
    assert web.sink.originals() == []
    # the page is still usable by the real sender afterwards
    html = await (await web.client.get(url)).text()
    assert 'id="btn-send"' in html  # allow_send_now


@pytest.mark.asyncio
async def test_post_needs_a_valid_csrf_for_that_action(web: Web) -> None:
    qid, links = await web.keep(Gate.CONFIRM)
    url = links["confirm"]
    html = await (await web.client.get(url)).text()
    assert (await web.client.post(url, data={"action": "send"})).status == 403
    wrong = {"action": "send", "csrf_send": csrf(html, "cancel")}
    assert (await web.client.post(url, data=wrong)).status == 403
    forged = {"action": "send", "csrf_send": "1700000000.AAAA"}
    assert (await web.client.post(url, data=forged)).status == 403
    good = {"action": "send", "csrf_send": csrf(html, "send")}
    cross = await web.client.post(url, data=good, headers={"Origin": "https://evil.example"})
    assert cross.status == 403  # a form on another site
    assert await web.state(qid) is State.HELD


@pytest.mark.asyncio
async def test_send_releases_delivers_once_and_the_link_is_then_used(web: Web) -> None:
    qid, links = await web.keep(Gate.CONFIRM)
    url = links["confirm"]
    html = await (await web.client.get(url)).text()
    resp = await web.client.post(url, data={"action": "send", "csrf_send": csrf(html, "send")})
    assert resp.status == 200 and "送信しました" in await resp.text()
    assert await web.state(qid) is State.RELEASED and web.woke == [1]
    await web.r.scheduler.tick()
    assert web.sink.originals() == [(SENDER, RCPTS, RAW)]
    again = await web.client.get(url)
    assert again.status == 410 and "すでに使われています" in await again.text()
    post = await web.client.post(
        url, data={"action": "cancel", "csrf_cancel": csrf(html, "cancel")}
    )
    assert post.status == 410
    await web.r.scheduler.tick()
    assert len(web.sink.originals()) == 1
    audit = await web.r.store.audit(qid)
    assert audit[1].by == f"sender:{SENDER}" and audit[1].why == "sender confirmed"


@pytest.mark.asyncio
async def test_expired_token_is_refused(web: Web) -> None:
    qid, links = await web.keep(Gate.CONFIRM, hold_for=timedelta(hours=1))
    url = links["confirm"]
    html = await (await web.client.get(url)).text()
    web.r.clock.advance(hours=1)  # deadline passed, scheduler has not run yet
    resp = await web.client.get(url)
    assert resp.status == 410 and "有効期限" in await resp.text()
    post = await web.client.post(url, data={"action": "send", "csrf_send": csrf(html, "send")})
    assert post.status == 410
    assert await web.state(qid) is State.HELD


@pytest.mark.asyncio
async def test_unknown_tokens_404_then_rate_limited(web: Web) -> None:
    _, links = await web.keep(Gate.CONFIRM)
    for i in range(5):
        resp = await web.client.get(f"/m/GuessedToken{i:04d}abcdefghijklmnop")
        assert resp.status == 404
    limited = await web.client.get("/m/GuessedToken9999abcdefghijklmnop")
    assert limited.status == 429 and "Retry-After" in limited.headers
    # while limited, even a real token answers 429: guessing learns nothing
    assert (await web.client.get(links["confirm"])).status == 429
    assert (await web.client.get("/m/short")).status == 404  # not even a token shape


@pytest.mark.asyncio
async def test_approve_flow(web: Web) -> None:
    qid, links = await web.keep(Gate.APPROVE, approvers=("boss@example.co.jp",))
    assert set(links) == {"approval-request", "approval-pending"}
    req = next(g for g in web.sink.got if b"approval-request;" in g[2])
    assert req[1] == ["boss@example.co.jp"]
    sender_page = await (await web.client.get(links["approval-pending"])).text()
    assert 'id="btn-cancel"' in sender_page and 'id="btn-send"' not in sender_page
    page = await (await web.client.get(links["approval-request"])).text()
    assert 'id="btn-approve"' in page and 'id="btn-refuse"' in page and SENDER in page
    resp = await web.client.post(
        links["approval-request"],
        data={"action": "approve", "csrf_approve": csrf(page, "approve"), "reason": "OK です"},
    )
    assert resp.status == 200 and "承認しました" in await resp.text()
    assert await web.state(qid) is State.RELEASED
    # the sender's own link now says it was decided
    assert (await web.client.get(links["approval-pending"])).status == 410
    await web.r.scheduler.tick()
    assert web.sink.originals() == [(SENDER, RCPTS, RAW)]
    (out,) = web.sink.of_kind("outcome")
    assert out[0] == "<>" and out[1] == [SENDER]
    audit = await web.r.store.audit(qid)
    assert audit[1].by == "approver:boss@example.co.jp" and audit[1].why == "approved: OK です"


@pytest.mark.asyncio
async def test_refuse_tells_the_sender_why_and_never_sends(web: Web) -> None:
    import email
    import email.policy

    qid, links = await web.keep(Gate.APPROVE, approvers=("boss@example.co.jp",))
    page = await (await web.client.get(links["approval-request"] + "?lang=en")).text()
    resp = await web.client.post(
        links["approval-request"],
        data={
            "action": "refuse",
            "csrf_refuse": csrf(page, "refuse"),
            "lang": "en",
            "reason": "Wrong customer in Cc",
        },
    )
    assert resp.status == 200 and "Refused" in await resp.text()
    await web.r.scheduler.tick()
    assert await web.state(qid) is State.CANCELLED and web.sink.originals() == []
    (out,) = web.sink.of_kind("outcome")
    msg = email.message_from_bytes(out[2], policy=email.policy.default)
    body = msg.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    assert "却下されました" in body and "Wrong customer in Cc" in body


@pytest.mark.asyncio
async def test_admin_api(web: Web) -> None:
    qid, _ = await web.keep(Gate.CONFIRM)
    web.r.clock.advance(seconds=1)  # ids sort by creation time
    qid2, _ = await web.keep(Gate.HOLD)
    c = web.client
    assert (await c.get("/api/messages")).status == 401
    bad = await c.get("/api/messages", headers={"Authorization": "Bearer nope"})
    assert bad.status == 401
    auth = {"Authorization": f"Bearer {ADMIN}"}
    data = await (await c.get("/api/messages?state=held&limit=1", headers=auth)).json()
    assert [i["id"] for i in data["items"]] == [qid2] and data["next"] == qid2
    data = await (await c.get(f"/api/messages?state=held&before={qid2}", headers=auth)).json()
    assert [i["id"] for i in data["items"]] == [qid]
    data = await (await c.get(f"/api/messages?sender={SENDER}", headers=auth)).json()
    assert len(data["items"]) == 2
    assert (await c.get("/api/messages?state=bogus", headers=auth)).status == 400
    show = await (await c.get(f"/api/messages/{qid}", headers=auth)).json()
    assert show["message"]["subject"] == "月次報告" and show["audit"][0]["to"] == "held"
    assert show["notices"][0]["kind"] == "confirm" and "data" not in show["notices"][0]
    rel = await c.post(f"/api/messages/{qid}/release", json={"why": "checked"}, headers=auth)
    assert rel.status == 200 and (await rel.json())["state"] == "released"
    assert (await c.post(f"/api/messages/{qid}/release", headers=auth)).status == 409
    assert (await c.post("/api/messages/NOPE/cancel", headers=auth)).status == 404
    can = await c.post(f"/api/messages/{qid2}/cancel", headers=auth)
    assert can.status == 200 and (await can.json())["state"] == "cancelled"
    await web.r.scheduler.tick()
    assert web.sink.originals() == [(SENDER, RCPTS, RAW)]
    assert len(web.sink.of_kind("outcome")) == 1  # the sender hears about the admin cancel


@pytest.mark.asyncio
async def test_admin_api_disabled_without_token(tmp_path: Path) -> None:
    sink = Sink()
    server, port = await serve(sink)
    r = await rig(tmp_path / "q.db", port)
    app = make_app(r.store, r.service, secret=SECRET, admin_token="")
    async with TestClient(TestServer(app)) as c:
        resp = await c.get("/api/messages", headers={"Authorization": "Bearer "})
        assert resp.status == 403
    await close(r)
    await stop(server)


@pytest.mark.asyncio
async def test_healthz(web: Web) -> None:
    ok = await web.client.get("/healthz")
    assert ok.status == 200 and (await ok.json()) == {"ok": True, "store": True, "upstream": True}
    web.healthy["up"] = False
    down = await web.client.get("/healthz")
    assert down.status == 503 and (await down.json())["upstream"] is False
    web.healthy["up"] = True
    await web.r.store.close()
    gone = await web.client.get("/healthz")
    assert gone.status == 503 and (await gone.json())["store"] is False
    page = await web.client.get("/m/AnyTokenWhileTheStoreIsDown0123")
    assert page.status == 503 and page.headers["Cache-Control"] == "no-store"
    await web.r.store.open()


@pytest.mark.asyncio
async def test_tokens_never_reach_the_logs(web: Web, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    _, links = await web.keep(Gate.CONFIRM)
    token = links["confirm"].removeprefix("/m/")
    html = await (await web.client.get(links["confirm"])).text()
    await web.client.post(
        links["confirm"], data={"action": "send", "csrf_send": csrf(html, "send")}
    )
    await web.client.get(links["confirm"])
    assert "/m/…" in caplog.text
    assert token not in caplog.text
