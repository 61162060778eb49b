"""The one-byte codec and the public scale rule (node/core/codec.py)."""

from __future__ import annotations

import math
import random
from typing import Any, cast

import numpy as np
import pytest

from seedswarm.node.core import codec
from seedswarm.node.core.codec import (
    EXP_MAX,
    EXP_MIN,
    QMAX,
    dequantize,
    next_scale_exp,
    quantize,
    scale_of,
)


def test_scale_is_exact_power_of_two() -> None:
    assert scale_of(0) == 1.0
    assert scale_of(-3) == 0.125
    assert scale_of(EXP_MAX) == 2.0**EXP_MAX
    assert scale_of(EXP_MIN) == 2.0**EXP_MIN
    assert scale_of(np.int64(2)) == 4.0
    for bad in (EXP_MIN - 1, EXP_MAX + 1):
        with pytest.raises(ValueError):
            scale_of(bad)
    with pytest.raises(TypeError):
        scale_of(cast(Any, 1.0))
    with pytest.raises(TypeError):
        scale_of(True)


def test_roundtrip_error_bounded_inside_range_and_clipped_outside() -> None:
    rng = random.Random(1)
    for exp in (-20, -7, 0, 5):
        s = scale_of(exp)
        vals = [rng.uniform(-140 * s, 140 * s) for _ in range(2000)]
        q = dequantize(quantize(vals, s))
        assert len(q) == len(vals)
        for g, k in zip(vals, q, strict=True):
            assert -QMAX <= k <= QMAX
            if abs(g) <= QMAX * s:
                assert abs(k * s - g) <= s / 2
            else:
                assert k == (QMAX if g > 0 else -QMAX)


def test_round_half_away_from_zero_and_exact_near_half() -> None:
    s = 1.0
    assert dequantize(quantize([0.5, -0.5, 1.5, -1.5, 2.5, -2.5], s)) == [1, -1, 2, -2, 3, -3]
    # x + 0.5 would round this up to 1.0 in floating point; exact rounding must give 0.
    just_below = math.nextafter(0.5, 0.0)
    assert dequantize(quantize([just_below, -just_below], s)) == [0, 0]
    assert dequantize(quantize([126.5, 126.49, -126.5, 1e300, -1e300], s)) == [127, 126, -127, 127, -127]


def test_bytes_are_int8_twos_complement() -> None:
    assert quantize([0, 1, -1, 127, -127], 1.0) == bytes([0, 1, 255, 127, 129])
    assert quantize([], 1.0) == b""
    assert np.frombuffer(quantize([3, -5, 100], 1.0), dtype=np.int8).tolist() == [3, -5, 100]


def test_nan_and_inf() -> None:
    assert quantize([float("nan"), float("inf"), float("-inf"), 2.0], 1.0) == bytes([0, 127, 129, 2])
    with pytest.raises(ValueError, match="NaN"):
        quantize([1.0, float("nan")], 1.0, on_nan="raise")
    assert quantize([float("inf")], 1.0, on_nan="raise") == bytes([127])
    with pytest.raises(ValueError):
        quantize([1.0], 1.0, on_nan=cast(Any, "maybe"))


def test_bad_scale() -> None:
    for s in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError):
            quantize([1.0], s)


def test_dequantize_rejects_minus_128() -> None:
    assert dequantize(bytes([0x7F, 0x81, 0xFF, 0x00])) == [127, -127, -1, 0]
    assert dequantize(bytearray([5])) == [5]
    assert dequantize(memoryview(bytes([250]))) == [-6]
    with pytest.raises(ValueError, match="-128"):
        dequantize(bytes([1, 0x80, 2]))


def _agg(steps: list[float], one: int = codec.AGG_ONE) -> list[int]:
    return [round(s * one) for s in steps]


def test_scale_rule_moves_towards_the_band() -> None:
    e = 0
    assert next_scale_exp(e, _agg([30.0] * 16)) == e  # inside [8, 48]
    assert next_scale_exp(e, _agg([60.0, -60.0] * 8)) == e + 1  # median too large
    assert next_scale_exp(e, _agg([3.0, -2.0] * 8)) == e - 1  # median too small
    assert next_scale_exp(e, _agg([0.0] * 16)) == e - 1
    # saturation: 2 of 16 directions (12.5% > 10%) at the clip make it coarser even with a small median
    assert next_scale_exp(e, _agg([127.0, -127.0] + [20.0] * 14)) == e + 1
    assert next_scale_exp(e, _agg([127.0] + [20.0] * 15)) == e  # 6.25%: not enough
    # boundaries: exactly 48 and exactly 8 stay
    assert next_scale_exp(e, _agg([48.0] * 4)) == e
    assert next_scale_exp(e, _agg([8.0] * 4)) == e
    # even count: median is the mean of the middle two, in integers (7.5 steps -> finer, 8.5 -> stays)
    assert next_scale_exp(e, _agg([7.0, 8.0])) == e - 1
    assert next_scale_exp(e, _agg([8.0, 9.0])) == e
    assert next_scale_exp(e, []) == e  # empty round: unchanged
    assert next_scale_exp(e, _agg([60.0] * 4, one=16), agg_one=16) == e + 1


def test_scale_rule_is_bounded_and_integer_only() -> None:
    assert next_scale_exp(EXP_MAX, _agg([100.0] * 8)) == EXP_MAX
    assert next_scale_exp(EXP_MIN, _agg([0.0] * 8)) == EXP_MIN
    assert next_scale_exp(EXP_MAX + 5, []) == EXP_MAX
    with pytest.raises(TypeError):
        next_scale_exp(0, cast(Any, [1.5]))
    with pytest.raises(TypeError):
        next_scale_exp(cast(Any, 0.0), [1])
    with pytest.raises(ValueError):
        next_scale_exp(0, [1], agg_one=0)
    assert next_scale_exp(0, np.array([60 * 256] * 3, dtype=np.int64).tolist()) == 1
    assert next_scale_exp(0, list(np.array([60 * 256] * 3, dtype=np.int64))) == 1


def test_scale_rule_hysteresis_converges_without_oscillation() -> None:
    """Simulate honest gradients of fixed magnitude: the exponent settles and then stays put."""
    rng = np.random.default_rng(0)
    for gnorm in (1e-6, 3e-3, 1.0, 250.0):
        e = 0
        history = []
        for _ in range(60):
            g = rng.standard_normal(64) * gnorm
            q = dequantize(quantize(g.tolist(), scale_of(e)))
            e = next_scale_exp(e, [k * codec.AGG_ONE for k in q])
            history.append(e)
        tail = history[-20:]
        assert max(tail) - min(tail) <= 1, (gnorm, history)
        med = float(np.median(np.abs(rng.standard_normal(10000) * gnorm))) / scale_of(tail[-1])
        assert 4 <= med <= 96, (gnorm, med)
