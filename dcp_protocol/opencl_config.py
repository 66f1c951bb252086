"""The opencl runtime's job settings (a job's ``config``; docs/protocol.md section 5): their
shape, checked where a job is deployed (scheduler/jobdoc.py) and again where it runs
(evaluator/opencl.py), with one message per fault naming its key. Pure: no OpenCL here.
"""

from __future__ import annotations

import re
from typing import Any

__all__ = ["DTYPES", "KINDS", "validate_config"]

#: The element types of a kernel's buffers and scalars (numpy's names).
DTYPES = {
    "int8": "int8",
    "uint8": "uint8",
    "int16": "int16",
    "uint16": "uint16",
    "int32": "int32",
    "uint32": "uint32",
    "int64": "int64",
    "uint64": "uint64",
    "float32": "float32",
    "float64": "float64",
}
KINDS = ("input", "output", "scalar")


def validate_config(config: Any) -> dict[str, Any]:
    """Check an opencl job's ``config``; returns it.

    Raises:
        ValueError: naming the key at fault.
    """
    if not isinstance(config, dict):
        raise ValueError("[opencl] must be a table")
    unknown = set(config) - {"kernel", "global_size", "local_size", "args", "repeat"}
    if unknown:
        raise ValueError(f"[opencl] unknown key(s) {sorted(unknown)}")
    if not isinstance(config.get("kernel"), str) or not re.fullmatch(r"\w+", config["kernel"]):
        raise ValueError("opencl.kernel must be a kernel name")
    for key in ("global_size", "local_size"):
        sizes = config.get(key, [] if key == "local_size" else None)
        if not isinstance(sizes, list) or (key == "global_size" and not 1 <= len(sizes) <= 3):
            raise ValueError(f"opencl.{key} must be a list of 1 to 3 sizes")
        for size in sizes:
            if not (isinstance(size, int) and not isinstance(size, bool) and size > 0) and not (
                isinstance(size, str) and size.startswith("datum:")
            ):
                raise ValueError(f"opencl.{key}: sizes are positive integers or 'datum:KEY'")
    args = config.get("args")
    if not isinstance(args, list) or not args:
        raise ValueError("opencl.args must list the kernel's arguments")
    names = set()
    for i, arg in enumerate(args):
        where = f"opencl.args[{i}]"
        if not isinstance(arg, dict):
            raise ValueError(f"{where} must be a table")
        if set(arg) - {"name", "kind", "dtype", "source", "value", "count"}:
            raise ValueError(f"{where}: unknown key(s)")
        if arg.get("kind") not in KINDS:
            raise ValueError(f"{where}.kind must be one of {list(KINDS)}")
        if arg.get("dtype") not in DTYPES:
            raise ValueError(f"{where}.dtype must be one of {sorted(DTYPES)}")
        names.add(arg.get("name"))
        if arg["kind"] == "output":
            count = arg.get("count")
            if not (isinstance(count, int) and count > 0) and not (
                isinstance(count, str) and count.startswith("datum:")
            ):
                raise ValueError(f"{where}.count must be a positive integer or 'datum:KEY'")
        elif "value" not in arg:
            source = arg.get("source")
            if source not in ("datum", "datum_length") and not (
                isinstance(source, str) and source.startswith("datum:")
            ):
                raise ValueError(
                    f"{where} needs a value or a source (datum, datum:KEY, datum_length)"
                )
    repeat = config.get("repeat")
    if repeat is not None:
        if (
            not isinstance(repeat, dict)
            or repeat.get("counter") not in names
            or repeat.get("until") not in names
        ):
            raise ValueError("opencl.repeat needs counter and until naming arguments")
        rounds = repeat.get("max_rounds", 1_000_000)
        if not isinstance(rounds, int) or rounds < 1:
            raise ValueError("opencl.repeat.max_rounds must be a positive integer")
    return config
