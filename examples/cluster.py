"""Several schedulers on PostgreSQL, on this machine: a PostgreSQL server, two ``dcp-scheduler
serve`` replicas sharing its database, two workers that each know both replicas, the
hash-puzzle job; prints each result and where everything runs, checks every nonce, and stops
everything in order: the workers first (SIGINT: their outboxes flush to a replica still up),
then the replicas, then PostgreSQL. Ctrl-C (or SIGTERM, SIGHUP) stops the same way; a second
Ctrl-C while stopping is passed on (a worker's second signal: stop now).

Run with ``make cluster``. Everything goes to ``.cluster/`` of the checkout (``--dir``),
emptied at each start: keystores, logs, the workers' state and the PostgreSQL cluster, which
runs as the ``postgres`` user when we are root; where that user cannot reach the checkout (a
checkout under /root), the cluster goes to a directory in /tmp instead, removed at the end.
A run killed with SIGKILL leaves its processes running, listed in ``.cluster/running.json``:
``make cluster-stop`` (``examples/cluster.py --stop``) stops them in the same order.

Exit status: 0 every result verified; 1 a check failed; 2 cannot start PostgreSQL (no server
binaries, no ``postgres`` user): nothing else was started; 3 ``--dir`` names a directory that
is not empty and not one of ours (nothing is touched); 130 interrupted (stopped cleanly).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BIN = Path(sys.executable).parent
sys.path.insert(0, str(HERE / "hash-puzzle"))
sys.path.insert(0, str(ROOT))

from check import show_results  # noqa: E402

from dcp_keys.identity import load_keystore  # noqa: E402
from scheduler.client import ComputeClient  # noqa: E402
from tests.postgres import Cluster, Server  # noqa: E402

EXIT_OK = 0
EXIT_CHECK_FAILED = 1
EXIT_NO_POSTGRES = 2
EXIT_USAGE = 3
EXIT_INTERRUPTED = 130

#: The workers' graceful stop is bounded by their grace_seconds (30 s); then a second signal.
WORKER_STOP_SECONDS = 45.0
REPLICA_STOP_SECONDS = 20.0
DATABASE = "dcp"
DIFFICULTY = 20  # the job file's argv
#: In the directory of a run: what makes it ours to empty at the next one.
MARKER = ".dcp-cluster"
#: A Unix socket's path (sun_path) holds at most 107 bytes.
SOCKET_PATH_MAX = 107


@dataclass
class Child:
    """A process of the cluster: what it is, and how to find it again from another run."""

    name: str  # worker-1, replica-2
    program: str  # in its command line: how --stop knows the pid is still ours
    proc: subprocess.Popen[str]
    log: Path


class Running:
    """The cluster's processes, in ``running.json`` as they start and stop, so that
    ``--stop`` can stop what a killed run left behind."""

    def __init__(self, work: Path) -> None:
        self.path = work / "running.json"
        self.postgres: Path | None = None
        self.children: list[Child] = []

    def save(self) -> None:
        state = {
            "postgres": str(self.postgres) if self.postgres else None,
            "processes": [
                {"name": c.name, "program": c.program, "pid": c.proc.pid}
                for c in self.children
                if c.proc.returncode is None
            ],
        }
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=1) + "\n")
        tmp.replace(self.path)


def run(*args: str) -> str:
    return subprocess.run(args, check=True, capture_output=True, text=True).stdout.strip()


def shown(path: Path) -> str:
    """A path as the user typed its way there: relative to the current directory if inside."""
    with contextlib.suppress(ValueError):
        return str(path.relative_to(Path.cwd()))
    return str(path)


# ------------------------------------------------------------------ stopping


def _alive(pid: int, program: str) -> bool:
    """Whether ``pid`` runs and is still ``program`` (not a pid reused since)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return program.encode() in cmdline


def _wait_gone(pids: list[int], timeout: float) -> list[int]:
    """Wait until every pid exited (not our children: a pidfd each); those still running."""
    fds = {}
    for pid in pids:
        with contextlib.suppress(OSError):  # already gone
            fds[os.pidfd_open(pid)] = pid
    deadline = time.monotonic() + timeout
    try:
        poller = select.poll()
        for fd in fds:
            poller.register(fd, select.POLLIN)
        left = dict(fds)
        while left and (remaining := deadline - time.monotonic()) > 0:
            for fd, _ in poller.poll(remaining * 1000):
                poller.unregister(fd)
                del left[fd]
        return list(left.values())
    finally:
        for fd in fds:
            os.close(fd)


def stop_children(children: list[Child], timeout: float) -> None:
    """SIGINT to each, wait ``timeout`` for all, then SIGKILL the rest; prints exit codes.
    A Ctrl-C meanwhile is their second signal."""
    with forwarding(children):
        for child in children:
            if child.proc.poll() is None:
                child.proc.send_signal(signal.SIGINT)
        deadline = time.monotonic() + timeout
        for child in children:
            try:
                child.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                print(f"   {child.name} did not stop within {timeout:.0f} s: SIGKILL")
                child.proc.kill()
                child.proc.wait()
            if child.proc.stdout is not None:
                child.proc.stdout.close()
            print(f"   {child.name} exited {child.proc.returncode}")


def stop_postgres(directory: Path, work: Path) -> None:
    """pg_ctl stop (fast: sessions are ended, what is committed stays); a cluster outside
    ``work`` (in /tmp) is removed, its log kept as ``work/postgres.log``."""
    if (directory / "data" / "postmaster.pid").exists():
        try:
            with forwarding([]):
                Cluster(directory).stop("fast")
            print("   PostgreSQL stopped")
        except (RuntimeError, OSError) as exc:
            print(f"   PostgreSQL did not stop: {exc}")
    if not directory.is_relative_to(work):
        with contextlib.suppress(OSError):
            shutil.copyfile(directory / "server.log", work / "postgres.log")
        shutil.rmtree(directory, ignore_errors=True)


def stop_left_over(work: Path) -> bool:
    """``--stop``: stop what ``running.json`` lists (workers, replicas, PostgreSQL), in that
    order; whether there was anything."""
    path = work / "running.json"
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    for kind, timeout in (("worker", WORKER_STOP_SECONDS), ("replica", REPLICA_STOP_SECONDS)):
        mine = [
            p
            for p in state["processes"]
            if p["name"].startswith(kind) and _alive(p["pid"], p["program"])
        ]
        for p in mine:
            print(f"   {p['name']} (pid {p['pid']}): SIGINT")
            with contextlib.suppress(ProcessLookupError):
                os.kill(p["pid"], signal.SIGINT)
        for pid in _wait_gone([p["pid"] for p in mine], timeout):
            print(f"   pid {pid} did not stop within {timeout:.0f} s: SIGKILL")
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    if state["postgres"]:
        stop_postgres(Path(state["postgres"]), work)
    path.unlink()
    return True


@contextlib.contextmanager
def forwarding(children: list[Child]) -> Iterator[None]:
    """While stopping: a Ctrl-C goes on to the children being stopped (their second
    signal) instead of cutting the stop short; with none, it is ignored."""

    def forward(signum: int, frame: FrameType | None) -> None:
        for child in children:
            if child.proc.poll() is None:
                child.proc.send_signal(signal.SIGINT)

    previous = signal.signal(signal.SIGINT, forward)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


# ------------------------------------------------------------------ starting


def postgres_directory(work: Path) -> Path:
    """``work/postgres``, unless its Unix socket's path would be too long, or we are root
    and the ``postgres`` user (who runs the server) cannot reach it: then one in /tmp."""
    preferred = work / "postgres"
    preferred.mkdir()
    if len(str(preferred / ".s.PGSQL.5432")) <= SOCKET_PATH_MAX and (
        os.geteuid() != 0
        or subprocess.run(
            ["runuser", "-u", "postgres", "--", "test", "-x", str(preferred)],
            capture_output=True,
        ).returncode
        == 0
    ):
        return preferred
    preferred.rmdir()
    return Path(tempfile.mkdtemp(prefix="dcp-cluster-"))


def start_replica(name: str, url: str, work: Path) -> tuple[Child, str]:
    """``dcp-scheduler serve`` on a free loopback port; its URL from the line it prints.

    It runs in a process group of its own, so that a Ctrl-C reaches this script only and
    the stop keeps its order."""
    log = work / f"{name}.log"
    with open(log, "a") as sink:
        proc = subprocess.Popen(
            [
                str(BIN / "dcp-scheduler"),
                "-v",
                "serve",
                "--db",
                url,
                "--listen",
                "127.0.0.1:0",
                "--state-dir",
                str(work / name),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=sink,
            text=True,
            process_group=0,
        )
    child = Child(name, "dcp-scheduler", proc, log)
    assert proc.stdout is not None
    match = re.search(r"listening on (\S+)", proc.stdout.readline())
    if not match:
        proc.wait()
        raise RuntimeError(f"{name} did not start: {log.read_text()[-2000:]}")
    return child, match.group(1)


def start_worker(name: str, urls: list[str], work: Path, passphrase: Path) -> Child:
    log = work / f"{name}.log"
    schedulers = [arg for url in urls for arg in ("--scheduler", url)]
    with open(log, "a") as sink:
        proc = subprocess.Popen(
            [
                str(BIN / "dcp-worker"),
                *schedulers,
                "--identity",
                str(work / f"{name}.json"),
                "--passphrase-file",
                str(passphrase),
                "--sandboxes",
                "2",
                "--state-dir",
                str(work / name),
                "-o",
                "console",  # plain logs into its log file
            ],
            stdin=subprocess.DEVNULL,
            stdout=sink,
            stderr=subprocess.STDOUT,
            text=True,
            process_group=0,
        )
    return Child(name, "dcp-worker", proc, log)


def connections(log: Path) -> list[str]:
    """The replicas a worker's log says it connected to, in order."""
    return re.findall(r"connected to (\S+) \(session", log.read_text(errors="replace"))


# ------------------------------------------------------------------ the run


def main(work: Path, quick: bool) -> int:
    if work.is_dir() and any(work.iterdir()) and not (work / MARKER).exists():
        print(f"{work} is not empty and not a cluster's: give another --dir", file=sys.stderr)
        return EXIT_USAGE
    if stop_left_over(work):
        print("   (stopped what a previous run left running)")
    shutil.rmtree(work, ignore_errors=True)
    # Others may pass (the postgres user, to its cluster), not list; what is secret is 0600.
    work.mkdir(parents=True)
    work.chmod(0o711)
    (work / MARKER).touch()  # ours: emptied at the next run
    running = Running(work)
    with contextlib.ExitStack() as stack:
        stack.callback(running.path.unlink, missing_ok=True)  # last: all of it stopped
        print(f"1. starting PostgreSQL (a cluster of its own, in {shown(work)}/)")
        directory = postgres_directory(work)
        try:
            # The tests' settings (no fsync): this database is thrown away at the next run.
            cluster = Cluster(directory)
            running.postgres = directory
            running.save()
            stack.callback(stop_postgres, directory, work)
            cluster.init()
            cluster.start()
        except (RuntimeError, OSError) as exc:
            print(f"cannot start PostgreSQL: {exc}", file=sys.stderr)
            return EXIT_NO_POSTGRES
        Server(cluster.url()).admin(f"CREATE DATABASE {DATABASE}")
        db = cluster.url(DATABASE)
        print(
            f"   PostgreSQL {cluster.bindir.parent.name} ({cluster.bindir}), as {cluster.user},"
            f" data {shown(cluster.data)}"
        )
        print(f"   database {db}")
        kept = "" if directory.is_relative_to(work) else f", kept as {shown(work)}/postgres.log"
        print(f"   log {shown(directory / 'server.log')}{kept}")
        for line in run(str(BIN / "dcp-scheduler"), "db", "upgrade", "--db", db).splitlines():
            print(f"   db upgrade: {line}")

        print("2. starting two scheduler replicas on that database (loopback, free ports)")
        replicas: list[Child] = []
        stack.callback(lambda: stop_children(replicas, REPLICA_STOP_SECONDS))
        urls = []
        for i in (1, 2):
            replica, url = start_replica(f"replica-{i}", db, work)
            replicas.append(replica)
            running.children.append(replica)
            running.save()
            urls.append(url)
            print(
                f"   {replica.name}  {url}  pid {replica.proc.pid}  log {shown(replica.log)}"
                f"  console {url}/console/"
            )

        print("3. creating keystores (scrypt" + (", cheap: --quick" if quick else "") + ")")
        passphrase = work / "passphrase"
        with open(os.open(passphrase, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
            f.write("correct horse battery staple\n")
        cost = ["--kdf-iterations", "1024"] if quick else []
        addresses = {}
        for name in ("worker-1", "worker-2", "owner"):
            addresses[name] = run(
                str(BIN / "dcp-wallet"),
                "create",
                "--out",
                str(work / f"{name}.json"),
                "--passphrase-file",
                str(passphrase),
                *cost,
            )
            print(f"   {name:<8} {addresses[name]}")

        print("4. starting two workers (2 sandboxes each), each given both replicas")
        workers: list[Child] = []
        stack.callback(lambda: stop_children(workers, WORKER_STOP_SECONDS))
        stack.callback(print, "\n6. stopping the workers (SIGINT: graceful), replicas, PostgreSQL")
        for i, order in ((1, urls), (2, urls[::-1])):  # each replica is someone's first
            worker = start_worker(f"worker-{i}", order, work, passphrase)
            workers.append(worker)
            running.children.append(worker)
            running.save()
            given = " ".join(f"--scheduler {url}" for url in order)
            print(
                f"   {worker.name}  pid {worker.proc.pid}  {given}  log {shown(worker.log)}"
                f"  state {shown(work / worker.name)}"
            )

        job_file = HERE / "hash-puzzle" / "job.toml"
        print(f"5. deploying {job_file.relative_to(ROOT)} through both replicas' URLs")
        run(str(BIN / "dcp-scheduler"), "bank", "mint", "--db", db, addresses["owner"], "1")
        owner = load_keystore(work / "owner.json", passphrase.read_bytes().rstrip(b"\n"))
        prefixes = (HERE / "hash-puzzle" / "prefixes.txt").read_bytes().splitlines()
        failures = 0
        started = time.monotonic()
        with ComputeClient(urls, owner) as client:
            job = client.deploy(job_file)
            print(f"   job {job} at {client.base}: {len(prefixes)} slices\n")
            print("   results, in slice order, checked again here with hashlib:")
            results = client.results(job, wait=True, timeout=600)
            failures += show_results(results, prefixes, DIFFICULTY)
            elapsed = time.monotonic() - started
            print()
            for name in ("worker-1", "worker-2"):
                earned = client.account(addresses[name])["balance"]
                seen = ", then ".join(connections(work / f"{name}.log")) or "no replica"
                print(f"   {name} earned {earned:.6f} credits, connected to {seen}")
        verified = len(prefixes) - failures
        print(f"\n   {verified}/{len(prefixes)} puzzle results verified in {elapsed:.1f} s")
    clean = all(c.proc.returncode == 0 for c in running.children)
    return EXIT_OK if failures == 0 and clean else EXIT_CHECK_FAILED


def interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument(
        "--dir", type=Path, default=ROOT / ".cluster", help="where it all goes [.cluster/]"
    )
    parser.add_argument(
        "--quick", action="store_true", help="cheap keystores (for the tests; not for use)"
    )
    parser.add_argument(
        "--stop", action="store_true", help="stop what a killed run left running, and exit"
    )
    options = parser.parse_args()
    work = options.dir.resolve()
    if options.stop:
        if not stop_left_over(work):
            print(f"nothing left running ({work / 'running.json'} lists nothing)")
        sys.exit(EXIT_OK)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, interrupt)
    try:
        sys.exit(main(work, options.quick))
    except KeyboardInterrupt:
        print("\ninterrupted: everything stopped", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
