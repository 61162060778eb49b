"""Open swarms against Sybil floods: join work, bounded admissions, probation, silent newcomers
expelled; and the round timing that keeps a lone member from outrunning everyone.

Sans-IO: real NodeCores on the deterministic network of ``tests.corenet``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from seedswarm.crypto.hashing import h
from seedswarm.crypto.keys import Identity
from seedswarm.gossip.wire import Join, Record
from seedswarm.node.core.admission import join_bits, solve_work, work_ok
from seedswarm.node.core.chain import (
    ChainState,
    RecordError,
    build_record,
    check_record,
    next_state,
)
from seedswarm.node.core.effects import Publish, Rejected
from seedswarm.node.core.protocol import NodeCore
from tests.corenet import IDS, OUTSIDER, Net, make_genesis


def _sybil(i: int) -> Identity:
    return Identity.from_seed(h(b"test/sybil", i.to_bytes(4, "big")))


def _join(run: bytes, ident: Identity, round_: int, bits: int) -> Join:
    return Join(run=run, round=round_, peer=ident.public,
                cert=solve_work(run, ident.public, round_, bits)).signed(ident)


def test_work_is_checked_and_costs_what_it_says() -> None:
    run, peer = b"r" * 32, b"p" * 32
    nonce = solve_work(run, peer, 7, 12)
    assert work_ok(run, peer, 7, nonce, 12)
    for bits in (1, 4, 9):  # the solver's prefix-hashed digest is the checker's digest
        n = solve_work(run, peer, 3, bits)
        assert work_ok(run, peer, 3, n, bits)
        assert all(not work_ok(run, peer, 3, i.to_bytes(8, "big"), bits) for i in range(int.from_bytes(n, "big")))
    assert not work_ok(run, peer, 8, nonce, 12) or not work_ok(run, peer, 8, nonce, 13)  # tied to the round
    assert work_ok(run, peer, 7, b"", 0)
    assert not work_ok(run, peer, 7, b"x" * 17, 1)  # oversized nonce
    g = make_genesis(join_pow_bits=10)
    # max_joins (4) Joins per ttl window are free in a small swarm; then one bit per two more
    assert join_bits(g, 0) == 10 and join_bits(g, 4) == 10 and join_bits(g, 6) == 11 and join_bits(g, 13) == 14
    # a large swarm absorbs an eighth of its members per window at the base cost
    assert join_bits(g, 100, members=1000) == 10 and join_bits(g, 129, members=1000) == 12
    assert join_bits(g, 10_000, members=3) == 40  # capped: out of reach, on purpose
    assert join_bits(make_genesis(join_pow_bits=0), 100) == 0


def test_join_work_is_asked_of_the_driver_and_a_stale_answer_is_dropped() -> None:
    """The core never searches itself (minutes at a raised difficulty would stall a daemon): it
    asks with SolveWork, announces the Join the driver's nonce makes, and drops an answer that
    comes too late for any record to take it, or after the node stopped wanting it."""
    from seedswarm.node.core.effects import SolveWork

    g = make_genesis(join_pow_bits=9)
    me = _sybil(7)
    core = NodeCore(g, me)
    out = core.join(0.0)
    assert out == [SolveWork(0, join_bits(g, 2, len(g.members)))] and not core.joined_announced
    nonce = solve_work(g.run_id, me.public, 0, out[0].bits)
    pub = core.on_join_work(0.5, 0, nonce)
    assert len(pub) == 1 and isinstance(pub[0], Publish) and isinstance(pub[0].msg, Join)
    j = pub[0].msg
    assert j.peer == me.public and j.round == 0 and work_ok(g.run_id, me.public, 0, j.cert, out[0].bits)
    assert j.signature_ok() and core.joined_announced
    # asked again while that Join is still valid (round and work), the core re-announces it:
    # no new search (at a raised difficulty it would be minutes, every rejoin_after)
    again = core.join(10.0)
    assert again == [Publish(j)] and core.counters["joins.reannounced"] == 1
    core.tree.head = dataclasses.replace(core.head, round=g.join_ttl - 1)
    assert isinstance(core.join(20.0)[0], SolveWork)  # too old to reuse: new work for the new round
    # too late: the Join's round is nearly out of the join_ttl window
    late = NodeCore(g, me)
    late.tree.head = dataclasses.replace(late.head, round=g.join_ttl - 1)
    assert late.on_join_work(1.0, 0, nonce) == [] and late.counters["joins.work_stale"] == 1
    # a member (a founder) asks for no work at all, and a leaving node drops the answer
    assert NodeCore(g, IDS[0]).join(0.0) == []
    leaving = NodeCore(g, me)
    leaving.leave(0.0)
    assert leaving.on_join_work(0.0, 0, nonce) == []
    # a certificate given (a permissioned swarm's) needs no search
    given = NodeCore(g, me).join(0.0, cert=b"c" * 8)
    assert len(given) == 1 and isinstance(given[0], Publish) and given[0].msg.cert == b"c" * 8


def test_a_join_without_enough_work_is_refused_before_it_takes_a_slot() -> None:
    g = make_genesis(join_pow_bits=12)
    core = NodeCore(g, IDS[0])
    lazy = Join(run=g.run_id, round=0, peer=OUTSIDER.public).signed(OUTSIDER)
    out = core.on_message(0.0, lazy, IDS[1].public)
    assert [e.reason for e in out if isinstance(e, Rejected)] == ["no-admission"]
    assert OUTSIDER.public not in core._pending_joins
    ok = _join(g.run_id, OUTSIDER, 0, 13)
    assert not [e for e in core.on_message(0.0, ok, IDS[1].public) if isinstance(e, Rejected)]
    # and a record that carries more Joins than the genesis allows is invalid everywhere
    st = ChainState.initial(g)
    joins = [_join(g.run_id, _sybil(i), 0, 14).encode() for i in range(g.max_joins + 1)]
    rec, _ = build_record(st, IDS[0], [], joins=joins)
    with pytest.raises(RecordError, match="joins in one record"):
        check_record(st, rec)


def test_members_on_probation_hold_bounded_seats_and_never_aggregate_first() -> None:
    g = make_genesis(trainers=8, join_pow_bits=0, max_joins=16, probation=2, probation_share=0.25)
    st = ChainState.initial(g)
    newbies = [_sybil(i) for i in range(16)]
    joins = [Join(run=g.run_id, round=0, peer=n.public).signed(n).encode() for n in newbies]
    rec, _ = build_record(st, IDS[0], [], joins=joins)
    st = next_state(st, rec)
    seats_seen = 0
    for _ in range(12):  # eligible after join_delay; on probation throughout (they never contribute)
        rec, _ = build_record(st, next(i for i in IDS if i.public == st.committee.aggregators[0]), [])
        st = next_state(st, rec)
        new = [p for p in st.committee.trainers if p in st.probation]
        assert len(new) <= 2  # 25 % of 8 seats
        seats_seen += len(new)
        assert not set(st.committee.aggregators) & st.probation
    assert seats_seen > 0  # they do sit on committees, within the bound


def test_silent_newcomers_are_expelled_even_by_empty_records() -> None:
    g = make_genesis(join_pow_bits=0)
    st = ChainState.initial(g)
    sybil = _sybil(1)
    rec, _ = build_record(st, IDS[0], [], joins=[Join(run=g.run_id, round=0, peer=sybil.public).signed(sybil).encode()])
    st = next_state(st, rec)
    for _ in range(200):
        if sybil.public not in st.members:
            break
        agg = next(i for i in IDS if i.public == st.committee.aggregators[0])
        st = next_state(st, build_record(st, agg, [])[0])  # nobody contributes: empty records
    assert sybil.public not in st.members
    assert all(i.public in st.members for i in IDS)  # empty records cost the veterans nothing


@pytest.mark.slow
def test_a_join_flood_does_not_halt_an_open_three_node_swarm() -> None:
    """200 Joins from fresh keys (with the work the genesis asks for) against a 3-node open
    swarm: at most a bounded number are admitted, they sit on at most a quarter of the trainer
    seats, never aggregate first and are expelled for silence; the swarm keeps its rate."""
    g = make_genesis(members=tuple(i.public for i in IDS[:3]), join_pow_bits=8)
    net = Net(g, idents=IDS[:3])
    sybils = [_sybil(i) for i in range(200)]
    flood_at: dict[str, float] = {}

    def flood(n: Net) -> None:
        flood_at["t"] = n.now
        flood_at["r"] = n.cores[IDS[0].public].head.round
        for s in sybils:
            n.publish(OUTSIDER.public, _join(g.run_id, s, n.cores[IDS[0].public].head.round, g.join_pow_bits))

    net.run(20, max_time=60.0)
    t20 = net.now
    rate_before = 20 / t20
    net.push(0.0, "call", None, flood)
    net.run(140, max_time=net.now + 600.0)
    k = IDS[0].public
    head = net.cores[k].head
    assert head.round >= 140, "the swarm stalled"
    states = [net.state_at(k, r) for r in range(flood_at["r"], head.round + 1)]
    admitted = {p for st in states for p in st.members if p not in g.members}
    assert 0 < len(admitted) <= 24, len(admitted)
    assert len(head.members) == 3, "silent sybils were not expelled"
    # the rate over the last 60 rounds is the clean rate (within 25 %)
    t_start = net.now
    net.run(head.round + 60, max_time=net.now + 300.0)
    rate_after = 60 / (net.now - t_start)
    assert rate_after > 0.75 * rate_before, (rate_before, rate_after)


def _lone(min_round_time: float) -> tuple[list[float], NodeCore]:
    g = make_genesis(members=(IDS[0].public,), min_round_time=min_round_time)
    core = NodeCore(g, IDS[0])
    now = 0.0
    published: list[float] = []
    effects: list[Any] = core.start(now)
    while len(published) < 10 and now < 60:
        for e in effects:
            if isinstance(e, Publish) and isinstance(e.msg, Record):
                published.append(now)
        effects = []
        for e in [x for x in core.on_timer(now)]:
            effects.append(e)
        est = [e for e in effects if type(e).__name__ == "Estimate"]
        for e in est:
            effects += core.on_estimate(now, e.round, e.head, [0.0] * g.directions)
        now = max(now + 1e-3, min(core.next_wakeup(now), now + 0.01))
    return published, core


def test_the_minimum_round_time_bounds_every_round() -> None:
    """A lone member once ran 24-100 rounds a second (the minimum round time bounded only the
    deadline), and joiners syncing at 30 records a second could not catch up."""
    published, _ = _lone(0.5)
    gaps = [b - a for a, b in zip(published, published[1:], strict=False)]
    assert gaps and min(gaps) >= 0.5 - 1e-6, gaps
