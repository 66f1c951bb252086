"""The message layer against msgspec, in the same run: is our codec worth keeping?

Ours is ``dcp_protocol``'s: dataclasses with encoders and decoders planned per class from their
field types (messages.py), JSON through the standard library, the nesting bound scanned before
decoding (nesting.py), every field's type and range checked. The peer is msgspec's typed JSON
codec (``msgspec.json``) and its MessagePack (``msgspec.msgpack``: bytes as they are, no
base64), over Structs that mirror the same messages with the same checks where msgspec can say
them (``Meta`` ranges and patterns; the rest in ``__post_init__``), so both refuse what the
protocol refuses.

Frames, as the hot paths carry them: a ``results`` frame of 64 signed 16-byte results (the
scheduler decodes one per batch), one of a single 64 KiB result, and a ``slice_done`` of 16
bytes (the worker decodes one per slice). Each figure is the median of R rounds of a timed
loop; ratios are ours / peer per frame (above 1: the peer is faster).

    python benchmarks/codec.py [--quick] [--rounds R]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import median, report  # noqa: E402

import dcp_protocol as p  # noqa: E402
from dcp_protocol.limits import MAX_INT64, MAX_RESULTS_PER_FRAME  # noqa: E402

Count = Annotated[int, msgspec.Meta(ge=0, le=MAX_INT64)]
Seconds = Annotated[float, msgspec.Meta(ge=0)]
Hex130 = Annotated[str, msgspec.Meta(pattern="^[0-9a-fA-F]{130}$")]
Address = Annotated[str, msgspec.Meta(pattern="^0x[0-9a-fA-F]{40}$")]


class MMetrics(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    wall_seconds: Seconds = 0.0
    cpu_seconds: Seconds = 0.0
    bytes_in: Count = 0
    bytes_out: Count = 0
    gpu_seconds: Seconds = 0.0


class MResultItem(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    job: str
    slice: Count
    token: str
    result: bytes
    payment_address: Address
    signature: Hex130
    metrics: MMetrics = MMetrics()


class MResults(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag="results"):
    id: Count
    results: Annotated[tuple[MResultItem, ...], msgspec.Meta(min_length=1)]
    v: Literal[1] = 1

    def __post_init__(self) -> None:
        if len(self.results) > MAX_RESULTS_PER_FRAME:
            raise ValueError(f"results holds 1..{MAX_RESULTS_PER_FRAME} results")


class MSliceDone(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag="slice_done"):
    re: Count
    result: bytes
    metrics: MMetrics
    v: Literal[1] = 1


def frames() -> dict[str, tuple[p.Message, msgspec.Struct, dict[str, type[p.Message]]]]:
    metrics = p.Metrics(wall_seconds=0.001, cpu_seconds=0.001, bytes_in=16, bytes_out=16)
    m_metrics = MMetrics(0.001, 0.001, 16, 16)
    address, signature = "0x" + "ab" * 20, "cd" * 65

    def results(n: int, size: int) -> tuple[p.Results, MResults]:
        items = [
            (f"{'0' * 31}{i % 10}", i, f"{i}.1", bytes([65 + i % 26]) * size) for i in range(n)
        ]
        ours = p.Results(
            id=7,
            results=tuple(
                p.ResultItem(job, s, tok, res, address, signature, metrics)
                for job, s, tok, res in items
            ),
        )
        peer = MResults(
            id=7,
            results=tuple(
                MResultItem(job, s, tok, res, address, signature, m_metrics)
                for job, s, tok, res in items
            ),
        )
        return ours, peer

    r64, m64 = results(64, 16)
    big, mbig = results(1, 64 * 1024)
    done = p.SliceDone(re=3, result=b"x" * 16, metrics=metrics)
    mdone = MSliceDone(re=3, result=b"x" * 16, metrics=m_metrics)
    return {
        "results_64x16B": (r64, m64, p.SCHEDULER_MESSAGES),
        "results_1x64KiB": (big, mbig, p.SCHEDULER_MESSAGES),
        "slice_done_16B": (done, mdone, p.EVALUATOR_MESSAGES),
    }


def per_call(fn: Callable[[], Any], seconds: float) -> float:
    """Microseconds per call of ``fn``, timed over about ``seconds``."""
    n, started = 0, time.perf_counter()
    while True:
        for _ in range(20):
            fn()
        n += 20
        took = time.perf_counter() - started
        if took >= seconds:
            return took / n * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smoke mode: short, not saved")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    rounds, seconds = (1, 0.02) if args.quick else (args.rounds, 0.3)
    table: dict[str, dict[str, float]] = {}
    for name, (ours, peer, registry) in frames().items():
        ours_bytes = p.encode(ours)
        json_bytes = msgspec.json.encode(peer)
        pack_bytes = msgspec.msgpack.encode(peer)
        json_decoder = msgspec.json.Decoder(type(peer))
        pack_decoder = msgspec.msgpack.Decoder(type(peer))
        # Each decodes what it encoded into what it started from.
        assert p.decode(ours_bytes, registry) == ours
        assert json_decoder.decode(json_bytes) == peer == pack_decoder.decode(pack_bytes)
        runs: dict[str, list[float]] = {}
        for _ in range(rounds):
            for label, fn in (
                ("ours_encode_us", partial(p.encode, ours)),
                ("ours_decode_us", partial(p.decode, ours_bytes, registry)),
                ("msgspec_json_encode_us", partial(msgspec.json.encode, peer)),
                ("msgspec_json_decode_us", partial(json_decoder.decode, json_bytes)),
                ("msgpack_encode_us", partial(msgspec.msgpack.encode, peer)),
                ("msgpack_decode_us", partial(pack_decoder.decode, pack_bytes)),
            ):
                runs.setdefault(label, []).append(per_call(fn, seconds))
        row = {label: round(median(v), 2) for label, v in runs.items()}
        row["bytes_ours"], row["bytes_msgpack"] = len(ours_bytes), len(pack_bytes)
        for peer_name in ("msgspec_json", "msgpack"):
            for step in ("encode", "decode"):
                row[f"ours_over_{peer_name}_{step}"] = round(
                    row[f"ours_{step}_us"] / row[f"{peer_name}_{step}_us"], 2
                )
        table[name] = row
        print(name, row, file=sys.stderr)
    report(
        "codec",
        {
            "rounds": rounds,
            "frames": table,
            "msgspec": msgspec.__version__,
            "note": "ours / peer per frame: above 1, msgspec is faster",
        },
        save=not args.quick,
    )


if __name__ == "__main__":
    main()
