"""The sandbox: evaluator processes and their runtimes (wasm on wasmtime, OpenCL, and the
python and js interpreters as WASI modules). A slice's failure is
:class:`dcp_protocol.SliceFailure` on every side."""

from __future__ import annotations
