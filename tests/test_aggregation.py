"""Tests of fedmqtt.aggregation: known values, reference implementations and properties."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedmqtt.aggregation import (
    REDUCERS,
    NormBound,
    Reducer,
    ServerOptimizer,
    _common,
    clip_by_norm,
    constant,
    coordinate_median,
    fedasync_alpha,
    fedasync_mix,
    fedavg_step,
    fedbuff_aggregate,
    hinge,
    mean_of_rows,
    parse_staleness,
    polynomial,
    trimmed_mean,
    weighted_mean,
)
from fedmqtt.errors import ConfigError
from fedmqtt.params import F32

F64 = npt.NDArray[np.float64]

# ---------------------------------------------------------------------------------------------
# Strategies and helpers

values32 = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False, width=32)


@st.composite
def batches(draw: st.DrawFn, max_k: int = 12, max_d: int = 16) -> F32:
    k = draw(st.integers(1, max_k))
    d = draw(st.integers(1, max_d))
    x: F32 = draw(hnp.arrays(np.float32, (k, d), elements=values32))
    return x


def frozen(a: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """A read-only copy: any in-place write by the code under test raises."""
    b = np.array(a, copy=True)
    b.flags.writeable = False
    return b


def assert_close32(actual: F32, desired: npt.NDArray[np.floating[Any]], x: F32) -> None:
    """Equal up to float32 rounding, for results whose magnitude is bounded by max |x|."""
    scale = max(1.0, float(np.abs(x).max())) if x.size else 1.0
    np.testing.assert_allclose(actual, desired, rtol=2e-7, atol=1e-6 * scale)


def ref_trimmed_mean(x: F32, trim: float) -> F64:
    k = x.shape[0]
    cut = math.floor(trim * k + 1e-9)
    s = np.sort(x.astype(np.float64), axis=0)
    out: F64 = s[cut : k - cut].mean(axis=0)
    return out


def ref_median(x: F32) -> F64:
    out: F64 = np.median(x.astype(np.float64), axis=0)
    return out


# ---------------------------------------------------------------------------------------------
# Staleness


ALL_STALENESS = [constant(), polynomial(0.5), polynomial(2.0), hinge(10, 4), hinge(0.5, 0)]


@pytest.mark.parametrize("s", ALL_STALENESS, ids=str)
def test_staleness_is_one_when_fresh(s: Callable[[int], float]) -> None:
    assert s(0) == 1.0


def test_staleness_known_values() -> None:
    assert constant()(1000) == 1.0
    assert polynomial(0.5)(3) == pytest.approx(0.5)  # 1/sqrt(4)
    assert polynomial(0.5)(8) == pytest.approx(1 / 3)
    assert polynomial(1.0)(1) == pytest.approx(0.5)
    assert polynomial(0.0)(50) == 1.0
    h = hinge(10, 4)
    assert [h(t) for t in (0, 3, 4)] == [1.0, 1.0, 1.0]
    assert h(5) == pytest.approx(1 / 11)
    assert h(6) == pytest.approx(1 / 21)
    assert hinge(0.5, 2)(4) == pytest.approx(0.5)


@given(
    a=st.floats(0, 10),
    b=st.integers(0, 50),
    t1=st.integers(0, 10_000),
    t2=st.integers(0, 10_000),
)
def test_staleness_monotone_and_in_unit_interval(a: float, b: int, t1: int, t2: int) -> None:
    lo, hi = min(t1, t2), max(t1, t2)
    for s in (constant(), polynomial(a), hinge(a, b)):
        assert 0.0 < s(hi) <= s(lo) <= 1.0


def test_staleness_accepts_numpy_ints_and_refuses_negative_or_float_tau() -> None:
    assert polynomial(1.0)(np.int64(1)) == pytest.approx(0.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        polynomial(0.5)(-1)
    with pytest.raises(ValueError):
        hinge(1, 1)(-3)
    with pytest.raises(TypeError):
        polynomial(0.5)(1.5)  # type: ignore[arg-type]


def test_staleness_constructor_validation() -> None:
    for bad in (-0.1, math.nan, math.inf):
        with pytest.raises(ValueError):
            polynomial(bad)
        with pytest.raises(ValueError):
            hinge(bad, 1)
        with pytest.raises(ValueError):
            hinge(1, bad)


@pytest.mark.parametrize(
    ("text", "expected", "printed"),
    [
        ("constant", constant(), "constant"),
        ("poly:0.5", polynomial(0.5), "poly:0.5"),
        ("polynomial:0.5", polynomial(0.5), "poly:0.5"),
        ("  Poly : 2 ", polynomial(2), "poly:2"),
        ("hinge:10,4", hinge(10, 4), "hinge:10,4"),
        ("HINGE: 0.25 , 3", hinge(0.25, 3), "hinge:0.25,3"),
    ],
)
def test_parse_staleness_known(text: str, expected: object, printed: str) -> None:
    s = parse_staleness(text)
    assert s == expected
    assert str(s) == printed
    assert repr(s) == printed
    assert parse_staleness(str(s)) == s


@given(a=st.floats(0, 1e6), b=st.floats(0, 1e6))
def test_parse_staleness_round_trips(a: float, b: float) -> None:
    for s in (polynomial(a), hinge(a, b), constant()):
        again = parse_staleness(str(s))
        assert again == s
        assert str(again) == str(s)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "linear",
        "constant:1",
        "poly",
        "poly:",
        "poly:x",
        "poly:-1",
        "poly:nan",
        "poly:inf",
        "poly:0.5,1",
        "hinge",
        "hinge:10",
        "hinge:10,4,1",
        "hinge:10;4",
        "hinge:-1,4",
        "hinge:1,-4",
        "polynomial=0.5",
    ],
)
def test_parse_staleness_errors(text: str) -> None:
    with pytest.raises(ConfigError, match="staleness"):
        parse_staleness(text)


def test_parse_staleness_refuses_non_string() -> None:
    with pytest.raises(ConfigError):
        parse_staleness(0.5)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# FedAsync


def test_fedasync_mix_endpoints_and_midpoint() -> None:
    rng = np.random.default_rng(1)
    w = frozen(rng.standard_normal(50).astype(np.float32))
    c = frozen(rng.standard_normal(50).astype(np.float32))
    out0 = fedasync_mix(w, c, 0.0)
    out1 = fedasync_mix(w, c, 1.0)
    np.testing.assert_array_equal(out0, w)
    np.testing.assert_array_equal(out1, c)
    assert out0.dtype == np.float32
    assert not np.shares_memory(out0, w)
    assert not np.shares_memory(out1, c)
    expected = 0.75 * w.astype(np.float64) + 0.25 * c.astype(np.float64)
    np.testing.assert_allclose(fedasync_mix(w, c, 0.25), expected, rtol=1e-6, atol=1e-7)


def test_fedasync_mix_validation() -> None:
    w = np.zeros(3, np.float32)
    with pytest.raises(ValueError):
        fedasync_mix(w, np.zeros(4, np.float32), 0.5)
    with pytest.raises(ValueError):
        fedasync_mix(w, w, 1.5)
    with pytest.raises(ValueError):
        fedasync_mix(w, w, math.nan)
    with pytest.raises(ValueError):
        fedasync_mix(w, np.array([0, np.nan, 0], np.float32), 0.5)


def test_fedasync_alpha() -> None:
    assert fedasync_alpha(0.6, hinge(10, 4), 5) == pytest.approx(0.6 / 11)
    assert fedasync_alpha(0.6, hinge(10, 4), 2) == pytest.approx(0.6)
    assert fedasync_alpha(0.5, polynomial(0.5), 3) == pytest.approx(0.25)
    with pytest.raises(ValueError):
        fedasync_alpha(1.5, constant(), 0)
    with pytest.raises(ValueError):
        fedasync_alpha(0.5, constant(), -1)
    with pytest.raises(ValueError):
        fedasync_alpha(0.5, lambda tau: 2.0, 0)


# ---------------------------------------------------------------------------------------------
# FedAvg


def test_weighted_mean_known_value() -> None:
    x = np.array([[1.0, 2.0], [3.0, 6.0], [100.0, -100.0]], np.float32)
    out = weighted_mean(x, np.array([1.0, 3.0, 0.0], np.float32))
    np.testing.assert_allclose(out, [2.5, 5.0], rtol=1e-7)
    assert out.dtype == np.float32 and out.shape == (2,)


def test_fedavg_step_is_fedavg_of_models() -> None:
    """w + mean(n-weighted deltas) == n-weighted mean of the client models (McMahan et al.)."""
    rng = np.random.default_rng(2)
    w = rng.standard_normal(40).astype(np.float32)
    models = rng.standard_normal((5, 40)).astype(np.float32)
    n = np.array([10, 1, 50, 7, 3], np.float32)
    deltas = (models.astype(np.float64) - w).astype(np.float32)
    expected = (n[:, None] * models.astype(np.float64)).sum(axis=0) / n.sum()
    np.testing.assert_allclose(fedavg_step(w, deltas, n), expected, rtol=1e-6, atol=1e-6)


def test_weighted_mean_validation() -> None:
    x = np.ones((3, 4), np.float32)
    with pytest.raises(ValueError, match="sum"):
        weighted_mean(x, np.zeros(3, np.float32))
    with pytest.raises(ValueError, match=">= 0"):
        weighted_mean(x, np.array([1, -1, 1], np.float32))
    with pytest.raises(ValueError, match="shape"):
        weighted_mean(x, np.ones(2, np.float32))
    with pytest.raises(ValueError, match="shape"):
        weighted_mean(np.ones(4, np.float32), np.ones(4, np.float32))
    with pytest.raises(ValueError, match="no rows"):
        weighted_mean(np.ones((0, 4), np.float32), np.ones(0, np.float32))
    with pytest.raises(ValueError, match="NaN"):
        weighted_mean(x, np.array([1, math.inf, 1]))
    bad = x.copy()
    bad[1, 2] = np.inf
    with pytest.raises(ValueError, match="row 1"):
        weighted_mean(bad, np.ones(3, np.float32))
    with pytest.raises(ValueError, match="float"):
        weighted_mean(np.ones((3, 4), np.int64), np.ones(3))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="length"):
        fedavg_step(np.zeros(5, np.float32), x, np.ones(3, np.float32))


def test_float64_input_beyond_float32_is_refused() -> None:
    x = np.ones((2, 3))
    x[0, 0] = 1e300
    with pytest.raises(ValueError, match="NaN or Inf"):
        weighted_mean(x, np.ones(2, np.float32))  # type: ignore[arg-type]


def test_fedavg_step_overflow_is_an_error() -> None:
    w = np.full(2, 3e38, np.float32)
    deltas = np.full((1, 2), 3e38, np.float32)
    with pytest.raises(ValueError, match="overflow"):
        fedavg_step(w, deltas, np.ones(1, np.float32))


def test_mean_of_rows_matches_fedbuff_aggregate() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(0, 1, (7, 1000)).astype(np.float32)
    s = rng.uniform(0.1, 1, 7).astype(np.float32)
    n = rng.integers(1, 100, 7).astype(np.float32)
    np.testing.assert_allclose(
        mean_of_rows(x, s, n), fedbuff_aggregate(x, s, n), rtol=1e-5, atol=1e-6
    )
    ones = np.ones(7, dtype=np.float32)
    np.testing.assert_allclose(mean_of_rows(x, ones, n), weighted_mean(x, n), rtol=1e-5, atol=1e-6)


def test_mean_of_rows_refuses_scales_without_their_segments() -> None:
    x = np.ones((2, 4), np.float32)
    ones = np.ones(2, np.float32)
    with pytest.raises(ValueError, match="scales of shape"):
        mean_of_rows(x, ones, ones, np.full((2, 1), 2.0, np.float32))


@settings(max_examples=200)
@given(x=batches(max_d=12), data=st.data())
def test_mean_of_rows_with_scales_is_the_float64_mean_of_the_scaled_rows(
    x: F32, data: st.DataObject
) -> None:
    """The aggregator's float32 path with per-tensor scales is FedBuff's mean of the rows with
    their scales applied, to float32 precision."""
    k, d = x.shape
    cut = data.draw(st.integers(0, d))
    segments = [(0, cut), (cut, d)]
    scales = data.draw(hnp.arrays(np.float32, (k, 2), elements=st.floats(0.25, 4.0, width=32)))
    s = data.draw(hnp.arrays(np.float32, k, elements=st.floats(2**-7, 1.0, width=32)))
    n = data.draw(hnp.arrays(np.float32, k, elements=st.floats(1.0, 1e4, width=32)))
    scaled = x.copy()
    for t, (a, b) in enumerate(segments):
        scaled[:, a:b] *= scales[:, t : t + 1]
    want = fedbuff_aggregate(scaled, s, n)
    got = mean_of_rows(frozen(x), frozen(s), frozen(n), frozen(scales), segments)
    # float32 coefficients and accumulation: about k + 2 roundings of at most max |row|
    bound = (k + 2) * 2.0**-23 * max(1.0, float(np.abs(scaled).max()))
    np.testing.assert_allclose(got, want, rtol=0, atol=bound)


# ---------------------------------------------------------------------------------------------
# FedBuff and the server optimizer


@given(x=batches(), data=st.data())
def test_fedbuff_fresh_equals_fedavg(x: F32, data: st.DataObject) -> None:
    """s = 1, lr 1, no momentum, same base: FedBuff is sample-weighted FedAvg."""
    k, d = x.shape
    n = data.draw(hnp.arrays(np.float32, k, elements=st.integers(1, 10_000).map(float)))
    w = data.draw(hnp.arrays(np.float32, d, elements=values32))
    agg = fedbuff_aggregate(frozen(x), np.ones(k, np.float32), frozen(n))
    new_w = ServerOptimizer(lr=1.0, momentum=0.0).step(frozen(w), agg)
    assert_close32(new_w, fedavg_step(w, x, n), np.vstack([x, w[None]]))
    assert_close32(agg, weighted_mean(x, n), x)


def test_fedbuff_staleness_scales_absolutely() -> None:
    """Equal staleness must not cancel by normalisation: s = 0.5 halves the aggregate."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((6, 30)).astype(np.float32)
    n = rng.integers(1, 100, 6).astype(np.float32)
    half = fedbuff_aggregate(x, np.full(6, 0.5, np.float32), n)
    np.testing.assert_allclose(half, 0.5 * weighted_mean(x, n), rtol=1e-6, atol=1e-7)


def test_fedbuff_mean_matches_formula() -> None:
    rng = np.random.default_rng(4)
    x = rng.standard_normal((5, 20)).astype(np.float32)
    n = np.array([1, 2, 3, 4, 10], np.float32)
    s = np.array([1.0, 0.5, 1 / 3, 0.1, 0.0], np.float32)
    coef = n.astype(np.float64) / n.sum() * s.astype(np.float64)
    expected = (coef[:, None] * x.astype(np.float64)).sum(axis=0)
    np.testing.assert_allclose(fedbuff_aggregate(x, s, n), expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("reducer", ["trimmed-mean", "median"])
def test_fedbuff_robust_reducers_scale_rows_and_ignore_num_samples(reducer: Reducer) -> None:
    rng = np.random.default_rng(5)
    x = rng.standard_normal((9, 25)).astype(np.float32)
    s = rng.uniform(0.1, 1.0, 9).astype(np.float32)
    scaled = (x.astype(np.float64) * s.astype(np.float64)[:, None]).astype(np.float32)
    n1 = np.ones(9, np.float32)
    n2 = n1.copy()
    n2[0] = 1e9  # an attacker claiming a huge data set gains nothing
    a1 = fedbuff_aggregate(x, s, n1, reducer=reducer, trim_fraction=0.2)
    a2 = fedbuff_aggregate(x, s, n2, reducer=reducer, trim_fraction=0.2)
    np.testing.assert_array_equal(a1, a2)
    ref = trimmed_mean(scaled, 0.2) if reducer == "trimmed-mean" else coordinate_median(scaled)
    np.testing.assert_allclose(a1, ref, rtol=1e-6, atol=1e-7)


def test_fedbuff_validation() -> None:
    x = np.ones((3, 4), np.float32)
    ones = np.ones(3, np.float32)
    with pytest.raises(ValueError, match="s\\(tau\\)"):
        fedbuff_aggregate(x, np.array([0, 1, 2], np.float32), ones)  # taus, not s(tau)
    with pytest.raises(ValueError):
        fedbuff_aggregate(x, ones, np.zeros(3, np.float32))
    with pytest.raises(ValueError):
        fedbuff_aggregate(x, ones, np.zeros(3, np.float32), reducer="median")
    with pytest.raises(ValueError, match="reducer"):
        fedbuff_aggregate(x, ones, ones, reducer="krum")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="trim_fraction"):
        fedbuff_aggregate(x, ones, ones, reducer="trimmed-mean", trim_fraction=0.5)
    with pytest.raises(ValueError, match="shape"):
        fedbuff_aggregate(x, np.ones(2, np.float32), ones)


def test_server_optimizer_momentum_by_hand() -> None:
    opt = ServerOptimizer(lr=0.5, momentum=0.9)
    w = np.array([1.0, 2.0], np.float32)
    # v1 = [1, 0]                    w1 = [1, 2] + 0.5 v1 = [1.5, 2]
    # v2 = 0.9 v1 + [0, 1] = [0.9, 1]  w2 = [1.95, 2.5]
    # v3 = 0.9 v2 + [1, 1] = [1.81, 1.9]  w3 = [2.855, 3.45]
    expected_w = [[1.5, 2.0], [1.95, 2.5], [2.855, 3.45]]
    expected_v = [[1.0, 0.0], [0.9, 1.0], [1.81, 1.9]]
    for delta, ew, ev in zip(([1, 0], [0, 1], [1, 1]), expected_w, expected_v, strict=True):
        w_before = frozen(w)
        d = frozen(np.array(delta, np.float32))
        w = opt.step(w_before, d)
        np.testing.assert_allclose(w, ew, rtol=1e-6)
        assert opt.velocity is not None
        np.testing.assert_allclose(opt.velocity, ev, rtol=1e-6)


def test_server_optimizer_without_momentum_keeps_no_velocity() -> None:
    opt = ServerOptimizer(lr=2.0)
    w = np.array([1.0, -1.0], np.float32)
    out = opt.step(w, np.array([0.25, 0.5], np.float32))
    np.testing.assert_array_equal(out, [1.5, 0.0])
    assert opt.velocity is None
    assert opt.to_state() == {"lr": 2.0, "momentum": 0.0, "velocity": None}
    dropped = ServerOptimizer(lr=1.0, momentum=0.0, velocity=np.ones(2, np.float32))
    assert dropped.velocity is None


def test_server_optimizer_state_round_trip() -> None:
    rng = np.random.default_rng(6)
    deltas = rng.standard_normal((4, 10)).astype(np.float32)
    w = rng.standard_normal(10).astype(np.float32)
    opt = ServerOptimizer(lr=0.7, momentum=0.5)
    w = opt.step(w, deltas[0])
    w = opt.step(w, deltas[1])
    state = opt.to_state()
    assert isinstance(state["velocity"], np.ndarray) and state["velocity"].dtype == np.float32
    restored = ServerOptimizer.from_state(state)
    state["velocity"][:] = 1e6  # the restored optimizer owns its own copy
    assert restored.lr == opt.lr and restored.momentum == opt.momentum
    for delta in deltas[2:]:
        w_a = opt.step(w, delta)
        w_b = restored.step(w, delta)
        np.testing.assert_array_equal(w_a, w_b)
        w = w_a
    with pytest.raises(ValueError):
        ServerOptimizer.from_state({"lr": 1.0})


def test_server_optimizer_validation_and_atomic_failure() -> None:
    for lr, momentum in ((0.0, 0.0), (math.nan, 0.0), (1.0, 1.0), (1.0, -0.1), (1.0, math.nan)):
        with pytest.raises(ValueError):
            ServerOptimizer(lr=lr, momentum=momentum)
    opt = ServerOptimizer(lr=1.0, momentum=0.5)
    opt.step(np.zeros(2, np.float32), np.ones(2, np.float32))
    assert opt.velocity is not None
    v_before = opt.velocity.copy()
    with pytest.raises(ValueError, match="overflow"):
        opt.step(np.full(2, 3.4e38, np.float32), np.full(2, 3e38, np.float32))
    np.testing.assert_array_equal(opt.velocity, v_before)
    with pytest.raises(ValueError, match=r"shape|length"):
        opt.step(np.zeros(3, np.float32), np.ones(3, np.float32))


def _wide_f32(rng: np.random.Generator, n: int) -> F32:
    """Random float32 values over the whole exponent range, subnormals and extremes included."""
    bits = rng.integers(0, 2**32, n, dtype=np.uint64).astype(np.uint32)
    x = bits.view(np.float32).copy()
    x[~np.isfinite(x)] = 0.0
    x[:6] = [0.0, -0.0, 1.4e-45, -3.4028235e38, 3.4028235e38, 1.1754942e-38]
    return x


@pytest.mark.parametrize("n", [50, 20_000])
def test_server_step_with_unit_lr_matches_the_float64_formula_bit_for_bit(n: int) -> None:
    # lr = 1 without momentum adds in float32; it must equal the general path's float64 sum
    # rounded once (double rounding is exact for + when 53 >= 2 * 24 + 2).
    rng = np.random.default_rng(n)
    for scale_w, scale_d in ((1.0, 1.0), (1.0, 1e-30), (1e30, 1.0)):
        w = _wide_f32(rng, n) if scale_w == 1.0 else rng.standard_normal(n).astype(np.float32)
        d = _wide_f32(rng, n) if scale_d == 1.0 else rng.standard_normal(n).astype(np.float32)
        w, d = (w * np.float32(scale_w)).astype(np.float32), (d * np.float32(scale_d))
        with np.errstate(over="ignore"):
            expected = (w.astype(np.float64) + d.astype(np.float64)).astype(np.float32)
        finite = np.isfinite(expected)
        w, d, expected = w[finite], d[finite], expected[finite]
        got = ServerOptimizer(lr=1.0).step(w, d)
        np.testing.assert_array_equal(got.view(np.uint32), expected.view(np.uint32))
        assert got is not w and got is not d


@pytest.mark.parametrize("lr", [1.0, 0.5])
@pytest.mark.parametrize("n", [5, 20_000])
def test_server_step_errors_are_the_same_on_every_path(lr: float, n: int) -> None:
    opt = ServerOptimizer(lr=lr)
    ok, nan = np.ones(n, np.float32), np.ones(n, np.float32)
    nan[-1] = np.nan
    with pytest.raises(ValueError, match=r"^w contains NaN or Inf$"):
        opt.step(nan, ok)
    with pytest.raises(ValueError, match=r"^aggregate_delta contains NaN or Inf$"):
        opt.step(ok, nan)
    with pytest.raises(ValueError, match=r"^w contains NaN or Inf$"):  # w is checked first
        opt.step(nan, np.ones(n + 1, np.float32))
    with pytest.raises(ValueError, match=r"^aggregate_delta has length"):
        opt.step(ok, np.ones(n + 1, np.float32))
    big = np.full(n, 3e38, np.float32)
    with pytest.raises(ValueError, match=r"^server step result is not finite in float32"):
        opt.step(big, big)
    huge = np.full(n, 1e30, np.float32)  # squares overflow the fast finiteness check
    np.testing.assert_array_equal(opt.step(huge, np.zeros(n, np.float32)), huge)


def test_all_finite() -> None:
    for n in (3, 100_000):
        x = np.full(n, 0.5, np.float32)
        assert _common.all_finite(x)
        x[0] = -3e38  # overflows the dot product, still finite
        assert _common.all_finite(x)
        for bad in (np.nan, np.inf, -np.inf):
            y = x.copy()
            y[-1] = bad
            assert not _common.all_finite(y)


# ---------------------------------------------------------------------------------------------
# Robust reducers


def test_trimmed_mean_zero_trim_is_mean() -> None:
    rng = np.random.default_rng(7)
    x = rng.standard_normal((7, 33)).astype(np.float32) * 100
    expected = x.astype(np.float64).mean(axis=0)
    np.testing.assert_allclose(trimmed_mean(x, 0.0), expected, rtol=1e-6, atol=1e-5)
    assert_close32(trimmed_mean(x, 0.0), weighted_mean(x, np.ones(7, np.float32)), x)
    # 0.1 * 7 < 1: nothing is trimmed either
    np.testing.assert_array_equal(trimmed_mean(x, 0.1), trimmed_mean(x, 0.0))


def test_median_of_identical_rows_is_the_row() -> None:
    row = np.random.default_rng(8).standard_normal(17).astype(np.float32)
    for k in (1, 2, 5, 6):
        np.testing.assert_array_equal(coordinate_median(np.tile(row, (k, 1))), row)
        np.testing.assert_array_equal(trimmed_mean(np.tile(row, (k, 1)), 0.2), row)


def test_trimmed_mean_removes_outlier() -> None:
    rng = np.random.default_rng(9)
    honest = rng.uniform(-1, 1, (10, 20)).astype(np.float32)
    x = np.vstack([honest, np.full((1, 20), 1e6, np.float32)])
    assert np.abs(weighted_mean(x, np.ones(11, np.float32))).max() > 1e4  # the plain mean is ruined
    robust = trimmed_mean(x, 0.1)  # floor(1.1) = 1 trimmed at each end
    assert np.abs(robust).max() <= 1.0
    ref = np.sort(honest.astype(np.float64), axis=0)[1:].mean(axis=0)  # lowest honest dropped
    np.testing.assert_allclose(robust, ref, rtol=1e-6, atol=1e-7)
    assert np.abs(coordinate_median(x)).max() <= 1.0


def test_known_order_statistics() -> None:
    x = np.array([[1], [2], [3], [4], [100]], np.float32)
    assert coordinate_median(x)[0] == 3.0
    assert coordinate_median(x[:4])[0] == 2.5
    assert trimmed_mean(x, 0.2)[0] == 3.0  # drops 1 and 100
    assert trimmed_mean(x, 0.4)[0] == 3.0  # drops 1, 2, 4, 100
    # 0.3 * 10 and 0.29 * 100 must floor to 3 and 29 despite float error
    y = np.arange(10, dtype=np.float32)[:, None]
    assert trimmed_mean(y, 0.3)[0] == 4.5
    z = np.arange(100, dtype=np.float32)[:, None]
    z[-29:] = 1e6
    assert trimmed_mean(z, 0.29)[0] == pytest.approx(np.arange(29, 71).mean())


def test_median_does_not_overflow() -> None:
    x = np.full((2, 3), 3.4e38, np.float32)
    np.testing.assert_array_equal(coordinate_median(x), x[0])


def test_robust_validation() -> None:
    x = np.ones((4, 3), np.float32)
    for bad in (-0.1, 0.5, math.nan):
        with pytest.raises(ValueError, match="trim_fraction"):
            trimmed_mean(x, bad)
    with pytest.raises(ValueError):
        coordinate_median(np.ones((0, 3), np.float32))
    y = x.copy()
    y[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        coordinate_median(y)
    with pytest.raises(ValueError, match="NaN"):
        trimmed_mean(y, 0.25)


ReducerCall = Callable[[F32, F32, F32, F32], F32]  # (deltas, staleness, num_samples, w)


def fedbuff_with(reducer: Reducer) -> ReducerCall:
    def call(x: F32, s: F32, n: F32, w: F32) -> F32:
        return fedbuff_aggregate(x, s, n, reducer=reducer, trim_fraction=0.25)

    return call


REDUCER_FUNCS: dict[str, ReducerCall] = {
    "weighted_mean": lambda x, s, n, w: weighted_mean(x, n),
    "fedavg_step": lambda x, s, n, w: fedavg_step(w, x, n),
    "trimmed_mean": lambda x, s, n, w: trimmed_mean(x, 0.2),
    "coordinate_median": lambda x, s, n, w: coordinate_median(x),
    **{f"fedbuff-{r}": fedbuff_with(r) for r in REDUCERS},
}


@settings(max_examples=60)
@given(x=batches(), data=st.data())
@pytest.mark.parametrize("name", list(REDUCER_FUNCS))
def test_reducers_permutation_invariant_and_finite(name: str, x: F32, data: st.DataObject) -> None:
    k, d = x.shape
    s = data.draw(hnp.arrays(np.float32, k, elements=st.floats(2**-7, 1.0, width=32)))
    n = data.draw(hnp.arrays(np.float32, k, elements=st.floats(1.0, 1e4, width=32)))
    w = data.draw(hnp.arrays(np.float32, d, elements=values32))
    perm = np.array(data.draw(st.permutations(range(k))), dtype=np.intp)
    f = REDUCER_FUNCS[name]
    out = f(frozen(x), frozen(s), frozen(n), frozen(w))
    out_p = f(frozen(x[perm]), frozen(s[perm]), frozen(n[perm]), frozen(w))
    assert out.dtype == np.float32 and out.shape == (d,)
    assert np.isfinite(out).all()
    assert_close32(out_p, out, np.vstack([x, w[None]]))


@given(x=batches(), trim=st.floats(0.0, 0.49))
def test_robust_reducers_match_sorting_reference(x: F32, trim: float) -> None:
    assert_close32(trimmed_mean(x, trim), ref_trimmed_mean(x, trim), x)
    np.testing.assert_array_equal(coordinate_median(x), ref_median(x).astype(np.float32))


@given(x=batches())
def test_unweighted_reducers_stay_within_column_range(x: F32) -> None:
    lo, hi = x.min(axis=0), x.max(axis=0)
    for out in (
        weighted_mean(x, np.ones(x.shape[0], np.float32)),
        trimmed_mean(x, 0.3),
        coordinate_median(x),
    ):
        assert (out >= lo).all() and (out <= hi).all()


def test_chunk_boundaries_do_not_change_results(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(10)
    x = rng.standard_normal((7, 101)).astype(np.float32)
    s = rng.uniform(0.1, 1, 7).astype(np.float32)
    n = rng.uniform(1, 10, 7).astype(np.float32)
    w = rng.standard_normal(101).astype(np.float32)

    def run_all() -> dict[str, F32]:
        out = {k: f(x, s, n, w) for k, f in REDUCER_FUNCS.items()}
        out["clip"] = clip_by_norm(x, 3.0)[0]
        return out

    big = run_all()
    monkeypatch.setattr(_common, "CHUNK_ELEMENTS", 15)  # 2 columns per chunk, odd remainder
    assert len(list(_common.column_chunks(7, 101))) == 51
    for key, value in run_all().items():
        np.testing.assert_allclose(value, big[key], rtol=1e-6, atol=1e-6, err_msg=key)
    np.testing.assert_allclose(trimmed_mean(x, 0.3), ref_trimmed_mean(x, 0.3), rtol=1e-6)
    np.testing.assert_array_equal(coordinate_median(x), ref_median(x).astype(np.float32))


# ---------------------------------------------------------------------------------------------
# Clipping and the adaptive bound


@given(
    x=batches(max_k=8, max_d=20),
    bound=st.floats(1e-3, 1e7),
)
def test_clip_by_norm_properties(x: F32, bound: float) -> None:
    clipped, norms = clip_by_norm(frozen(x), bound)
    assert clipped.dtype == np.float32 and norms.dtype == np.float32
    assert clipped.shape == x.shape
    x64 = x.astype(np.float64)
    true_norms = np.linalg.norm(x64, axis=1)
    np.testing.assert_allclose(norms, true_norms, rtol=1e-6, atol=1e-37)  # subnormals
    after = np.linalg.norm(clipped.astype(np.float64), axis=1)
    assert (after <= bound * (1 + 1e-12)).all()
    for i in range(x.shape[0]):
        if true_norms[i] <= bound:
            np.testing.assert_array_equal(clipped[i], x[i])
        else:
            assert after[i] >= bound * (1 - 1e-5)
            # same direction: a positive multiple of the original row
            np.testing.assert_allclose(
                clipped[i], x64[i] * (bound / true_norms[i]), rtol=1e-5, atol=bound * 1e-6
            )


def test_clip_by_norm_known_values_and_validation() -> None:
    x = np.array([[3, 4], [0.3, 0.4], [0, 0]], np.float32)
    clipped, norms = clip_by_norm(x, 1.0)
    np.testing.assert_allclose(norms, [5.0, 0.5, 0.0], rtol=1e-7)
    np.testing.assert_allclose(clipped[0], [0.6, 0.8], rtol=1e-6)
    np.testing.assert_array_equal(clipped[1:], x[1:])
    zero, _ = clip_by_norm(x, 0.0)
    np.testing.assert_array_equal(zero, np.zeros_like(x))
    empty, empty_norms = clip_by_norm(np.zeros((0, 4), np.float32), 1.0)
    assert empty.shape == (0, 4) and empty_norms.shape == (0,)
    for bad in (-1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="bound"):
            clip_by_norm(x, bad)
    # a norm beyond float32's range is reported saturated, not as inf
    _, huge = clip_by_norm(np.full((1, 4), 3e38, np.float32), 1.0)
    assert huge[0] == np.finfo(np.float32).max


def test_norm_bound_median() -> None:
    nb = NormBound()  # factor 3, window 100, min 5
    for v in (1.0, 2.0, 3.0, 4.0):
        nb.observe(v)
        assert nb.bound() is None
    nb.observe(50.0)
    assert nb.bound() == pytest.approx(3 * 3.0)  # median of 1, 2, 3, 4, 50
    nb.observe(5.0)
    assert nb.bound() == pytest.approx(3 * 3.5)  # even count: mean of the middle two

    small = NormBound(factor=2.0, window=3, min_samples=2)
    for v in (1.0, 2.0, 3.0, 100.0, 200.0):
        small.observe(v)
    assert len(small) == 3
    assert small.bound() == pytest.approx(2 * 100.0)  # window keeps 3, 100, 200


def test_norm_bound_resists_a_minority_of_huge_norms() -> None:
    nb = NormBound(window=20)
    for _ in range(11):
        nb.observe(1.0)
    for _ in range(9):
        nb.observe(1e9)
    assert nb.bound() == pytest.approx(3.0)


def test_norm_bound_state_round_trip() -> None:
    nb = NormBound(factor=2.5, window=4, min_samples=3)
    for v in (0.5, 1.5, 2.5):
        nb.observe(v)
    state = json.loads(json.dumps(nb.to_state()))  # plain python only
    restored = NormBound.from_state(state)
    assert restored.bound() == nb.bound() == pytest.approx(2.5 * 1.5)
    for v in (10.0, 20.0):  # eviction continues identically after a restore
        nb.observe(v)
        restored.observe(v)
        assert restored.bound() == nb.bound()
    assert restored.to_state() == nb.to_state()


def test_norm_bound_validation() -> None:
    for kwargs in (
        {"factor": 0.0},
        {"factor": math.inf},
        {"window": 0},
        {"window": 2.5},
        {"min_samples": 0},
        {"window": 3, "min_samples": 4},
    ):
        with pytest.raises(ValueError):
            NormBound(**kwargs)
    nb = NormBound()
    for bad in (-1.0, math.nan, math.inf):
        with pytest.raises(ValueError):
            nb.observe(bad)
    with pytest.raises(ValueError):
        NormBound.from_state({"factor": 3.0, "window": 2, "min_samples": 1, "norms": [1, 2, 3]})
    with pytest.raises(ValueError):
        NormBound.from_state({"factor": 3.0})
    with pytest.raises(ValueError):
        NormBound.from_state({"factor": 3.0, "window": 2, "min_samples": 1, "norms": [-1.0]})


def test_norm_bound_median_matches_statistics_over_a_sliding_window() -> None:
    import random
    import statistics

    rng = random.Random(5)
    for window in (1, 2, 7, 100):
        nb = NormBound(factor=2.0, window=window, min_samples=1)
        seen: list[float] = []
        for _ in range(400):
            v = rng.choice([rng.random(), 0.5, 1.0, 0.0])  # repeats exercise equal keys
            nb.observe(v)
            seen.append(v)
            assert nb.bound() == 2.0 * statistics.median(seen[-window:])
        again = NormBound.from_state(nb.to_state())
        assert again.bound() == nb.bound()
