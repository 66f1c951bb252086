"""The ``python`` and ``js`` runtimes: interpreters that are WASI modules, pinned by sha256,
run in the wasm sandbox; the examples' puzzles give the C puzzle's nonces; jobs of both
runtimes deploy, run on a worker and come back in order."""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import wasmtime

import dcp_protocol as p
from dcp_protocol import Limits, SliceFailure
from evaluator.interpreters import (
    INTERPRETERS,
    InterpreterRuntime,
    find,
    install,
    interpreters_dir,
)
from evaluator.wasm import WasmRuntime
from scheduler.client import ComputeClient
from scheduler.jobdoc import JobFileError, load_job_file, parse_document

from .conftest import EXAMPLES, Keystore, SchedulerProcess, WorkerProcess
from .evaluator_client import EvaluatorClient
from .test_policy import admin

MIB = 1 << 20
PUZZLE = (EXAMPLES / "hash-puzzle" / "puzzle.wasm").read_bytes()
PREFIXES = (EXAMPLES / "hash-puzzle" / "prefixes.txt").read_bytes().splitlines()


@pytest.fixture(scope="session")
def installed() -> Path:
    """Both interpreters, in the directory evaluators look in by default (``make test``
    installs them; fetched here from PyPI otherwise, and checked against their pins)."""
    for runtime in INTERPRETERS:
        install(runtime)
    return interpreters_dir()


@pytest.fixture
def evaluator(installed: Path) -> Iterator[EvaluatorClient]:
    """An evaluator that finds both interpreters; it must exit cleanly after the test."""
    client = EvaluatorClient()
    yield client
    assert client.close() == 0


def _puzzle_answers(difficulty: str, evaluator: EvaluatorClient) -> list[bytes]:
    """The C puzzle's answers (in wasm) for the first prefixes."""
    assert isinstance(evaluator.assign(PUZZLE, (difficulty,)), p.Ack)
    out = []
    for prefix in PREFIXES[:3]:
        reply = evaluator.run(prefix + b"\n")
        assert isinstance(reply, p.SliceDone)
        out.append(reply.result)
    return out


@pytest.mark.parametrize("runtime", ["python", "js"])
def test_the_puzzle_in_each_language_gives_the_c_puzzles_nonces(
    runtime: str,
    evaluator: EvaluatorClient,
) -> None:
    ext = "py" if runtime == "python" else "js"
    source = (EXAMPLES / f"hash-puzzle-{ext}" / f"work.{ext}").read_bytes()
    reply = evaluator.assign(
        source, ("12",), runtime=runtime, config={"datum": "bytes"}, memory_bytes=256 * MIB
    )
    assert isinstance(reply, p.Ack), reply
    got = []
    for prefix in PREFIXES[:3]:
        reply = evaluator.run(prefix + b"\n")
        assert isinstance(reply, p.SliceDone), reply
        got.append(reply.result)
    assert got == _puzzle_answers("12", evaluator)


@pytest.mark.parametrize(
    ("runtime", "source"),
    [
        ("python", b"def work(d, *args):\n    return {'d': d, 'args': list(args), 'n': 1.5}\n"),
        ("js", b"function work(d, ...args) { return {d: d, args: args, n: 1.5}; }"),
    ],
)
def test_the_datum_is_the_json_value_and_the_result_its_json(
    runtime: str,
    source: bytes,
    evaluator: EvaluatorClient,
) -> None:
    reply = evaluator.assign(source, ("a", "b"), runtime=runtime, config={"datum": "json"})
    assert isinstance(reply, p.Ack), reply
    for datum in (b'{"x": [1, 2]}', b'"text"', b"null", b"3"):
        reply = evaluator.run(datum)
        assert isinstance(reply, p.SliceDone), reply
        value = p.nesting.loads(reply.result)
        assert value == {"d": p.nesting.loads(datum), "args": ["a", "b"], "n": 1.5}


@pytest.mark.parametrize(
    ("runtime", "source"),
    [
        ("python", b"def work(d):\n    return bytes(reversed(d))\n"),
        ("js", b"function work(d) { return Uint8Array.from(d).reverse(); }"),
    ],
)
def test_raw_inputs_are_bytes_and_bytes_come_back_as_they_are(
    runtime: str,
    source: bytes,
    evaluator: EvaluatorClient,
) -> None:
    assert isinstance(evaluator.assign(source, runtime=runtime, config={"datum": "bytes"}), p.Ack)
    reply = evaluator.run(bytes(range(256)))
    assert isinstance(reply, p.SliceDone), reply
    assert reply.result == bytes(reversed(range(256)))


@pytest.mark.parametrize(
    ("runtime", "source", "where"),
    [
        ("python", b"def helper(d):\n    raise ValueError(f'bad datum {d}')\n\n"
         b"def work(d):\n    return helper(d)\n", 'File "work.py", line 2, in helper'),
        ("js", b"function work(d) {\n  throw new RangeError('bad datum ' + d);\n}", "at work"),
    ],
)  # fmt: skip
def test_an_exception_reaches_the_owner_as_work_function_error_with_its_traceback(
    runtime: str,
    source: bytes,
    where: str,
    evaluator: EvaluatorClient,
) -> None:
    assert isinstance(evaluator.assign(source, runtime=runtime, config={"datum": "json"}), p.Ack)
    reply = evaluator.run(b"7")
    assert isinstance(reply, p.Error)
    assert reply.code == "work_function_error"
    assert "bad datum 7" in reply.message and where in reply.message, reply.message
    assert "<string>" not in reply.message  # the bootstrap's frames are not the owner's


@pytest.mark.parametrize(
    ("runtime", "source"),
    [
        ("python", b"def work(d):\n    return b'1' if d else 1\n"),
        ("js", b"function work(d) { return d ? new Uint8Array([49]) : 1; }"),
    ],
)
def test_a_job_that_says_its_result_kind_gets_only_that_kind(
    runtime: str, source: bytes, evaluator: EvaluatorClient
) -> None:
    for kind, fine, wrong in (("json", b"0", b"1"), ("bytes", b"1", b"0")):
        config = {"datum": "json", "result": kind}
        assert isinstance(evaluator.assign(source, runtime=runtime, config=config), p.Ack)
        reply = evaluator.run(fine)
        assert isinstance(reply, p.SliceDone) and reply.result == b"1", reply
        reply = evaluator.run(wrong)
        assert isinstance(reply, p.Error) and reply.code == "work_function_error", reply
        assert f"this job's results are {kind.upper() if kind == 'json' else kind}" in (
            reply.message
        ), reply.message


@pytest.mark.parametrize(
    "source",
    [
        b"async function work(d, k) { await null; return {d, k}; }",
        b"function work(d, k) { return Promise.resolve({d, k}); }",
        b"function work(d, k) { return new Promise((ok) => os.setTimeout(() => ok({d, k}), 50)); }",
    ],
)
def test_an_async_js_work_function_gives_what_its_promise_settles_to(
    source: bytes, evaluator: EvaluatorClient
) -> None:
    # DCP's work functions may be async. The promise used to be encoded as itself: "{}".
    assert isinstance(
        evaluator.assign(source, ("k",), runtime="js", config={"datum": "json"}), p.Ack
    )
    reply = evaluator.run(b"[1]")
    assert isinstance(reply, p.SliceDone), reply
    assert p.nesting.loads(reply.result) == {"d": [1], "k": "k"}


def test_a_rejected_js_promise_is_work_function_error_with_its_stack(
    evaluator: EvaluatorClient,
) -> None:
    # It used to end the interpreter with "Possibly unhandled promise rejection": wasm_exit.
    source = b"async function work(d) {\n  await null;\n  throw new RangeError('bad ' + d);\n}"
    assert isinstance(evaluator.assign(source, runtime="js", config={"datum": "json"}), p.Ack)
    reply = evaluator.run(b"7")
    assert isinstance(reply, p.Error) and reply.code == "work_function_error", reply
    assert "RangeError: bad 7" in reply.message and "at work" in reply.message, reply.message


@pytest.mark.parametrize(
    ("runtime", "source"),
    [
        ("python", b"def work(d):\n    print('log line')\n    return d\n"),
        ("js", b"function work(d) { console.log('log', 'line'); print('x'); return d; }"),
    ],
)
def test_what_a_work_function_logs_is_not_its_result(
    runtime: str, source: bytes, evaluator: EvaluatorClient
) -> None:
    # JavaScript's console.log and print wrote on stdout, into the result: "log line\n5".
    config = {"datum": "json", "interpreter": "fresh"}
    assert isinstance(evaluator.assign(source, runtime=runtime, config=config), p.Ack)
    reply = evaluator.run(b"5")
    assert isinstance(reply, p.SliceDone), reply
    assert reply.result == b"5"


@pytest.mark.parametrize(
    "source",
    [
        b"function work(d) { std.puts('junk'); return d; }",
        b"function work(d) { std.out.puts('junk'); return d; }",
    ],
)
def test_a_js_work_function_that_writes_on_stdout_fails_by_name(
    source: bytes, evaluator: EvaluatorClient
) -> None:
    # What it wrote there became part of its result ("junk5"), which no reader could tell.
    assert isinstance(evaluator.assign(source, runtime="js", config={"datum": "json"}), p.Ack)
    reply = evaluator.run(b"5")
    assert isinstance(reply, p.Error) and reply.code == "work_function_error", reply
    assert "wrote 4 bytes on stdout" in reply.message, reply.message


def test_a_js_result_may_fill_the_output_cap_exactly(evaluator: EvaluatorClient) -> None:
    source = b"function work(d) { return new Uint8Array(d).fill(120); }"
    assert isinstance(
        evaluator.assign(source, runtime="js", config={"datum": "json"}, output_bytes=4096),
        p.Ack,
    )
    reply = evaluator.run(b"4096")
    assert isinstance(reply, p.SliceDone) and reply.result == b"x" * 4096, reply
    reply = evaluator.run(b"4097")
    assert isinstance(reply, p.Error) and reply.code == "output_too_large", reply
    assert "cap of 4096 bytes" in reply.message, reply.message
    evaluator.renew()  # an output_too_large answer may end an evaluator (MAY_END_EVALUATOR)


@pytest.mark.parametrize(
    ("runtime", "source"),
    [
        ("python", b"import time\ndef work(d):\n    progress(0.25)\n    time.sleep(0.3)\n"
         b"    progress(0.75)\n    time.sleep(0.3)\n    return 1\n"),
        ("js", b"function work(d) {\n  progress(0.25); os.sleep(300);\n"
         b"  progress(0.75); os.sleep(300);\n  return 1;\n}"),
    ],
)  # fmt: skip
def test_progress_is_reported_while_the_slice_runs(
    runtime: str,
    source: bytes,
    evaluator: EvaluatorClient,
) -> None:
    """The work function's sleeps are the slice taking time, the thing under test: the
    evaluator forwards at most one progress a 0.1 s, and a fresh interpreter's stderr is read
    every 0.05 s; no condition of ours could stand in for the work function's own time."""
    assert isinstance(evaluator.assign(source, runtime=runtime, config={"datum": "json"}), p.Ack)
    reply = evaluator.run(b"0")
    assert isinstance(reply, p.SliceDone), reply
    assert evaluator.progress == [0.25, 0.75]


def test_describe_offers_each_verified_interpreter_as_its_runtime(
    evaluator: EvaluatorClient,
) -> None:
    reply = evaluator.request(p.Describe(id=evaluator.next_id()))
    assert isinstance(reply, p.Capabilities)
    runtimes = reply.capabilities["runtimes"]
    for name, spec in INTERPRETERS.items():
        assert runtimes[name]["sha256"] == spec.sha256
        assert runtimes[name]["in"] == "wasm"


def test_an_interpreter_directory_it_cannot_read_is_not_offered_and_the_evaluator_lives(
    tmp_path: Path,
) -> None:
    """The packaged manager named root's home (0700) to evaluators it runs as nobody: describe
    died of the PermissionError, and so did every worker start. Any error of reading the
    directory (here a name too long to stat, which root cannot bypass) withholds the runtime
    and says why."""
    unreadable = tmp_path / ("x" * 300)
    runtime = InterpreterRuntime(WasmRuntime(), directory=unreadable, cache_dir=None)
    assert runtime.available() == {}
    evaluator = EvaluatorClient(interpreters=str(unreadable))
    reply = evaluator.request(p.Describe(id=evaluator.next_id()))
    assert isinstance(reply, p.Capabilities), reply
    runtimes = reply.capabilities["runtimes"]
    assert "python" not in runtimes and "js" not in runtimes and "wasm" in runtimes
    assert evaluator.close() == 0


def test_an_interpreter_that_is_not_its_pin_is_not_offered(installed: Path, tmp_path: Path) -> None:
    for path in find(installed).values():
        shutil.copy(path, tmp_path / path.name)
    tampered = tmp_path / INTERPRETERS["js"].filename
    data = bytearray(tampered.read_bytes())
    data[-1] ^= 1
    tampered.write_bytes(bytes(data))
    runtime = InterpreterRuntime(WasmRuntime(), directory=tmp_path, cache_dir=None)
    assert set(runtime.available()) == {"python"}
    source = b"function work(d) { return d; }"
    with pytest.raises(SliceFailure) as refused:
        runtime.assign("js", source, hashlib.sha256(source).hexdigest(), Limits())
    assert refused.value.code is p.ErrorCode.UNSUPPORTED_RUNTIME
    assert "hashes to" in refused.value.message


def test_the_compiled_interpreter_is_cached_on_disk_privately_and_checked(
    installed: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "compiled"
    source = b"function work(d) { return d + 1; }"
    sha = hashlib.sha256(source).hexdigest()

    def one_slice() -> bytes:
        runtime = InterpreterRuntime(WasmRuntime(), directory=installed, cache_dir=cache)
        runtime.assign("js", source, sha, Limits())
        out = runtime.run("js", sha, (), Limits(), b"41", "json").result
        return out

    assert one_slice() == b"42"
    (entry,) = cache.iterdir()
    assert stat.S_IMODE(entry.stat().st_mode) == 0o600
    assert stat.S_IMODE(cache.stat().st_mode) == 0o700
    first = entry.stat().st_mtime_ns
    assert one_slice() == b"42" and entry.stat().st_mtime_ns == first  # read, not rewritten
    entry.write_bytes(entry.read_bytes()[:-100])  # truncated: compiled again, replaced
    assert one_slice() == b"42" and entry.stat().st_size > 100 and entry.stat().st_mtime_ns != first
    os.chmod(entry, 0o666)  # writable by others: never deserialised, replaced by our own
    assert one_slice() == b"42" and stat.S_IMODE(entry.stat().st_mode) == 0o600


def test_a_python_job_file_carries_its_source_and_json_or_raw_inputs(tmp_path: Path) -> None:
    (tmp_path / "work.py").write_text("def work(d):\n    return d\n")
    (tmp_path / "lines.txt").write_bytes(b"a\nb\n")
    (tmp_path / "values.toml").write_text(
        'runtime = "python"\nmodule = "work.py"\n[inputs]\nvalues = [1, "two", [3], {k = 4}]\n'
    )
    owner = "0x" + "11" * 20
    job = parse_document(load_job_file(tmp_path / "values.toml"), owner)
    assert job.data == (b"1", b'"two"', b"[3]", b'{"k": 4}')
    assert job.config == {"datum": "json", "interpreter": "warm"}
    (tmp_path / "file.toml").write_text(
        'runtime = "js"\nmodule = "work.py"\n[inputs]\nfile = "lines.txt"\n'
    )
    job = parse_document(load_job_file(tmp_path / "file.toml"), owner)
    assert job.data == (b"a", b"b") and job.config == {"datum": "bytes", "interpreter": "warm"}
    (tmp_path / "both.toml").write_text(
        'runtime = "python"\nmodule = "work.py"\n[inputs]\nfile = "lines.txt"\nvalues = [1]\n'
    )
    with pytest.raises(JobFileError, match="values .JSON. or file .bytes., not both"):
        load_job_file(tmp_path / "both.toml")
    (tmp_path / "kinds.toml").write_text(
        'runtime = "python"\nmodule = "work.py"\nresult = "bytes"\n[inputs]\nvalues = [1]\n'
    )
    job = parse_document(load_job_file(tmp_path / "kinds.toml"), owner)
    assert job.config == {"datum": "json", "interpreter": "warm", "result": "bytes"}
    (tmp_path / "kinds.toml").write_text(
        'runtime = "python"\nmodule = "work.py"\nresult = "text"\n[inputs]\nvalues = [1]\n'
    )
    with pytest.raises(JobFileError, match="result is 'json', 'bytes' or 'any'"):
        parse_document(load_job_file(tmp_path / "kinds.toml"), owner)
    (tmp_path / "wasm.toml").write_text(
        f'module = "{EXAMPLES / "echo" / "echo.wasm"}"\nresult = "bytes"\n'
        'interpreter = "fresh"\n[inputs]\nvalues = ["a"]\n'
    )
    with pytest.raises(JobFileError, match="result is for python and js jobs, not wasm"):
        load_job_file(tmp_path / "wasm.toml")  # both were silently ignored
    example = parse_document(load_job_file(EXAMPLES / "hash-puzzle-py" / "job.toml"), owner)
    assert example.verifier_runtime == "python" and example.verifier is not None
    (tmp_path / "work.py").write_bytes(b"\xff\xfe")
    with pytest.raises(JobFileError, match="the source is not UTF-8 text"):
        parse_document(load_job_file(tmp_path / "values.toml"), owner)


def test_a_job_of_each_runtime_runs_end_to_end(
    evaluator: EvaluatorClient,
    scheduler: SchedulerProcess,
    make_keystore: Callable[[str], Keystore],
    workers: Callable[..., WorkerProcess],
) -> None:
    owner = make_keystore("owner")
    admin(scheduler.db, "bank", "mint", owner.identity.address, "1")  # the examples' offers
    worker = workers(scheduler.url, make_keystore("worker"), 2)
    expected = _puzzle_answers("12", evaluator)
    with ComputeClient(scheduler.url, owner.identity) as client:
        for example in ("hash-puzzle-py", "hash-puzzle-js"):
            job = client.deploy(EXAMPLES / example / "job.toml")
            results = list(client.results(job, wait=True, timeout=120))
            states = [r.state for r in results]
            assert states == ["done"] * len(PREFIXES), (example, worker.output()[-3000:])
            assert [r.result for r in results[:3]] == expected, example
    assert worker.stop() == 0


def cube_root_of_power(x: int, power: str) -> object:
    """A work function for Compute.map: it imports what it uses, inside itself."""
    import math

    if x < 0:
        raise ValueError(f"no negative inputs, got {x}")
    return {"x": x, "root": round(math.pow(x ** int(power), 1 / 3), 6)}


def test_compute_map_runs_a_python_function_and_gives_results_in_order(
    installed: Path,
    scheduler: SchedulerProcess,
    make_keystore: Callable[[str], Keystore],
    workers: Callable[..., WorkerProcess],
) -> None:
    from scheduler.compute import Compute, FailedSlice, JobFailed

    owner = make_keystore("owner")
    worker = workers(scheduler.url, make_keystore("worker"), 2)
    with Compute(scheduler.url, owner.identity) as c:
        job = c.map(cube_root_of_power, range(12), "3", name="cubes")
        assert job.results(timeout=120, progress=False) == [
            {"x": x, "root": float(x)} for x in range(12)
        ]
        assert job.status()["runtime"] == "python"
        raw = c.map("def work(d):\n    return d.upper()\n", [b"ab", b"cd"])
        assert raw.results(timeout=120, progress=False) == [b"AB", b"CD"]
        # Bytes that happen to be JSON text came back as a number (b"123" -> 123): a job
        # says what its work function returns, and the interpreter holds it to that.
        digits = "def work(d):\n    return b'123'\n"
        assert c.map(digits, [1], result="bytes").results(timeout=120, progress=False) == [b"123"]
        with pytest.raises(JobFailed) as wrong_kind:
            c.map(digits, [1], max_attempts=1).results(timeout=120, progress=False)
        assert "this job's results are JSON" in wrong_kind.value.failures[0]
        failing = c.map(cube_root_of_power, [1, -1], "3", max_attempts=1)
        with pytest.raises(JobFailed) as failed:
            failing.results(timeout=120, progress=False)
        assert list(failed.value.failures) == [1]
        assert "work_function_error" in failed.value.failures[1]
        assert "no negative inputs, got -1" in failed.value.failures[1]
        mixed = failing.results(timeout=120, errors="return", progress=False)
        assert mixed[0] == {"x": 1, "root": 1.0} and isinstance(mixed[1], FailedSlice)
        with pytest.raises(ValueError, match="lambda"):
            c.map(lambda x: x, [1])
        with pytest.raises(ValueError, match="not a mix"):
            c.map(cube_root_of_power, [1, b"x"])
    assert worker.stop() == 0


def close_enough(datum, a, b):  # type: ignore[no-untyped-def]
    return abs(float(a) - float(b)) < 1e-9


def test_compute_map_deploys_a_replicated_job_with_a_comparison_function(
    tmp_path: Path,
    installed: Path,
    scheduler: SchedulerProcess,
    make_keystore: Callable[[str], Keystore],
    workers: Callable[..., WorkerProcess],
) -> None:
    """``Compute.map(redundancy=...)``: the job file's [redundancy] from Python, with the
    comparison function given as a function (it had no way to ask for redundancy)."""
    from scheduler.compute import Compute

    owner = make_keystore("owner")
    with Compute(scheduler.url, owner.identity) as c:
        job = c.map(
            cube_root_of_power,
            range(4),
            "3",
            redundancy={"quorum": 2, "max_replicas": 3, "compare": close_enough},
        )
        status = job.status()
        assert status["redundancy"]["quorum"] == 2 and status["compare"] is True
        runners = [
            workers(scheduler.url, make_keystore(f"w{i}"), 1, state_dir=tmp_path / f"w{i}")
            for i in range(2)
        ]
        assert job.results(timeout=120, progress=False) == [
            {"x": x, "root": float(x)} for x in range(4)
        ]
        votes = list(c.client.votes(job.id))
    assert all(v["votes"]["agreed"] == 2 for v in votes), votes
    for runner in runners:
        assert runner.stop() == 0


COUNTER = b"count = 0\ndef work(d):\n    global count\n    count += 1\n    return count\n"


def test_a_warm_interpreter_serves_one_jobs_slices_and_never_another_job(
    evaluator: EvaluatorClient,
) -> None:
    """The slices of one job share one interpreter (its globals persist), a job that asks
    for ``interpreter = "fresh"`` gets a new one each slice, and another job (even with the
    same source) never sees the first one's state; a failed slice ends nothing but itself,
    and a timeout, which ends the evaluator, leaves nothing to the next one."""

    def counts(job: str, n: int, config: dict[str, object], source: bytes = COUNTER) -> list[bytes]:
        reply = evaluator.assign(source, runtime="python", job=job, config=config)
        assert isinstance(reply, p.Ack), reply
        out = []
        for _ in range(n):
            reply = evaluator.run(b"0")
            assert isinstance(reply, p.SliceDone), reply
            out.append(reply.result)
        return out

    assert counts("a", 3, {"datum": "json"}) == [b"1", b"2", b"3"]
    assert counts("b", 2, {"datum": "json"}) == [b"1", b"2"]  # same source, new job
    assert counts("c", 2, {"datum": "json", "interpreter": "fresh"}) == [b"1", b"1"]
    flaky = COUNTER + (
        b"def work(d, _w=work):\n    n = _w(d)\n    if n == 2:\n"
        b"        raise RuntimeError('second')\n    if n == 3:\n"
        b"        while True: pass\n    return n\n"
    )
    reply = evaluator.assign(
        flaky, runtime="python", job="d", config={"datum": "json"}, wall_seconds=1
    )
    assert isinstance(reply, p.Ack), reply
    first = evaluator.run(b"0")
    assert isinstance(first, p.SliceDone) and first.result == b"1"
    failed = evaluator.run(b"0")
    assert isinstance(failed, p.Error) and failed.code == "work_function_error"
    looping = evaluator.run(b"0")  # the same interpreter: its third call loops
    assert isinstance(looping, p.Error) and looping.code == "wasm_timeout"
    evaluator.replace_expired()  # a loop ends its evaluator; the worker starts a fresh one
    reply = evaluator.assign(
        flaky, runtime="python", job="d", config={"datum": "json"}, wall_seconds=1
    )
    assert isinstance(reply, p.Ack), reply
    after = evaluator.run(b"0")  # a new interpreter for the same job
    assert isinstance(after, p.SliceDone) and after.result == b"1"


COMPARE_SOURCES = {
    "python": b"def compare(d, a, b):\n"
    b"    return abs(float(a) - float(b)) <= 1e-6 * max(1.0, abs(float(a)))\n",
    "js": b"function compare(d, a, b) {\n"
    b"  const x = +String.fromCharCode(...a), y = +String.fromCharCode(...b);\n"
    b"  return Math.abs(x - y) <= 1e-6 * Math.max(1, Math.abs(x));\n}",
    # DCP's functions may be async: so may a comparison function.
    "js_async": b"async function compare(d, a, b) {\n  await null;\n"
    b"  const x = +String.fromCharCode(...a), y = +String.fromCharCode(...b);\n"
    b"  return Math.abs(x - y) <= 1e-6 * Math.max(1, Math.abs(x));\n}",
}
BROKEN_COMPARE = {
    "python": b"def compare(d, a, b):\n    raise ValueError('broken')\n",
    "js": b"function compare(d, a, b) { throw new Error('broken'); }",
}


@pytest.mark.parametrize("runtime", ["wasm", "python", "js", "js_async"])
def test_a_comparison_function_in_each_runtime_decides_which_results_agree(
    installed: Path, zig_build: Callable[[Path], bytes], runtime: str
) -> None:
    """redundancy.compare in wasm, Python or JS (only Python's was tried end to end): two
    results that differ in their last digits agree, two far apart do not, and a comparison
    function that fails says they do not, by name."""
    from scheduler.verifier import VerifierPool

    language = runtime.removesuffix("_async")
    if language == "wasm":
        source = zig_build(Path(__file__).parent / "wasm" / "compare.c")
        broken = bytes(wasmtime.wat2wasm('(module (func (export "_start") unreachable))'))
    else:
        source, broken = COMPARE_SOURCES[runtime], BROKEN_COMPARE[language]

    async def verdicts() -> list[tuple[bool, str]]:
        pool = VerifierPool(size=1)
        try:
            out = []
            for function, first, second in (
                (source, b"1.41421356", b"1.41421357"),
                (source, b"1.41421356", b"42"),
                (broken, b"1", b"1"),
            ):
                v = await pool.compare("job", function, (), b"2", first, second, runtime=language)
                out.append((v.ok, v.code))
            return out
        finally:
            await pool.close()

    said = asyncio.run(verdicts())
    assert said[:2] == [(True, ""), (False, "result_rejected")], said
    assert said[2] == (False, "verifier_failed"), said


@pytest.mark.parametrize(
    ("runtime", "source"),
    [
        ("python", (EXAMPLES / "hash-puzzle-py" / "verify.py").read_bytes()),
        (
            "js",
            b"function verify(datum, result, want) {\n"
            b"  return String.fromCharCode(...result) === String.fromCharCode(...datum) + want;\n}",
        ),
    ],
)
def test_a_verifier_in_python_or_js_accepts_rejects_and_fails_by_name(
    evaluator: EvaluatorClient, runtime: str, source: bytes
) -> None:
    from scheduler.verifier import VerifierPool

    if runtime == "python":
        (right,) = _puzzle_answers("12", evaluator)[:1]
        prefix, argv, wrong = PREFIXES[0], ("12",), b"1 " + b"0" * 64 + b"\n"
    else:
        prefix, argv, right, wrong = b"ab", ("!",), b"ab!", b"ab?"
    broken = b"def verify(d, r, *a):\n    raise ValueError('broken')\n"
    if runtime == "js":
        broken = b"function verify(d, r) { throw new Error('broken'); }"

    async def verdicts() -> list[tuple[bool, str]]:
        pool = VerifierPool(size=1)
        try:
            out = []
            for verifier, result in ((source, right), (source, wrong), (broken, right)):
                v = await pool.verify("job", verifier, argv, prefix, result, runtime=runtime)
                out.append((v.ok, v.code))
            return out
        finally:
            await pool.close()

    assert asyncio.run(verdicts()) == [
        (True, ""),
        (False, "result_rejected"),
        (False, "verifier_failed"),
    ]
