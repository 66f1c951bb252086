"""Running jobs' verifiers: wasm functions that check one result, in sandboxed evaluators.

A verifier is a WASI command. Its stdin is the slice's datum immediately followed by the
result; ``argv[1]`` is the datum's length in bytes, then the job's own arguments. It exits 0
when the result is right. It runs in the same evaluator processes, with the same limits, as
work functions on workers.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
from dataclasses import dataclass

from dcp_worker.protocol import ErrorCode, JobSpec, Limits
from dcp_worker.sandbox import Sandbox, SliceFailure

log = logging.getLogger("dcp.scheduler.verifier")

#: What a verifier may use per result; a verifier should be far cheaper than the work.
VERIFIER_LIMITS = Limits(wall_seconds=10.0, memory_bytes=128 * 1024 * 1024, output_bytes=65536)


@dataclass(frozen=True)
class Verdict:
    """``ok``; or why not: ``result_rejected`` (the verifier said no, exit status != 0) or
    ``verifier_failed`` (it trapped, looped, ran out of memory, or is not valid wasm)."""

    ok: bool
    code: str = ""
    message: str = ""


class VerifierPool:
    """A few warm evaluator processes, lent to one verification at a time."""

    def __init__(self, size: int | None = None, limits: Limits = VERIFIER_LIMITS) -> None:
        self.size = size or max(1, (os.cpu_count() or 2) // 2)
        self.limits = limits
        self._idle: asyncio.Queue[Sandbox] | None = None
        self._all: list[Sandbox] = []

    async def verify(
        self, job: str, verifier: bytes, argv: tuple[str, ...], datum: bytes, result: bytes
    ) -> Verdict:
        if self._idle is None:
            self._idle = asyncio.Queue()
            for i in range(self.size):
                sandbox = Sandbox(1000 + i)
                self._all.append(sandbox)
                self._idle.put_nowait(sandbox)
        spec = JobSpec(
            job=f"verify:{job}",
            runtime="wasm",
            module=verifier,
            sha256=hashlib.sha256(verifier).hexdigest(),
            argv=(str(len(datum)), *argv),
        )
        sandbox = await self._idle.get()
        try:
            await sandbox.run(spec, self.limits, datum + result, 0)
        except SliceFailure as exc:
            if exc.code == ErrorCode.WASM_EXIT.value:
                return Verdict(
                    False,
                    ErrorCode.RESULT_REJECTED.value,
                    f"the job's verifier rejected the result ({exc.message})",
                )
            log.warning("verifier of job %s failed: %s", job, exc)
            return Verdict(
                False,
                ErrorCode.VERIFIER_FAILED.value,
                f"the job's verifier failed: {exc.code}: {exc.message}",
            )
        finally:
            self._idle.put_nowait(sandbox)
        return Verdict(True)

    async def close(self) -> None:
        for sandbox in self._all:
            await sandbox.stop()
