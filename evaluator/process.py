"""The evaluator process: frames on stdin, frames on stdout, logs on stderr.

It serves one worker sandbox. Requests are answered in order; while a slice runs, ``progress``
frames (rate-limited) may precede its ``slice_done`` or ``error``. A frame that fails to parse
gets an ``error`` reply and the evaluator carries on; a length prefix above the limit or a
stream cut inside a frame ends it (the stream cannot be resynchronised), with exit status 3.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import logging
import os
import platform
import shutil
import sys
import threading
import time
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
    StreamDecoder,
    frame,
)

from .errors import SliceError
from .opencl import OpenCLRuntime
from .scratch import private_dir
from .wasm import WasmRuntime, probe_features

log = logging.getLogger("dcp.evaluator")

EXIT_OK = 0
EXIT_PROTOCOL = 3
_PROGRESS_INTERVAL = 0.1
_READ_CHUNK = 1 << 16


def _wasmtime_version() -> str:
    try:
        return importlib.metadata.version("wasmtime")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def capabilities(opencl: dict[str, Any] | None = None) -> dict[str, object]:
    """What this evaluator offers, measured at start (``opencl``: OpenCLRuntime.describe)."""
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        memory = 0
    runtimes: dict[str, Any] = {
        "wasm": {
            "engine": "wasmtime",
            "version": _wasmtime_version(),
            "wasi": "preview1",
            "features": probe_features(),
            "limits": ["epoch", "fuel", "memory", "output"],
        }
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
    ) -> None:
        #: Who runs the work (as its starter sees it): describe says it, and the worker applies
        #: its "no OpenCL as root" rule to it, whether it or a manager started the evaluator.
        self._uid = runs_as if runs_as is not None else os.geteuid()
        #: Why this evaluator offers no OpenCL (its manager's rule), or None.
        self._opencl_withheld = withhold_opencl
        self._in = stdin
        self._out = stdout
        self._decoder = StreamDecoder(EVALUATOR_MESSAGES)
        self._runtime = WasmRuntime(self._on_progress)
        self._opencl = OpenCLRuntime()
        self._opencl_sources: dict[str, bytes] = {}
        self._assigned: Assign | None = None
        self._current: int | None = None
        self._last_progress = 0.0
        #: When the oldest reply not yet flushed was written (None: all flushed).
        self._unflushed_since: float | None = None
        self._out_lock = threading.Lock()

    def send(self, message: Message, flush: bool = False) -> None:
        """Queue a reply; replies go out when the evaluator is about to wait for input, so
        a batch of requests is answered in one write, or once the oldest has waited
        ``_FLUSH_EVERY`` (progress goes out at once)."""
        with self._out_lock:
            self._out.write(frame(message))
            now = time.monotonic()
            if self._unflushed_since is None:
                self._unflushed_since = now
            if flush or now - self._unflushed_since >= _FLUSH_EVERY:
                self._flush()

    def _flush(self) -> None:
        """Send what is buffered; the caller holds ``_out_lock``."""
        self._out.flush()
        self._unflushed_since = None

    def _flusher(self, stopped: threading.Event) -> None:
        while not stopped.wait(_FLUSH_EVERY / 2):
            with self._out_lock:
                since = self._unflushed_since
                if since is not None and time.monotonic() - since >= _FLUSH_EVERY:
                    try:
                        self._flush()
                    except (OSError, ValueError):  # the worker went away: serve() will see it
                        return

    def serve(self) -> int:
        stopped = threading.Event()
        flusher = threading.Thread(target=self._flusher, args=(stopped,), daemon=True)
        flusher.start()
        try:
            return self._serve()
        finally:
            stopped.set()
            flusher.join()

    def _serve(self) -> int:
        while True:
            try:
                message = self._decoder.next_message()
            except ProtocolError as exc:
                self.send(Error(re=None, code=exc.code.value, message=exc.message))
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
                chunk = (
                    self._in.read1(_READ_CHUNK)
                    if hasattr(self._in, "read1")
                    else self._in.read(_READ_CHUNK)
                )
                if not chunk:
                    self._decoder.receive_eof()
                    if self._decoder.buffered == 0:
                        return EXIT_OK
                    continue
                self._decoder.receive_data(chunk)
                continue
            if isinstance(message, Die):
                self.send(Ack(re=message.id), flush=True)
                return EXIT_OK
            self.handle(message)

    def handle(self, message: Message) -> None:
        if isinstance(message, Describe):
            if self._opencl_withheld is None:
                caps = capabilities(self._opencl.describe())
            else:
                caps = {**capabilities(None), "withheld": {"opencl": self._opencl_withheld}}
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
        if message.runtime not in ("wasm", "opencl"):
            self.send(
                Error(
                    re=message.id,
                    code=ErrorCode.UNSUPPORTED_RUNTIME.value,
                    message=f"runtime {message.runtime!r} is not available here",
                )
            )
            return
        try:
            if message.runtime == "wasm":
                self._runtime.compile(message.module, message.sha256, message.limits)
            else:
                self._compile_opencl(message)
        except SliceError as exc:
            self._assigned = None
            self.send(Error(re=message.id, code=exc.code.value, message=exc.message))
            return
        # Keep the assignment without the module bytes: the compiled module is cached.
        self._assigned = dataclasses.replace(message, module=None)
        self.send(Ack(re=message.id, status="assigned"))

    def _compile_opencl(self, message: Assign) -> None:
        if message.module is None:
            if message.sha256 not in self._opencl_sources:
                raise SliceError(
                    ErrorCode.MODULE_NOT_CACHED, f"module {message.sha256} is not cached"
                )
            source = self._opencl_sources[message.sha256]
        else:
            source = message.module
            if hashlib.sha256(source).hexdigest() != message.sha256:
                raise SliceError(ErrorCode.INVALID_MODULE, "the source does not hash to sha256")
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
        self._current = message.id
        self._last_progress = 0.0
        try:
            if job.runtime == "opencl":
                result, metrics = self._opencl.run(
                    job.sha256, job.config, job.limits, message.datum
                )
            else:
                result, metrics = self._runtime.run(job.sha256, job.argv, job.limits, message.datum)
        except SliceError as exc:
            self.send(Error(re=message.id, code=exc.code.value, message=exc.message))
        else:
            self.send(SliceDone(re=message.id, result=result, metrics=metrics))
        finally:
            self._current = None

    def _on_progress(self, fraction: float) -> None:
        now = time.monotonic()
        if self._current is None or now - self._last_progress < _PROGRESS_INTERVAL:
            return
        self._last_progress = now
        if fraction != fraction:  # NaN from a careless work function: ignore it
            return
        self.send(Progress(re=self._current, fraction=min(1.0, max(0.0, fraction))), flush=True)


def serve_stdio(withhold_opencl: str | None = None, runs_as: int | None = None) -> int:
    """Run the evaluator on this process's stdin/stdout in a private working directory
    (``withhold_opencl``: offer no OpenCL, for this reason)."""
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
        return Evaluator(sys.stdin.buffer, stdout, withhold_opencl, runs_as).serve()
    except BrokenPipeError:
        return EXIT_OK
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
