"""kill -9 under load (short form of bench/killtest.py): 20 Postfix-like clients push 300
messages, half of them held for 1 s, through `mailguard serve` while it is SIGKILLed and restarted
three times; every message that got a 250 reaches the upstream."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import killtest


@pytest.mark.asyncio
async def test_kill9_under_load_loses_nothing(tmp_path: Path) -> None:
    r = await killtest.run(
        messages=300, senders=20, kills=3, every=(0.5, 1.5), drain=60, workdir=tmp_path
    )
    print("\n" + r.line())
    assert r.kills >= 2, r.line()  # the load really was cut in the middle
    assert r.refused_5xx == 0
    assert r.accepted == r.sent  # the clients' retries got everything in eventually
    assert r.held_accepted > 0  # the hold path was exercised, not only the relay path
    assert r.lost == 0, r.line()
    # at-least-once: a kill between the upstream's 250 and ours makes the client resend
    assert r.duplicates <= r.kills * 20, r.line()
