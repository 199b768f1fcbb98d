"""bench/message_overhead.py accounts for every byte of the long form of the messages it
describes, and measures the compact form the project sends."""

from __future__ import annotations

from bench.message_overhead import messages


def test_the_parts_add_up_to_the_message() -> None:
    rows = {r["message"]: r for r in messages("softmax", (32,), "int8")}
    assert set(rows) == {"update", "model", "announce"}
    for r in rows.values():
        # a body is a fixmap (one byte of header) of its fields
        assert r["header"] + 1 + sum(r["fields"].values()) == r["total"], r
        assert r["overhead"] == r["total"] - r["tensors"]
        assert r["tensors"] < r["compact"] < r["total"]
    assert rows["update"]["tensors"] > 650 and rows["model"]["tensors"] > 650  # int8, 650 weights
    assert rows["announce"]["tensors"] == 0
