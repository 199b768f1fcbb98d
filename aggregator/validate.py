"""The validation pipeline every update goes through before it may touch the model.

Steps, cheapest first, each refusing with a reason constant from :mod:`fedmqtt.errors`:

1. ``size``: payload above ``[limits] max_update_bytes`` (before any parsing);
2. ``schema``: not a fedmqtt envelope (header parsed with tight msgpack limits);
3. ``unknown_device``: no enrolled key for the device named by the topic;
4. ``signature``: MAC / signature over the body bytes does not verify with that key;
5. ``schema``: body not a valid update (parsed without copying its tensors,
   :mod:`aggregator.updatebody`); ``federation`` / ``sender_mismatch``: for another
   federation, or the body's sender is not the topic's device (the broker's ACL pins the topic);
6. ``spec``: trained for another model (spec fingerprint);
7. ``future`` / ``stale``: ``base_version`` newer than the current version, or staleness
   ``version - base_version`` above ``max_staleness``;
8. ``replay``: ``update_id`` already accepted (see :mod:`aggregator.replay`);
8'. ``not_selected``: the plan's selection did not let the device train on the update's base
    version (:mod:`aggregator.cohort`);
8a. ``rate_limited``: the device sends faster than ``[limits] device_rate``
    (:mod:`aggregator.ratelimit`);
8b. ``device_quota``: the device already holds ``[strategy] max_per_device`` rows of the buffer
    (FedAsync: of the last ``device_window`` versions), see
    :meth:`aggregator.strategies.Strategy.admit` (FedBuff holds the device's latest update over
    the bound for the next buffer and refuses one it replaces as ``superseded``,
    :mod:`aggregator.engine`);
9. ``shape`` / ``size`` / ``codec`` / ``nonfinite``: the delta does not decode into exactly the
   model's tensors with finite values (decoded straight into the caller's buffer row);
10. ``norm``: L2 norm above ``[limits] max_norm``, above ``norm_reject_factor`` times the
    median norm of recently accepted updates, or above :data:`HARD_MAX_NORM`.

Steps 1-6 and 9 depend only on the message (:func:`open_update`, :func:`decode_delta`): the
scale-out worker processes run them. Steps 7, 8 and 10 depend on the aggregator's state
(:func:`check_staleness`, :func:`check_replay`, :class:`NormGate`), and so do 8a and 8b: the
owner runs them.
Signature verification comes before parsing the body, so forged bytes are never parsed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

from aggregator.devices import DeviceKeys
from aggregator.replay import ReplayWindow
from aggregator.updatebody import parse_update
from fedmqtt import wire
from fedmqtt.aggregation.robust import NormBound
from fedmqtt.codecs import Limits, decode_params_norm, defers_int8_scales
from fedmqtt.errors import (
    FEDERATION,
    FUTURE,
    NORM,
    REPLAY,
    SCHEMA,
    SENDER_MISMATCH,
    SIZE,
    SPEC,
    STALE,
    UNKNOWN_DEVICE,
    RejectedError,
)
from fedmqtt.params import F32, Layout
from fedmqtt.topics import update_device

# No honest delta of a float32 model comes near this; bounding every accepted row keeps sums of
# a whole buffer far from float32 overflow even when no adaptive bound is configured.
HARD_MAX_NORM: Final = 1e12


@dataclass(frozen=True, slots=True)
class UpdateMeta:
    """What the aggregator keeps of an update besides its delta."""

    sender: str
    update_id: str
    seq: int
    base_version: int
    num_samples: int
    created_at: float
    nbytes: int
    # An autoencoder update's score-quantile report, (level, value) pairs (see
    # wire.SCORE_QUANTILE_PREFIX), None if absent.
    score_quantiles: tuple[tuple[float, float], ...] | None = None


def open_update(
    topic: str,
    payload: bytes,
    *,
    federation: str,
    fingerprint: str,
    keys: DeviceKeys,
    max_bytes: int,
) -> tuple[UpdateMeta, dict[str, Any]]:
    """Steps 1-6: authenticate and parse an update; returns its metadata and encoded delta."""
    if len(payload) > max_bytes:
        raise RejectedError(SIZE, f"update of {len(payload)} bytes exceeds {max_bytes}")
    device = update_device(topic, federation)
    if device is None:
        raise RejectedError(SCHEMA, f"not an update topic: {topic[:80]!r}")
    env = wire.open_envelope(payload, max_bytes=max_bytes)
    verifier = keys.get(device)
    if verifier is None:
        raise RejectedError(UNKNOWN_DEVICE, f"no enrolled key for device {device!r}")
    env.verify(verifier)
    upd = parse_update(env, max_bytes=max_bytes)
    if upd.federation != federation:
        raise RejectedError(FEDERATION, f"update for federation {upd.federation[:64]!r}")
    if upd.sender != device:
        raise RejectedError(
            SENDER_MISMATCH, f"body says sender {upd.sender[:64]!r}, topic says {device!r}"
        )
    if upd.spec_fingerprint != fingerprint:
        raise RejectedError(
            SPEC, f"trained for model {upd.spec_fingerprint[:32]!r}, current is {fingerprint!r}"
        )
    meta = UpdateMeta(
        sender=device,
        update_id=upd.update_id,
        seq=upd.seq,
        base_version=upd.base_version,
        num_samples=upd.num_samples,
        created_at=upd.created_at,
        nbytes=len(payload),
        score_quantiles=wire.score_quantiles(upd.metrics),
    )
    return meta, upd.delta


def check_staleness(base_version: int, version: int, max_staleness: int) -> int:
    """Step 7: the staleness ``tau`` of an update, or RejectedError (future / stale)."""
    tau = version - base_version
    if tau < 0:
        raise RejectedError(FUTURE, f"base version {base_version} is newer than {version}")
    if tau > max_staleness:
        raise RejectedError(STALE, f"staleness {tau} exceeds max_staleness {max_staleness}")
    return tau


class ReplayError(RejectedError):
    """A replayed update; carries its id so the caller can tell when the original is durable."""

    def __init__(self, update_id: str) -> None:
        super().__init__(REPLAY, f"update {update_id!r} was already accepted")
        self.update_id = update_id


def check_replay(update_id: str, window: ReplayWindow) -> None:
    """Step 8."""
    if update_id in window:
        raise ReplayError(update_id)


def limits_for(layout: Layout, max_bytes: int) -> Limits:
    """Decoder limits for this model: no tensor larger than the model's largest one."""
    largest = max(layout.sizes) if layout.sizes else 0
    # topk carries at most 4-byte values and 4-byte indices: at most 8 bytes per element.
    return Limits(max_elements=largest, max_ndim=2, max_data_bytes=min(max_bytes, 8 * largest))


def scale_segments(layout: Layout) -> list[tuple[int, int]] | None:
    """The tensor segments a strategy keeps int8 scales for (``build_strategy(...,
    segments)``): the layout's, where :func:`decode_delta` can leave int8 tensors unscaled
    (:func:`fedmqtt.codecs.defers_int8_scales`), else None (the rows hold the values)."""
    return list(layout.offsets().values()) if defers_int8_scales(layout) else None


def decode_delta(
    delta: dict[str, Any], layout: Layout, limits: Limits, out: F32, scales: F32 | None = None
) -> float:
    """Step 9: decode into ``out`` (the model's flat layout); returns the delta's L2 norm.

    The decoder computes the norm with its finiteness check (one pass over each tensor, see
    :func:`fedmqtt.codecs.decode_params_norm`) instead of a second pass over ``out`` here.
    With ``scales`` (one per tensor), int8 tensors of a large model are left unscaled and their
    scales go there, for the strategy to apply (:meth:`aggregator.strategies.Strategy.slot`).
    """
    return decode_params_norm(delta, layout, limits=limits, out=out, scales=scales)[1]


class NormGate:
    """Step 10, and the running median of accepted norms that clipping also uses."""

    def __init__(
        self, *, max_norm: float, reject_factor: float, window: int, min_samples: int
    ) -> None:
        self.max_norm = max_norm
        self.reject_factor = reject_factor
        self.history = NormBound(factor=1.0, window=window, min_samples=min_samples)
        self._median: float | None = None
        self._dirty = True

    def median(self) -> float | None:
        if self._dirty:
            self._median = self.history.bound()
            self._dirty = False
        return self._median

    def check(self, norm: float) -> None:
        if not norm <= HARD_MAX_NORM:  # also NaN
            raise RejectedError(NORM, f"norm {norm:.3g} above the hard limit {HARD_MAX_NORM:g}")
        if self.max_norm > 0 and norm > self.max_norm:
            raise RejectedError(NORM, f"norm {norm:.4g} above max_norm {self.max_norm:g}")
        if self.reject_factor > 0:
            med = self.median()
            if med is not None and norm > self.reject_factor * med:
                raise RejectedError(
                    NORM, f"norm {norm:.4g} above {self.reject_factor:g} x median {med:.4g}"
                )

    def observe(self, norm: float) -> None:
        self.history.observe(norm)
        self._dirty = True

    def to_state(self) -> dict[str, Any]:
        return self.history.to_state()

    def restore(self, state: dict[str, Any]) -> None:
        restored = NormBound.from_state(state)
        self.history = NormBound(
            factor=1.0, window=self.history.window, min_samples=self.history.min_samples
        )
        for n in restored.to_state()["norms"][-self.history.window :]:
            self.history.observe(n)
        self._dirty = True
