"""Errors a job owner and an operator read (issue 16): every fault of a job file at once, with
its line; jobs refused at deploy that could never run; what a refused deploy says; addresses
as every command prints them; waiting for results with a timeout."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import msgspec
import pytest

import dcp_protocol as p
from dcp_keys.identity import Identity
from scheduler.client import ComputeClient, ComputeError
from scheduler.compute import Compute
from scheduler.jobdoc import JobFileError, _undeliverable, load_job_file, parse_document
from scheduler.store.sqlite import SQLiteStore

from .conftest import EXAMPLES, Keystore, SchedulerProcess, WorkerProcess, command
from .test_pipeline import ECHO, job_file
from .test_policy import admin

OPENCL = EXAMPLES / "opencl"


def compute(
    url: str, *args: str, stderr: int = subprocess.PIPE
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [command("dcp-compute"), "--scheduler", url, *args],
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
        timeout=60,
    )


def _signed(keystore: Keystore) -> list[str]:
    return ["--identity", str(keystore.path), "--passphrase-file", str(keystore.passphrase_file)]


def _problems(path: Path) -> tuple[str, ...]:
    with pytest.raises(JobFileError) as caught:
        load_job_file(path)
    return caught.value.problems


def test_a_job_file_reports_every_fault_with_its_line(
    tmp_path: Path, make_keystore: Callable[[str], Keystore]
) -> None:
    path = tmp_path / "job.toml"
    path.write_text(
        f'name = "bad"\nmodule = "{ECHO}"\n'
        "ofer = 1\n"  # 3
        "argv = 3\n"  # 4
        "max_attempts = 99\n"  # 5
        "[limits]\n"
        "wall_seconds = 5\n"
        "wal_seconds = 5\n"  # 8
        "[inputs]\n"
        'valeus = ["a"]\n'  # 10
    )
    problems = _problems(path)
    assert problems == (
        f"{path}:3: unknown key 'ofer' (did you mean 'offer'?)",
        f"{path}:10: unknown key 'inputs.valeus' (did you mean 'values'?)",
        f"{path}:4: argv must be a list of strings",
        f"{path}:5: max_attempts must be an integer within 1..10",
        f"{path}:8: unknown key 'limits.wal_seconds' (did you mean 'wall_seconds'?)",
    )
    # The command says them all, and exits 1 (docs/configuration.md, `dcp-compute --help`)
    # before it sends anything: nothing listens at this address.
    owner = make_keystore("owner")
    out = compute("http://127.0.0.1:1", "deploy", str(path), *_signed(owner))
    assert out.returncode == 1, out.stderr
    assert out.stderr.splitlines() == ["dcp-compute: " + problems[0], *problems[1:]]
    assert "Traceback" not in out.stderr


def test_file_faults_keep_their_names(tmp_path: Path) -> None:
    path = tmp_path / "job.toml"
    path.write_text(f'module = "{tmp_path / "missing.wasm"}"\nofer = 1\n')
    assert _problems(path) == (
        f"{path}:2: unknown key 'ofer' (did you mean 'offer'?)",
        f"{path}:1: cannot read module {tmp_path / 'missing.wasm'}: No such file or directory",
        f"{path}: the job has no inputs: give [inputs] file or values (one slice each)",
    )
    path.write_text(f'module = "{ECHO}"\n[inputs]\nvalues = ["a"]\n[limits]\nfuel = "lots"\n')
    assert _problems(path) == (f"{path}:5: limits.fuel must be a number",)


def _document(tmp_path: Path, **changes: object) -> bytes:
    """A good job document, changed as a client that skips the checks would send it."""
    doc = json.loads(load_job_file(job_file(tmp_path, "good", ECHO, ["a"])))
    doc.update(changes)
    return json.dumps(doc).encode()


NOT_WASM = [
    (b"#!/bin/sh\necho hi\n", "is not a WebAssembly module (it does not start with \\0asm)"),
    (b"\0asm\x0d\x00\x01\x00", "is not a WebAssembly version 1 module"),
    (b"\0asm\x01\x00\x00\x00\xff\xff", "is not valid WebAssembly"),
]


@pytest.mark.parametrize(("module", "why"), NOT_WASM)
def test_a_module_that_is_not_wasm_is_refused_when_the_file_is_read(
    tmp_path: Path, module: bytes, why: str
) -> None:
    (tmp_path / "m.wasm").write_bytes(module)
    path = tmp_path / "job.toml"
    path.write_text('name = "x"\nmodule = "m.wasm"\n[inputs]\nvalues = ["a"]\n')
    (problem,) = _problems(path)
    assert problem.startswith(f"{path}:2: the module {why}")
    # A verifier is a wasm module too.
    path.write_text(f'module = "{ECHO}"\nverifier = "m.wasm"\n[inputs]\nvalues = ["a"]\n')
    (problem,) = _problems(path)
    assert problem.startswith(f"{path}:2: the verifier {why}")


def test_an_opencl_job_keeps_its_kernel_source_rules() -> None:
    doc = json.loads(load_job_file(OPENCL / "matmul.toml"))
    assert doc["runtime"] == "opencl" and not base64.b64decode(doc["module"]).startswith(b"\0asm")


def test_the_scheduler_refuses_jobs_that_could_never_run(
    tmp_path: Path, scheduler: SchedulerProcess, make_keystore: Callable[[str], Keystore]
) -> None:
    owner = make_keystore("owner")
    refused = {
        "no inputs": (_document(tmp_path, data=[]), "the job has no inputs"),
        "not wasm": (
            _document(tmp_path, module=base64.b64encode(b"print('hi')").decode()),
            "the module is not a WebAssembly module",
        ),
        # Free jobs need no credits: a limit no worker can decode ended the session of
        # every worker its work frame reached (and cost its slices, others' too, an attempt).
        "memory beyond 64 bits": (
            _document(tmp_path, limits={"memory_bytes": 2**70}),
            "limits.memory_bytes: must be an integer within 0..18446744073709551615",
        ),
        "fuel beyond 64 bits": (
            _document(tmp_path, limits={"fuel": 2**64}),
            "limits.fuel: must be an integer within 0..18446744073709551615",
        ),
        "memory as a fraction": (
            _document(tmp_path, limits={"memory_bytes": 1.5e9}),
            "limits.memory_bytes: expected an integer",
        ),
        "both": (
            _document(tmp_path, module=base64.b64encode(b"\0asm\x01\0\0\0\x01").decode(), data=[]),
            "the module is not valid WebAssembly",
        ),
    }
    with ComputeClient(scheduler.url, owner.identity) as client:
        for name, (body, why) in refused.items():
            with pytest.raises(ComputeError) as caught:
                client.deploy_document(body)
            assert (caught.value.status, caught.value.code) == (400, "invalid_job"), name
            assert why in caught.value.reason, name
        # Every fault, in one answer; each also on its own.
        assert "the job has no inputs" in caught.value.reason
        assert caught.value.details["problems"] == caught.value.reason.split("; ")
    store = SQLiteStore(scheduler.db)
    try:
        assert store.list_jobs() == []
    finally:
        store.close()


def test_a_job_whose_work_frame_no_worker_could_read_is_never_accepted(tmp_path: Path) -> None:
    """The last check of a deploy builds the ``work`` frame the job would travel in and
    decodes it as a worker does; limits built past the parser (as a future field might be)
    are caught there by name."""
    job = parse_document(_document(tmp_path), "0x" + "11" * 20)
    assert _undeliverable(job) is None
    broken = replace(job, limits=p.Limits(memory_bytes=2**70))
    why = _undeliverable(broken)
    assert why is not None and "jobs[0].limits.memory_bytes" in why


def test_a_deploy_without_credits_says_how_to_get_them(
    tmp_path: Path, scheduler: SchedulerProcess, make_keystore: Callable[[str], Keystore]
) -> None:
    owner = make_keystore("owner")
    path = job_file(tmp_path, "paid", ECHO, ["a", "b"], offer=1)
    out = compute(scheduler.url, "deploy", str(path), *_signed(owner))
    assert out.returncode == 1
    first, *rest = out.stderr.splitlines()
    assert first.startswith(f"dcp-compute: deploying {path}: {owner.identity.address} has ")
    assert first.endswith("2.000000 missing (insufficient_funds)")
    assert "dcp-scheduler bank mint ADDRESS AMOUNT --db PATH" in out.stderr
    assert "dcp-compute account --identity KEYSTORE" in out.stderr
    # Neither the request line nor its status ("POST /jobs: 402 ..."); a bare "402" would also
    # match pytest's numbered temporary directory in the job's path.
    assert ": 402 " not in out.stderr and "POST /jobs" not in out.stderr
    # Other refusals speak of the job too, not of the HTTP request.
    status = compute(scheduler.url, "status", "f" * 32, *_signed(owner))
    assert status.returncode == 1
    assert status.stderr.startswith(f"dcp-compute: reading the status of job {'f' * 32}: ")
    assert "GET /" not in status.stderr and ": 404 " not in status.stderr
    assert status.stderr.rstrip().endswith("(unknown_slice)")


def test_admin_commands_print_checksummed_addresses(
    tmp_path: Path,
    scheduler: SchedulerProcess,
    make_keystore: Callable[[str], Keystore],
    workers: Callable[..., WorkerProcess],
) -> None:
    owner, worker_key = make_keystore("owner"), make_keystore("worker")
    address = worker_key.identity.address
    assert address != address.lower()
    admin(scheduler.db, "bank", "mint", owner.identity.address, "1")
    with ComputeClient(scheduler.url, owner.identity) as client:
        job = client.deploy(job_file(tmp_path, "paid", ECHO, ["a"], offer=0.5))
        worker = workers(scheduler.url, worker_key, 1)
        assert [r.state for r in client.results(job, wait=True, timeout=120)] == ["done"]
    assert worker.stop() == 0
    listed = admin(scheduler.db, "workers", "list")
    assert listed.startswith(f"{address}  accepted=1 ")
    shown = admin(scheduler.db, "jobs", "show", job)
    assert f"worker={address}" in shown and f"owner {owner.identity.address}" in shown
    assert json.loads(admin(scheduler.db, "jobs", "show", job, "--json"))["worker"] == address
    ledger = admin(scheduler.db, "bank", "ledger")
    assert address in ledger and owner.identity.address in ledger
    assert address.lower() not in ledger + listed + shown
    store = SQLiteStore(scheduler.db)
    try:  # the database keeps what it kept
        assert [w.address for w in store.workers()] == [address.lower()]
    finally:
        store.close()


def test_results_wait_gives_up_after_its_timeout(
    tmp_path: Path, scheduler: SchedulerProcess, make_keystore: Callable[[str], Keystore]
) -> None:
    """No worker: the job never finishes."""
    owner = make_keystore("owner")
    with ComputeClient(scheduler.url, owner.identity) as client:
        job = client.deploy(job_file(tmp_path, "stuck", ECHO, ["a", "b"]))
    assert "exit status 5" in compute(scheduler.url, "results", "--help").stdout
    started = time.monotonic()
    out = compute(scheduler.url, "results", job, "--wait", "--timeout", "1", *_signed(owner))
    assert time.monotonic() - started < 30
    assert (out.returncode, out.stdout) == (5, "")
    assert out.stderr == f"dcp-compute: job {job} did not finish within 1 s\n"  # no progress


def test_results_wait_shows_progress_on_a_terminal(
    tmp_path: Path, scheduler: SchedulerProcess, make_keystore: Callable[[str], Keystore]
) -> None:
    owner = make_keystore("owner")
    with ComputeClient(scheduler.url, owner.identity) as client:
        job = client.deploy(job_file(tmp_path, "stuck", ECHO, ["a", "b"]))
    status, text = _terminal_output(
        lambda terminal: compute(
            scheduler.url,
            "results",
            job,
            "--wait",
            "--timeout",
            "0.5",
            *_signed(owner),
            stderr=terminal,
        )
    )
    assert status == 5
    assert f"\r\x1b[Kjob {job}: 0/2 slices final" in text and "did not finish within 0.5 s" in text


def _terminal_output(run: Callable[[int], subprocess.CompletedProcess[str]]) -> tuple[int, str]:
    """Run a command whose stdout and stderr are one pseudo-terminal, as in a shell; returns
    its exit status and everything it drew there."""
    leader, follower = os.openpty()
    try:
        done = run(follower)
        os.close(follower)
        follower = -1
        seen = b""
        while True:
            try:
                chunk = os.read(leader, 4096)
            except OSError:  # EIO: no writer is left
                break
            if not chunk:
                break
            seen += chunk
    finally:
        if follower != -1:
            os.close(follower)
        os.close(leader)
    return done.returncode, seen.decode()


def test_results_wait_keeps_its_progress_off_the_result_lines(
    tmp_path: Path,
    scheduler: SchedulerProcess,
    make_keystore: Callable[[str], Keystore],
    workers: Callable[..., WorkerProcess],
) -> None:
    # The progress line was drawn on the terminal that also shows the results, and each
    # result was printed after it: `job J: 1/3 slices final{"slice": 0, ...}`.
    owner = make_keystore("owner")
    with ComputeClient(scheduler.url, owner.identity) as client:
        job = client.deploy(job_file(tmp_path, "shown", ECHO, ["a", "b", "c"]))
    worker = workers(scheduler.url, make_keystore("worker"), 1)

    def run(terminal: int) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [command("dcp-compute"), "--scheduler", scheduler.url, "results", job, "--wait"]
            + ["--timeout", "120", *_signed(owner)],
            stdout=terminal,
            stderr=terminal,
            timeout=150,
        )

    status, text = _terminal_output(run)
    assert worker.stop() == 0
    assert status == 0, text
    rows = [line for line in text.replace("\r\n", "\n").split("\n") if '"slice"' in line]
    assert len(rows) == 3, text
    for row in rows:
        drawn = row.rsplit("\r", 1)[-1].replace("\x1b[K", "")
        assert drawn.startswith('{"slice"'), repr(row)
    assert f"job {job}: 3/3 slices final" in text


# ------------------------------------------------------------------ MessagePack documents

OWNER = "0x" + "12" * 20


def _replicated_file(tmp_path: Path) -> Path:
    path = job_file(tmp_path, "both", ECHO, ["a", "\u00e9", "c"], offer=0.5)
    path.write_text(
        f'verifier = "{ECHO}"\n'
        + path.read_text()
        + '\n[redundancy]\nquorum = 2\nknown = { "1" = "\u00e9" }\n'
    )
    return path


def test_a_messagepack_document_is_the_same_job_as_its_json_twin(tmp_path: Path) -> None:
    """The bytes fields go as they are; the job read from either form is the same."""
    path = _replicated_file(tmp_path)
    as_json = parse_document(load_job_file(path), OWNER)
    packed = load_job_file(path, binary=True)
    as_msgpack = parse_document(packed, OWNER, binary=True)
    assert replace(as_msgpack, payload_sha256="") == replace(as_json, payload_sha256="")
    assert as_msgpack.data == (b"a", "\u00e9".encode(), b"c")
    assert ECHO.read_bytes() in packed  # the module as it is, not in base64
    # A MessagePack document may still give a bytes field in base64.
    doc = msgspec.msgpack.decode(packed)
    doc["data"] = [base64.b64encode(d).decode() for d in doc["data"]]
    again = parse_document(msgspec.msgpack.encode(doc), OWNER, binary=True)
    assert again.data == as_msgpack.data


def _deep(levels: int) -> object:
    value: object = 1
    for _ in range(levels):
        value = [value]
    return value


def _packed(tmp_path: Path, **changes: object) -> bytes:
    doc = msgspec.msgpack.decode(load_job_file(job_file(tmp_path, "m", ECHO, ["x"]), binary=True))
    doc.update(changes)
    return msgspec.msgpack.encode(doc)


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"config": {"k": b"bytes"}}, "bytes is not JSON data"),
        ({"config": {"k": msgspec.msgpack.Ext(1, b"x")}}, "Ext is not JSON data"),
        ({"requirements": {1: "int key"}}, "object keys must be strings"),
        ({"offer": float("nan")}, "numbers must be finite"),
        ({"name": b"bytes"}, "bytes is not JSON data"),
        ({"config": {"k": _deep(40)}}, "nests deeper than 32 levels"),
        ({"data": [1]}, "data must be a list of base64 strings"),
        ({"module": 7}, "module must be a base64 string"),
    ],
)
def test_a_messagepack_document_holds_only_what_json_could(
    tmp_path: Path, change: dict[str, object], why: str
) -> None:
    with pytest.raises(JobFileError) as refused:
        parse_document(_packed(tmp_path, **change), OWNER, binary=True)
    assert why in str(refused.value), refused.value


@pytest.mark.parametrize(
    "body",
    [b"", b"\xc1", b"\x80\x00", msgspec.msgpack.encode([1, 2]), b"\x91" * 100_000 + b"\xc0"],
)
def test_a_document_that_is_not_one_messagepack_map_is_named(body: bytes) -> None:
    with pytest.raises(JobFileError, match="not MessagePack|not an object"):
        parse_document(body, OWNER, binary=True)


def test_a_client_deploys_in_messagepack_to_a_scheduler_that_reads_it(
    tmp_path: Path, scheduler: SchedulerProcess, make_keystore: Callable[[str], Keystore]
) -> None:
    owner = make_keystore("owner")
    with ComputeClient(scheduler.url, owner.identity) as client:
        job = client.deploy(job_file(tmp_path, "m", ECHO, ["one", "two"]))
        assert client.reads_msgpack()
        assert client.status(job)["counts"] == {"queued": 2}
        # The JSON form still deploys (an older client's).
        other = client.deploy_document(load_job_file(job_file(tmp_path, "j", ECHO, ["x"])))
        assert client.status(other)["counts"] == {"queued": 1}


def test_a_scheduler_of_version_1_gets_json_and_is_read_in_json(tmp_path: Path) -> None:
    """An older scheduler (status says protocol 1, results only in JSON): the deploy goes as
    a JSON document, and its JSON results are read, base64 and all. The scheduler here is a
    fake of that version on a real loopback socket."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    seen: list[tuple[str, str, bytes]] = []

    class Old(BaseHTTPRequestHandler):
        def _reply(self, status: int, data: object) -> None:
            body = json.dumps(data).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            seen.append(("GET", self.headers.get("Accept", ""), b""))
            if self.path == "/api/v1/status":
                self._reply(200, {"server": "old", "protocol": 1, "sessions": 0})
            else:
                slices = [{"slice": 0, "state": "done", "attempts": 1, "result_base64": "/wA="}]
                if "after=-1" not in self.path:
                    slices = []  # read on from after slice 0: nothing more
                self._reply(200, {"job": "j", "state": "finished", "slices": slices})

        def do_POST(self) -> None:  # noqa: N802
            body = self.rfile.read(int(self.headers["Content-Length"]))
            seen.append(("POST", self.headers.get("Content-Type", ""), body))
            self._reply(201, {"job": "a" * 32, "slices": 1})

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Old)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        identity = Identity.from_private_key(os.urandom(31) + b"\x01")
        with ComputeClient(url, identity) as client:
            assert client.deploy(job_file(tmp_path, "old", ECHO, ["x"])) == "a" * 32
            assert [r.result for r in client.results("j")] == [b"\xff\x00"]
        with Compute(url, identity) as compute_:  # the Python API: the same, from Compute.map
            compute_.map("def work(d):\n    return d\n", [1, 2])
    finally:
        server.shutdown()
        server.server_close()
    posts = [(kind, body) for method, kind, body in seen if method == "POST"]
    assert [kind for kind, _ in posts] == ["application/json"] * 2
    assert json.loads(posts[0][1])["data"] == [base64.b64encode(b"x").decode()]
    mapped = json.loads(posts[1][1])
    assert mapped["data"] == [base64.b64encode(b"1").decode(), base64.b64encode(b"2").decode()]
    assert base64.b64decode(mapped["module"]) == b"def work(d):\n    return d\n"
    asked = [accept for method, accept, _ in seen if method == "GET"]
    assert any("application/msgpack" in a for a in asked)  # it asked, and read the JSON
