"""Python and JavaScript work functions (issue 18): what the interpreters in the sandbox cost.

Three figures, peers in the same run:

1. **End to end, a trivial Python function** (``work(x) = x + 1`` over N integers) through a
   local scheduler and a worker with S sandboxes (Compute.map; signing, verification of
   signatures, the outbox and the sandbox on; a fresh interpreter per slice, the only mode),
   against Dask's LocalCluster mapping the same function natively with S single-threaded
   worker processes: slices per second and the ratio (target: at least 1x; Dask runs it
   unsandboxed).
2. **CPU-bound**: the hash puzzle (examples/hash-puzzle-py/work.py, -js/work.js) on K prefixes
   at difficulty D, one evaluator, against the same function in native CPython (this
   interpreter, in process) and the same script under Node (where ``node`` is installed):
   seconds per slice and the ratios. The C puzzle in wasm is given beside them.
3. **Start-up**, per runtime, in a fresh evaluator process: compiling the interpreter (no
   cache), loading it from the on-disk cache, the first slice, a warm slice (the median of
   W; each is a fresh instance).

    python benchmarks/interpreters.py [--quick] [--slices N] [--sandboxes S] [--rounds R]
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import dask_map_rates, median, pipeline, report  # noqa: E402

import dcp_protocol as p  # noqa: E402
from evaluator.interpreters import INTERPRETERS, install, interpreters_dir  # noqa: E402
from scheduler.compute import Compute  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
PREFIXES = (EXAMPLES / "hash-puzzle" / "prefixes.txt").read_bytes().splitlines()


def plus_one(x: int) -> int:
    return x + 1


class Evaluator:
    """A real evaluator process, spoken to over its pipes (as tests/evaluator_client.py)."""

    def __init__(self, cache: Path) -> None:
        """``cache``: where it keeps compiled interpreters (its XDG_CACHE_HOME)."""
        self.proc = subprocess.Popen(
            [sys.executable, "-I", "-m", "evaluator", "--stdio"]
            + ["--interpreters", str(interpreters_dir())],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env={"XDG_CACHE_HOME": str(cache)},
            cwd="/",
        )
        self.decoder = p.StreamDecoder(p.EVALUATOR_MESSAGES)
        self.next = 0

    def request(self, message_of: type, **fields: object) -> p.Message:
        self.next += 1
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(p.frame(message_of(id=self.next, **fields)))
        self.proc.stdin.flush()
        while True:
            message = self.decoder.next_message()
            if message is None:
                self.decoder.receive_data(self.proc.stdout.read1(1 << 16))
                continue
            if not isinstance(message, p.Progress):
                return message

    def assign(self, runtime: str, source: bytes, argv: tuple[str, ...], kind: str) -> None:
        reply = self.request(
            p.Assign,
            job=f"j{self.next}",
            runtime=runtime,
            sha256=hashlib.sha256(source).hexdigest(),
            module=source,
            argv=argv,
            limits=p.Limits(wall_seconds=300, memory_bytes=256 << 20),
            config={"datum": kind} if runtime != "wasm" else {},
        )
        assert isinstance(reply, p.Ack), reply

    def run(self, datum: bytes) -> bytes:
        reply = self.request(p.RunSlice, slice=0, datum=datum)
        assert isinstance(reply, p.SliceDone), reply
        return reply.result

    def close(self) -> None:
        self.request(p.Die)
        self.proc.wait(30)


def startup(warm: int, cache: Path) -> dict[str, dict[str, float]]:
    """Per runtime: compile (no cache), cache load, first slice, warm slice (ms)."""
    figures: dict[str, dict[str, float]] = {}
    sources = {
        "python": b"def work(d):\n    return d + 1\n",
        "js": b"function work(d) { return d + 1; }",
    }
    for runtime, source in sources.items():
        shutil.rmtree(cache, ignore_errors=True)  # compiled from nothing, then from the cache
        row: dict[str, float] = {}
        for label in ("compile_ms", "cached_ms"):
            started = time.perf_counter()
            ev = Evaluator(cache)
            ev.request(p.Describe)
            described = time.perf_counter()
            ev.assign(runtime, source, (), "json")
            assigned = time.perf_counter()
            assert ev.run(b"41") == b"42"
            first = time.perf_counter()
            row[label] = round(1000 * (assigned - described), 1)
            if label == "cached_ms":
                row["process_start_ms"] = round(1000 * (described - started), 1)
                row["first_slice_ms"] = round(1000 * (first - assigned), 2)
                times = []
                for _ in range(warm):
                    t = time.perf_counter()
                    ev.run(b"1")
                    times.append(time.perf_counter() - t)
                row["warm_slice_ms"] = round(1000 * median(times), 2)
                row["cold_start_ms"] = round(1000 * (first - started), 1)
            ev.close()
        figures[runtime] = row
    return figures


def _native_puzzle(prefix: bytes, difficulty: str) -> bytes:
    namespace: dict[str, object] = {"progress": lambda _f: None}
    exec((EXAMPLES / "hash-puzzle-py" / "work.py").read_text(), namespace)
    work = namespace["work"]
    assert callable(work)
    out = work(prefix, difficulty)
    assert isinstance(out, bytes)
    return out


def cpu_bound(prefixes: list[bytes], difficulty: str, cache: Path) -> dict[str, object]:
    """Seconds per slice of the hash puzzle: ours (python, js, the C one in wasm) and native."""
    per: dict[str, float] = {}
    answers: dict[str, list[bytes]] = {}
    jobs = {
        "python": ("python", (EXAMPLES / "hash-puzzle-py" / "work.py").read_bytes(), "bytes"),
        "js": ("js", (EXAMPLES / "hash-puzzle-js" / "work.js").read_bytes(), "bytes"),
        "c_wasm": ("wasm", (EXAMPLES / "hash-puzzle" / "puzzle.wasm").read_bytes(), ""),
    }
    for name, (runtime, module, kind) in jobs.items():
        ev = Evaluator(cache)
        ev.assign(runtime, module, (difficulty,), kind)
        ev.run(prefixes[0] + b"\n")  # warm (compile caches, page faults)
        started = time.perf_counter()
        answers[name] = [ev.run(prefix + b"\n") for prefix in prefixes]
        per[name] = (time.perf_counter() - started) / len(prefixes)
        ev.close()
    started = time.perf_counter()
    answers["native_python"] = [_native_puzzle(prefix, difficulty) for prefix in prefixes]
    per["native_python"] = (time.perf_counter() - started) / len(prefixes)
    node = shutil.which("node")
    if node:
        script = (EXAMPLES / "hash-puzzle-js" / "work.js").read_text() + (
            "\nconst progress = () => {};\n"
            f"const prefixes = {[x.decode() for x in prefixes]!r};\n"
            "const t = process.hrtime.bigint();\n"
            "const out = prefixes.map((x) => Buffer.from(work(Buffer.from(x + '\\n'), "
            f"'{difficulty}')).toString());\n"
            "const s = Number(process.hrtime.bigint() - t) / 1e9;\n"
            "console.log(JSON.stringify({s, out}));\n"
        )
        done = subprocess.run([node, "-e", script], capture_output=True, text=True, check=True)
        import json

        got = json.loads(done.stdout)
        per["node"] = got["s"] / len(prefixes)
        answers["node"] = [x.encode() for x in got["out"]]
    reference = answers["c_wasm"]
    for name, out in answers.items():
        assert out == reference, (name, out[:2], reference[:2])
    return {
        "difficulty": int(difficulty),
        "prefixes": len(prefixes),
        "seconds_per_slice": {k: round(v, 5) for k, v in per.items()},
        "python_over_native": round(per["native_python"] / per["python"], 3),
        "js_over_node": round(per["node"] / per["js"], 3) if "node" in per else None,
        "c_wasm_over_python_in_sandbox": round(per["python"] / per["c_wasm"], 1),
    }


def end_to_end(work: Path, slices: int, sandboxes: int, rounds: int) -> dict[str, object]:
    rates = []
    with pipeline(work, sandboxes) as ours:
        owner = ours.client.identity
        assert owner is not None
        with Compute(ours.scheduler.url, owner) as c:
            for i in range(rounds + 1):
                started = time.perf_counter()
                job = c.map(plus_one, range(i, i + slices))
                out = job.results(timeout=600, progress=False)
                elapsed = time.perf_counter() - started
                assert out == [x + 1 for x in range(i, i + slices)]
                print(f"round {i} ours: {slices / elapsed:.1f} slices/s", file=sys.stderr)
                if i:
                    rates.append(slices / elapsed)
            fresh_slices = max(10, slices // 10)  # a fresh interpreter per slice
            started = time.perf_counter()
            job = c.map(plus_one, range(fresh_slices), interpreter="fresh")
            expected = [x + 1 for x in range(fresh_slices)]
            assert job.results(timeout=600, progress=False) == expected
            fresh = fresh_slices / (time.perf_counter() - started)
            print(f"fresh interpreters: {fresh:.1f} slices/s", file=sys.stderr)
    try:
        peer = dask_map_rates(plus_one, lambda i: list(range(i, i + slices)), sandboxes, rounds)
    except ImportError:
        print("dask[distributed] is not installed: pip install -e '.[bench]'", file=sys.stderr)
        peer = []
    ours_rate, dask_rate = median(rates), median(peer) if peer else None
    return {
        "slices": slices,
        "sandboxes": sandboxes,
        "ours_slices_per_s": round(ours_rate, 1),
        "rounds": [round(r, 1) for r in rates],
        "dask_slices_per_s": round(dask_rate, 1) if dask_rate else None,
        "ours_over_dask": round(ours_rate / dask_rate, 4) if dask_rate else None,
        "fresh_interpreter_slices_per_s": round(fresh, 1),
        "fresh_over_dask": round(fresh / dask_rate, 4) if dask_rate else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smoke mode: tiny, not saved")
    parser.add_argument("--slices", type=int, default=400)
    parser.add_argument("--sandboxes", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prefixes", type=int, default=6)
    parser.add_argument("--difficulty", default="14")
    args = parser.parse_args()
    warm = 20
    if args.quick:
        args.slices, args.rounds, args.prefixes, args.difficulty, warm = 20, 1, 2, "8", 3
    for runtime in INTERPRETERS:
        install(runtime)
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "cache"
        figures: dict[str, object] = {"startup": startup(warm, cache)}
        figures["cpu_bound"] = cpu_bound(PREFIXES[: args.prefixes], args.difficulty, cache)
        figures["end_to_end"] = end_to_end(Path(tmp), args.slices, args.sandboxes, args.rounds)
    report("interpreters", figures, save=not args.quick)


if __name__ == "__main__":
    main()
