"""A sandbox: one evaluator process, reached over its stdin/stdout (or one connection to the
evaluator manager), and its lifecycle.

The worker starts the evaluator with an empty environment, a private empty working directory,
no inherited file descriptors and a core-size limit of 0. One exchange at a time per sandbox:
a batch of slices goes to the evaluator in one write and it answers each in turn, in order.
Each reply must come within the job's wall-clock limit plus a margin of the one before, or
the evaluator is killed; one that dies fails the slices it had not answered with a named
reason, and the next batch starts a fresh one.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import os
import shutil
import socket
import struct
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dcp_protocol import (
    EVALUATOR_MESSAGES,
    Ack,
    Assign,
    Capabilities,
    DcpError,
    Describe,
    Die,
    Error,
    ErrorCode,
    JobSpec,
    Limits,
    Message,
    Metrics,
    Progress,
    ProtocolError,
    RunSlice,
    SliceDone,
    StreamDecoder,
    frame,
)

from .errors import MAY_END_EVALUATOR
from .launch import Hardening, evaluator_command
from .manager import TOKEN_PREFIX

__all__ = ["Sandbox", "SliceFailure"]

log = logging.getLogger("dcp.worker.sandbox")

_MARGIN = 5.0
_ASSIGN_TIMEOUT = 120.0
_STDERR_LINES = 20


async def _connect(
    endpoint: str, token_file: str = ""
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect to an evaluator manager: ``tcp://HOST:PORT`` (sending the secret in
    ``token_file`` first), ``unix:PATH`` or a path (the manager checks peer credentials).

    Raises:
        OSError: it cannot be reached, or the token file cannot be read.
    """
    if endpoint.startswith("tcp://"):
        token = _read_token(token_file) if token_file else b""
        host, _, port = endpoint.removeprefix("tcp://").rpartition(":")
        reader, writer = await asyncio.open_connection(host.strip("[]"), int(port))
        if token:
            writer.write(TOKEN_PREFIX + token + b"\n")
        return reader, writer
    path = endpoint.removeprefix("unix:")
    reader, writer = await asyncio.open_unix_connection(path)
    # Whoever serves the socket runs our slices and sees their data: only root (the packaged
    # manager) or this worker's own user. A default path in /tmp could be anyone's.
    sock = writer.get_extra_info("socket")
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, _gid = struct.unpack("3i", creds)
    if uid not in (0, os.geteuid()):
        writer.close()
        raise PermissionError(
            f"{path} is served by uid {uid} (pid {pid}), not root or this worker's user"
        )
    return reader, writer


def _outcome(reply: Message) -> tuple[bytes, Metrics] | SliceFailure:
    """What an evaluator's reply to a slice says of it."""
    if isinstance(reply, SliceDone):
        return reply.result, reply.metrics
    if isinstance(reply, Error):
        return SliceFailure(reply.code, reply.message)
    return SliceFailure(ErrorCode.EVALUATOR_PROTOCOL.value, f"slice got {reply.type}")


def _read_token(path: str) -> bytes:
    return Path(path).read_bytes().strip()


class SliceFailure(DcpError):
    """A slice failed in the sandbox, as its handle sees it; ``code`` is the wire reason.

    One failure, one name per side: the evaluator raises :class:`evaluator.errors.SliceError`
    inside its process and answers with the code; this handle returns (or raises) it as a
    ``SliceFailure``; the worker reports it to the scheduler in a ``slice_failed`` message."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class Sandbox:
    """One evaluator: a child process started here (hardened by ``hardening``), or a
    connection to ``dcp-evaluator-manager`` (``endpoint`` = ``tcp://127.0.0.1:9000`` or a
    Unix socket path), which starts one per connection."""

    def __init__(
        self,
        index: int,
        command: list[str] | None = None,
        slices_per_evaluator: int = 10000,
        endpoint: str | None = None,
        hardening: Hardening | None = None,
        runtime_options: dict[str, dict[str, Any]] | None = None,
        token_file: str = "",
    ) -> None:
        self.index = index
        #: For a tcp:// endpoint: the file with the manager's secret.
        self.token_file = token_file
        #: The worker's settings per runtime, sent with each assignment (e.g. banned devices).
        self.runtime_options = runtime_options or {}
        self.hardening = hardening or Hardening()
        self.command = command or evaluator_command(runs_as=self.hardening.runs_as())
        self.slices_per_evaluator = slices_per_evaluator
        self.endpoint = endpoint
        self._proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.StreamReader | None = None
        self._stdin: asyncio.StreamWriter = None  # type: ignore[assignment]
        self._decoder = StreamDecoder(EVALUATOR_MESSAGES)
        self._stderr: collections.deque[str] = collections.deque(maxlen=_STDERR_LINES)
        self._stderr_task: asyncio.Task[None] | None = None
        self._workdir: str | None = None
        self._next_id = 0
        self._slices_run = 0
        self._assigned: tuple[str, str, tuple[str, ...], Limits] | None = None

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Start (or connect to) a fresh evaluator.

        Raises:
            SliceFailure: EVALUATOR_DIED when the manager cannot be reached.
        """
        self._decoder = StreamDecoder(EVALUATOR_MESSAGES)
        self._stderr.clear()
        self._assigned = None
        self._slices_run = 0
        if self.endpoint is not None:
            try:
                self._reader, writer = await _connect(self.endpoint, self.token_file)
            except OSError as exc:
                raise SliceFailure(
                    ErrorCode.EVALUATOR_DIED.value,
                    f"cannot reach the evaluator manager at {self.endpoint}: {exc}",
                ) from None
            self._stdin = writer
            return
        self._workdir = tempfile.mkdtemp(prefix=f"dcp-sandbox-{self.index}-")
        ids = self.hardening.target_ids()
        if ids is not None:
            os.chown(self._workdir, *ids)
        self._proc = await asyncio.create_subprocess_exec(
            *self.command,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env={},
            cwd=self._workdir,
            close_fds=True,
            preexec_fn=functools.partial(self.hardening.preexec, os.getpid()),
            start_new_session=True,
        )
        assert self._proc.stdout is not None and self._proc.stdin is not None
        self._reader = self._proc.stdout
        self._stdin = self._proc.stdin
        self._stderr_task = asyncio.create_task(self._pump_stderr(self._proc))
        log.debug("sandbox %d: evaluator pid %d", self.index, self._proc.pid)

    async def _pump_stderr(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stderr is not None
        async for raw in proc.stderr:
            line = raw.decode("utf-8", "replace").rstrip()
            self._stderr.append(line)
            log.debug("sandbox %d evaluator: %s", self.index, line)

    @property
    def running(self) -> bool:
        if self.endpoint is not None:
            return self._reader is not None and not self._reader.at_eof()
        return self._proc is not None and self._proc.returncode is None

    async def stop(self, graceful: bool = True) -> None:
        proc, self._proc = self._proc, None
        reader, self._reader = self._reader, None
        self._assigned = None
        if self.endpoint is not None and reader is not None:
            # The manager kills the evaluator when its connection closes.
            with contextlib.suppress(OSError, RuntimeError):
                if graceful:
                    self._stdin.write(frame(Die(id=0)))
                self._stdin.close()
            return
        if proc is not None and proc.returncode is None:
            if graceful and proc.stdin is not None:
                with contextlib.suppress(OSError, RuntimeError):
                    proc.stdin.write(frame(Die(id=0)))
                    proc.stdin.close()
                try:
                    await asyncio.wait_for(proc.wait(), 2.0)
                except TimeoutError:
                    pass
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
            # Read what it left unread to the end: a pipe paused with replies nobody took (a
            # batch abandoned on a timeout) never reports its end, and wait() waits for it.
            if reader is not None:
                with contextlib.suppress(TimeoutError, OSError):
                    async with asyncio.timeout(5):
                        while await reader.read(1 << 16):
                            pass
            await proc.wait()
        if self._stderr_task is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(self._stderr_task, 1.0)
            self._stderr_task = None
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    # ------------------------------------------------------------------ requests

    async def _request(
        self,
        message: Describe | Assign | RunSlice,
        timeout: float,
        on_progress: Callable[[float], None] | None = None,
    ) -> Message:
        replies: list[Message] = []
        await self._exchange(
            [message],
            timeout,
            None if on_progress is None else (lambda _i, fraction: on_progress(fraction)),
            replies,
        )
        return replies[0]

    async def _exchange(
        self,
        messages: list[Describe | Assign | RunSlice],
        timeout: float,
        on_progress: Callable[[int, float], None] | None,
        replies: list[Message],
    ) -> None:
        """Write ``messages`` in one go and collect one reply each, in order, into
        ``replies`` (filled as they come, so a caller sees what arrived before a failure).
        Each reply must come within ``timeout`` of the previous one.

        Raises:
            SliceFailure: the evaluator died, timed out (it is killed) or broke the protocol.
        """
        reader = self._reader
        assert reader is not None
        # The requests are written while the replies are read: waiting for the whole batch to
        # be taken first deadlocked once the replies filled the evaluator's stdout pipe (a batch
        # of 16 KiB slices: the evaluator blocked writing, so it stopped reading).
        drained: asyncio.Future[None] | None = None
        try:
            # Binary frames: a datum or module goes as it is, not as base64 in JSON (an
            # evaluator answers a binary slice in binary).
            self._stdin.write(b"".join(frame(m, binary=True) for m in messages))
            drained = asyncio.ensure_future(self._stdin.drain())
            for index, message in enumerate(messages):
                rid = message.id
                async with asyncio.timeout(timeout):
                    while True:
                        try:
                            reply = self._decoder.next_message()
                        except ProtocolError as exc:
                            raise SliceFailure(
                                ErrorCode.EVALUATOR_PROTOCOL.value,
                                f"evaluator sent a bad frame: {exc.message}",
                            ) from None
                        if reply is None:
                            chunk = await reader.read(1 << 16)
                            if not chunk:
                                raise SliceFailure(
                                    ErrorCode.EVALUATOR_DIED.value, await self._death()
                                )
                            self._decoder.receive_data(chunk)
                            continue
                        if isinstance(reply, Progress):
                            if reply.re == rid and on_progress is not None:
                                on_progress(index, reply.fraction)
                            continue
                        if (
                            self.endpoint is not None
                            and isinstance(reply, Error)
                            and reply.re is None
                        ):
                            # The manager's word on the connection (machine_busy, preempted,
                            # a refusal): it closes it, so every request left gets the same.
                            replies.extend([reply] * (len(messages) - index))
                            await self.stop(graceful=False)
                            return
                        if getattr(reply, "re", None) in (rid, None):
                            replies.append(reply)
                            break
            await drained  # every reply is in, so every request was taken
        except TimeoutError:
            await self.stop(graceful=False)
            raise SliceFailure(
                ErrorCode.EVALUATOR_TIMEOUT.value,
                f"no answer within {timeout:g} s; the evaluator was killed",
            ) from None
        except (BrokenPipeError, ConnectionResetError):
            raise SliceFailure(ErrorCode.EVALUATOR_DIED.value, await self._death()) from None
        except SliceFailure:
            await self.stop(graceful=False)
            raise
        finally:
            if drained is not None and not drained.done():
                drained.cancel()
            elif drained is not None and not drained.cancelled():
                drained.exception()  # retrieved: a dead evaluator is reported from the reads

    async def _death(self) -> str:
        if self.endpoint is not None:
            return f"the evaluator manager at {self.endpoint} closed the connection"
        proc = self._proc
        code = None
        if proc is not None:
            with contextlib.suppress(TimeoutError):
                code = await asyncio.wait_for(proc.wait(), 2.0)
        if self._stderr_task is not None:
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(self._stderr_task), 1.0)
        how = (
            f"killed by signal {-code}"
            if code is not None and code < 0
            else f"exited with status {code}"
        )
        tail = self._stderr[-1] if self._stderr else ""
        return f"the evaluator {how}" + (f" ({tail})" if tail else "")

    def _id(self) -> int:
        self._next_id += 1
        return self._next_id

    def spare(self) -> Sandbox:
        """Another sandbox with the same settings (a probe beside this one)."""
        return Sandbox(
            -1,
            self.command,
            self.slices_per_evaluator,
            self.endpoint,
            self.hardening,
            self.runtime_options,
            self.token_file,
        )

    async def describe(self) -> dict[str, Any]:
        """The evaluator's capabilities.

        Raises:
            SliceFailure: it failed to start or answer; or the manager refused it
                (``machine_busy`` with the manager's reason, or a refusal of this client).
        """
        if not self.running:
            await self.start()
        reply = await self._request(Describe(id=self._id()), 30.0)
        if isinstance(reply, Error):
            await self.stop(graceful=False)
            raise SliceFailure(reply.code, reply.message)
        if not isinstance(reply, Capabilities):
            raise SliceFailure(ErrorCode.EVALUATOR_PROTOCOL.value, f"describe got {reply.type}")
        return reply.capabilities

    async def run(
        self,
        job: JobSpec,
        limits: Limits,
        datum: bytes,
        slice_: int,
        on_progress: Callable[[float], None] | None = None,
    ) -> tuple[bytes, Metrics]:
        """Run one slice of ``job`` under ``limits``.

        Raises:
            SliceFailure: the work function or the evaluator failed; the code says how.
        """
        (outcome,) = await self.run_batch(
            job,
            limits,
            [(slice_, datum)],
            None if on_progress is None else (lambda _i, fraction: on_progress(fraction)),
        )
        if isinstance(outcome, SliceFailure):
            raise outcome
        return outcome

    async def run_batch(
        self,
        job: JobSpec,
        limits: Limits,
        items: list[tuple[int, bytes]],
        on_progress: Callable[[int, float], None] | None = None,
    ) -> list[tuple[bytes, Metrics] | SliceFailure]:
        """Run several slices of one job: their requests go to the evaluator in one write
        and it answers each in turn (short slices pay one pipe round trip per batch, not per
        slice). One outcome per item, in order: (result, metrics) or the slice's failure. A
        failure of the evaluator itself (death, timeout) is the outcome of every slice it had
        not answered."""
        # The same evaluator serves batch after batch, started here or reached through the
        # manager (one connection), until slices_per_evaluator, its death or a timeout.
        outcomes: list[tuple[bytes, Metrics] | SliceFailure] = []
        failure: SliceFailure | None = None
        while len(outcomes) < len(items):
            pending = items[len(outcomes) :]
            if not self.running or self._slices_run >= self.slices_per_evaluator:
                await self.stop(graceful=True)
                await self.start()
            replies: list[Message] = []
            try:
                await self._assign(job, limits)
                requests: list[Describe | Assign | RunSlice] = [
                    RunSlice(id=self._id(), slice=slice_, datum=datum) for slice_, datum in pending
                ]
                await self._exchange(requests, limits.wall_seconds + _MARGIN, on_progress, replies)
            except SliceFailure as exc:
                failure = exc
            finally:
                self._slices_run += len(pending)
            outcomes += [_outcome(reply) for reply in replies]
            if not any(isinstance(r, Error) and r.code in MAY_END_EVALUATOR for r in replies):
                break
            # A slice that reached its wall clock in wasm ends its evaluator after its answer
            # (evaluator.errors): the slices queued behind it, unanswered, go to a fresh
            # one, as does the next batch.
            await self.stop(graceful=False)
            if failure is not None and failure.code != ErrorCode.EVALUATOR_DIED.value:
                break
            failure = None
        while len(outcomes) < len(items):
            assert failure is not None
            outcomes.append(failure)
        return outcomes

    async def _assign(self, job: JobSpec, limits: Limits) -> None:
        key = (job.job, job.sha256, job.argv, limits)
        if self._assigned == key:
            return
        # Try without the module bytes first: a warm evaluator has it compiled already.
        for module in (None, job.module):
            reply = await self._request(
                Assign(
                    id=self._id(),
                    job=job.job,
                    runtime=job.runtime,
                    sha256=job.sha256,
                    module=module,
                    argv=job.argv,
                    limits=limits,
                    config=job.config,
                    options=self.runtime_options.get(job.runtime, {}),
                ),
                _ASSIGN_TIMEOUT,
            )
            if isinstance(reply, Ack):
                self._assigned = key
                return
            if isinstance(reply, Error) and reply.code == ErrorCode.MODULE_NOT_CACHED.value:
                continue
            if isinstance(reply, Error):
                raise SliceFailure(reply.code, reply.message)
            raise SliceFailure(ErrorCode.EVALUATOR_PROTOCOL.value, f"assign got {reply.type}")
        raise SliceFailure(ErrorCode.EVALUATOR_PROTOCOL.value, "the evaluator refused the module")
