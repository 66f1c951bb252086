"""The ``wasm`` runtime: WASI command modules on wasmtime, with limits.

A work function is a WASI command (``_start``). The slice datum is its stdin, its stdout is the
result, job arguments are its argv. It gets no preopened directory, an empty environment and no
sockets; calls to ``path_open`` or ``sock_*`` trap with ``sandbox_violation``. Limits:

* wall clock: epoch interruption, a ticker thread advances the epoch every ``TICK`` seconds;
* fuel (instructions), when the job asks for it (a second engine with fuel metering);
* linear memory: ``Store.set_limits``; ``memory.grow`` fails past the cap;
* output: stdout goes to an in-memory file under RLIMIT_FSIZE, so a flood stops at the cap + 1
  byte.

Compiled modules are cached in memory by (sha256, engine).
"""

from __future__ import annotations

import hashlib
import os
import resource
import signal
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import wasmtime

from dcp_worker.protocol import ErrorCode, Limits, Metrics

from .errors import SliceError

TICK = 0.005
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


@dataclass
class _Compiled:
    module: wasmtime.Module
    #: WASI plus our shadowing host functions; reusable across stores of one engine.
    linker: wasmtime.Linker


class WasmRuntime:
    """Compiles, caches and runs WASI modules; slice I/O goes through in-memory files."""

    def __init__(self, progress: Callable[[float], None] | None = None) -> None:
        self._progress = progress or (lambda _f: None)
        self._engines: dict[bool, wasmtime.Engine] = {}
        self._cache: OrderedDict[tuple[str, bool], _Compiled] = OrderedDict()
        self._ticker_started = False
        self._violation: str | None = None
        # A write past RLIMIT_FSIZE must fail with EFBIG, not kill the evaluator.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        # The slice's stdin, stdout and stderr are in-memory files (memfd), handed to WASI by
        # their /proc paths: a truncating open of a file on disk cost ~200 us, three per slice.
        self._fds = {
            name: os.memfd_create(f"dcp-{name}", os.MFD_CLOEXEC)
            for name in ("stdin", "stdout", "stderr")
        }
        self._paths = {name: f"/proc/self/fd/{fd}" for name, fd in self._fds.items()}

    # ------------------------------------------------------------------ engines and modules

    def _engine(self, fuel: bool) -> wasmtime.Engine:
        engine = self._engines.get(fuel)
        if engine is None:
            config = wasmtime.Config()
            config.epoch_interruption = True
            config.consume_fuel = fuel
            config.cranelift_opt_level = "speed"
            engine = self._engines[fuel] = wasmtime.Engine(config)
            self._start_ticker()
        return engine

    def _start_ticker(self) -> None:
        if self._ticker_started:
            return
        self._ticker_started = True

        def tick() -> None:
            while True:
                time.sleep(TICK)
                for engine in list(self._engines.values()):
                    engine.increment_epoch()

        threading.Thread(target=tick, name="epoch-ticker", daemon=True).start()

    def has(self, sha256: str, limits: Limits) -> bool:
        return (sha256, limits.fuel is not None) in self._cache

    def compile(self, module_bytes: bytes | None, sha256: str, limits: Limits) -> None:
        """Make sure the module is compiled and cached.

        Raises:
            SliceError: MODULE_NOT_CACHED (no bytes and not cached), INVALID_MODULE,
                FORBIDDEN_IMPORT.
        """
        key = (sha256, limits.fuel is not None)
        if key in self._cache:
            self._cache.move_to_end(key)
            return
        if module_bytes is None:
            raise SliceError(ErrorCode.MODULE_NOT_CACHED, f"module {sha256} is not cached")
        actual = hashlib.sha256(module_bytes).hexdigest()
        if actual != sha256:
            raise SliceError(ErrorCode.INVALID_MODULE, f"module hashes to {actual}, not {sha256}")
        engine = self._engine(limits.fuel is not None)
        try:
            module = wasmtime.Module(engine, module_bytes)
        except wasmtime.WasmtimeError as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else "invalid"
            raise SliceError(
                ErrorCode.INVALID_MODULE, f"not a valid wasm module: {first}"
            ) from None
        if "_start" not in {e.name for e in module.exports}:
            raise SliceError(
                ErrorCode.INVALID_MODULE, "module exports no _start (not a WASI command)"
            )
        self._cache[key] = _Compiled(module, self._linker(engine, module))
        if len(self._cache) > _CACHE_ENTRIES:
            self._cache.popitem(last=False)

    def _linker(self, engine: wasmtime.Engine, module: wasmtime.Module) -> wasmtime.Linker:
        """WASI, with forbidden calls shadowed by traps and ``dcp.progress`` defined.

        Raises:
            SliceError: FORBIDDEN_IMPORT for anything else the module imports.
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
            elif imp.module == "dcp" and name == "progress" and _is_progress_type(func_type):
                assert func_type is not None
                linker.define_func(imp.module, name, func_type, self._on_progress)
            else:
                raise SliceError(
                    ErrorCode.FORBIDDEN_IMPORT,
                    f"module imports {imp.module}.{name}, which the sandbox does not provide",
                )
        return linker

    # ------------------------------------------------------------------ running

    def run(
        self, sha256: str, argv: tuple[str, ...], limits: Limits, datum: bytes
    ) -> tuple[bytes, Metrics]:
        """Run one slice; returns (stdout, metrics).

        Raises:
            SliceError: the slice failed; ``code`` says how.
        """
        fuel = limits.fuel is not None
        compiled = self._cache[(sha256, fuel)]
        store = wasmtime.Store(self._engine(fuel))
        try:
            return self._run_in(store, compiled, argv, limits, datum)
        finally:
            # The store owns the slice's instance and linear memory (a reservation of about
            # 4 GiB of address space). A trap keeps it alive: its traceback holds this frame,
            # and wasmtime-py's enter_wasm frame holds the trap, a cycle that only the
            # garbage collector breaks. Under the evaluator's RLIMIT_AS three such leftovers
            # made every later slice, of any job, fail to reserve its memory. Closing the
            # store frees it now, whatever the outcome; the Python objects left are small.
            store.close()

    def _run_in(
        self,
        store: wasmtime.Store,
        compiled: _Compiled,
        argv: tuple[str, ...],
        limits: Limits,
        datum: bytes,
    ) -> tuple[bytes, Metrics]:
        stdin_fd = self._fds["stdin"]
        os.pwrite(stdin_fd, datum, 0)
        os.ftruncate(stdin_fd, len(datum))
        stdout_fd = self._fds["stdout"]

        store.set_limits(memory_size=limits.memory_bytes)
        ticks = max(1, int(limits.wall_seconds / TICK))
        store.set_epoch_deadline(ticks)
        if limits.fuel is not None:
            store.set_fuel(limits.fuel)
        wasi = wasmtime.WasiConfig()
        wasi.argv = ["work", *argv]
        wasi.stdin_file = self._paths["stdin"]
        wasi.stdout_file = self._paths["stdout"]  # opened truncating
        wasi.stderr_file = self._paths["stderr"]
        store.set_wasi(wasi)

        self._violation = None

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
            exit_code = exc.code
        except wasmtime.Trap as exc:
            raise self._classify_trap(exc, store, instance, limits) from None
        except wasmtime.WasmtimeError as exc:
            # Instantiation failures (e.g. initial memory above the cap) land here.
            text = str(exc)
            if "memory" in text and ("limit" in text or "minimum" in text or "grow" in text):
                raise SliceError(
                    ErrorCode.MEMORY_LIMIT,
                    f"instantiation needs more memory than the cap of {limits.memory_bytes} bytes",
                ) from None
            if "unknown import" in text:
                raise SliceError(ErrorCode.FORBIDDEN_IMPORT, _first_line(text)) from None
            raise SliceError(ErrorCode.WASM_TRAP, _first_line(text)) from None
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
            wall = time.monotonic() - started_wall
            cpu = time.process_time() - started_cpu
        out_size = os.fstat(stdout_fd).st_size
        if out_size > limits.output_bytes:
            raise SliceError(
                ErrorCode.OUTPUT_TOO_LARGE,
                f"output exceeded the cap of {limits.output_bytes} bytes",
            )
        if exit_code != 0:
            if _memory_exhausted(store, instance, limits):
                raise SliceError(
                    ErrorCode.MEMORY_LIMIT,
                    f"exited with status {exit_code} after linear memory reached the cap of "
                    f"{limits.memory_bytes} bytes",
                )
            tail = _tail(self._fds["stderr"])
            raise SliceError(
                ErrorCode.WASM_EXIT,
                f"exited with status {exit_code}" + (f": {tail}" if tail else ""),
            )
        result = os.pread(stdout_fd, out_size, 0)
        return result, Metrics(
            wall_seconds=wall, cpu_seconds=cpu, bytes_in=len(datum), bytes_out=len(result)
        )

    def _classify_trap(
        self,
        exc: wasmtime.Trap,
        store: wasmtime.Store,
        instance: wasmtime.Instance | None,
        limits: Limits,
    ) -> SliceError:
        if self._violation is not None:
            return SliceError(
                ErrorCode.SANDBOX_VIOLATION,
                f"the work function called {self._violation}, which the sandbox forbids",
            )
        # A limit that was hit explains the trap better than the trap itself: a flood that
        # ran into the wall clock is reported as a flood.
        if os.fstat(self._fds["stdout"]).st_size > limits.output_bytes:
            return SliceError(
                ErrorCode.OUTPUT_TOO_LARGE,
                f"output exceeded the cap of {limits.output_bytes} bytes",
            )
        code = exc.trap_code
        if code == wasmtime.TrapCode.INTERRUPT:
            return SliceError(
                ErrorCode.WASM_TIMEOUT,
                f"exceeded the wall-clock limit of {limits.wall_seconds:g} s",
            )
        if code == wasmtime.TrapCode.OUT_OF_FUEL:
            return SliceError(ErrorCode.WASM_FUEL, f"used all {limits.fuel} units of fuel")
        if _memory_exhausted(store, instance, limits):
            return SliceError(
                ErrorCode.MEMORY_LIMIT,
                f"trapped after linear memory reached the cap of {limits.memory_bytes} bytes",
            )
        message = _first_line(exc.message)
        if code == wasmtime.TrapCode.STACK_OVERFLOW:
            return SliceError(ErrorCode.WASM_TRAP, "stack overflow")
        return SliceError(ErrorCode.WASM_TRAP, message)

    def _forbid(self, name: str) -> Callable[..., object]:
        def forbidden(*_args: object) -> object:
            self._violation = name
            raise wasmtime.Trap(f"sandbox violation: {name}")

        return forbidden

    def _on_progress(self, fraction: float) -> None:
        self._progress(float(fraction))


#: One tiny module per wasm feature: the feature is offered when its module compiles.
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
    "multi-memory": "(module (memory 1) (memory 1))",
    "memory64": "(module (memory i64 1))",
    "exceptions": "(module (tag) (func (try_table)))",
}


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


def _is_progress_type(func_type: wasmtime.FuncType | None) -> bool:
    """``dcp.progress`` must be ``(f64) -> ()``."""
    return (
        func_type is not None
        and [str(t) for t in func_type.params] == ["f64"]
        and not func_type.results
    )


def _memory_exhausted(
    store: wasmtime.Store, instance: wasmtime.Instance | None, limits: Limits
) -> bool:
    """True when the exported memory is within one page of the cap (a grow must have failed)."""
    if instance is None:
        return False
    memory = instance.exports(store).get("memory")
    if not isinstance(memory, wasmtime.Memory):
        return False
    return memory.data_len(store) + 65536 > limits.memory_bytes


def _first_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[0][:300] if lines else "trap"


def _tail(fd: int) -> str:
    size = os.fstat(fd).st_size
    start = max(0, size - 500)
    return os.pread(fd, size - start, start).decode("utf-8", "replace").strip()
