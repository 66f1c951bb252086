"""The ``opencl`` runtime: OpenCL C kernels through pyopencl, on a GPU where there is one and
on PoCL's CPU device where there is not.

A work function is OpenCL C source (the job's module) plus a spec (the job's ``config``)::

    kernel = "matmul"                   # the kernel to run
    global_size = [16, 16]              # ints, or "datum:KEY" to read a size from the datum
    local_size = []                     # optional
    args = [                            # in the kernel's parameter order
      {name = "a", kind = "input", dtype = "float32", source = "datum:a"},
      {name = "n", kind = "scalar", dtype = "uint32", value = 16},
      {name = "c", kind = "output", dtype = "float32", count = 256},
    ]
    repeat = {counter = "round", until = "found", max_rounds = 100000}   # optional

Input sources: ``datum`` (the datum's bytes as an array of ``dtype``), ``datum:KEY`` (a number
or a list in the datum, which is then a JSON object), ``datum_length`` (a scalar). ``repeat``
launches the kernel again with the ``counter`` scalar incremented until the first element of
output ``until`` is non-zero (a search). The result is the output buffers' bytes, concatenated
in argument order. Programs are built once per (source, device) and cached in the evaluator.
Device time comes from event profiling: GPU time on a GPU, CPU time on a CPU device. A kernel
cannot be interrupted: the worker enforces the wall clock by killing the evaluator.
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import time
from dataclasses import dataclass
from typing import Any

from dcp_protocol import ErrorCode, Limits, Metrics, SliceFailure, nesting
from dcp_protocol.evaluator_channel import SliceResult
from dcp_protocol.opencl_config import DTYPES, validate_config

from .scratch import private_dir

#: Device names no work runs on unless the operator says otherwise (DCP bans llvmpipe).
DEFAULT_BANNED = ("llvmpipe",)


def _kind(cl: Any, device: Any) -> str:
    """gpu, cpu, accelerator or other (PoCL's CPU device reports CPU | ALL bits)."""
    for flag, name in (
        (cl.device_type.GPU, "gpu"),
        (cl.device_type.ACCELERATOR, "accelerator"),
        (cl.device_type.CPU, "cpu"),
    ):
        if device.type & flag:
            return name
    return "other"


def _private_cache_dir() -> str:
    """A fresh 0700 directory for PoCL's kernel cache, removed when this process exits."""
    path = private_dir("pocl-cache-")
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def _banned(device: Any, patterns: list[str]) -> bool:
    text = f"{device.name} {device.vendor}"
    return any(re.search(p, text, re.IGNORECASE) for p in patterns)


@dataclass
class _Built:
    program: Any


class OpenCLRuntime:
    """Builds and runs kernels on one device, chosen when the first job is assigned."""

    def __init__(self) -> None:
        self._cl: Any = None
        self._device: Any = None
        self._context: Any = None
        self._queue: Any = None
        self._programs: dict[tuple[str, str], _Built] = {}

    def _import(self) -> Any:
        if self._cl is None:
            # The evaluator starts with an empty environment. PoCL links kernels with the
            # system's ld (found on PATH) and caches them under POCL_CACHE_DIR: give it a fixed
            # PATH and a private cache of its own, never the current directory (in a
            # checkout, that put PoCL's files into the repository).
            os.environ.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
            os.environ["POCL_CACHE_DIR"] = _private_cache_dir()
            try:
                import pyopencl
            except ImportError as exc:
                raise SliceFailure(ErrorCode.OPENCL_UNAVAILABLE, f"pyopencl: {exc}") from None
            self._cl = pyopencl
        return self._cl

    def describe(self) -> dict[str, Any]:
        """OpenCL platforms and devices, measured; {} when OpenCL is unavailable."""
        try:
            cl = self._import()
            platforms = cl.get_platforms()
        except (SliceFailure, Exception):  # no ICD loader, no platform: simply no OpenCL
            return {}
        devices = []
        for platform in platforms:
            for device in platform.get_devices():
                devices.append(
                    {
                        "platform": platform.name,
                        "name": device.name,
                        "vendor": device.vendor,
                        "type": _kind(cl, device),
                        "compute_units": device.max_compute_units,
                        "global_memory": device.global_mem_size,
                        "max_allocation": device.max_mem_alloc_size,
                        "fp64": bool(device.double_fp_config),
                        "extensions": device.extensions.split(),
                    }
                )
        return {"devices": devices}

    def _select(self, options: dict[str, Any]) -> Any:
        cl = self._import()
        banned = list(options.get("banned_devices", DEFAULT_BANNED))
        wanted = options.get("devices")  # indices into the device list, or all
        candidates = []
        index = 0
        for platform in cl.get_platforms():
            for device in platform.get_devices():
                if (wanted is None or index in wanted) and not _banned(device, banned):
                    candidates.append(device)
                index += 1
        if not candidates:
            raise SliceFailure(
                ErrorCode.OPENCL_UNAVAILABLE,
                "no OpenCL device this worker lends (none found, or all banned)",
            )
        gpus = [d for d in candidates if d.type & cl.device_type.GPU]
        return (gpus or candidates)[0]

    def compile(
        self, source: bytes, sha256: str, config: dict[str, Any], options: dict[str, Any]
    ) -> None:
        try:
            validate_config(config)
        except ValueError as exc:
            raise SliceFailure(ErrorCode.INVALID_MODULE, str(exc)) from None
        cl = self._import()
        if self._device is None:
            self._device = self._select(options)
            self._context = cl.Context([self._device])
            self._queue = cl.CommandQueue(
                self._context, properties=cl.command_queue_properties.PROFILING_ENABLE
            )
        key = (sha256, self._device.name)
        built = self._programs.get(key)
        if built is None:
            try:
                program = cl.Program(self._context, source.decode("utf-8", "replace")).build()
            except cl.RuntimeError as exc:
                log = getattr(exc, "build_log", None) or str(exc)
                raise SliceFailure(
                    ErrorCode.OPENCL_BUILD_FAILED,
                    f"the kernel source does not build: {str(log)[-1500:]}",
                ) from None
            built = self._programs[key] = _Built(program)
        if config["kernel"] not in built.program.kernel_names.split(";"):
            raise SliceFailure(
                ErrorCode.INVALID_MODULE, f"the source has no kernel {config['kernel']!r}"
            )

    def run(self, sha256: str, config: dict[str, Any], limits: Limits, datum: bytes) -> SliceResult:
        import numpy as np

        cl = self._import()
        built = self._programs[(sha256, self._device.name)]
        kernel_name = config["kernel"]
        doc: dict[str, Any] | None = None

        def from_datum(ref: str) -> Any:
            nonlocal doc
            if doc is None:
                try:
                    doc = nesting.loads(datum)  # the job owner's bytes
                except nesting.NestingTooDeep as exc:
                    raise SliceFailure(ErrorCode.DATUM_INVALID, f"the datum {exc}") from None
                except ValueError:
                    doc = None
                if not isinstance(doc, dict):
                    raise SliceFailure(
                        ErrorCode.DATUM_INVALID, "this job's datum must be a JSON object"
                    )
            key = ref.removeprefix("datum:")
            if key not in doc:
                raise SliceFailure(ErrorCode.DATUM_INVALID, f"the datum has no {key!r}")
            return doc[key]

        def size(value: int | str) -> int:
            n = from_datum(value) if isinstance(value, str) else value
            if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
                raise SliceFailure(ErrorCode.DATUM_INVALID, f"{value}: not a positive size")
            return n

        started_cpu = time.process_time()
        started = time.monotonic()
        mf = cl.mem_flags
        kernel = getattr(built.program, kernel_name)
        values: list[Any] = []
        outputs: list[tuple[Any, Any]] = []
        scalars: dict[str, tuple[int, Any]] = {}
        total = 0
        try:
            for position, arg in enumerate(config["args"]):
                dtype = np.dtype(DTYPES[arg["dtype"]])
                if arg["kind"] == "scalar":
                    raw = (
                        arg["value"]
                        if "value" in arg
                        else (
                            len(datum)
                            if arg["source"] == "datum_length"
                            else from_datum(arg["source"])
                        )
                    )
                    try:
                        value = dtype.type(raw)
                    except (TypeError, ValueError, OverflowError):
                        raise SliceFailure(
                            ErrorCode.DATUM_INVALID, f"{arg['name']}: {raw!r} is not a {dtype}"
                        ) from None
                    values.append(value)
                    scalars[arg["name"]] = (position, dtype)
                    continue
                if arg["kind"] == "input":
                    if "value" in arg:
                        data = np.asarray(arg["value"], dtype=dtype)
                    elif arg["source"] == "datum":
                        if len(datum) % dtype.itemsize:
                            raise SliceFailure(
                                ErrorCode.DATUM_INVALID,
                                f"a datum of {len(datum)} bytes is not an array of {dtype}",
                            )
                        data = np.frombuffer(datum or b"\0" * dtype.itemsize, dtype=dtype)
                    else:
                        try:
                            data = np.asarray(from_datum(arg["source"]), dtype=dtype)
                        except (TypeError, ValueError, OverflowError):
                            raise SliceFailure(
                                ErrorCode.DATUM_INVALID, f"{arg['name']}: not an array of {dtype}"
                            ) from None
                    nbytes = max(data.nbytes, dtype.itemsize)
                else:
                    nbytes = size(arg["count"]) * dtype.itemsize
                total += nbytes
                if total > limits.memory_bytes or nbytes > self._device.max_mem_alloc_size:
                    raise SliceFailure(
                        ErrorCode.BUFFER_TOO_LARGE,
                        f"buffers of {total} bytes exceed the limit of "
                        f"{min(limits.memory_bytes, self._device.max_mem_alloc_size)}",
                    )
                if arg["kind"] == "input":
                    values.append(
                        cl.Buffer(
                            self._context,
                            mf.READ_ONLY | mf.COPY_HOST_PTR,
                            hostbuf=np.ascontiguousarray(data)
                            if data.nbytes
                            else np.zeros(1, dtype),
                        )
                    )
                else:
                    host = np.zeros(nbytes // dtype.itemsize, dtype=dtype)
                    buffer = cl.Buffer(
                        self._context, mf.READ_WRITE | mf.COPY_HOST_PTR, hostbuf=host
                    )
                    values.append(buffer)
                    outputs.append((arg["name"], (buffer, host)))
            out_bytes = sum(host.nbytes for _name, (_b, host) in outputs)
            if out_bytes > limits.output_bytes:
                raise SliceFailure(
                    ErrorCode.OUTPUT_TOO_LARGE,
                    f"outputs of {out_bytes} bytes exceed the cap of {limits.output_bytes}",
                )
            global_size = tuple(size(s) for s in config["global_size"])
            local_size = tuple(size(s) for s in config.get("local_size", [])) or None
            repeat = config.get("repeat")
            device_ns = 0
            rounds = 1 if repeat is None else int(repeat.get("max_rounds", 1_000_000))
            for round_ in range(rounds):
                if repeat is not None:
                    position, dtype = scalars[repeat["counter"]]
                    values[position] = dtype.type(round_)
                kernel.set_args(*values)
                event = cl.enqueue_nd_range_kernel(self._queue, kernel, global_size, local_size)
                event.wait()
                device_ns += event.profile.end - event.profile.start
                if repeat is not None:
                    flag_buffer, flag_host = dict(outputs)[repeat["until"]]
                    cl.enqueue_copy(self._queue, flag_host[:1], flag_buffer).wait()
                    if flag_host[0]:
                        break
            for _name, (buffer, host) in outputs:
                cl.enqueue_copy(self._queue, host, buffer).wait()
        except cl.Error as exc:
            raise SliceFailure(ErrorCode.OPENCL_ERROR, f"OpenCL: {exc}") from None
        result = b"".join(host.tobytes() for _name, (_b, host) in outputs)
        device_seconds = device_ns / 1e9
        on_gpu = bool(self._device.type & cl.device_type.GPU)
        cpu = time.process_time() - started_cpu
        return SliceResult(
            result,
            Metrics(
                wall_seconds=time.monotonic() - started,
                cpu_seconds=cpu if on_gpu else max(cpu, device_seconds),
                gpu_seconds=device_seconds if on_gpu else 0.0,
                bytes_in=len(datum),
                bytes_out=len(result),
            ),
        )
