"""DomainHistory on a real SQLite file: counts, known set, async use, imports, the CLI."""

from __future__ import annotations

import asyncio
import gzip
import mailbox
import os
import sqlite3
from datetime import UTC, datetime
from email.message import EmailMessage
from pathlib import Path

import pytest

from mailguard.checks import domains
from mailguard.checks.context import CheckContext, HistorySnapshot, Org
from mailguard.cli import main
from mailguard.history import DomainHistory
from mailguard.message import MessageView

T0 = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)
T1 = datetime(2026, 2, 1, 9, 0, tzinfo=UTC)


def test_record_counts_known(tmp_path: Path) -> None:
    with DomainHistory(tmp_path / "h.db") as h:
        assert h.counts(["partner.co.jp"]) == {"partner.co.jp": 0}
        h.record(["partner.co.jp", "PARTNER.co.jp.", "mail.customer.jp"], T1)
        h.record(["partner.co.jp"], T0)
        c = h.counts(["partner.co.jp", "mail.customer.jp", "customer.jp", "new.jp"])
        # once per message; the registrable domain of a subdomain is counted too
        assert c == {"partner.co.jp": 2, "mail.customer.jp": 1, "customer.jp": 1, "new.jp": 0}
        assert h.known() == {"partner.co.jp", "mail.customer.jp", "customer.jp"}
        assert h.known(min_count=2) == {"partner.co.jp"}
        (row,) = [r for r in h.rows() if r[0] == "partner.co.jp"]
        assert row[2].startswith("2026-01-05") and row[3].startswith("2026-02-01")


def test_store_is_wal_and_survives_reopen(tmp_path: Path) -> None:
    path = tmp_path / "var" / "mailguard.db"
    with DomainHistory(path) as h:
        h.record(["a.jp"], T0)
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("SELECT domain, count FROM domain_history").fetchall() == [("a.jp", 1)]
    db.close()
    with DomainHistory(path) as h:
        assert h.counts(["a.jp"])["a.jp"] == 1


@pytest.mark.asyncio
async def test_async_wrappers_from_many_tasks(tmp_path: Path) -> None:
    with DomainHistory(tmp_path / "h.db") as h:
        await asyncio.gather(*(h.arecord(["busy.jp", f"d{i % 3}.jp"], T0) for i in range(30)))
        c = await h.acounts(["busy.jp", "d0.jp"])
        assert c == {"busy.jp": 30, "d0.jp": 10}


def test_snapshot_feeds_the_domain_check(tmp_path: Path) -> None:
    with DomainHistory(tmp_path / "h.db", frequent_min=3) as h:
        for _ in range(3):
            h.record(["customer-shop.com"], T0)
        h.record(["once.jp"], T0)
        snap = h.snapshot(["customer-shop.co.jp", "once.jp"])
        assert isinstance(snap, HistorySnapshot)
        assert snap.frequent == frozenset({"customer-shop.com"})
        assert h.snapshot(["x.jp"]).frequent is snap.frequent  # stable object: index cache hits
    raw = b"From: a@example.co.jp\r\nTo: b@customer-shop.co.jp, c@once.jp\r\n\r\nhi\r\n"
    rep = domains.analyze(
        MessageView.parse(raw), CheckContext(org=Org(internal=("example.co.jp",)), history=snap)
    )
    assert rep.domains["customer-shop.co.jp"].cls == "lookalike"
    assert rep.domains["once.jp"].cls == "known"


def pf(ts: str, prog: str, qid: str, to: str, relay: str, status: str = "sent") -> str:
    """One Postfix delivery log line."""
    return (
        f"{ts} mx postfix/{prog}: {qid}: to=<{to}>, relay={relay}, delay=1.2, "
        f"delays=0/0/0.5/0.7, dsn=2.0.0, status={status} (250 2.0.0 Ok)"
    )


MX_P = "mx.partner.co.jp[203.0.113.5]:25"
POSTFIX_LOG = "\n".join(
    [
        "Jan  5 10:00:00 mx postfix/smtpd[100]: 3F2A1C0: client=localhost[127.0.0.1]",
        # the hop into MailGuard (content_filter) is not a delivery
        pf(
            "Jan  5 10:00:01",
            "smtp[101]",
            "3F2A1C0",
            "taro@partner.co.jp",
            "127.0.0.1[127.0.0.1]:10025",
        ),
        pf("Jan  5 10:00:02", "smtp[102]", "4B", "taro@partner.co.jp", MX_P),
        pf("Jan  5 10:00:02", "smtp[102]", "4B", "hanako@partner.co.jp", MX_P),
        pf(
            "Jan  5 10:00:02",
            "smtp[102]",
            "4B",
            "kim@customer.jp",
            "mx.customer.jp[198.51.100.1]:25",
        ),
        pf("Jan  5 10:00:03", "local[103]", "5C", "root@mx.example.co.jp", "local"),
        pf("Jan  5 10:00:04", "smtp[104]", "6D", "bob@gmial.com", "none", "deferred"),
        pf(
            "Jan  5 10:00:05",
            "smtp[105]",
            "7E",
            "x@nowhere.jp",
            "mx.nowhere.jp[192.0.2.9]:25",
            "bounced",
        ),
        pf("Jan  5 10:06:00", "lmtp[106]", "8F", "u@example.co.jp", "mail[private/dovecot-lmtp]"),
        pf(
            "2026-01-06T10:05:00.123456+09:00",
            "smtp[107]",
            "9A",
            "a@mail.client.jp",
            "mx.client.jp[198.51.100.7]:25",
        ),
        pf(
            "Jan  6 11:00:00",
            "smtp[108]",
            "1B",
            "y@xn--r8jz45g.jp",
            "mx.xn--r8jz45g.jp[198.51.100.8]:25",
        ).replace("postfix/", "postfix-out/"),
        "garbage line without structure status=sent to=<x@y.jp>",
        "",
    ]
)


def _log(tmp_path: Path, text: str = POSTFIX_LOG, name: str = "maillog") -> Path:
    p = tmp_path / name
    if name.endswith(".gz"):
        with gzip.open(p, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        p.write_text(text, encoding="utf-8")
    t = datetime(2026, 1, 31, tzinfo=UTC).timestamp()
    os.utime(p, (t, t))
    return p


def test_import_postfix_log_counts_remote_deliveries_once(tmp_path: Path) -> None:
    with DomainHistory(tmp_path / "h.db") as h:
        res = h.import_postfix_log(_log(tmp_path))
        # 4B (partner.co.jp, customer.jp), 9A (mail.client.jp), 1B (例え.jp)
        assert res.messages == 4
        c = h.counts(["partner.co.jp", "customer.jp", "mail.client.jp", "client.jp"])
        assert c == {"partner.co.jp": 1, "customer.jp": 1, "mail.client.jp": 1, "client.jp": 1}
        assert h.counts(["xn--r8jz45g.jp"])["xn--r8jz45g.jp"] == 1
        known = h.known()
        assert not {"gmial.com", "nowhere.jp", "example.co.jp", "mx.example.co.jp"} & known
        (row,) = [r for r in h.rows() if r[0] == "partner.co.jp"]
        assert row[2][:4] == "2026"  # classic syslog lines get the year from the file


def test_import_is_idempotent_and_handles_rotation(tmp_path: Path) -> None:
    log = _log(tmp_path)
    rotated = _log(tmp_path, POSTFIX_LOG, "maillog.1.gz")
    with DomainHistory(tmp_path / "h.db") as h:
        h.import_postfix_log(log)
        again = h.import_postfix_log(log)
        assert again.messages == 0 and again.domains == {}
        assert h.import_postfix_log(rotated).messages == 0  # same lines, compressed
        assert h.counts(["partner.co.jp"])["partner.co.jp"] == 1


def _mbox(tmp_path: Path) -> Path:
    path = tmp_path / "sent.mbox"
    box = mailbox.mbox(str(path))
    for i, (to, cc) in enumerate(
        [
            ('"Sato, Jiro" <jiro@partner.co.jp>, kim@customer.jp', "boss@example.co.jp"),
            ("=?ISO-2022-JP?B?GyRCOzNFRBsoQg==?= <y@partner.co.jp>", ""),
            ("Team: a@new-client.jp, b@new-client.jp;", "c@例え.jp"),
        ]
    ):
        m = EmailMessage()
        m["From"] = "me@example.co.jp"
        m["To"] = to
        if cc:
            m["Cc"] = cc
        m["Date"] = "Mon, 05 Jan 2026 10:00:00 +0900"
        m["Message-ID"] = f"<{i}@example.co.jp>"
        m.set_content("本文")
        box.add(m)
    # a message without Message-ID or recipients
    box.add(b"From: me@example.co.jp\nSubject: draft\n\nno recipients\n")
    box.close()
    return path


def test_import_mbox(tmp_path: Path) -> None:
    path = _mbox(tmp_path)
    with DomainHistory(tmp_path / "h.db") as h:
        res = h.import_mbox(path)
        assert res.messages == 3 and res.skipped == 1
        c = h.counts(["partner.co.jp", "customer.jp", "new-client.jp", "xn--r8jz45g.jp"])
        assert c == {"partner.co.jp": 2, "customer.jp": 1, "new-client.jp": 1, "xn--r8jz45g.jp": 1}
        assert h.import_mbox(path).messages == 0  # idempotent by Message-ID


def test_cli_import_and_list(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = tmp_path / "s.db"
    log, box = _log(tmp_path), _mbox(tmp_path)
    rc = main(
        ["history", "import", "--store", str(store), "--postfix-log", str(log), "--mbox", str(box)]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert "maillog: 4 new deliveries" in out and "sent.mbox: 3 new deliveries" in out
    assert main(["history", "list", "--store", str(store), "--min", "2"]) == 0
    out = capsys.readouterr().out
    assert "partner.co.jp" in out and "customer.jp" in out and "client.jp" not in out
    assert main(["history", "list", "--store", str(store), "--json"]) == 0
    assert '"domain": "partner.co.jp", "count": 3' in capsys.readouterr().out


def test_cli_uses_config_store_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = tmp_path / "from-config.db"
    cfg = tmp_path / "mailguard.toml"
    cfg.write_text(f'[store]\npath = "{store}"\n', encoding="utf-8")
    assert main(["history", "import", "-c", str(cfg), "--postfix-log", str(_log(tmp_path))]) == 0
    assert store.exists()


def test_cli_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["history", "import", "--store", str(tmp_path / "s.db")]) == 2
    missing = str(tmp_path / "missing.log")
    assert (
        main(["history", "import", "--store", str(tmp_path / "s.db"), "--postfix-log", missing])
        == 2
    )
    assert main(["history", "list", "--store", str(tmp_path / "none.db")]) == 2
    assert "no such file" in capsys.readouterr().err
