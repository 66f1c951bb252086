"""Hash-puzzle speed: our evaluator (wasm with limits on, and the OpenCL kernel on whatever
device is present: PoCL's CPU device here) against the same C built natively.

Both solve the same puzzle (same prefix, same difficulty, so the same number of SHA-256
evaluations); the figure is the ratio of hash rates measured in one run, median of several.

    python benchmarks/hashrate.py [--quick]
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import ROOT, median, report  # noqa: E402

import dcp_protocol as p  # noqa: E402
from tests.evaluator_client import EvaluatorClient  # noqa: E402

sys.path.insert(0, str(ROOT / "examples" / "opencl"))
from decode import decode_puzzle  # noqa: E402

PUZZLE_C = ROOT / "examples" / "hash-puzzle" / "puzzle.c"
PUZZLE_WASM = ROOT / "examples" / "hash-puzzle" / "puzzle.wasm"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smoke mode: tiny, not saved")
    args = parser.parse_args()
    prefix, difficulty, runs = (b"bench-2", 23, 9) if not args.quick else (b"bench-0", 12, 1)

    with tempfile.TemporaryDirectory() as tmp:
        native = Path(tmp) / "puzzle"
        subprocess.run(
            [
                "gcc",
                "-O2",
                "-o",
                str(native),
                str(PUZZLE_C),
                str(Path(__file__).with_name("native_stub.c")),
            ],
            check=True,
        )
        client = EvaluatorClient()
        module = PUZZLE_WASM.read_bytes()
        reply = client.request(
            p.Assign(
                id=client.next_id(),
                job="bench",
                runtime="wasm",
                sha256=hashlib.sha256(module).hexdigest(),
                module=module,
                argv=(str(difficulty),),
                limits=p.Limits(wall_seconds=600, memory_bytes=32 << 20),
            )
        )
        assert isinstance(reply, p.Ack), reply
        opencl = EvaluatorClient()
        source = (ROOT / "examples" / "opencl" / "puzzle.cl").read_bytes()
        config = tomllib.loads((ROOT / "examples" / "opencl" / "puzzle.toml").read_text())["opencl"]
        for arg in config["args"]:
            if arg["name"] == "difficulty":
                arg["value"] = difficulty
        reply = opencl.request(
            p.Assign(
                id=1,
                job="bench",
                runtime="opencl",
                sha256=hashlib.sha256(source).hexdigest(),
                module=source,
                config=config,
                limits=p.Limits(wall_seconds=600),
            )
        )
        assert isinstance(reply, p.Ack), reply
        caps = opencl.request(p.Describe(id=2))
        device = caps.capabilities["runtimes"]["opencl"]["devices"][0]["name"]  # type: ignore[attr-defined]
        opencl.run(prefix)  # the first run builds and links the kernel: not timed
        wasm_times, native_times, opencl_times, answers = [], [], [], set()
        for _ in range(runs):  # interleaved, so all see the same machine load
            started = time.perf_counter()
            out = subprocess.run(
                [str(native), str(difficulty)], input=prefix, check=True, capture_output=True
            ).stdout
            native_times.append(time.perf_counter() - started)
            answers.add(out)
            reply = client.run(prefix)
            assert isinstance(reply, p.SliceDone), reply
            wasm_times.append(reply.metrics.wall_seconds)
            answers.add(reply.result)
            reply = opencl.run(prefix)
            assert isinstance(reply, p.SliceDone), reply
            opencl_times.append(reply.metrics.wall_seconds)
            answers.add(decode_puzzle(prefix, reply.result))
        client.close()
        opencl.close()
    assert len(answers) == 1, answers  # native and wasm agree
    hashes = int(answers.pop().split()[0]) + 1
    wasm_rate = hashes / median(wasm_times)
    native_rate = hashes / median(native_times)
    opencl_rate = hashes / median(opencl_times)
    report(
        "hashrate",
        {
            "hashes_per_run": hashes,
            "runs": runs,
            "wasm_hashes_per_s": round(wasm_rate),
            "native_gcc_O2_hashes_per_s": round(native_rate),
            # Medians of the ratios within each interleaved round: a slow moment of this shared
            # machine then weighs on both sides of one ratio, not on one side of the medians.
            "wasm_over_native": round(
                median([n / w for n, w in zip(native_times, wasm_times, strict=True)]), 3
            ),
            "opencl_hashes_per_s": round(opencl_rate),
            "opencl_device": device,
            "opencl_over_native": round(
                median([n / o for n, o in zip(native_times, opencl_times, strict=True)]), 3
            ),
            "limits": "wall clock (clock thread, then the evaluator ends) + memory + output caps",
        },
        save=not args.quick,
    )


if __name__ == "__main__":
    main()
