"""The milter port obeys smtp.allowed_networks like the SMTP port: a milter peer can make
MailGuard relay (a rewrite, a release), so an unlisted one is closed before a byte is read.

`mailguard serve --milter` as a real process; the peer speaks the milter option negotiation
(SMFIC_OPTNEG) over loopback, the first packet Postfix sends. The full milter path with a real
Postfix is in test_postfix_milter.py."""

from __future__ import annotations

import contextlib
import socket
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

from conftest import free_port, start_serve, wait_port

# SMFIC_OPTNEG: version 6, every action, every protocol flag (as Postfix 3.7 offers)
OPTNEG = struct.pack(">I", 13) + b"O" + struct.pack(">III", 6, 0x1FF, 0x1FFFFF)


def negotiate(port: int) -> bytes:
    """What the milter port answers to an option negotiation (b"" = closed without a word)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(OPTNEG)
        got = b""
        try:
            while len(got) < 5:
                chunk = s.recv(4096)
                if not chunk:
                    break
                got += chunk
        except ConnectionResetError:
            pass
        return got


@contextlib.contextmanager
def serve_milter(tmp_path: Path, networks: str) -> Iterator[tuple[int, subprocess.Popen[bytes]]]:
    cfg = tmp_path / "mg.toml"
    cfg.write_text(f"[smtp]\nallowed_networks = {networks}\n")
    port, milter = free_port(), free_port()
    p = start_serve(
        [
            "-c", str(cfg), "--listen", f"127.0.0.1:{port}", "--milter", f"127.0.0.1:{milter}",
            "--upstream", f"127.0.0.1:{free_port()}", "--store", str(tmp_path / "mg.db"),
            "--no-web",
        ],
        log=tmp_path / "serve.log",
    )  # fmt: skip
    try:
        wait_port(milter)
        yield milter, p
    finally:
        p.terminate()
        p.wait(30)


def test_a_listed_peer_gets_the_negotiation_answer(tmp_path: Path) -> None:
    with serve_milter(tmp_path, '["127.0.0.0/8"]') as (milter, _):
        reply = negotiate(milter)
    assert reply[4:5] == b"O", reply  # SMFIC_OPTNEG back: the milter speaks


def test_an_unlisted_peer_is_closed_and_logged(tmp_path: Path) -> None:
    with serve_milter(tmp_path, '["192.0.2.0/24"]') as (milter, proc):
        assert negotiate(milter) == b""
        assert proc.poll() is None, "the server keeps serving"
    log = (tmp_path / "serve.log").read_text()
    assert "milter: refused" in log and "not in smtp.allowed_networks" in log
