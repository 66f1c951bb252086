"""Who may run what, and who gets paid, end to end with real processes."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import websockets
from websockets.asyncio.server import ServerConnection, serve

import dcp_protocol as p
from dcp_protocol import signing
from scheduler.client import ComputeClient, ComputeError
from scheduler.store.sqlite import SQLiteStore

from .conftest import (
    EXAMPLES,
    Keystore,
    SchedulerProcess,
    WorkerProcess,
    answer_empty,
    command,
    wait_for,
)
from .test_pipeline import ECHO, PUZZLE, counts, job_file
from .test_scheduler_session import _open, _recv

sys.path.insert(0, str(EXAMPLES / "hash-puzzle"))
from check import check  # noqa: E402

VERIFIER = EXAMPLES / "hash-puzzle" / "verify.wasm"


def admin(db: Path, *args: str) -> str:
    out = subprocess.run(
        [command("dcp-scheduler"), *args, "--db", str(db)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def create_group(db: Path, name: str) -> tuple[str, str]:
    out = admin(db, "groups", "create", name)
    key = re.search(r"^join_key = (\S+)$", out, re.M).group(1)  # type: ignore[union-attr]
    secret = re.search(r"^join_secret = (\S+)$", out, re.M).group(1)  # type: ignore[union-attr]
    return key, secret


def slice_workers(db: Path, job: str) -> list[str | None]:
    store = SQLiteStore(db)
    try:
        return [s.worker for s in store.slices(job, limit=10_000)]
    finally:
        store.close()


def test_private_group_slices_go_only_to_members(
    tmp_path: Path,
    scheduler: SchedulerProcess,
    make_keystore: Callable[[str], Keystore],
    workers: Callable[..., WorkerProcess],
) -> None:
    key, secret = create_group(scheduler.db, "Lab")
    member_ks, other_ks = make_keystore("member"), make_keystore("other")
    member = workers(
        scheduler.url, member_ks, 2, "--join", f"{key},{secret}", state_dir=tmp_path / "m"
    )
    other = workers(scheduler.url, other_ks, 2, state_dir=tmp_path / "o")
    wait_for(lambda: "connected to" in member.output() and "connected to" in other.output())
    prefixes = [f"p{i}" for i in range(40)]
    with ComputeClient(scheduler.url, make_keystore("owner").identity) as client:
        # The public job first: both workers take from it (oldest job first), then the
        # member alone takes the private one.
        public = client.deploy(
            job_file(tmp_path, "public", PUZZLE, prefixes, ["14"], "memory_bytes = 33554432")
        )
        private = client.deploy(
            job_file(
                tmp_path,
                "private",
                PUZZLE,
                prefixes[:12],
                ["14"],
                "memory_bytes = 33554432",
                extra=f'group = "{key}"',
            )
        )
        for job, data in ((private, prefixes[:12]), (public, prefixes)):
            results = list(client.results(job, wait=True, timeout=120))
            assert all(
                check(d.encode(), r.result or b"", 14) is None
                for d, r in zip(data, results, strict=True)
            )
    m, o = member_ks.identity.address, other_ks.identity.address
    assert set(slice_workers(scheduler.db, private)) == {m}
    assert set(slice_workers(scheduler.db, public)) == {m, o}
    assert private not in other.output()  # the non-member never even heard of it
    assert member.stop() == 0 and other.stop() == 0


class RogueScheduler:
    """A scheduler that lies on purpose: whatever the worker's fetch offered, it leases one
    slice of ``spec`` at ``offer`` and records what the worker does with it."""

    def __init__(
        self,
        spec: p.JobSpec,
        offer: float = 1.0,
        then: p.JobSpec | None = None,
        tamper: Callable[[str], str] | None = None,
        send_spec: bool = True,
    ) -> None:
        """``then``: a second fetch gets slice 1 with this spec (for the same job id);
        ``tamper``: rewrites the first work frame's text (what no honest encoder sends);
        ``send_spec``: False leases the slice without ever sending its job's spec."""
        self.send_spec = send_spec
        self.spec = spec
        self.offer = offer
        self.then = then
        self.tamper = tamper or (lambda text: text)
        self.returned: list[p.Return] = []
        self.results: list[p.ResultItem] = []
        self.failed: list[p.SliceFailed] = []
        self.ready = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._loop.run_until_complete, args=(self._main(),))
        self._thread.start()
        assert self.ready.wait(10)

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        async with serve(self._session, "127.0.0.1", 0, compression=None) as server:
            self.port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
            self.ready.set()
            await self._stop.wait()

    async def _session(self, ws: ServerConnection) -> None:
        await ws.send(p.encode(p.Hello(protocol=1, challenge="ab" * 32, server="rogue")).decode())
        auth = p.decode(await ws.recv(), p.SCHEDULER_MESSAGES)
        assert isinstance(auth, p.Auth)
        await ws.send(
            p.encode(
                p.Welcome(
                    re=auth.id,
                    session="s",
                    address=auth.address,
                    heartbeat_interval=1,
                    lease_timeout=30,
                    max_result_bytes=1 << 20,
                )
            ).decode()
        )
        fetches = 0
        polls: list[asyncio.Task[None]] = []
        try:
            async for frame in ws:
                message = p.decode(frame, p.SCHEDULER_MESSAGES)
                reply: p.Message
                if isinstance(message, p.Fetch):
                    fetches += 1
                    if fetches == 1:
                        lease = p.SliceLease(
                            self.spec.job, 0, "t" * 32, 1, 1e12, b"secret", offer=self.offer
                        )
                        specs = (self.spec,) if self.send_spec else ()
                        work = p.Work(re=message.id, slices=(lease,), jobs=specs)
                        await ws.send(self.tamper(p.encode(work).decode()))
                        continue
                    if fetches == 2 and self.then is not None:
                        lease = p.SliceLease(
                            self.then.job, 1, "u" * 32, 1, 1e12, b"secret", offer=self.offer
                        )
                        reply = p.Work(re=message.id, slices=(lease,), jobs=(self.then,))
                    else:  # nothing more: a long poll, answered empty in the background
                        polls.append(asyncio.create_task(answer_empty(ws, message)))
                        continue
                elif isinstance(message, p.Heartbeat):
                    reply = p.HeartbeatAck(re=message.id, deadline=1e12)
                elif isinstance(message, p.Results):
                    self.results.extend(message.results)
                    acks = tuple(p.ItemAck("accepted") for _ in message.results)
                    reply = p.ResultsAck(re=message.id, acks=acks)
                else:
                    if isinstance(message, p.Return):
                        self.returned.append(message)
                    if isinstance(message, p.SliceFailed):
                        self.failed.append(message)
                    reply = p.Ack(re=message.id)
                await ws.send(p.encode(reply).decode())
        except websockets.ConnectionClosed:
            pass
        finally:
            for poll in polls:
                poll.cancel()

    def close(self) -> None:
        assert self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)
        self._loop.close()


def _spec(**fields: object) -> p.JobSpec:
    import hashlib

    module = ECHO.read_bytes()
    values: dict[str, object] = {
        "job": "f" * 32,
        "runtime": "wasm",
        "module": module,
        "sha256": hashlib.sha256(module).hexdigest(),
        "owner": "0x" + "99" * 20,
    }
    values.update(fields)
    return p.JobSpec(**values)  # type: ignore[arg-type]


_OPENCL = {"kernel": "k", "args": [], "global_size": [1]}

#: Every field the worker agreed to, allowed and refused: (spec, worker options, offer,
#: the refusal code or None when the slice runs). The rogue scheduler leases the slice
#: whatever the worker's fetch said.
ROGUE_TABLE = [
    ("runtime-offered", _spec(), (), 1.0, None),
    (
        "runtime-opencl-not-offered",
        _spec(runtime="opencl", config=_OPENCL),
        ("--config", "{no_opencl}"),
        1.0,
        "requirement_unmet",
    ),
    ("runtime-unknown", _spec(runtime="native"), (), 1.0, "requirement_unmet"),
    ("requirement-met", _spec(requirements={"runtime.wasm": "required"}), (), 1.0, None),
    (
        "requirement-unmet",
        _spec(requirements={"opencl.gpu": "required"}),
        (),
        1.0,
        "requirement_unmet",
    ),
    (
        "requirement-forbidden",
        _spec(requirements={"runtime.wasm": "forbidden"}),
        (),
        1.0,
        "requirement_unmet",
    ),
    ("group-joined", _spec(group="lab"), ("--join", "lab,s3cret"), 1.0, None),
    (
        "group-not-joined",
        _spec(group="secret-lab"),
        ("--join", "lab,s3cret"),
        1.0,
        "group_not_joined",
    ),
    ("public-left", _spec(), ("--leave-public-group",), 1.0, "group_not_joined"),
    # The datum alone (6 bytes) costs 6 credits at 10^6 credits per MB in.
    ("wage-met", _spec(), ("--min-wage", "0,0,1,0"), 1.0, None),
    ("wage-below", _spec(), ("--min-wage", "0,0,1000000,0"), 1.0, "wage_below_minimum"),
    ("job-allowed", _spec(), ("--job-id", "f" * 32), 1.0, None),
    ("job-not-allowed", _spec(), ("--job-id", "a" * 32), 1.0, "job_not_allowed"),
    ("owner-allowed", _spec(), ("--job-owner", "0x" + "99" * 20), 1.0, None),
    ("owner-not-allowed", _spec(), ("--job-owner", "0x" + "11" * 20), 1.0, "owner_not_allowed"),
]


@pytest.mark.parametrize(
    ("spec", "args", "offer", "code"),
    [row[1:] for row in ROGUE_TABLE],
    ids=[row[0] for row in ROGUE_TABLE],
)
def test_worker_checks_every_slice_against_what_it_offered(
    tmp_path: Path,
    make_keystore: Callable[[str], Keystore],
    workers: Callable[..., WorkerProcess],
    spec: p.JobSpec,
    args: tuple[str, ...],
    offer: float,
    code: str | None,
) -> None:
    no_opencl = tmp_path / "no-opencl.toml"
    no_opencl.write_text("opencl_slots = 0  # lend no OpenCL device\n")
    args = tuple(a.format(no_opencl=no_opencl) for a in args)
    rogue = RogueScheduler(spec, offer)
    try:
        worker = workers(f"http://127.0.0.1:{rogue.port}", make_keystore("w"), 1, *args)
        wait_for(lambda: bool(rogue.returned or rogue.results or rogue.failed), 30)
        if code is None:
            assert [(r.job, r.slice, r.result) for r in rogue.results] == [(spec.job, 0, b"secret")]
            assert not rogue.returned and not rogue.failed
        else:
            (returned,) = rogue.returned
            assert returned.code == code and [r.slice for r in returned.leases] == [0]
            assert not rogue.results and not rogue.failed
        assert worker.stop() == 0
    finally:
        rogue.close()
    log = worker.output()
    if code is not None:
        assert f"refusing slice 0 of job {spec.job}: {code}" in log
        assert "running slice" not in log  # it never reached an evaluator


@pytest.mark.parametrize(
    ("rogue_args", "expected"),
    [
        # Numbers JSON does not have: the whole frame is refused, and the session with it.
        ({"tamper": lambda t: t.replace('"offer":1.0', '"offer":NaN')}, "bad frame"),
        ({"tamper": lambda t: t.replace('"offer":1.0', '"offer":1e400')}, "bad frame"),
        ({"tamper": lambda t: t.replace('"offer":1.0', '"offer":-1.0')}, "bad frame"),
        ({"send_spec": False}, "unknown_slice"),
        ({"then": _spec(owner="0x" + "11" * 20)}, "job_spec_changed"),
        ({"then": _spec(group="lab")}, "job_spec_changed"),
    ],
    ids=["nan-offer", "infinite-offer", "negative-offer", "no-spec", "owner-swap", "group-swap"],
)
def test_worker_refuses_lies_about_a_job(
    make_keystore: Callable[[str], Keystore],
    workers: Callable[..., WorkerProcess],
    rogue_args: dict[str, object],
    expected: str,
) -> None:
    # A minimum wage any finite offer of 1 meets: only a lie could get past it.
    rogue = RogueScheduler(_spec(), 1.0, **rogue_args)  # type: ignore[arg-type]
    try:
        worker = workers(
            f"http://127.0.0.1:{rogue.port}",
            make_keystore("w"),
            1,
            "--min-wage",
            "0,0,1000,0",
            "--join",
            "lab,s3cret",
        )
        if expected == "bad frame":
            wait_for(lambda: "scheduler sent a bad frame" in worker.output(), 30)
            assert not rogue.returned and not rogue.results and not rogue.failed
        elif "then" in rogue_args:  # slice 0 under the first spec, slice 1 under another
            wait_for(lambda: bool(rogue.returned and rogue.results), 30)
            assert [(r.job, r.slice) for r in rogue.results] == [(_spec().job, 0)]
            (returned,) = rogue.returned
            assert returned.code == expected and [r.slice for r in returned.leases] == [1]
        else:
            wait_for(lambda: bool(rogue.returned), 30)
            (returned,) = rogue.returned
            assert returned.code == expected and not rogue.results and not rogue.failed
        assert worker.stop() == 0
    finally:
        rogue.close()
    log = worker.output()
    if "then" in rogue_args:
        assert f"running slice {_spec().job}/1" not in log  # the changed job reached nothing
    else:
        assert "running slice" not in log  # it never reached an evaluator


def test_minimum_wage(
    tmp_path: Path,
    scheduler: SchedulerProcess,
    make_keystore: Callable[[str], Keystore],
    workers: Callable[..., WorkerProcess],
) -> None:
    owner = make_keystore("owner")
    admin(scheduler.db, "bank", "mint", owner.identity.address, "100")
    data = [f"{i:04d}" + "x" * 996 for i in range(30)]  # 1,000 bytes in, 1,000 out per slice
    # At 100 credits per MB in, a slice costs this worker 0.1 credits.
    wage = ("--min-wage", "0,0,100,0")
    with ComputeClient(scheduler.url, owner.identity) as client:
        cheap = client.deploy(job_file(tmp_path, "cheap", ECHO, data, offer=0.01))
        # 1. A worker without a wage measures the job's cost, then stops.
        first = workers(
            scheduler.url, make_keystore("first"), 1, "--prefetch", "0", state_dir=tmp_path / "a"
        )
        wait_for(lambda: counts(scheduler.db, cheap).get("done", 0) >= 3, 60)
        assert first.stop() == 0
        done = counts(scheduler.db, cheap).get("done", 0)
        # 2. A worker whose wage is above what the job pays is never given it.
        dear = make_keystore("dear")
        worker = workers(scheduler.url, dear, 2, *wage, state_dir=tmp_path / "b")
        wait_for(lambda: "wage_below_minimum" in worker.output(), 30)
        assert counts(scheduler.db, cheap).get("done", 0) == done
        assert worker.stop() == 0
        assert f"running slice {cheap}" not in worker.output()
        assert client.status(cheap)["refusals"].get("wage_below_minimum", 0) >= 1
        status = client.status(cheap)
        assert status["cost_per_slice"]["bytes_in"] == 1000
        assert status["effective_wage"]["mb_in"] == pytest.approx(10)  # 0.01 per 0.001 MB
        # 3. A job that pays enough runs on it.
        fair = client.deploy(job_file(tmp_path, "fair", ECHO, data[:5], offer=0.5))
        worker = workers(scheduler.url, dear, 2, *wage, "--job-id", fair, state_dir=tmp_path / "c")
        assert [r.state for r in client.results(fair, wait=True, timeout=60)] == ["done"] * 5
        assert worker.stop() == 0
        # 4. Lowering the wage lets it take the cheap job.
        worker = workers(scheduler.url, dear, 2, "--min-wage", "0,0,1,0", state_dir=tmp_path / "d")
        assert all(r.state == "done" for r in client.results(cheap, wait=True, timeout=60))
        assert worker.stop() == 0


def test_worker_declines_a_job_it_measures_below_its_wage(
    tmp_path: Path,
    scheduler: SchedulerProcess,
    make_keystore: Callable[[str], Keystore],
    workers: Callable[..., WorkerProcess],
) -> None:
    owner = make_keystore("owner")
    admin(scheduler.db, "bank", "mint", owner.identity.address, "10")
    data = ["y" * 1000 for _ in range(40)]
    with ComputeClient(scheduler.url, owner.identity) as client:
        job = client.deploy(job_file(tmp_path, "cheap", ECHO, data, offer=0.01))
        # 100 credits per MB out: only running a slice shows what it returns (1,000 bytes, 0.1
        # credits), while its bytes in would have been refused before it ran.
        worker = workers(
            scheduler.url, make_keystore("w"), 1, "--prefetch", "0", "--min-wage", "0,0,0,100"
        )
        wait_for(lambda: "declining job" in worker.output(), 30)
        wait_for(lambda: counts(scheduler.db, job).get("leased", 0) == 0, 30)
        done = counts(scheduler.db, job).get("done", 0)
        assert 1 <= done <= 3  # the first slices measured the cost; then it stopped
        assert worker.stop() == 0
        assert client.cancel(job) == len(data) - done
        assert client.status(job)["escrow"] == 0
        assert client.status(job)["refusals"].get("wage_below_minimum", 0) >= 1


def test_wrong_results_earn_nothing_and_the_job_completes(
    tmp_path: Path,
    scheduler: SchedulerProcess,
    make_keystore: Callable[[str], Keystore],
    workers: Callable[..., WorkerProcess],
) -> None:
    owner, cheat, honest = make_keystore("owner"), make_keystore("cheat"), make_keystore("honest")
    admin(scheduler.db, "bank", "mint", owner.identity.address, "5")
    prefixes = [f"c{i}" for i in range(6)]
    with ComputeClient(scheduler.url, owner.identity) as client:
        job = client.deploy(
            job_file(
                tmp_path,
                "puzzle",
                PUZZLE,
                prefixes,
                ["12"],
                "memory_bytes = 33554432",
                offer=0.1,
                extra=f'verifier = "{VERIFIER}"',
            )
        )

        async def cheater() -> list[str]:
            ws = await _open(scheduler.ws_url, cheat)
            await ws.send(p.encode(p.Fetch(id=2, max_slices=6)).decode())
            work = await _recv(ws)
            assert isinstance(work, p.Work) and len(work.slices) == 6
            codes = []
            for i, lease in enumerate(work.slices):
                wrong = b"12345 " + b"00" * 32 + b"\n"
                sig = cheat.identity.sign(
                    signing.result_payload(
                        job, lease.slice, lease.token, wrong, cheat.identity.address
                    )
                )
                await ws.send(
                    p.encode(
                        p.Result(
                            id=10 + i,
                            job=job,
                            slice=lease.slice,
                            token=lease.token,
                            result=wrong,
                            payment_address=cheat.identity.address,
                            signature=sig,
                            metrics=p.Metrics(bytes_in=len(lease.datum), bytes_out=len(wrong)),
                        )
                    ).decode()
                )
                reply = await _recv(ws)
                assert isinstance(reply, p.Error)
                codes.append(reply.code)
            await ws.close()
            return codes

        assert asyncio.run(cheater()) == ["result_rejected"] * 6
        worker = workers(scheduler.url, honest, 2)
        results = list(client.results(job, wait=True, timeout=120))
        assert [
            check(d.encode(), r.result or b"", 12) for d, r in zip(prefixes, results, strict=True)
        ] == [None] * 6
        assert client.account(cheat.identity.address)["balance"] == 0
        assert client.account(honest.identity.address)["balance"] == pytest.approx(0.6)
        assert client.status(job)["refusals"] == {"result_rejected": 6}
    assert worker.stop() == 0
    listed = admin(scheduler.db, "workers", "list")
    assert f"{cheat.identity.address}  accepted=0 rejected=6" in listed
    assert "0.600000 credits earned" in worker.output()


def test_a_broken_verifier_pays_nobody(
    tmp_path: Path,
    scheduler: SchedulerProcess,
    make_keystore: Callable[[str], Keystore],
    workers: Callable[..., WorkerProcess],
) -> None:
    import wasmtime

    loop = tmp_path / "loop.wasm"
    loop.write_bytes(
        wasmtime.wat2wasm(
            '(module (memory (export "memory") 1) (func (export "_start") (loop (br 0))))'
        )
    )
    owner = make_keystore("owner")
    admin(scheduler.db, "bank", "mint", owner.identity.address, "1")
    worker = workers(scheduler.url, make_keystore("w"), 1)
    with ComputeClient(scheduler.url, owner.identity) as client:
        job = client.deploy(
            job_file(
                tmp_path, "echo", ECHO, ["a"], offer=0.5, attempts=1, extra=f'verifier = "{loop}"'
            )
        )
        (result,) = client.results(job, wait=True, timeout=60)
        assert result.state == "failed" and result.error["code"] == "verifier_failed"
        assert client.status(job)["escrow"] == 0.5
    assert worker.stop() == 0


def test_deploys_need_funds_and_books_balance(
    tmp_path: Path,
    scheduler: SchedulerProcess,
    make_keystore: Callable[[str], Keystore],
    workers: Callable[..., WorkerProcess],
) -> None:
    owner = make_keystore("owner")
    with ComputeClient(scheduler.url, owner.identity) as client:
        with pytest.raises(ComputeError) as info:
            client.deploy(job_file(tmp_path, "dear", ECHO, ["a", "b"], offer=1.5))
        assert info.value.status == 402 and info.value.code == "insufficient_funds"
        assert "3.000000 missing" in str(info.value)
        admin(scheduler.db, "bank", "mint", owner.identity.address, "10")
        paid = client.deploy(job_file(tmp_path, "paid", ECHO, ["a", "b", "c"], offer=1))
        cancelled = client.deploy(job_file(tmp_path, "gone", ECHO, ["x"] * 4, offer=0.5))
        assert client.cancel(cancelled) == 4
        assert client.account()["balance"] == pytest.approx(7)
        paid_worker = make_keystore("w")
        worker = workers(scheduler.url, paid_worker, 2)
        list(client.results(paid, wait=True, timeout=60))
        assert worker.stop() == 0
        assert client.account()["balance"] == pytest.approx(7)
        # The 3 credits escrowed for the paid job went to the worker that ran it.
        assert client.account(paid_worker.identity.address)["balance"] == pytest.approx(3)
    ledger = subprocess.run(
        [command("dcp-scheduler"), "bank", "ledger", "--db", str(scheduler.db), "--check"],
        capture_output=True,
        text=True,
    )
    assert ledger.returncode == 0, ledger.stderr
    totals = dict(kv.split("=") for kv in ledger.stdout.splitlines()[-1].split())
    assert float(totals["minted"]) == 10
    assert float(totals["escrowed"]) == float(totals["paid"]) + float(totals["refunded"]) + float(
        totals["escrow"]
    )
    assert (float(totals["paid"]), float(totals["refunded"])) == (3, 2)
    account = subprocess.run(
        [
            command("dcp-compute"),
            "--scheduler",
            scheduler.url,
            "account",
            "--identity",
            str(owner.path),
        ],
        capture_output=True,
        text=True,
    )
    assert account.stdout.split()[-1] == "7.000000"
    assert (
        json.loads(
            subprocess.run(
                [
                    command("dcp-compute"),
                    "--scheduler",
                    scheduler.url,
                    "status",
                    paid,
                    "--identity",
                    str(owner.path),
                    "--passphrase-file",
                    str(owner.passphrase_file),
                ],
                capture_output=True,
                text=True,
            ).stdout
        )["escrow"]
        == 0
    )
