"""What fresh memory costs on this machine: first touch against rewriting memory already mapped.

A broker queueing updates for a subscriber that is behind writes every queued update to memory
it has never touched. The kernel must hand it zeroed pages, and in a virtual machine whose
host backs guest memory on demand (or takes freed memory back), the first touch can also wait
for the host. That cost lands on whichever process grows, so it decides how much the broker
spends per message behind a slower subscriber (bench/results/aggregator_ingestion.md, "Huge
pages for the broker's heap, and what fresh memory costs here").

Each repetition runs a fresh process that maps ``--mb`` MiB and writes every byte (first
touch), then writes it all again (rewrite), and reports both as GB/s. Repetitions follow each
other after ``--pause`` seconds, so the spread shows how quickly freed memory turns cold again.

    .venv/bin/python bench/first_touch.py [--mb 800] [--repeat 6] [--pause 0,5]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

CHILD = """
import time, numpy as np
n = {mb} << 20
t0 = time.perf_counter()
a = np.ones(n, dtype=np.uint8)
t1 = time.perf_counter()
a[:] = 2
t2 = time.perf_counter()
print(t1 - t0, t2 - t1)
"""


def one(mb: int) -> tuple[float, float]:
    """(first touch, rewrite) in GB/s, in a fresh process."""
    out = subprocess.run(
        [sys.executable, "-c", CHILD.format(mb=mb)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    gb = (mb << 20) / 1e9
    return gb / float(out[0]), gb / float(out[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=800, help="MiB per process (a broker's backlog)")
    ap.add_argument("--repeat", type=int, default=6)
    ap.add_argument(
        "--pause",
        default="0,5",
        type=lambda s: [float(x) for x in s.split(",")],
        help="seconds between repetitions; each value is one series",
    )
    args = ap.parse_args()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {platform.platform()}")
    print("\n| pause s | first touch GB/s (each repetition) | rewrite GB/s |")
    print("|---|---|---|")
    results = {}
    for pause in args.pause:
        runs = []
        for i in range(args.repeat):
            if i:
                time.sleep(pause)
            runs.append(one(args.mb))
        results[pause] = runs
        first = " / ".join(f"{f:.2f}" for f, _ in runs)
        rewrite = f"{min(r for _, r in runs):.1f}-{max(r for _, r in runs):.1f}"
        print(f"| {pause:g} | {first} | {rewrite} |")
    print(json.dumps({str(k): v for k, v in results.items()}))


if __name__ == "__main__":
    main()
