"""Issue 12 item 6 (web and log side) — leaks and loose ends. Against `mailguard serve`
(tests/e2e_support.py).

Attack → what the old code did:
* A request line over aiohttp's 8190-byte limit (a long query string after /m/<token>), a
  too-long header, a control byte in the path: aiohttp.server logged "Error handling request"
  with the offending line — the confirm token — in the exception text. Now every log record is
  redacted (/m/…), on the root handler and on aiohttp's loggers.
* `Server: Python/3.x aiohttp/x.y` on every answer (also on aiohttp's own 400s). Now
  `Server: MailGuard`.
* The CSRF value carried its issue time in whole seconds: a POST 0.6 s after the GET passed
  `min_dwell = 1s` whenever a second boundary fell in between. Now milliseconds.
* `/metrics` was open to anyone reaching the web port. Now `[web] metrics = "open" | "token" |
  "off"` and `[metrics] listen` (its own address).
"""

from __future__ import annotations

import time
import urllib.parse
from pathlib import Path

from e2e_support import ADMIN_TOKEN, Guard, free_port, parse_page, policy

CONFIRM = """
[[rule]]
name = "ask"
when = "recipient.external"
action = "confirm"
"""


def held_link(g: Guard) -> str:
    sent = g.send(to=["tanaka@customer-a.co.jp"])
    assert sent.held_id, f"{sent.code} {sent.text}"
    return g.link(g.wait_notice("confirm", about=sent))


def test_token_never_reaches_the_log(tmp_path: Path) -> None:
    with Guard(
        tmp_path, policy_text=policy(CONFIRM), config_extra={"log": {"level": "debug"}}
    ) as g:
        link = held_link(g)
        path = urllib.parse.urlsplit(link).path
        token = path.rsplit("/", 1)[1]
        answers = [
            g.raw_http(f"GET {path}?q={'a' * 9000} HTTP/1.1\r\nHost: x\r\n\r\n".encode()),
            g.raw_http(f"GET {path} HTTP/1.1\r\nHost: x\r\nX-Pad: {'b' * 9000}\r\n\r\n".encode()),
            g.raw_http(f"GET {path}\x01x HTTP/1.1\r\nHost: x\r\n\r\n".encode()),
            g.raw_http(f"GET {path} HTTP/9.9\r\nHost: x\r\n\r\n".encode()),
            g.raw_http(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()),
        ]
        assert all(a.startswith(b"HTTP/1.") for a in answers), [a[:40] for a in answers]
        assert answers[-1].startswith(b"HTTP/1.1 200")
        time.sleep(0.5)
        log = g.log_text()
        errors = [r for r in g.log_records() if r.get("logger") == "aiohttp.server"]
        assert errors, "the malformed requests were not logged at all"
        assert token not in log, [ln[:300] for ln in log.splitlines() if token in ln]
        assert token[:16] not in log
        assert "/m/…" in log


def test_server_header_names_no_versions(tmp_path: Path) -> None:
    with Guard(tmp_path) as g:
        answers = [
            g.request("/healthz")[1].get("Server", ""),
            g.request("/m/" + "A" * 40)[1].get("Server", ""),
            g.request("/no-such-page")[1].get("Server", ""),
        ]
        raw = g.raw_http(b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        head = raw.split(b"\r\n\r\n", 1)[0].decode("latin-1")
        answers += [
            ln.split(":", 1)[1].strip()
            for ln in head.split("\r\n")[1:]
            if ":" in ln and ln.split(":", 1)[0].lower() == "server"
        ]
        assert len(answers) == 4, head
        for server in answers:
            assert "aiohttp" not in server.lower() and "python" not in server.lower(), server


def test_csrf_time_has_sub_second_resolution(tmp_path: Path) -> None:
    with Guard(
        tmp_path, policy_text=policy(CONFIRM), config_extra={"web": {"min_dwell": "1s"}}
    ) as g:
        link = held_link(g)
        # GET late in a second, POST 0.6 s later: a second boundary lies in between
        while not 0.75 <= time.time() % 1 < 0.85:
            time.sleep(0.01)
        status, _, body = g.request(link, headers={"Accept-Language": "en"})
        assert status == 200
        form = dict(parse_page(status, body).hidden, action="send")
        time.sleep(0.6)
        data = urllib.parse.urlencode(form).encode()
        hdrs = {"Content-Type": "application/x-www-form-urlencoded"}
        fast = g.request(link, data, hdrs)
        assert fast[0] == 403, f"a POST 0.6 s after its page passed min_dwell=1s: {fast[0]}"
        sent_id = g.queue_items()[0]["id"]
        assert g.state_of(sent_id) == "held"
        time.sleep(0.6)  # now 1.2 s after the page: a person
        assert g.request(link, data, hdrs)[0] == 200
        assert g.wait_state(sent_id, "released", "delivering", "delivered")


def test_metrics_token_mode(tmp_path: Path) -> None:
    with Guard(tmp_path, config_extra={"web": {"metrics": "token"}}) as g:
        assert g.request("/metrics")[0] == 401
        assert g.request("/metrics", headers={"Authorization": "Bearer nope"})[0] == 401
        ok = g.request("/metrics", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
        assert ok[0] == 200 and "mailguard_" in ok[2]


def test_metrics_on_their_own_listener(tmp_path: Path) -> None:
    port = free_port()
    extra = {"web": {"metrics": "off"}, "metrics": {"listen": f"127.0.0.1:{port}"}}
    with Guard(tmp_path, config_extra=extra) as g:
        assert g.request("/metrics")[0] == 404  # not on the web port
        status, headers, body = g.request(f"http://127.0.0.1:{port}/metrics")
        assert status == 200 and "mailguard_" in body
        assert "aiohttp" not in headers.get("Server", "")
        assert g.request(f"http://127.0.0.1:{port}/api/messages")[0] == 404  # metrics only


def test_metrics_open_is_the_default(tmp_path: Path) -> None:
    with Guard(tmp_path) as g:
        status, _, body = g.request("/metrics")
        assert status == 200 and "mailguard_" in body
