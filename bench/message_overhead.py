"""Where the bytes of one update, model and announcement go, in the long and the compact wire form.

Each message is built as the project sends it in ``fedmqtt simulate --dataset digits``
(the digits softmax spec, int8 tensors, the metrics an agent reports, the stats FedBuff
publishes, the aggregator's announcement) and sealed by :mod:`fedmqtt.wire` with the
signature the project uses for it (ChaCha20-Poly1305 for an update, Ed25519 from the
aggregator). The table gives each part's bytes in the long form (header v1, what releases
before the compact form send): the signature header, each body field (its key and value as
msgpack) and the tensors; then the whole message in the compact form (header v2, short keys,
hex ids as binary: what this release sends) and the bytes it saves.

    .venv/bin/python -m bench.message_overhead [--model mlp --hidden 1333] [--codec int8]
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import msgpack
import numpy as np

from fedmqtt import wire
from fedmqtt.codecs import Codec, encode_params
from fedmqtt.models import init_params
from fedmqtt.signing import ChaChaPolyKey, Ed25519Signer, Signer
from simulator.runner import SimConfig, federation_data

_TENSORS = ("delta", "params")


def _packed(obj: Any) -> int:
    return len(msgpack.packb(obj, use_bin_type=True))


def breakdown(name: str, body: dict[str, Any], signer: Signer) -> dict[str, Any]:
    """The long form's parts, and the size of the compact form of the same body."""
    payload = wire.seal(body, signer, compact=False)
    body_bytes = _packed(body)
    fields = {k: _packed({k: v}) - 1 for k, v in body.items()}  # minus the map header
    tensors = sum(_packed(v) for k, v in body.items() if k in _TENSORS)
    compact = len(wire.seal(body, signer))
    return {
        "message": name,
        "total": len(payload),
        "header": len(payload) - body_bytes,
        "fields": fields,
        "tensors": tensors,
        "overhead": len(payload) - tensors,
        "compact": compact,
    }


def messages(model: str, hidden: tuple[int, ...], codec: str) -> list[dict[str, Any]]:
    data = federation_data(SimConfig(dataset="digits", model=model, hidden=hidden, quiet=True))
    spec = data.spec
    rng = np.random.default_rng(0)
    params = init_params(spec, rng)
    enc = encode_params(params, Codec.parse(codec), rng=rng)
    now = time.time()
    update = wire.Update(
        federation="sim",
        sender="dev0007",
        update_id="5f" * 16,  # 128 bits as hex, as edge_agent.trainer.new_update_id
        seq=1234,
        base_version=456,
        num_samples=90,
        spec_fingerprint=spec.fingerprint(),
        delta=enc,
        metrics={"loss": 0.4321, "steps": 3.0, "train_cpu_s": 0.004321},
        created_at=now,
    )
    glob = wire.GlobalModel(
        "sim",
        "aggregator",
        457,
        spec,
        params,
        {"updates": 10.0, "samples": 900.0, "mean_staleness": 1.3, "max_staleness": 3.0},
        now,
        enc,
    )
    announce = wire.Announce("sim", "aggregator", 457, wire.UNSTATED_SPEC, now)
    agg = Ed25519Signer.generate()
    return [
        breakdown("update", update.to_body(), ChaChaPolyKey.generate()),
        breakdown("model", glob.to_body(), agg),
        breakdown("announce", announce.to_body(), agg),
    ]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="softmax", choices=["softmax", "mlp"])
    ap.add_argument("--hidden", default="32", help="mlp hidden widths, comma-separated")
    ap.add_argument("--codec", default="int8")
    args = ap.parse_args()
    hidden = tuple(int(w) for w in args.hidden.split(","))
    rows = messages(args.model, hidden, args.codec)
    print(
        "| message | long form | signature header | body fields (key + value) | tensors |"
        " all but tensors | compact form | saved |"
    )
    print("|---|---:|---:|---|---:|---:|---:|---:|")
    for r in rows:
        fields = ", ".join(f"{k} {n}" for k, n in r["fields"].items() if k not in _TENSORS)
        print(
            f"| {r['message']} | {r['total']} | {r['header']} | {fields} | {r['tensors']} | "
            f"{r['overhead']} | {r['compact']} | {r['total'] - r['compact']} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
