"""The owner's Python API, in the style of Dask's ``Client.map``::

    from scheduler.compute import Compute

    def work(x, power):
        return x ** int(power)

    with Compute("http://127.0.0.1:8500", identity) as c:
        job = c.map(work, range(100), "2", offer=0.001)
        print(job.results())          # [0, 1, 4, 9, ...], in slice order

``work`` runs on volunteers' machines in the ``python`` runtime (CPython 3.12 for WASI, in the
wasm sandbox: docs/sandbox.md). What is sent is the function's own source
(``inspect.getsource``), not its module: import inside the function what it uses (the
standard library only), and define there the helpers it calls; or pass the source text of a
whole module that defines ``work`` (``runtime="js"`` for JavaScript). Each input is one slice;
inputs are JSON values (numbers, strings, lists, dicts...) or, all of them, bytes. Results are
JSON values, decoded (``result="json"``), or bytes (``result="bytes"``), by default the kind of
the inputs; the interpreter holds the work function to what the job says, so a result is
never guessed at (bytes that happened to be JSON text once came back as a number).
"""

from __future__ import annotations

import base64
import functools
import inspect
import json
import sys
import textwrap
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec

from dcp_keys.identity import Identity
from dcp_protocol import DcpError, nesting

from .client import ComputeClient
from .jobdoc import SOURCE_RUNTIMES, job_document, parse_document


class JobFailed(DcpError):
    """Some slices of a job failed (after their attempts); ``failures`` maps each to its
    error (e.g. ``work_function_error: Traceback ...``)."""

    def __init__(self, job: str, failures: dict[int, str]) -> None:
        first = min(failures)
        super().__init__(
            f"job {job}: {len(failures)} slice(s) failed; slice {first}: {failures[first]}"
        )
        self.job = job
        self.failures = failures


@dataclass(frozen=True)
class FailedSlice:
    """In place of a result when ``results(errors="return")``: why the slice failed."""

    slice: int
    error: str


def work_source(work: Callable[..., Any] | str, runtime: str = "python", bind: str = "work") -> str:
    """The source text to send for ``work``: a string as it is; a Python function's own
    source, dedented, with ``bind`` (``work``, or ``compare`` for a comparison function)
    bound to it when it has another name.

    Raises:
        ValueError: a function for ``js``, or one whose source cannot be read (a lambda, a
            builtin, a function typed at the interactive prompt).
    """
    if isinstance(work, str):
        return work
    if runtime != "python":
        raise ValueError(f"a {runtime} work function is given as source text, not a function")
    if getattr(work, "__name__", "") == "<lambda>":
        raise ValueError("a lambda has no source of its own to send: define a function")
    try:
        source = textwrap.dedent(inspect.getsource(work))
    except (OSError, TypeError) as exc:
        raise ValueError(f"cannot read the source of {work!r}: {exc}") from None
    if work.__name__ != bind:
        source += f"\n\n{bind} = {work.__name__}\n"
    return source


class Job:
    """A deployed job: its results in slice order, its status, cancel."""

    def __init__(self, compute: Compute, job: str, total: int, result: str = "json") -> None:
        self._compute = compute
        self.id = job
        self.total = total
        #: What the work function returns: "json" values (decoded here) or "bytes".
        self.result_kind = result

    def __repr__(self) -> str:
        return f"<Job {self.id} of {self.total} slices>"

    def status(self) -> dict[str, Any]:
        return self._compute.client.status(self.id)

    def cancel(self) -> int:
        return self._compute.client.cancel(self.id)

    def results(
        self,
        timeout: float | None = None,
        errors: str = "raise",
        progress: bool | None = None,
    ) -> list[Any]:
        """Every slice's result in slice order, once all are final (waits; ``timeout``
        seconds at most, then :class:`scheduler.client.WaitTimeout`). ``errors="raise"``:
        :class:`JobFailed` if a slice failed; ``"return"``: a :class:`FailedSlice` in its
        place. ``progress``: a ``job J: N/T`` line on stderr (default: when it is a
        terminal)."""
        if errors not in ("raise", "return"):
            raise ValueError("errors is 'raise' or 'return'")
        show = sys.stderr.isatty() if progress is None else progress
        out: list[Any] = [None] * self.total
        failures: dict[int, str] = {}
        seen = 0
        for r in self._compute.client.results(self.id, wait=True, timeout=timeout):
            seen += 1
            if r.result is None:
                why = r.error or {}
                failures[r.slice] = f"{why.get('code', r.state)}: {why.get('message', '')}"
                out[r.slice] = FailedSlice(r.slice, failures[r.slice])
            elif self.result_kind == "bytes":
                out[r.slice] = r.result
            else:
                try:
                    out[r.slice] = nesting.loads(r.result)
                except ValueError as exc:  # the interpreter lets no other through
                    failures[r.slice] = f"result_not_json: {exc}"
                    out[r.slice] = FailedSlice(r.slice, failures[r.slice])
            if show:
                sys.stderr.write(f"\r\x1b[Kjob {self.id}: {seen}/{self.total} slices final")
                sys.stderr.flush()
        if show:
            sys.stderr.write("\n")
        if failures and errors == "raise":
            raise JobFailed(self.id, failures)
        return out


def _policy(redundancy: dict[str, Any], runtime: str) -> dict[str, Any]:
    """``map``'s redundancy as the job document's: the comparison function's source in
    base64 (of ``runtime``), known results in base64 by slice index."""
    policy = dict(redundancy)
    compare = policy.pop("compare", None)
    if compare is not None:
        source = work_source(compare, runtime, bind="compare")
        policy["compare"] = base64.b64encode(source.encode()).decode()
        policy["compare_runtime"] = runtime
    known = policy.pop("known", None)
    if known is not None:
        policy["known"] = {str(i): base64.b64encode(bytes(v)).decode() for i, v in known.items()}
    return policy


class Compute:
    """An owner's connection to a scheduler (or its replicas), for :meth:`map`."""

    def __init__(
        self, scheduler: str | Sequence[str], identity: Identity, timeout: float = 30.0
    ) -> None:
        self.identity = identity
        self.client = ComputeClient(scheduler, identity, timeout=timeout)

    def __enter__(self) -> Compute:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.client.close()

    def map(
        self,
        work: Callable[..., Any] | str,
        inputs: Iterable[Any],
        *args: str,
        runtime: str = "python",
        offer: float = 0.0,
        requirements: dict[str, Any] | None = None,
        limits: dict[str, Any] | None = None,
        name: str | None = None,
        group: str = "",
        max_attempts: int = 2,
        interpreter: str = "warm",
        result: str | None = None,
        redundancy: dict[str, Any] | None = None,
    ) -> Job:
        """Deploy one slice per input of ``work(input, *args)``; the job. ``interpreter``:
        ``warm`` (the job's slices share one interpreter per sandbox) or ``fresh`` (one per
        slice: no state from one slice reaches the next). ``result``: what ``work`` returns,
        ``json`` values (:meth:`Job.results` decodes them) or ``bytes`` (given as they
        are); by default the kind of the inputs. A slice whose work function returns the
        other kind fails with ``work_function_error``. ``redundancy``: trust without a
        verifier, as a job file's ``[redundancy]`` (``quorum``, ``max_replicas``,
        ``adaptive``, ``spot_check_rate``, ``distinct_networks``), with ``compare`` a
        function (or source) of ``runtime`` deciding whether two results agree, and
        ``known`` a mapping of slice index to its right result (bytes).

        Raises:
            ValueError: the work function's source cannot be read, or inputs mix bytes
                and values, or a value has no JSON form.
            JobFileError: the scheduler's own checks, made here first (every fault).
            ComputeError: the scheduler refused it (e.g. insufficient_funds).
        """
        if runtime not in SOURCE_RUNTIMES:
            raise ValueError(f"map runs python or js work functions, not {runtime!r}")
        if result not in (None, "json", "bytes"):
            raise ValueError(f"result is 'json' or 'bytes', not {result!r}")
        source = work_source(work, runtime)
        items = list(inputs)
        raw = [isinstance(x, (bytes, bytearray)) for x in items]
        if any(raw) and not all(raw):
            raise ValueError("inputs are all bytes or all JSON values, not a mix")
        kind = "bytes" if items and all(raw) else "json"
        result = result or kind
        try:
            data = [
                bytes(x) if kind == "bytes" else json.dumps(x, allow_nan=False).encode()
                for x in items
            ]
        except (TypeError, ValueError) as exc:
            raise ValueError(f"an input has no JSON form: {exc}") from None
        fallback = getattr(work, "__name__", "work") if not isinstance(work, str) else "work"
        policy = None if redundancy is None else _policy(redundancy, runtime)
        parts = functools.partial(
            job_document,
            name=name or fallback,
            runtime=runtime,
            module=source.encode(),
            argv=[str(a) for a in args],
            offer=offer,
            limits=limits or {},
            max_attempts=max_attempts,
            group=group,
            requirements={f"runtime.{runtime}": "required", **(requirements or {})},
            config={"datum": kind, "interpreter": interpreter, "result": result},
            data=data,
            redundancy=policy,
        )
        # The scheduler's checks, every fault, here, before any request.
        body = msgspec.msgpack.encode(parts(binary=True))
        parse_document(body, self.identity.address, binary=True)
        binary = self.client.reads_msgpack()  # the inputs as they are, where it reads them
        if not binary:  # an older scheduler: the same parts as a JSON document
            body = json.dumps(parts(), separators=(",", ":")).encode()
        return Job(self, self.client.deploy_document(body, binary=binary), len(data), result)
