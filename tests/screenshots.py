"""Where the tests' screenshots go."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

#: Where the tests' screenshots land: docs/img/ (the docs show them, docs/console.md) with
#: ``make screenshots`` (DCP_SCREENSHOTS=1); otherwise a directory of their own under the
#: system's temporary one, so that a test run leaves the checkout as it was.
SHOTS = (
    Path(__file__).parents[1] / "docs" / "img"
    if os.environ.get("DCP_SCREENSHOTS") == "1"
    else Path(tempfile.gettempdir()) / f"dcp-screenshots-{os.getuid()}"
)
SHOTS.mkdir(parents=True, exist_ok=True)
