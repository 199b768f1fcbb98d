"""Cost of authenticating one update: HMAC-SHA256 vs keyed BLAKE2b vs Ed25519, same run.

The aggregator verifies every update, so the per-update verify cost bounds ingestion. Sizes are
those of real updates: d=650 int8 (~0.7 KB), d=650 raw (2.6 KB), d=1e5 raw (400 KB) and d=1e6
int8 (1 MB). Run:  .venv/bin/python bench/auth.py [--repeat N]
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import platform
import secrets
import time
from collections.abc import Callable

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey


def best_us(fn: Callable[[], object], repeat: int) -> float:
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(repeat):
            fn()
        best = min(best, (time.perf_counter() - t) / repeat)
    return best * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeat", type=int, default=200)
    args = ap.parse_args()
    key = secrets.token_bytes(32)
    sk = Ed25519PrivateKey.generate()
    pk = sk.public_key()
    print(f"machine: {platform.machine()}, python {platform.python_version()}\n")
    print(
        "| payload | HMAC-SHA256 verify µs | BLAKE2b-keyed verify µs | Ed25519 verify µs |"
        " Ed25519 / HMAC |"
    )
    print("|---|---|---|---|---|")
    sizes = (("0.7 KB", 700), ("2.6 KB", 2600), ("400 KB", 400_000), ("1 MB", 1_000_000))
    for label, size in sizes:
        data = secrets.token_bytes(size)
        mac = hmac.digest(key, data, hashlib.sha256)
        b2 = hashlib.blake2b(data, key=key).digest()
        sig = sk.sign(data)
        rep = max(5, args.repeat if size < 10_000 else args.repeat // 20)

        def v_hmac(data: bytes = data, mac: bytes = mac) -> bool:
            return hmac.compare_digest(hmac.digest(key, data, hashlib.sha256), mac)

        def v_blake(data: bytes = data, b2: bytes = b2) -> bool:
            return hmac.compare_digest(hashlib.blake2b(data, key=key).digest(), b2)

        def v_ed(data: bytes = data, sig: bytes = sig) -> None:
            pk.verify(sig, data)

        h, b, e = best_us(v_hmac, rep), best_us(v_blake, rep), best_us(v_ed, rep)
        print(f"| {label} | {h:.1f} | {b:.1f} | {e:.1f} | {e / h:.1f}× |")


if __name__ == "__main__":
    main()
