"""cProfile for the scheduler processes a benchmark starts (``DCP_BENCH_PROFILE=DIR``).

benchmarks/common.py puts this directory first on the ``PYTHONPATH`` of the processes it
starts when ``DCP_BENCH_PROFILE`` is set; Python imports ``sitecustomize`` at start-up, and a
``python -m scheduler ... serve`` process then runs under cProfile, writing
``DIR/scheduler-<pid>.prof`` when it exits (SIGINT: a graceful stop runs the exit hooks). Other
processes (workers, Dask) are left alone. Read one with ``python -m pstats FILE``.
"""

from __future__ import annotations

import atexit
import cProfile
import os
import sys

_DIR = os.environ.get("DCP_BENCH_PROFILE", "")

if _DIR and sys.orig_argv[1:3] == ["-m", "scheduler"] and "serve" in sys.orig_argv:
    _profile = cProfile.Profile()
    _profile.enable()

    def _dump() -> None:
        _profile.disable()
        os.makedirs(_DIR, exist_ok=True)
        _profile.dump_stats(os.path.join(_DIR, f"scheduler-{os.getpid()}.prof"))

    atexit.register(_dump)
