"""cProfile for the scheduler processes a benchmark starts (``DCP_BENCH_PROFILE=DIR``).

benchmarks/common.py puts this directory first on the ``PYTHONPATH`` of the processes it
starts when ``DCP_BENCH_PROFILE`` is set; Python imports ``sitecustomize`` at start-up, and a
``python -m scheduler ... serve`` process then runs under cProfile, writing
``DIR/scheduler-<pid>.prof`` when it exits (SIGINT: a graceful stop runs the exit hooks), and
so does a ``dcp-worker`` (``DIR/worker-<pid>.prof``). Other processes (evaluators, which run
isolated, and Dask) are left alone. Read one with ``python -m pstats FILE``.
"""

from __future__ import annotations

import atexit
import cProfile
import os
import sys

_DIR = os.environ.get("DCP_BENCH_PROFILE", "")

_SCHEDULER = sys.orig_argv[1:3] == ["-m", "scheduler"] and "serve" in sys.orig_argv
_WORKER = len(sys.orig_argv) > 1 and os.path.basename(sys.orig_argv[1]) == "dcp-worker"

if _DIR and (_SCHEDULER or _WORKER):
    _profile = cProfile.Profile()
    _profile.enable()

    def _dump() -> None:
        _profile.disable()
        os.makedirs(_DIR, exist_ok=True)
        name = "scheduler" if _SCHEDULER else "worker"
        _profile.dump_stats(os.path.join(_DIR, f"{name}-{os.getpid()}.prof"))

    atexit.register(_dump)
