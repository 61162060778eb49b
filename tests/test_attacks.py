"""Byzantine attacks in the simulator, the reputation signal, and the bench's plumbing.

The accuracy claims themselves are measured by ``seedswarm bench byzantine`` (minutes); here the
attacks are pinned one by one: what bytes each one sends, that they are deterministic, that the
robust rules keep a saturated minority inside the honest range while the mean does not, and that
protocol attacks in a (tiny) simulation are rejected or punished without splitting honest nodes.
"""

from __future__ import annotations

import argparse

import numpy as np
import pytest

from seedswarm.node.core.codec import quantize
from seedswarm.sampling.aggregators import AGG_ONE, aggregate
from seedswarm.sampling.reputation import (
    distances,
    relative_distances,
    round_signals,
    update_scores,
)
from seedswarm.sim.attacks import (
    ATTACKS,
    PROTOCOL_ATTACKS,
    TUNED_AGAINST,
    VALUE_ATTACKS,
    get_attack,
)
from seedswarm.sim.runner import SimConfig, build, run

SMALL = dict(nodes=12, trainers=5, directions=8, rounds=8, eval_every=4, quiet=True, max_wall=60.0)


@pytest.fixture(scope="module")
def sim():
    s = build(SimConfig(**{**SMALL, "byzantine": 0.25, "attack": "alie"}))
    return s


def _byz_trainer(sim):
    st = sim.nodes[0].core.head
    for p in st.committee.trainers:
        if sim.by_key[p].byzantine:
            return sim.by_key[p]
    # make one of the trainers Byzantine for the test
    node = sim.by_key[st.committee.trainers[-1]]
    node.byzantine = True
    return node


def _own(n: int = 8) -> list[float]:
    return [0.01 * (i - 3.5) for i in range(n)]


def test_registry_and_names() -> None:
    assert set(VALUE_ATTACKS) | set(PROTOCOL_ATTACKS) | set(TUNED_AGAINST) | {"none"} == set(ATTACKS)
    for name in ATTACKS:
        assert callable(get_attack(name))
    with pytest.raises(ValueError, match="unknown attack"):
        get_attack("nope")
    with pytest.raises(ValueError, match="number"):
        get_attack("alie:x")
    # stateful attacks are fresh per call: two simulations in one process do not share state
    assert get_attack("replay") is not get_attack("replay")


def test_sign_flip_saturates_against_the_colluders_pooled_estimate(sim) -> None:
    from seedswarm.sim.attacks import _estimate, _group_trainers

    node = _byz_trainer(sim)
    st = node.core.head
    grp = st.group_of(st.trainer_rank[node.key])
    colluders = _group_trainers(sim, st, grp, byzantine=True)
    streams = tuple(st.streams(grp))
    pooled = np.mean([_estimate(sim, sim.by_key[p], st, streams) for p in colluders], axis=0)
    attack = get_attack("sign_flip")
    rows = {quantize(attack(sim.by_key[p], _own(), sim), st.scale) for p in colluders}
    assert len(rows) == 1  # every colluder of the group sends the same row
    q = np.frombuffer(rows.pop(), dtype=np.int8)
    assert set(np.abs(q).tolist()) == {127}
    assert all(np.sign(q[i]) == -np.sign(pooled[i]) for i in range(len(q)) if pooled[i] != 0)
    assert np.count_nonzero(pooled) > 0


class _FixedView:
    """An omniscient view that reports chosen honest values (``steps`` quantization steps each)."""

    def __init__(self, steps: np.ndarray) -> None:
        self.steps = steps

    def values(self, sim, st, group) -> np.ndarray:
        return self.steps * st.scale


def _pump_case(sim, steps: np.ndarray):
    """The honest rows, the colluders' row and their count, for honest values of ``steps``."""
    from seedswarm.sim.attacks import _group_trainers, make_scale_pump

    node = _byz_trainer(sim)
    st = node.core.head
    grp = st.group_of(st.trainer_rank[node.key])
    honest = [quantize([float(v) for v in r], st.scale) for r in steps * st.scale]
    b = max(1, len(_group_trainers(sim, st, grp, byzantine=True)))
    row = quantize(make_scale_pump(_FixedView(steps))(node, _own(), sim), st.scale)  # type: ignore[arg-type]
    return honest, row, b


def test_scale_pump_makes_the_scale_coarser_whenever_saturating_with_the_honest_sum_does(sim) -> None:
    from seedswarm.node.core.codec import next_scale_exp

    signs = np.where(np.arange(8) % 3 == 0, -1.0, 1.0)
    honest, row, b = _pump_case(sim, np.tile(40.0 * signs, (4, 1)))  # honest bytes at 40 steps
    q = np.frombuffer(row, dtype=np.int8)
    assert (q == 127 * signs).all()  # saturated *with* the honest sign
    attacked = aggregate("mean", honest + [row] * b)
    assert next_scale_exp(-6, attacked) == -5  # ... which doubles the scale


def test_scale_pump_otherwise_reverses_the_mean_without_letting_the_scale_refine(sim) -> None:
    from seedswarm.node.core.codec import next_scale_exp

    rng = np.random.default_rng(7)
    steps = np.round(rng.normal(1.0, 3.0, size=(12, 8)))  # honest bytes near zero: no pump possible
    honest, row, b = _pump_case(sim, steps)
    clean = np.asarray(aggregate("mean", honest), dtype=np.int64)
    attacked = np.asarray(aggregate("mean", honest + [row] * b), dtype=np.int64)
    # the scale rule would not make the scale finer (nor coarser) after this aggregate ...
    assert next_scale_exp(-6, attacked.tolist()) == -6
    # ... and the aggregate points against the honest one
    assert int(attacked @ clean) < 0 < int(clean @ clean)


def test_alie_ipm_mimic_use_honest_values_deterministically(sim) -> None:
    from seedswarm.sim.attacks import HonestView, make_alie, make_ipm, make_mimic

    node = _byz_trainer(sim)
    st = node.core.head
    grp = st.group_of(st.trainer_rank[node.key])
    view = HonestView(sample=3)
    h = view.values(sim, st, grp)
    assert h.shape == (min(3, sum(1 for p in st.committee.trainers if not sim.by_key[p].byzantine)), 8)
    assert np.array_equal(h, HonestView(sample=3).values(sim, st, grp))  # deterministic
    mu, sigma = h.mean(axis=0), h.std(axis=0)
    alie = np.array(make_alie(1.5, view)(node, _own(), sim))
    assert np.allclose(np.abs(alie - mu), 1.5 * sigma)
    assert np.all((alie - mu) * np.sign(mu) <= 1e-12)  # shifted against the honest mean
    ipm = np.array(make_ipm(0.5, view)(node, _own(), sim))
    assert np.allclose(ipm, -0.5 * mu)
    assert np.array(make_mimic(view)(node, _own(), sim)) == pytest.approx(h[0])


def test_adaptive_sends_the_largest_shift_the_guards_keep(sim) -> None:
    """The adaptive attacker's row passes the default rule's guards (else it would be wasted), and a
    shift an eighth larger would not: it is ALIE tuned to the rule's edge."""
    from seedswarm.sampling.aggregators import guarded_keep
    from seedswarm.sim.attacks import HonestView, make_adaptive

    node = _byz_trainer(sim)
    st = node.core.head
    grp = st.group_of(st.trainer_rank[node.key])
    h = HonestView(sample=4096).values(sim, st, grp)
    out = np.array(make_adaptive()(node, _own(), sim))
    mu, sigma = h.mean(axis=0), h.std(axis=0)
    shift = (mu - out) * np.sign(mu)
    z = float(np.max(shift / np.where(sigma > 0, sigma, 1)))
    assert np.all(shift >= -1e-12) and np.allclose(shift, z * sigma)  # ALIE-shaped, z >= 0
    honest = [quantize([float(v) for v in r], st.scale) for r in h]
    b = sum(1 for p in st.committee.trainers if sim.by_key[p].byzantine)
    rows = honest + [quantize([float(v) for v in out], st.scale)] * b
    keep = guarded_keep(rows, st.trim)
    assert keep is not None and set(range(len(honest), len(rows))) <= set(keep)
    if z < 4.0:
        more = quantize([float(v) for v in mu - (z + 0.125) * sigma * np.sign(mu)], st.scale)
        keep2 = guarded_keep(honest + [more] * b, st.trim)
        assert keep2 is None or not set(range(len(honest), len(rows))) <= set(keep2)


def test_random_zeros_withhold(sim) -> None:
    node = _byz_trainer(sim)
    scale = node.core.head.scale
    r = get_attack("random")(node, _own(), sim)
    assert r is not None and all(abs(v) <= 127 * scale for v in r)
    assert get_attack("zeros")(node, _own(), sim) == [0.0] * 8
    assert get_attack("withhold")(node, _own(), sim) is None
    assert get_attack("none")(node, _own(), sim) == _own()


def test_robust_rules_bound_a_saturated_minority_the_mean_does_not() -> None:
    rng = np.random.default_rng(0)
    honest = [bytes(v & 0xFF for v in rng.integers(5, 25, size=8)) for _ in range(13)]
    flip = [bytes([(-127) & 0xFF] * 8)] * 3  # 3 of 16, as at 20 % Byzantine
    lo = np.min([np.frombuffer(r, dtype=np.int8).astype(np.int64) for r in honest], axis=0) * AGG_ONE
    hi = np.max([np.frombuffer(r, dtype=np.int8).astype(np.int64) for r in honest], axis=0) * AGG_ONE
    for rule in ("median", "trimmed_mean", "clipped_mean", "guarded_mean"):
        a = np.array(aggregate(rule, honest + flip, 3))
        assert np.all((lo <= a) & (a <= hi)), rule
    mean = np.array(aggregate("mean", honest + flip))
    assert np.any(mean < lo)


def test_reputation_flags_loud_attackers_only() -> None:
    rng = np.random.default_rng(1)
    honest = [bytes(v & 0xFF for v in rng.integers(-20, 21, size=32)) for _ in range(12)]
    loud = bytes([127] * 32)
    rows = [*honest, loud]
    d = distances(rows)
    assert d[-1] > 3 * np.median(d[:-1])
    rho = relative_distances(rows)
    assert np.median(rho) == pytest.approx(1.0)
    s = round_signals(rows)
    assert s[-1] < 0.05 and np.median(s[:-1]) > 0.9
    peers = [bytes([i]) * 32 for i in range(len(rows))]
    before: dict[bytes, float] = {}
    scores = before
    for _ in range(20):
        scores = update_scores(scores, peers, rows, decay=0.8)
    assert before == {}  # pure: the input mapping is not modified
    assert scores[peers[-1]] < 0.1
    assert min(scores[p] for p in peers[:-1]) > 0.6
    with pytest.raises(ValueError):
        update_scores({}, peers[:1], rows)
    with pytest.raises(ValueError):
        update_scores({}, [], [], decay=1.0)
    assert update_scores({b"x": 0.5}, [], []) == {b"x": 0.5}


# ---------------------------------------------------------------------------------------------
# tiny simulations


def _run(**kw):
    return run(SimConfig(**{**SMALL, **kw}))


def test_value_attack_run_is_deterministic_and_reports_reputation() -> None:
    a = _run(byzantine=0.25, attack="sign_flip", seed=5)
    b = _run(byzantine=0.25, attack="sign_flip", seed=5)
    for k in ("final_accuracy", "total_bytes", "rounds", "reputation_byzantine", "reputation_honest"):
        assert a[k] == b[k], k
    assert a["byzantine_nodes"] == 3
    assert a["honest_digest_agreement"] == 1.0
    assert a["reputation_byzantine"] < a["reputation_honest"]


@pytest.mark.parametrize("attack,reason", [("forge", "bad-signature"), ("non_member", "not-trainer")])
def test_protocol_attacks_in_sim_are_rejected(attack: str, reason: str) -> None:
    s = _run(byzantine=0.25, attack=attack, seed=6)
    assert s["rejected"].get(reason, 0) > 0, s["rejected"]
    assert s["honest_digest_agreement"] == 1.0
    assert s["rounds"] >= SMALL["rounds"]


def test_equivocators_are_expelled_in_sim() -> None:
    s = _run(byzantine=0.25, attack="equivocate", seed=7, rounds=12)
    assert s["byzantine_expelled"] >= 1
    assert s["honest_digest_agreement"] == 1.0


def test_withholding_and_replay_do_not_stop_the_swarm() -> None:
    for attack in ("withhold", "replay"):
        s = _run(byzantine=0.25, attack=attack, seed=8)
        assert s["rounds"] >= SMALL["rounds"], attack
        assert s["honest_digest_agreement"] == 1.0, attack


# ---------------------------------------------------------------------------------------------
# command lines


def test_sim_cli_has_byzantine_flags() -> None:
    from seedswarm.sim.cli import add_parser

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="cmd"))
    args = parser.parse_args(["sim", "--byzantine", "0.2", "--attack", "alie"])
    assert args.byzantine == 0.2 and args.attack == "alie"


def test_bench_table_and_bad_arguments(capsys) -> None:
    from seedswarm.bench.byzantine import main, table

    res = [
        {"aggregator": "mean", "byzantine": 0.0, "attack": "none", "final_accuracy": 0.9},
        {"aggregator": "mean", "byzantine": 0.2, "attack": "sign_flip", "final_accuracy": 0.5},
        {"aggregator": "mean", "byzantine": 0.2, "attack": "zeros", "final_accuracy": 0.89},
    ]
    md = table(res, ["sign_flip", "zeros"])
    assert "| mean | 20% | 90.0 | 50.0 (-40.0) | 89.0 (-1.0) | -40.0 |" in md
    assert main(["--attacks", "nope"]) == 2


def test_bench_acceptance_verdict_averages_seeds_and_judges_the_listed_attacks() -> None:
    from seedswarm.bench.byzantine import verdict
    from seedswarm.sampling.aggregators import DEFAULT_RULE

    def r(agg: str, attack: str, seed: int, acc: float) -> dict:
        return {"aggregator": agg, "attack": attack, "seed": seed, "byzantine": 0.0 if attack == "none" else 0.2,
                "final_accuracy": acc}

    res = [r(DEFAULT_RULE, "none", 0, 0.95), r(DEFAULT_RULE, "none", 1, 0.97),
           r(DEFAULT_RULE, "alie", 0, 0.92), r(DEFAULT_RULE, "alie", 1, 0.96),  # -3 and -1: mean -2.0
           r(DEFAULT_RULE, "adaptive", 0, 0.50),  # tuned against the default: reported, not judged
           r("mean", "none", 0, 0.95), r("mean", "none", 1, 0.95),
           r("mean", "alie", 0, 0.80), r("mean", "alie", 1, 0.86)]  # mean -12
    v = verdict(res)
    assert v["pass"] and v["worst_default"] == pytest.approx(-2.0) and v["worst_mean"] == pytest.approx(-12.0)
    assert any("adaptive" in line and "tuned against" in line for line in v["lines"])
    res[3] = r(DEFAULT_RULE, "alie", 1, 0.95)  # now -3 and -2: mean -2.5
    assert not verdict(res)["pass"]
    # the mean's criterion counts an attack tuned against the mean too
    res[3] = r(DEFAULT_RULE, "alie", 1, 0.96)
    res[7:9] = [r("mean", "alie", 0, 0.94), r("mean", "alie", 1, 0.94)]  # -1: the mean holds
    assert not verdict(res)["pass"]
    res += [r("mean", "scale_pump", 0, 0.50), r("mean", "scale_pump", 1, 0.70)]  # -35
    v = verdict(res)
    assert v["pass"] and v["worst_mean"] == pytest.approx(-35.0)


def test_acceptance_runs_every_attack_against_both_rules_and_names_what_each_is_tuned_against() -> None:
    from seedswarm.bench.byzantine import _jobs, verdict
    from seedswarm.sim.attacks import TUNED_AGAINST

    args = argparse.Namespace(nodes=10, rounds=10, trainers=4, directions=8, batch_size=8, lr=0.1, max_wall=1.0,
                              seed=0, seeds=1, aggregators=["guarded_mean", "mean"], shares=[0.2],
                              attacks=["alie", *TUNED_AGAINST], acceptance=True)
    cells = {(j["aggregator"], j["attack"]) for j in _jobs(args)}
    assert cells == {(agg, a) for agg in ("guarded_mean", "mean") for a in ("none", "alie", *TUNED_AGAINST)}
    res = [{"aggregator": c[0], "attack": c[1], "seed": 0, "byzantine": 0.2, "final_accuracy": 0.9} for c in cells]
    lines = verdict(res)["lines"]
    for a, rule in TUNED_AGAINST.items():
        for agg in ("guarded_mean", "mean"):
            assert any(line.startswith(agg) and f" {a} " in line and f"(tuned against {rule})" in line
                       for line in lines)
