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

``guarded_mean`` (the default)
    a rule over whole rows, not one column at a time. With ``m`` the per-direction median (as
    above) and ``R^2`` the median over rows of ``|x_i - m|^2``:

    1. distance guard: the rows with ``|x_i - m| <= 2 R`` (at most twice the typical distance to
       the median) are *near*; ``c`` is their mean;
    2. alignment guard: with ``a_i = <x_i - c, c>`` (the near rows' pulls along the centre), a near
       row is dropped only if it pulls against the centre by more than both
       ``2 |c| R / sqrt(K)`` (twice the typical spread of one direction, ``R / sqrt(K)``, the
       isotropic bound) and ``median(a) - 3 MAD(a)`` (the pulls' own spread: 3 median absolute
       deviations are 2 sigma of a normal);

    the result is the mean of the kept rows, ``rdiv(256 * sum(kept), n_kept)``. If fewer than
    ``max(n - f, n // 2 + 1)`` rows are near, or are kept, the median instead. Everything is
    exact integer arithmetic (Python ints for the squared comparisons), so it is as exact and
    row-order independent as the other rules.

    Why the learned bound: honest trainers' batch gradients also differ *along* the mean gradient
    (a batch with more or less left to learn), and that part of ``a_i`` grows as K while the
    isotropic bound grows as sqrt(K). With the isotropic bound alone, 16 honest `lm` trainers at
    K = 4,096 kept 9 rows (or fell back to the median), at K = 1,024 9 to 11 (docs/lm.md). The
    median and the MAD of the pulls move by at most a few honest order statistics with a
    minority of Byzantine rows, so the bound stays the honest spread.

    Why: the K values of one trainer are K measurements of *one* gradient, so an attack that
    shifts every direction "a little" (ALIE, IPM, zeros) is inside the honest spread of each column
    (no per-direction statistic can see it) but adds up along ``-c``, where the alignment guard
    sees it. The centre is the near rows' mean, not the median: when a trainer's values are noisy,
    a coherent minority drags the median of every column most of the way to itself (the median is
    most sensitive to mass near the centre), so the median's own direction no longer shows the
    pull; the mean moves by only the attackers' share of it. Its limit: an attacker that knows the
    rule can pull ``c`` towards itself (from inside the distance guard) until it looks aligned and
    the honest rows do not; on noisy estimates that costs several points (``adaptive`` in
    ``sim/attacks.py``, measured in ``docs/byzantine.md``). Per-direction rules must stop at the median at ``n = 16`` (``f = 7`` for 20 %
    Byzantine at ``1e-6``, ``sampling.byzantine.trim_for``) and the median is pulled by about a
    third of the honest spread per direction by 20 % attackers, which is most of the signal when a
    trainer's batch is small; the guarded mean keeps the efficiency of the mean on honest rows.
    Measured on ``seedswarm sim`` defaults, 20 % Byzantine, 3 seeds: ``docs/byzantine.md``.

Guarantees (tested): if at most ``f`` rows and fewer than ``n / 2`` rows are Byzantine, then
``median``, ``trimmed_mean`` and ``clipped_mean`` lie, per direction, within ``256 *`` the
``[min, max]`` of the honest rows, whatever the Byzantine rows contain (for ``median`` the ``f``
condition is not needed). The reason: under those conditions ``x_(f)``, ``x_(n-1-f)`` and the
median's middle values are all honest-bounded, and every rule averages values inside them.

``guarded_mean`` instead bounds the whole vector: if fewer than ``n / 2`` rows are Byzantine, ``R``
is at most the largest honest distance to ``m`` (more than half the distances are honest), every
kept row is within ``2 R`` of ``m``, and so is their mean: ``|a - m| <= 2 max_honest |x_i - m|``,
up to the final rounding, whatever the Byzantine rows contain; ``m`` itself is honest-bounded per
direction. That bound is the worst case: an attacker that knows the rule and stays inside the
guards pulls the result by up to its share of ``2 R`` (``adaptive``, measured in
``docs/byzantine.md``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

__all__ = ["AGG_ONE", "DEFAULT_RULE", "RULES", "aggregate", "aggregate_array", "guarded_keep", "rdiv",
           "validate_rule"]

AGG_ONE = 256
"""Fixed-point unit of an aggregate: one quantisation step is ``AGG_ONE``."""

RULES: tuple[str, ...] = ("mean", "median", "trimmed_mean", "clipped_mean", "guarded_mean")
"""Known rules; ``RULES[-1]`` (``guarded_mean``) is the default of every config."""

DEFAULT_RULE = RULES[-1]

GUARD_RADIUS = 2
"""Distance guard: a row more than this many typical distances from the median is dropped."""
GUARD_SPREAD = 2
"""Alignment guard: a row more than this many one-direction spreads against the centre is dropped..."""
GUARD_ALONG = 3
"""...and further below the rows' median pull along the centre than this many median absolute deviations
of it (3 MAD is 2 sigma of a normal)."""

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


def _matrix(rows: Sequence[bytes]) -> npt.NDArray[np.int8]:
    """Rows of signed bytes, validated, as an ``(n, K)`` int8 matrix."""
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
    return m


def _sorted_columns(m: npt.NDArray[np.int8]) -> _I16:
    """The ``(n, K)`` matrix as a ``(K, n)`` int16 matrix with each line sorted.

    Line ``k`` holds the ``n`` values of direction ``k`` in ascending order, which makes every
    per-direction rule independent of the order of the rows. (Sorting contiguous int16 lines is
    about ten times faster than sorting the columns of an ``(n, K)`` int64 matrix; the sorted
    values are the same. int16 holds twice any value, which ``clipped_mean`` needs; every sum is
    taken in int64.)
    """
    lines = np.ascontiguousarray(m.T).astype(np.int16)
    lines.sort(axis=1)
    return lines


def _median256(s: _I16) -> _I64:
    """Median of each line of the line-sorted ``(K, n)`` matrix ``s``, in units of 1/256 (exact)."""
    n = s.shape[1]
    if n % 2:
        return AGG_ONE * s[:, n // 2].astype(np.int64)
    return (AGG_ONE // 2) * (s[:, n // 2 - 1].astype(np.int64) + s[:, n // 2])


def _check_f(f: int) -> None:
    if isinstance(f, bool) or not isinstance(f, (int, np.integer)):
        raise TypeError(f"f must be an int, got {type(f).__name__}")
    if f < 0:
        raise ValueError(f"f must be >= 0, got {f}")


def aggregate_array(rule: str, rows: Sequence[bytes], f: int = 0) -> _I64:
    """``aggregate`` as an int64 numpy array of length K."""
    validate_rule(rule)
    _check_f(f)
    x = _matrix(rows)
    s = _sorted_columns(x)
    n = s.shape[1]
    if rule == "guarded_mean":
        return _guarded_mean(x, s, f)
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


def guarded_keep(rows: Sequence[bytes], f: int = 0) -> list[int] | None:
    """The indices of the rows ``guarded_mean`` averages, or None where it falls back to the median.

    For the simulator's adaptive attacker and for diagnostics; the rule itself is ``aggregate``.
    """
    _check_f(f)
    x = _matrix(rows)
    return _guarded_keep(x, _sorted_columns(x), f)


def _guarded_mean(x: npt.NDArray[np.int8], s: _I16, f: int) -> _I64:
    keep = _guarded_keep(x, s, f)
    if keep is None:
        return _median256(s)
    return rdiv(AGG_ONE * x[keep].astype(np.int64).sum(axis=0), len(keep))


def _guarded_keep(x: npt.NDArray[np.int8], s: _I16, f: int) -> list[int] | None:
    """See the module docstring. Rows are judged as sets, so the row order cannot matter.

    Units: deviations from the median in half-steps (``2 x - 2 m``, exact); with ``S`` the sum of
    the ``t`` near rows, the centre is ``c = S / t`` and ``x_i - c = e_i / t`` with the exact
    integers ``e_i = t x_i - S``. Squared comparisons use Python ints (no overflow for any K).
    """
    n, k = x.shape
    xi = x.astype(np.int64)
    m2 = _median256(s) // (AGG_ONE // 2)  # the median in half-steps: exact
    d = 2 * xi - m2[None, :]
    dist2 = [int(v) for v in (d * d).sum(axis=1)]
    r2x2 = _twice_median(dist2)  # 2 R^2, in half-steps^2
    # distance guard: |x_i - m|^2 <= GUARD_RADIUS^2 R^2
    near = [i for i in range(n) if 2 * dist2[i] <= GUARD_RADIUS**2 * r2x2]
    if len(near) < max(n - f, n // 2 + 1):
        return None
    # alignment guard against the centre c = mean(near): <x_i - c, c> >= -GUARD_SPREAD |c| R / sqrt(K).
    # With t = len(near), S = sum(near), e_i = t x_i - S = t (x_i - c) and a_i = <e_i, S> = t^2 <x_i - c, c>,
    # R^2 = r2x2 / 8 in steps^2 (r2x2 is twice the median squared distance in half-steps^2):
    #   drop  <=>  a_i < 0  and  8 K a_i^2 > G^2 t^2 |S|^2 r2x2.
    t = len(near)
    total = xi[near].sum(axis=0)
    e = t * xi[near] - total[None, :]
    along = [int(v) for v in (e * total[None, :]).sum(axis=1)]
    ss = int((total * total).sum())
    # learned spread along the centre, in exact integers: med2 = 2 median(a), mad4 = 4 median |a - median(a)|;
    # a row is dropped only if it is beyond both: a < median(a) - GUARD_ALONG mad  <=>  2 (2 a - med2) < -G mad4.
    med2 = _twice_median(along)
    mad4 = _twice_median([abs(2 * a - med2) for a in along])
    keep = [i for i, a in zip(near, along, strict=True)
            if not (a < 0 and 8 * k * a * a > GUARD_SPREAD**2 * t * t * ss * r2x2
                    and 2 * (2 * a - med2) < -GUARD_ALONG * mad4)]
    return keep if len(keep) >= max(n - f, n // 2 + 1) else None


def _twice_median(values: Sequence[int]) -> int:
    """Twice the median of ``values`` (the sum of the two middle ones for an even count): exact."""
    v = sorted(values)
    n = len(v)
    return 2 * v[n // 2] if n % 2 else v[n // 2 - 1] + v[n // 2]


def aggregate(rule: str, rows: Sequence[bytes], f: int = 0) -> list[int]:
    """Aggregate ``n`` rows of ``K`` signed bytes into ``K`` integers (units of 1/``AGG_ONE``).

    ``rule`` is one of ``RULES`` (see the module docstring for the exact definitions and the
    rounding); ``f`` is the number of values trimmed or bounded at each end (``trimmed_mean``,
    ``clipped_mean``), or of rows ``guarded_mean`` may drop before it falls back to the median
    (ignored by ``mean`` and ``median``). Raises ValueError for an unknown rule,
    no rows, rows of different lengths, a byte equal to -128, or ``f < 0``; TypeError for inputs
    that are not byte strings.
    """
    return [int(v) for v in aggregate_array(rule, rows, f).tolist()]
