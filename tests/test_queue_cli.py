"""`mailguard queue …` on a real store file: table and JSON output, release/cancel with audit."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest

from mailguard.cli import main
from mailguard.policy.decision import Gate
from mailguard.queue.sqlite import SqliteStore
from mailguard.queue.store import State
from tests._queue_support import close, keep, rig


def seed(db: Path, n: int = 3) -> list[str]:
    async def go() -> list[str]:
        r = await rig(db, 9)  # nothing is relayed: the pipeline only keeps
        try:
            ids = []
            for i in range(n):
                gate = Gate.CONFIRM if i % 2 else Gate.HOLD
                reply = await keep(r, gate)
                ids.append(reply.text.split("held as ")[1].split()[0])
                r.clock.advance(seconds=1)
            return ids
        finally:
            await close(r)

    return asyncio.run(go())


def state(db: Path, qid: str) -> State:
    async def go() -> State:
        async with SqliteStore(db) as store:
            h = await store.get(qid)
            assert h is not None
            return h.state

    return asyncio.run(go())


def test_list_show_release_cancel(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "q.db"
    ids = seed(db)
    assert main(["queue", "list", "--store", str(db)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("ID") and all(i in out for i in ids)
    assert "月次報告" in out and "held" in out
    assert main(["queue", "list", "--store", str(db), "--limit", "2", "--json"]) == 0
    page = json.loads(capsys.readouterr().out)
    assert [i["id"] for i in page["items"]] == ids[::-1][:2] and page["next"] == ids[1]
    assert main(["queue", "release", ids[0], "--store", str(db), "--why", "ok by phone"]) == 0
    assert capsys.readouterr().out.strip() == f"{ids[0]}: released"
    assert main(["queue", "cancel", ids[1], "--store", str(db)]) == 0
    capsys.readouterr()
    assert state(db, ids[0]) is State.RELEASED and state(db, ids[1]) is State.CANCELLED
    assert main(["queue", "release", ids[1], "--store", str(db)]) == 1
    assert "it is cancelled" in capsys.readouterr().err
    assert main(["queue", "show", ids[0], "--store", str(db), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert [a["to"] for a in shown["audit"]] == ["held", "released"]
    assert shown["audit"][1]["by"].startswith("cli:") and shown["audit"][1]["why"] == "ok by phone"
    assert main(["queue", "show", ids[0], "--store", str(db)]) == 0
    text = capsys.readouterr().out
    assert "audit:" in text and "顧客リスト.xlsx" in text
    assert main(["queue", "list", "--store", str(db), "--state", "held", "--since", "1h"]) == 0
    assert ids[2] in capsys.readouterr().out
    assert main(["queue", "show", "NOSUCHID", "--store", str(db)]) == 1


def test_config_file_and_missing_store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "var" / "q.db"
    ids = seed(db, 1)
    cfg = tmp_path / "mailguard.toml"
    cfg.write_text(f'[store]\npath = "{db}"\n', encoding="utf-8")
    assert main(["queue", "list", "-c", str(cfg), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["items"][0]["id"] == ids[0]
    assert main(["queue", "list", "--store", str(tmp_path / "none.db")]) == 1
    assert "no store" in capsys.readouterr().err
    (tmp_path / "bad.toml").write_text("[store]\npaht = 1\n", encoding="utf-8")
    assert main(["queue", "list", "-c", str(tmp_path / "bad.toml")]) == 2
    assert "bad.toml:2: store.paht" in capsys.readouterr().err


def test_entry_point_in_a_real_process(tmp_path: Path) -> None:
    db = tmp_path / "q.db"
    ids = seed(db, 2)
    out = subprocess.run(
        [sys.executable, "-m", "mailguard", "queue", "list", "--store", str(db), "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert [i["id"] for i in json.loads(out)["items"]] == ids[::-1]


@pytest.mark.asyncio
async def test_cli_release_while_the_server_holds_the_store_open(tmp_path: Path) -> None:
    """The CLI in another process releases; the running scheduler delivers it."""
    from tests._queue_support import RAW, RCPTS, SENDER, Sink, close, rig, serve, stop

    sink = Sink()
    server, port = await serve(sink)
    r = await rig(tmp_path / "q.db", port)
    try:
        reply = await keep(r, Gate.CONFIRM)
        qid = reply.text.split("held as ")[1].split()[0]
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "mailguard",
            "queue",
            "release",
            qid,
            "--store",
            str(tmp_path / "q.db"),
            "--why",
            "approved by phone",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, err
        assert out.decode().strip() == f"{qid}: released"
        r.clock.advance(minutes=1)  # the CLI used the real clock; ours stands still
        await r.scheduler.tick()
        assert sink.originals() == [(SENDER, RCPTS, RAW)]
    finally:
        await close(r)
        await stop(server)


def test_list_pages_with_a_truthful_count_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """docs/queue.md: one page of --limit rows, then "N of TOTAL messages (filters), newest
    first; next page: --before ID"; the count applies the filters; --json carries "total"."""
    db = tmp_path / "q.db"
    ids = seed(db, 5)
    assert main(["queue", "release", ids[0], "--store", str(db)]) == 0
    capsys.readouterr()
    assert main(["queue", "list", "--store", str(db), "--limit", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 + 2 + 1  # header, two rows, the count line
    assert ids[4] in lines[1] and ids[3] in lines[2]
    assert lines[-1] == f"2 of 5 messages, newest first; next page: --before {ids[3]}"
    assert main(["queue", "list", "--store", str(db), "--limit", "2", "--before", ids[3]]) == 0
    last = capsys.readouterr().out.splitlines()[-1]
    assert (
        last == f"2 of 5 messages, newest first, older than {ids[3]}; next page: --before {ids[1]}"
    )
    assert main(["queue", "list", "--store", str(db), "--state", "held", "--limit", "10"]) == 0
    out = capsys.readouterr().out
    assert (
        ids[0] not in out and out.splitlines()[-1] == "4 of 4 messages (state=held), newest first"
    )
    assert main(["queue", "list", "--store", str(db), "--state", "released", "--json"]) == 0
    page = json.loads(capsys.readouterr().out)
    assert [i["id"] for i in page["items"]] == [ids[0]] and page["total"] == 1
    assert page["next"] is None
    for bad in ("0", "1001", "x"):
        with pytest.raises(SystemExit) as e:
            main(["queue", "list", "--store", str(db), "--limit", bad])
        assert e.value.code == 2
    assert "must be 1 to 1000" in capsys.readouterr().err
