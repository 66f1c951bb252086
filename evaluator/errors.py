"""Errors of the evaluator.

Exception tree::

    EvaluatorError          a DcpError; carries the wire ErrorCode that names the reason
    └── SliceError          this slice (or job assignment) failed; the evaluator carries on

The one exception to "carries on": a slice stopped by its wall clock while in wasm is answered,
then its evaluator ends (code compiled without interruption checks stops only with its
process). That answer names the wall clock or, for a slice that flooded its output first,
the output limit: after an answer with one of :data:`MAY_END_EVALUATOR`, a client starts a
fresh evaluator before its next request.
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


#: Codes of a slice's answer after which its evaluator may have ended (see above).
MAY_END_EVALUATOR = frozenset({ErrorCode.WASM_TIMEOUT.value, ErrorCode.OUTPUT_TOO_LARGE.value})
