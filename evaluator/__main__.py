"""``dcp-evaluator-start``: start one evaluator."""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="dcp-evaluator-start",
        description="Start one sandboxed evaluator that speaks the framed protocol "
        "(docs/protocol.md) on stdin/stdout; logs go to stderr.",
    )
    parser.add_argument(
        "--stdio",
        action="store_true",
        required=True,
        help="speak over stdin/stdout (the only transport of an evaluator)",
    )
    parser.add_argument(
        "--withhold-opencl",
        metavar="REASON",
        help="offer and run no OpenCL; describe says this reason",
    )
    parser.add_argument(
        "--runs-as",
        metavar="UID",
        type=int,
        help="the user this evaluator runs as, seen by whoever started it (describe says it)",
    )
    parser.add_argument(
        "--interpreters",
        metavar="DIR",
        help="where the python and js interpreters are installed (dcp-worker interpreters "
        "install); default: ~/.local/share/dcp-worker/interpreters of this user",
    )
    args = parser.parse_args(argv)
    os.umask(0o077)
    from pathlib import Path

    from .process import serve_stdio

    interpreters = Path(args.interpreters) if args.interpreters else None
    return serve_stdio(args.withhold_opencl, args.runs_as, interpreters)


if __name__ == "__main__":
    sys.exit(main())
