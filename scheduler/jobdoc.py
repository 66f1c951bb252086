"""Job files (TOML, for people) and job documents (JSON, on the wire).

A job file names a runtime, a module path, argv, an offer, limits and inputs; the compute
client turns it into a job document: the exact bytes it signs and sends. The scheduler parses
the document with :func:`parse_document`; both sides share the checks below, and both report
every problem at once (a job file's as ``FILE:LINE: message``).
"""

from __future__ import annotations

import base64
import binascii
import difflib
import functools
import hashlib
import json
import math
import os
import re
import time
import tomllib
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import msgspec
import wasmtime

from dcp_protocol import (
    SCHEDULER_MESSAGES,
    DcpError,
    InvalidMessage,
    JobSpec,
    Limits,
    ProtocolError,
    SliceLease,
    Work,
    decode,
    encode,
    from_wire,
    nesting,
)
from dcp_protocol.opencl_config import validate_config
from dcp_protocol.policy import validate_requirements

from .quorum import MAX_QUORUM, MAX_REPLICAS, Redundancy
from .store import NewJob, to_micro

__all__ = [
    "JobFileError",
    "job_document",
    "load_job_file",
    "parse_document",
    "RUNTIMES",
    "MAX_SLICES",
    "MAX_JOB_NESTING",
]

RUNTIMES = ("wasm", "opencl", "python", "js")
#: The runtimes whose work function is source text run by an interpreter (evaluator/
#: interpreters.py), whose datum is a JSON value (``values``) or bytes (``file`` lines).
SOURCE_RUNTIMES = ("python", "js")
#: A verifier's runtime by its file's suffix (anything else: a wasm module).
VERIFIER_RUNTIME_OF = {".py": "python", ".js": "js"}
#: A work function's source text, at most (the module of a wasm job has the frame's bound).
MAX_SOURCE_BYTES = 1 << 20
#: Job files and documents nest at most half as deep as a frame may: the frames that carry a
#: job's parts (work, assign) add a few levels of their own around them.
MAX_JOB_NESTING = nesting.MAX_NESTING // 2
MAX_SLICES = 1_000_000
MAX_ATTEMPTS = 10
_JOB_KEYS = (
    "name",
    "runtime",
    "module",
    "argv",
    "offer",
    "limits",
    "inputs",
    "max_attempts",
    "group",
    "requirements",
    "verifier",
    "opencl",
    "interpreter",
    "result",
    "redundancy",
)
_DOCUMENT_KEYS = (
    "name",
    "runtime",
    "module",
    "argv",
    "offer",
    "limits",
    "max_attempts",
    "data",
    "nonce",
    "created",
    "group",
    "requirements",
    "verifier",
    "verifier_runtime",
    "config",
    "redundancy",
)
#: A document's field -> the job file's key it comes from, where they differ.
_FILE_KEY = {"config": "opencl", "data": "inputs"}
_LIMIT_KEYS = ("wall_seconds", "memory_bytes", "output_bytes", "fuel")
#: The largest offer per slice, in credits (keeps escrow arithmetic far from overflow).
MAX_OFFER = 1e9
_INPUT_KEYS = ("file", "values")
#: A job file's [redundancy] table; the document's also has compare_runtime (the file's
#: comparison function's runtime comes from its suffix).
_REDUNDANCY_FILE_KEYS = (
    "quorum",
    "max_replicas",
    "adaptive",
    "spot_check_rate",
    "distinct_networks",
    "compare",
    "known",
)
_REDUNDANCY_KEYS = (*_REDUNDANCY_FILE_KEYS, "compare_runtime")
#: A WebAssembly binary module starts with its magic and version 1 (little endian).
_WASM_MAGIC = b"\0asm"
_WASM_VERSION = b"\x01\x00\x00\x00"

#: (key at fault or "" for the whole, message): the key is a document field, or a job file's
#: key (``limits.fuel``) when the problem is the file's.
_Problem = tuple[str, str]


class JobFileError(DcpError, ValueError):
    """The job file or document is wrong: ``problems`` holds every fault found, each naming
    its key (and, for a file, ``FILE:LINE``); ``str()`` is them one per line."""

    def __init__(self, problems: str | Sequence[str]) -> None:
        self.problems = (problems,) if isinstance(problems, str) else tuple(problems)
        super().__init__("\n".join(self.problems))


def _suggest(key: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.75)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _unknown(keys: Iterable[str], known: Sequence[str], prefix: str = "") -> list[_Problem]:
    return [
        (prefix + key, f"unknown key {prefix + key!r}" + _suggest(key, known))
        for key in sorted(set(keys) - set(known))
    ]


def _line_of(text: str, key: str) -> int | None:
    """The line where a job file's ``key`` first appears: a top-level key (``key = ...``,
    ``key.x = ...``), its table (``[key]``), or ``table.key``: ``key = ...`` inside
    ``[table]``, or a dotted ``table.key = ...`` at the top."""
    table, _, sub = key.partition(".")
    name = r"""["']?{}["']?"""
    top = re.compile(
        rf"^\s*(?:{name.format(re.escape(table))}\s*[=.]|\[\s*"
        rf"{name.format(re.escape(table))}\s*\])"
    )
    dotted = re.compile(
        rf"^\s*{name.format(re.escape(table))}\s*\.\s*{name.format(re.escape(sub))}\s*="
    )
    inner = re.compile(rf"^\s*{name.format(re.escape(sub))}\s*=")
    current = ""  # the table the line is in; "" at the top
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.lstrip()
        header = re.match(r"\[\s*([^\]]+?)\s*\]", stripped)
        if header:
            current = header.group(1).strip("\"'")
            if not sub and top.match(line):
                return number
            continue
        if not sub and current == "" and top.match(line):
            return number
        if sub and current == "" and dotted.match(line):
            return number
        if sub and current == table and inner.match(line):
            return number
    if sub:
        return _line_of(text, table)
    return None


def _check_wasm(module: bytes, what: str) -> str | None:
    """Why ``module`` is not a WebAssembly module a worker can compile, or None."""
    if not module.startswith(_WASM_MAGIC):
        return f"{what} is not a WebAssembly module (it does not start with \\0asm)"
    if module[4:8] != _WASM_VERSION:
        return f"{what} is not a WebAssembly version 1 module (version bytes {module[4:8]!r})"
    try:
        wasmtime.Module.validate(_engine(), module)
    except wasmtime.WasmtimeError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "invalid"
        return f"{what} is not valid WebAssembly: {first}"
    return None


@functools.cache
def _engine() -> wasmtime.Engine:
    # The evaluator's engines differ only in fuel and interruption, not in wasm features.
    return wasmtime.Engine()


def _limits(raw: Any) -> tuple[Limits, list[_Problem]]:
    if raw is None:
        return Limits(), []
    if not isinstance(raw, dict):
        return Limits(), [("limits", "limits must be a table")]
    problems = _unknown(raw, _LIMIT_KEYS, "limits.")
    for key, value in raw.items():
        if key in _LIMIT_KEYS and (
            value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)))
        ):
            problems.append((f"limits.{key}", f"limits.{key} must be a number"))
    if problems:
        return Limits(), problems
    try:
        # As a worker decodes them: an integer field takes an integer within the wire's range
        # (memory_bytes = 2**70 was deployed, and every work frame carrying it was refused).
        return from_wire(Limits, raw, "limits"), []
    except (InvalidMessage, TypeError) as exc:
        return Limits(), [("limits", str(exc))]


def _undeliverable(job: NewJob) -> str | None:
    """Why a worker could not decode the ``work`` frame that carries ``job``'s spec (its
    nesting, a value out of the wire's ranges), or None: checked at deploy, so no job the
    scheduler accepts ends the sessions of the workers it is leased to."""
    spec = JobSpec(
        job="0" * 32,
        runtime=job.runtime,
        module=b"",
        sha256=job.module_sha256,
        argv=job.argv,
        limits=job.limits,
        name=job.name,
        owner=job.owner,
        group=job.group,
        requirements=job.requirements,
        config=job.config,
    )
    lease = SliceLease(
        job=spec.job, slice=0, token="0", attempt=1, deadline=0.0, datum=b"", offer=0.0
    )
    try:
        decode(encode(Work(re=1, slices=(lease,), jobs=(spec,))), SCHEDULER_MESSAGES)
    except (ProtocolError, ValueError) as exc:
        return f"a worker could not read this job's work frame: {exc}"
    return None


def _read(path: Path, key: str, what: str, problems: list[_Problem]) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError as exc:
        problems.append((key, f"cannot read {what} {path}: {exc.strerror}"))
        return None


def _check_source(source: bytes, what: str = "the source") -> str | None:
    """Why a python or js work function's (or verifier's) source cannot be deployed, or
    None."""
    if len(source) > MAX_SOURCE_BYTES:
        return f"{what} is {len(source)} bytes; at most {MAX_SOURCE_BYTES}"
    try:
        text = source.decode("utf-8")
    except UnicodeDecodeError:
        return f"{what} is not UTF-8 text"
    if "\x00" in text:
        return f"{what} holds a NUL character"
    return None


def _first_non_json(datums: Sequence[bytes]) -> int | None:
    """The index of the first datum that is not JSON text (nested at most as a job), or None."""
    for i, datum in enumerate(datums):
        try:
            nesting.loads(datum, MAX_JOB_NESTING)
        except ValueError:
            return i
    return None


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _as_is(data: bytes) -> bytes:
    return data


def _unbase64(value: Any) -> bytes:
    """A bytes field of a document: bytes as they are (MessagePack), or a base64 string.

    Raises:
        binascii.Error: not valid base64.
        TypeError: neither bytes nor a string.
    """
    if isinstance(value, bytes):
        return value
    if not isinstance(value, str):
        raise TypeError("not bytes or a base64 string")
    return base64.b64decode(value, validate=True)


def job_document(
    *,
    name: Any,
    runtime: Any,
    module: bytes,
    argv: Any,
    offer: Any,
    limits: Any,
    max_attempts: Any,
    group: Any,
    requirements: Any,
    config: Any,
    data: Sequence[bytes],
    verifier: bytes | None = None,
    verifier_runtime: str = "wasm",
    redundancy: dict[str, Any] | None = None,
    binary: bool = False,
) -> dict[str, Any]:
    """A job document of these parts (checked by the scheduler, or :func:`parse_document`,
    not here): the bytes in base64 (with ``binary``, as they are, for a MessagePack
    document), a nonce and the time that make every deploy distinct (a replay of the same
    bytes is one job)."""
    blob = _as_is if binary else _b64
    document: dict[str, Any] = {
        "name": name,
        "runtime": runtime,
        "module": blob(module),
        "argv": argv,
        "offer": offer,
        "limits": limits,
        "max_attempts": max_attempts,
        "group": group,
        "requirements": requirements,
        "config": config,
        "data": [blob(d) for d in data],
        "nonce": os.urandom(16).hex(),
        "created": time.time(),
    }
    if verifier is not None:
        document["verifier"] = blob(verifier)
        if verifier_runtime != "wasm":
            document["verifier_runtime"] = verifier_runtime
    if redundancy is not None:
        document["redundancy"] = redundancy
    return document


def _file_redundancy(
    spec: Any, base: Path, problems: list[_Problem], binary: bool = False
) -> dict[str, Any] | None:
    """A job file's [redundancy] table as the document's: the comparison function read from
    its path (runtime by suffix), known answers as the bytes of their text, in base64."""
    if spec is None:
        return None
    if not isinstance(spec, dict):
        problems.append(("redundancy", "[redundancy] is a table (quorum, max_replicas, ...)"))
        return None
    problems.extend(_unknown(spec, _REDUNDANCY_FILE_KEYS, "redundancy."))
    out = {k: v for k, v in spec.items() if k in _REDUNDANCY_FILE_KEYS}
    if "compare" in spec:
        if not isinstance(spec["compare"], str):
            problems.append(
                ("redundancy.compare", "compare is the path of a .py, .js or wasm file")
            )
            out.pop("compare")
        else:
            source = _read(base / spec["compare"], "redundancy.compare", "compare", problems)
            out["compare"] = (source or b"") if binary else _b64(source or b"")
            out["compare_runtime"] = VERIFIER_RUNTIME_OF.get(Path(spec["compare"]).suffix, "wasm")
    if "known" in spec:
        known = spec["known"]
        if not isinstance(known, dict) or not all(isinstance(v, str) for v in known.values()):
            problems.append(
                ("redundancy.known", 'known is a table of slice index = "its right result"')
            )
            out.pop("known")
        else:
            out["known"] = {k: v.encode() if binary else _b64(v.encode()) for k, v in known.items()}
    return out


def _program(
    doc: dict[str, Any],
    key: str,
    prefix: str,
    what: tuple[str, str],
    problems: list[_Problem],
) -> tuple[bytes | None, str]:
    """A program the scheduler runs (a verifier, a comparison function): ``doc[key]`` in
    base64, run by ``doc[key + "_runtime"]`` (wasm, the default, python or js); each fault
    in ``problems`` under ``prefix + key``. ``what`` names it as a module and as source."""
    runtime = doc.get(f"{key}_runtime", "wasm")
    if runtime not in ("wasm", *SOURCE_RUNTIMES):
        problems.append((f"{prefix}{key}_runtime", f"{key}_runtime is 'wasm', 'python' or 'js'"))
        runtime = "wasm"
    if key not in doc:
        return None, runtime
    try:
        program = _unbase64(doc[key])
    except (binascii.Error, TypeError):
        problems.append((f"{prefix}{key}", f"{key} must be a base64 string"))
        return None, runtime
    if runtime == "wasm":
        why = _check_wasm(program, what[0])
    else:
        why = _check_source(program, what[1])
    if why is not None:
        problems.append((f"{prefix}{key}", why))
    return program, runtime


def _check_redundancy(
    raw: Any, slices: int
) -> tuple[Redundancy | None, bytes | None, str, dict[int, bytes], list[_Problem]]:
    """A document's ``redundancy``: the policy, comparison function and its runtime, known
    answers by slice index, and every fault found."""
    problems: list[_Problem] = []
    if raw is None:
        return None, None, "wasm", {}, problems
    if not isinstance(raw, dict):
        return None, None, "wasm", {}, [("redundancy", "redundancy must be an object")]
    problems.extend(
        (f"redundancy.{key}", f"unknown field {key!r}" + _suggest(key, _REDUNDANCY_KEYS))
        for key in sorted(set(raw) - set(_REDUNDANCY_KEYS))
    )

    def integer(key: str, default: int, low: int, high: int) -> int:
        value = raw.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            problems.append((f"redundancy.{key}", f"{key} must be an integer within {low}..{high}"))
            return default
        return value

    quorum = integer("quorum", 2, 1, MAX_QUORUM)
    max_replicas = integer("max_replicas", min(2 * quorum, MAX_REPLICAS), quorum, MAX_REPLICAS)
    adaptive = raw.get("adaptive", False)
    if not isinstance(adaptive, bool):
        problems.append(("redundancy.adaptive", "adaptive is true or false"))
        adaptive = False
    apart = raw.get("distinct_networks", False)
    if not isinstance(apart, bool):
        problems.append(("redundancy.distinct_networks", "distinct_networks is true or false"))
        apart = False
    rate = raw.get("spot_check_rate", 0.0)
    if (
        isinstance(rate, bool)
        or not isinstance(rate, (int, float))
        or not math.isfinite(rate)
        or not 0 <= rate <= 1
    ):
        problems.append(("redundancy.spot_check_rate", "spot_check_rate is a fraction, 0..1"))
        rate = 0.0
    compare, runtime = _program(
        raw, "compare", "redundancy.", ("the comparison function",) * 2, problems
    )
    known: dict[int, bytes] = {}
    raw_known = raw.get("known", {})
    if not isinstance(raw_known, dict):
        problems.append(("redundancy.known", "known maps slice indices to base64 results"))
        raw_known = {}
    for key, value in raw_known.items():
        try:
            idx = int(key)
            if not 0 <= idx < slices or str(idx) != key:
                raise ValueError
            known[idx] = _unbase64(value)
        except (ValueError, TypeError, binascii.Error):
            problems.append(
                (
                    "redundancy.known",
                    f"known[{key!r}]: a slice index (0..{slices - 1}) and a base64 result",
                )
            )
            break
    if quorum == 1 and (adaptive or compare is not None or known):
        problems.append(
            ("redundancy.quorum", "adaptive, compare and known need a quorum of 2 or more")
        )
    return (
        Redundancy(quorum, max_replicas, adaptive, float(rate), apart),
        compare,
        runtime,
        known,
        problems,
    )


def load_job_file(path: str | os.PathLike[str], binary: bool = False) -> bytes:
    """Read a job TOML file and its module and inputs; returns the job document's bytes: JSON,
    or with ``binary`` MessagePack (bytes as they are: :data:`MSGPACK`).

    Raises:
        JobFileError: every fault found, each as ``FILE:LINE: message`` naming the key.
    """
    path = Path(path)
    try:
        source = path.read_text()
        nesting.check_toml(source, MAX_JOB_NESTING)
        spec = tomllib.loads(source)
    except OSError as exc:
        raise JobFileError(f"cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise JobFileError(f"{path}: not UTF-8 text") from None
    except (nesting.NestingTooDeep, tomllib.TOMLDecodeError) as exc:
        raise JobFileError(f"{path}: {exc}") from None
    problems = _unknown(spec, _JOB_KEYS)
    base = path.parent
    module = b""
    if not isinstance(spec.get("module"), str):
        problems.append(("module", "'module' (path of the work function) is required"))
    else:
        module = _read(base / spec["module"], "module", "module", problems) or b""
    verifier = None
    verifier_runtime = "wasm"
    if "verifier" in spec:
        if not isinstance(spec["verifier"], str):
            problems.append(
                ("verifier", "'verifier' is the path of a wasm module, or of .py or .js source")
            )
        else:
            verifier = _read(base / spec["verifier"], "verifier", "verifier", problems)
            verifier_runtime = VERIFIER_RUNTIME_OF.get(Path(spec["verifier"]).suffix, "wasm")
    inputs = spec.get("inputs", {})
    data: list[bytes] = []
    if not isinstance(inputs, dict):
        problems.append(("inputs", "[inputs] is a table of 'file' and/or 'values'"))
        inputs = {}
    problems.extend(_unknown(inputs, _INPUT_KEYS, "inputs."))
    if "file" in inputs:
        if not isinstance(inputs["file"], str):
            problems.append(("inputs.file", "inputs.file must be a path"))
        else:
            text = _read(base / inputs["file"], "inputs.file", "inputs.file", problems)
            data.extend(line for line in (text or b"").splitlines() if line)
    values = inputs.get("values", [])
    if not isinstance(values, list):
        problems.append(("inputs.values", "inputs.values must be a list"))
        values = []
    runtime = spec.get("runtime", "wasm")
    config = spec.get("opencl", {})
    if runtime in SOURCE_RUNTIMES:
        # The work function gets each value as itself (json), or each line as bytes.
        if values and "file" in inputs:
            problems.append(
                ("inputs", f"a {runtime} job takes values (JSON) or file (bytes), not both")
            )
        config = {"datum": "bytes" if "file" in inputs else "json"}
        for key in ("interpreter", "result"):
            if key in spec:
                config[key] = spec[key]
        for value in values:
            try:
                data.append(json.dumps(value, allow_nan=False).encode())
            except (TypeError, ValueError):
                problems.append(("inputs.values", f"{value!r} has no JSON form"))
                break
    else:
        for key in ("interpreter", "result"):
            if key in spec:  # was silently ignored
                problems.append((key, f"{key} is for python and js jobs, not {runtime}"))
        for value in values:
            if isinstance(value, bool) or not isinstance(value, (str, int, float)):
                problems.append(("inputs.values", "inputs.values holds strings and numbers only"))
                break
            data.append(str(value).encode())
    offer = spec.get("offer", 0)
    document = job_document(
        name=spec.get("name", path.stem),
        runtime=runtime,
        module=module,
        argv=spec.get("argv", []),
        # Checked here: TOML has nan and inf, which a JSON document cannot carry.
        offer=offer if _offer_problem(offer) is None else 0,
        limits=spec.get("limits", {}),
        max_attempts=spec.get("max_attempts", 2),
        group=spec.get("group", ""),
        requirements=spec.get("requirements", {}),
        config=config,
        data=data,
        verifier=verifier,
        verifier_runtime=verifier_runtime,
        redundancy=_file_redundancy(spec.get("redundancy"), base, problems, binary),
        binary=binary,
    )
    if (why := _offer_problem(offer)) is not None:
        problems.append(("offer", why))
    # The same checks the scheduler makes, on what the file's faults left checkable; a
    # problem whose key the file's checks already faulted is that fault's echo.
    # ([redundancy] is a table of its own: a fault of one of its keys hides only that key's.)
    faulty = {key for key, _ in problems}
    faulty |= {key.partition(".")[0] for key in faulty if not key.startswith("redundancy.")}
    _, found = _check_document(document, "0x" + "0" * 40, b"")
    for key, message in found:
        top, dot, sub = key.partition(".")
        file_key = _FILE_KEY.get(top, top)
        if file_key not in faulty and file_key + dot + sub not in faulty:
            problems.append((file_key + dot + sub, message))
    if problems:
        lines = []
        for key, message in problems:
            line = _line_of(source, key) if key else None
            lines.append(f"{path}:{line}: {message}" if line else f"{path}: {message}")
        raise JobFileError(lines)
    if binary:
        packed: bytes = msgspec.msgpack.encode(document)
        return packed
    return json.dumps(document, separators=(",", ":")).encode()


def _offer_problem(offer: Any) -> str | None:
    """Why ``offer`` is not a finite number of credits in range, or None."""
    if (
        isinstance(offer, bool)
        or not isinstance(offer, (int, float))
        or not math.isfinite(offer)
        or not 0 <= offer <= MAX_OFFER
    ):
        return f"offer must be a number of credits per slice, 0..{MAX_OFFER:g}"
    return None


#: The media type of a MessagePack job document (and of the results API's MessagePack replies).
MSGPACK = "application/msgpack"


def parse_document(body: bytes, owner: str, binary: bool = False) -> NewJob:
    """Validate a job document's bytes: JSON, or with ``binary`` MessagePack, where the bytes
    fields (``module``, ``verifier``, each of ``data``, ``redundancy.compare`` and the
    values of ``redundancy.known``) may be bytes as they are and everything else is JSON
    data.

    Raises:
        JobFileError: every fault found, each naming its field.
    """
    if binary:
        doc = _msgpack_document(body)
    else:
        try:
            doc = nesting.loads(body, MAX_JOB_NESTING)
        except nesting.NestingTooDeep as exc:
            raise JobFileError(f"the job document {exc}") from None
        except ValueError as exc:
            raise JobFileError(f"the job document is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise JobFileError("the job document is not an object")
    job, problems = _check_document(doc, owner, body)
    if job is None:
        raise JobFileError([message for _, message in problems])
    return job


def _msgpack_document(body: bytes) -> Any:
    """A MessagePack job document's data, its bytes fields aside held to JSON's kinds and to
    :data:`MAX_JOB_NESTING` (docs/protocol.md section 6).

    Raises:
        JobFileError: not one MessagePack value, or holding what a JSON document could not.
    """
    try:
        doc = msgspec.msgpack.decode(body)
    except (msgspec.DecodeError, RecursionError) as exc:
        raise JobFileError(f"the job document is not MessagePack: {exc}") from None
    if not isinstance(doc, dict):
        raise JobFileError("the job document is not an object")
    # Everything but the bytes fields must be what JSON could have said.
    rest = {k: v for k, v in doc.items() if k not in ("module", "verifier", "data")}
    if isinstance(doc.get("data"), list):
        rest["data"] = [None if isinstance(d, bytes) else d for d in doc["data"]]
    redundancy = doc.get("redundancy")
    if isinstance(redundancy, dict):
        rest["redundancy"] = shown = {k: v for k, v in redundancy.items() if k != "compare"}
        if isinstance(redundancy.get("known"), dict):
            shown["known"] = {
                k: None if isinstance(v, bytes) else v for k, v in redundancy["known"].items()
            }
    for key in ("module", "verifier"):
        if key in doc and not isinstance(doc[key], bytes):
            rest[key] = doc[key]
    if (why := nesting.plain_fault(rest, MAX_JOB_NESTING)) is not None:
        raise JobFileError(f"the job document holds what JSON cannot: {why}")
    return doc


def _check_document(
    doc: dict[str, Any], owner: str, body: bytes
) -> tuple[NewJob | None, list[_Problem]]:
    """The job a document describes, or None and every fault found in it."""
    problems: list[_Problem] = [
        (key, f"unknown field {key!r}" + _suggest(key, _DOCUMENT_KEYS))
        for key in sorted(set(doc) - set(_DOCUMENT_KEYS))
    ]
    runtime = doc.get("runtime")
    if runtime not in RUNTIMES:
        problems.append(("runtime", f"runtime must be one of {list(RUNTIMES)}, not {runtime!r}"))
    name = doc.get("name", "")
    if not isinstance(name, str) or len(name) > 200:
        problems.append(("name", "name must be a string of at most 200 characters"))
    argv = doc.get("argv", [])
    if not isinstance(argv, list) or not all(isinstance(a, str) for a in argv):
        problems.append(("argv", "argv must be a list of strings"))
    offer = doc.get("offer", 0)
    if (why := _offer_problem(offer)) is not None:
        problems.append(("offer", why))
    group = doc.get("group", "")
    if not isinstance(group, str) or len(group) > 200:
        problems.append(
            ("group", "group must be a join key (a string), or empty for the public group")
        )
    requirements: Any = {}
    try:
        requirements = validate_requirements(doc.get("requirements", {}))
    except ValueError as exc:
        problems.append(("requirements", str(exc)))
    config = doc.get("config", {})
    if runtime == "opencl":
        try:
            config = validate_config(config)
        except ValueError as exc:
            problems.append(("config", str(exc)))
    elif runtime in SOURCE_RUNTIMES:
        if not isinstance(config, dict) or set(config) - {"datum", "interpreter", "result"}:
            problems.append(
                (
                    "config",
                    f"a {runtime} job's config is {{'datum': 'json' or 'bytes',"
                    " 'interpreter': 'warm' or 'fresh', 'result': 'json', 'bytes' or 'any'}",
                )
            )
        elif config.get("datum", "json") not in ("json", "bytes"):
            problems.append(("config", "config.datum is 'json' or 'bytes'"))
        elif config.get("interpreter", "warm") not in ("warm", "fresh"):
            problems.append(("config", "interpreter is 'warm' (the default) or 'fresh'"))
        elif config.get("result", "any") not in ("json", "bytes", "any"):
            problems.append(("config", "result is 'json', 'bytes' or 'any' (the default)"))
        else:
            kinds = {"result": config["result"]} if config.get("result", "any") != "any" else {}
            config = {
                "datum": config.get("datum", "json"),
                "interpreter": config.get("interpreter", "warm"),
                **kinds,
            }
    elif config:
        problems.append(("config", f"runtime {runtime!r} takes no [opencl] settings"))
    verifier, verifier_runtime = _program(
        doc, "verifier", "", ("the verifier", "the verifier's source"), problems
    )
    attempts = doc.get("max_attempts", 2)
    if (
        isinstance(attempts, bool)
        or not isinstance(attempts, int)
        or not 1 <= attempts <= MAX_ATTEMPTS
    ):
        problems.append(
            ("max_attempts", f"max_attempts must be an integer within 1..{MAX_ATTEMPTS}")
        )
    module = b""
    try:
        module = _unbase64(doc.get("module", ""))
    except (binascii.Error, TypeError):
        problems.append(("module", "module must be a base64 string"))
    else:
        if not module:
            problems.append(("module", "module is empty"))
        elif runtime == "wasm" and (why := _check_wasm(module, "the module")) is not None:
            problems.append(("module", why))
        elif runtime in SOURCE_RUNTIMES and (why := _check_source(module)) is not None:
            problems.append(("module", why))
    data = doc.get("data", [])
    datums: tuple[bytes, ...] = ()
    try:
        if not isinstance(data, list):
            raise TypeError
        datums = tuple(map(_unbase64, data))
    except (binascii.Error, TypeError):
        problems.append(("data", "data must be a list of base64 strings"))
    else:
        if not datums:
            problems.append(
                ("data", "the job has no inputs: give [inputs] file or values (one slice each)")
            )
        elif len(datums) > MAX_SLICES:
            problems.append(("data", f"a job has at most {MAX_SLICES} slices"))
    if (
        runtime in SOURCE_RUNTIMES
        and isinstance(config, dict)
        and config.get("datum") == "json"
        and (bad := _first_non_json(datums)) is not None
    ):
        problems.append(("data", f"slice {bad}'s datum is not JSON (config.datum is 'json')"))
    limits, found = _limits(doc.get("limits"))
    problems.extend(found)
    redundancy, compare, compare_runtime, known, found = _check_redundancy(
        doc.get("redundancy"), len(datums)
    )
    problems.extend(found)
    if problems:
        return None, problems
    job = NewJob(
        owner=owner,
        name=name,
        runtime=str(runtime),
        module=module,
        module_sha256=hashlib.sha256(module).hexdigest(),
        argv=tuple(argv),
        limits=limits,
        offer_micro=to_micro(offer),
        data=datums,
        payload_sha256=hashlib.sha256(body).hexdigest(),
        max_attempts=attempts,
        group=group,
        requirements=requirements,
        verifier=verifier,
        verifier_runtime=verifier_runtime,
        config=config,
        redundancy=redundancy,
        compare=compare,
        compare_runtime=compare_runtime,
        known=known,
    )
    if (why := _undeliverable(job)) is not None:
        return None, [("job", why)]
    return job, []
