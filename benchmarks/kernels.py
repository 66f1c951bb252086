"""Compute speed: a table of kernels in our wasm sandbox (limits on) against the same C built
natively with gcc -O2, in the same run.

Kernels (benchmarks/kernels/, and the hash puzzle of examples/): the SHA-256 puzzle, a dense
matrix multiply, a sort of 32-bit keys, a JSON parse and a CoreMark-like mix (list, matrix,
state machine, CRC; not CoreMark itself). Each prints a checksum, and every build must print
the same one. The wasm builds are zig's clang at -O2 (as examples/build.sh builds the
examples) and again with SIMD128 allowed (-msimd128); both run in a real evaluator with the
worker's limits (wall clock, memory cap, output cap; no fuel), timed by the evaluator's
own metrics. Native runs are timed around the process (its start is ~1 ms of ~0.5 s).

Rounds are interleaved (native, wasm, wasm+simd, kernel by kernel) so each ratio compares
runs of one moment of this shared machine; a kernel's figure is the median of its rounds'
ratios (native seconds / wasm seconds: 1.0 is native speed), the table's the median of the
kernels'.

    python benchmarks/kernels.py [--quick] [--rounds N]
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import ROOT, median, report  # noqa: E402

import dcp_protocol as p  # noqa: E402
from tests.evaluator_client import EvaluatorClient  # noqa: E402

HERE = Path(__file__).resolve().parent / "kernels"
STUB = Path(__file__).resolve().parent / "native_stub.c"


@dataclass(frozen=True)
class Kernel:
    name: str
    sources: tuple[Path, ...]
    argv: tuple[str, ...]
    quick_argv: tuple[str, ...]
    stdin: bytes = b""


KERNELS = (
    Kernel(
        "sha256_puzzle",
        (ROOT / "examples" / "hash-puzzle" / "puzzle.c",),
        ("21",),
        ("12",),
        b"bench-2",
    ),
    Kernel("matmul", (HERE / "matmul.c",), ("256", "40"), ("64", "2")),
    Kernel("sort", (HERE / "sort.c",), ("1000000", "6"), ("10000", "1")),
    Kernel("json_parse", (HERE / "json.c",), ("40000", "40"), ("500", "2")),
    Kernel("coremark_like", (HERE / "mix.c",), ("100000",), ("200",)),
)

#: The wasm builds: zig's clang as examples/build.sh runs it, and with SIMD128 allowed.
WASM_FLAGS = {"wasm": ("-O2",), "wasm_simd128": ("-O2", "-msimd128")}


def build_native(kernel: Kernel, out: Path) -> Path:
    exe = out / f"{kernel.name}-native"
    sources = [str(s) for s in kernel.sources]
    if kernel.name == "sha256_puzzle":
        sources.append(str(STUB))  # the native build has no host for dcp_progress
    subprocess.run(["gcc", "-O2", "-o", str(exe), *sources], check=True)
    return exe


def build_wasm(kernel: Kernel, flags: tuple[str, ...], out: Path, tag: str) -> bytes:
    target = out / f"{kernel.name}-{tag}.wasm"
    subprocess.run(
        [sys.executable, "-m", "ziglang", "cc", "-target", "wasm32-wasi", *flags, "-s"]
        + ["-o", str(target), *(str(s) for s in kernel.sources)],
        check=True,
        timeout=600,
    )
    return target.read_bytes()


def assign(client: EvaluatorClient, module: bytes, argv: tuple[str, ...]) -> None:
    reply = client.request(
        p.Assign(
            id=client.next_id(),
            job=f"kernels-{hashlib.sha256(module).hexdigest()[:8]}",
            runtime="wasm",
            sha256=hashlib.sha256(module).hexdigest(),
            module=module,
            argv=argv,
            limits=p.Limits(wall_seconds=600, memory_bytes=256 << 20),
        )
    )
    assert isinstance(reply, p.Ack), reply


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smoke mode: tiny, not saved")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    rounds = 1 if args.quick else args.rounds
    table: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        client = EvaluatorClient()
        try:
            for kernel in KERNELS:
                argv = kernel.quick_argv if args.quick else kernel.argv
                native = build_native(kernel, out)
                modules = {tag: build_wasm(kernel, f, out, tag) for tag, f in WASM_FLAGS.items()}
                times: dict[str, list[float]] = {"native": [], **{tag: [] for tag in modules}}
                answers = set()
                for _ in range(rounds):
                    started = time.perf_counter()
                    done = subprocess.run(
                        [str(native), *argv], input=kernel.stdin, check=True, capture_output=True
                    )
                    times["native"].append(time.perf_counter() - started)
                    answers.add(done.stdout.strip())
                    for tag, module in modules.items():
                        assign(client, module, argv)
                        reply = client.run(kernel.stdin)
                        assert isinstance(reply, p.SliceDone), (kernel.name, tag, reply)
                        times[tag].append(reply.metrics.wall_seconds)
                        answers.add(reply.result.strip())
                assert len(answers) == 1, (kernel.name, answers)  # every build agrees
                row: dict[str, float] = {"native_s": round(median(times["native"]), 4)}
                for tag in modules:
                    row[f"{tag}_s"] = round(median(times[tag]), 4)
                    row[f"{tag}_over_native"] = round(
                        median([n / w for n, w in zip(times["native"], times[tag], strict=True)]),
                        3,
                    )
                table[kernel.name] = row
                print(kernel.name, row, file=sys.stderr)
        finally:
            client.close()
    report(
        "kernels",
        {
            "rounds": rounds,
            "kernels": table,
            "median_wasm_over_native": round(
                median([r["wasm_over_native"] for r in table.values()]), 3
            ),
            "median_wasm_simd128_over_native": round(
                median([r["wasm_simd128_over_native"] for r in table.values()]), 3
            ),
            "native": "gcc -O2",
            "wasm": "zig cc -target wasm32-wasi -O2 (and -msimd128), run by our evaluator",
            "limits": "wall clock (a clock thread, then the evaluator's end: no checks in "
            "the code) + memory cap + output cap (no fuel)",
        },
        save=not args.quick,
    )


if __name__ == "__main__":
    main()
