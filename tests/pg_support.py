"""A private PostgreSQL cluster for the tests: initdb + pg_ctl under a temp dir, on a free
loopback port, run as an unprivileged user when the tests run as root (PostgreSQL refuses root).

`PgCluster.start()` once per session (see the `pg_cluster` fixture in conftest); `new_database()`
gives each test an empty database and its URL. Skipped where Debian's `postgresql` is missing,
unless MAILGUARD_REQUIRE_TOOLS=1.
"""

from __future__ import annotations

import atexit
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path


def pg_bindir() -> Path | None:
    """The newest /usr/lib/postgresql/<ver>/bin, else the directory of `initdb` on PATH."""
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: (
            int(Path(p).parent.parent.name) if Path(p).parent.parent.name.isdigit() else 0
        ),
    )
    if found:
        return Path(found[-1]).parent
    which = shutil.which("initdb")
    return Path(which).resolve().parent if which else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run_as() -> str | None:
    """The user to run the server as: None when we are not root, else `postgres` or `nobody`."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    raise RuntimeError("running as root and no unprivileged user (postgres, nobody) exists")


class PgCluster:
    def __init__(self, bindir: Path, *, fsync: bool = False, base: Path | None = None) -> None:
        self.bindir = bindir
        self.user = _run_as()
        self.dir = Path(tempfile.mkdtemp(prefix="mailguard-pg-", dir=base))
        self.data = self.dir / "data"
        self.port = free_port()
        self.fsync = fsync
        self.log = self.dir / "server.log"

    def _cmd(self, *args: str) -> list[str]:
        if self.user is None:
            return list(args)
        return ["runuser", "-u", self.user, "--", *args]

    def _chown(self) -> None:
        if self.user is not None:
            pw = pwd.getpwnam(self.user)
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
            os.chmod(self.dir, 0o700)

    @property
    def admin_url(self) -> str:
        return f"postgresql://mailguard@127.0.0.1:{self.port}/postgres"

    def url(self, db: str) -> str:
        return f"postgresql://mailguard@127.0.0.1:{self.port}/{db}"

    def start(self) -> PgCluster:
        # Stopped at interpreter exit too: a test killed by an error (or Ctrl-C) outside the
        # fixture's finally must not leave a server running. stop() is idempotent.
        atexit.register(self.stop)
        self._chown()
        env = {**os.environ, "LC_ALL": "C", "TZ": "UTC"}
        subprocess.run(
            self._cmd(
                str(self.bindir / "initdb"),
                "-D",
                str(self.data),
                "-U",
                "mailguard",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--no-instructions",
            ),
            check=True,
            capture_output=True,
            env=env,
            cwd=self.dir,
        )
        self.server_start()
        return self

    def server_start(self) -> None:
        opts = (
            f"-c listen_addresses=127.0.0.1 -c port={self.port} "
            f"-c unix_socket_directories={self.dir} -c max_connections=200 "
            f"-c fsync={'on' if self.fsync else 'off'} "
            f"-c full_page_writes={'on' if self.fsync else 'off'}"
        )
        subprocess.run(
            self._cmd(
                str(self.bindir / "pg_ctl"),
                "-D",
                str(self.data),
                "-l",
                str(self.log),
                "-o",
                opts,
                "-w",
                "-t",
                "60",
                "start",
            ),
            check=True,
            capture_output=True,
            env={**os.environ, "LC_ALL": "C", "TZ": "UTC"},
            cwd=self.dir,
        )

    def server_stop(self, mode: str = "fast") -> None:
        subprocess.run(
            self._cmd(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop"),
            check=False,
            capture_output=True,
            cwd=self.dir,
        )

    def psql(self, db: str, sql: str) -> str:
        out = subprocess.run(
            [
                str(self.bindir / "psql"),
                "-X",
                "-q",
                "-t",
                "-A",
                "-v",
                "ON_ERROR_STOP=1",
                "-d",
                self.url(db),
                "-c",
                sql,
            ],
            check=True,
            capture_output=True,
            text=True,
        )
        return out.stdout.strip()

    def new_database(self) -> str:
        name = "t_" + uuid.uuid4().hex[:12]
        self.psql("postgres", f"CREATE DATABASE {name}")
        return self.url(name)

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                self.psql("postgres", "SELECT 1")
                return
            except subprocess.CalledProcessError:
                time.sleep(0.2)
        raise TimeoutError("PostgreSQL did not come back")

    def stop(self) -> None:
        if not self.dir.exists():
            return
        self.server_stop("immediate")
        shutil.rmtree(self.dir, ignore_errors=True)
        atexit.unregister(self.stop)


# -- pytest fixtures (import them into a test module: `from pg_support import pg_cluster, …`) --

import pytest  # noqa: E402


def require_pg() -> Path:
    bindir = pg_bindir()
    if bindir is None:
        if os.environ.get("MAILGUARD_REQUIRE_TOOLS"):
            pytest.fail("PostgreSQL (initdb, pg_ctl) is required (MAILGUARD_REQUIRE_TOOLS is set)")
        pytest.skip("PostgreSQL server binaries (Debian's postgresql) not installed")
    return bindir


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    """One private cluster for the whole session (stopped and removed at the end)."""
    cluster = PgCluster(require_pg()).start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def pg_url(pg_cluster: PgCluster) -> str:
    """An empty database of its own for one test."""
    return pg_cluster.new_database()
