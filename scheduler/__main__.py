"""``python -m scheduler`` is ``dcp-scheduler``."""

from __future__ import annotations

from .cli import main

main(prog_name="dcp-scheduler")
