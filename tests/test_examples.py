"""The example work functions: reproducible from source, and correct."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import dcp_protocol as p

from .conftest import EXAMPLES
from .evaluator_client import EvaluatorClient

sys.path.insert(0, str(EXAMPLES / "hash-puzzle"))
from check import check, leading_zero_bits  # noqa: E402


def test_rebuild_is_byte_identical(tmp_path: Path) -> None:
    subprocess.run(
        [str(EXAMPLES / "build.sh"), str(tmp_path)],
        check=True,
        timeout=900,
        env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin", "HOME": str(Path.home())},
    )
    for rel in ("hash-puzzle/puzzle.wasm", "hash-puzzle/verify.wasm", "echo/echo.wasm"):
        assert (tmp_path / rel).read_bytes() == (EXAMPLES / rel).read_bytes(), rel


def test_puzzle_answers_are_minimal_and_checked() -> None:
    client = EvaluatorClient()
    try:
        module = (EXAMPLES / "hash-puzzle" / "puzzle.wasm").read_bytes()
        assert isinstance(client.assign(module, ("12",)), p.Ack)
        for prefix in (b"alpha", b"beta", b""):
            reply = client.run(prefix + b"\n")
            assert isinstance(reply, p.SliceDone)
            assert check(prefix, reply.result, 12) is None
            nonce = int(reply.result.split()[0])
            import hashlib

            for smaller in range(nonce):  # no smaller nonce solves it
                digest = hashlib.sha256(prefix + str(smaller).encode()).digest()
                assert leading_zero_bits(digest) < 12
        assert check(b"alpha", b"1 00", 12) is not None
    finally:
        assert client.close() == 0


def test_puzzle_reports_progress() -> None:
    client = EvaluatorClient()
    try:
        module = (EXAMPLES / "hash-puzzle" / "puzzle.wasm").read_bytes()
        assert isinstance(client.assign(module, ("20",)), p.Ack)
        reply = client.run(b"slow-1")  # nonce 1097557: 16 progress reports
        assert isinstance(reply, p.SliceDone)
        assert client.progress and all(0 <= f <= 1 for f in client.progress)
    finally:
        client.close()
