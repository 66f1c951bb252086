"""The hostile mode of benchmarks/scale.py in smoke mode: both windows measured in one run, and
the scheduler closed or refused the hostile clients by name (figures are not asserted)."""

from __future__ import annotations

import json
import subprocess
import sys

from .conftest import ROOT


def test_scale_with_hostile_clients_smoke() -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "scale.py"), "--quick", "--hostile", "10"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    assert figures["benchmark"] == "scale_hostile"
    load = figures["workers_20_compute_0.2s"]
    for window in ("honest_alone", "with_hostile"):
        assert load[window]["results_per_s"] > 0 and load[window]["lease_p99_ms"] > 0
    hostile = load["hostile"]
    # Never-authenticating websockets closed at the deadline; a half-sent body refused (408).
    assert hostile.get("ws_closed_4008", 0) > 0
    assert hostile.get("http_closed_408", 0) > 0
    assert hostile["forged_results"] > 0 and hostile["flood_frames"] > 0
