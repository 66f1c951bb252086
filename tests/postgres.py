"""A throwaway PostgreSQL server for the tests, the benchmarks, the soak and ``make cluster``.

:func:`server` gives one per process: the one ``DCP_TEST_POSTGRES`` names (a URL of a server
someone started, whose role may create databases), or a new cluster of Debian's ``postgresql``
binaries in a temporary directory, run as the ``postgres`` user when we are root (PostgreSQL
refuses to run as root). It listens on a Unix socket only, in its own directory; it is tuned
for tests (no fsync: a test database is thrown away, never recovered) and stopped at exit.

Where no server can be had, :data:`UNAVAILABLE` says why; tests that need one skip with that
reason, unless ``DCP_REQUIRE_POSTGRES=1`` (CI sets it), where they fail.
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

__all__ = ["Cluster", "server"]

#: For tests only: durability off (each test's database is thrown away).
TEST_SETTINGS = {
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_connections": "300",
    "shared_buffers": "128MB",
    "listen_addresses": "''",
    "log_min_messages": "warning",
    "autovacuum_naptime": "5s",
}


def _bindir() -> Path | None:
    found = shutil.which("pg_config")
    if found:
        out = subprocess.run([found, "--bindir"], capture_output=True, text=True)
        candidate = Path(out.stdout.strip())
        if (candidate / "initdb").exists():
            return candidate
    versions = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0,
    )
    return Path(versions[-1]).parent if versions else None


class Cluster:
    """A PostgreSQL cluster in ``directory``: initdb, start, stop, restart, databases."""

    def __init__(self, directory: Path, settings: dict[str, str] | None = None) -> None:
        bindir = _bindir()
        if bindir is None:
            raise RuntimeError(
                "no PostgreSQL server binaries (initdb): install Debian's postgresql"
                " (packaging/system-deps.sh does)"
            )
        self.bindir = bindir
        self.directory = directory
        self.data = directory / "data"
        self.socket_dir = directory
        self.settings = {**TEST_SETTINGS, **(settings or {})}
        self._as: list[str] = []
        if os.geteuid() == 0:
            try:
                pw = pwd.getpwnam("postgres")
            except KeyError:
                raise RuntimeError("running as root and there is no postgres user") from None
            os.chown(directory, pw.pw_uid, pw.pw_gid)
            self._as = ["runuser", "-u", "postgres", "--"]
            self.user = "postgres"
        else:
            self.user = pwd.getpwuid(os.geteuid()).pw_name
        self.port = 5432

    def _run(self, *argv: str) -> None:
        out = subprocess.run([*self._as, *argv], capture_output=True, text=True)
        if out.returncode:
            raise RuntimeError(f"{' '.join(argv[:2])} failed: {out.stderr.strip() or out.stdout}")

    def init(self) -> Cluster:
        self._run(
            str(self.bindir / "initdb"),
            "-D",
            str(self.data),
            "-A",
            "trust",
            "-U",
            self.user,
            "--no-sync",
        )
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.write(f"unix_socket_directories = '{self.socket_dir}'\n")
            for key, value in self.settings.items():
                conf.write(f"{key} = {value}\n")
        return self

    def start(self) -> None:
        self._run(
            str(self.bindir / "pg_ctl"),
            "-D",
            str(self.data),
            "-l",
            str(self.directory / "server.log"),
            "-w",
            "-t",
            "60",
            "start",
        )

    def stop(self, mode: str = "fast") -> None:
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop")

    def restart(self) -> None:
        self.stop()
        self.start()

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://{self.user}@/{dbname}?host={self.socket_dir}&port={self.port}"


class Server:
    """What the tests use of a server: a URL per new database, admin statements."""

    def __init__(self, admin_url: str, cluster: Cluster | None = None) -> None:
        self.admin_url = admin_url
        self.cluster = cluster

    def admin(self, sql: str, params: tuple[object, ...] | None = None) -> list[tuple[object, ...]]:
        import psycopg

        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            cur = conn.execute(sql, params)
            return cur.fetchall() if cur.description else []

    def create_database(self, prefix: str = "dcp") -> str:
        """A new empty database; its URL."""
        name = f"{prefix}_{secrets.token_hex(6)}"
        self.admin(f"CREATE DATABASE {name} STRATEGY FILE_COPY")
        base, _, query = self.admin_url.partition("?")
        base = base.rsplit("/", 1)[0]
        return f"{base}/{name}" + (f"?{query}" if query else "")

    def stop(self) -> None:
        """Stop and remove a cluster :func:`throwaway` made (again: nothing)."""
        cluster, self.cluster = self.cluster, None
        if cluster is None:
            return
        with contextlib.suppress(RuntimeError, OSError):
            cluster.stop("immediate")
        shutil.rmtree(cluster.directory, ignore_errors=True)

    def terminate_backends(self, dbname: str) -> int:
        """pg_terminate_backend for every session on ``dbname`` (but this one)."""
        rows = self.admin(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = %s AND pid <> pg_backend_pid()",
            (dbname,),
        )
        return sum(1 for (ok,) in rows if ok)


def throwaway(settings: dict[str, str] | None = None, prefix: str = "dcp-pg-") -> Server:
    """A new cluster in a temporary directory, with ``settings`` over TEST_SETTINGS; its
    :meth:`Server.stop` stops and removes it, and runs at exit if nobody called it.

    Raises:
        RuntimeError: it could not be started (no binaries, no postgres user); says why.
    """
    directory = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        cluster = Cluster(directory, settings).init()
        cluster.start()
    except (RuntimeError, OSError) as exc:
        shutil.rmtree(directory, ignore_errors=True)
        raise RuntimeError(f"no PostgreSQL server: {exc}") from None
    made = Server(cluster.url(), cluster)
    atexit.register(made.stop)
    return made


_lock = threading.Lock()
_server: Server | None = None
UNAVAILABLE: str | None = None


def required() -> bool:
    return os.environ.get("DCP_REQUIRE_POSTGRES", "") not in ("", "0")


def server() -> Server | None:
    """This process's test server, started on first use; None (UNAVAILABLE says why)."""
    global _server, UNAVAILABLE
    with _lock:
        if _server is not None or UNAVAILABLE is not None:
            return _server
        url = os.environ.get("DCP_TEST_POSTGRES")
        if url:
            _server = Server(url)
            return _server
        try:
            _server = throwaway()
        except RuntimeError as exc:
            UNAVAILABLE = str(exc)
        return _server
