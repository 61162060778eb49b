"""The one-byte codec and the public quantization-scale rule.

A trainer sends one signed byte per shared direction: ``q_k = clamp(round(g_k / scale), -127, 127)``
(DESIGN.md 3.3). Three properties matter to the protocol:

* **Bounded damage.** Whatever a trainer computes or claims, its byte is in ``[-127, 127]``, so its
  contribution to a direction is at most ``127 * scale``: the byte range *is* a per-direction norm
  clip. ``-128`` (``0x80``) is never produced and is rejected on the wire, which keeps the range
  symmetric (a median of honest values cannot be biased by the asymmetric extra code).
* **Public, exact scale.** ``scale = 2**exp`` is a power of two, so ``g / scale`` and
  ``q * scale`` are exact in binary floating point (no rounding beyond the one in ``round``), and
  ``exp`` is derived from the chain alone (:func:`next_scale_exp`), so every node applies the same
  update without sending the scale anywhere.
* **No garbage bytes.** A NaN never leaves a node as an arbitrary byte: by default it becomes
  ``0`` (an abstention on that direction: it moves the robust aggregate towards zero, never
  beyond the honest range), or :func:`quantize` raises if asked to (``on_nan="raise"``), so a
  caller can skip the round instead. ``+inf``/``-inf`` are real (if extreme) signals and clip to
  ``+127``/``-127`` like any other out-of-range value.

Rounding is half away from zero (``round(2.5) == 3``, ``round(-2.5) == -3``), computed exactly: it
does not depend on Python's banker's rounding nor on ``x + 0.5`` (which is inexact near 0.5).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from typing import Literal, SupportsFloat

QMAX = 127
"""Largest magnitude of a quantized value; the wire never carries ``-128``."""

EXP_MIN = -40
"""Finest allowed scale exponent (``2**-40 ~ 9e-13``)."""

EXP_MAX = 20
"""Coarsest allowed scale exponent (``2**20 ~ 1e6``)."""

AGG_ONE = 256
"""Default fixed-point unit of an aggregate: one quantization step is 256 (sampling/aggregators)."""

SCALE_UP_MEDIAN_STEPS = 48
"""Median ``|a_k|`` above this many steps: the scale is too fine, double it (exp + 1)."""

SCALE_DOWN_MEDIAN_STEPS = 8
"""Median ``|a_k|`` below this many steps: the scale is too coarse, halve it (exp - 1)."""

SATURATION_STEPS = 120
"""``|a_k|`` at or above this many steps counts as saturated (within ~5% of the clip at 127)."""

SATURATION_PERCENT = 10
"""More than this percentage of saturated directions also makes the scale coarser."""


def scale_of(exp: int) -> float:
    """The quantization scale ``2.0 ** exp`` (exact). ``exp`` must be in ``[EXP_MIN, EXP_MAX]``."""
    e = _as_int(exp, "exp")
    if not EXP_MIN <= e <= EXP_MAX:
        raise ValueError(f"scale exponent {e} outside [{EXP_MIN}, {EXP_MAX}]")
    return math.ldexp(1.0, e)


def _round_half_away(x: float) -> int:
    """Round a finite float half away from zero, exactly (``a - floor(a)`` is exact for a >= 0)."""
    a = abs(x)
    f = math.floor(a)
    r = f + 1 if a - f >= 0.5 else f
    return -r if x < 0 else r


def quantize_one(value: SupportsFloat, scale: float, on_nan: Literal["zero", "raise"] = "zero") -> int:
    """One value to an integer in ``[-QMAX, QMAX]`` (see :func:`quantize`)."""
    g = float(value)
    if math.isnan(g):
        if on_nan == "raise":
            raise ValueError("cannot quantize NaN (on_nan='raise')")
        return 0
    if math.isinf(g):
        return QMAX if g > 0 else -QMAX
    x = g / scale
    if x >= QMAX:
        return QMAX
    if x <= -QMAX:
        return -QMAX
    return _round_half_away(x)


def quantize(
    values: Sequence[SupportsFloat],
    scale: float,
    on_nan: Literal["zero", "raise"] = "zero",
) -> bytes:
    """Quantize projected gradients to one signed byte each (int8, two's complement).

    ``q_k = clamp(round_half_away(g_k / scale), -127, 127)``. Inside the range the error of
    ``q_k * scale`` is at most ``scale / 2``; outside it the value is clipped.

    NaN becomes ``0`` (``on_nan="zero"``, the default: an abstention on that direction) or raises
    ``ValueError`` (``on_nan="raise"``); ``+-inf`` clip to ``+-127``. ``scale`` must be a positive
    finite float (normally :func:`scale_of` of the chain's exponent).
    """
    if on_nan not in ("zero", "raise"):
        raise ValueError(f"on_nan must be 'zero' or 'raise', not {on_nan!r}")
    s = float(scale)
    if not (math.isfinite(s) and s > 0.0):
        raise ValueError(f"scale must be positive and finite, not {scale!r}")
    return bytes(quantize_one(v, s, on_nan) & 0xFF for v in values)


def dequantize(q: bytes | bytearray | memoryview) -> list[int]:
    """Signed integers of a quantized vector. Raises ``ValueError`` on ``0x80`` (-128).

    The wire never carries -128 (:func:`quantize` cannot produce it), so a byte 0x80 marks a
    malformed or malicious contribution and is refused rather than silently clipped.
    """
    out = []
    for i, b in enumerate(bytes(q)):
        if b == 0x80:
            raise ValueError(f"byte {i} is -128 (0x80), which the codec never produces")
        out.append(b - 256 if b > 127 else b)
    return out


def next_scale_exp(exp: int, aggregate: Sequence[int], agg_one: int = AGG_ONE) -> int:
    """The public scale rule: next round's exponent from this round's integer aggregate only.

    ``aggregate`` holds the K per-direction robust aggregates of the previous round in units of
    ``1/agg_one`` of a quantization step (``sampling.aggregators``). Every node holds the same
    integers (they are in the record), and this function uses integer arithmetic only, so every
    node derives the same next exponent: the scale is never transmitted and cannot be forked.

    Rule (the median of an even count is the mean of the two middle values; compared doubled, so
    still in integers):

    * ``exp + 1`` (coarser) if the median ``|a_k|`` exceeds ``SCALE_UP_MEDIAN_STEPS`` (48) steps,
      or more than ``SATURATION_PERCENT`` (10%) of the directions are saturated
      (``|a_k| >= SATURATION_STEPS``, 120 steps): bytes are hitting the clip, so the update is
      being distorted (the byte range is a norm clip, ``|g_k| <= 127 * scale``) and the
      robust statistic loses resolution at the top of the range.
    * ``exp - 1`` (finer) if the median ``|a_k|`` is below ``SCALE_DOWN_MEDIAN_STEPS`` (8) steps:
      most bytes are 0 or +-1, so quantization noise dominates the signal.
    * otherwise unchanged. The band [8, 48] is wider than a factor 2 on both sides, so one step
      of the rule moves the median (roughly halving or doubling it) back inside the band instead
      of oscillating (hysteresis).
    * an empty aggregate (a round with no contributions) leaves ``exp`` unchanged.

    The result is clamped to ``[EXP_MIN, EXP_MAX]``. Because the applied step is
    ``scale * a_k / agg_one``, this rule also normalizes the update size: the step tracks the
    typical projected-gradient magnitude (as in normalized SGD), so the learning rate ``eta`` is
    a fraction of "one typical gradient", and the scale halves as the gradients shrink.

    The rule is only as robust as the aggregate it reads: under the plain mean the Byzantine
    trainers write their share of every ``a_k``, so they can lift the median over 48 steps when the
    honest one is near it, and hold it above 8 otherwise, ratcheting the scale up until the honest
    bytes are noise against the clip (``scale_pump`` in ``sim/attacks.py``; docs/byzantine.md).
    """
    e = _as_int(exp, "exp")
    one = _as_int(agg_one, "agg_one")
    if one <= 0:
        raise ValueError(f"agg_one must be positive, not {one}")
    mags = sorted(abs(_as_int(a, "aggregate value")) for a in aggregate)
    n = len(mags)
    if n == 0:
        return min(max(e, EXP_MIN), EXP_MAX)
    median2 = mags[(n - 1) // 2] + mags[n // 2]  # twice the median, exact
    saturated = sum(1 for m in mags if m >= SATURATION_STEPS * one)
    if median2 > 2 * SCALE_UP_MEDIAN_STEPS * one or 100 * saturated > SATURATION_PERCENT * n:
        e += 1
    elif median2 < 2 * SCALE_DOWN_MEDIAN_STEPS * one:
        e -= 1
    return min(max(e, EXP_MIN), EXP_MAX)


def _as_int(x: object, what: str) -> int:
    """An exact integer (``int`` or a numpy integer); bools and floats are refused."""
    if isinstance(x, bool):
        raise TypeError(f"{what} must be an integer, not bool")
    try:
        return operator.index(x)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"{what} must be an integer, not {type(x).__name__}") from None
