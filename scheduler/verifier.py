"""Running jobs' verifiers (functions that check one result) and comparison functions
(that say whether two results of one slice agree), in sandboxed evaluators.

A wasm verifier is a WASI command. Its stdin is the slice's datum immediately followed by the
result; ``argv[1]`` is the datum's length in bytes, then the job's own arguments. It exits 0
when the result is right. A Python or JavaScript verifier is source defining
``verify(datum, result, *args)`` (``function verify(datum, result, ...args)``), both bytes
(``Uint8Array``), returning True when the result is right (anything else rejects it; an
exception is the verifier failing). Verifiers run in the same evaluator processes, with the
same limits, as work functions on workers.

A comparison function (a replicated job's ``compare``, scheduler/quorum.py) is called the same
way with the datum and two results: a wasm command reads datum, first and second result from
stdin with ``argv[1]`` and ``argv[2]`` the lengths of the first two and exits 0 when they agree;
Python or JavaScript source defines ``compare(datum, a, b)`` and returns True when they agree.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
from collections import Counter, OrderedDict, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from dcp_protocol import ErrorCode, JobSpec, Limits
from evaluator.client import Sandbox, SliceFailure

log = logging.getLogger("dcp.scheduler.verifier")

#: What a verifier may use per result; a verifier should be far cheaper than the work.
VERIFIER_LIMITS = Limits(wall_seconds=10.0, memory_bytes=128 * 1024 * 1024, output_bytes=65536)


#: What a JS verifier or comparison function said, as the adapters answer it: b"1" for true
#: only; an async one's (a promise) once it settles (the JS bootstrap waits for it).
_JS_SAID = (
    "function _said(v) {\n"
    "  if (v !== null && typeof v === 'object' && typeof v.then === 'function')\n"
    "    return Promise.resolve(v).then(_said);\n"
    "  return Uint8Array.of(v === true ? 49 : 48);\n}\n"
)

#: Appended to a Python or JS verifier's source: the interpreter runtimes call ``work``.
_ADAPTERS = {
    "python": (
        "\n\ndef work(_both, _n, *args):\n"
        "    _n = int(_n)\n"
        "    return b'1' if verify(bytes(_both[:_n]), bytes(_both[_n:]), *args) is True"
        " else b'0'\n"
    ),
    "js": (
        "\n;function work(both, n, ...args) {\n"
        "  n = parseInt(n, 10);\n"
        "  return _said(verify(both.subarray(0, n), both.subarray(n), ...args));\n}\n" + _JS_SAID
    ),
}


_COMPARE_ADAPTERS = {
    "python": (
        "\n\ndef work(_all, _n, _m, *args):\n"
        "    _n, _m = int(_n), int(_m)\n"
        "    _d, _a, _b = bytes(_all[:_n]), bytes(_all[_n:_n + _m]), bytes(_all[_n + _m:])\n"
        "    return b'1' if compare(_d, _a, _b, *args) is True else b'0'\n"
    ),
    "js": (
        "\n;function work(all, n, m, ...args) {\n"
        "  n = parseInt(n, 10); m = parseInt(m, 10);\n"
        "  return _said(compare(all.subarray(0, n), all.subarray(n, n + m),"
        " all.subarray(n + m), ...args));\n}\n" + _JS_SAID
    ),
}


def verifier_spec(
    job: str,
    runtime: str,
    verifier: bytes,
    argv: tuple[str, ...],
    n: int,
    first: int | None = None,
) -> JobSpec:
    """The JobSpec that runs ``verifier`` on a datum of ``n`` bytes followed by a result; with
    ``first`` (the length of a first result), a comparison function on a datum and two."""
    module, config = verifier, {}
    lengths = (str(n),) if first is None else (str(n), str(first))
    if runtime != "wasm":  # source, with the adapter the interpreter runtimes call
        adapter = (_ADAPTERS if first is None else _COMPARE_ADAPTERS)[runtime]
        module = verifier + adapter.encode()
        config = {"datum": "bytes", "interpreter": "warm"}
    return JobSpec(
        job=f"{'verify' if first is None else 'compare'}:{job}",
        runtime=runtime,
        module=module,
        sha256=hashlib.sha256(module).hexdigest(),
        argv=(*lengths, *argv),
        config=config,
    )


@dataclass(frozen=True)
class Verdict:
    """``ok``; or why not: ``result_rejected`` (the verifier said no, exit status != 0) or
    ``verifier_failed`` (it trapped, looped, ran out of memory, or is not valid wasm)."""

    ok: bool
    code: str = ""
    message: str = ""


@dataclass(frozen=True)
class VerifierStatistics:
    """A snapshot of the pool: verifier runs started since it was made, runs now in progress,
    and verifications waiting for a sandbox."""

    runs: int
    running: int
    waiting: int


class VerifierPool:
    """A few warm evaluator processes, lent to one verification at a time.

    Sandboxes are lent fairly: each owner (a worker session) has at most ``per_owner``
    verifications running, and a free sandbox goes to the waiting owner served least
    recently, so one session's queue of results never delays another session's by more than
    one run per sandbox.
    """

    def __init__(
        self, size: int | None = None, limits: Limits = VERIFIER_LIMITS, per_owner: int = 2
    ) -> None:
        self.size = size or max(1, (os.cpu_count() or 2) // 2)
        self.limits = limits
        self.per_owner = max(1, per_owner)
        self._idle: list[Sandbox] | None = None
        self._all: list[Sandbox] = []
        self._running: Counter[str] = Counter()
        self._waiting: dict[str, deque[asyncio.Future[Sandbox]]] = {}
        #: Owners with running or waiting verifications, least recently served first.
        self._turns: OrderedDict[str, None] = OrderedDict()
        self._runs = 0

    def statistics(self) -> VerifierStatistics:
        return VerifierStatistics(
            runs=self._runs,
            running=sum(self._running.values()),
            waiting=sum(len(q) for q in self._waiting.values()),
        )

    async def verify(
        self,
        job: str,
        verifier: bytes,
        argv: tuple[str, ...],
        datum: bytes,
        result: bytes,
        owner: str = "",
        started: Callable[[], Awaitable[object]] | None = None,
        runtime: str = "wasm",
    ) -> Verdict:
        """Run ``verifier`` (of ``runtime``: wasm, python or js) on one result once ``owner``
        has its turn at a sandbox.

        ``started`` is awaited when the sandbox is lent, before the run: an exception from it
        ends the verification unrun (the result's lease went stale while it waited).
        """
        spec = verifier_spec(job, runtime, verifier, argv, len(datum))
        return await self._judge(spec, datum + result, owner, started, "verifier", "verify")

    async def compare(
        self,
        job: str,
        compare: bytes,
        argv: tuple[str, ...],
        datum: bytes,
        first: bytes,
        second: bytes,
        owner: str = "",
        runtime: str = "wasm",
    ) -> Verdict:
        """Whether the job's comparison function says ``first`` and ``second`` agree (``ok``),
        in a sandbox once ``owner`` has its turn; one that fails says they do not
        (``verifier_failed``, logged)."""
        spec = verifier_spec(job, runtime, compare, argv, len(datum), len(first))
        return await self._judge(
            spec, datum + first + second, owner, None, "comparison function", "compare"
        )

    async def _judge(
        self,
        spec: JobSpec,
        stdin: bytes,
        owner: str,
        started: Callable[[], Awaitable[object]] | None,
        what: str,
        function: str,
    ) -> Verdict:
        """Run a verifier or comparison function once ``owner`` has its turn: a wasm command
        says yes by exiting 0, source by returning True (the adapters' ``b"1"``)."""
        sandbox = await self._acquire(owner)
        try:
            if started is not None:
                await started()
            self._runs += 1
            said = (await sandbox.run(spec, self.limits, stdin, 0)).result
            if spec.runtime != "wasm" and said != b"1":
                return Verdict(
                    False,
                    ErrorCode.RESULT_REJECTED.value,
                    f"the job's {what} said no ({function} returned no True)",
                )
        except SliceFailure as exc:
            if exc.code == ErrorCode.WASM_EXIT.value and spec.runtime == "wasm":
                return Verdict(
                    False,
                    ErrorCode.RESULT_REJECTED.value,
                    f"the job's {what} said no ({exc.message})",
                )
            log.warning("%s of job %s failed: %s", what, spec.job, exc)
            return Verdict(
                False,
                ErrorCode.VERIFIER_FAILED.value,
                f"the job's {what} failed: {exc.code}: {exc.message}",
            )
        finally:
            self._release(owner, sandbox)
        return Verdict(True)

    async def _acquire(self, owner: str) -> Sandbox:
        if self._idle is None:
            self._idle = []
            for i in range(self.size):
                sandbox = Sandbox(1000 + i)
                self._all.append(sandbox)
                self._idle.append(sandbox)
        if owner not in self._turns:
            self._turns[owner] = None
            self._turns.move_to_end(owner, last=False)  # never served: first in turn
        if self._idle and self._running[owner] < self.per_owner and not self._waiting.get(owner):
            return self._lend(owner, self._idle.pop())
        waiter: asyncio.Future[Sandbox] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(owner, deque()).append(waiter)
        try:
            return await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self._release(owner, waiter.result())  # lent, but its taker is gone
            else:
                queue = self._waiting.get(owner)
                if queue is not None and waiter in queue:
                    queue.remove(waiter)
                    if not queue:
                        del self._waiting[owner]
                self._forget(owner)
            raise

    def _lend(self, owner: str, sandbox: Sandbox) -> Sandbox:
        self._running[owner] += 1
        self._turns.move_to_end(owner)
        return sandbox

    def _release(self, owner: str, sandbox: Sandbox) -> None:
        assert self._idle is not None
        self._running[owner] -= 1
        if self._running[owner] <= 0:
            del self._running[owner]
        self._idle.append(sandbox)
        self._forget(owner)
        # Hand free sandboxes to waiting owners, least recently served first.
        while self._idle:
            taker = next(
                (
                    o
                    for o in self._turns
                    if self._waiting.get(o) and self._running[o] < self.per_owner
                ),
                None,
            )
            if taker is None:
                return
            queue = self._waiting[taker]
            waiter = queue.popleft()
            if not queue:
                del self._waiting[taker]
            if waiter.done():  # cancelled; its task has not yet run to take itself out
                self._forget(taker)
                continue
            waiter.set_result(self._lend(taker, self._idle.pop()))

    def _forget(self, owner: str) -> None:
        if owner in self._turns and not self._running[owner] and not self._waiting.get(owner):
            del self._turns[owner]
            self._running.pop(owner, None)

    async def close(self) -> None:
        for sandbox in self._all:
            await sandbox.stop()
