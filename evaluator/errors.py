"""Errors of the evaluator.

Exception tree::

    EvaluatorError          a DcpError; carries the wire ErrorCode that names the reason
    └── SliceError          this slice (or job assignment) failed; the evaluator carries on
"""

from __future__ import annotations

from dcp_protocol import DcpError, ErrorCode


class EvaluatorError(DcpError):
    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(f"{code.value}: {message}")
        self.code = code
        self.message = message


class SliceError(EvaluatorError):
    """A work function failed in a contained way (trap, limit, forbidden import...)."""
