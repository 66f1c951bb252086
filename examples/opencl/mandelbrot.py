"""Render the Mandelbrot set on a compute platform: each slice is a tile, computed by an OpenCL
kernel (examples/opencl/mandelbrot.cl); this client deploys the tiles, collects the results in
slice order and assembles them into a PNG.

    python examples/opencl/mandelbrot.py --scheduler http://127.0.0.1:8500 \\
        --identity owner.json --passphrase-file pass.txt --out mandelbrot.png
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
import tempfile
import zlib
from pathlib import Path

HERE = Path(__file__).resolve().parent


def tiles(size: int, tile: int, max_iter: int) -> list[dict[str, float | int]]:
    """Tiles of a size x size view of [-2.2, 0.8] x [-1.5, 1.5], row by row."""
    step = 3.0 / size
    out = []
    for ty in range(0, size, tile):
        for tx in range(0, size, tile):
            out.append(
                {
                    "x0": -2.2 + tx * step,
                    "y0": -1.5 + ty * step,
                    "step": step,
                    "max_iter": max_iter,
                    "width": tile,
                    "height": tile,
                    "pixels": tile * tile,
                }
            )
    return out


def job_file(directory: Path, size: int, tile: int, max_iter: int) -> Path:
    values = [json.dumps(t) for t in tiles(size, tile, max_iter)]
    path = directory / "mandelbrot.toml"
    path.write_text(f"""name = "mandelbrot"
runtime = "opencl"
module = "{HERE / "mandelbrot.cl"}"
offer = 0

[opencl]
kernel = "tile"
global_size = ["datum:width", "datum:height"]
args = [
  {{ name = "x0", kind = "scalar", dtype = "float32", source = "datum:x0" }},
  {{ name = "y0", kind = "scalar", dtype = "float32", source = "datum:y0" }},
  {{ name = "step", kind = "scalar", dtype = "float32", source = "datum:step" }},
  {{ name = "max_iter", kind = "scalar", dtype = "uint32", source = "datum:max_iter" }},
  {{ name = "width", kind = "scalar", dtype = "uint32", source = "datum:width" }},
  {{ name = "out", kind = "output", dtype = "uint8", count = "datum:pixels" }},
]

[requirements]
"runtime.opencl" = "required"

[inputs]
values = {json.dumps(values)}
""")
    return path


def assemble(results: list[bytes], size: int, tile: int) -> list[bytearray]:
    """Rows of grey levels from tiles given row by row."""
    rows = [bytearray(size) for _ in range(size)]
    per_row = size // tile
    for index, data in enumerate(results):
        tx, ty = (index % per_row) * tile, (index // per_row) * tile
        for y in range(tile):
            rows[ty + y][tx : tx + tile] = data[y * tile : (y + 1) * tile]
    return rows


def write_png(path: Path, rows: list[bytearray]) -> None:
    """An RGB PNG: the set in black, the outside shaded by escape time."""
    height, width = len(rows), len(rows[0])
    raw = bytearray()
    for row in rows:
        raw.append(0)  # filter: none
        for level in row:
            if level == 255:
                raw += b"\x00\x00\x00"
            else:
                raw += bytes((min(255, level * 4), min(255, level * 2), 64 + level // 2))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    png = b"\x89PNG\r\n\x1a\n" + chunk(
        b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    )
    png += chunk(b"IDAT", zlib.compress(bytes(raw), 9)) + chunk(b"IEND", b"")
    path.write_bytes(png)


def main() -> int:
    sys.path.insert(0, str(HERE.parent.parent))
    from dcp_keys.identity import load_keystore, read_passphrase_file
    from scheduler.client import ComputeClient

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scheduler", default="http://127.0.0.1:8500")
    parser.add_argument("--identity", required=True)
    parser.add_argument("--passphrase-file", required=True)
    parser.add_argument("--out", default="mandelbrot.png")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--tile", type=int, default=128)
    parser.add_argument("--max-iter", type=int, default=200)
    args = parser.parse_args()
    if args.size % args.tile:
        parser.error("--size must be a multiple of --tile")
    owner = load_keystore(args.identity, read_passphrase_file(args.passphrase_file))
    with tempfile.TemporaryDirectory() as tmp, ComputeClient(args.scheduler, owner) as client:
        job = client.deploy(job_file(Path(tmp), args.size, args.tile, args.max_iter))
        results = []
        for r in client.results(job, wait=True, timeout=600):
            if r.result is None:
                print(f"tile {r.slice} failed: {r.error}", file=sys.stderr)
                return 1
            results.append(r.result)
    write_png(Path(args.out), assemble(results, args.size, args.tile))
    print(f"{args.out}: {args.size}x{args.size}, {len(results)} tiles from job {job}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
