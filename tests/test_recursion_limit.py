"""No process of ours runs with a raised recursion limit.

A raised limit turns a deeply nested input into a C stack overflow (SIGSEGV) instead of a
RecursionError; py_ecc (once pulled in with eth-keyfile) raises it to 100,000 on import. Each
console script's module is imported in a fresh interpreter, and the keystore code is exercised
too, since it was what imported py_ecc, lazily.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

ENTRY_MODULES = [
    "dcp_worker.cli",
    "dcp_keys.wallet_cli",
    "scheduler.cli",
    "scheduler.client_cli",
    "evaluator.manager.cli",
    "evaluator.__main__",
]

PROBE = """
import importlib, json, sys, tempfile, os
before = sys.getrecursionlimit()
importlib.import_module(sys.argv[1])
imported = sys.getrecursionlimit()
from dcp_keys import identity
path = os.path.join(tempfile.mkdtemp(), "k.json")
identity.create_keystore(path, b"pw", iterations=1024)
identity.load_keystore(path, b"pw")
print(json.dumps({
    "before": before,
    "imported": imported,
    "after_keystores": sys.getrecursionlimit(),
    "py_ecc": sorted(m for m in sys.modules if m.split(".")[0] in ("py_ecc", "eth_keyfile")),
}))
"""


@pytest.mark.parametrize("module", ENTRY_MODULES)
def test_entry_module_keeps_the_default_recursion_limit(module: str) -> None:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, module], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout)
    assert seen["before"] == 1000
    assert seen["imported"] == 1000
    assert seen["after_keystores"] == 1000
    assert seen["py_ecc"] == []
