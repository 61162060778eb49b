"""Chain records: validation, rejection without state change, membership, replay determinism."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from seedswarm.crypto.keys import Identity
from seedswarm.gossip.wire import Contribution, Join, Leave
from seedswarm.node.core.chain import (
    ChainState,
    RecordError,
    build_record,
    check_contributions,
    check_record,
    decode_aggregate,
    encode_aggregate,
    next_state,
    validate_contribution,
)

# Shared by the in-process test and the subprocess (exec'd in both): deterministic chain building.
HELPERS = textwrap.dedent(
    """
    import random
    import torch
    from seedswarm.crypto.keys import Identity
    from seedswarm.gossip.wire import Contribution
    from seedswarm.node.core.chain import ChainState, build_record, check_record, next_state
    from seedswarm.node.core.genesis import Genesis
    from seedswarm.node.learn.replay import apply_record_, model_digest

    IDS = [Identity.from_seed(bytes([i]) * 32) for i in range(1, 13)]
    BY_PUB = {i.public: i for i in IDS}

    def make_genesis(**kw):
        base = dict(members=tuple(i.public for i in IDS), trainers=5, directions=8, aggregators=2)
        base.update(kw)
        return Genesis(**base)

    def contribution(state, ident, rng):
        vals = [rng.randint(-127, 127) for _ in range(state.genesis.directions)]
        return Contribution(run=state.run_id, round=state.round, peer=ident.public,
                            q=bytes(v & 0xFF for v in vals)).signed(ident)

    def honest_round(state, rng, skip=()):
        cs = [contribution(state, BY_PUB[p], rng) for p in state.committee.trainers if p not in skip]
        agg = BY_PUB[state.committee.aggregators[0]]
        rec, inputs = build_record(state, agg, cs)
        return rec, inputs, cs

    def build_chain(n, seed=7):
        rng = random.Random(seed)
        st = ChainState.initial(make_genesis())
        out = []
        for _ in range(n):
            rec, _, _ = honest_round(st, rng)
            check_record(st, rec)
            out.append((st, rec))
            st = next_state(st, rec)
        return out

    def fresh_params():
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
        return [p.detach().clone() for p in m.parameters()]

    def replay_digest(n=5):
        params = fresh_params()
        for st, rec in build_chain(n):
            apply_record_(params, st, rec)
        return model_digest(params)
    """
)
H: dict = {}
exec(HELPERS, H)  # noqa: S102
IDS = H["IDS"]
BY_PUB = H["BY_PUB"]


@pytest.fixture
def state():
    return ChainState.initial(H["make_genesis"]())


@pytest.fixture
def rng():
    import random

    return random.Random(1)


def _snapshot(st):
    return (st.head, st.round, dict(st.members), dict(st.missed))


def _agg(st):
    return BY_PUB[st.committee.aggregators[0]]


def _outsider_trainer(st):
    """A member that is not a trainer this round."""
    return next(i for i in IDS if i.public not in st.committee.trainers)


def test_honest_record_passes(state, rng):
    assert len(state.committee.trainers) == 5
    rec, inputs, _ = H["honest_round"](state, rng)
    check_record(state, rec)
    check_contributions(state, rec, inputs)
    nxt = next_state(state, rec)
    assert nxt.round == 1
    assert nxt.head != state.head
    assert set(nxt.members) == set(state.members)
    assert any(decode_aggregate(rec.aggregate))


def _rejected(state, rec, inputs=None, full=False):
    before = _snapshot(state)
    with pytest.raises(RecordError) as ei:
        if full:
            check_record(state, rec)
            check_contributions(state, rec, inputs)
        else:
            check_record(state, rec)
    assert _snapshot(state) == before
    return ei.value


def test_wrong_aggregate_resigned(state, rng):
    rec, inputs, _ = H["honest_round"](state, rng)
    agg = decode_aggregate(rec.aggregate)
    agg[0] = agg[0] + 1 if agg[0] < 100 else agg[0] - 1
    bad = dataclasses.replace(rec, aggregate=encode_aggregate(agg)).signed(_agg(state))
    check_record(state, bad)  # structurally fine
    err = _rejected(state, bad, inputs, full=True)
    assert err.reason == "wrong-aggregate"


def test_forged_signature(state, rng):
    rec, _, _ = H["honest_round"](state, rng)
    sig = bytearray(rec.sig)
    sig[0] ^= 1
    err = _rejected(state, dataclasses.replace(rec, sig=bytes(sig)))
    assert err.reason == "bad-signature"


def test_tampered_without_resign(state, rng):
    rec, _, _ = H["honest_round"](state, rng)
    agg = decode_aggregate(rec.aggregate)
    agg[1] = 0 if agg[1] else 5
    err = _rejected(state, dataclasses.replace(rec, aggregate=encode_aggregate(agg)))
    assert err.reason == "bad-signature"


def test_signed_by_non_member(state, rng):
    rec, _, _ = H["honest_round"](state, rng)
    stranger = Identity.from_seed(b"\xee" * 32)
    bad = dataclasses.replace(rec, aggregator=stranger.public).signed(stranger)
    err = _rejected(state, bad)
    assert err.reason == "not-aggregator"


def test_contribution_from_non_trainer(state, rng):
    outsider = _outsider_trainer(state)
    c = H["contribution"](state, outsider, rng)
    with pytest.raises(RecordError) as ei:
        validate_contribution(state, c)
    assert ei.value.reason == "not-trainer"
    with pytest.raises(RecordError):
        validate_contribution(state, c.encode())
    # swapping a trainer's input for the outsider's (re-signed record) fails full verification
    rec, inputs, cs = H["honest_round"](state, rng)
    from seedswarm.crypto.hashing import merkle_root

    bad_inputs = [c.encode()] + inputs[1:]
    bad = dataclasses.replace(rec, contrib_root=merkle_root(bad_inputs)).signed(_agg(state))
    check_record(state, bad)
    err = _rejected(state, bad, bad_inputs, full=True)
    assert err.reason == "not-trainer"


def test_stranger_contribution_not_trainer(state, rng):
    stranger = Identity.from_seed(b"\xdd" * 32)
    c = Contribution(run=state.run_id, round=0, peer=stranger.public, q=bytes(8)).signed(stranger)
    with pytest.raises(RecordError):
        validate_contribution(state, c)


def test_duplicated_contribution(state, rng):
    rec, inputs, cs = H["honest_round"](state, rng)
    with pytest.raises(ValueError):
        build_record(state, _agg(state), cs + [cs[0]])
    # a record whose inputs repeat one trainer's contribution
    from seedswarm.crypto.hashing import merkle_root

    dup = [inputs[0]] + inputs[:-1]
    bad = dataclasses.replace(rec, contrib_root=merkle_root(dup)).signed(_agg(state))
    _rejected(state, bad, dup, full=True)
    # the honest record with a duplicated input list (too many inputs)
    _rejected(state, rec, inputs + [inputs[0]], full=True)


def test_wrong_round(state, rng):
    rec, _, _ = H["honest_round"](state, rng)
    bad = dataclasses.replace(rec, round=1).signed(_agg(state))
    assert _rejected(state, bad).reason == "wrong-round"
    c = H["contribution"](state, BY_PUB[state.committee.trainers[0]], rng)
    with pytest.raises(RecordError):
        validate_contribution(state, dataclasses.replace(c, round=3).signed(BY_PUB[c.peer]))


def test_wrong_prev(state, rng):
    rec, _, _ = H["honest_round"](state, rng)
    bad = dataclasses.replace(rec, prev=b"\x00" * 32).signed(_agg(state))
    assert _rejected(state, bad).reason == "wrong-parent"


def test_wrong_run(state, rng):
    rec, _, _ = H["honest_round"](state, rng)
    bad = dataclasses.replace(rec, run=b"\x01" * 32).signed(_agg(state))
    assert _rejected(state, bad).reason == "wrong-run"


def test_join_adds_member(state, rng):
    from seedswarm.node.core.admission import solve_work

    newbie = Identity.from_seed(b"\x77" * 32)
    # an open swarm: the Join carries the work the chain asks for
    with pytest.raises(RecordError, match="work"):
        check_record(state, build_record(state, _agg(state), [], joins=[
            Join(run=state.run_id, round=state.round, peer=newbie.public).signed(newbie).encode()])[0])
    work = solve_work(state.run_id, newbie.public, state.round, state.join_bits)
    j = Join(run=state.run_id, round=state.round, peer=newbie.public, cert=work).signed(newbie).encode()
    cs = [H["contribution"](state, BY_PUB[p], rng) for p in state.committee.trainers]
    rec, _ = build_record(state, _agg(state), cs, joins=[j])
    check_record(state, rec)
    nxt = next_state(state, rec)
    assert newbie.public in nxt.members
    assert newbie.public not in state.members
    assert len(nxt.members) == 13
    # joining twice is rejected
    cs2 = [H["contribution"](nxt, BY_PUB[p], rng) for p in nxt.committee.trainers]
    j2 = Join(run=nxt.run_id, round=nxt.round, peer=newbie.public).signed(newbie).encode()
    rec2, _ = build_record(nxt, _agg(nxt), cs2, joins=[j2])
    assert _rejected(nxt, rec2).reason == "bad-join"


def test_forged_join_rejected(state, rng):
    newbie = Identity.from_seed(b"\x78" * 32)
    other = Identity.from_seed(b"\x79" * 32)
    signed_by_other = Join(run=state.run_id, round=0, peer=other.public).signed(other)
    j = dataclasses.replace(signed_by_other, peer=newbie.public).encode()
    cs = [H["contribution"](state, BY_PUB[p], rng) for p in state.committee.trainers]
    rec, _ = build_record(state, _agg(state), cs, joins=[j])
    assert _rejected(state, rec).reason == "bad-join"


def test_leave_removes_member(state, rng):
    agg = _agg(state)
    leaver = next(i for i in IDS if i.public != agg.public)
    lv = Leave(run=state.run_id, round=state.round, peer=leaver.public).signed(leaver).encode()
    cs = [H["contribution"](state, BY_PUB[p], rng) for p in state.committee.trainers]
    rec, _ = build_record(state, agg, cs, leaves=[lv])
    check_record(state, rec)
    nxt = next_state(state, rec)
    assert leaver.public not in nxt.members
    assert leaver.public in nxt.departed
    assert len(nxt.members) == 11


def test_silent_trainer_expelled(state, rng):
    g = state.genesis
    silent = state.committee.trainers[0]
    st = state
    duties = 0
    for _ in range(400):
        if silent not in st.members:
            break
        was_trainer = silent in st.committee.trainers
        rec, inputs, _ = H["honest_round"](st, rng, skip={silent})
        check_record(st, rec)
        check_contributions(st, rec, inputs)
        st = next_state(st, rec)
        if was_trainer:
            duties += 1
            if silent in st.members:
                assert st.missed[silent] == duties
    assert silent not in st.members, "a silent trainer was never expelled"
    assert duties == g.expel_after
    assert silent in st.departed


def test_contributing_trainer_resets_missed(state, rng):
    p = state.committee.trainers[0]
    rec, _, _ = H["honest_round"](state, rng, skip={p})
    s1 = next_state(state, rec)
    assert s1.missed[p] == 1
    st = s1
    for _ in range(200):
        if p in st.committee.trainers:
            break
        rec, _, _ = H["honest_round"](st, rng, skip=())
        st = next_state(st, rec)
    assert p in st.committee.trainers
    rec, _, _ = H["honest_round"](st, rng)
    assert next_state(st, rec).missed[p] == 0


def test_replay_same_digest_in_process():
    a = H["replay_digest"](5)
    b = H["replay_digest"](5)
    assert a == b
    initial = H["model_digest"](H["fresh_params"]())
    assert a != initial, "records did not change the model"


def test_replay_same_digest_across_processes(tmp_path):
    script = tmp_path / "replay_script.py"
    script.write_text(HELPERS + "\nprint(replay_digest(5).hex())\n")
    root = str(Path(__file__).resolve().parents[2])
    outs = []
    for _ in range(2):
        r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                           cwd=root)
        assert r.returncode == 0, r.stderr
        outs.append(r.stdout.strip().splitlines()[-1])
    assert outs[0] == outs[1]
    assert outs[0] == H["replay_digest"](5).hex()


def test_genesis_rejects_an_unknown_aggregation_rule() -> None:
    """A typo in the rule would otherwise surface only when the first record is aggregated."""
    from seedswarm.node.core.genesis import Genesis, GenesisError
    from seedswarm.sampling.aggregators import DEFAULT_RULE

    assert Genesis().aggregator_rule == DEFAULT_RULE
    with pytest.raises(GenesisError, match="aggregator_rule must be one of .*guarded_mean.*not 'krum'"):
        Genesis(aggregator_rule="krum")


def test_the_learning_rate_decays_as_the_genesis_says() -> None:
    """lr / (1 + r / half_life): the round's step every node computes, and what bench lm_proxy models."""
    from seedswarm.node.core.genesis import Genesis, GenesisError, lr_schedule

    assert [Genesis(lr=3.0).lr_at(r) for r in (0, 10, 100)] == [3.0, 3.0, 3.0]  # 0: constant
    g = Genesis(lr=3.0, lr_half_life=10)
    assert [g.lr_at(r) for r in (0, 10, 30)] == [3.0, 1.5, 0.75]  # halved after 10 rounds, quartered after 30
    assert lr_schedule(3.0, 10, 30) == g.lr_at(30)
    with pytest.raises(GenesisError, match="lr_half_life"):
        Genesis(lr_half_life=-1)


def test_sim_cluster_and_init_start_from_the_genesis_defaults() -> None:
    """One place for a default: the three tools that write a genesis cannot drift apart."""
    import argparse

    from seedswarm.node.cli import add_genesis_options
    from seedswarm.node.core.genesis import Genesis, default
    from seedswarm.sim.cluster import ClusterConfig
    from seedswarm.sim.runner import SimConfig

    p = argparse.ArgumentParser()
    add_genesis_options(p)
    init = vars(p.parse_args([]))
    g, sim, cluster = Genesis(), SimConfig(), ClusterConfig()
    for name in ("task", "estimator", "trainers", "directions", "groups", "lr", "local_lr", "batch_size"):
        assert getattr(sim, name) == getattr(cluster, name) == init[name] == getattr(g, name), name
    assert sim.aggregator == cluster.aggregator == init["aggregator"] == g.aggregator_rule
    assert init["scale_exp"] == g.scale_exp and init["quorum"] == g.quorum
    with pytest.raises(KeyError, match="no plain default"):
        default("task_options")


def test_empty_record_counts_no_missed_duty(state, rng):
    """An empty record proves nothing about who was silent: its aggregator may have heard from
    nobody (after a mass crash, live trainers wait to verify the previous record while fallback
    aggregators publish empty ones). Counting it expelled honest survivors in the 80 % crash run."""
    trainers = set(state.committee.trainers)
    rec, _, _ = H["honest_round"](state, rng, skip=trainers)  # nobody contributed
    check_record(state, rec)
    st = next_state(state, rec)
    assert all(st.missed.get(p, 0) == 0 for p in trainers)
    assert set(st.members) == set(state.members)
    # ...while a record with one contribution counts the others
    rec, _, _ = H["honest_round"](st, rng, skip=set(st.committee.trainers[1:]))
    s2 = next_state(st, rec)
    assert [s2.missed[p] for p in st.committee.trainers] == [0] + [1] * (len(st.committee.trainers) - 1)
