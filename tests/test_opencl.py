"""The opencl runtime on a real OpenCL implementation (PoCL's CPU device here)."""

from __future__ import annotations

import hashlib
import json
import struct
import subprocess
import sys
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

import dcp_protocol as p
from dcp_protocol import policy
from scheduler.client import ComputeClient
from scheduler.jobdoc import JobFileError, load_job_file

from .conftest import EXAMPLES, Keystore, SchedulerProcess, WorkerProcess
from .evaluator_client import EvaluatorClient

OPENCL = EXAMPLES / "opencl"
sys.path.insert(0, str(OPENCL))
from decode import decode_puzzle  # noqa: E402


def opencl_as_root(tmp_path: Path) -> tuple[str, ...]:
    """Worker options for these tests: they run as root here, where evaluators cannot drop to
    an unprivileged account (Python lives under /root), so OpenCL must be allowed explicitly."""
    config = tmp_path / "opencl.toml"
    config.write_text("opencl_as_root = true\n")
    return ("--config", str(config))


@pytest.fixture(scope="module")
def evaluator() -> Iterator[EvaluatorClient]:
    client = EvaluatorClient()
    yield client
    client.close()


def assign(client: EvaluatorClient, source: bytes, config: dict, **limits: object) -> p.Message:  # type: ignore[type-arg]
    return client.request(
        p.Assign(
            id=client.next_id(),
            job="j",
            runtime="opencl",
            sha256=hashlib.sha256(source).hexdigest(),
            module=source,
            config=config,
            limits=p.Limits(**limits),
        )
    )  # type: ignore[arg-type]


def spec(name: str) -> dict:  # type: ignore[type-arg]
    return tomllib.loads((OPENCL / f"{name}.toml").read_text())["opencl"]  # type: ignore[no-any-return]


def test_devices_are_capabilities(evaluator: EvaluatorClient) -> None:
    caps = evaluator.request(p.Describe(id=evaluator.next_id()))
    assert isinstance(caps, p.Capabilities)
    devices = caps.capabilities["runtimes"]["opencl"]["devices"]
    assert devices and all(d["compute_units"] > 0 and d["global_memory"] > 0 for d in devices)
    flags = policy.capability_flags(caps.capabilities)
    assert "runtime.opencl" in flags
    if all(d["type"] == "cpu" for d in devices):  # PoCL's CPU device is OpenCL, not a GPU
        assert "opencl.cpu" in flags and "opencl.gpu" not in flags
        assert policy.check_requirements({"opencl.gpu": "required"}, caps.capabilities)
    assert policy.check_requirements(
        {"min_device_memory": max(d["global_memory"] for d in devices) + 1}, caps.capabilities
    )


def test_matmul_matches_numpy(evaluator: EvaluatorClient) -> None:
    assert isinstance(assign(evaluator, (OPENCL / "matmul.cl").read_bytes(), spec("matmul")), p.Ack)
    for line in (OPENCL / "matmul-inputs.jsonl").read_bytes().splitlines():
        reply = evaluator.run(line)
        assert isinstance(reply, p.SliceDone), reply
        doc = json.loads(line)
        a = np.array(doc["a"], np.float32).reshape(16, 16)
        b = np.array(doc["b"], np.float32).reshape(16, 16)
        c = np.frombuffer(reply.result, np.float32).reshape(16, 16)
        np.testing.assert_allclose(c, a @ b, rtol=1e-5, atol=1e-5)
        assert reply.metrics.cpu_seconds > 0 and reply.metrics.bytes_out == 1024


def test_pocl_cache_is_private_and_leaves_nothing_behind(tmp_path: Path) -> None:
    # The runtime used from a shared directory (benchmarks run it in-process from a checkout):
    # PoCL's cache must not land there, is private while it exists, and goes at exit.
    shared = tmp_path / "checkout"
    shared.mkdir()
    shared.chmod(0o755)
    script = (
        "import os, stat\n"
        "from evaluator.opencl import OpenCLRuntime\n"
        "assert OpenCLRuntime().describe()\n"
        "cache = os.environ['POCL_CACHE_DIR']\n"
        "print(cache, oct(stat.S_IMODE(os.stat(cache).st_mode)))\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", script],
        cwd=shared,
        env={"PYTHONPATH": str(Path(__file__).parent.parent)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    cache, mode = run.stdout.split()
    assert mode == "0o700" and not cache.startswith(str(shared))
    assert list(shared.iterdir()) == [] and not Path(cache).exists()


def test_puzzle_kernel_agrees_with_wasm(evaluator: EvaluatorClient) -> None:
    config = spec("puzzle")
    for arg in config["args"]:
        if arg["name"] == "difficulty":
            arg["value"] = 16
    assert isinstance(
        assign(evaluator, (OPENCL / "puzzle.cl").read_bytes(), config, wall_seconds=60), p.Ack
    )
    prefixes = (EXAMPLES / "hash-puzzle" / "prefixes.txt").read_bytes().splitlines()
    opencl = []
    for prefix in prefixes:
        reply = evaluator.run(prefix)
        assert isinstance(reply, p.SliceDone), reply
        opencl.append(decode_puzzle(prefix, reply.result))
    wasm = EvaluatorClient()
    try:
        assert isinstance(
            wasm.assign(
                (EXAMPLES / "hash-puzzle" / "puzzle.wasm").read_bytes(),
                ("16",),
                memory_bytes=32 << 20,
            ),
            p.Ack,
        )
        expected = []
        for prefix in prefixes:
            reply = wasm.run(prefix)
            assert isinstance(reply, p.SliceDone)
            expected.append(reply.result)
    finally:
        wasm.close()
    assert opencl == expected


MATMUL = (OPENCL / "matmul.cl").read_bytes()


@pytest.mark.parametrize(
    ("source", "config", "datum", "code", "text"),
    [
        (
            b"__kernel void broken(__global float *x) { x[0] = undefined_thing; }",
            {
                "kernel": "broken",
                "global_size": [1],
                "args": [{"name": "x", "kind": "output", "dtype": "float32", "count": 1}],
            },
            None,
            "opencl_build_failed",
            "undefined_thing",
        ),
        (MATMUL, {**spec("matmul"), "kernel": "nope"}, None, "invalid_module", "no kernel"),
        (
            MATMUL,
            {
                **spec("matmul"),
                "args": spec("matmul")["args"][:2]
                + [{"name": "c", "kind": "output", "dtype": "float32", "count": 10**9}]
                + spec("matmul")["args"][3:],
            },
            b'{"a": [1], "b": [1]}',
            "buffer_too_large",
            "exceed",
        ),
        (MATMUL, spec("matmul"), b'{"a": [1]}', "datum_invalid", "'b'"),
        (MATMUL, spec("matmul"), b"not json", "datum_invalid", "JSON object"),
        (MATMUL, spec("matmul"), b'{"a": ["x"], "b": [1]}', "datum_invalid", "float32"),
        (
            b"__kernel void k(__global const float *x, __global float *y) { y[0] = x[0]; }",
            {
                "kernel": "k",
                "global_size": [1],
                "args": [
                    {"name": "x", "kind": "input", "dtype": "float32", "source": "datum"},
                    {"name": "y", "kind": "output", "dtype": "float32", "count": 1},
                ],
            },
            b"12345",
            "datum_invalid",
            "not an array of float32",
        ),
    ],
)
def test_bad_kernels_and_data_get_named_errors(
    evaluator: EvaluatorClient,
    source: bytes,
    config: dict,
    datum: bytes | None,  # type: ignore[type-arg]
    code: str,
    text: str,
) -> None:
    reply = assign(evaluator, source, config)
    if datum is not None:
        assert isinstance(reply, p.Ack), reply
        reply = evaluator.run(datum)
    assert isinstance(reply, p.Error), reply
    assert reply.code == code and text in reply.message, reply.message
    # The evaluator is still fine.
    assert isinstance(assign(evaluator, MATMUL, spec("matmul")), p.Ack)


def test_banned_devices_are_never_used() -> None:
    client = EvaluatorClient()
    try:
        reply = client.request(
            p.Assign(
                id=1,
                job="j",
                runtime="opencl",
                sha256=hashlib.sha256(MATMUL).hexdigest(),
                module=MATMUL,
                config=spec("matmul"),
                options={"banned_devices": [".*"]},
            )
        )
        assert isinstance(reply, p.Error) and reply.code == "opencl_unavailable"
    finally:
        client.close()


def test_bad_opencl_job_files(tmp_path: Path) -> None:
    path = tmp_path / "job.toml"
    path.write_text(
        f'runtime = "opencl"\nmodule = "{OPENCL / "matmul.cl"}"\n'
        '[opencl]\nkernel = "x; rm"\nglobal_size = [1]\n'
        'args = [{name = "c", kind = "output", dtype = "float32", count = 1}]\n'
    )
    with pytest.raises(JobFileError, match="kernel name"):
        load_job_file(path)
    path.write_text(
        f'runtime = "wasm"\nmodule = "{OPENCL / "matmul.cl"}"\n[opencl]\nkernel = "k"\n'
    )
    with pytest.raises(JobFileError, match="takes no"):
        load_job_file(path)


def test_a_kernel_that_never_ends_is_stopped_and_the_worker_goes_on(
    tmp_path: Path,
    scheduler: SchedulerProcess,
    make_keystore: Callable[[str], Keystore],
    workers: Callable[..., WorkerProcess],
) -> None:
    from .test_pipeline import ECHO, job_file

    (tmp_path / "spin.cl").write_text(
        "__kernel void spin(__global volatile uint *out) { for (;;) { out[0]++; } }\n"
    )
    (tmp_path / "spin.toml").write_text(
        'runtime = "opencl"\nmodule = "spin.cl"\nmax_attempts = 1\n'
        "[limits]\nwall_seconds = 1\n"
        '[opencl]\nkernel = "spin"\nglobal_size = [1]\n'
        'args = [{name = "out", kind = "output", dtype = "uint32", count = 1}]\n'
        '[inputs]\nvalues = ["x"]\n'
    )
    worker = workers(scheduler.url, make_keystore("w"), 2, *opencl_as_root(tmp_path))
    with ComputeClient(scheduler.url, make_keystore("owner").identity) as client:
        spin = client.deploy(tmp_path / "spin.toml")
        (result,) = client.results(spin, wait=True, timeout=60)
        assert result.state == "failed" and result.error["code"] == "evaluator_timeout"
        echo = client.deploy(job_file(tmp_path, "echo", ECHO, ["after"]))
        assert [r.result for r in client.results(echo, wait=True, timeout=60)] == [b"after"]
    assert worker.stop() == 0


def test_mandelbrot_png(
    tmp_path: Path,
    scheduler: SchedulerProcess,
    make_keystore: Callable[[str], Keystore],
    workers: Callable[..., WorkerProcess],
) -> None:
    owner = make_keystore("owner")
    workers(scheduler.url, make_keystore("w"), 2, *opencl_as_root(tmp_path))
    out = tmp_path / "m.png"
    run = subprocess.run(
        [
            sys.executable,
            str(OPENCL / "mandelbrot.py"),
            "--scheduler",
            scheduler.url,
            "--identity",
            str(owner.path),
            "--passphrase-file",
            str(owner.passphrase_file),
            "--out",
            str(out),
            "--size",
            "128",
            "--tile",
            "32",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    png = out.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", png[16:24])
    assert (width, height) == (128, 128)
    import zlib

    data = zlib.decompress(png[png.index(b"IDAT") + 4 : png.index(b"IEND") - 8])
    row = 64 * (1 + 128 * 3)  # the middle row
    pixel = lambda x: data[row + 1 + 3 * x : row + 4 + 3 * x]  # noqa: E731
    assert pixel(int((-0.2 + 2.2) / 3 * 128)) == b"\x00\x00\x00"  # (-0.2, 0) is in the set
    assert pixel(0) != b"\x00\x00\x00"  # (-2.2, 0) escapes at once


def test_opencl_is_not_offered_as_root_by_default(
    tmp_path: Path,
    scheduler: SchedulerProcess,
    make_keystore: Callable[[str], Keystore],
    workers: Callable[..., WorkerProcess],
) -> None:
    import os

    from .conftest import wait_for
    from .test_pipeline import counts

    if os.geteuid() != 0:
        pytest.skip("only a worker running as root withholds OpenCL")
    worker = workers(scheduler.url, make_keystore("w"), 1)
    with ComputeClient(scheduler.url, make_keystore("owner").identity) as client:
        job = client.deploy(OPENCL / "matmul.toml")
        wait_for(lambda: "OpenCL is not offered" in worker.output(), 30)
        wait_for(lambda: "requirement_unmet" in worker.output(), 30)
        assert counts(scheduler.db, job) == {"queued": 4}
    assert worker.stop() == 0
