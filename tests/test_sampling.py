"""Committee selection (sampling/committee.py) and Byzantine tail math (sampling/byzantine.py)."""

from __future__ import annotations

import itertools
import math
import random
import time
from fractions import Fraction

import pytest

from seedswarm.crypto.hashing import h, rank_key
from seedswarm.sampling.byzantine import (
    TableRow,
    binom_more_than,
    byzantine_count,
    committee_size_for,
    hypergeom_more_than,
    markdown_table,
    p_byzantine_majority,
    p_more_than,
    table,
    trim_for,
)
from seedswarm.sampling.committee import (
    AGGREGATOR_DOMAIN,
    TRAINER_DOMAIN,
    Committee,
    rank_peers,
    select_committee,
)


def peers(n: int, tag: bytes = b"peer") -> list[bytes]:
    return [h(b"test/" + tag, i.to_bytes(4, "big")) for i in range(n)]


def beacon(i: int) -> bytes:
    return h(b"test/beacon", i.to_bytes(8, "big"))


# --- committee ----------------------------------------------------------------------------------


def test_selection_is_rendezvous_by_rank_key() -> None:
    """The fast path (shared hash prefix, nsmallest) equals the plain definition."""
    ps = peers(300)
    b = beacon(1)
    c = select_committee(b, ps, 20, 3)
    by_t = sorted(ps, key=lambda p: rank_key(TRAINER_DOMAIN, b, p))
    by_a = sorted(ps, key=lambda p: rank_key(AGGREGATOR_DOMAIN, b, p))
    assert c.trainers == tuple(by_t[:20])
    assert c.aggregators == tuple(by_a[:3])
    assert rank_peers(TRAINER_DOMAIN, b, ps) == by_t
    assert rank_peers(AGGREGATOR_DOMAIN, b, ps, 5) == by_a[:5]


def test_non_32_byte_ids_hash_like_rank_key() -> None:
    ps = [b"a", b"bb", b"c" * 40, *peers(3)]
    b = beacon(2)
    assert rank_peers(TRAINER_DOMAIN, b, ps) == sorted(
        ps, key=lambda p: rank_key(TRAINER_DOMAIN, b, p)
    )


def test_deterministic_and_order_independent() -> None:
    ps = peers(500)
    b = beacon(3)
    c = select_committee(b, ps, 32, 4)
    rng = random.Random(7)
    for _ in range(5):
        shuffled = ps[:]
        rng.shuffle(shuffled)
        assert select_committee(b, iter(shuffled), 32, 4) == c
    assert select_committee(beacon(4), ps, 32, 4) != c
    assert len(c.trainers) == 32 and len(c.aggregators) == 4


def test_roles_use_independent_domains() -> None:
    ps = peers(1000)
    c = select_committee(beacon(5), ps, 10, 10)
    assert c.trainers != c.aggregators


def test_small_and_degenerate_sizes() -> None:
    ps = peers(5)
    c = select_committee(beacon(6), ps, 64, 8)
    assert sorted(c.trainers) == sorted(ps) and sorted(c.aggregators) == sorted(ps)
    assert c.trainers == tuple(rank_peers(TRAINER_DOMAIN, beacon(6), ps))
    assert select_committee(beacon(6), ps, 0, 0) == Committee((), ())
    assert select_committee(beacon(6), [], 3, 2) == Committee((), ())


def test_stable_under_churn() -> None:
    """A peer that leaves changes the committee only where it ranked (rendezvous property)."""
    ps = peers(400)
    b = beacon(8)
    full = select_committee(b, ps, 20, 2)
    outsider = next(p for p in ps if not full.is_trainer(p) and not full.is_aggregator(p))
    assert select_committee(b, [p for p in ps if p != outsider], 20, 2) == full
    leaver = full.trainers[5]
    after = select_committee(b, [p for p in ps if p != leaver], 20, 2)
    assert after.trainers[:5] == full.trainers[:5]
    assert after.trainers[5:19] == full.trainers[6:]


def test_bad_input() -> None:
    ps = peers(4)
    with pytest.raises(ValueError, match="duplicate"):
        select_committee(beacon(0), [*ps, ps[0]], 2, 1)
    with pytest.raises(ValueError):
        select_committee(beacon(0), ps, -1, 1)
    with pytest.raises(TypeError):
        select_committee(beacon(0), ["not bytes"], 1, 1)
    with pytest.raises(TypeError):
        select_committee("beacon", ps, 1, 1)
    with pytest.raises(ValueError):
        select_committee(beacon(0), [b""], 1, 1)
    with pytest.raises(ValueError, match="duplicate"):
        Committee((ps[0], ps[0]), ())


def test_committee_helpers() -> None:
    ps = peers(50)
    c = select_committee(beacon(9), ps, 10, 3)
    for i, p in enumerate(c.trainers):
        assert c.rank_of_trainer(p) == i and c.is_trainer(p)
    for i, p in enumerate(c.aggregators):
        assert c.aggregator_rank(p) == i and c.is_aggregator(p)
    stranger = b"\x00" * 32
    assert c.rank_of_trainer(stranger) is None and not c.is_trainer(stranger)
    assert c.aggregator_rank(stranger) is None and not c.is_aggregator(stranger)
    # Value semantics: equal committees compare and hash equal.
    same = Committee(tuple(c.trainers), tuple(c.aggregators))
    assert same == c and hash(same) == hash(c)
    with pytest.raises(AttributeError):
        c.trainers = ()


def test_selection_frequency_is_uniform() -> None:
    """Without stake every peer sits on ~s/N of committees (deterministic beacons, so no flakes)."""
    n, s, a, rounds = 200, 20, 2, 2000
    ps = peers(n, b"uniform")
    t_count = dict.fromkeys(ps, 0)
    first_agg = dict.fromkeys(ps, 0)
    for r in range(rounds):
        c = select_committee(beacon(10_000 + r), ps, s, a)
        for p in c.trainers:
            t_count[p] += 1
        first_agg[c.aggregators[0]] += 1
    expected = rounds * s / n  # 200
    sd = math.sqrt(rounds * (s / n) * (1 - s / n))  # ~13.4
    assert all(abs(v - expected) < 5.5 * sd for v in t_count.values())
    # The spread across peers is itself binomial-sized (no peer systematically favoured).
    var = sum((v - expected) ** 2 for v in t_count.values()) / n
    assert 0.6 * sd**2 < var < 1.5 * sd**2
    # Aggregator rank 0 is uniform too: each peer ~10 times out of 2000.
    assert max(first_agg.values()) < 30 and sum(first_agg.values()) == rounds


def test_ten_thousand_peers_is_fast() -> None:
    ps = peers(10_000)
    best = math.inf
    for r in range(3):
        t = time.perf_counter()
        c = select_committee(beacon(r), ps, 64, 4)
        best = min(best, time.perf_counter() - t)
    assert len(c.trainers) == 64
    assert best < 0.25  # ~10 ms measured; generous for loaded CI machines


# --- Byzantine tails ----------------------------------------------------------------------------


def brute_hypergeom_more_than(n: int, b: int, s: int, f: int) -> Fraction:
    """Enumerate every committee of size s: the definition, no formula."""
    byz = set(range(b))
    hits = total = 0
    for committee in itertools.combinations(range(n), s):
        total += 1
        hits += sum(1 for x in committee if x in byz) > f
    return Fraction(hits, total)


def exact_binom_more_than(s: int, f: int, p: Fraction) -> Fraction:
    return sum(
        (math.comb(s, k) * p**k * (1 - p) ** (s - k) for k in range(max(f + 1, 0), s + 1)),
        Fraction(0),
    )


def rel_err(x: float, ref: Fraction) -> float:
    return float(abs(Fraction(x) - ref) / ref) if ref else abs(x)


def test_hypergeom_against_enumeration() -> None:
    for n in range(1, 10):
        for b in range(n + 1):
            for s in range(n + 1):
                for f in range(-1, s + 1):
                    exact = brute_hypergeom_more_than(n, b, s, f)
                    assert hypergeom_more_than(n, b, s, f) == float(exact), (n, b, s, f)


def test_binomial_against_exact_rationals() -> None:
    for s in (1, 2, 7, 64, 200):
        for p in (0.01, 0.1, 0.2, 1 / 3, 0.45, 0.9):
            for f in sorted({0, s // 4, s // 2, (3 * s) // 4, s - 1}):
                ref = exact_binom_more_than(s, f, Fraction(p))
                got = binom_more_than(s, f, p)
                if ref < Fraction(1, 10**290):  # below double precision's range: 0 is right
                    assert got < 1e-290
                else:
                    assert rel_err(got, ref) < 1e-11, (s, p, f)


def test_tiny_probabilities_keep_their_precision() -> None:
    # Far below where 1 - cdf in double precision would give 0.
    ref = exact_binom_more_than(200, 150, Fraction(0.1))
    assert float(ref) < 1e-100
    assert rel_err(p_more_than(200, 150, 0.1), ref) < 1e-11
    ref = exact_binom_more_than(64, 31, Fraction(0.2))
    assert 1e-8 < float(ref) < 1e-7
    assert rel_err(p_byzantine_majority(64, 0.2), ref) < 1e-12


def test_edge_cases() -> None:
    assert p_more_than(10, -1, 0.3) == 1.0
    assert p_more_than(10, 10, 0.3) == 0.0
    assert p_more_than(10, 0, 0.0) == 0.0
    assert p_more_than(10, 9, 1.0) == 1.0
    assert p_more_than(10, 3, 0.3, population=10) == 0.0  # the whole population: X = 3 exactly
    with pytest.raises(ValueError):
        p_more_than(10, 3, 1.5)
    with pytest.raises(ValueError):
        p_more_than(11, 3, 0.3, population=10)
    with pytest.raises(ValueError):
        p_byzantine_majority(0, 0.2)


def test_design_md_figure() -> None:
    """DESIGN.md: at 20 % Byzantine, s = 64 gives P(Byzantine majority) ~ 2e-8 per round.

    That figure is the *strict* majority, P(X >= 33) = 1.95e-8. A 32/32 tie already lets the
    even-n median leave the honest range, so p_byzantine_majority counts it: 8.18e-8.
    """
    assert p_more_than(64, 32, 0.2) == pytest.approx(1.9485e-8, rel=1e-4)
    assert p_byzantine_majority(64, 0.2) == pytest.approx(8.1846e-8, rel=1e-4)
    assert (
        p_byzantine_majority(65, 0.2)
        < p_byzantine_majority(63, 0.2)
        < p_byzantine_majority(64, 0.2)
    )


def test_finite_population_tends_to_binomial_and_is_below_it() -> None:
    big = p_byzantine_majority(64, 0.2, population=1_000_000)
    assert big == pytest.approx(p_byzantine_majority(64, 0.2), rel=0.01)
    for n in (100, 1000, 10_000):
        assert p_byzantine_majority(64, 0.2, population=n) < p_byzantine_majority(64, 0.2)


def test_byzantine_count_rounds_up_without_float_noise() -> None:
    assert byzantine_count(0.29, 100) == 29  # 0.29 * 100 = 28.999999999999996
    assert byzantine_count(0.2, 10) == 2
    assert byzantine_count(0.2, 11) == 3  # 2.2 Byzantine peers: assume 3
    assert byzantine_count(0.0, 11) == 0 and byzantine_count(1.0, 11) == 11


def test_trim_for_is_minimal() -> None:
    for s, share, q, pop in [
        (64, 0.2, 1e-6, None),
        (64, 0.1, 1e-9, None),
        (100, 0.2, 1e-6, 1000),
        (9, 0.1, 1e-3, 50),
    ]:
        f = trim_for(s, share, q, pop)
        assert p_more_than(s, f, share, pop) <= q
        assert f == 0 or p_more_than(s, f - 1, share, pop) > q
    assert trim_for(64, 0.2, 1e-6) == 30
    assert trim_for(10, 0.0, 1e-9) == 0


def test_trim_for_caps_at_the_median() -> None:
    assert trim_for(64, 0.33, 1e-6) == 31  # 1e-6 is out of reach at s = 64: the median's trim
    with pytest.raises(ValueError, match="no trim"):
        trim_for(64, 0.33, 1e-6, strict=True)


def test_committee_size_for_is_minimal() -> None:
    for share, q, pop in [
        (0.1, 1e-6, None),
        (0.2, 1e-6, None),
        (0.2, 1e-3, 300),
        (0.33, 1e-4, None),
    ]:
        s = committee_size_for(share, q, pop)
        assert p_byzantine_majority(s, share, pop) <= q
        assert all(p_byzantine_majority(t, share, pop) > q for t in range(1, s))


def test_committee_sizes_at_one_in_a_million() -> None:
    assert committee_size_for(0.10, 1e-6) == 23
    assert committee_size_for(0.20, 1e-6) == 51
    assert committee_size_for(0.33, 1e-6) == 185
    assert committee_size_for(0.20, 1e-6, population=1000) == 49


def test_committee_size_for_limits() -> None:
    with pytest.raises(ValueError, match=">= 1/2"):
        committee_size_for(0.5, 1e-6)
    t = time.perf_counter()
    with pytest.raises(ValueError, match="no committee size"):
        committee_size_for(0.49, 1e-12)  # scans all 4096 sizes
    assert time.perf_counter() - t < 2.0
    with pytest.raises(ValueError, match="up to 10"):
        committee_size_for(0.2, 1e-12, max_size=10)
    # A small finite population is easier: with 4 Byzantine of 20, 9 members never lose.
    assert committee_size_for(0.2, 1e-12, population=20) <= 9
    with pytest.raises(ValueError):
        committee_size_for(0.2, 0.0)


def test_table() -> None:
    rows = table([0.1, 0.2], 1e-6)
    assert rows[0] == TableRow(
        0.1, 23, p_byzantine_majority(23, 0.1), 64, 20, p_more_than(64, 20, 0.1)
    )
    assert rows[1].committee_size == 51 and rows[1].trim == 30
    md = markdown_table(rows)
    assert md.count("\n") == 3 and "| 20% | 51 |" in md
