#!/bin/sh
# Rebuild the example work functions from source with zig's clang (ziglang on PyPI).
# The outputs are committed; tests/test_examples.py checks that a rebuild is byte-identical.
#   PYTHON=path/to/python examples/build.sh [OUTDIR]
set -eu
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-$here}
py=${PYTHON:-python3}
cc() { "$py" -m ziglang cc -target wasm32-wasi -O2 -s "$@"; }
mkdir -p "$out/hash-puzzle" "$out/echo"
cc -o "$out/hash-puzzle/puzzle.wasm" "$here/hash-puzzle/puzzle.c"
cc -o "$out/hash-puzzle/verify.wasm" "$here/hash-puzzle/verify.c"
cc -o "$out/echo/echo.wasm" "$here/echo/echo.c"
