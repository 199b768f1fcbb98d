"""Model parameters as ordered, named float32 tensors, and their flat-vector view.

Models expose ``Params`` (``dict[str, ndarray]``, insertion-ordered). Aggregation works on one
flat float32 vector per model because a single contiguous array makes the weighted sums,
norms and robust reducers single numpy calls instead of per-tensor loops. ``Layout`` maps
between the two without guessing: it is derived from the model spec.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

import numpy as np
import numpy.typing as npt

F32 = npt.NDArray[np.float32]
Params = dict[str, F32]


@dataclass(frozen=True)
class Layout:
    """Names, shapes and offsets of each tensor inside the flat vector.

    Sizes and offsets are computed once, when the layout is built: decoders ask for them on
    every update, and recomputing them was a third of the aggregator's per-update cost at
    d = 650. Eagerly rather than with ``functools.cached_property``, whose Python 3.11 version
    takes one lock shared by every instance of the class: with hundreds of agent threads in a
    process (the simulator) that lock was a hot spot.
    """

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    sizes: tuple[int, ...] = field(init=False, repr=False, compare=False)
    size: int = field(init=False, repr=False, compare=False)
    _offsets: Mapping[str, tuple[int, int]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        sizes = tuple(int(np.prod(s, dtype=np.int64)) for s in self.shapes)
        offsets: dict[str, tuple[int, int]] = {}
        start = 0
        for name, n in zip(self.names, sizes, strict=True):
            offsets[name] = (start, start + n)
            start += n
        object.__setattr__(self, "sizes", sizes)
        object.__setattr__(self, "size", start)
        object.__setattr__(self, "_offsets", MappingProxyType(offsets))

    @classmethod
    def from_shapes(cls, shapes: Mapping[str, Sequence[int]]) -> Layout:
        return cls(tuple(shapes), tuple(tuple(int(d) for d in s) for s in shapes.values()))

    def offsets(self) -> Mapping[str, tuple[int, int]]:
        """name -> (start, stop) in the flat vector (read-only, computed once)."""
        return self._offsets

    def flatten(self, params: Mapping[str, npt.NDArray[np.floating]]) -> F32:
        """Concatenate ``params`` (which must match this layout exactly) into a new vector."""
        if tuple(params) != self.names:
            raise ValueError(f"tensor names {tuple(params)} do not match layout {self.names}")
        out = np.empty(self.size, dtype=np.float32)
        for name, (a, b) in self.offsets().items():
            t = params[name]
            if t.shape != self.shapes[self.names.index(name)]:
                raise ValueError(f"tensor {name!r} has shape {t.shape}, layout says otherwise")
            out[a:b] = t.reshape(-1)
        return out

    def unflatten(self, flat: F32, *, copy: bool = True) -> Params:
        """Split a flat vector into named tensors (views of ``flat`` unless ``copy``)."""
        if flat.shape != (self.size,):
            raise ValueError(f"flat vector has shape {flat.shape}, expected ({self.size},)")
        out: Params = {}
        for (name, (a, b)), shape in zip(self.offsets().items(), self.shapes, strict=True):
            piece = flat[a:b].reshape(shape)
            out[name] = piece.copy() if copy else piece
        return out


def copy_params(params: Mapping[str, F32]) -> Params:
    return {k: np.array(v, dtype=np.float32, copy=True) for k, v in params.items()}


def all_finite(params: Mapping[str, npt.NDArray[np.floating]]) -> bool:
    return all(bool(np.isfinite(v).all()) for v in params.values())
