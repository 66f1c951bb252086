"""An evaluator's scratch files live in the directory its starter made for it, so a killed
evaluator leaves nothing once that directory is removed."""

from __future__ import annotations

import os
from pathlib import Path

import dcp_protocol as p

from .evaluator_client import EvaluatorClient


def test_a_killed_evaluator_leaves_its_scratch_in_its_sandbox_directory(tmp_path: Path) -> None:
    sandbox = tmp_path / "sandbox"
    sandbox.mkdir(mode=0o700)
    client = EvaluatorClient(cwd=str(sandbox))
    try:
        assert isinstance(client.request(p.Describe(id=client.next_id())), p.Capabilities)
        cwd = Path(os.readlink(f"/proc/{client.proc.pid}/cwd"))
        assert cwd.parent == sandbox and cwd.name.startswith("dcp-evaluator-")
        assert cwd.stat().st_mode & 0o777 == 0o700
    finally:
        client.proc.kill()
        client.proc.wait(10)
        client.close()
    assert [d.name for d in sandbox.iterdir()] == [cwd.name]  # the worker's rmtree takes it


def test_a_shared_directory_gets_no_scratch(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o755)
    client = EvaluatorClient(cwd=str(shared))
    try:
        assert isinstance(client.request(p.Describe(id=client.next_id())), p.Capabilities)
        assert not Path(os.readlink(f"/proc/{client.proc.pid}/cwd")).is_relative_to(shared)
    finally:
        assert client.close() == 0
    assert list(shared.iterdir()) == []
