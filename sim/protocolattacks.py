"""Protocol attacks of the simulator: a Byzantine node whose own bytes stay honest but which
injects a message (an equivocating pair, a replayed contribution, a forged author, an outsider's
contribution, one sent before the round opened) or withholds its own.

Split from :mod:`seedswarm.sim.attacks` (the value attacks, the registry and the threat model);
each function is an :data:`seedswarm.sim.engine.Attack` hook or a factory of one.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from seedswarm.crypto.keys import Identity
from seedswarm.gossip.wire import Contribution
from seedswarm.node.core.chain import ChainState
from seedswarm.node.core.codec import QMAX, quantize

if TYPE_CHECKING:
    from seedswarm.sim.engine import Attack, SimNode, Simulation

__all__ = ["equivocate", "forge", "make_non_member", "make_replay", "rush", "saturated_against", "saturated_row",
           "withhold"]




def saturated_against(values: list[float], scale: float) -> list[float]:
    """Values beyond the clip, opposite in sign to ``values``: the codec turns them into -+127."""
    big = 2.0 * QMAX * scale
    return [-math.copysign(big, v) for v in values]


def saturated_row(values: list[float], scale: float) -> bytes:
    """The bytes of :func:`saturated_against`: -+127 against ``values`` (protocol attacks' payload)."""
    return quantize(saturated_against(values, scale), scale)


def withhold(node: SimNode, values: list[float], sim: Simulation) -> None:
    """Sampled but silent."""
    return None


def _first_aggregator(st: ChainState) -> bytes | None:
    aggs = st.committee.aggregators
    return aggs[0] if aggs else None


def equivocate(node: SimNode, values: list[float], sim: Simulation) -> list[float]:
    """Send a different signed contribution first; the honest one follows through the core."""
    st = node.core.head
    agg = _first_aggregator(st)
    if agg is not None:
        other = quantize([-v for v in values], st.scale)
        if other == quantize(values, st.scale):  # all zeros: make the pair differ anyway
            other = bytes([1]) + other[1:]
        c = Contribution(run=st.run_id, round=st.round, peer=node.key, q=other).signed(node.identity)
        sim._send(node, agg, c)
    return values


def make_replay() -> Attack:
    """Re-send the node's contribution of its previous duty (the first time: one of round r - 1)."""
    last: dict[bytes, Contribution] = {}

    def replay(node: SimNode, values: list[float], sim: Simulation) -> list[float]:
        st = node.core.head
        agg = _first_aggregator(st)
        old = last.get(node.key)
        if old is None and st.round > 0:
            old = Contribution(run=st.run_id, round=st.round - 1, peer=node.key,
                               q=quantize(values, st.scale)).signed(node.identity)
        if agg is not None and old is not None:
            sim._send(node, agg, old)
        last[node.key] = Contribution(run=st.run_id, round=st.round, peer=node.key,
                                      q=quantize(values, st.scale)).signed(node.identity)
        return values

    return replay


def forge(node: SimNode, values: list[float], sim: Simulation) -> list[float]:
    """A contribution in an honest trainer's name, signed with the attacker's key."""
    st = node.core.head
    agg = _first_aggregator(st)
    victim = next((p for p in st.committee.trainers if p in sim.by_key and not sim.by_key[p].byzantine), None)
    if agg is not None and victim is not None:
        q = saturated_row(values, st.scale)
        good = Contribution(run=st.run_id, round=st.round, peer=node.key, q=q).signed(node.identity)
        sim._send(node, agg, Contribution(run=st.run_id, round=st.round, peer=victim, q=q, sig=good.sig))
    return values


def make_non_member() -> Attack:
    """A contribution from a fresh key that is not a member of the swarm."""
    outsiders: dict[bytes, Identity] = {}

    def non_member(node: SimNode, values: list[float], sim: Simulation) -> list[float]:
        st = node.core.head
        agg = _first_aggregator(st)
        ident = outsiders.get(node.key)
        if ident is None:
            ident = outsiders[node.key] = Identity.from_seed(bytes(node.rng.integers(0, 256, 32, dtype=np.uint8)))
        if agg is not None:
            q = saturated_row(values, st.scale)
            sim._send(node, agg, Contribution(run=st.run_id, round=st.round, peer=ident.public, q=q).signed(ident))
        return values

    return non_member


def rush(node: SimNode, values: list[float], sim: Simulation) -> list[float]:
    """Publish at once a one-contribution record (own saturated bytes) as a fallback aggregator."""
    from seedswarm.node.core.chain import build_record, record_hash

    st = node.core.head
    q = saturated_row(values, st.scale)
    c = Contribution(run=st.run_id, round=st.round, peer=node.key, q=q).signed(node.identity)
    rec, inputs = build_record(st, node.identity, [c])
    node.core.keep_inputs(record_hash(rec), st.round, inputs)  # serve verifiers, like an aggregator
    sim._publish(node, rec)
    return values
