"""Per-direction aggregation of one-byte projected gradients, in integers only.

Every trainer of a round sends ``K`` signed bytes ``q_k`` in ``[-127, 127]`` (DESIGN.md 3.3); row
``i`` of the input is trainer ``i``'s bytes. Because all trainers measured the *same* ``K``
directions, column ``k`` holds ``n`` estimates of one scalar, and a robust statistic per column
bounds what a Byzantine minority can do (DESIGN.md invariant 4).

Every node recomputes the aggregate of every record it applies, and a fraud proof is a mismatch,
so the result must be bit-identical on every machine: it is computed with integer arithmetic only
(numpy int16 for the sorted values, int64 for every sum; nothing comes near overflow), and every
rule first sorts each column, so the result does not depend on the order of the rows either.

Output unit: ``1 / AGG_ONE`` of a quantisation step, i.e. ``a_k = round(AGG_ONE * statistic_k)``.
The caller turns it into a coefficient as ``a_k * scale_r / AGG_ONE``.

Rounding, used by every rule wherever a division is not exact: **round half away from zero**,
``rdiv(a, d) = sign(a) * floor((2 |a| + d) / (2 d))`` for ``d > 0``, so ``rdiv(3, 2) = 2``,
``rdiv(-3, 2) = -2`` and ``rdiv(-a, d) = -rdiv(a, d)`` (the rules are symmetric under negating all
inputs, which keeps them unbiased around zero).

Rules (``n`` rows, ``x_(0) <= ... <= x_(n-1)`` one sorted column, ``f >= 0`` the trim):

``mean``
    ``rdiv(256 * sum x, n)``. Not robust: one row can move it by ``254 * 256 / n``.
``median``
    ``256 * x_(n//2)`` for odd ``n``; ``128 * (x_(n/2-1) + x_(n/2))`` for even ``n`` (exact, no
    rounding). Ignores ``f``.
``trimmed_mean``
    drop the ``f`` lowest and ``f`` highest values, ``rdiv(256 * sum(rest), n - 2f)``. If
    ``2f >= n`` nothing would be left: the median instead.
``clipped_mean``
    with ``m`` the median (as above), ``lo = x_(f)``, ``hi = x_(n-1-f)`` (the ends of the
    ``f``-trimmed range) and ``c = min(m - lo, hi - m)`` (the smaller half-width of that range seen
    from the median), clip every value to ``[m - c, m + c]`` and take the mean:
    ``rdiv(256 * sum clip(x, m - c, m + c), n)``, computed in half-steps so it stays exact. If
    ``2f >= n``: the median. Unlike the trimmed mean it keeps every contribution (values beyond
    the clip still pull, by at most ``c``), which lowers its variance on honest noise; since the
    clip interval is symmetric around the median it does not drift towards a skewed tail; and since
    ``[m - c, m + c]`` lies inside ``[x_(f), x_(n-1-f)]``, it has the same guarantee as the
    trimmed mean below. With ``f = 0`` it is the mean clipped to the symmetric range the data
    allows, not the plain mean.

Guarantee (tested): if at most ``f`` rows and fewer than ``n / 2`` rows are Byzantine, then
``median``, ``trimmed_mean`` and ``clipped_mean`` lie, per direction, within ``256 *`` the
``[min, max]`` of the honest rows, whatever the Byzantine rows contain (for ``median`` the ``f``
condition is not needed). The reason: under those conditions ``x_(f)``, ``x_(n-1-f)`` and the
median's middle values are all honest-bounded, and every rule averages values inside them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

__all__ = ["AGG_ONE", "RULES", "aggregate", "aggregate_array", "rdiv", "validate_rule"]

AGG_ONE = 256
"""Fixed-point unit of an aggregate: one quantisation step is ``AGG_ONE``."""

RULES: tuple[str, ...] = ("mean", "median", "trimmed_mean", "clipped_mean")

_I64 = npt.NDArray[np.int64]
_I16 = npt.NDArray[np.int16]


def validate_rule(name: str) -> str:
    """Return ``name`` if it is a known rule, else raise a ValueError listing the choices."""
    if name not in RULES:
        raise ValueError(f"unknown aggregation rule {name!r}; choose one of: {', '.join(RULES)}")
    return name


def rdiv(num: _I64, den: int | _I64) -> _I64:
    """Integer division rounded half away from zero (``den > 0``), elementwise."""
    num = np.asarray(num, dtype=np.int64)
    q = (2 * np.abs(num) + den) // (2 * np.asarray(den, dtype=np.int64))
    return np.where(num < 0, -q, q)


def _sorted_columns(rows: Sequence[bytes]) -> _I16:
    """Rows of signed bytes, validated, as a ``(K, n)`` int16 matrix with each line sorted.

    Line ``k`` holds the ``n`` values of direction ``k`` in ascending order, which makes every
    rule independent of the order of the rows. (Sorting contiguous int16 lines is about ten times
    faster than sorting the columns of an ``(n, K)`` int64 matrix; the sorted values are the same.
    int16 holds twice any value, which ``clipped_mean`` needs; every sum is taken in int64.)
    """
    if isinstance(rows, (bytes, bytearray, memoryview, str)):
        raise TypeError("rows must be a sequence of byte strings, not a single byte string")
    n = len(rows)
    if n == 0:
        raise ValueError("cannot aggregate zero rows")
    for i, r in enumerate(rows):
        if not isinstance(r, (bytes, bytearray, memoryview)):
            raise TypeError(f"row {i} is {type(r).__name__}, expected bytes")
    k = len(rows[0])
    for i, r in enumerate(rows):
        if len(r) != k:
            raise ValueError(
                f"row {i} has {len(r)} values, row 0 has {k}: all rows must have the same length"
            )
    m = np.frombuffer(b"".join(bytes(r) for r in rows), dtype=np.int8).reshape(n, k)
    bad = m == -128
    if bad.any():
        i, j = (int(v) for v in np.argwhere(bad)[0])
        raise ValueError(f"row {i} value {j} is -128; one-byte values must lie in [-127, 127]")
    lines = np.ascontiguousarray(m.T).astype(np.int16)
    lines.sort(axis=1)
    return lines


def _median256(s: _I16) -> _I64:
    """Median of each line of the line-sorted ``(K, n)`` matrix ``s``, in units of 1/256 (exact)."""
    n = s.shape[1]
    if n % 2:
        return AGG_ONE * s[:, n // 2].astype(np.int64)
    return (AGG_ONE // 2) * (s[:, n // 2 - 1].astype(np.int64) + s[:, n // 2])


def aggregate_array(rule: str, rows: Sequence[bytes], f: int = 0) -> _I64:
    """``aggregate`` as an int64 numpy array of length K."""
    validate_rule(rule)
    if isinstance(f, bool) or not isinstance(f, (int, np.integer)):
        raise TypeError(f"f must be an int, got {type(f).__name__}")
    if f < 0:
        raise ValueError(f"f must be >= 0, got {f}")
    s = _sorted_columns(rows)
    n = s.shape[1]
    if rule == "mean":
        return rdiv(AGG_ONE * s.sum(axis=1, dtype=np.int64), n)
    if rule == "median" or 2 * f >= n:
        return _median256(s)
    if rule == "trimmed_mean":
        return rdiv(AGG_ONE * s[:, f : n - f].sum(axis=1, dtype=np.int64), n - 2 * f)
    # clipped_mean, in half-steps so that the even-n median is an integer.
    # Everything here lies in [-254, 254], so int16 is exact (and its min/max are vectorised).
    m2 = (_median256(s) // (AGG_ONE // 2)).astype(np.int16)  # exact: the median in units of 1/2
    lo2 = 2 * s[:, f]
    hi2 = 2 * s[:, n - 1 - f]
    c2 = np.minimum(m2 - lo2, hi2 - m2)
    clipped2 = np.minimum(np.maximum(2 * s, (m2 - c2)[:, None]), (m2 + c2)[:, None])
    return rdiv((AGG_ONE // 2) * clipped2.sum(axis=1, dtype=np.int64), n)


def aggregate(rule: str, rows: Sequence[bytes], f: int = 0) -> list[int]:
    """Aggregate ``n`` rows of ``K`` signed bytes into ``K`` integers (units of 1/``AGG_ONE``).

    ``rule`` is one of ``RULES`` (see the module docstring for the exact definitions and the
    rounding); ``f`` is the number of values trimmed or bounded at each end (``trimmed_mean``,
    ``clipped_mean``; ignored by ``mean`` and ``median``). Raises ValueError for an unknown rule,
    no rows, rows of different lengths, a byte equal to -128, or ``f < 0``; TypeError for inputs
    that are not byte strings.
    """
    return [int(v) for v in aggregate_array(rule, rows, f).tolist()]
