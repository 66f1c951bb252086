"""The ``wasm`` runtime: WASI command modules on wasmtime, with limits.

A work function is a WASI command (``_start``). The slice datum is its stdin, its stdout is the
result, job arguments are its argv. It gets no preopened directory, an empty environment and no
sockets; calls to ``path_open`` or ``sock_*`` trap with ``sandbox_violation``. Limits:

* wall clock: a thread of :class:`WallClock` comes to the slice's deadline, answers for the
  slice, then stops it. In an evaluator process (``expire`` given) compiled code carries no
  interruption checks at all, and the slice is stopped by ending the process: the checks
  wasmtime's epoch interruption puts in every loop and call halved a matrix multiply's
  speed (docs/performance.md, "Compute speed"). Used in-process (no ``expire``), the engines
  keep epoch interruption and the clock advances the epoch. Our own ``poll_oneoff`` sleeps
  at most until the deadline and ends the slice there itself (no process needs ending);
* fuel (instructions), when the job asks for it (a second engine with fuel metering);
* memory: ``Store.set_limits`` caps the one linear memory, the tables (elements and count)
  and the instances, all out of the job's ``memory_bytes`` (:class:`StoreBudget`); a module
  that defines more than one memory or more than ``MAX_TABLES`` tables is refused;
* output: stdout goes to an in-memory file under RLIMIT_FSIZE, so a flood stops at the cap + 1
  byte.

Each slice runs in a Store of its own, closed when the slice ends, whatever the outcome.
Compiled modules are cached in memory by (sha256, engine). docs/sandbox.md lists every limit,
who enforces it and the name of each refusal.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import importlib.metadata
import os
import resource
import signal
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import wasmtime

from dcp_protocol import ErrorCode, Limits, Metrics, SliceFailure
from dcp_protocol.evaluator_channel import SliceResult

_WASI = "wasi_snapshot_preview1"
#: WASI calls a work function may import but never successfully use: trap with a named reason.
_FORBIDDEN_WASI = frozenset(
    {
        "path_open",
        "sock_accept",
        "sock_recv",
        "sock_send",
        "sock_shutdown",
        "sock_open",
        "sock_connect",
        "sock_bind",
        "sock_listen",
    }
)
_STDERR_CAP = 64 * 1024
_CACHE_ENTRIES = 32
#: Cranelift's optimisation level for every engine of the runtime.
_OPT_LEVEL = "speed"
#: The engine settings a serialised module was compiled with, in its cache file's name:
#: a module compiled under other settings is never loaded.
ENGINE_TAG = f"o{_OPT_LEVEL}"
#: The on-disk cache of compiled modules is kept under this many bytes.
DISK_CACHE_BYTES = 512 * 1024 * 1024
_PAGE = 65536
#: More subscriptions in one poll_oneoff call are refused (EINVAL): only stdin, stdout,
#: stderr and clocks can be polled, and parsing them is not interruptible.
_MAX_SUBSCRIPTIONS = 4096

# WASI preview1 (wasi_snapshot_preview1) poll_oneoff ABI.
#: subscription, 48 bytes: userdata u64, tag u8 (eventtype), then at 16 the union: a clock
#: (id u32, timeout u64 at 24, precision u64 at 32, flags u16 at 40) or an fd (u32 at 16).
_SUBSCRIPTION = struct.Struct("<QB7xI4xQQH6x")
#: event, 32 bytes: userdata u64, error u16 (errno), type u8, then at 16 fd_readwrite:
#: nbytes u64, flags u16.
_EVENT = struct.Struct("<QHB5xQH6x")
_EVENTTYPE_CLOCK, _EVENTTYPE_FD_READ, _EVENTTYPE_FD_WRITE = 0, 1, 2
_CLOCK_REALTIME, _CLOCK_MONOTONIC = 0, 1
_SUBCLOCKFLAGS_ABSTIME = 1
_ERRNO_SUCCESS, _ERRNO_BADF, _ERRNO_FAULT, _ERRNO_INVAL = 0, 8, 21, 28

#: What one table element costs: wasmtime 50 stores a funcref in 8 bytes and an externref in
#: 4 (measured: RSS after growing a table by 8 million elements), so 8 is an upper bound.
TABLE_ELEMENT_BYTES = 8
#: Tables one module may define. Compiled C, C++, Rust, Zig and Go use one (the indirect
#: function table); wasmtime counts each table against the per-table element limit, so
#: every extra table allowed divides the tables' budget further.
MAX_TABLES = 2
#: Linear memories one module may define: each would get the whole cap from wasmtime's
#: per-memory limit, so multi-memory modules are refused rather than let it multiply.
MAX_MEMORIES = 1
#: The tables' share of ``memory_bytes`` (1/16, at most 8 MiB); linear memory gets the rest.
_TABLE_SHARE = 16
_TABLE_BUDGET_MAX = 8 * 1024 * 1024


#: The clock's thread comes to a deadline in hops of ``_HOP`` over its last ``_APPROACH``
#: seconds. On a loaded machine (nice 10 beside busy processes, Linux 6.18) a thread that
#: slept a whole second woke 2-190 ms late; one that slept 20 ms at most 7 ms late.
_APPROACH = 0.25
_HOP = 0.02


class WallClock:
    """Stops the running slice when the monotonic clock reaches its deadline.

    A thread of this clock sleeps until the deadline and calls ``on_due``. With ``epochs``
    the slice's store traps at the next epoch (``set_epoch_deadline(1)``) and the clock then
    advances the epoch of that store's engine, once; without, ``on_due`` stops the slice
    itself (the evaluator ends its process). It used to tick every 5 ms, 200 wake-ups a
    second even while the evaluator was idle; on a loaded machine each one waited for a CPU
    and took the GIL from the slice's own thread.

    One slice is armed at a time (the evaluator runs one). The epoch is advanced only while
    the store it was meant for is still armed, so a slice that ended early never leaves an
    interrupt behind for the next one.
    """

    def __init__(self, on_due: Callable[[], None] | None = None, epochs: bool = True) -> None:
        self._on_due = on_due or (lambda: None)
        self._epochs = epochs
        self._changed = threading.Condition()
        self._armed: tuple[wasmtime.Engine, float] | None = None
        self._thread: threading.Thread | None = None

    def arm(self, engine: wasmtime.Engine, store: wasmtime.Store | None, deadline: float) -> None:
        """Make ``store`` (of ``engine``) trap with an interrupt once time.monotonic()
        reaches ``deadline``, never before it. ``store`` None: a store whose epoch deadline
        was set when it was made (one that runs in another thread, see :class:`Serving`)."""
        with self._changed:
            if self._armed is not None:
                raise RuntimeError("a slice is already armed on this clock")
            if store is not None and self._epochs:
                store.set_epoch_deadline(1)
            self._armed = (engine, deadline)
            if self._thread is None:
                self._thread = threading.Thread(target=self._wait, name="epoch-alarm")
                self._thread.daemon = True
                self._thread.start()
            self._changed.notify()

    def disarm(self) -> None:
        """The armed slice has ended: its deadline no longer matters."""
        with self._changed:
            self._armed = None
            self._changed.notify()

    def _wait(self) -> None:
        while True:
            with self._changed:
                while True:
                    if self._armed is None:
                        self._changed.wait()
                        continue
                    engine, deadline = self._armed
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._changed.wait(left - _APPROACH if left > _APPROACH else min(left, _HOP))
                self._armed = None
            # The answer first: the interrupt sends the slice's thread back into Python,
            # where, starved of CPU, it may hold the GIL this thread needs to answer.
            self._on_due()
            if self._epochs:
                engine.increment_epoch()


class Serving:
    """A WASI command kept running between requests, in one Store (:meth:`WasmRuntime.serve`).

    The module's ``fd_read`` of stdin and ``fd_write`` of stdout and stderr are ours: a
    request is what the module reads; when it reads again with the request consumed, the
    request is done and what it wrote on stdout meanwhile is the answer. Each request gets
    the limits a slice gets (the wall clock from ``started``, fuel, the output cap; memory is
    the Store's, for every request of the session). A request that ends otherwise (a trap, a
    limit, an exit) ends the session: :attr:`alive` is then False and it raises the
    SliceFailure a slice would. :meth:`close` ends it (the module reads end of file)."""

    def __init__(
        self,
        wasm: WasmRuntime,
        compiled: _Compiled,
        engine: wasmtime.Engine,
        argv: tuple[str, ...],
        limits: Limits,
        argv0: str,
        on_stderr: Callable[[bytes], None] | None,
    ) -> None:
        self._wasm = wasm
        self._limits = limits
        self._on_stderr = on_stderr or (lambda _b: None)
        if limits.fuel is not None:
            # Fuel is set per request from the Store's own thread only: such jobs run each
            # slice in a Store of its own (WasmRuntime.run).
            raise ValueError("a serving session takes no fuel limit")
        self._store = wasmtime.Store(engine)
        self._engine = engine
        self._budget = StoreBudget.of(limits)
        self._budget.apply(self._store)
        # Set once, here, before the Store's thread runs: the engine's epoch is advanced only
        # when a request reaches its wall clock (WallClock), and that ends the session.
        if wasm.epochs:
            self._store.set_epoch_deadline(1)
        self._lock = threading.Condition()
        self._request: bytes | None = None  # waiting to be read, until the module reads it
        self._offset = 0
        self._out = bytearray()
        self._err = 0
        self._done = False  # the module asked for the next request: the current one is done
        self._closing = False
        self._ended: SliceFailure | None = None
        self.alive = True
        wasi = wasmtime.WasiConfig()
        wasi.argv = [argv0, *argv]
        # The descriptors exist (their stat says regular files); reads and writes are ours.
        wasi.stdin_file = wasm._paths["stdin"]
        wasi.stdout_file = wasm._paths["stdout"]
        wasi.stderr_file = wasm._paths["stderr"]
        self._store.set_wasi(wasi)
        wasm._wasi_origin_ns = self._origin_ns = time.monotonic_ns()
        linker = wasm._linker(engine, compiled.module)
        linker.allow_shadowing = True
        for name, fn in (("fd_read", self._fd_read), ("fd_write", self._fd_write)):
            linker.define_func(
                _WASI,
                name,
                wasmtime.FuncType([wasmtime.ValType.i32()] * 4, [wasmtime.ValType.i32()]),
                _trapping(fn),
                access_caller=True,
            )
        self._instance = linker.instantiate(self._store, compiled.module)
        self._thread = threading.Thread(target=self._main, name=f"{argv0}-serving", daemon=True)
        self._thread.start()

    def _main(self) -> None:
        start = self._instance.exports(self._store)["_start"]
        assert isinstance(start, wasmtime.Func)
        ended: SliceFailure
        try:
            start(self._store)
            ended = SliceFailure(ErrorCode.WASM_EXIT, "exited with status 0 (the session ended)")
        except wasmtime.ExitTrap as exc:
            ended = SliceFailure(ErrorCode.WASM_EXIT, f"exited with status {exc.code}")
            self._wasm.exit_code = exc.code
        except wasmtime.Trap as exc:
            ended = self._wasm._classify_trap(
                exc, self._store, self._instance, self._limits, self._budget
            )
        except wasmtime.WasmtimeError as exc:
            ended = SliceFailure(ErrorCode.WASM_TRAP, _first_line(str(exc)))
        with self._lock:
            self.alive = False
            self._ended = ended
            self._lock.notify_all()

    def run(self, request: bytes, started: float | None = None) -> SliceResult:
        """One request: the module's answer and the request's metrics.

        Raises:
            SliceFailure: the request ended the session (see the class).
        """
        wasm, limits = self._wasm, self._limits
        if not self.alive:
            raise self._ended or SliceFailure(ErrorCode.WASM_EXIT, "the session has ended")
        deadline = (time.monotonic() if started is None else started) + limits.wall_seconds
        wasm._limits = limits
        wasm._host_error = None
        wasm._deadline_ns = int(deadline * 1e9)
        wasm._wasi_origin_ns = self._origin_ns
        started_wall, started_cpu = time.monotonic(), time.process_time()
        wasm._clock.arm(self._engine, None, deadline)
        try:
            with self._lock:
                self._request, self._offset, self._done = request, 0, False
                self._out.clear()
                self._err = 0
                self._lock.notify_all()
                while self.alive and not self._done:
                    self._lock.wait()
                answer = bytes(self._out)
        finally:
            wasm._clock.disarm()
            wasm._limits = None
        if not self._done:
            assert self._ended is not None
            raise wasm._host_error or self._ended
        return SliceResult(
            answer,
            Metrics(
                wall_seconds=time.monotonic() - started_wall,
                cpu_seconds=time.process_time() - started_cpu,
                bytes_in=len(request),
                bytes_out=len(answer),
            ),
        )

    def close(self) -> None:
        """End the session: the module reads end of file (or, stuck, is interrupted: without
        epochs, by the runtime's ``expire``, which ends the evaluator)."""
        with self._lock:
            self._closing = True
            self._lock.notify_all()
        self._thread.join(5)
        if self._thread.is_alive():  # never read again: interrupt it where it runs
            if self._wasm.epochs:
                self._engine.increment_epoch()
            else:
                self._wasm.expire("a work function's interpreter did not end when told")
            self._thread.join(5)
        if not self._thread.is_alive():
            self._store.close()

    # --------------------------------------------------------------- the module's stdio

    def _fd_read(self, caller: wasmtime.Caller, fd: int, iovs: int, count: int, nread: int) -> int:
        if fd != 0:
            return _ERRNO_BADF
        if not 0 <= count <= _MAX_IOVECS:  # a host call the epoch cannot interrupt: bounded
            return _ERRNO_INVAL
        memory = caller.get("memory")
        assert isinstance(memory, wasmtime.Memory)
        with self._lock:
            while self._request is None or self._offset >= len(self._request):
                if self._request is not None and not self._done:
                    self._done = True  # consumed and read again: its answer is complete
                    self._lock.notify_all()
                if self._closing:
                    memory.write(caller, struct.pack("<I", 0), nread)
                    return _ERRNO_SUCCESS  # end of file
                self._lock.wait()
            data = self._request
            given = 0
            for i in range(count):
                ptr, size = _IOVEC.unpack(memory.read(caller, iovs + 8 * i, iovs + 8 * i + 8))
                piece = data[self._offset : self._offset + size]
                memory.write(caller, piece, ptr)
                self._offset += len(piece)
                given += len(piece)
                if len(piece) < size:
                    break
            memory.write(caller, struct.pack("<I", given), nread)
        return _ERRNO_SUCCESS

    def _fd_write(
        self, caller: wasmtime.Caller, fd: int, iovs: int, count: int, nwritten: int
    ) -> int:
        if fd not in (1, 2):
            return _ERRNO_BADF
        if not 0 <= count <= _MAX_IOVECS:  # a host call the epoch cannot interrupt: bounded
            return _ERRNO_INVAL
        memory = caller.get("memory")
        assert isinstance(memory, wasmtime.Memory)
        vectors = [
            _IOVEC.unpack(memory.read(caller, iovs + 8 * i, iovs + 8 * i + 8)) for i in range(count)
        ]
        total = sum(size for _ptr, size in vectors)
        if fd == 1 and len(self._out) + total > self._limits.output_bytes + _FRAMING:
            # Refused before anything is copied: a write of gigabytes costs nothing here.
            self._wasm._host_error = flood_error(self._limits.output_bytes + 1, self._limits)
            raise wasmtime.Trap("output over its cap")
        room = total if fd == 1 else max(0, _STDERR_CAP - self._err)
        chunks, taken = [], 0
        for ptr, size in vectors:
            size = min(size, room - taken)  # stderr past its cap is dropped, unread
            if size <= 0:
                break
            chunks.append(memory.read(caller, ptr, ptr + size))
            taken += size
        data = b"".join(chunks)
        if fd == 1:
            self._out += data
        elif data:
            self._err += len(data)
            self._on_stderr(data)
        memory.write(caller, struct.pack("<I", total), nwritten)
        return _ERRNO_SUCCESS


#: What a serving module's answer may hold beyond the result (its status and length).
_FRAMING = 16
#: A WASI iovec: buffer pointer, length.
_IOVEC = struct.Struct("<II")
#: The most iovecs one fd_read or fd_write of a serving module may pass (POSIX's IOV_MAX).
_MAX_IOVECS = 1024


@dataclass(frozen=True)
class StoreBudget:
    """How one slice's ``memory_bytes`` is divided between linear memory and tables.

    wasmtime limits each memory and each table separately (``Store.set_limits``), so the cap
    holds only when their number is bounded too: one memory, at most ``MAX_TABLES`` tables of
    ``table_elements`` each, and one instance. Together they stay within ``memory_bytes``.
    """

    #: The most bytes the linear memory may grow to.
    memory_bytes: int
    #: The most elements any one table may grow to.
    table_elements: int

    @classmethod
    def of(cls, limits: Limits) -> StoreBudget:
        tables = min(limits.memory_bytes // _TABLE_SHARE, _TABLE_BUDGET_MAX)
        per_table = tables // (MAX_TABLES * TABLE_ELEMENT_BYTES)
        return cls(
            memory_bytes=limits.memory_bytes - per_table * MAX_TABLES * TABLE_ELEMENT_BYTES,
            table_elements=per_table,
        )

    def apply(self, store: wasmtime.Store) -> None:
        store.set_limits(
            memory_size=self.memory_bytes,
            table_elements=self.table_elements,
            instances=1,
            tables=MAX_TABLES,
            memories=MAX_MEMORIES,
        )


@dataclass
class _Compiled:
    module: wasmtime.Module
    #: WASI plus our shadowing host functions; reusable across stores of one engine.
    linker: wasmtime.Linker


class WasmRuntime:
    """Compiles, caches and runs WASI modules; slice I/O goes through in-memory files."""

    def __init__(
        self,
        progress: Callable[[float], None] | None = None,
        timed_out: Callable[[SliceFailure], None] | None = None,
        expire: Callable[[str], None] | None = None,
    ) -> None:
        """``progress`` gets the work function's progress calls. ``timed_out``, when given,
        is called from the clock's thread the moment a slice running wasm reaches its wall
        clock, with the error that slice ends with: its caller can answer at once, while the
        slice's own thread, which may get little CPU on a loaded machine, is still unwinding
        (``run`` then raises the same error).

        ``expire``, when given, is called next, with the reason, and must not return: it
        ends the process (an evaluator, whose worker starts a fresh one). Its engines then
        compile no interruption checks into the code, which runs up to twice as fast.
        Without it, they compile epoch checks and the clock interrupts the slice."""
        self._progress = progress or (lambda _f: None)
        self._timed_out = timed_out or (lambda _e: None)
        self._expire = expire
        #: Whether compiled code checks the epoch (the slice is interrupted in-process).
        self.epochs = expire is None
        self._engines: dict[bool, wasmtime.Engine] = {}
        self._cache: OrderedDict[tuple[str, bool], _Compiled] = OrderedDict()
        self._clock = WallClock(self._deadline_reached, self.epochs)
        #: The running slice's limits (None between slices), for the clock's thread.
        self._limits: Limits | None = None
        #: Set by a host function that ends the slice (a forbidden call, the wall clock
        #: reached while sleeping): it names the reason better than the trap it raises.
        self._host_error: SliceFailure | None = None
        #: The running slice's deadline and the origin of its WASI monotonic clock (which
        #: counts from its WASI context's creation), both by time.monotonic_ns().
        self._deadline_ns = 0
        self._wasi_origin_ns = 0
        # A write past RLIMIT_FSIZE must fail with EFBIG, not kill the evaluator.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        # The slice's stdin, stdout and stderr are in-memory files (memfd), handed to WASI by
        # their /proc paths: a truncating open of a file on disk cost ~200 us, three per slice.
        self._fds = {
            name: os.memfd_create(f"dcp-{name}", os.MFD_CLOEXEC)
            for name in ("stdin", "stdout", "stderr")
        }
        self._paths = {name: f"/proc/self/fd/{fd}" for name, fd in self._fds.items()}
        #: The last slice's exit status (0 when it returned from _start).
        self.exit_code = 0

    # ------------------------------------------------------------------ engines and modules

    def _engine(self, fuel: bool) -> wasmtime.Engine:
        engine = self._engines.get(fuel)
        if engine is None:
            config = wasmtime.Config()
            config.epoch_interruption = self.epochs
            config.consume_fuel = fuel
            config.cranelift_opt_level = _OPT_LEVEL
            engine = self._engines[fuel] = wasmtime.Engine(config)
        return engine

    def has(self, sha256: str, limits: Limits) -> bool:
        return (sha256, limits.fuel is not None) in self._cache

    def compile(self, module_bytes: bytes | None, sha256: str, limits: Limits) -> None:
        """Make sure the module is compiled and cached.

        Raises:
            SliceFailure: MODULE_NOT_CACHED (no bytes and not cached), INVALID_MODULE,
                FORBIDDEN_IMPORT.
        """
        key = (sha256, limits.fuel is not None)
        if key in self._cache:
            self._cache.move_to_end(key)
            return
        if module_bytes is None:
            raise SliceFailure(ErrorCode.MODULE_NOT_CACHED, f"module {sha256} is not cached")
        actual = hashlib.sha256(module_bytes).hexdigest()
        if actual != sha256:
            raise SliceFailure(ErrorCode.INVALID_MODULE, f"module hashes to {actual}, not {sha256}")
        engine = self._engine(limits.fuel is not None)
        try:
            module = wasmtime.Module(engine, module_bytes)
        except wasmtime.WasmtimeError as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else "invalid"
            raise SliceFailure(
                ErrorCode.INVALID_MODULE, f"not a valid wasm module: {first}"
            ) from None
        if "_start" not in {e.name for e in module.exports}:
            raise SliceFailure(
                ErrorCode.INVALID_MODULE, "module exports no _start (not a WASI command)"
            )
        linker = self._linker(engine, module)
        _check_counts(module_bytes)
        self._keep(key, _Compiled(module, linker))

    def _keep(self, key: tuple[str, bool], compiled: _Compiled) -> None:
        """Cache a compiled module, the least recently used one out past _CACHE_ENTRIES."""
        self._cache[key] = compiled
        if len(self._cache) > _CACHE_ENTRIES:
            self._cache.popitem(last=False)

    def _linker(self, engine: wasmtime.Engine, module: wasmtime.Module) -> wasmtime.Linker:
        """WASI, with forbidden calls shadowed by traps and ``dcp.progress`` defined.

        Raises:
            SliceFailure: FORBIDDEN_IMPORT for anything else the module imports.
        """
        linker = wasmtime.Linker(engine)
        linker.define_wasi()
        linker.allow_shadowing = True
        for imp in module.imports:
            name = imp.name or ""
            func_type = imp.type if isinstance(imp.type, wasmtime.FuncType) else None
            if imp.module == _WASI and func_type is not None:
                if name in _FORBIDDEN_WASI:
                    linker.define_func(imp.module, name, func_type, self._forbid(name))
                elif name == "poll_oneoff":
                    # wasmtime's own blocks in the host, where the epoch cannot interrupt it.
                    if not _has_type(func_type, ["i32"] * 4, ["i32"]):
                        raise SliceFailure(
                            ErrorCode.FORBIDDEN_IMPORT,
                            f"module imports {_WASI}.poll_oneoff with the wrong type",
                        )
                    linker.define_func(
                        imp.module,
                        name,
                        func_type,
                        _trapping(self._poll_oneoff),
                        access_caller=True,
                    )
            elif imp.module == "dcp" and name == "progress" and _is_progress_type(func_type):
                assert func_type is not None
                linker.define_func(imp.module, name, func_type, _trapping(self._on_progress))
            else:
                raise SliceFailure(
                    ErrorCode.FORBIDDEN_IMPORT,
                    f"module imports {imp.module}.{name}, which the sandbox does not provide",
                )
        return linker

    # ------------------------------------------------------------------ running

    def run(
        self,
        sha256: str,
        argv: tuple[str, ...],
        limits: Limits,
        datum: bytes,
        started: float | None = None,
        argv0: str = "work",
        bytes_in: int | None = None,
    ) -> SliceResult:
        """Run one slice; returns its stdout and metrics. Its wall clock runs from ``started``
        (by time.monotonic(); default: now), which the setup counts against. ``datum`` is
        the module's stdin; ``bytes_in`` what the metrics count of it (default: all);
        ``argv0`` the module's name for itself. After the slice, :attr:`exit_code` and
        :meth:`stderr` tell how it ended.

        Raises:
            SliceFailure: the slice failed; ``code`` says how.
        """
        fuel = limits.fuel is not None
        compiled = self._cache[(sha256, fuel)]
        engine = self._engine(fuel)
        store = wasmtime.Store(engine)
        self.exit_code = 0
        os.ftruncate(self._fds["stderr"], 0)
        try:
            done = self._run_in(engine, store, compiled, (argv0, *argv), limits, datum, started)
            if bytes_in is not None:
                done = SliceResult(
                    done.result, dataclasses.replace(done.metrics, bytes_in=bytes_in)
                )
            return done
        finally:
            self._clock.disarm()
            self._limits = None
            # The store owns the slice's instance and linear memory (a reservation of about
            # 4 GiB of address space). A trap keeps it alive: its traceback holds this frame,
            # and wasmtime-py's enter_wasm frame holds the trap, a cycle that only the
            # garbage collector breaks. Under the evaluator's RLIMIT_AS three such leftovers
            # made every later slice, of any job, fail to reserve its memory. Closing the
            # store frees it now, whatever the outcome; the Python objects left are small.
            store.close()

    def _run_in(
        self,
        engine: wasmtime.Engine,
        store: wasmtime.Store,
        compiled: _Compiled,
        argv: tuple[str, ...],
        limits: Limits,
        datum: bytes,
        started: float | None,
    ) -> SliceResult:
        stdin_fd = self._fds["stdin"]
        os.pwrite(stdin_fd, datum, 0)
        os.ftruncate(stdin_fd, len(datum))
        stdout_fd = self._fds["stdout"]

        budget = StoreBudget.of(limits)
        budget.apply(store)
        deadline = (time.monotonic() if started is None else started) + limits.wall_seconds
        self._limits = limits
        self._clock.arm(engine, store, deadline)
        self._deadline_ns = int(deadline * 1e9)
        if limits.fuel is not None:
            store.set_fuel(limits.fuel)
        wasi = wasmtime.WasiConfig()
        wasi.argv = list(argv)
        wasi.stdin_file = self._paths["stdin"]
        wasi.stdout_file = self._paths["stdout"]  # opened truncating
        wasi.stderr_file = self._paths["stderr"]
        store.set_wasi(wasi)
        # Taken after the context exists, so that a sleep until an absolute WASI monotonic
        # time never ends before that time by the module's clock.
        self._wasi_origin_ns = time.monotonic_ns()

        self._host_error = None

        cap = limits.output_bytes + 1
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        started_wall = time.monotonic()
        started_cpu = time.process_time()
        exit_code = 0
        instance: wasmtime.Instance | None = None
        try:
            instance = compiled.linker.instantiate(store, compiled.module)
            start = instance.exports(store)["_start"]
            assert isinstance(start, wasmtime.Func)
            # Only around the work function: instantiation writes the module's memory image
            # to a memfd of wasmtime's own, which a small output cap would refuse.
            resource.setrlimit(
                resource.RLIMIT_FSIZE,
                (cap if hard == resource.RLIM_INFINITY else min(cap, hard), hard),
            )
            start(store)
        except wasmtime.ExitTrap as exc:
            exit_code = self.exit_code = exc.code
        except wasmtime.Trap as exc:
            raise self._classify_trap(exc, store, instance, limits, budget) from None
        except wasmtime.WasmtimeError as exc:
            # Instantiation failures (e.g. initial memory above the cap) land here.
            text = str(exc)
            if ("memory" in text or "table" in text) and (
                "limit" in text or "minimum" in text or "grow" in text
            ):
                raise SliceFailure(
                    ErrorCode.MEMORY_LIMIT,
                    "instantiation needs more than the memory cap allows: "
                    f"{_first_line(text)} (linear memory {budget.memory_bytes} bytes, "
                    f"{budget.table_elements} elements a table, of {limits.memory_bytes})",
                ) from None
            if "unknown import" in text:
                raise SliceFailure(ErrorCode.FORBIDDEN_IMPORT, _first_line(text)) from None
            raise SliceFailure(ErrorCode.WASM_TRAP, _first_line(text)) from None
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
            wall = time.monotonic() - started_wall
            cpu = time.process_time() - started_cpu
        out_size = os.fstat(stdout_fd).st_size
        flood = flood_error(out_size, limits)
        if flood is not None:
            raise flood
        if exit_code != 0:
            exhausted = _exhausted(store, instance, budget)
            if exhausted is not None:
                raise SliceFailure(
                    ErrorCode.MEMORY_LIMIT,
                    f"exited with status {exit_code} after {exhausted} reached its share of "
                    f"the memory cap of {limits.memory_bytes} bytes",
                )
            tail = _tail(self._fds["stderr"])
            raise SliceFailure(
                ErrorCode.WASM_EXIT,
                f"exited with status {exit_code}" + (f": {tail}" if tail else ""),
            )
        result = os.pread(stdout_fd, out_size, 0)
        return SliceResult(
            result,
            Metrics(wall_seconds=wall, cpu_seconds=cpu, bytes_in=len(datum), bytes_out=len(result)),
        )

    def serve(
        self,
        sha256: str,
        argv: tuple[str, ...],
        limits: Limits,
        argv0: str,
        on_stderr: Callable[[bytes], None] | None = None,
    ) -> Serving:
        """Start the cached module as a server of requests, in a Store kept from one request
        to the next (:class:`Serving`): a WASI command that reads a request on stdin, writes
        its answer on stdout and reads again. ``on_stderr`` gets what it writes on stderr,
        as it writes it (64 KiB a request at most)."""
        fuel = limits.fuel is not None
        compiled = self._cache[(sha256, fuel)]
        return Serving(self, compiled, self._engine(fuel), argv, limits, argv0, on_stderr)

    def stderr(self, offset: int = 0) -> bytes:
        """What the running (or last) slice wrote on stderr from ``offset``, at most
        64 KiB."""
        fd = self._fds["stderr"]
        size = os.fstat(fd).st_size
        if size <= offset:
            return b""
        return os.pread(fd, min(size - offset, _STDERR_CAP), offset)

    def compile_cached(
        self, module_bytes: bytes | None, sha256: str, limits: Limits, directory: Path | None
    ) -> None:
        """:meth:`compile`, through an on-disk cache of the compiled module in ``directory``
        (None: none): wasmtime's serialisation, keyed by the module's sha256, wasmtime's
        version and the engine's settings; written 0600, read only when its own checksum
        holds (a truncated or altered file is compiled again and replaced). A module whose
        bytes did not come (``module_bytes`` None) is served from the disk when it is there.
        Only modules that compiled and passed every check are written, and the directory is
        kept under :data:`DISK_CACHE_BYTES` (least recently used out)."""
        key = (sha256, limits.fuel is not None)
        if key in self._cache:
            self._cache.move_to_end(key)
            return
        if directory is None:
            self.compile(module_bytes, sha256, limits)
            return
        engine = self._engine(limits.fuel is not None)
        checks = "fuel" if key[1] else ""
        checks += "epoch" if self.epochs else ""
        tag = f"{sha256[:32]}-{WASMTIME_VERSION}-{ENGINE_TAG}-{checks or 'unchecked'}"
        path = directory / f"{tag}.cwasm"
        module = _read_serialized(engine, path)
        if module is None:
            self.compile(module_bytes, sha256, limits)
            with contextlib.suppress(OSError):  # not ours to write (another user's cache)
                _write_serialized(self._cache[key].module, path)
                _prune(directory, DISK_CACHE_BYTES, keep=path)
            return
        self._keep(key, _Compiled(module, self._linker(engine, module)))

    def _output_size(self) -> int:
        return os.fstat(self._fds["stdout"]).st_size

    def _deadline_reached(self) -> None:
        """From the clock's thread: the running slice is due. A host call that ends the
        slice names its own reason, so the slice's thread answers for it (and is out of
        wasm: nothing needs ending)."""
        limits = self._limits
        if limits is None or self._host_error is not None:
            return
        error = flood_error(self._output_size(), limits) or _wall_clock_error(limits)
        self._timed_out(error)
        if self._expire is not None:
            self._expire(f"a slice reached its wall clock in wasm ({error.message})")

    def expire(self, reason: str) -> None:
        """Stop what runs in wasm now: the epoch, or ``expire`` (which ends the process)."""
        if self._expire is not None:
            self._expire(reason)
        for engine in self._engines.values():
            engine.increment_epoch()

    def _classify_trap(
        self,
        exc: wasmtime.Trap,
        store: wasmtime.Store,
        instance: wasmtime.Instance | None,
        limits: Limits,
        budget: StoreBudget,
    ) -> SliceFailure:
        if self._host_error is not None:
            return self._host_error
        # A limit that was hit explains the trap better than the trap itself: a flood that
        # ran into the wall clock is reported as a flood.
        flood = flood_error(self._output_size(), limits)
        if flood is not None:
            return flood
        code = exc.trap_code
        if code == wasmtime.TrapCode.INTERRUPT:
            return _wall_clock_error(limits)
        if code == wasmtime.TrapCode.OUT_OF_FUEL:
            return SliceFailure(ErrorCode.WASM_FUEL, f"used all {limits.fuel} units of fuel")
        exhausted = _exhausted(store, instance, budget)
        if exhausted is not None:
            return SliceFailure(
                ErrorCode.MEMORY_LIMIT,
                f"trapped after {exhausted} reached its share of the memory cap of "
                f"{limits.memory_bytes} bytes",
            )
        message = _first_line(exc.message)
        if code == wasmtime.TrapCode.STACK_OVERFLOW:
            return SliceFailure(ErrorCode.WASM_TRAP, "stack overflow")
        return SliceFailure(ErrorCode.WASM_TRAP, message)

    def _forbid(self, name: str) -> Callable[..., object]:
        def forbidden(*_args: object) -> object:
            self._host_error = SliceFailure(
                ErrorCode.SANDBOX_VIOLATION,
                f"the work function called {name}, which the sandbox forbids",
            )
            raise wasmtime.Trap(f"sandbox violation: {name}")

        return forbidden

    def _poll_oneoff(
        self, caller: wasmtime.Caller, in_ptr: int, out_ptr: int, count: int, nevents_ptr: int
    ) -> int:
        """WASI ``poll_oneoff``, bounded by the slice's wall clock.

        As wasmtime's: stdin (read) and stdout, stderr (write) are always ready (they are
        files), with ``nbytes`` 1; another descriptor fails the call with ``badf``; a clock
        other than realtime or monotonic, or an unknown event type, with ``inval``. With no
        descriptor ready it sleeps until the earliest clock subscription, unless the slice's
        deadline comes first: then it sleeps until the deadline and ends the slice with
        ``wasm_timeout``.
        """
        memory = caller.get("memory")
        if not isinstance(memory, wasmtime.Memory):
            raise wasmtime.Trap("poll_oneoff: the module exports no memory named 'memory'")
        # The ABI's pointers and count are u32 (wasmtime hands i32s over signed).
        in_ptr, out_ptr, count, nevents_ptr = (
            v & 0xFFFFFFFF for v in (in_ptr, out_ptr, count, nevents_ptr)
        )
        # Each subscription is parsed here, outside the epoch's reach: bound the work.
        if count == 0 or count > _MAX_SUBSCRIPTIONS:
            return _ERRNO_INVAL
        size = memory.data_len(caller)
        if (
            in_ptr + count * _SUBSCRIPTION.size > size
            or out_ptr + count * _EVENT.size > size
            or nevents_ptr + 4 > size
        ):
            return _ERRNO_FAULT
        subscriptions = memory.read(caller, in_ptr, in_ptr + count * _SUBSCRIPTION.size)
        now = time.monotonic_ns()
        ready: list[bytes] = []
        clocks: list[tuple[int, int]] = []  # (deadline by time.monotonic_ns(), userdata)
        for index in range(count):
            userdata, tag, number, timeout, _precision, flags = _SUBSCRIPTION.unpack_from(
                subscriptions, index * _SUBSCRIPTION.size
            )
            if tag == _EVENTTYPE_CLOCK:
                absolute = flags & _SUBCLOCKFLAGS_ABSTIME
                if number == _CLOCK_MONOTONIC:
                    base = self._wasi_origin_ns if absolute else now
                elif number == _CLOCK_REALTIME:
                    base = now - time.time_ns() if absolute else now
                else:
                    return _ERRNO_INVAL
                clocks.append((base + timeout, userdata))
            elif tag in (_EVENTTYPE_FD_READ, _EVENTTYPE_FD_WRITE):
                readable = tag == _EVENTTYPE_FD_READ and number == 0
                if not (readable or (tag == _EVENTTYPE_FD_WRITE and number in (1, 2))):
                    return _ERRNO_BADF
                ready.append(_EVENT.pack(userdata, _ERRNO_SUCCESS, tag, 1, 0))
            else:
                return _ERRNO_INVAL
        if not ready:
            wake = min(deadline for deadline, _ in clocks)
            if wake > self._deadline_ns and self._limits is not None:
                # Named first: the clock's thread then leaves the answer to this one.
                self._host_error = _wall_clock_error(self._limits, " (sleeping in poll_oneoff)")
                _sleep_until(self._deadline_ns)
                raise wasmtime.Trap("wall-clock limit reached in poll_oneoff")
            _sleep_until(wake)
            now = time.monotonic_ns()
        ready += [
            _EVENT.pack(userdata, _ERRNO_SUCCESS, _EVENTTYPE_CLOCK, 0, 0)
            for deadline, userdata in clocks
            if deadline <= now
        ]
        memory.write(caller, b"".join(ready), out_ptr)
        memory.write(caller, struct.pack("<I", len(ready)), nevents_ptr)
        return _ERRNO_SUCCESS

    def _on_progress(self, fraction: float) -> None:
        self._progress(float(fraction))


#: One tiny module per wasm feature: the feature is offered when its module compiles.
#: multi-memory is not among them: wasmtime compiles it, but the runtime refuses modules with
#: more than one memory (``MAX_MEMORIES``), so it must not be offered.
_FEATURE_PROBES = {
    "simd": "(module (func (result v128) (v128.const i32x4 0 0 0 0)))",
    "relaxed-simd": "(module (func (result v128) (i32x4.relaxed_trunc_f32x4_s"
    " (v128.const i32x4 0 0 0 0))))",
    "bulk-memory": "(module (memory 1) (func (memory.fill (i32.const 0) (i32.const 0)"
    " (i32.const 0))))",
    "multi-value": "(module (func (result i32 i32) (i32.const 0) (i32.const 1)))",
    "reference-types": "(module (func (result externref) (ref.null extern)))",
    "tail-call": "(module (func $f (return_call $f)))",
    "threads": "(module (memory 1 1 shared) (func (drop (i32.atomic.load (i32.const 0)))))",
    "memory64": "(module (memory i64 1))",
    "exceptions": "(module (tag) (func (try_table)))",
}


def _wasmtime_version() -> str:
    try:
        return importlib.metadata.version("wasmtime")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


#: The wasmtime package's version: describe says it, and compiled modules are cached by it.
WASMTIME_VERSION = _wasmtime_version()


def _read_serialized(engine: wasmtime.Engine, path: Path) -> wasmtime.Module | None:
    """A module serialised by :func:`_write_serialized`, if it is there, whole, and only we
    could have written it: deserialising runs what the file holds as machine code, so the
    file and its directory must be ours and writable by nobody else."""
    try:
        for where in (path.parent, path):
            info = os.stat(where)
            if info.st_uid != os.geteuid() or info.st_mode & 0o022:
                return None
        blob = path.read_bytes()
    except OSError:
        return None
    digest, body = blob[:32], blob[32:]
    if len(blob) < 32 or hashlib.sha256(body).digest() != digest:
        return None
    try:
        module = wasmtime.Module.deserialize(engine, body)
    except wasmtime.WasmtimeError:
        return None
    with contextlib.suppress(OSError):  # recently used (its access time): pruning keeps it
        os.utime(path, ns=(time.time_ns(), info.st_mtime_ns))
    return module


def _write_serialized(module: wasmtime.Module, path: Path) -> None:
    body = module.serialize()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(hashlib.sha256(body).digest() + body)
    os.replace(partial, path)


def _prune(directory: Path, budget: int, keep: Path) -> None:
    """Remove the least recently used ``*.cwasm`` files of ``directory`` (by access time,
    which :func:`_read_serialized` sets) until the rest fit in ``budget`` bytes (``keep``,
    just written, stays)."""
    entries = []
    for entry in os.scandir(directory):
        if entry.name.endswith(".cwasm") and entry.is_file(follow_symlinks=False):
            with contextlib.suppress(OSError):
                info = entry.stat(follow_symlinks=False)
                entries.append((info.st_atime_ns, info.st_size, entry.path))
    total = sum(size for _, size, _ in entries)
    for _, size, name in sorted(entries):
        if total <= budget:
            break
        if name == str(keep):
            continue
        with contextlib.suppress(OSError):
            os.unlink(name)
            total -= size


def probe_features() -> list[str]:
    """The wasm features this wasmtime build compiles, with the runtime's own engine settings
    (measured, not assumed)."""
    config = wasmtime.Config()
    config.epoch_interruption = True
    engine = wasmtime.Engine(config)
    offered = []
    for name, text in _FEATURE_PROBES.items():
        try:
            wasmtime.Module(engine, bytes(wasmtime.wat2wasm(text)))
        except wasmtime.WasmtimeError:
            continue
        offered.append(name)
    return offered


def _trapping(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` as a host function whose unexpected Python error ends the slice as a trap:
    wasmtime-py lets such an error out of the call that entered wasm, which would end the
    evaluator (a hostile module must not be able to choose that)."""

    @functools.wraps(fn)
    def host(*args: Any) -> Any:
        try:
            return fn(*args)
        except wasmtime.Trap:
            raise
        except Exception as exc:
            raise wasmtime.Trap(f"{fn.__name__}: {type(exc).__name__}: {exc}") from None

    return host


def _is_progress_type(func_type: wasmtime.FuncType | None) -> bool:
    """``dcp.progress`` must be ``(f64) -> ()``."""
    return _has_type(func_type, ["f64"], [])


def _has_type(func_type: wasmtime.FuncType | None, params: list[str], results: list[str]) -> bool:
    return (
        func_type is not None
        and [str(t) for t in func_type.params] == params
        and [str(t) for t in func_type.results] == results
    )


def flood_error(size: int, limits: Limits) -> SliceFailure | None:
    """The error of a slice whose output reached ``size`` bytes, if that is over its cap."""
    if size > limits.output_bytes:
        return SliceFailure(
            ErrorCode.OUTPUT_TOO_LARGE, f"output exceeded the cap of {limits.output_bytes} bytes"
        )
    return None


def _wall_clock_error(limits: Limits, where: str = "") -> SliceFailure:
    return SliceFailure(
        ErrorCode.WASM_TIMEOUT, f"exceeded the wall-clock limit of {limits.wall_seconds:g} s{where}"
    )


def _sleep_until(deadline_ns: int) -> None:
    """Sleep until time.monotonic_ns() reaches ``deadline_ns`` (the GIL is released)."""
    while (left := deadline_ns - time.monotonic_ns()) > 0:
        time.sleep(left / 1e9)


def _exhausted(
    store: wasmtime.Store, instance: wasmtime.Instance | None, budget: StoreBudget
) -> str | None:
    """Which exported memory or table is within a grow step of its limit (a grow must have
    failed), or None. Tables and memories a module does not export cannot be seen: a trap
    after their grow failed is reported as the trap."""
    if instance is None:
        return None
    for name, item in instance.exports(store).items():
        if isinstance(item, wasmtime.Memory):
            if item.data_len(store) + _PAGE > budget.memory_bytes:
                return f"linear memory {name!r}"
        elif isinstance(item, wasmtime.Table):
            # One page's worth of elements, as for memories: a grow step of a table is
            # usually one element, but a loop may grow by more.
            if item.size(store) + _PAGE // TABLE_ELEMENT_BYTES > budget.table_elements:
                return f"table {name!r}"
    return None


def _check_counts(module_bytes: bytes) -> None:
    """Refuse modules that define more memories or tables than one store may hold.

    wasmtime-py does not list a module's own (not exported) memories and tables, so they are
    counted in the binary: sections 4 (tables) and 5 (memories) each open with their count.
    Imported memories and tables need no count: the linker refuses them.

    Raises:
        SliceFailure: MEMORY_LIMIT, naming the count and the most allowed.
    """
    counts = {4: 0, 5: 0}
    offset = 8  # the magic number and the version; wasmtime has validated the rest
    while offset < len(module_bytes):
        section = module_bytes[offset]
        size, offset = _leb128(module_bytes, offset + 1)
        if section in counts:
            counts[section], _ = _leb128(module_bytes, offset)
        offset += size
    for section, what, most in ((5, "linear memories", MAX_MEMORIES), (4, "tables", MAX_TABLES)):
        if counts[section] > most:
            raise SliceFailure(
                ErrorCode.MEMORY_LIMIT,
                f"module defines {counts[section]} {what}; the sandbox allows {most}, "
                "so that the memory cap holds for all of them together",
            )


def _leb128(data: bytes, offset: int) -> tuple[int, int]:
    """An unsigned LEB128 number at ``offset``: (value, offset after it)."""
    value = shift = 0
    while True:
        byte = data[offset]
        offset += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, offset
        shift += 7


def _first_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[0][:300] if lines else "trap"


def _tail(fd: int) -> str:
    size = os.fstat(fd).st_size
    start = max(0, size - 500)
    return os.pread(fd, size - start, start).decode("utf-8", "replace").strip()
