"""Upstream outage under load (short form of bench/outage.py): the upstream is cut for 3 s while
20 Postfix-like clients send 300 messages through `mailguard serve`; only 4xx while it is down,
0 lost, everything delivered after recovery."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import outage


@pytest.mark.asyncio
async def test_upstream_outage_loses_nothing(tmp_path: Path) -> None:
    r = await outage.run(
        messages=300, senders=20, outage=3.0, down_after=1.0, retry=0.3, workdir=tmp_path
    )
    print("\n" + r.line())
    assert r.refused_5xx == 0
    assert r.ok_during_outage == 0  # no 250 while nothing could take the mail
    assert r.codes_during_outage and set(r.codes_during_outage) <= {0, 421, 451}, r.line()
    assert r.lost == 0
    assert r.delivered == r.sent == r.accepted
    log = (tmp_path / "serve.log").read_text(errors="replace")
    assert "Traceback" not in log
