"""Parse an update's body with a typed msgspec decoder: tensor bytes stay views of the payload.

Why: :func:`fedmqtt.wire.parse` (msgpack, then a check per field in Python) copies every
tensor's bytes out of the payload and spends a few microseconds of bytecode on the eleven
fields. msgspec decodes into the declared types below in C, checks them on the way, and leaves
each ``bin`` as a ``memoryview`` of the payload (zero copy; the payload is immutable ``bytes``
and the views keep it alive); the CPU it saves per update is measured by
``bench/engine.py --parsers`` (docs/benchmarks.md, "The engine alone").

The rules are :data:`fedmqtt.wire.UPDATE_FIELDS`, the one declaration of the update body, which
:func:`fedmqtt.wire.parse` checks field by field; ``_Body`` below declares the same fields, types
and limits as msgspec types (tests/test_updatebody.py compares them field by field, and every
change to one must be made to the other). The reference stays the wire module: this decoder accepts
only bodies the reference accepts, and yields the same :class:`~fedmqtt.wire.Update` (tensor
bytes as views instead of copies). Everything else -- any msgspec error, a field the types
below do not declare, a string or container longer than the reference allows -- is handed to
the reference parser, so a rejected update gets exactly the reference's reason and detail.
Only authenticated bodies get here (the MAC is checked first), so the second parse of a bad one
costs nothing an outsider can trigger. The reference's msgpack limits are mirrored as type
constraints; strings are bounded in characters at a quarter of the reference's byte limit (a
UTF-8 character takes at most four bytes), longer ones take the reference path. One difference
is deliberate and harmless: a map that repeats a key more often than msgpack's entry limit
allows is refused by the reference and read here with the last value winning, as msgpack does
below the limit.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Final, Literal

import msgspec
from msgspec import UNSET, Meta, UnsetType

from fedmqtt import wire

_MAX_TEXT: Final = wire.MAX_STR_BYTES // 4  # characters: at most MAX_STR_BYTES in UTF-8
_F: Final = wire.UPDATE_FIELD
Text = Annotated[str, Meta(max_length=_MAX_TEXT)]


class _Tensor(msgspec.Struct, forbid_unknown_fields=True):
    """One encoded tensor; which fields a codec needs is checked by :mod:`fedmqtt.codecs`."""

    c: Text
    s: Annotated[list[int], Meta(max_length=wire.MAX_ARRAY_LEN)]
    d: memoryview
    z: bool | UnsetType = UNSET
    q: int | float | UnsetType = UNSET  # as sent: the codec checks and converts it
    k: int | UnsetType = UNSET
    i: memoryview | UnsetType = UNSET
    g: memoryview | UnsetType = UNSET


class _Body(msgspec.Struct, forbid_unknown_fields=True):
    """:data:`fedmqtt.wire.UPDATE_FIELDS` as msgspec types, in the same order."""

    v: Literal[1]
    type: Literal["update"]
    federation: Text
    sender: Text
    update_id: Annotated[str, Meta(min_length=_F["update_id"].lo, max_length=_F["update_id"].hi)]
    seq: Annotated[int, Meta(ge=_F["seq"].lo)]
    base_version: Annotated[int, Meta(ge=_F["base_version"].lo)]
    num_samples: Annotated[int, Meta(ge=_F["num_samples"].lo)]
    spec: Text
    metrics: Annotated[dict[Text, float], Meta(max_length=wire.MAX_MAP_LEN)]
    created_at: float
    delta: Annotated[dict[Text, _Tensor], Meta(max_length=wire.MAX_MAP_LEN)]


_ID_LO, _ID_HI = _F["update_id"].lo, _F["update_id"].hi
assert _ID_LO is not None and _ID_HI is not None
_HEX_ID: Final = Meta(min_length=_ID_LO // 2, max_length=_ID_HI // 2)  # bytes: 2 hex digits each


class _CompactBody(msgspec.Struct, forbid_unknown_fields=True, rename=dict(wire.SHORT_KEYS)):
    """:class:`_Body` in the compact form (:data:`fedmqtt.wire.SHORT_KEYS`): the same fields
    under their short keys, the update id and spec fingerprint as bytes (hex after decoding).
    A text id or fingerprint (legal, not lowercase hex) takes the reference path."""

    v: Literal[1]
    type: Literal["update"]
    federation: Text
    sender: Text
    update_id: Annotated[bytes, _HEX_ID]
    seq: Annotated[int, Meta(ge=_F["seq"].lo)]
    base_version: Annotated[int, Meta(ge=_F["base_version"].lo)]
    num_samples: Annotated[int, Meta(ge=_F["num_samples"].lo)]
    spec: Annotated[bytes, Meta(min_length=1, max_length=_MAX_TEXT // 2)]
    metrics: Annotated[dict[Text, float], Meta(max_length=wire.MAX_MAP_LEN)]
    created_at: float
    delta: Annotated[dict[Text, _Tensor], Meta(max_length=wire.MAX_MAP_LEN)]


_DECODER: Final = msgspec.msgpack.Decoder(_Body)
_COMPACT_DECODER: Final = msgspec.msgpack.Decoder(_CompactBody)


def parse_update(env: wire.Envelope, *, max_bytes: int) -> wire.Update:
    """The update in a verified envelope; raises only :class:`~fedmqtt.errors.DecodeError`,
    with the reference parser's reason and detail."""
    body: _Body | _CompactBody | None
    try:
        body = (_COMPACT_DECODER if env.compact else _DECODER).decode(env.body)
    except Exception:  # msgspec.DecodeError, ValidationError, UnicodeDecodeError, RecursionError
        body = None
    if body is None or not math.isfinite(body.created_at):
        return wire.parse(env, wire.Update, max_bytes=max_bytes)
    update_id, spec = body.update_id, body.spec
    return wire.Update(
        federation=body.federation,
        sender=body.sender,
        update_id=update_id if isinstance(update_id, str) else update_id.hex(),
        seq=body.seq,
        base_version=body.base_version,
        num_samples=body.num_samples,
        spec_fingerprint=spec if isinstance(spec, str) else spec.hex(),
        delta={name: _as_map(t) for name, t in body.delta.items()},
        metrics=body.metrics,
        created_at=body.created_at,
    )


def _as_map(t: _Tensor) -> dict[str, Any]:
    """The tensor as the map :mod:`fedmqtt.codecs` decodes, with only the fields it had."""
    out: dict[str, Any] = {"c": t.c, "s": t.s, "d": t.d}
    if t.z is not UNSET:
        out["z"] = t.z
    if t.q is not UNSET:
        out["q"] = t.q
    if t.k is not UNSET:
        out["k"] = t.k
    if t.i is not UNSET:
        out["i"] = t.i
    if t.g is not UNSET:
        out["g"] = t.g
    return out
