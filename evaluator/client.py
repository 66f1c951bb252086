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
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from dcp_protocol import Ack, Capabilities, Error, ErrorCode, JobSpec, Limits, Message, SliceFailure
from dcp_protocol.evaluator_channel import (
    ChannelEvent,
    ChannelState,
    Ended,
    EvaluatorChannel,
    Progressed,
    Replied,
    SliceAnswered,
    SliceOutcome,
    SliceResult,
    SliceWork,
)

from .launch import Hardening, evaluator_command
from .manager import TOKEN_PREFIX

__all__ = ["Sandbox", "SliceFailure", "SliceOutcome", "SliceResult", "SliceWork"]

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


def _read_token(path: str) -> bytes:
    return Path(path).read_bytes().strip()


def _progress(
    on_progress: Callable[[int, float], None], todo: list[int], index: int, fraction: float
) -> None:
    on_progress(todo[index], fraction)  # the exchange's index -> the batch's


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
        self._channel = EvaluatorChannel(relayed=endpoint is not None)
        self._stderr: collections.deque[str] = collections.deque(maxlen=_STDERR_LINES)
        self._stderr_task: asyncio.Task[None] | None = None
        self._workdir: str | None = None
        self._slices_run = 0

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Start (or connect to) a fresh evaluator.

        Raises:
            SliceFailure: EVALUATOR_DIED when the manager cannot be reached.
        """
        self._channel = EvaluatorChannel(relayed=self.endpoint is not None)
        self._stderr.clear()
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
    def pid(self) -> int | None:
        """The evaluator's process id when started here and running; None through a manager."""
        proc = self._proc
        return proc.pid if proc is not None and proc.returncode is None else None

    @property
    def running(self) -> bool:
        if self.endpoint is not None:
            return self._reader is not None and not self._reader.at_eof()
        return self._proc is not None and self._proc.returncode is None

    async def stop(self, graceful: bool = True) -> None:
        proc, self._proc = self._proc, None
        reader, self._reader = self._reader, None
        die = self._channel.die()
        if self.endpoint is not None and reader is not None:
            # The manager kills the evaluator when its connection closes.
            with contextlib.suppress(OSError, RuntimeError):
                if graceful:
                    self._stdin.write(die)
                self._stdin.close()
            return
        if proc is not None and proc.returncode is None:
            if graceful and proc.stdin is not None:
                with contextlib.suppress(OSError, RuntimeError):
                    proc.stdin.write(die)
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

    # ------------------------------------------------------------------ exchanges

    async def _exchange(
        self,
        data: bytes,
        timeout: float,
        on_progress: Callable[[int, float], None] | None = None,
    ) -> list[ChannelEvent]:
        """Write ``data`` (the channel's requests) and read until the channel has every reply
        or has ended; each reply must come within ``timeout`` of the one before, or the
        evaluator is killed. The events, progress aside (given to ``on_progress``)."""
        channel, reader = self._channel, self._reader
        assert reader is not None
        events: list[ChannelEvent] = []
        # The requests are written while the replies are read: waiting for the whole batch to
        # be taken first deadlocked once the replies filled the evaluator's stdout pipe (a batch
        # of 16 KiB slices: the evaluator blocked writing, so it stopped reading).
        drained: asyncio.Future[None] | None = None
        loop = asyncio.get_running_loop()
        try:
            self._stdin.write(data)
            drained = asyncio.ensure_future(self._stdin.drain())
            answered, deadline = channel.answered, loop.time() + timeout
            while channel.state is ChannelState.WAITING:
                async with asyncio.timeout_at(deadline):
                    chunk = await reader.read(1 << 16)
                if not chunk:
                    events += channel.connection_lost(await self._death())
                    break
                for event in channel.receive_data(chunk):
                    if isinstance(event, Progressed):
                        if on_progress is not None:
                            on_progress(event.index, event.fraction)
                    else:
                        events.append(event)
                if channel.answered != answered:
                    answered, deadline = channel.answered, loop.time() + timeout
            if channel.state is not ChannelState.ENDED:
                await drained  # every reply is in, so every request was taken
        except TimeoutError:
            events += channel.timed_out(timeout)
        except (BrokenPipeError, ConnectionResetError):
            events += channel.connection_lost(await self._death())
        finally:
            if drained is not None and not drained.done():
                drained.cancel()
            elif drained is not None and not drained.cancelled():
                drained.exception()  # retrieved: a dead evaluator is reported from the reads
        if channel.state is ChannelState.ENDED:
            await self.stop(graceful=False)
        return events

    async def _request(self, data: bytes, timeout: float) -> Message:
        """The reply to one ``describe`` or ``assign`` (``data``, from the channel).

        Raises:
            SliceFailure: the evaluator died, timed out (it is killed) or broke the protocol.
        """
        for event in await self._exchange(data, timeout):
            if isinstance(event, Replied):
                return event.reply
            if isinstance(event, Ended) and event.failure is not None:
                raise event.failure
        raise SliceFailure(ErrorCode.EVALUATOR_PROTOCOL, "the evaluator ended unanswered")

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
        if not self.running or self._channel.state is ChannelState.ENDED:
            await self.stop(graceful=False)
            await self.start()
        reply = await self._request(self._channel.describe(), 30.0)
        if isinstance(reply, Error):
            await self.stop(graceful=False)
            raise SliceFailure(reply.code, reply.message)
        if not isinstance(reply, Capabilities):
            raise SliceFailure(ErrorCode.EVALUATOR_PROTOCOL, f"describe got {reply.type}")
        return reply.capabilities

    async def run(
        self,
        job: JobSpec,
        limits: Limits,
        datum: bytes,
        slice_: int,
        on_progress: Callable[[float], None] | None = None,
    ) -> SliceResult:
        """Run one slice of ``job`` under ``limits``.

        Raises:
            SliceFailure: the work function or the evaluator failed; the code says how.
        """
        (outcome,) = await self.run_batch(
            job,
            limits,
            [SliceWork(slice_, datum)],
            None if on_progress is None else (lambda _i, fraction: on_progress(fraction)),
        )
        if isinstance(outcome, SliceFailure):
            raise outcome
        return outcome

    async def run_batch(
        self,
        job: JobSpec,
        limits: Limits,
        work: Sequence[SliceWork],
        on_progress: Callable[[int, float], None] | None = None,
    ) -> list[SliceOutcome]:
        """Run several slices of one job: their requests go to the evaluator in one write
        and it answers each in turn (short slices pay one pipe round trip per batch, not per
        slice). One outcome per slice, in order: a :class:`SliceResult` or the slice's
        :class:`SliceFailure`. A failure of the evaluator itself (death, timeout) is the
        outcome of every slice it had not answered; slices left unanswered behind an answer
        after which an evaluator may end (the wall clock) run on a fresh one."""
        # The same evaluator serves batch after batch, started here or reached through the
        # manager (one connection), until slices_per_evaluator, its end or a timeout.
        outcomes: list[SliceOutcome | None] = [None] * len(work)
        todo = list(range(len(work)))
        while todo:
            if (
                not self.running
                or self._channel.state is ChannelState.ENDED
                or self._slices_run >= self.slices_per_evaluator
            ):
                await self.stop(graceful=True)
                await self.start()
            try:
                await self._assign(job, limits)
            except SliceFailure as failure:
                for i in todo:
                    outcomes[i] = failure
                break
            self._slices_run += len(todo)
            events = await self._exchange(
                self._channel.run([work[i] for i in todo]),
                limits.wall_seconds + _MARGIN,
                None if on_progress is None else functools.partial(_progress, on_progress, todo),
            )
            queued: list[int] = []
            for event in events:
                if isinstance(event, SliceAnswered):
                    outcomes[todo[event.index]] = event.outcome
                elif isinstance(event, Ended) and event.failure is None:
                    queued = [todo[i] for i in event.unanswered]
                elif isinstance(event, Ended):
                    for i in event.unanswered:
                        outcomes[todo[i]] = event.failure
            todo = queued
        assert all(outcome is not None for outcome in outcomes)
        return outcomes  # type: ignore[return-value]

    async def _assign(self, job: JobSpec, limits: Limits) -> None:
        if self._channel.is_assigned(job, limits):
            return
        # Try without the module bytes first: a warm evaluator has it compiled already.
        options = self.runtime_options.get(job.runtime, {})
        for with_module in (False, True):
            reply = await self._request(
                self._channel.assign(job, limits, options, with_module), _ASSIGN_TIMEOUT
            )
            if isinstance(reply, Ack):
                return
            if isinstance(reply, Error) and reply.code == ErrorCode.MODULE_NOT_CACHED.value:
                continue
            if isinstance(reply, Error):
                raise SliceFailure(reply.code, reply.message)
            raise SliceFailure(ErrorCode.EVALUATOR_PROTOCOL, f"assign got {reply.type}")
        raise SliceFailure(ErrorCode.EVALUATOR_PROTOCOL, "the evaluator refused the module")
