"""Starting an evaluator process with every isolation layer this machine allows.

Layers, applied in the child between fork and exec (see docs/sandbox.md for which hold where):

* an empty environment, a private working directory, no inherited file descriptors
  (the caller's ``subprocess`` arguments);
* resource limits: address space, CPU seconds, open files, file size, processes, no core dumps;
* a new network namespace (no interfaces but a down loopback): as root directly, otherwise
  inside a new user namespace when the kernel allows unprivileged ones;
* when started as root: all supplementary groups dropped, then the group and user of an
  unprivileged account (``nobody`` by default);
* ``PR_SET_NO_NEW_PRIVS``: nothing it executes can gain privileges;
* ``PR_SET_PDEATHSIG`` = SIGKILL: the evaluator dies with the process that started it (the
  worker, or the manager), even when that one is SIGKILLed.

A layer the kernel refuses is skipped, and :func:`probe_layers` reports which ones hold.
"""

from __future__ import annotations

import ctypes
import functools
import os
import pwd
import resource
import signal
import stat
import sys
from dataclasses import dataclass

__all__ = ["SandboxLimits", "Hardening", "evaluator_command", "probe_layers"]

_CLONE_NEWUSER = 0x10000000
_CLONE_NEWNET = 0x40000000
_PR_SET_PDEATHSIG = 1
_PR_SET_NO_NEW_PRIVS = 38
#: Exit status of a child whose parent died before its death signal was armed.
EXIT_ORPHANED = 125


@dataclass(frozen=True)
class SandboxLimits:
    """Resource limits of an evaluator process (the wasm layer has its own, finer ones)."""

    #: Virtual address space. wasmtime reserves address space for linear memories up front,
    #: so this is generous; the wasm memory cap is the tight one.
    address_space_bytes: int = 16 * 1024**3
    cpu_seconds: int = 24 * 3600
    open_files: int = 64
    file_size_bytes: int = 256 * 1024 * 1024
    #: Per *user*, threads included: applied only after dropping to a dedicated account, since
    #: a desktop user's own processes would otherwise count against it.
    processes: int = 64


@dataclass(frozen=True)
class Hardening:
    """What to apply in the child. ``user`` is used only when started as root."""

    limits: SandboxLimits = SandboxLimits()
    network_namespace: bool = True
    user: str = "nobody"
    no_new_privileges: bool = True

    def target_ids(self) -> tuple[int, int] | None:
        """(uid, gid) to drop to; None when not root (nothing to drop), or when that user could
        not run the evaluator (the interpreter or its packages are not readable by others, as
        under /root): then the drop is skipped, and :func:`probe_layers` says so."""
        if os.geteuid() != 0:
            return None
        try:
            entry = pwd.getpwnam(self.user)
        except KeyError:
            return None
        if not _runnable_by_others():
            return None
        return entry.pw_uid, entry.pw_gid

    def runs_as(self) -> int:
        """The user an evaluator started with these settings runs as, seen from here (inside
        its user namespace it cannot tell: an unmapped id reads as the overflow id)."""
        ids = self.target_ids()
        return ids[0] if ids is not None else os.geteuid()

    def preexec(self, parent_pid: int | None = None) -> None:
        """Runs in the child after fork, before exec. Must not raise for a missing layer.

        ``parent_pid`` is the pid of the process that forks (``os.getpid()`` taken before the
        fork, e.g. with ``functools.partial``): the child is SIGKILLed when it dies, and exits
        at once if it died already. The death signal fires when the forking *thread* ends:
        asyncio forks from its loop thread, and both the worker and the manager run their
        loop in the main thread, which lives as long as the process.
        """
        limits = self.limits
        ids = self.target_ids()
        settings = [
            (resource.RLIMIT_AS, limits.address_space_bytes),
            (resource.RLIMIT_CPU, limits.cpu_seconds),
            (resource.RLIMIT_NOFILE, limits.open_files),
            (resource.RLIMIT_FSIZE, limits.file_size_bytes),
            (resource.RLIMIT_CORE, 0),
        ]
        if ids is not None:
            settings.append((resource.RLIMIT_NPROC, limits.processes))
        for which, value in settings:
            soft, hard = resource.getrlimit(which)
            cap = value if hard == resource.RLIM_INFINITY else min(value, hard)
            try:
                resource.setrlimit(which, (cap, cap))
            except (ValueError, OSError):
                pass
        libc = ctypes.CDLL(None, use_errno=True)
        if self.network_namespace:
            # As root, a bare network namespace; otherwise a user namespace makes it possible.
            flags = _CLONE_NEWNET if ids is not None else _CLONE_NEWUSER | _CLONE_NEWNET
            libc.unshare(flags)  # failure leaves the process in the host's namespace
        if ids is not None:
            uid, gid = ids
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
        if self.no_new_privileges:
            libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
        # After the uid change: changing credentials clears the parent-death signal.
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if parent_pid is not None and os.getppid() != parent_pid:
            os._exit(EXIT_ORPHANED)  # the parent died between fork and prctl


def _runnable_by_others() -> bool:
    """Whether a user other than the owner can run the evaluator with this interpreter."""
    import wasmtime

    import evaluator

    paths = [
        os.path.realpath(sys.executable),
        os.path.dirname(os.__file__),
        os.path.dirname(evaluator.__file__),
        os.path.dirname(wasmtime.__file__),
    ]
    for path in paths:
        parts = path.split(os.sep)
        for i in range(2, len(parts) + 1):
            try:
                mode = os.stat(os.sep.join(parts[:i])).st_mode
            except OSError:
                return False
            need = stat.S_IXOTH if stat.S_ISDIR(mode) or i == len(parts) else stat.S_IROTH
            if not mode & need:
                return False
    return True


def evaluator_command(
    withhold_opencl: str | None = None,
    runs_as: int | None = None,
    interpreters: str | None = None,
) -> list[str]:
    """The evaluator, run by this interpreter in isolated mode (no user site, no env vars);
    ``withhold_opencl``: it offers and runs no OpenCL, and says this reason in describe;
    ``runs_as``: the user it runs as (:meth:`Hardening.runs_as`), which describe reports;
    ``interpreters``: where the python and js interpreters are installed (default: the
    starter's :func:`evaluator.interpreters.interpreters_dir`, which the evaluator, with an
    empty environment, could not compute)."""
    from .interpreters import interpreters_dir

    command = [sys.executable, "-I", "-m", "evaluator", "--stdio"]
    command += ["--interpreters", interpreters or str(interpreters_dir())]
    if withhold_opencl is not None:
        command += ["--withhold-opencl", withhold_opencl]
    if runs_as is not None:
        command += ["--runs-as", str(runs_as)]
    return command


def probe_layers(hardening: Hardening) -> dict[str, bool]:
    """Start a throw-away child with ``hardening`` and report which layers hold in it."""
    import json
    import subprocess

    probe = (
        "import json, os, resource, socket\n"
        "status = open('/proc/self/status').read()\n"
        "nnp = any(x.split()[1] == '1' for x in status.splitlines()\n"
        "          if x.startswith('NoNewPrivs'))\n"
        "try:\n"
        "    socket.create_connection(('127.0.0.1', 9), timeout=1).close(); net = True\n"
        "except OSError as exc:\n"
        "    net = exc.errno not in (101, 99)  # ENETUNREACH / EADDRNOTAVAIL: no network\n"
        "print(json.dumps({'no_new_privileges': nnp, 'network_namespace': not net,\n"
        "    'rlimits': resource.getrlimit(resource.RLIMIT_NOFILE)[0] <= 4096}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-I", "-c", probe],
        capture_output=True,
        text=True,
        env={},
        cwd="/",
        close_fds=True,
        preexec_fn=functools.partial(hardening.preexec, os.getpid()),
        timeout=30,
    )
    if out.returncode != 0:
        return {"error": False}
    result: dict[str, bool] = json.loads(out.stdout)
    # Judged from outside: inside a user namespace every uid looks unprivileged.
    result["unprivileged_user"] = os.geteuid() != 0 or hardening.target_ids() is not None
    return result
