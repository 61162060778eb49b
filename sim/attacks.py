"""Byzantine behaviours for the simulator: attacks on values and on the protocol.

An attack is the :data:`seedswarm.sim.engine.Attack` hook: the engine calls it for every local
estimate a Byzantine node computes, with the node's honest values and the simulation, and sends
whatever it returns (``None``: nothing, the node withholds). The returned floats go through the
same public one-byte codec as an honest node's (``clamp(round(g / scale), -127, 127)``), so a
Byzantine trainer can choose its bytes freely but never leave ``[-127, 127]``: the byte range is
the norm clip, and "saturation" means values at or beyond ``127 * scale``.

Threat model: the attacker is **omniscient and colluding**, the standard (strongest) model of the
robust-aggregation literature. It sees the honest values of the same round (ALIE, IPM and mimic
need them): it recomputes them on the honest trainers' own shards, at the same head and on the same
direction streams, with a random generator derived from the run seed and the round (never the global
RNG, never an honest node's generator), so a run stays a deterministic function of its config and
the honest nodes draw exactly the batches they would draw without the attack.

Value attacks (the byte a Byzantine trainer sends):

``sign_flip``  saturation sign flip: ``-127`` steps on every direction against the colluders' own
               estimate (the mean of what they compute on their own shards; needs no honest value).
``alie``       "a little is enough" (Baruch et al. 2019): ``mu - z * sigma * sign(mu)`` per
               direction, with ``mu, sigma`` the honest mean and spread; ``z = 1`` keeps the value
               inside the honest spread so trimming does not remove it.
``ipm``        inner-product manipulation (Xie et al. 2020): ``-eps * mu`` with ``eps = 0.5``.
``random``     uniformly random bytes.
``mimic``      copy one honest peer (the lowest-ranked honest trainer of the round): all Byzantine
               trainers over-weight that peer's data (Karimireddy et al. 2022).
``zeros``      free-riding: send zeros without computing anything useful.
``adaptive``   ALIE with the largest ``z`` that the default ``guarded_mean`` still keeps: an
               attacker that knows the aggregation rule and the honest rows (the worst case for
               the default rule among ALIE-shaped attacks).
``scale_pump`` tuned against the plain mean and the public scale rule: whenever saturating with
               the honest sum would make the scale coarser it does so, otherwise it reverses every
               direction as far as the byte clip allows while holding the aggregate's median
               magnitude above the floor at which the scale would get finer (the mean's own
               defence). The scale ratchets up until the honest bytes are noise against the clip.

Protocol attacks (the node's own bytes are honest, so only the injected message is measured):

``withhold``   sampled but silent: no contribution at all.
``equivocate`` a second, different signed contribution for the same round, sent to the first
               aggregator before the honest one: the aggregator keeps the pair as evidence, the
               record carries it, and the chain expels the peer.
``replay``     re-sends its contribution of an earlier round: rejected as stale.
``forge``      a contribution in the name of an honest trainer of the round, signed with the
               attacker's key: rejected for its signature.
``non_member`` a contribution signed by a key that is not a member: rejected (not a trainer).
``rush``       a Byzantine aggregator: the moment it is a trainer, it publishes a record of the
               round holding only its own saturated contribution, as the fallback aggregator it is
               at some rank (every member is one). Records carry no time; every node holds a
               rank-j record for j timeouts, so the round's rank-0 record wins
               (``tests/test_protocol_attacks.py::test_rushed_fallback_record_does_not_take_the_round``).

A name may carry one numeric parameter after a colon: ``alie:1.5`` (z), ``ipm:4`` (eps).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from seedswarm.gossip.wire import Contribution
from seedswarm.node.core.chain import ChainState
from seedswarm.node.core.codec import QMAX, quantize
from seedswarm.node.learn.estimators import local_estimate
from seedswarm.node.learn.replay import bind_
from seedswarm.sim.protocolattacks import (
    equivocate,
    forge,
    make_non_member,
    make_replay,
    rush,
    saturated_against,
    withhold,
)

if TYPE_CHECKING:
    from seedswarm.sim.engine import Attack, SimNode, Simulation

__all__ = [
    "ATTACKS",
    "PROTOCOL_ATTACKS",
    "TUNED_AGAINST",
    "VALUE_ATTACKS",
    "HonestView",
    "get_attack",
]

VALUE_ATTACKS: tuple[str, ...] = ("sign_flip", "alie", "ipm", "random", "mimic", "zeros")
TUNED_AGAINST: dict[str, str] = {"adaptive": "guarded_mean", "scale_pump": "mean"}
"""Attacks tuned against one aggregation rule (not in the issue's list), and that rule."""
PROTOCOL_ATTACKS: tuple[str, ...] = ("withhold", "equivocate", "replay", "forge", "non_member", "rush")

# ---------------------------------------------------------------------------------------------
# the omniscient view of the honest values of a round


def _round_state(node: SimNode) -> tuple[ChainState, int]:
    """The state the node's current estimate is for, and its direction group.

    The engine calls the attack while it handles the core's Estimate effect, which the core emits
    on entering the round, so the core's head is the estimate's head.
    """
    st = node.core.head
    rank = st.trainer_rank.get(node.key, 0)
    return st, st.group_of(rank)


def _group_trainers(sim: Simulation, st: ChainState, group: int, byzantine: bool) -> list[bytes]:
    """The round's simulated trainers of one direction group that are (or are not) Byzantine."""
    return [p for p in st.committee.trainers
            if st.group_of(st.trainer_rank[p]) == group and p in sim.by_key
            and sim.by_key[p].byzantine == byzantine]


class HonestView:
    """What an omniscient attacker knows of a round: the honest trainers' values, recomputed.

    Values are computed on each honest trainer's own shard, at the round's head, on the round's
    streams for that trainer's group, with a generator derived from (run seed, round, trainer
    index): deterministic, and independent of every generator the honest nodes use. Cached per
    (head, group), so all colluding Byzantine trainers of one round share one computation. At most
    ``sample`` honest trainers are recomputed (each costs one local estimate).
    """

    def __init__(self, sample: int = 6) -> None:
        self.sample = sample
        self._cache: dict[tuple[bytes, int], np.ndarray] = {}

    def values(self, sim: Simulation, st: ChainState, group: int) -> np.ndarray:
        """``(n_honest, K)`` float64 array of honest values (``n_honest >= 1`` unless none exists)."""
        key = (st.head, group)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        honest = _group_trainers(sim, st, group, byzantine=False)
        if not honest:  # a fully Byzantine committee: fall back to any honest node's shard
            honest = [n.key for n in sim.nodes if not n.byzantine][:1]
        streams = tuple(st.streams(group))
        rows = [_estimate(sim, sim.by_key[p], st, streams) for p in honest[: self.sample]]
        arr = np.asarray(rows, dtype=np.float64).reshape(len(rows), len(streams))
        if len(self._cache) > 64:
            self._cache.clear()
        self._cache[key] = arr
        return arr


def _estimate(sim: Simulation, node: SimNode, st: ChainState, streams: tuple[int, ...]) -> list[float]:
    """The honest estimate ``node`` would compute at ``st`` (same code path as the engine's)."""
    params = sim.states.get(st.head)
    assert params is not None and sim.model is not None
    model = bind_(sim.model, params)
    g = sim.genesis
    rng = np.random.default_rng([g.seed, st.round, node.index, 0xA77AC4])
    return local_estimate(sim.task, g, model, node.shard, rng, streams)


# ---------------------------------------------------------------------------------------------
# value attacks


def _per_round(compute: Callable[[SimNode, list[float], Simulation, ChainState, int], list[float]]) -> Attack:
    """An attack whose colluders in one group all send one row, computed once per (head, group).

    ``compute(node, values, sim, state, group)`` runs for the first colluder of the round to call;
    the others get the same row. At most 65 rounds are kept.
    """
    cache: dict[tuple[bytes, int], list[float]] = {}

    def attack(node: SimNode, values: list[float], sim: Simulation) -> list[float]:
        st, grp = _round_state(node)
        key = (st.head, grp)
        hit = cache.get(key)
        if hit is None:
            if len(cache) > 64:
                cache.clear()
            hit = cache[key] = compute(node, values, sim, st, grp)
        return hit

    return attack


def make_sign_flip() -> Attack:
    """Saturation sign flip: every colluder of a group sends ``-127 * sign`` of their pooled estimate.

    "Its own estimate" for a coalition is the mean of the estimates its members compute on their
    own shards (recomputed as :class:`HonestView` does, so no honest node's generator is touched):
    the colluders pool what they know, which removes most of their shard noise, and all send the
    same saturated row. A lone attacker flips its own estimate. Cached per (head, group).
    """
    def sign_flip(node: SimNode, values: list[float], sim: Simulation, st: ChainState, grp: int) -> list[float]:
        streams = tuple(st.streams(grp))
        own = [_estimate(sim, sim.by_key[p], st, streams)
               for p in _group_trainers(sim, st, grp, byzantine=True)] or [values]
        return saturated_against([float(v) for v in np.mean(np.asarray(own, dtype=np.float64), axis=0)],
                                  st.scale)

    return _per_round(sign_flip)


def make_alie(z: float = 1.0, view: HonestView | None = None) -> Attack:
    """ALIE: ``mu - z sigma sign(mu)``; small enough to sit inside the honest spread."""
    hv = view or HonestView()

    def alie(node: SimNode, values: list[float], sim: Simulation) -> list[float]:
        st, grp = _round_state(node)
        h = hv.values(sim, st, grp)
        mu, sigma = h.mean(axis=0), h.std(axis=0)
        return [float(x) for x in mu - z * sigma * np.sign(mu)]

    return alie


def make_ipm(eps: float = 0.5, view: HonestView | None = None) -> Attack:
    """Inner-product manipulation: ``-eps`` times the honest mean (a negative inner product)."""
    hv = view or HonestView()

    def ipm(node: SimNode, values: list[float], sim: Simulation) -> list[float]:
        st, grp = _round_state(node)
        return [float(x) for x in -eps * hv.values(sim, st, grp).mean(axis=0)]

    return ipm


def make_adaptive(view: HonestView | None = None) -> Attack:
    """ALIE at the largest ``z`` the default rule's guards let through: an attacker that knows the rule.

    The colluders recompute every honest row of the round, quantize them at the round's scale as
    the honest nodes will, and try ``z`` from 4 down to 0 in steps of 1/8 with one copy of their
    row per Byzantine trainer of the group added: the first ``z`` at which
    :func:`~seedswarm.sampling.aggregators.guarded_keep` keeps every copy is sent (``z = 0`` is the
    honest mean, harmless). Cached per round and group, so all colluders send the same row.
    """
    from seedswarm.sampling.aggregators import guarded_keep

    hv = view or HonestView(sample=4096)
    def adaptive(node: SimNode, values: list[float], sim: Simulation, st: ChainState, grp: int) -> list[float]:
        h = hv.values(sim, st, grp)
        mu, sigma = h.mean(axis=0), h.std(axis=0)
        rows = [quantize([float(v) for v in r], st.scale) for r in h]
        b = len(_group_trainers(sim, st, grp, byzantine=True))
        best = mu
        for z in np.arange(4.0, 0.0, -0.125):
            v = mu - z * sigma * np.sign(mu)
            keep = guarded_keep(rows + [quantize([float(x) for x in v], st.scale)] * b, st.trim)
            if keep is not None and set(range(len(rows), len(rows) + b)) <= set(keep):
                best = v
                break
        return [float(x) for x in best]

    return _per_round(adaptive)


def make_scale_pump(view: HonestView | None = None) -> Attack:
    """Tuned against the plain mean and the public scale rule: ratchet the scale coarser, then reverse.

    Against the mean the byte clip bounds each colluder's pull to 127 steps of the public scale,
    and the scale rule (:func:`~seedswarm.node.core.codec.next_scale_exp`) keeps the honest bytes in
    proportion to that clip: an attack that only reverses (``sign_flip``, ``ipm:8``) drives the
    aggregate towards zero, the scale halves, the honest bytes double in steps, and the honest
    majority takes the step back. The rule reads the aggregate, which the colluders help write.
    This attacker knows the honest rows of the round and both rules, and sends one of two rows:

    * **pump**: if saturating every direction *with* the honest sum lifts the mean's median
      ``|a_k|`` over ``SCALE_UP_MEDIAN_STEPS``, it sends that. The round's step is larger but
      right; the scale doubles, which halves every honest byte against the colluders' fixed clip.
    * **lock**: otherwise it saturates every direction against the honest sum, and if that would
      leave fewer than ``K // 2 + 1`` directions with ``|a_k|`` above the floor at which the scale
      gets finer, it sets just enough of the directions where its flip achieves least to one step
      above that floor, with the honest sign: the scale never refines.

    So the scale gets coarser and (but for the rounds where the colluders' recomputed honest rows
    miss the real ones) never finer. The reversed steps push the model to where its gradients are
    larger, which is what the next pump needs; the honest bytes never catch up with the clip, and
    the scale climbs to ``EXP_MAX``. Cached per round and group (all colluders send one row).
    """
    from seedswarm.node.core.codec import SCALE_DOWN_MEDIAN_STEPS, next_scale_exp
    from seedswarm.sampling.aggregators import aggregate_array

    hv = view or HonestView(sample=4096)
    floor = SCALE_DOWN_MEDIAN_STEPS + 1

    def scale_pump(node: SimNode, values: list[float], sim: Simulation, st: ChainState, grp: int) -> list[float]:
        honest = [quantize([float(v) for v in r], st.scale) for r in hv.values(sim, st, grp)]
        rows = [np.frombuffer(q, dtype=np.int8) for q in honest]
        total = np.sum(np.asarray(rows, dtype=np.float64), axis=0)
        b = max(1, len(_group_trainers(sim, st, grp, byzantine=True)))
        sign = np.where(total >= 0, 1.0, -1.0)
        pump = QMAX * sign
        pumped = aggregate_array("mean", honest + [quantize([float(v) for v in pump], 1.0)] * b)
        if next_scale_exp(st.scale_exp, pumped.tolist()) > st.scale_exp:
            return [float(v) * st.scale for v in pump]
        n = len(rows) + b
        x = -pump
        a = (total + b * x) / n  # the mean the committee will take, in steps
        short = len(a) // 2 + 1 - int(np.count_nonzero(np.abs(a) >= floor))
        if short > 0:
            weakest = sorted((i for i in range(len(a)) if abs(a[i]) < floor), key=lambda i: (-a[i] * sign[i], i))
            for i in weakest[:short]:
                x[i] = np.clip(np.round((floor * sign[i] * n - total[i]) / b), -QMAX, QMAX)
        return [float(v) * st.scale for v in x]

    return _per_round(scale_pump)


def random_bytes(node: SimNode, values: list[float], sim: Simulation) -> list[float]:
    """Uniform bytes in [-127, 127] (drawn from the Byzantine node's own generator)."""
    scale = node.core.head.scale
    return [float(q) * scale for q in node.rng.integers(-QMAX, QMAX + 1, size=len(values))]


def make_mimic(view: HonestView | None = None) -> Attack:
    """Copy the lowest-ranked honest trainer of the round (all colluders copy the same one)."""
    hv = view or HonestView(sample=1)

    def mimic(node: SimNode, values: list[float], sim: Simulation) -> list[float]:
        st, grp = _round_state(node)
        return [float(x) for x in hv.values(sim, st, grp)[0]]

    return mimic


def zeros(node: SimNode, values: list[float], sim: Simulation) -> list[float]:
    """Free-riding: zeros, i.e. "no opinion" on every direction, at no cost."""
    return [0.0] * len(values)


# ---------------------------------------------------------------------------------------------
# registry

def honest(node: SimNode, values: list[float], sim: Simulation) -> list[float]:
    """No attack: the node is labelled Byzantine (for the metrics) but behaves honestly."""
    return values


ATTACKS: dict[str, Callable[[float | None], Attack]] = {
    "none": lambda p: honest,
    "sign_flip": lambda p: make_sign_flip(),
    "alie": lambda p: make_alie(1.0 if p is None else p),
    "ipm": lambda p: make_ipm(0.5 if p is None else p),
    "random": lambda p: random_bytes,
    "mimic": lambda p: make_mimic(),
    "adaptive": lambda p: make_adaptive(),
    "scale_pump": lambda p: make_scale_pump(),
    "zeros": lambda p: zeros,
    "withhold": lambda p: withhold,
    "equivocate": lambda p: equivocate,
    "replay": lambda p: make_replay(),
    "forge": lambda p: forge,
    "non_member": lambda p: make_non_member(),
    "rush": lambda p: rush,
}


def get_attack(name: str) -> Attack:
    """A fresh attack hook for ``name`` (``NAME`` or ``NAME:PARAM``); ValueError lists the choices.

    Fresh: stateful attacks (replay, non_member, the honest-value caches) must not leak between
    two simulations in one process.
    """
    base, sep, param = name.partition(":")
    factory = ATTACKS.get(base)
    if factory is None:
        raise ValueError(f"unknown attack {name!r}; choose one of: {', '.join(ATTACKS)}")
    value: float | None = None
    if sep:
        try:
            value = float(param)
        except ValueError:
            raise ValueError(f"attack parameter must be a number, got {param!r}") from None
    return factory(value)


# ---------------------------------------------------------------------------------------------
# what the summary reports about Byzantine nodes


class ByzantineMetrics:
    """Reputation of Byzantine vs honest trainers, and how many Byzantine nodes the chain expelled.

    Fed once per new best round by the runner. A round's inputs are read from a core that holds
    them (the record's aggregator keeps them to serve verifiers, verifying trainers keep a copy);
    they are the signed contributions the aggregate was computed from, so a forged or replayed
    message never reaches the reputation either.
    """

    def __init__(self, decay: float = 0.9) -> None:
        self.decay = decay
        self.scores: dict[bytes, float] = {}
        self.rounds_scored = 0

    def on_round(self, sim: Simulation, st: ChainState) -> None:
        from seedswarm.gossip.wire import WireError, decode_as
        from seedswarm.sampling.reputation import update_scores

        inputs = None
        for n in sim.nodes:
            inputs = n.core.inputs_of(st.head)  # the core's cache of record inputs (read only)
            if inputs is not None:
                break
        if not inputs:
            return
        peers, rows = [], []
        for data in inputs:
            try:
                c = decode_as(data, Contribution, st.run_id)
            except WireError:
                return
            peers.append(bytes(c.peer))
            rows.append(bytes(c.q))
        self.scores = update_scores(self.scores, peers, rows, self.decay)
        self.rounds_scored += 1

    def summary(self, sim: Simulation, head: ChainState | None) -> dict[str, object]:
        byz = [n for n in sim.nodes if n.byzantine]
        hon = [n for n in sim.nodes if not n.byzantine]

        def mean_rep(nodes: list[SimNode]) -> float | None:
            vals = [self.scores[n.key] for n in nodes if n.key in self.scores]
            return float(np.mean(vals)) if vals else None

        expelled = sum(1 for n in byz if head is not None and n.key not in head.members)
        return {
            "byzantine_nodes": len(byz),
            "byzantine_expelled": expelled,
            "reputation_honest": mean_rep(hon),
            "reputation_byzantine": mean_rep(byz),
            "reputation_rounds": self.rounds_scored,
        }
