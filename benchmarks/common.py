"""Shared helpers of the benchmarks: medians, the final JSON line, result files."""

from __future__ import annotations

import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"


def median(values: list[float]) -> float:
    return statistics.median(values)


def machine() -> dict[str, Any]:
    import os

    return {
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "python": platform.python_version(),
    }


def report(name: str, figures: dict[str, Any], save: bool) -> None:
    """Print the figures as the last line (JSON); keep a copy under results/ unless quick."""
    figures = {
        "benchmark": name,
        **figures,
        "machine": machine(),
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    line = json.dumps(figures, sort_keys=True)
    if save:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / f"{name}.json").write_text(json.dumps(figures, indent=2, sort_keys=True) + "\n")
    print(line)
