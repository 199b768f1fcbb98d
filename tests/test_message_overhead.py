"""bench/message_overhead.py accounts for every byte of the messages it describes, and its
compact body carries the same values."""

from __future__ import annotations

import msgpack

from bench.message_overhead import _SHORT, compact_body, messages


def test_the_parts_add_up_to_the_message() -> None:
    rows = {r["message"]: r for r in messages("softmax", (32,), "int8")}
    assert set(rows) == {"update", "model", "announce"}
    for r in rows.values():
        # a body is a fixmap (one byte of header) of its fields
        assert r["header"] + 1 + sum(r["fields"].values()) == r["total"], r
        assert r["overhead"] == r["total"] - r["tensors"]
        assert r["compact"] < r["total"]
    assert rows["update"]["tensors"] > 650 and rows["model"]["tensors"] > 650  # int8, 650 weights
    assert rows["announce"]["tensors"] == 0


def test_the_compact_body_keeps_every_value() -> None:
    body = {"v": 1, "type": "update", "update_id": "ab" * 16, "spec": "0f" * 8, "seq": 3}
    packed = msgpack.unpackb(msgpack.packb(compact_body(body), use_bin_type=True))
    assert packed == {
        _SHORT["v"]: 1,
        _SHORT["type"]: "update",
        _SHORT["update_id"]: bytes.fromhex("ab" * 16),
        _SHORT["spec"]: bytes.fromhex("0f" * 8),
        _SHORT["seq"]: 3,
    }
