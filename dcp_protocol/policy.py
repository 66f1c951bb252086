"""Who may run what, at what price: the policy the scheduler applies when it leases, and the
worker applies again before it runs anything (it never trusts the scheduler alone).

Both sides call :func:`refusal` with what they know; a refusal carries an ErrorCode value:

* compute groups: ``group_not_joined`` (the job's group is not one the worker joined, or the
  job is public and the worker left the public group);
* allow-lists: ``job_not_allowed``, ``owner_not_allowed``;
* requirements: ``requirement_unmet`` (tri-state: required / forbidden / don't care, plus
  ``min_memory_bytes``);
* minimum wage: ``wage_below_minimum`` (the job's measured cost per slice at the worker's
  wage is above its offer, or the worker declined the job at this offer);
* runtime: ``requirement_unmet`` when the job's runtime is not one the worker offered.

The worker checks every leased slice with :func:`slice_refusal` against the terms it offered
in the fetch that leased it (a scheduler may lie about what it was asked for): the job's
runtime, requirements, group and owner, the worker's allow-lists and minimum wage (which the
slice's own datum already bounds from below, before any cost is measured).

Group membership is proven without the secret crossing the wire: the scheduler stores
``join_hash(key, secret)``; the worker sends ``group_proof(join_hash, challenge, address)``,
an HMAC bound to the session's fresh challenge and the worker's address (not replayable on
another session or by another worker). Knowing the join hash is enough to compute proofs, as
with DCP's ``eh1-`` hashes: it is a credential, and the scheduler keeps only it.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import ErrorCode
from .messages import JobSpec, Metrics, Refusal, SliceLease, Wage

__all__ = [
    "PUBLIC_GROUP",
    "REQUIRED",
    "FORBIDDEN",
    "JobTerms",
    "WorkerTerms",
    "join_hash",
    "group_proof",
    "capability_flags",
    "check_requirements",
    "validate_requirements",
    "refusal",
    "slice_refusal",
]

PUBLIC_GROUP = ""
REQUIRED = "required"
FORBIDDEN = "forbidden"
_NUMERIC_REQUIREMENTS = {
    "min_memory_bytes": "memory_bytes",
    "min_device_memory": "opencl_memory_bytes",
}


def _field(value: bytes) -> bytes:
    return struct.pack(">I", len(value)) + value


def join_hash(join_key: str, join_secret: str) -> str:
    """The hash a scheduler stores for a group (64 hex digits)."""
    data = _field(b"dcp-group-v1") + _field(join_key.encode()) + _field(join_secret.encode())
    return hashlib.sha256(data).hexdigest()


def group_proof(join_hash_hex: str, challenge: str, address: str) -> str:
    """Proof of membership for one session: HMAC-SHA256 keyed by the join hash."""
    message = (
        _field(b"dcp-group-proof-v1")
        + _field(challenge.encode())
        + _field(address.lower().encode())
    )
    return hmac.new(bytes.fromhex(join_hash_hex), message, hashlib.sha256).hexdigest()


def capability_flags(capabilities: Mapping[str, Any]) -> frozenset[str]:
    """Named capabilities from an evaluator's description, e.g. ``runtime.wasm``,
    ``wasm.simd``, ``wasm.limit.fuel``; later ``opencl.gpu``, ``opencl.fp64``."""
    flags = set()
    runtimes = capabilities.get("runtimes", {})
    if isinstance(runtimes, Mapping):
        for runtime, info in runtimes.items():
            flags.add(f"runtime.{runtime}")
            if isinstance(info, Mapping):
                for feature in info.get("features", []) or []:
                    flags.add(f"{runtime}.{feature}")
                for limit in info.get("limits", []) or []:
                    flags.add(f"{runtime}.limit.{limit}")
    extra = capabilities.get("flags", [])
    if isinstance(extra, list):
        flags.update(str(f) for f in extra)
    return frozenset(flags)


def validate_requirements(requirements: Any) -> dict[str, Any]:
    """Check a job's requirements table.

    Raises:
        ValueError: naming the entry at fault.
    """
    if not isinstance(requirements, dict):
        raise ValueError("requirements must be a table")
    for name, want in requirements.items():
        if name in _NUMERIC_REQUIREMENTS:
            if isinstance(want, bool) or not isinstance(want, int) or want < 0:
                raise ValueError(f"requirements.{name} must be an integer >= 0")
        elif want not in (REQUIRED, FORBIDDEN):
            raise ValueError(
                f"requirements.{name} must be {REQUIRED!r} or {FORBIDDEN!r} "
                "(leave a capability out for don't care)"
            )
    return requirements


def check_requirements(
    requirements: Mapping[str, Any], capabilities: Mapping[str, Any]
) -> str | None:
    """None when ``capabilities`` meet ``requirements``; otherwise what is missing."""
    flags = capability_flags(capabilities)
    for name, want in sorted(requirements.items()):
        if name in _NUMERIC_REQUIREMENTS:
            have = capabilities.get(_NUMERIC_REQUIREMENTS[name], 0)
            if not isinstance(have, (int, float)) or have < want:
                return f"{name} {want} not met (have {have})"
        elif want == REQUIRED and name not in flags:
            return f"requires {name}"
        elif want == FORBIDDEN and name in flags:
            return f"forbids {name}"
    return None


@dataclass(frozen=True)
class JobTerms:
    """What a job asks and offers. ``cost`` is its measured mean cost per slice, if known.

    ``runtime`` has no default: a caller that forgot it would match an OpenCL job against a
    worker that offers only wasm (as the worker's re-check once did).
    """

    job: str
    owner: str
    runtime: str
    group: str = PUBLIC_GROUP
    requirements: Mapping[str, Any] = field(default_factory=dict)
    offer: float = 0.0
    cost: Metrics | None = None


@dataclass(frozen=True)
class WorkerTerms:
    """What a worker agreed to."""

    groups: frozenset[str] = frozenset()
    leave_public_group: bool = False
    capabilities: Mapping[str, Any] = field(default_factory=dict)
    min_wage: Wage = field(default_factory=Wage)
    allowed_jobs: frozenset[str] = frozenset()
    allowed_owners: frozenset[str] = frozenset()
    #: Jobs the worker takes no new work from (its volunteer paused them), whatever they offer.
    excluded_jobs: frozenset[str] = frozenset()
    #: job -> the highest offer at which the worker declined it.
    declined: Mapping[str, float] = field(default_factory=dict)


def refusal(job: JobTerms, worker: WorkerTerms) -> Refusal | None:
    """Why ``worker`` must not run ``job``, or None when it may."""
    if worker.allowed_jobs and job.job not in worker.allowed_jobs:
        return Refusal(job.job, ErrorCode.JOB_NOT_ALLOWED.value, "not in the worker's job list")
    if job.job in worker.excluded_jobs:
        return Refusal(job.job, ErrorCode.JOB_NOT_ALLOWED.value, "paused by the worker's operator")
    if worker.allowed_owners and job.owner.lower() not in {
        o.lower() for o in worker.allowed_owners
    }:
        return Refusal(
            job.job, ErrorCode.OWNER_NOT_ALLOWED.value, f"owner {job.owner} is not allowed"
        )
    if job.group == PUBLIC_GROUP:
        if worker.leave_public_group:
            return Refusal(
                job.job, ErrorCode.GROUP_NOT_JOINED.value, "the worker left the public group"
            )
    elif job.group not in worker.groups:
        return Refusal(
            job.job, ErrorCode.GROUP_NOT_JOINED.value, f"compute group {job.group} not joined"
        )
    runtimes = worker.capabilities.get("runtimes")
    if isinstance(runtimes, Mapping) and job.runtime not in runtimes:
        return Refusal(
            job.job,
            ErrorCode.REQUIREMENT_UNMET.value,
            f"no {job.runtime} runtime here (or its time budget is used)",
        )
    missing = check_requirements(job.requirements, worker.capabilities)
    if missing is not None:
        return Refusal(job.job, ErrorCode.REQUIREMENT_UNMET.value, missing)
    declined_at = worker.declined.get(job.job)
    if declined_at is not None and job.offer <= declined_at:
        return Refusal(
            job.job,
            ErrorCode.WAGE_BELOW_MINIMUM.value,
            f"declined at an offer of {declined_at:g} credits per slice",
        )
    if job.cost is not None:
        price = worker.min_wage.cost(job.cost)
        if math.isfinite(price) and price > job.offer:
            return Refusal(
                job.job,
                ErrorCode.WAGE_BELOW_MINIMUM.value,
                f"offers {job.offer:g} credits per slice; a slice costs {price:.6g} at this "
                "worker's minimum wage",
            )
    return None


def slice_refusal(
    spec: JobSpec, lease: SliceLease, offered: WorkerTerms, cost: Metrics | None = None
) -> Refusal | None:
    """Why the worker must not run ``lease`` (a slice of ``spec``) under the terms it
    ``offered``, or None when it may. ``cost`` is the job's mean cost per slice as the worker
    measured it; the slice's datum bounds it from below (its bytes in) even before that."""
    if lease.job != spec.job:
        return Refusal(
            lease.job,
            ErrorCode.UNKNOWN_SLICE.value,
            f"the lease names job {lease.job}, not {spec.job}",
        )
    job = JobTerms(
        job=spec.job,
        owner=spec.owner,
        runtime=spec.runtime,
        group=spec.group,
        requirements=spec.requirements,
        offer=lease.offer,
        cost=cost,
    )
    why = refusal(job, offered)
    if why is not None:
        return why
    floor = offered.min_wage.cost(Metrics(bytes_in=len(lease.datum)))
    if floor > lease.offer:
        return Refusal(
            spec.job,
            ErrorCode.WAGE_BELOW_MINIMUM.value,
            f"offers {lease.offer:g} credits for the slice; its {len(lease.datum)} bytes in "
            f"alone cost {floor:.6g} at this worker's minimum wage",
        )
    return None
