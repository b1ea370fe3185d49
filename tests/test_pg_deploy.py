"""The two-node deployment of docs/deploy-multi-node.md on a private PostgreSQL: every node has
the same `web.secret` and `web.public_url` (the load balancer's address), so a link names no node
and any node serves both the page and the POST — a page rendered by node 1 is accepted when the
load balancer sends the POST to node 2 — while a node with another secret refuses that POST.
`store.pool_size` bounds each node's connections."""

from __future__ import annotations

import json
import time
import urllib.parse
from pathlib import Path

from e2e_support import Guard, policy, wait_for
from pg_support import PgCluster, pg_cluster, pg_url

__all__ = ["pg_cluster", "pg_url"]

LB = "https://guard.example.test"  # web.public_url: what the notices' links name
POOL = 2

CONFIRM = """
[[rule]]
name = "confirm-external"
when = "recipient.external >= 1"
action = "confirm"
"""


def node(tmp_path: Path, name: str, url: str, **web: str) -> Guard:
    extra = {
        "store": {"url": url, "pool_size": POOL, "lease": "5s"},
        "web": {"public_url": LB, **web},
    }
    return Guard(tmp_path / name, policy_text=policy(CONFIRM), config_extra=extra)


def test_page_from_one_node_post_to_another(
    tmp_path: Path, pg_url: str, pg_cluster: PgCluster
) -> None:
    db = pg_url.rsplit("/", 1)[1]
    other = {"secret": "another-secret-" + "y" * 32}
    with (
        node(tmp_path, "n1", pg_url) as g1,
        node(tmp_path, "n2", pg_url) as g2,
        node(tmp_path, "n3", pg_url, **other) as g3,
    ):
        sent = g1.send(to=["Partner <a@partner.example>"], subject="behind a load balancer")
        assert sent.held_id, sent.text
        notice = wait_for(
            lambda: next(
                (n for g in (g1, g2, g3) for n in g.received if n.notice_kind == "confirm"), None
            ),
            30,
            what="the confirm notice",
        )
        link = g1.link(notice)
        assert link.startswith(f"{LB}/m/"), link  # the link names the load balancer, no node
        path = urllib.parse.urlsplit(link).path

        page = g1.page(g1.url(path))  # the load balancer sent the GET to node 1 …
        assert page.status == 200, page.text[:300]
        form = {**page.hidden, "action": "send"}
        body = urllib.parse.urlencode(form).encode()
        hdrs = {"Content-Type": "application/x-www-form-urlencoded", "Accept-Language": "en"}
        time.sleep(0.5)  # web.min_dwell is 0.2 s

        # … a node with another web.secret cannot check node 1's form: refused, nothing done
        status, _, text = g3.request(g3.url(path), body, hdrs)
        assert status == 403, (status, text[:300])
        shown = g2.run_cli("queue", "show", sent.held_id, "--json", "--store", pg_url)
        assert shown.returncode == 0, shown.stderr
        assert json.loads(shown.stdout)["state"] == "held"

        # … and the POST to node 2 (same secret) acts
        status, _, text = g2.request(g2.url(path), body, hdrs)
        assert status == 200, (status, text[:300])
        wait_for(
            lambda: any(
                sent.message_id in m.header("Message-ID") for g in (g1, g2, g3) for m in g.mails()
            ),
            30,
            what="delivery after the POST on node 2",
        )

        conns = pg_cluster.psql(
            "postgres",
            "SELECT count(*) FROM pg_stat_activity "
            f"WHERE datname = '{db}' AND application_name = 'mailguard'",
        )
        assert 1 <= int(conns) <= 3 * POOL, conns  # store.pool_size per node
