"""Where a trivial slice's time goes: each step of the pipeline measured on its own, against
the CPU each process spends per slice end to end in the same run.

Steps, each run here with the project's real code, amortized the way the pipeline does it
(64 slices per fetch and per ``results`` frame, 32 per evaluator batch):

* scheduler: lease (``SQLiteStore.lease``), verify (signature recovery of a result), store
  (``accept_results``: fencing, result, ledger, counters), and its half of the frames
  (encoding ``work``, decoding ``results``);
* worker: sign (payload + libsecp256k1), outbox (the group commit when results are finished,
  and the one that forgets them once acknowledged, each fsynced), its half of the frames
  (decoding ``work``, encoding ``results``), and the evaluator exchange as the worker sees it
  (``Sandbox.run_batch``: pipe, frames, the evaluator's work);
* evaluator: a slice in the same runtime class in this process, and within it wasmtime's
  instantiation alone;
* transport: the frames of 64 slices sent each way over a real websocket on loopback.

End to end: an echo job run by a real scheduler and worker; CPU time per slice of the
scheduler, the worker and its evaluators (psutil), and the wall time per slice. The gap between
a process's end-to-end CPU and the sum of its steps is what the steps do not name (the event
loop, websocket framing, the compute API serving the results).

    python benchmarks/breakdown.py [--quick] [--slices N]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ECHO, median, per_slice, pipeline, report, us  # noqa: E402

from dcp_keys.identity import Identity  # noqa: E402
from dcp_protocol import (  # noqa: E402
    SCHEDULER_MESSAGES,
    JobSpec,
    Limits,
    Metrics,
    ResultItem,
    Results,
    SliceLease,
    Work,
    decode,
    encode,
    signing,
)
from dcp_worker.outbox import Outbox, PendingResult  # noqa: E402
from evaluator.client import Sandbox, SliceWork  # noqa: E402
from evaluator.wasm import WasmRuntime  # noqa: E402
from scheduler.store import NewJob, ResultRow  # noqa: E402
from scheduler.store.sqlite import SQLiteStore  # noqa: E402

BATCH = 64
LIMITS = Limits()
METRICS = Metrics(wall_seconds=0.0002, cpu_seconds=0.0002, bytes_in=8, bytes_out=8)


class Steps:
    """The pipeline's steps with their real inputs."""

    def __init__(self, work: Path, reps: int) -> None:
        self.reps = reps
        self.worker = Identity.from_private_key(os.urandom(32))
        self.store = SQLiteStore(work / "steps.db")
        module = ECHO.read_bytes()
        data = tuple(b"v%d" % i for i in range(BATCH * (reps + 2) * 2))
        self.job = self.store.create_job(
            NewJob(
                owner=self.worker.address,
                name="echo",
                runtime="wasm",
                module=module,
                module_sha256=hashlib.sha256(module).hexdigest(),
                argv=(),
                limits=LIMITS,
                offer_micro=0,
                data=data,
                payload_sha256=hashlib.sha256(b"".join(data)).hexdigest(),
            ),
            time.time(),
        )
        self.outbox = Outbox(work / "outbox.db")
        self.spec = JobSpec(self.job, "wasm", module, hashlib.sha256(module).hexdigest())

    def items(self) -> list[ResultItem]:
        """A batch of leased slices, signed as the worker signs them."""
        leases = self.store.lease(self.worker.address, BATCH, time.time(), 600, [self.job])
        out = []
        for x in leases:
            payload = signing.result_payload(x.job, x.slice, x.token, x.datum, self.worker.address)
            out.append(
                ResultItem(
                    x.job,
                    x.slice,
                    x.token,
                    x.datum,
                    self.worker.address,
                    self.worker.sign(payload),
                    METRICS,
                )
            )
        return out

    def scheduler_side(self) -> dict[str, float]:
        figures: dict[str, list[float]] = {"lease": [], "store": []}
        for _ in range(self.reps):
            started = time.perf_counter()
            leases = self.store.lease(self.worker.address, BATCH, time.time(), 600, [self.job])
            figures["lease"].append((time.perf_counter() - started) / BATCH)
            rows = [
                ResultRow(x.job, x.slice, x.token, x.datum, self.worker.address, "00", METRICS)
                for x in leases
            ]
            started = time.perf_counter()
            self.store.accept_results(self.worker.address, rows, time.time())
            figures["store"].append((time.perf_counter() - started) / BATCH)
        items = self.items()

        def verify() -> None:
            for it in items:
                payload = signing.result_payload(
                    it.job, it.slice, it.token, it.result, it.payment_address
                )
                assert signing.verify(payload, it.signature, self.worker.address)

        return {
            "lease": median(figures["lease"]),
            "store": median(figures["store"]),
            "verify": per_slice(verify, len(items), self.reps),
        }

    def frames(self) -> tuple[dict[str, float], bytes, bytes]:
        items = self.items()
        work = Work(
            re=1,
            slices=tuple(
                SliceLease(it.job, it.slice, it.token, 1, time.time() + 600, it.result, 0.0)
                for it in items
            ),
        )
        results = Results(id=2, results=tuple(items))
        work_frame, results_frame = encode(work), encode(results)
        n = len(items)
        return (
            {
                "scheduler_frames": per_slice(lambda: encode(work), n, self.reps)
                + per_slice(lambda: decode(results_frame, SCHEDULER_MESSAGES), n, self.reps),
                "worker_frames": per_slice(
                    lambda: decode(work_frame, SCHEDULER_MESSAGES), n, self.reps
                )
                + per_slice(lambda: encode(results), n, self.reps),
            },
            work_frame,
            results_frame,
        )

    def worker_side(self) -> dict[str, float]:
        items = self.items()

        def sign() -> None:
            for it in items:
                payload = signing.result_payload(
                    it.job, it.slice, it.token, it.result, it.payment_address
                )
                self.worker.sign(payload)

        pending = [
            PendingResult(
                it.job, it.slice, it.token, it.result, it.signature, it.payment_address, METRICS
            )
            for it in items
        ]

        def outbox() -> None:
            self.outbox.commit(pending, [])
            self.outbox.commit([], [p.key for p in pending])

        return {
            "sign": per_slice(sign, len(items), self.reps),
            "outbox": per_slice(outbox, len(items), self.reps),
        }

    def evaluator(self) -> dict[str, float]:
        runtime = WasmRuntime()
        runtime.compile(self.spec.module, self.spec.sha256, LIMITS)
        compiled = runtime._cache[(self.spec.sha256, False)]
        engine = runtime._engine(False)

        def instantiate() -> None:
            import wasmtime

            store = wasmtime.Store(engine)
            store.set_wasi(wasmtime.WasiConfig())
            compiled.linker.instantiate(store, compiled.module)

        def run() -> None:
            runtime.run(self.spec.sha256, (), LIMITS, b"x")

        figures = {
            "wasm_slice": per_slice(run, 1, self.reps * 8),
            "wasm_instantiate": per_slice(instantiate, 1, self.reps * 8),
        }

        async def exchange() -> float:
            sandbox = Sandbox(0, slices_per_evaluator=10**9)
            try:
                batch = [SliceWork(k, b"x") for k in range(32)]
                await sandbox.run_batch(self.spec, LIMITS, batch)
                times = []
                for _ in range(self.reps):
                    started = time.perf_counter()
                    await sandbox.run_batch(self.spec, LIMITS, batch)
                    times.append((time.perf_counter() - started) / len(batch))
                return median(times)
            finally:
                await sandbox.stop(graceful=True)

        figures["evaluator_exchange"] = asyncio.run(exchange())
        return figures


async def websocket_round_trip(work_frame: bytes, results_frame: bytes, reps: int) -> float:
    """Seconds per slice to carry a ``work`` frame one way and a ``results`` frame back."""
    import websockets

    async def handler(ws: websockets.ServerConnection) -> None:
        async for _ in ws:
            await ws.send(work_frame.decode())

    async with websockets.serve(handler, "127.0.0.1", 0, compression=None) as server:
        port = server.sockets[0].getsockname()[1]
        async with websockets.connect(f"ws://127.0.0.1:{port}", compression=None) as ws:
            times = []
            for _ in range(reps + 1):
                started = time.perf_counter()
                await ws.send(results_frame.decode())
                await ws.recv()
                times.append((time.perf_counter() - started) / BATCH)
    return median(times[1:])


def end_to_end(work: Path, slices: int) -> dict[str, float]:
    """CPU seconds per slice of each process, and wall seconds per slice, for an echo job."""
    with pipeline(work, 2) as ours:
        ours.echo([f"warm-{k}" for k in range(slices // 4)])
        scheduler = psutil.Process(ours.scheduler.proc.pid)
        worker = psutil.Process(ours.worker.pid)

        def cpu(proc: psutil.Process) -> float:
            t = proc.cpu_times()
            return t.user + t.system

        def evaluators() -> tuple[float, dict[int, float]]:
            # Evaluators the worker replaced (every `slices_per_evaluator` slices) and reaped
            # count in its children's times; the live ones are read one by one.
            t = worker.cpu_times()
            live = {c.pid: cpu(c) for c in worker.children(recursive=True)}
            return t.children_user + t.children_system, live

        before = (cpu(scheduler), cpu(worker), evaluators())
        elapsed = ours.echo([f"e-{k}" for k in range(slices)])
        after = (cpu(scheduler), cpu(worker), evaluators())
    (reaped_before, live_before), (reaped_after, live_after) = before[2], after[2]
    evaluator_cpu = (
        reaped_after - reaped_before + sum(live_after.values()) - sum(live_before.values())
    )
    return {
        "wall": elapsed / slices,
        "scheduler_cpu": (after[0] - before[0]) / slices,
        "worker_cpu": (after[1] - before[1]) / slices,
        "evaluators_cpu": evaluator_cpu / slices,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smoke mode: tiny, not saved")
    parser.add_argument("--slices", type=int, default=4000)
    args = parser.parse_args()
    reps = 5 if args.quick else 40
    if args.quick:
        args.slices = 200
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        steps = Steps(work, reps)
        sched = steps.scheduler_side()
        frames, work_frame, results_frame = steps.frames()
        worker = steps.worker_side()
        evaluator = steps.evaluator()
        transport = asyncio.run(websocket_round_trip(work_frame, results_frame, reps))
        e2e = end_to_end(work / "e2e", args.slices)

    scheduler_steps = sched["lease"] + sched["verify"] + sched["store"] + frames["scheduler_frames"]
    worker_steps = (
        worker["sign"]
        + worker["outbox"]
        + frames["worker_frames"]
        + evaluator["evaluator_exchange"]
        - evaluator["wasm_slice"]  # the exchange includes the evaluator's own work
    )
    figures = {
        "slices": args.slices,
        "steps_us": {
            "scheduler.lease": us(sched["lease"]),
            "scheduler.verify": us(sched["verify"]),
            "scheduler.store": us(sched["store"]),
            "scheduler.frames": us(frames["scheduler_frames"]),
            "worker.sign": us(worker["sign"]),
            "worker.outbox": us(worker["outbox"]),
            "worker.frames": us(frames["worker_frames"]),
            "worker.evaluator_exchange": us(evaluator["evaluator_exchange"]),
            "evaluator.wasm_slice": us(evaluator["wasm_slice"]),
            "evaluator.wasm_instantiate": us(evaluator["wasm_instantiate"]),
            "transport.websocket": us(transport),
        },
        "end_to_end_us": {name: us(value) for name, value in e2e.items()},
        "unnamed_us": {
            "scheduler": us(e2e["scheduler_cpu"] - scheduler_steps),
            "worker": us(e2e["worker_cpu"] - worker_steps),
            "evaluators": us(e2e["evaluators_cpu"] - evaluator["wasm_slice"]),
        },
        "slices_per_s": round(1 / e2e["wall"], 1),
    }
    report("breakdown", figures, save=not args.quick)


if __name__ == "__main__":
    main()
