"""The confirm page in a real headless Chromium (selenium): open the link, press "send"."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from aiohttp.test_utils import TestServer

from mailguard.gate import Gate
from mailguard.queue.store import State
from mailguard.web.app import RedactingAccessLogger, make_app
from tests._queue_support import SECRET, Sink, close, link_of, rig, serve, stop
from tests.test_notify_render import RAW, RCPTS, SENDER, envelope
from tests.test_web_confirm import keep_request

ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")

if not (CHROMIUM and DRIVER) and not os.environ.get("MAILGUARD_REQUIRE_BROWSER"):
    pytest.skip(
        "needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver); "
        "set MAILGUARD_REQUIRE_BROWSER=1 to make this a failure",
        allow_module_level=True,
    )


def drive(url: str, shots: Path) -> tuple[str, str, str]:
    """Blocking selenium session (runs in a thread so the test's loop keeps serving HTTP)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    profile = tempfile.mkdtemp(prefix="mailguard-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM or ""
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--no-first-run",
        "--disable-dev-shm-usage",
        f"--user-data-dir={profile}",
        "--window-size=412,1100",
        "--lang=ja",
    ):
        opts.add_argument(arg)
    opts.add_experimental_option("prefs", {"intl.accept_languages": "ja,en-US;q=0.8"})
    driver = webdriver.Chrome(service=Service(DRIVER or "chromedriver"), options=opts)
    try:
        driver.set_page_load_timeout(20)
        driver.get(url)
        WebDriverWait(driver, 10).until(ec.presence_of_element_located((By.ID, "btn-send")))
        lead = driver.find_element(By.ID, "subject").text
        external = driver.find_element(By.ID, "external").text
        driver.save_screenshot(str(shots / "confirm-page.png"))
        driver.find_element(By.ID, "btn-send").click()
        done = WebDriverWait(driver, 10).until(ec.presence_of_element_located((By.ID, "done")))
        text = done.text
        driver.save_screenshot(str(shots / "confirm-sent.png"))
        return lead, external, text
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.mark.asyncio
async def test_confirm_page_in_headless_chromium(tmp_path: Path) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    sink = Sink()
    server, port = await serve(sink)
    r = await rig(tmp_path / "q.db", port)
    srv = TestServer(make_app(r.store, r.service, secret=SECRET))
    await srv.start_server(
        access_log_class=RedactingAccessLogger, access_log=logging.getLogger("mailguard.web.access")
    )
    try:
        req = keep_request(Gate.CONFIRM)
        reply = await r.service.keep(envelope(), RAW, req)
        assert reply.code == 250, reply
        qid = req.id
        await r.scheduler.tick()
        path = link_of(sink.of_kind("confirm")[0][2])
        url = str(srv.make_url(path))
        subject, external, done = await asyncio.wait_for(
            asyncio.to_thread(drive, url, ARTIFACTS), 90
        )
        assert subject == "「月次報告」"  # data in visible quotes (issue 12)
        assert "partner.co.jp" in external and "「山田 花子」 <hanako@partner.co.jp>" in external
        assert "送信しました" in done
        assert (ARTIFACTS / "confirm-page.png").stat().st_size > 1000
        h = await r.store.get(qid)
        assert h is not None and h.state is State.RELEASED
        await r.scheduler.tick()
        assert sink.originals() == [(SENDER, RCPTS, RAW)]
    finally:
        await srv.close()
        await close(r)
        await stop(server)
