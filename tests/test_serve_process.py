"""`mailguard serve` as a real process: start-up errors, SIGTERM with mail in flight, SIGHUP reload,
--workers, and the README's demo command."""

from __future__ import annotations

import os
import signal
import smtplib
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, ThreadSink, free_port, mailguard_cmd, start_serve, wait_port

MSG = b"From: a@example.co.jp\r\nTo: b@example.co.jp\r\nSubject: %d\r\n\r\nbody %d\r\n"


def serve_args(tmp_path: Path, port: int, up: int, *extra: str) -> list[str]:
    return [
        "--listen", f"127.0.0.1:{port}", "--upstream", f"127.0.0.1:{up}",
        "--store", str(tmp_path / "mg.db"), "--no-web", "--log-level", "info", *extra,
    ]  # fmt: skip


def send(port: int, i: int, rcpt: str = "b@example.co.jp") -> tuple[int, bytes]:
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=20) as c:
            c.sendmail("a@example.co.jp", [rcpt], MSG % (i, i))
            return 250, b""
    except smtplib.SMTPDataError as e:
        return e.smtp_code, e.smtp_error
    except (smtplib.SMTPException, OSError) as e:
        return 0, str(e).encode()


def test_bad_config_stops_startup_with_file_line_key(tmp_path: Path) -> None:
    cfg = tmp_path / "mg.toml"
    cfg.write_text('[smtp]\nlisten = "127.0.0.1:10025"\nmax_message_size = "ten"\n')
    r = subprocess.run(
        [*mailguard_cmd(), "serve", "-c", str(cfg)], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 2
    assert f"{cfg}:3: smtp.max_message_size:" in r.stderr
    assert "Traceback" not in r.stderr
    bad_policy = tmp_path / "p.toml"
    bad_policy.write_text(
        '[[rule]]\nname = "x"\nwhen = "attachment.unencrypted"\naction = "zipp"\n'
    )
    r = subprocess.run(
        [*mailguard_cmd(), "serve", "--policy", str(bad_policy)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert r.returncode == 2 and f"{bad_policy}:4:" in r.stderr and "zipp" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize(
    ("table", "key"), [("smtp", "allowed_networks"), ("web", "trusted_proxies")]
)
def test_a_bad_network_list_names_its_file_line_and_key(
    tmp_path: Path, table: str, key: str
) -> None:
    cfg = tmp_path / "mg.toml"
    cfg.write_text(f'[{table}]\n{key} = ["127.0.0.0/8", "10.0.0.300/8"]\n')
    r = subprocess.run(
        [*mailguard_cmd(), "serve", "-c", str(cfg)], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 2
    assert f"{cfg}:2: {table}.{key}: not an IP network: '10.0.0.300/8'" in r.stderr
    assert "Traceback" not in r.stderr


def test_sigterm_with_mail_in_flight_loses_nothing(tmp_path: Path) -> None:
    sink = ThreadSink(delay=0.3)  # slow upstream: transactions are in flight at SIGTERM
    port = free_port()
    proc = start_serve(serve_args(tmp_path, port, sink.port), log=tmp_path / "serve.log")
    try:
        wait_port(port)
        results: dict[int, tuple[int, bytes]] = {}

        def worker(start: int) -> None:
            for i in range(start, start + 10):
                results[i] = send(port, i)

        threads = [threading.Thread(target=worker, args=(k * 100,)) for k in range(8)]
        for t in threads:
            t.start()
        time.sleep(0.8)
        proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(60)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        sink.stop()
    delivered = {int(g[2].split(b"Subject: ")[1].split(b"\r\n")[0]) for g in sink.sink.got}
    accepted = {i for i, (code, _) in results.items() if code == 250}
    assert accepted, "nothing was accepted before SIGTERM"
    assert accepted <= delivered, f"answered 250 but missing upstream: {accepted - delivered}"
    assert len(accepted) < len(results), "SIGTERM came too late to test anything"
    log = (tmp_path / "serve.log").read_text()
    assert "Traceback" not in log


def test_sighup_reload_keeps_old_config_when_new_one_is_bad(tmp_path: Path) -> None:
    sink1, sink2 = ThreadSink(), ThreadSink()
    port = free_port()
    cfg = tmp_path / "mg.toml"
    body = '[smtp]\nlisten = "127.0.0.1:%d"\n[upstream]\naddress = "127.0.0.1:%d"\n'
    cfg.write_text(body % (port, sink1.port))
    proc = start_serve(
        ["-c", str(cfg), "--store", str(tmp_path / "mg.db"), "--no-web"],
        log=tmp_path / "serve.log",
    )
    try:
        wait_port(port)
        assert send(port, 1)[0] == 250
        cfg.write_text(body % (port, sink1.port) + "bogus = 1\n")  # [upstream].bogus: refused
        proc.send_signal(signal.SIGHUP)
        time.sleep(1.0)
        assert send(port, 2)[0] == 250
        cfg.write_text(body % (port, sink2.port))  # good: the new upstream is used
        proc.send_signal(signal.SIGHUP)
        time.sleep(1.0)
        assert send(port, 3)[0] == 250
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        sink1.stop()
        sink2.stop()
    assert len(sink1.sink.got) == 2 and len(sink2.sink.got) == 1
    log = (tmp_path / "serve.log").read_text()
    assert "reload refused" in log and "upstream.bogus: unknown key" in log
    assert "configuration reloaded" in log


def test_workers_share_the_port(tmp_path: Path) -> None:
    sink = ThreadSink()
    port = free_port()
    proc = start_serve(
        serve_args(tmp_path, port, sink.port, "--workers", "2"), log=tmp_path / "serve.log"
    )
    try:
        wait_port(port)
        time.sleep(1.0)  # both workers up
        codes = [send(port, i)[0] for i in range(30)]
        assert codes == [250] * 30
        children = subprocess.run(
            ["pgrep", "-P", str(proc.pid)], capture_output=True, text=True
        ).stdout.split()
        assert len(children) == 2
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        sink.stop()
    assert len(sink.sink.got) == 30
    lines = (tmp_path / "serve.log").read_text().splitlines()
    pids = {ln.split("[")[1].split("]")[0] for ln in lines if "decision=pass" in ln}
    assert len(pids) == 2, "one worker took every connection"


def test_readme_demo_command_runs(tmp_path: Path) -> None:
    """The README's first command ends in `mailguard demo`: it must tell the whole story."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "mailguard demo" in readme.split("```")[1]
    env: dict[str, Any] = dict(os.environ)
    r = subprocess.run(
        [*mailguard_cmd(), "demo", "--dir", str(tmp_path / "demo")],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert "bytes unchanged: True" in out
    assert "held as" in out and "still held: True" in out
    assert "The held message was delivered" in out


@pytest.mark.parametrize("flag", ["--listen", "--upstream", "--web"])
def test_bad_address_flags_are_refused(flag: str) -> None:
    r = subprocess.run(
        [*mailguard_cmd(), "serve", flag, "nonsense"], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 2 and "HOST:PORT" in r.stderr and "Traceback" not in r.stderr
