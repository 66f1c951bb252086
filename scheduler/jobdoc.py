"""Job files (TOML, for people) and job documents (JSON, on the wire).

A job file names a runtime, a module path, argv, an offer, limits and inputs; the compute
client turns it into a job document: the exact bytes it signs and sends. The scheduler parses
the document with :func:`parse_document`; both sides share the checks below.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import os
import time
import tomllib
from pathlib import Path
from typing import Any

from dcp_protocol import DcpError, InvalidMessage, Limits, nesting
from dcp_protocol.policy import validate_requirements
from evaluator.opencl import validate_config

from .store import NewJob, to_micro

__all__ = [
    "JobFileError",
    "load_job_file",
    "parse_document",
    "RUNTIMES",
    "MAX_SLICES",
    "MAX_JOB_NESTING",
]

RUNTIMES = ("wasm", "opencl")
#: Job files and documents nest at most half as deep as a frame may: the frames that carry a
#: job's parts (work, assign) add a few levels of their own around them.
MAX_JOB_NESTING = nesting.MAX_NESTING // 2
MAX_SLICES = 1_000_000
MAX_ATTEMPTS = 10
_JOB_KEYS = {
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
}
#: The largest offer per slice, in credits (keeps escrow arithmetic far from overflow).
MAX_OFFER = 1e9
_INPUT_KEYS = {"file", "values"}


class JobFileError(DcpError, ValueError):
    """The job file or document is wrong; the message names the key."""


def _limits(raw: Any, where: str) -> Limits:
    if raw is None:
        return Limits()
    if not isinstance(raw, dict):
        raise JobFileError(f"{where}: limits must be a table")
    unknown = set(raw) - {"wall_seconds", "memory_bytes", "output_bytes", "fuel"}
    if unknown:
        raise JobFileError(f"{where}: unknown limits key(s) {sorted(unknown)}")
    for key, value in raw.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise JobFileError(f"{where}: limits.{key} must be a number")
    try:
        return Limits(**raw)
    except (InvalidMessage, TypeError) as exc:
        raise JobFileError(f"{where}: {exc}") from None


def load_job_file(path: str | os.PathLike[str]) -> bytes:
    """Read a job TOML file and its module and inputs; returns the job document's bytes.

    Raises:
        JobFileError: with the file and key at fault.
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
    unknown = set(spec) - _JOB_KEYS
    if unknown:
        raise JobFileError(f"{path}: unknown key(s) {sorted(unknown)}")
    base = path.parent
    if not isinstance(spec.get("module"), str):
        raise JobFileError(f"{path}: 'module' (path of the work function) is required")
    module_path = base / spec["module"]
    try:
        module = module_path.read_bytes()
    except OSError as exc:
        raise JobFileError(f"{path}: cannot read module {module_path}: {exc.strerror}") from None
    verifier = None
    if "verifier" in spec:
        if not isinstance(spec["verifier"], str):
            raise JobFileError(f"{path}: 'verifier' is the path of a wasm module")
        try:
            verifier = (base / spec["verifier"]).read_bytes()
        except OSError as exc:
            raise JobFileError(f"{path}: cannot read verifier: {exc.strerror}") from None
    inputs = spec.get("inputs", {})
    if not isinstance(inputs, dict) or set(inputs) - _INPUT_KEYS:
        raise JobFileError(f"{path}: [inputs] takes 'file' and/or 'values'")
    data: list[bytes] = []
    if "file" in inputs:
        if not isinstance(inputs["file"], str):
            raise JobFileError(f"{path}: inputs.file must be a path")
        try:
            text = (base / inputs["file"]).read_bytes()
        except OSError as exc:
            raise JobFileError(f"{path}: cannot read inputs.file: {exc.strerror}") from None
        data.extend(line for line in text.splitlines() if line)
    for value in inputs.get("values", []):
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise JobFileError(f"{path}: inputs.values holds strings and numbers only")
        data.append(str(value).encode())
    document = {
        "name": spec.get("name", path.stem),
        "runtime": spec.get("runtime", "wasm"),
        "module": base64.b64encode(module).decode(),
        "argv": spec.get("argv", []),
        # Checked here too: TOML has nan and inf, which a JSON document cannot carry.
        "offer": _offer(spec.get("offer", 0)),
        "limits": spec.get("limits", {}),
        "max_attempts": spec.get("max_attempts", 2),
        "group": spec.get("group", ""),
        "requirements": spec.get("requirements", {}),
        "config": spec.get("opencl", {}),
        "data": [base64.b64encode(d).decode() for d in data],
        # Makes every deploy a distinct document; a replay of the same bytes is one job.
        "nonce": os.urandom(16).hex(),
        "created": time.time(),
    }
    if verifier is not None:
        document["verifier"] = base64.b64encode(verifier).decode()
    body = json.dumps(document, separators=(",", ":")).encode()
    parse_document(body, "0x" + "0" * 40)  # the same checks the scheduler makes
    return body


def _offer(offer: Any) -> float:
    """The offer, checked.

    Raises:
        JobFileError: not a finite number of credits in range.
    """
    if (
        isinstance(offer, bool)
        or not isinstance(offer, (int, float))
        or not math.isfinite(offer)
        or not 0 <= offer <= MAX_OFFER
    ):
        raise JobFileError(f"offer must be a number of credits per slice, 0..{MAX_OFFER:g}")
    return offer


def parse_document(body: bytes, owner: str) -> NewJob:
    """Validate a job document's bytes.

    Raises:
        JobFileError: naming the field at fault.
    """
    try:
        doc = nesting.loads(body, MAX_JOB_NESTING)
    except nesting.NestingTooDeep as exc:
        raise JobFileError(f"the job document {exc}") from None
    except ValueError as exc:
        raise JobFileError(f"the job document is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise JobFileError("the job document is not an object")
    allowed = {
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
        "config",
    }
    unknown = set(doc) - allowed
    if unknown:
        raise JobFileError(f"unknown field(s) {sorted(unknown)}")
    runtime = doc.get("runtime")
    if runtime not in RUNTIMES:
        raise JobFileError(f"runtime must be one of {list(RUNTIMES)}, not {runtime!r}")
    name = doc.get("name", "")
    if not isinstance(name, str) or len(name) > 200:
        raise JobFileError("name must be a string of at most 200 characters")
    argv = doc.get("argv", [])
    if not isinstance(argv, list) or not all(isinstance(a, str) for a in argv):
        raise JobFileError("argv must be a list of strings")
    offer = _offer(doc.get("offer", 0))
    group = doc.get("group", "")
    if not isinstance(group, str) or len(group) > 200:
        raise JobFileError("group must be a join key (a string), or empty for the public group")
    try:
        requirements = validate_requirements(doc.get("requirements", {}))
    except ValueError as exc:
        raise JobFileError(str(exc)) from None
    config = doc.get("config", {})
    if runtime == "opencl":
        try:
            config = validate_config(config)
        except ValueError as exc:
            raise JobFileError(str(exc)) from None
    elif config:
        raise JobFileError(f"runtime {runtime!r} takes no [opencl] settings")
    verifier = None
    if "verifier" in doc:
        try:
            verifier = base64.b64decode(doc["verifier"], validate=True)
        except (binascii.Error, TypeError):
            raise JobFileError("verifier must be a base64 string") from None
    attempts = doc.get("max_attempts", 2)
    if (
        isinstance(attempts, bool)
        or not isinstance(attempts, int)
        or not 1 <= attempts <= MAX_ATTEMPTS
    ):
        raise JobFileError(f"max_attempts must be an integer within 1..{MAX_ATTEMPTS}")
    try:
        module = base64.b64decode(doc.get("module", ""), validate=True)
        data = doc.get("data", [])
        if not isinstance(data, list):
            raise JobFileError("data must be a list of base64 strings")
        datums = tuple(base64.b64decode(d, validate=True) for d in data)
    except (binascii.Error, TypeError):
        raise JobFileError("module and data must be base64 strings") from None
    if not module:
        raise JobFileError("module is empty")
    if len(datums) > MAX_SLICES:
        raise JobFileError(f"a job has at most {MAX_SLICES} slices")
    return NewJob(
        owner=owner,
        name=name,
        runtime=runtime,
        module=module,
        module_sha256=hashlib.sha256(module).hexdigest(),
        argv=tuple(argv),
        limits=_limits(doc.get("limits"), "job"),
        offer_micro=to_micro(offer),
        data=datums,
        payload_sha256=hashlib.sha256(body).hexdigest(),
        max_attempts=attempts,
        group=group,
        requirements=requirements,
        verifier=verifier,
        config=config,
    )
