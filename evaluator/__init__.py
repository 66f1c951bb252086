"""The sandbox: evaluator processes and their runtimes (wasm on wasmtime)."""

from __future__ import annotations

from .errors import EvaluatorError, SliceError

__all__ = ["EvaluatorError", "SliceError"]
