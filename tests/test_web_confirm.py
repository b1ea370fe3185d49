"""Confirm pages and admin API over real HTTP (aiohttp TestServer) on a real store and sink.

The stored summary is the one a real message produces (tests/test_notify_render.py's
`_summary_of`, through the analysis), never a hand-written dict.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from aiohttp.test_utils import TestClient, TestServer

from mailguard.gate import Gate
from mailguard.metrics import Metrics
from mailguard.notify import human_size
from mailguard.queue.service import KeepRequest
from mailguard.queue.store import State, new_id
from mailguard.web.app import WEB_KEY, RedactingAccessLogger, make_app
from tests._queue_support import SECRET, Rig, Sink, close, link_of, rig, serve, stop
from tests.test_notify_render import POLICY, RAW, RCPTS, SENDER, _summary_of, envelope, make_raw

ADMIN = "admin-token-for-tests-0123456789"
SCANNER = {
    "User-Agent": "Mozilla/5.0 (compatible; SafeLinks-Scanner/1.0; +https://example.net/bot)",
    "Accept": "text/html,application/xhtml+xml,*/*;q=0.8",
    "Sec-Purpose": "prefetch",
    "Purpose": "prefetch",
    "X-Moz": "prefetch",
}


SUMMARY = _summary_of(RAW, envelope(), POLICY)
LINKED = ("held", "confirm", "approval-request", "approval-pending")  # notices with a link


def keep_request(gate: Gate, summary: dict[str, object] | None = None, **kw: Any) -> KeepRequest:
    return KeepRequest(
        id=new_id(),
        gate=gate,
        summary=summary or SUMMARY.to_json(),
        decision={"action": gate.label, "rules": list(SUMMARY.rules)},
        why=",".join(SUMMARY.rules),
        **kw,
    )


@dataclass
class Web:
    r: Rig
    sink: Sink
    client: TestClient[Any, Any]
    woke: list[int]
    healthy: dict[str, bool]
    metrics: Metrics

    async def keep(
        self, gate: Gate, raw: bytes = RAW, summary: dict[str, object] | None = None, **kw: Any
    ) -> tuple[str, dict[str, str]]:
        """Keep a message, send its notices; return (id, {kind or role: link path})."""
        req = keep_request(gate, summary, **kw)
        reply = await self.r.service.keep(envelope(), raw, req)
        assert reply.code == 250, reply
        before = len(self.sink.got)
        await self.r.scheduler.tick()
        links = {}
        for *_, raw in self.sink.got[before:]:  # also: earlier mail delivered, outcomes
            found = re.search(rb"X-MailGuard-Notice: ([a-z-]+);", raw)
            if found and found[1].decode() in LINKED:
                links[found[1].decode()] = link_of(raw)
        return req.id, links

    def posts(self, outcome: str) -> float:
        v = self.metrics.registry.get_sample_value(
            "mailguard_confirm_posts_total", {"outcome": outcome}
        )
        return v or 0.0

    def decided(self, kind: str) -> tuple[float, float]:
        """(count, sum of seconds) of mailguard_human_decision_seconds{kind}."""
        reg = self.metrics.registry
        n = reg.get_sample_value("mailguard_human_decision_seconds_count", {"kind": kind})
        total = reg.get_sample_value("mailguard_human_decision_seconds_sum", {"kind": kind})
        return n or 0.0, total or 0.0

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
    metrics = Metrics()

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
        metrics=metrics,
    )
    srv = TestServer(app)
    await srv.start_server(
        access_log_class=RedactingAccessLogger, access_log=logging.getLogger("mailguard.web.access")
    )
    client = TestClient(srv)
    await client.start_server()
    try:
        yield Web(r, sink, client, woke, healthy, metrics)
    finally:
        await client.close()
        await close(r)
        await stop(server)


def csrf(html: str, action: str) -> str:
    m = re.search(rf'name="csrf_{action}" value="([^"]+)"', html)
    assert m, f"no {action} button"
    return m[1]


def between(html: str, start: str, end: str) -> str:
    assert start in html, html
    return html.split(start, 1)[1].split(end, 1)[0]


@pytest.mark.asyncio
async def test_page_shows_what_is_about_to_happen(web: Web) -> None:
    _, links = await web.keep(Gate.CONFIRM)
    resp = await web.client.get(links["confirm"])
    assert resp.status == 200
    html = await resp.text()
    assert "月次報告" in html and "送信確認" in html
    assert "田中 太郎 &lt;taro@example.co.jp&gt;" in between(html, 'id="sender">', "</span>")
    # external: grouped by organisation, with names, never the internal address
    ext = between(html, 'id="external"', "</div>")
    orgs = [between(h, ">", "<") for h in ext.split('<h3 class="org"')[1:]]
    assert orgs == ["partner.co.jp", "example.com", "rival.co.jp"]
    partner = between(ext, "partner.co.jp", '<h3 class="org"')
    assert "「山田 花子」 &lt;hanako@partner.co.jp&gt;" in partner
    assert "ichiro@partner.co.jp" in partner
    assert "「Suzuki Jiro」 &lt;suzuki@other.example.com&gt;" in ext
    assert "audit@rival.co.jp" in between(ext, "rival.co.jp", "</ul>")
    assert "chika" not in ext
    assert '<span class="count">4</span>' in between(html, "社外の宛先", "</h2>")
    assert "3 社" in between(html, "社外の宛先", "</h2>")
    internal = between(html, 'id="internal"', "</ul>")
    assert "「佐藤 千佳」 &lt;chika@example.co.jp&gt;" in internal and "partner" not in internal
    assert SUMMARY.findings
    for f in SUMMARY.findings:  # in plain words, as the checks wrote them
        assert f.ja in between(html, 'id="findings"', "</ul>")
    att = between(html, 'id="attachments"', "</table>")
    assert "顧客リスト.xlsx" in att and human_size(SUMMARY.attachments[0].size) in att
    assert "KB" in att
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
    assert "3 organisations" in en
    for f in SUMMARY.findings:
        assert f.en in en
    switched = await (
        await web.client.get(links["confirm"] + "?lang=ja", headers={"Accept-Language": "en"})
    ).text()
    assert "送信確認" in switched


@pytest.mark.asyncio
async def test_page_escapes_what_the_sender_wrote(web: Web) -> None:
    evil = '<img src=x onerror="alert(1)">'
    raw = make_raw(evil_name=evil)
    summary = _summary_of(raw, envelope(), POLICY).to_json()
    _, links = await web.keep(Gate.CONFIRM, raw=raw, summary=summary)
    html = await (await web.client.get(links["confirm"])).text()
    assert "<img" not in html and "&lt;img src=x onerror=" in html


@pytest.mark.asyncio
async def test_hold_page_offers_send_now_only_when_the_rule_allows_it(web: Web) -> None:
    _, links = await web.keep(Gate.HOLD, wait=timedelta(minutes=5))
    plain = await (await web.client.get(links["held"])).text()
    assert 'id="btn-send"' not in plain and 'id="btn-cancel"' in plain
    assert "今すぐ送信" not in plain
    _, links = await web.keep(Gate.HOLD, wait=timedelta(minutes=5), allow_send_now=True)
    now = await (await web.client.get(links["held"])).text()
    assert 'id="btn-send"' in now and "今すぐ送信する" in between(now, 'id="btn-send"', "</button>")
    assert "今すぐ送信する" in between(now, 'id="lead">', "</p>")
    # the notice the sender received says so too
    texts = [notice_text(g[2]) for g in web.sink.of_kind("held")]
    assert ["今すぐ送信" in t for t in texts] == [False, True]


def notice_text(raw: bytes) -> str:
    import email
    import email.policy

    msg = email.message_from_bytes(raw, policy=email.policy.default)
    part = msg.get_body(("plain",))  # type: ignore[attr-defined]
    assert part is not None
    return str(part.get_content())


@pytest.mark.asyncio
async def test_notices_list_the_recipients_the_page_shows(web: Web) -> None:
    """End to end through the queue and the scheduler: the confirm mail shows the summary."""
    await web.keep(Gate.CONFIRM)
    (notice,) = web.sink.of_kind("confirm")
    body = notice_text(notice[2])
    assert "社外の宛先: 3 社・4 件" in body
    assert "「山田 花子」 <hanako@partner.co.jp>" in body
    assert "「佐藤 千佳」 <chika@example.co.jp> (Cc)" in body
    assert "顧客リスト.xlsx" in body


@pytest.mark.asyncio
async def test_get_head_options_and_scanners_never_change_state(web: Web) -> None:
    qid, links = await web.keep(Gate.HOLD, wait=timedelta(minutes=5), allow_send_now=True)
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
    qid, links = await web.keep(Gate.CONFIRM, wait=timedelta(hours=1))
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
    # only misses are limited: the real link from the same client still works (issue 12)
    assert (await web.client.get(links["confirm"])).status == 200
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
    assert data["total"] == 2  # all pages, the same filters
    data = await (await c.get(f"/api/messages?state=held&before={qid2}", headers=auth)).json()
    assert [i["id"] for i in data["items"]] == [qid]
    data = await (await c.get(f"/api/messages?sender={SENDER}", headers=auth)).json()
    assert len(data["items"]) == 2 and data["total"] == 2
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
    assert (await ok.json()) == {"ok": True, "store": True, "upstream": True, "history": None}
    assert ok.status == 200
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


@pytest.mark.asyncio
async def test_metrics_count_every_post_and_time_each_decision(web: Web) -> None:
    _, links = await web.keep(Gate.CONFIRM)
    url = links["confirm"]
    html = await (await web.client.get(url)).text()
    assert (await web.client.post(url, data={"action": "send"})).status == 403
    assert web.posts("invalid") == 1
    web.r.clock.advance(seconds=90)  # the sender reads the page for a minute and a half
    ok = await web.client.post(url, data={"action": "send", "csrf_send": csrf(html, "send")})
    assert ok.status == 200
    assert web.posts("released") == 1 and web.decided("confirm") == (1.0, 90.0)
    again = await web.client.post(url, data={"action": "send", "csrf_send": csrf(html, "send")})
    assert again.status == 410 and web.posts("used") == 1
    assert web.decided("confirm") == (1.0, 90.0)  # a refused POST decides nothing

    _, links = await web.keep(Gate.APPROVE, approvers=("boss@example.co.jp",))
    page = await (await web.client.get(links["approval-request"])).text()
    mine = await (await web.client.get(links["approval-pending"])).text()
    web.r.clock.advance(minutes=10)
    await web.client.post(
        links["approval-request"],
        data={"action": "refuse", "csrf_refuse": csrf(page, "refuse")},
    )
    assert web.posts("denied") == 1 and web.decided("approve") == (1.0, 600.0)
    late = await web.client.post(
        links["approval-pending"], data={"action": "cancel", "csrf_cancel": csrf(mine, "cancel")}
    )
    assert late.status == 410 and web.posts("used") == 2  # decided through the other link

    _, links = await web.keep(Gate.HOLD, wait=timedelta(minutes=5))
    held = await (await web.client.get(links["held"])).text()
    await web.client.post(
        links["held"], data={"action": "cancel", "csrf_cancel": csrf(held, "cancel")}
    )
    assert web.posts("cancelled") == 1 and web.decided("hold")[0] == 1.0

    _, links = await web.keep(Gate.CONFIRM, wait=timedelta(hours=1))
    page = await (await web.client.get(links["confirm"])).text()
    web.r.clock.advance(hours=1)
    gone = await web.client.post(
        links["confirm"], data={"action": "send", "csrf_send": csrf(page, "send")}
    )
    assert gone.status == 410 and web.posts("expired") == 1

    for i in range(5):  # unknown tokens: invalid; then 5 misses reach the limit: 429
        await web.client.post(f"/m/GuessedToken{i:04d}abcdefghijklmnop", data={"action": "send"})
    assert web.posts("invalid") == 6
    for i in range(5):  # (a POST without a valid form never reaches the token lookup)
        await web.client.get(f"/m/GuessedToken{i:04d}abcdefghijklmnop")
    # limited: a POST that reaches the lookup with an unknown token (a valid CSRF value for it,
    # minted with the server's own key) answers 429; the real (expired) link still answers 410
    guess = "GuessedToken7777abcdefghijklmnop"
    w = web.client.server.app[WEB_KEY]
    issued = int((time.time() - 5) * 1000)
    limited = await web.client.post(
        f"/m/{guess}", data={"action": "send", "csrf_send": w.csrf(guess, "send", issued)}
    )
    assert limited.status == 429 and web.posts("rate_limited") == 1
    gone = await web.client.post(
        links["confirm"], data={"action": "send", "csrf_send": csrf(page, "send")}
    )
    assert gone.status == 410 and web.posts("expired") == 2
    assert web.posts("approved") == 0
