"""How many Byzantine peers land on a committee: exact tails for sizing and trimming.

A committee of ``s`` peers is drawn uniformly (rendezvous hashing on an unpredictable beacon) from
a population of ``N`` eligible peers of which ``B`` are Byzantine. The number ``X`` of Byzantine
committee members is then hypergeometric (sampling without replacement); when the population is
large (``population=None``) it is binomial ``Bin(s, byz_share)``, which is also an upper bound on the
hypergeometric tail in the region that matters here (sampling without replacement concentrates
more), so the binomial numbers are the conservative choice when ``N`` is unknown or changing.

Two questions are asked of that distribution:

* **committee size**: a per-direction median over ``s`` values is moved outside the honest range
  only if ``X >= ceil(s / 2)`` (DESIGN.md invariant 4), so ``committee_size_for`` finds the smallest
  ``s`` with ``P(X >= ceil(s/2)) <= p_fail``;
* **trim**: a trimmed mean that drops ``f`` values at each end stays within the honest range as
  long as ``X <= f``, so ``trim_for`` finds the smallest ``f`` with ``P(X > f) <= p_fail``.

Accuracy: failure probabilities of interest are ``1e-6 .. 1e-12``, far below where ``1 - cdf``
in floating point means anything, so tails are summed directly over the upper terms, never as a
complement. Hypergeometric tails are computed exactly with integer binomials (``math.comb``) and
one correctly rounded big-integer division; binomial tails are summed in log space from
``log(math.comb(s, k))`` (exact integer, one rounding) with a log-sum-exp, which keeps the
relative error near 1e-12 even for ``s`` in the thousands. The tests check both against exact
rational arithmetic.

Share to count: with a finite population the Byzantine count is ``B = ceil(byz_share * N)``
(conservative: "20 % of 11 peers" is taken as 3 Byzantine peers, not 2), after removing
floating-point noise (``0.29 * 100`` is 28.999999999999996 in binary and means 29).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from typing import NamedTuple

import numpy as np

__all__ = [
    "TableRow",
    "binom_more_than",
    "byzantine_count",
    "committee_size_for",
    "hypergeom_more_than",
    "markdown_table",
    "p_byzantine_majority",
    "p_more_than",
    "table",
    "trim_for",
]


def _check_share(byz_share: float) -> float:
    p = float(byz_share)
    if not 0.0 <= p <= 1.0 or math.isnan(p):
        raise ValueError(f"byz_share must be in [0, 1], got {byz_share!r}")
    return p


def _check_p_fail(p_fail: float) -> float:
    q = float(p_fail)
    if not 0.0 < q < 1.0:
        raise ValueError(f"p_fail must be in (0, 1), got {p_fail!r}")
    return q


def byzantine_count(byz_share: float, population: int) -> int:
    """Number of Byzantine peers assumed in a population of ``population`` (rounded up)."""
    p = _check_share(byz_share)
    if population < 0:
        raise ValueError(f"population must be >= 0, got {population}")
    exact = p * population
    nearest = round(exact)
    # Treat products within float noise of an integer as that integer, then round up.
    if abs(exact - nearest) <= 1e-9 * max(1.0, exact):
        return int(nearest)
    return min(population, math.ceil(exact))


def hypergeom_more_than(population: int, byzantine: int, sample: int, f: int) -> float:
    """``P(X > f)`` for ``X`` the Byzantine count of a ``sample`` drawn without replacement.

    Exact: the numerator ``sum_{k > f} C(B, k) C(N - B, s - k)`` and the denominator ``C(N, s)``
    are integers, and Python's int / int division is correctly rounded.
    """
    n, b, s = population, byzantine, sample
    if not 0 <= b <= n:
        raise ValueError(f"need 0 <= byzantine <= population, got byzantine={b}, population={n}")
    if not 0 <= s <= n:
        raise ValueError(f"need 0 <= sample <= population, got sample={s}, population={n}")
    lo = max(f + 1, 0, s - (n - b))
    hi = min(s, b)
    if lo > hi:
        return 0.0
    # Walk the terms with exact integer recurrences (one big-int multiply and divide per step)
    # instead of two fresh math.comb calls per term.
    m = n - b
    a = math.comb(b, lo)  # C(B, k)
    c = math.comb(m, s - lo)  # C(N - B, s - k)
    num = 0
    for k in range(lo, hi + 1):
        num += a * c
        if k < hi:
            a = a * (b - k) // (k + 1)
            c = c * (s - k) // (m - s + k + 1)
    return num / math.comb(n, s)


def binom_more_than(sample: int, f: int, p: float) -> float:
    """``P(X > f)`` for ``X ~ Bin(sample, p)``, summed over the upper tail in log space."""
    s = sample
    if s < 0:
        raise ValueError(f"sample must be >= 0, got {s}")
    p = _check_share(p)
    if f < 0:
        return 1.0
    if f >= s:
        return 0.0
    if p == 0.0:
        return 0.0
    if p == 1.0:
        return 1.0
    lp = math.log(p)
    lq = math.log1p(-p)
    logs: list[float] = []
    comb = math.comb(s, f + 1)  # exact C(s, k), advanced by an exact integer recurrence
    for k in range(f + 1, s + 1):
        logs.append(math.log(comb) + k * lp + (s - k) * lq)
        comb = comb * (s - k) // (k + 1)
    top = max(logs)
    return min(1.0, math.exp(top) * math.fsum(math.exp(x - top) for x in logs))


def p_more_than(sample: int, f: int, byz_share: float, population: int | None = None) -> float:
    """``P(X > f)``: probability that more than ``f`` of ``sample`` committee members are Byzantine.

    ``population=None`` is the infinite-population (binomial) limit; otherwise the exact
    hypergeometric tail with ``byzantine_count(byz_share, population)`` Byzantine peers.
    """
    if population is None:
        return binom_more_than(sample, f, byz_share)
    return hypergeom_more_than(population, byzantine_count(byz_share, population), sample, f)


def p_byzantine_majority(sample: int, byz_share: float, population: int | None = None) -> float:
    """``P(X >= ceil(sample / 2))``: the only event in which a per-direction median can fail.

    With an even sample, exactly half Byzantine counts as failure: the median is then the mean of
    one honest and one Byzantine middle value and may leave the honest range.
    """
    if sample < 1:
        raise ValueError(f"sample must be >= 1, got {sample}")
    return p_more_than(sample, (sample + 1) // 2 - 1, byz_share, population)


def trim_for(
    sample: int,
    byz_share: float,
    p_fail: float,
    population: int | None = None,
    *,
    strict: bool = False,
) -> int:
    """Smallest ``f`` with ``P(X > f) <= p_fail``, capped at ``(sample - 1) // 2``.

    The cap is the largest trim that still leaves a value in the middle (``2 f < sample``); past it
    the trimmed mean is the median anyway. If even the cap does not reach ``p_fail`` the cap is
    returned (the median is the best this sample can do), unless ``strict`` asks for a ValueError.
    ``f`` refers to the number of contributions actually aggregated; callers that aggregate fewer
    than the full committee should call this with the number they received.
    """
    if sample < 1:
        raise ValueError(f"sample must be >= 1, got {sample}")
    q = _check_p_fail(p_fail)
    cap = (sample - 1) // 2
    # P(X > f) decreases in f, so binary search over [0, cap].
    if p_more_than(sample, cap, byz_share, population) > q:
        if strict:
            raise ValueError(
                f"no trim up to {cap} reaches p_fail={p_fail} for sample={sample}, "
                f"byz_share={byz_share}, population={population}"
            )
        return cap
    lo, hi = 0, cap
    while lo < hi:
        mid = (lo + hi) // 2
        if p_more_than(sample, mid, byz_share, population) <= q:
            hi = mid
        else:
            lo = mid + 1
    return lo


def _majority_tails(p: float, population: int | None, limit: int) -> Iterator[tuple[int, float]]:
    """``(s, P(X_s >= ceil(s/2)))`` for ``s = 1 .. limit``, by growing the pmf one draw at a time.

    Each step is one vectorised convolution (binomial) or one draw without replacement
    (hypergeometric); all terms are non-negative, so the relative error stays near ``s * 1e-16``.
    Used to *scan* for a committee size; the answer is then confirmed with the exact tail.
    """
    pmf = np.ones(1, dtype=np.float64)  # distribution of X_0
    if population is None:
        for s in range(1, limit + 1):
            new = np.zeros(s + 1, dtype=np.float64)
            new[:s] = pmf * (1.0 - p)
            new[1:] += pmf * p
            pmf = new
            yield s, float(pmf[(s + 1) // 2 :].sum())
    else:
        n = population
        b = byzantine_count(p, n)
        for s in range(1, limit + 1):
            k = np.arange(s, dtype=np.float64)  # values of X_{s-1}
            left = n - (s - 1)  # peers not yet drawn
            honest_left = np.maximum((n - b) - ((s - 1) - k), 0.0)
            byz_left = np.maximum(b - k, 0.0)
            new = np.zeros(s + 1, dtype=np.float64)
            new[:s] = pmf * (honest_left / left)
            new[1:] += pmf * (byz_left / left)
            pmf = new
            yield s, float(pmf[(s + 1) // 2 :].sum())


def committee_size_for(
    byz_share: float, p_fail: float, population: int | None = None, max_size: int = 4096
) -> int:
    """Smallest committee size ``s`` with ``P(Byzantine majority) <= p_fail``.

    The probability is not monotone in ``s`` (an even size fails on a tie, so it is worse than the
    odd size below it), hence a scan rather than a bisection. The scan grows the distribution one
    draw at a time (cheap: all sizes up to 4096 in well under a second); a size whose fast estimate
    is within 1e-9 (relative) of ``p_fail`` or below is confirmed with the exact tail, so the
    answer is the one the exact functions give. Raises ValueError if no ``s <= max_size`` (and
    ``<= population``) qualifies, and at once for ``byz_share >= 1/2``, where no committee size
    helps (the binomial majority probability is then at least 1/2 for every ``s``).
    """
    p = _check_share(byz_share)
    q = _check_p_fail(p_fail)
    if q < 1e-250:
        raise ValueError(f"p_fail={p_fail} is below what double precision can resolve here")
    if p >= 0.5:
        raise ValueError(f"no committee size survives a Byzantine share of {byz_share} (>= 1/2)")
    limit = max_size if population is None else min(max_size, population)
    for s, approx in _majority_tails(p, population, limit):
        if approx <= q * (1.0 + 1e-9) and p_byzantine_majority(s, p, population) <= q:
            return s
    raise ValueError(
        f"no committee size up to {limit} reaches p_fail={p_fail} at byz_share={byz_share}, "
        f"population={population}"
    )


class TableRow(NamedTuple):
    """One line of the sizing table in the docs."""

    byz_share: float
    committee_size: int  # smallest s with P(Byzantine majority) <= p_fail
    p_majority: float  # P(Byzantine majority) at committee_size
    sample: int  # the committee size the trim column is computed for
    trim: int  # trim_for(sample, byz_share, p_fail)
    p_trim_fail: float  # P(X > trim) at sample


def table(
    shares: Iterable[float],
    p_fail: float,
    population: int | None = None,
    sample: int = 64,
    max_size: int = 4096,
) -> list[TableRow]:
    """For each Byzantine share: the committee size needed, and the trim needed at ``sample``.

    (At the minimal committee size the trim is always the median's, ``(s - 1) // 2``, which is
    why the trim column is computed at a fixed, larger committee instead.)
    """
    rows: list[TableRow] = []
    for share in shares:
        s = committee_size_for(share, p_fail, population, max_size)
        f = trim_for(sample, share, p_fail, population)
        rows.append(
            TableRow(
                byz_share=float(share),
                committee_size=s,
                p_majority=p_byzantine_majority(s, share, population),
                sample=sample,
                trim=f,
                p_trim_fail=p_more_than(sample, f, share, population),
            )
        )
    return rows


def markdown_table(rows: Sequence[TableRow]) -> str:
    """The rows of ``table`` as a Markdown table, for ``docs/``."""
    lines = [
        "| Byzantine share | committee size s | P(majority) at s | at committee n | trim f | P(X > f) |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.byz_share:.0%} | {r.committee_size} | {r.p_majority:.2e} | {r.sample} "
            f"| {r.trim} | {r.p_trim_fail:.2e} |"
        )
    return "\n".join(lines)
