"""The job specs that sessions hand out with leases, from a small cache over the store.

Every worker's first fetch of a job needs its spec, module included, and reading it from the
store each time (a blob and a record) showed as the whole profile with 1,000 workers. None of
it changes after the deploy, so an entry never goes stale; the cache only bounds its size.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from dcp_protocol import JobSpec

from .store.pool import StorePool

__all__ = ["CACHED_JOBS", "JobInfo", "JobSpecs"]

#: Jobs whose spec is kept; the least recently used goes first.
CACHED_JOBS = 64


@dataclass(frozen=True)
class JobInfo:
    """What sessions and acceptance need of a job, read once: its spec for ``work`` frames,
    whether its results go through a verifier, and whether its replicas' votes are compared
    by the job's own comparison function."""

    spec: JobSpec
    has_verifier: bool
    has_compare: bool = False


class JobSpecs:
    """The most recently used jobs' :class:`JobInfo`, read from the store on a miss."""

    def __init__(self, db: StorePool) -> None:
        self.db = db
        self._jobs: OrderedDict[str, JobInfo] = OrderedDict()

    async def get(self, job_id: str) -> JobInfo:
        """The job's info.

        Raises:
            UnknownJob: no such job (a StoreError).
        """
        info = self._jobs.get(job_id)
        if info is not None:
            self._jobs.move_to_end(job_id)
            return info
        record, module = await self.db.run(
            lambda s: (s.job(job_id, counts=False), s.job_module(job_id))
        )
        spec = JobSpec(
            job=job_id,
            runtime=record.runtime,
            module=module,
            sha256=record.module_sha256,
            argv=record.argv,
            limits=record.limits,
            name=record.name,
            owner=record.owner,
            group=record.group,
            requirements=record.requirements,
            config=record.config,
        )
        info = self._jobs[job_id] = JobInfo(spec, record.has_verifier, record.has_compare)
        if len(self._jobs) > CACHED_JOBS:
            self._jobs.popitem(last=False)
        return info
