"""Forward and backward pass of the dense network a :class:`ModelSpec` describes.

All model kinds are the same computation: ``h = relu(h @ Wi + bi)`` for the hidden
layers, then an affine output layer followed by softmax (classifiers) or nothing (linear
regression, and the autoencoder, whose output reconstructs the preprocessed input and whose
loss is half the mean squared reconstruction error; it has no targets of its own). Keeping
one code path means the numpy model, the ONNX graph and the scikit-learn
adapters only have to agree on one definition.

Arithmetic is done in the parameters' dtype: float32 for real :data:`Params`, which is what a
Raspberry-Pi-class device should run. A float64 copy of the parameters is accepted as well
(everything is computed and returned in float64 then) so that tests can check gradients by
finite differences without float32 rounding noise drowning the signal.

The ``*_preprocessed`` functions skip input validation and preprocessing; ``train_local`` uses
them so that a shard is validated and transformed once, not once per mini-batch.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache
from typing import Any, cast

import numpy as np
import numpy.typing as npt

from fedmqtt.models.spec import ModelSpec
from fedmqtt.params import F32, Params

FArray = npt.NDArray[np.floating[Any]]
IArray = npt.NDArray[np.intp]

__all__ = [
    "check_params",
    "encode_targets",
    "forward",
    "forward_preprocessed",
    "hidden_features",
    "init_params",
    "label_indices",
    "loss_and_grad",
    "loss_and_grad_preprocessed",
    "preprocess",
]


def init_params(spec: ModelSpec, rng: np.random.Generator) -> Params:
    """Fresh parameters for ``spec``.

    Hidden ReLU layers get He-normal weights (std ``sqrt(2 / fan_in)``), which keeps the
    activation variance roughly constant through ReLUs; the output layer of an MLP gets
    Glorot-normal weights (std ``sqrt(2 / (fan_in + fan_out))``). Softmax and linear regression
    are convex, so they start at zero: deterministic, and every device agrees on it.
    Biases start at zero.
    """
    shapes = spec.param_shapes()
    n_layers = len(shapes) // 2
    params: Params = {}
    for i in range(n_layers):
        fan_in, fan_out = shapes[f"W{i}"]
        if spec.kind in ("softmax", "linear"):
            w = np.zeros((fan_in, fan_out), dtype=np.float32)
        else:
            last = i == n_layers - 1
            std = np.sqrt(2.0 / (fan_in + fan_out)) if last else np.sqrt(2.0 / fan_in)
            w = rng.standard_normal((fan_in, fan_out), dtype=np.float32)
            w *= np.float32(std)
        params[f"W{i}"] = w
        params[f"b{i}"] = np.zeros(fan_out, dtype=np.float32)
    return params


def check_params(spec: ModelSpec, params: Mapping[str, np.ndarray]) -> None:
    """Raise ``ValueError`` unless ``params`` has exactly the spec's tensor names and shapes."""
    shapes = spec.param_shapes()
    if set(params) != set(shapes):
        missing = sorted(set(shapes) - set(params))
        extra = sorted(set(params) - set(shapes))
        raise ValueError(
            f"parameters do not match the {spec.kind} spec: missing {missing}, unexpected {extra}"
        )
    for name, shape in shapes.items():
        got = np.shape(params[name])
        if got != shape:
            raise ValueError(f"parameter {name!r} has shape {got}, the spec needs {shape}")


@lru_cache(maxsize=64)
def _const_vector(values: tuple[float, ...], dtype: str) -> FArray:
    """Cached read-only array of a spec's preprocessing constants (specs are immutable)."""
    arr = np.asarray(values, dtype=np.dtype(dtype))
    arr.setflags(write=False)
    return arr


def preprocess(spec: ModelSpec, X: npt.ArrayLike, dtype: npt.DTypeLike = np.float32) -> FArray:
    """Validate ``X`` as ``(n, n_features)`` and apply ``x' = (x - offset) * scale``.

    Returns ``X`` itself (no copy) when it already has the right dtype and the spec has no
    preprocessing.
    """
    dt = np.dtype(dtype)
    arr = np.asarray(X)
    if arr.ndim != 2 or arr.shape[1] != spec.n_features:
        raise ValueError(f"X must have shape (n_samples, {spec.n_features}), got {arr.shape}")
    if arr.dtype.kind not in "biuf":
        raise ValueError(f"X must be numeric, got dtype {arr.dtype}")
    out = cast(FArray, np.asarray(arr, dtype=dt))
    if spec.feature_offset:
        out = out - _const_vector(spec.feature_offset, dt.str)
    if spec.feature_scale:
        scale = _const_vector(spec.feature_scale, dt.str)
        if spec.feature_offset:
            out *= scale  # ``out`` is already a fresh array
        else:
            out = out * scale
    return out


def label_indices(spec: ModelSpec, y: npt.ArrayLike) -> IArray:
    """Map class labels to output indices (position in ``spec.labels``).

    Labels must be integers (integral floats are accepted); anything not among the spec's
    classes raises ``ValueError`` rather than being silently dropped or wrapped around.
    """
    arr = np.asarray(y)
    if arr.ndim != 1:
        raise ValueError(f"classifier targets must be 1-D labels, got shape {arr.shape}")
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)) or not np.all(arr == np.floor(arr)):
            raise ValueError("classifier labels must be integers")
        yi = arr.astype(np.int64)
    elif arr.dtype.kind in "biu":
        yi = arr.astype(np.int64, copy=False)
    else:
        raise ValueError(f"classifier labels must be integers, got dtype {arr.dtype}")
    labels = spec.labels
    k = len(labels)
    if labels == tuple(range(k)):
        if yi.size and (yi.min() < 0 or yi.max() >= k):
            bad = np.unique(yi[(yi < 0) | (yi >= k)])
            raise ValueError(f"labels {bad[:5].tolist()} are not among the classes 0..{k - 1}")
        return yi.astype(np.intp, copy=False)
    lab = np.asarray(labels, dtype=np.int64)
    order = np.argsort(lab, kind="stable")
    sorted_lab = lab[order]
    pos = np.minimum(np.searchsorted(sorted_lab, yi), k - 1)
    ok = sorted_lab[pos] == yi
    if not ok.all():
        bad = np.unique(yi[~ok])
        raise ValueError(f"labels {bad[:5].tolist()} are not among the classes {labels}")
    return cast(IArray, order[pos].astype(np.intp, copy=False))


def encode_targets(
    spec: ModelSpec, y: npt.ArrayLike, dtype: npt.DTypeLike = np.float32
) -> npt.NDArray[Any]:
    """Targets in the form the loss needs: output indices (classifiers) or ``(n, k)`` floats."""
    if spec.is_classifier:
        return label_indices(spec, y)
    arr = np.asarray(y)
    if arr.dtype.kind not in "biuf":
        raise ValueError(f"regression targets must be numeric, got dtype {arr.dtype}")
    k = spec.n_outputs
    if arr.ndim == 1 and k == 1:
        return np.asarray(arr, dtype=dtype).reshape(-1, 1)
    if arr.ndim == 2 and arr.shape[1] == k:
        return np.asarray(arr, dtype=dtype)
    raise ValueError(f"regression targets must have shape (n,) or (n, {k}), got {arr.shape}")


def _n_layers(spec: ModelSpec) -> int:
    return len(spec.hidden) + 1


def _activations(spec: ModelSpec, params: Mapping[str, FArray], Xp: FArray) -> list[FArray]:
    """Inputs of every layer plus the output logits: ``[X, h1, ..., logits]``."""
    acts = [Xp]
    h = Xp
    last = _n_layers(spec) - 1
    for i in range(last + 1):
        z = h @ params[f"W{i}"]
        z += params[f"b{i}"]
        if i < last:
            np.maximum(z, 0, out=z)
        acts.append(z)
        h = z
    return acts


def _softmax_inplace(z: FArray) -> FArray:
    z -= z.max(axis=1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=1, keepdims=True)
    return z


def _work_dtype(params: Mapping[str, np.ndarray]) -> np.dtype[Any]:
    return np.dtype(np.float64) if params["W0"].dtype == np.float64 else np.dtype(np.float32)


def forward_preprocessed(spec: ModelSpec, params: Mapping[str, FArray], Xp: FArray) -> FArray:
    """:func:`forward` on already preprocessed inputs (no validation)."""
    out = _activations(spec, params, Xp)[-1]
    return _softmax_inplace(out) if spec.is_classifier else out


def forward(spec: ModelSpec, params: Params, X: npt.ArrayLike) -> F32:
    """Class probabilities ``(n, n_outputs)`` for classifiers, predictions for linear models.

    ``X`` holds raw features; the spec's preprocessing is applied here.
    """
    check_params(spec, params)
    Xp = preprocess(spec, X, _work_dtype(params))
    return cast(F32, forward_preprocessed(spec, params, Xp))


def hidden_features(spec: ModelSpec, params: Params, X: npt.ArrayLike) -> F32:
    """The inputs of the output layer for raw features ``X``: the last hidden layer's
    activations (the preprocessed ``X`` for a model without hidden layers)."""
    check_params(spec, params)
    Xp = preprocess(spec, X, _work_dtype(params))
    return cast(F32, _activations(spec, params, Xp)[-2])


def loss_and_grad_preprocessed(
    spec: ModelSpec, params: Mapping[str, FArray], Xp: FArray, targets: npt.NDArray[Any]
) -> tuple[float, dict[str, FArray]]:
    """:func:`loss_and_grad` on preprocessed inputs and :func:`encode_targets` output."""
    n = Xp.shape[0]
    if n == 0:
        raise ValueError("cannot compute a loss on zero samples")
    acts = _activations(spec, params, Xp)
    z = acts[-1]
    if spec.is_classifier:
        # Stable cross-entropy: log softmax(z)_y = (z_y - m) - log sum exp(z - m).
        z -= z.max(axis=1, keepdims=True)
        rows = np.arange(n)
        picked = z[rows, targets]
        np.exp(z, out=z)
        sums = z.sum(axis=1, keepdims=True)
        loss = float(np.mean(np.log(sums[:, 0]) - picked))
        z /= sums  # z now holds the probabilities
        z[rows, targets] -= 1
        dz = z
        dz /= n
    else:
        z -= targets
        loss = float(0.5 * np.mean(np.square(z)))
        dz = z
        dz /= z.size  # mean over samples and outputs
    grads: dict[str, FArray] = {}
    for i in range(_n_layers(spec) - 1, -1, -1):
        grads[f"W{i}"] = acts[i].T @ dz
        grads[f"b{i}"] = dz.sum(axis=0)
        if i > 0:
            dz = dz @ params[f"W{i}"].T
            dz *= acts[i] > 0  # ReLU derivative; acts[i] is the post-ReLU output
    return loss, {name: grads[name] for name in spec.param_shapes()}


def loss_and_grad(
    spec: ModelSpec, params: Params, X: npt.ArrayLike, y: npt.ArrayLike
) -> tuple[float, Params]:
    """Mean loss on ``(X, y)`` and its gradient with respect to every parameter.

    Classifiers: mean cross-entropy, ``y`` holds labels from ``spec.labels``. Linear: half the
    mean squared error over all samples and outputs, ``y`` of shape ``(n,)`` or
    ``(n, n_outputs)``. Autoencoder: half the mean squared error between the preprocessed
    input and its reconstruction; ``y`` is ignored. Gradients come back in the parameters'
    dtype (float32 for Params).
    """
    check_params(spec, params)
    dt = _work_dtype(params)
    Xp = preprocess(spec, X, dt)
    targets = Xp.copy() if spec.is_autoencoder else encode_targets(spec, y, dt)
    if targets.shape[0] != Xp.shape[0]:
        raise ValueError(f"X has {Xp.shape[0]} samples but y has {targets.shape[0]}")
    loss, grads = loss_and_grad_preprocessed(spec, params, Xp, targets)
    return loss, cast(Params, grads)
