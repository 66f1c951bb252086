"""The evaluator process: frames on stdin, frames on stdout, logs on stderr.

It serves one worker sandbox. Requests are answered in order; while a slice runs, ``progress``
frames (rate-limited) may precede its ``slice_done`` or ``error``. A frame that fails to parse
gets an ``error`` reply and the evaluator carries on; a length prefix above the limit or a
stream cut inside a frame ends it (the stream cannot be resynchronised), with exit status 3.

A slice that reaches its wall clock while running wasm is answered ``wasm_timeout``, and then
the evaluator ends, with exit status 4 (:data:`EXIT_EXPIRED`): its compiled code carries no
interruption checks (they cost up to half the speed), so ending the process is how the slice
stops. Requests queued behind it get no answer; the worker starts a fresh evaluator for them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import platform
import queue
import shutil
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from dcp_protocol import (
    EVALUATOR_MESSAGES,
    Ack,
    Assign,
    Capabilities,
    Describe,
    Die,
    Error,
    ErrorCode,
    Message,
    Progress,
    ProtocolError,
    RunSlice,
    SliceDone,
    SliceFailure,
    StreamDecoder,
    frame,
    prepare_codecs,
)

from .interpreters import RUNTIMES as INTERPRETER_RUNTIMES
from .interpreters import Interpreter, InterpreterRuntime, compiled_cache_dir
from .opencl import OpenCLRuntime
from .scratch import private_dir
from .wasm import WASMTIME_VERSION, WasmRuntime, probe_features

log = logging.getLogger("dcp.evaluator")

EXIT_OK = 0
EXIT_PROTOCOL = 3
#: A slice reached its wall clock in wasm: answered, then the evaluator ended (see above).
EXIT_EXPIRED = 4
_PROGRESS_INTERVAL = 0.1
_READ_CHUNK = 1 << 16


def capabilities(
    opencl: dict[str, Any] | None = None, interpreters: dict[str, Interpreter] | None = None
) -> dict[str, object]:
    """What this evaluator offers, measured at start (``opencl``: OpenCLRuntime.describe;
    ``interpreters``: InterpreterRuntime.available, each offered as its runtime)."""
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        memory = 0
    runtimes: dict[str, Any] = {
        "wasm": {
            "engine": "wasmtime",
            "version": WASMTIME_VERSION,
            "wasi": "preview1",
            "features": probe_features(),
            "limits": ["wall_clock", "fuel", "memory", "output"],
        }
    }
    for name, spec in (interpreters or {}).items():
        runtimes[name] = {
            "engine": spec.engine,
            "version": spec.version,
            "sha256": spec.sha256,
            "in": "wasm",  # inside the wasm runtime's sandbox, with its limits
            "limits": ["wall_clock", "fuel", "memory", "output"],
        }
    extra: dict[str, Any] = {}
    devices = (opencl or {}).get("devices", [])
    if devices:
        # Features name device types (gpu, cpu, accelerator) and fp64: opencl.gpu, opencl.fp64.
        types = {d["type"].lower() for d in devices}
        runtimes["opencl"] = {
            "engine": "pyopencl",
            "features": sorted(types | ({"fp64"} if any(d["fp64"] for d in devices) else set())),
            "devices": devices,
        }
        extra["opencl_memory_bytes"] = max(d["global_memory"] for d in devices)
    return {
        "runtimes": runtimes,
        **extra,
        "memory_bytes": memory,
        "cpu_count": os.cpu_count() or 1,
        "machine": platform.machine(),
        "python": platform.python_version(),
    }


#: Replies to a batch wait in the buffer while more requests are queued, but never longer
#: than this: a flusher thread sends them while a slow slice of the batch runs (wasm and
#: OpenCL calls release the GIL).
_FLUSH_EVERY = 0.05


class Evaluator:
    """Serves the framed protocol on a pair of binary streams."""

    def __init__(
        self,
        stdin: BinaryIO,
        stdout: BinaryIO,
        withhold_opencl: str | None = None,
        runs_as: int | None = None,
        interpreters: Path | None = None,
    ) -> None:
        #: Who runs the work (as its starter sees it): describe says it, and the worker applies
        #: its "no OpenCL as root" rule to it, whether it or a manager started the evaluator.
        self._uid = runs_as if runs_as is not None else os.geteuid()
        #: Why this evaluator offers no OpenCL (its manager's rule), or None.
        self._opencl_withheld = withhold_opencl
        self._in = stdin
        self._out = stdout
        self._decoder = StreamDecoder(EVALUATOR_MESSAGES)
        self._runtime = WasmRuntime(self._on_progress, self._on_timeout, self._expire)
        #: Run before the process ends on a wall clock (serve_stdio: remove the workdir).
        self.cleanup: list[Callable[[], None]] = []
        #: Compiled modules (jobs' and interpreters') kept on disk across evaluators.
        self._cache_dir = compiled_cache_dir()
        self._interpreters = InterpreterRuntime(
            self._runtime, self._on_progress, interpreters, self._cache_dir
        )
        prepare_codecs(Ack, Error, Progress, SliceDone)
        self._opencl = OpenCLRuntime()
        self._opencl_sources: dict[str, bytes] = {}
        self._assigned: Assign | None = None
        #: Whether the request being handled came in a binary frame (its answer goes so).
        self._binary = False
        self._current: int | None = None
        #: Request bytes as they came, with the time (see ``_reader``).
        self._chunks: queue.SimpleQueue[tuple[float, bytes]] = queue.SimpleQueue()
        #: When the bytes that completed the request now decoded came, and when the last
        #: slice was answered: the running slice's wall clock starts at the later of the two.
        self._received_at = 0.0
        self._answered_at = 0.0
        self._last_progress = 0.0
        #: When the oldest reply not yet flushed was written (None: all flushed).
        self._unflushed_since: float | None = None
        #: Guards the output buffer and ``_current`` (the clock's thread may answer the
        #: running slice); the flusher waits on it for replies to flush.
        self._out_lock = threading.RLock()
        self._out_ready = threading.Condition(self._out_lock)

    def send(self, message: Message, flush: bool = False, binary: bool = False) -> None:
        """Queue a reply; replies go out when the evaluator is about to wait for input, so
        a batch of requests is answered in one write, or once the oldest has waited
        ``_FLUSH_EVERY`` (progress goes out at once). ``binary``: its bytes as they are
        (codec.frame), for a request that came so."""
        data = frame(message, binary)
        with self._out_lock:
            self._out.write(data)
            now = time.monotonic()
            if flush or (
                self._unflushed_since is not None and now - self._unflushed_since >= _FLUSH_EVERY
            ):
                self._flush()
            elif self._unflushed_since is None:
                # Only now is the flusher needed: waking it for a reply that goes out at once
                # would have it take the GIL from the thread sending.
                self._unflushed_since = now
                self._out_ready.notify()

    def _flush(self) -> None:
        """Send what is buffered; the caller holds ``_out_lock``."""
        self._out.flush()
        self._unflushed_since = None

    def _flusher(self, stopped: threading.Event) -> None:
        """Flushes replies that waited ``_FLUSH_EVERY``. It sleeps while nothing waits: a
        thread that woke every 25 ms took the GIL and a CPU from the slice each time, which
        on a loaded machine made slices answer late."""
        with self._out_lock:
            while not stopped.is_set():
                since = self._unflushed_since
                if since is None:
                    self._out_ready.wait()
                    continue
                left = since + _FLUSH_EVERY - time.monotonic()
                if left > 0:
                    self._out_ready.wait(left)
                    continue
                try:
                    self._flush()
                except (OSError, ValueError):  # the worker went away: serve() will see it
                    return

    def _reader(self) -> None:
        """Reads the request stream into ``_chunks``, each chunk with the time it came: a
        slice's wall clock counts from then (or from the answer before it), not from when
        the serving thread, which on a loaded machine may get little CPU, got to it."""
        # From the descriptor, not the buffered stream: at exit this thread may still be
        # blocked in a read, and Python aborts if the stream's lock is held then.
        fd = self._in.fileno()
        while True:
            try:
                chunk = os.read(fd, _READ_CHUNK)
            except OSError:
                chunk = b""
            self._chunks.put((time.monotonic(), chunk))
            if not chunk:
                return

    def serve(self) -> int:
        stopped = threading.Event()
        flusher = threading.Thread(target=self._flusher, args=(stopped,), daemon=True)
        flusher.start()
        threading.Thread(target=self._reader, name="requests", daemon=True).start()
        try:
            return self._serve()
        finally:
            stopped.set()
            with self._out_lock:
                self._out_ready.notify()
            flusher.join()

    def _serve(self) -> int:
        while True:
            try:
                message = self._decoder.next_message()
            except ProtocolError as exc:
                self.send(Error(re=None, code=str(exc.code), message=exc.message))
                if self._decoder.broken:
                    log.error("closing the stream: %s", exc.message)
                    with self._out_lock:
                        self._flush()
                    return EXIT_PROTOCOL
                log.warning("bad frame: %s", exc.message)
                continue
            if message is None:
                with self._out_lock:
                    self._flush()
                self._received_at, chunk = self._chunks.get()
                if not chunk:
                    self._decoder.receive_eof()
                    if self._decoder.buffered == 0:
                        return EXIT_OK
                    continue
                self._decoder.receive_data(chunk)
                continue
            if isinstance(message, Die):
                self._interpreters.release()  # a warm interpreter reads end of file, exits
                self.send(Ack(re=message.id), flush=True)
                return EXIT_OK
            self._binary = self._decoder.binary
            self.handle(message)

    def handle(self, message: Message) -> None:
        if isinstance(message, Describe):
            interpreters = self._interpreters.available()
            if self._opencl_withheld is None:
                caps = capabilities(self._opencl.describe(), interpreters)
            else:
                caps = {
                    **capabilities(None, interpreters),
                    "withheld": {"opencl": self._opencl_withheld},
                }
            self.send(Capabilities(re=message.id, capabilities={**caps, "uid": self._uid}))
        elif isinstance(message, Assign):
            self._assign(message)
        elif isinstance(message, RunSlice):
            self._run(message)
        else:
            self.send(
                Error(
                    re=getattr(message, "id", None),
                    code=ErrorCode.UNEXPECTED_MESSAGE.value,
                    message=f"an evaluator does not accept {message.type!r}",
                )
            )

    def _assign(self, message: Assign) -> None:
        if message.runtime == "opencl" and self._opencl_withheld is not None:
            self.send(
                Error(
                    re=message.id,
                    code=ErrorCode.UNSUPPORTED_RUNTIME.value,
                    message=f"OpenCL is withheld here: {self._opencl_withheld}",
                )
            )
            return
        if message.runtime not in ("wasm", "opencl", *INTERPRETER_RUNTIMES):
            self.send(
                Error(
                    re=message.id,
                    code=ErrorCode.UNSUPPORTED_RUNTIME.value,
                    message=f"runtime {message.runtime!r} is not available here",
                )
            )
            return
        try:
            if message.runtime not in INTERPRETER_RUNTIMES:
                self._interpreters.release()  # a warm interpreter serves one job only
            if message.runtime == "wasm":
                self._runtime.compile_cached(
                    message.module, message.sha256, message.limits, self._cache_dir
                )
            elif message.runtime in INTERPRETER_RUNTIMES:
                self._interpreters.assign(
                    message.runtime, message.module, message.sha256, message.limits, message.job
                )
            else:
                self._compile_opencl(message)
        except SliceFailure as exc:
            self._assigned = None
            self.send(_error(message.id, exc))
            return
        # Keep the assignment without the module bytes: the compiled module is cached.
        self._assigned = dataclasses.replace(message, module=None)
        self.send(Ack(re=message.id, status="assigned"))

    def _compile_opencl(self, message: Assign) -> None:
        if message.module is None:
            if message.sha256 not in self._opencl_sources:
                raise SliceFailure(
                    ErrorCode.MODULE_NOT_CACHED, f"module {message.sha256} is not cached"
                )
            source = self._opencl_sources[message.sha256]
        else:
            source = message.module
            if hashlib.sha256(source).hexdigest() != message.sha256:
                raise SliceFailure(ErrorCode.INVALID_MODULE, "the source does not hash to sha256")
        self._opencl.compile(source, message.sha256, message.config, message.options)
        self._opencl_sources[message.sha256] = source

    def _run(self, message: RunSlice) -> None:
        job = self._assigned
        if job is None:
            self.send(
                Error(
                    re=message.id,
                    code=ErrorCode.NOT_ASSIGNED.value,
                    message="no job is assigned to this evaluator",
                )
            )
            return
        with self._out_lock:
            self._current = message.id
        self._last_progress = 0.0
        try:
            if job.runtime == "opencl":
                done = self._opencl.run(job.sha256, job.config, job.limits, message.datum)
            elif job.runtime in INTERPRETER_RUNTIMES:
                done = self._interpreters.run(
                    job.runtime,
                    job.sha256,
                    job.argv,
                    job.limits,
                    message.datum,
                    str(job.config.get("datum", "json")),
                    started=max(self._received_at, self._answered_at),
                    fresh=job.config.get("interpreter") == "fresh",
                    result_kind=str(job.config.get("result", "any")),
                )
            else:
                done = self._runtime.run(
                    job.sha256,
                    job.argv,
                    job.limits,
                    message.datum,
                    started=max(self._received_at, self._answered_at),
                )
        except SliceFailure as exc:
            self._answer(message.id, _error(message.id, exc))
        else:
            self._answer(
                message.id,
                SliceDone(re=message.id, result=done.result, metrics=done.metrics),
                binary=self._binary,
            )

    def _answer(
        self, request: int, reply: Message, flush: bool = False, binary: bool = False
    ) -> None:
        """Send the one answer to the running slice ``request``: whichever comes first of
        the slice's own thread and the wall clock's (a later one is dropped)."""
        with self._out_lock:
            if self._current != request:
                return
            self._current = None
            self._answered_at = time.monotonic()
            self.send(reply, flush, binary)

    def _on_timeout(self, error: SliceFailure) -> None:
        """From the wall clock's thread: the running wasm slice is due. Its answer goes out
        now; on a loaded machine the slice's own thread, starved of CPU, took 0.1-0.4 s more
        to unwind (the next request waits for it)."""
        request = self._current
        if request is not None:
            self._answer(request, _error(request, error), flush=True)

    def _expire(self, reason: str) -> None:
        """From the wall clock's thread, once the slice is answered: end the process, the
        only way to stop code compiled without interruption checks (the worker starts a
        fresh evaluator; a request queued behind the slice is never answered here)."""
        log.warning("%s: this evaluator ends (exit status %d)", reason, EXIT_EXPIRED)
        with self._out_lock:
            try:
                self._flush()
            except (OSError, ValueError):
                pass
            for step in self.cleanup:
                step()
            sys.stderr.flush()
            os._exit(EXIT_EXPIRED)

    def _on_progress(self, fraction: float) -> None:
        now = time.monotonic()
        if self._current is None or now - self._last_progress < _PROGRESS_INTERVAL:
            return
        self._last_progress = now
        if fraction != fraction:  # NaN from a careless work function: ignore it
            return
        with self._out_lock:
            if self._current is not None:
                self.send(
                    Progress(re=self._current, fraction=min(1.0, max(0.0, fraction))), flush=True
                )


def _error(request: int, exc: SliceFailure) -> Error:
    """The reply to request ``request`` that failed with ``exc``."""
    return Error(re=request, code=str(exc.code), message=exc.message)


def serve_stdio(
    withhold_opencl: str | None = None,
    runs_as: int | None = None,
    interpreters: Path | None = None,
) -> int:
    """Run the evaluator on this process's stdin/stdout in a private working directory
    (``withhold_opencl``: offer no OpenCL, for this reason; ``interpreters``: where the
    python and js interpreters are installed)."""
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.INFO,
        format="evaluator[%(process)d] %(levelname)s %(message)s",
    )
    # Inside the directory the worker made for this sandbox: a killed evaluator leaves nothing
    # once the worker removes it.
    workdir = Path(private_dir("dcp-evaluator-"))
    os.chdir(workdir)
    stdout = sys.stdout.buffer
    # Nothing else may write to the protocol stream: point sys.stdout at stderr.
    sys.stdout = sys.stderr
    try:
        evaluator = Evaluator(sys.stdin.buffer, stdout, withhold_opencl, runs_as, interpreters)
        evaluator.cleanup.append(lambda: shutil.rmtree(workdir, ignore_errors=True))
        return evaluator.serve()
    except BrokenPipeError:
        return EXIT_OK
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
