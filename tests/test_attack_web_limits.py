"""Issue 12 item 3 — rate limits that lock out real users, proxies, admin logins, weak config.
Against `mailguard serve` (tests/e2e_support.py).

Attack → what the old code did:
* 20 unknown tokens from one address, then the valid link from that address → 429 for 10 min
  (the block was checked before the lookup): a guesser behind the company proxy locks everyone
  out. Now: 200, and the POST acts.
* Behind a reverse proxy every client is 127.0.0.1: one guesser blocked them all; with
  `trusted_proxies` the client is taken from X-Forwarded-For (only from a trusted peer).
* Many guessers with many addresses: no global budget. Now `miss_limit_global`.
* Admin-API token guessing: unlimited 401s. Now 429 past `login_fail_limit` (per client) and
  `login_fail_limit_global`, without comparing the token.
* `admin_token = "short"` was accepted; `allowed_networks = ["0.0.0.0/0"]` started silently.
"""

from __future__ import annotations

import subprocess
import uuid
from pathlib import Path

from e2e_support import ADMIN_TOKEN, Guard, mailguard_cmd, policy

CONFIRM = """
[[rule]]
name = "ask"
when = "recipient.external"
action = "confirm"
"""


def guess() -> str:
    return "/m/" + uuid.uuid4().hex + "Zz"


def status(g: Guard, path: str, **headers: str) -> int:
    return g.request(path, headers=headers)[0]


def held_link(g: Guard) -> str:
    sent = g.send(to=["tanaka@customer-a.co.jp"])
    assert sent.held_id, f"{sent.code} {sent.text}"
    return g.link(g.wait_notice("confirm", about=sent))


def test_misses_never_lock_out_a_valid_link(tmp_path: Path) -> None:
    with Guard(tmp_path, policy_text=policy(CONFIRM)) as g:  # default: 20 misses / 10 min
        link = held_link(g)
        codes = [status(g, guess()) for _ in range(21)]
        assert codes[:20] == [404] * 20 and codes[20] == 429, codes
        assert status(g, guess()) == 429  # the guesser stays limited
        assert g.page(link).status == 200  # … the real link from the same address is served
        done = g.post(link, "send")
        assert done.status == 200, done.text[:300]


def test_trusted_proxy_header_separates_clients(tmp_path: Path) -> None:
    web = {"trusted_proxies": ["127.0.0.1/32"], "miss_limit": 5}
    with Guard(tmp_path, policy_text=policy(CONFIRM), config_extra={"web": web}) as g:
        a = {"X-Forwarded-For": "203.0.113.7"}
        codes = [status(g, guess(), **a) for _ in range(6)]
        assert codes == [404] * 5 + [429], codes
        # another client behind the same proxy is not limited by the guesser
        assert status(g, guess(), **{"X-Forwarded-For": "203.0.113.8"}) == 404
        # a client that prepends a fake address: the right-most untrusted hop is taken
        assert status(g, guess(), **{"X-Forwarded-For": "198.51.100.1, 203.0.113.7"}) == 429


def test_header_from_an_untrusted_peer_is_ignored(tmp_path: Path) -> None:
    with Guard(tmp_path, config_extra={"web": {"miss_limit": 5}}) as g:  # no trusted proxies
        codes = [status(g, guess(), **{"X-Forwarded-For": f"203.0.113.{i}"}) for i in range(6)]
        assert codes == [404] * 5 + [429], codes  # rotating the header does not evade the limit


def test_global_miss_budget(tmp_path: Path) -> None:
    web = {
        "trusted_proxies": ["127.0.0.1/32"],
        "miss_limit": 100,
        "miss_limit_global": 8,
    }
    with Guard(tmp_path, policy_text=policy(CONFIRM), config_extra={"web": web}) as g:
        link = held_link(g)
        codes = [status(g, guess(), **{"X-Forwarded-For": f"203.0.113.{i}"}) for i in range(8)]
        assert codes == [404] * 8, codes
        # a fresh address: the budget of all clients together is used up
        assert status(g, guess(), **{"X-Forwarded-For": "198.51.100.99"}) == 429
        assert g.page(link).status == 200  # valid links are still served


def test_admin_login_failures_are_throttled(tmp_path: Path) -> None:
    web = {
        "trusted_proxies": ["127.0.0.1/32"],
        "login_fail_limit": 3,
        "login_fail_limit_global": 5,
    }
    with Guard(tmp_path, config_extra={"web": web}) as g:

        def api(token: str, client: str) -> int:
            return status(
                g,
                "/api/messages",
                **{"Authorization": f"Bearer {token}", "X-Forwarded-For": client},
            )

        a, b, c = "203.0.113.1", "203.0.113.2", "203.0.113.3"
        assert [api("wrong-" + "x" * 40, a) for _ in range(4)] == [401, 401, 401, 429]
        assert api(ADMIN_TOKEN, a) == 429  # throttled: not even the right token is compared
        assert api(ADMIN_TOKEN, b) == 200  # another client is not
        assert [api("wrong-" + "y" * 40, b) for _ in range(2)] == [401, 401]
        # five failures from all clients together: every client now waits
        assert api(ADMIN_TOKEN, c) == 429
        assert any("failed login" in str(r.get("message", "")) for r in g.log_records())


def serve_once(tmp_path: Path, toml: str) -> subprocess.CompletedProcess[str]:
    cfg = tmp_path / "mailguard.toml"
    cfg.write_text(toml, encoding="utf-8")
    return subprocess.run(
        [*mailguard_cmd(), "serve", "-c", str(cfg)],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=tmp_path,
    )


def test_short_admin_token_is_a_config_error(tmp_path: Path) -> None:
    toml = (
        f'[store]\npath = "{tmp_path / "mg.db"}"\n'
        '[web]\nlisten = "127.0.0.1:0"\nadmin_token = "e2e-admin-token"\n'
    )
    r = serve_once(tmp_path, toml)
    assert r.returncode != 0
    assert f"{tmp_path / 'mailguard.toml'}:5: web.admin_token: too short" in r.stderr, r.stderr


def test_metrics_token_needs_an_admin_token(tmp_path: Path) -> None:
    r = serve_once(tmp_path, f'[store]\npath = "{tmp_path / "mg.db"}"\n[web]\nmetrics = "token"\n')
    assert r.returncode != 0 and "web.metrics" in r.stderr, r.stderr


def test_open_smtp_networks_warn_at_start(tmp_path: Path) -> None:
    smtp = {"allowed_networks": ["127.0.0.0/8", "0.0.0.0/0", "::/0"]}
    with Guard(tmp_path, config_extra={"smtp": smtp}) as g:
        status(g, "/healthz")
        warned = [
            r
            for r in g.log_records()
            if r.get("level") == "warning" and "allowed_networks" in str(r.get("message"))
        ]
        assert {"0.0.0.0/0", "::/0"} <= {
            n for r in warned for n in ("0.0.0.0/0", "::/0") if n in str(r["message"])
        }, g.log_text()[-2000:]
