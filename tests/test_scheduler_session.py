"""The worker websocket at the frame level, with a raw client on a real loopback socket."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path

import msgspec
import websockets
from websockets.asyncio.client import connect

import dcp_protocol as p
from dcp_protocol import signing
from scheduler.client import ComputeClient

from .conftest import EXAMPLES, Keystore, SchedulerProcess


async def _recv(ws: websockets.asyncio.client.ClientConnection) -> p.Message:
    return p.decode(await asyncio.wait_for(ws.recv(), 10), p.SCHEDULER_MESSAGES)


async def _open(url: str, keystore: Keystore) -> websockets.asyncio.client.ClientConnection:
    ws = await connect(url, compression=None, max_size=None)
    hello = await _recv(ws)
    assert isinstance(hello, p.Hello) and hello.protocol == p.BINARY_VERSION  # it speaks 1 and 2
    identity = keystore.identity
    sig = identity.sign(signing.session_payload(hello.challenge, hello.server, identity.address))
    await ws.send(
        p.encode(
            p.Auth(id=1, address=identity.address, signature=sig, payment_address=identity.address)
        ).decode()
    )
    welcome = await _recv(ws)
    assert isinstance(welcome, p.Welcome) and welcome.address == identity.address
    return ws


def test_malformed_frames_get_named_errors_and_the_session_survives(
    scheduler: SchedulerProcess, make_keystore: Callable[[str], Keystore]
) -> None:
    keystore = make_keystore("worker")

    async def main() -> None:
        ws = await _open(scheduler.ws_url, keystore)
        cases = [
            ("{nope", None, "malformed_frame"),
            (json.dumps({"v": 1, "type": "teleport", "id": 7}), 7, "unknown_message"),
            (json.dumps({"v": 1, "type": "fetch", "id": 8}), 8, "invalid_message"),
            (
                json.dumps({"v": 3, "type": "fetch", "id": 9, "max_slices": 1}),
                9,
                "unsupported_version",
            ),
            (p.encode(p.Ack(re=1)).decode(), None, "unexpected_message"),
            ("x" * (p.MAX_FRAME_BYTES + 1), None, "frame_too_large"),
        ]
        for frame, re, code in cases:
            await ws.send(frame)
            reply = await _recv(ws)
            assert isinstance(reply, p.Error), reply
            assert (reply.re, reply.code) == (re, code)
        await ws.send(p.encode(p.Fetch(id=10, max_slices=1)).decode())
        reply = await _recv(ws)
        assert isinstance(reply, p.Work) and reply.re == 10
        await ws.close()

    asyncio.run(main())


def test_out_of_range_numbers_get_named_errors_and_the_session_survives(
    scheduler: SchedulerProcess, make_keystore: Callable[[str], Keystore]
) -> None:
    """slice -1 and 2**64 ended the session with no reply (OverflowError, struct.error);
    every numeric field is range-checked at decode, and the reply names the field."""
    keystore = make_keystore("worker")
    address = keystore.identity.address
    sig = "00" * 65
    result = {
        "v": 1,
        "type": "result",
        "id": 3,
        "job": "j",
        "slice": 0,
        "token": "t",
        "result": "",
        "payment_address": address,
        "signature": sig,
    }

    async def main() -> None:
        ws = await _open(scheduler.ws_url, keystore)
        cases = [
            ({**result, "slice": -1}, 3, "result.slice: must be an integer within 0.."),
            ({**result, "slice": 2**64}, 3, "result.slice: must be an integer within 0.."),
            ({**result, "metrics": {"bytes_in": -1}}, 3, "result.metrics.bytes_in"),
            ({**result, "id": 2**64}, None, "result.id: must be an integer within 0.."),
            (
                {"v": 1, "type": "results", "id": 4, "results": [{**result, "slice": 2**64}]},
                4,
                "results.results[0]",
            ),
            (
                {
                    "v": 1,
                    "type": "heartbeat",
                    "id": 5,
                    "leases": [{"job": "j", "slice": -1, "token": "t"}],
                },
                5,
                "heartbeat.leases[0].slice",
            ),
            (
                {
                    "v": 1,
                    "type": "slice_failed",
                    "id": 6,
                    "job": "j",
                    "slice": 2**64,
                    "token": "t",
                    "code": "x",
                },
                6,
                "slice_failed.slice",
            ),
            (
                {
                    "v": 1,
                    "type": "return",
                    "id": 7,
                    "leases": [{"job": "j", "slice": 2**64, "token": "t"}],
                },
                7,
                "return.leases[0].slice",
            ),
            (
                {"v": 1, "type": "fetch", "id": 8, "max_slices": 1, "wait_seconds": 10**400},
                8,
                "fetch.wait_seconds",
            ),
        ]
        for frame, re, why in cases:
            await ws.send(json.dumps(frame))
            reply = await _recv(ws)
            assert isinstance(reply, p.Error), (frame, reply)
            assert (reply.re, reply.code) == (re, "invalid_message"), reply
            assert why in reply.message, reply
        # 100,000 levels deep: refused before decoding, the session goes on.
        await ws.send("[" * 100_000 + "]" * 100_000)
        reply = await _recv(ws)
        assert isinstance(reply, p.Error) and reply.code == "malformed_frame"
        assert "nests deeper than 64" in reply.message
        await ws.send(p.encode(p.Fetch(id=10, max_slices=1)).decode())
        reply = await _recv(ws)
        assert isinstance(reply, p.Work) and reply.re == 10
        await ws.close()

    asyncio.run(main())


def test_bad_challenge_signature_closes_the_session(
    scheduler: SchedulerProcess, make_keystore: Callable[[str], Keystore]
) -> None:
    keystore = make_keystore("worker")
    other = make_keystore("other")

    async def main() -> None:
        async with connect(scheduler.ws_url, compression=None) as ws:
            hello = await _recv(ws)
            assert isinstance(hello, p.Hello)
            # Signed by another key than the address claims.
            sig = other.identity.sign(
                signing.session_payload(hello.challenge, hello.server, keystore.identity.address)
            )
            await ws.send(
                p.encode(
                    p.Auth(
                        id=1,
                        address=keystore.identity.address,
                        signature=sig,
                        payment_address=keystore.identity.address,
                    )
                ).decode()
            )
            reply = await _recv(ws)
            assert isinstance(reply, p.Error) and reply.code == "auth_failed"
            try:
                await asyncio.wait_for(ws.recv(), 10)
            except websockets.ConnectionClosed as exc:
                assert exc.rcvd is not None and exc.rcvd.code == 4001
            else:
                raise AssertionError("the session stayed open")

    asyncio.run(main())


def test_requests_before_auth_are_refused(scheduler: SchedulerProcess) -> None:
    async def main() -> None:
        async with connect(scheduler.ws_url, compression=None) as ws:
            await _recv(ws)
            await ws.send(p.encode(p.Fetch(id=1, max_slices=1)).decode())
            reply = await _recv(ws)
            assert isinstance(reply, p.Error) and reply.code == "auth_failed"

    asyncio.run(main())


def test_results_need_the_sessions_signature_and_the_current_token(
    tmp_path: Path, scheduler: SchedulerProcess, make_keystore: Callable[[str], Keystore]
) -> None:
    owner = make_keystore("owner")
    keystore = make_keystore("worker")
    other = make_keystore("other")
    job_toml = tmp_path / "echo.toml"
    job_toml.write_text(f'module = "{EXAMPLES / "echo" / "echo.wasm"}"\n[inputs]\nvalues = ["a"]\n')
    with ComputeClient(scheduler.url, owner.identity) as client:
        job = client.deploy(job_toml)

    async def main() -> None:
        ws = await _open(scheduler.ws_url, keystore)
        await ws.send(p.encode(p.Fetch(id=2, max_slices=5)).decode())
        work = await _recv(ws)
        assert isinstance(work, p.Work)
        (lease,) = work.slices
        (spec,) = work.jobs
        assert lease.job == job and lease.datum == b"a" and spec.job == job
        pay = keystore.identity.address

        def result(rid: int, signer: Keystore, token: str, data: bytes = b"a") -> str:
            sig = signer.identity.sign(signing.result_payload(job, 0, token, data, pay))
            return p.encode(
                p.Result(
                    id=rid,
                    job=job,
                    slice=0,
                    token=token,
                    result=data,
                    payment_address=pay,
                    signature=sig,
                    metrics=p.Metrics(bytes_in=len(lease.datum), bytes_out=len(data)),
                )
            ).decode()

        await ws.send(result(3, other, lease.token))
        reply = await _recv(ws)
        assert isinstance(reply, p.Error) and reply.code == "bad_signature"
        await ws.send(result(4, keystore, "f" * 32))
        reply = await _recv(ws)
        assert isinstance(reply, p.Error) and reply.code == "stale_lease"
        await ws.send(result(5, keystore, lease.token))
        assert await _recv(ws) == p.Ack(re=5, status="accepted")
        await ws.send(result(6, keystore, lease.token))
        assert await _recv(ws) == p.Ack(re=6, status="duplicate")
        await ws.close()

    asyncio.run(main())
    with ComputeClient(scheduler.url, owner.identity) as client:
        (r,) = client.results(job)
    assert r.result == b"a"


def test_work_carries_the_specs_of_unknown_jobs_only(
    tmp_path: Path, scheduler: SchedulerProcess, make_keystore: Callable[[str], Keystore]
) -> None:
    job_toml = tmp_path / "echo.toml"
    job_toml.write_text(
        f'module = "{EXAMPLES / "echo" / "echo.wasm"}"\n[inputs]\nvalues = ["a", "b"]\n'
    )
    with ComputeClient(scheduler.url, make_keystore("owner").identity) as client:
        job = client.deploy(job_toml)
    keystore = make_keystore("worker")

    async def main() -> None:
        ws = await _open(scheduler.ws_url, keystore)
        await ws.send(p.encode(p.Fetch(id=2, max_slices=1, known_jobs=(job,))).decode())
        work = await _recv(ws)
        assert isinstance(work, p.Work) and len(work.slices) == 1 and work.jobs == ()
        await ws.send(p.encode(p.Fetch(id=3, max_slices=1)).decode())
        work = await _recv(ws)
        assert isinstance(work, p.Work) and [j.job for j in work.jobs] == [job]
        await ws.close()

    asyncio.run(main())


def test_a_worker_learns_a_jobs_id_and_owner_only_with_a_lease(
    tmp_path: Path, scheduler: SchedulerProcess, make_keystore: Callable[[str], Keystore]
) -> None:
    """``work.skipped`` told any fresh identity every public job's id, and its owner when
    the worker kept an owner list: now a job the worker did not name itself is told by an
    alias that holds for the session (the reason stays)."""
    job_toml = tmp_path / "echo.toml"
    job_toml.write_text(
        f'module = "{EXAMPLES / "echo" / "echo.wasm"}"\n[inputs]\nvalues = ["a", "b"]\n'
    )
    owner = make_keystore("owner").identity
    with ComputeClient(scheduler.url, owner) as client:
        job = client.deploy(job_toml)
    other = "0x" + "77" * 20

    async def main() -> tuple[p.Work, p.Work, p.Work]:
        ws = await _open(scheduler.ws_url, make_keystore("stranger"))
        await ws.send(p.encode(p.Fetch(id=2, max_slices=1, allowed_owners=(other,))).decode())
        by_owner = await _recv(ws)
        await ws.close()
        ws = await _open(scheduler.ws_url, make_keystore("another"))
        await ws.send(p.encode(p.Fetch(id=2, max_slices=1, allowed_jobs=("ab" * 16,))).decode())
        by_list = await _recv(ws)
        # A job it named itself (declined at an offer) keeps its id.
        decline = (p.Decline(job=job, offer=1.0),)
        await ws.send(p.encode(p.Fetch(id=3, max_slices=1, declined=decline)).decode())
        named = await _recv(ws)
        await ws.close()
        assert isinstance(by_owner, p.Work) and isinstance(by_list, p.Work)
        assert isinstance(named, p.Work)
        return by_owner, by_list, named

    by_owner, by_list, named = asyncio.run(main())
    ((told_owner,), (told_list,)) = by_owner.skipped, by_list.skipped
    assert by_owner.slices == by_list.slices == () and by_owner.jobs == by_list.jobs == ()
    assert told_owner.code == "owner_not_allowed" and told_list.code == "job_not_allowed"
    for told in (told_owner, told_list):
        assert told.subject.startswith("job-") and told.subject != job
        assert job not in told.message and owner.address.lower() not in told.message.lower()
    assert told_owner.subject != told_list.subject  # an alias holds for one session only
    assert [(r.subject, r.code) for r in named.skipped] == [(job, "wage_below_minimum")]


def test_long_poll_fetch_is_answered_when_work_arrives(
    tmp_path: Path, scheduler: SchedulerProcess, make_keystore: Callable[[str], Keystore]
) -> None:
    keystore = make_keystore("worker")
    owner = make_keystore("owner")
    job_toml = tmp_path / "echo.toml"
    job_toml.write_text(f'module = "{EXAMPLES / "echo" / "echo.wasm"}"\n[inputs]\nvalues = ["a"]\n')

    async def main() -> None:
        ws = await _open(scheduler.ws_url, keystore)
        await ws.send(p.encode(p.Fetch(id=2, max_slices=1, wait_seconds=20)).decode())
        # While the fetch is parked the session keeps serving other requests.
        await ws.send(p.encode(p.Heartbeat(id=3)).decode())
        reply = await _recv(ws)
        assert isinstance(reply, p.HeartbeatAck) and reply.re == 3
        started = asyncio.get_running_loop().time()
        with ComputeClient(scheduler.url, owner.identity) as client:
            await asyncio.to_thread(client.deploy, job_toml)
        work = await _recv(ws)
        assert isinstance(work, p.Work) and work.re == 2 and len(work.slices) == 1
        assert asyncio.get_running_loop().time() - started < 5  # woken, not timed out
        # An empty long poll ends at its deadline with no slices.
        await ws.send(p.encode(p.Fetch(id=4, max_slices=1, wait_seconds=0.2)).decode())
        work = await _recv(ws)
        assert isinstance(work, p.Work) and work.re == 4 and work.slices == ()
        await ws.close()

    asyncio.run(main())


def test_group_proofs_forged_or_replayed_are_refused(
    scheduler: SchedulerProcess, make_keystore: Callable[[str], Keystore]
) -> None:
    from dcp_protocol import policy

    from .test_policy import create_group

    key, secret = create_group(scheduler.db, "lab")
    good_hash = policy.join_hash(key, secret)
    keystore = make_keystore("worker")
    address = keystore.identity.address

    async def attempt(proof_for: Callable[[str], str]) -> p.Welcome:
        async with connect(scheduler.ws_url, compression=None) as ws:
            hello = await _recv(ws)
            assert isinstance(hello, p.Hello)
            sig = keystore.identity.sign(
                signing.session_payload(hello.challenge, hello.server, address)
            )
            await ws.send(
                p.encode(
                    p.Auth(
                        id=1,
                        address=address,
                        signature=sig,
                        payment_address=address,
                        groups=(p.GroupProof(key, proof_for(hello.challenge)),),
                    )
                ).decode()
            )
            welcome = await _recv(ws)
            assert isinstance(welcome, p.Welcome)
            return welcome

    async def main() -> None:
        ok = await attempt(lambda ch: policy.group_proof(good_hash, ch, address))
        assert ok.groups == (key,) and ok.refused == ()
        cases = {
            "replayed from another session": lambda ch: policy.group_proof(
                good_hash, "cd" * 32, address
            ),
            "another worker's": lambda ch: policy.group_proof(good_hash, ch, "0x" + "11" * 20),
            "wrong secret": lambda ch: policy.group_proof(
                policy.join_hash(key, secret + "x"), ch, address
            ),
            "garbage": lambda ch: "zz",
        }
        for name, forge in cases.items():
            welcome = await attempt(forge)
            assert welcome.groups == (), name
            assert [(r.subject, r.code) for r in welcome.refused] == [
                (key, "group_proof_invalid")
            ], name

    asyncio.run(main())


def test_a_worker_identity_holds_at_most_max_leases_per_worker(
    tmp_path: Path, make_keystore: Callable[[str], Keystore]
) -> None:
    """A session asking for everything gets the cap, again for a second session of the same
    identity, while another identity still gets work."""
    job_toml = tmp_path / "echo.toml"
    values = [f"v{i}" for i in range(6)]
    job_toml.write_text(
        f'module = "{EXAMPLES / "echo" / "echo.wasm"}"\n[inputs]\nvalues = {values!r}\n'.replace(
            "'", '"'
        )
    )
    hoarder, other = make_keystore("hoarder"), make_keystore("other")
    with SchedulerProcess(tmp_path / "s.db", "--max-leases-per-worker", "2") as scheduler:
        with ComputeClient(scheduler.url, make_keystore("owner").identity) as client:
            client.deploy(job_toml)

        async def fetch(ws: websockets.asyncio.client.ClientConnection, rid: int) -> int:
            await ws.send(p.encode(p.Fetch(id=rid, max_slices=64)).decode())
            work = await _recv(ws)
            assert isinstance(work, p.Work) and work.re == rid
            return len(work.slices)

        async def main() -> None:
            first = await _open(scheduler.ws_url, hoarder)
            second = await _open(scheduler.ws_url, hoarder)
            assert await fetch(first, 2) == 2
            assert await fetch(first, 3) == 0
            assert await fetch(second, 2) == 0  # the cap is the identity's, not the session's
            third = await _open(scheduler.ws_url, other)
            assert await fetch(third, 2) == 2
            for ws in (first, second, third):
                await ws.close()

        asyncio.run(main())


def test_a_messagepack_session_is_answered_in_messagepack_and_survives_bad_frames(
    scheduler: SchedulerProcess, make_keystore: Callable[[str], Keystore]
) -> None:
    """Protocol version 2: an auth in MessagePack (a binary websocket message) makes the
    session's replies MessagePack too; a bad binary frame is named, as a bad JSON one is."""
    keystore = make_keystore("worker")
    identity = keystore.identity

    async def recv_binary(ws: websockets.asyncio.client.ClientConnection) -> p.Message:
        data = await asyncio.wait_for(ws.recv(), 10)
        assert isinstance(data, bytes), data  # a binary message
        return p.decode_binary(data, p.SCHEDULER_MESSAGES)

    async def main() -> None:
        ws = await connect(scheduler.ws_url, compression=None, max_size=None)
        hello = await _recv(ws)
        assert isinstance(hello, p.Hello) and hello.protocol == p.BINARY_VERSION
        sig = identity.sign(
            signing.session_payload(hello.challenge, hello.server, identity.address)
        )
        auth = p.Auth(
            id=1, address=identity.address, signature=sig, payment_address=identity.address
        )
        await ws.send(p.encode_binary(auth))
        welcome = await recv_binary(ws)
        assert isinstance(welcome, p.Welcome) and welcome.address == identity.address
        pack = msgspec.msgpack.encode
        cases = [
            (b"\x80\xc1", None, "malformed_frame"),
            (pack({"v": 2, "type": "teleport", "id": 7}), 7, "unknown_message"),
            (pack({"v": 2, "type": "fetch", "id": 8, "max_slices": 1, 9: 9}), 8, "invalid_message"),
            (pack({"v": 1, "type": "fetch", "id": 9, "max_slices": 1}), 9, "unsupported_version"),
            (
                pack(
                    {
                        "v": 2,
                        "type": "fetch",
                        "id": 10,
                        "max_slices": 1,
                        "capabilities": {"a": b"b"},
                    }
                ),
                10,
                "invalid_message",
            ),
            (b"\x81\xa1v" + b"\x91" * 100_000 + b"\xc0", None, "malformed_frame"),
        ]
        for frame, re, code in cases:
            await ws.send(frame)
            reply = await recv_binary(ws)
            assert isinstance(reply, p.Error), reply
            assert (reply.re, reply.code) == (re, code), reply
        await ws.send(p.encode_binary(p.Fetch(id=11, max_slices=1)))
        reply = await recv_binary(ws)
        assert isinstance(reply, p.Work) and reply.re == 11
        await ws.close()

    asyncio.run(main())
