"""The worker's log levels beyond the standard five: :data:`NOTICE`.

Here, not in :mod:`dcp_worker.logs`, so that the pure state (``state.py``, which does no I/O)
can log at it; ``logs.py`` maps it to each output (the journal's and syslog's severity 5).
"""

from __future__ import annotations

import logging

__all__ = ["NOTICE"]

#: Syslog's "normal but significant condition" (severity 5), between INFO and WARNING: what
#: a volunteer needs to see that the worker works (it started, it connected, the first work,
#: the first accepted result), a few lines a run, never one per slice. Shown by default.
NOTICE = 25
logging.addLevelName(NOTICE, "NOTICE")
