"""Benchmark of the tensor codecs: bytes on the wire, encode and decode+validate throughput.

Not a test: it prints a markdown table (and appends it to ``--out`` if given) for the
benchmarks doc. For each tensor size d and codec it reports

- wire bytes: ``len(msgpack.packb(encode_tensor(x)))``, and its ratio to the d*4 raw float32
  bytes;
- encode MB/s: ``encode_tensor`` (map only, no msgpack), per MB of float32 payload;
- decode MB/s: ``decode_tensor(map, out=buf)`` on the unpacked map, i.e. validation plus
  writing into a preallocated vector, as the aggregator does;
- copy MB/s: a plain ``np.copyto(buf, np.frombuffer(raw_bytes, "<f4"))`` of the same float32
  bytes, measured in the same run; decode is reported as a percentage of it.

Every figure is the best of several repeats (``time.perf_counter``), each repeat looping long
enough to dwarf the timer's resolution. Run from the repository root:

    .venv/bin/python bench/codecs.py [--quick] [--out FILE]
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable
from typing import Any

import msgpack
import numpy as np

from fedmqtt.codecs import Codec, decode_tensor, encode_tensor

CODECS = [
    "raw",
    "fp16",
    "int8",
    "int4",
    "topk:0.01",
    "int8+zlib",
    "topk:0.01+zlib",
    "topk:0.01+int8",
    "topk:0.01+int8+zlib",
]
SIZES = [1_000, 100_000, 1_000_000]
GOAL = 25.0  # decode of raw and int8 must reach this % of the plain copy rate


def seconds_per_call(fn: Callable[[], object], repeats: int, min_sample: float) -> float:
    """Best time of one call over ``repeats`` samples of at least ``min_sample`` seconds."""
    number = 1
    while True:  # calibrate the inner loop count
        start = time.perf_counter()
        for _ in range(number):
            fn()
        elapsed = time.perf_counter() - start
        if elapsed >= min_sample:
            break
        number *= 2 if elapsed <= 0 else max(2, min(100, int(1.2 * min_sample / elapsed)))
    best = elapsed / number
    for _ in range(repeats - 1):
        start = time.perf_counter()
        for _ in range(number):
            fn()
        best = min(best, (time.perf_counter() - start) / number)
    return best


def machine() -> str:
    return (
        f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}; "
        f"Python {platform.python_version()}, numpy {np.__version__}, "
        f"msgpack {'.'.join(map(str, msgpack.version))}"
    )


def run(quick: bool) -> tuple[list[dict[str, Any]], list[str]]:
    repeats, min_sample = (3, 0.002) if quick else (9, 0.02)
    rows: list[dict[str, Any]] = []
    for d in SIZES:
        rng = np.random.default_rng(d)
        x = (rng.standard_normal(d) * 0.01).astype(np.float32)  # a typical model delta
        raw = x.tobytes()
        buf = np.empty(d, dtype=np.float32)
        mb = 4 * d / 1e6

        def copy(raw: bytes = raw, buf: np.ndarray[Any, Any] = buf) -> None:
            np.copyto(buf, np.frombuffer(raw, dtype="<f4"))

        copy_time = seconds_per_call(copy, repeats, min_sample)
        first_row = len(rows)
        for text in CODECS:
            codec = Codec.parse(text)
            msg = encode_tensor(x, codec, rng=rng)
            wire = msgpack.packb(msg, use_bin_type=True)
            obj = msgpack.unpackb(wire, raw=False)

            def encode(x: Any = x, codec: Codec = codec, rng: Any = rng) -> None:
                encode_tensor(x, codec, rng=rng)

            def decode(obj: Any = obj, buf: Any = buf) -> None:
                decode_tensor(obj, out=buf)

            enc = seconds_per_call(encode, repeats, min_sample)
            dec = seconds_per_call(decode, repeats, min_sample)
            rows.append(
                {
                    "d": d,
                    "codec": text,
                    "wire": len(wire),
                    "ratio": len(wire) / len(raw),
                    "encode": mb / enc,
                    "decode": mb / dec,
                }
            )
        # The reference copy is timed before and after the codecs; keep the faster, so that
        # a noisy moment cannot flatter the codecs.
        copy_time = min(copy_time, seconds_per_call(copy, repeats, min_sample))
        for row in rows[first_row:]:
            row["copy"] = mb / copy_time
            row["pct"] = 100.0 * row["decode"] / row["copy"]
    verdicts = []
    for row in rows:
        if row["codec"] in ("raw", "int8"):
            ok = "met" if row["pct"] >= GOAL else "NOT met"
            verdicts.append(
                f"- d={row['d']:,} {row['codec']}: decode at {row['pct']:.0f} % of copy, "
                f"goal >= {GOAL:.0f} % {ok}"
            )
    return rows, verdicts


def markdown(rows: list[dict[str, Any]], verdicts: list[str], command: str) -> str:
    lines = [
        f"Machine: {machine()}",
        "",
        f"Command: `{command}`",
        "",
        "| d | codec | wire bytes | wire / raw f32 | encode MB/s | decode MB/s | copy MB/s "
        "| decode % of copy |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['d']:,} | {r['codec']} | {r['wire']:,} | {r['ratio']:.3f} "
            f"| {r['encode']:,.0f} | {r['decode']:,.0f} | {r['copy']:,.0f} | {r['pct']:.0f} % |"
        )
    lines += ["", *verdicts, ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="fewer, shorter repeats")
    parser.add_argument("--out", metavar="FILE", help="append the markdown to FILE")
    args = parser.parse_args(argv)
    command = shlex.join(["python", "bench/codecs.py", *(sys.argv[1:] if argv is None else argv)])
    rows, verdicts = run(args.quick)
    text = markdown(rows, verdicts, command)
    print(text)
    if args.out:
        with open(args.out, "a", encoding="utf-8") as fh:
            fh.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
