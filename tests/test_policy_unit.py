"""The shared policy, without I/O: every refusal has its code."""

from __future__ import annotations

import re

import pytest

import dcp_protocol as p
from dcp_protocol import Metrics, Wage, policy
from dcp_protocol.policy import JobTerms, WorkerTerms

CAPS = {"runtimes": {"wasm": {"features": ["simd"], "limits": ["fuel"]}}, "memory_bytes": 2**30}


def code(job: JobTerms, worker: WorkerTerms) -> str | None:
    why = policy.refusal(job, worker)
    return None if why is None else why.code


def test_group_membership() -> None:
    private = JobTerms("j", "0xo", "wasm", group="lab")
    public = JobTerms("p", "0xo", "wasm")
    assert code(private, WorkerTerms()) == "group_not_joined"
    assert code(private, WorkerTerms(groups=frozenset({"lab"}))) is None
    assert code(public, WorkerTerms()) is None
    # leave_public_group is fail-safe: membership of other groups does not turn it off.
    left = WorkerTerms(groups=frozenset({"lab"}), leave_public_group=True)
    assert code(public, left) == "group_not_joined"
    assert code(private, left) is None


def test_group_proofs_are_bound_to_the_session_and_worker() -> None:
    h = policy.join_hash("lab", "s3cret")
    assert h != policy.join_hash("lab", "s3cre") and h != policy.join_hash("la", "bs3cret")
    proof = policy.group_proof(h, "ab" * 32, "0x" + "11" * 20)
    assert proof == policy.group_proof(h, "ab" * 32, "0x" + "11" * 20)
    assert proof != policy.group_proof(h, "cd" * 32, "0x" + "11" * 20)  # another session
    assert proof != policy.group_proof(h, "ab" * 32, "0x" + "22" * 20)  # another worker
    assert re.fullmatch("[0-9a-f]{64}", proof)  # an HMAC-SHA256, nothing of its inputs


@pytest.mark.parametrize(
    ("requirements", "expected"),
    [
        ({}, None),
        ({"runtime.wasm": "required"}, None),
        ({"wasm.simd": "required", "wasm.limit.fuel": "required"}, None),
        ({"opencl.gpu": "required"}, "requirement_unmet"),
        ({"wasm.simd": "forbidden"}, "requirement_unmet"),
        ({"opencl.gpu": "forbidden"}, None),
        ({"min_memory_bytes": 2**30}, None),
        ({"min_memory_bytes": 2**31}, "requirement_unmet"),
    ],
)
def test_requirements_are_tri_state(requirements: dict, expected: str | None) -> None:  # type: ignore[type-arg]
    assert (
        code(
            JobTerms("j", "0xo", "wasm", requirements=requirements), WorkerTerms(capabilities=CAPS)
        )
        == expected
    )


@pytest.mark.parametrize(
    "bad", [[], {"x": "maybe"}, {"x": True}, {"min_memory_bytes": -1}, {"min_memory_bytes": "1"}]
)
def test_bad_requirements_are_named(bad: object) -> None:
    with pytest.raises(ValueError):
        policy.validate_requirements(bad)


def test_minimum_wage() -> None:
    wage = Wage(cpu_hour=3600.0, mb_in=100.0)  # 1 credit per CPU-second, 100 per MB in
    cost = Metrics(cpu_seconds=0.5, bytes_in=1000)  # 0.5 + 0.1 credits
    assert wage.cost(cost) == pytest.approx(0.6)
    worker = WorkerTerms(min_wage=wage)
    assert code(JobTerms("j", "0xo", "wasm", offer=0.5, cost=cost), worker) == "wage_below_minimum"
    assert code(JobTerms("j", "0xo", "wasm", offer=0.7, cost=cost), worker) is None
    assert code(JobTerms("j", "0xo", "wasm", offer=0.0), worker) is None  # cost not measured yet
    declined = WorkerTerms(declined={"j": 0.5})
    assert code(JobTerms("j", "0xo", "wasm", offer=0.5), declined) == "wage_below_minimum"
    assert code(JobTerms("j", "0xo", "wasm", offer=0.6), declined) is None  # a raised offer


def test_allow_lists() -> None:
    worker = WorkerTerms(allowed_jobs=frozenset({"a"}))
    assert code(JobTerms("a", "0xo", "wasm"), worker) is None
    assert code(JobTerms("b", "0xo", "wasm"), worker) == "job_not_allowed"
    owners = WorkerTerms(allowed_owners=frozenset({"0xABC"}))
    assert code(JobTerms("b", "0xabc", "wasm"), owners) is None
    assert code(JobTerms("b", "0xdef", "wasm"), owners) == "owner_not_allowed"


def test_a_job_paused_by_the_worker_is_refused_whatever_it_offers() -> None:
    # A paused job used to be "declined" at the largest float offer: refused, but as
    # wage_below_minimum, in the scheduler's refusals and logs.
    worker = WorkerTerms(excluded_jobs=frozenset({"a"}))
    rich = JobTerms("a", "0xo", "wasm", offer=1e300)
    why = policy.refusal(rich, worker)
    assert why is not None and (why.code, why.message) == (
        "job_not_allowed",
        "paused by the worker's operator",
    )
    assert code(JobTerms("b", "0xo", "wasm"), worker) is None
    fetch = p.Fetch(id=1, max_slices=1, excluded_jobs=("a",))
    assert p.decode(p.encode(fetch), p.SCHEDULER_MESSAGES) == fetch
    with pytest.raises(p.InvalidMessage, match="excluded_jobs"):
        p.Fetch(id=1, max_slices=1, excluded_jobs=("j",) * 1025)


def test_jobs_need_their_runtime() -> None:
    wasm_only = WorkerTerms(capabilities={"runtimes": {"wasm": {}}})
    assert code(JobTerms("j", "0xo", "wasm"), wasm_only) is None
    assert code(JobTerms("j", "0xo", "opencl"), wasm_only) == "requirement_unmet"


def test_each_slice_is_checked_against_the_offered_terms() -> None:
    spec = p.JobSpec(job="j", runtime="opencl", module=b"", sha256="0" * 64, owner="0xo")
    lease = p.SliceLease("j", 0, "t", 1, 0.0, b"x" * 1000, offer=0.5)
    wasm_only = WorkerTerms(capabilities={"runtimes": {"wasm": {}}})
    why = policy.slice_refusal(spec, lease, wasm_only)
    assert why is not None and why.code == "requirement_unmet" and "opencl" in why.message
    opencl = WorkerTerms(capabilities={"runtimes": {"opencl": {}}})
    assert policy.slice_refusal(spec, lease, opencl) is None
    # A lease that names another job than the spec it came with.
    other = p.SliceLease("k", 0, "t", 1, 0.0, b"", offer=0.5)
    assert policy.slice_refusal(spec, other, opencl).code == "unknown_slice"  # type: ignore[union-attr]
    # Before any cost is measured, the datum's bytes in bound the price from below.
    dear = WorkerTerms(capabilities=opencl.capabilities, min_wage=Wage(mb_in=1000.0))
    why = policy.slice_refusal(spec, lease, dear)  # 0.001 MB at 1000 per MB: 1 credit > 0.5
    assert why is not None and why.code == "wage_below_minimum"
    fair = WorkerTerms(capabilities=opencl.capabilities, min_wage=Wage(mb_in=100.0))
    assert policy.slice_refusal(spec, lease, fair) is None
