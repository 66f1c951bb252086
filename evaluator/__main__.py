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
    args = parser.parse_args(argv)
    os.umask(0o077)
    from .process import serve_stdio

    return serve_stdio(args.withhold_opencl, args.runs_as)


if __name__ == "__main__":
    sys.exit(main())
