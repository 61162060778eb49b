"""The chain: records, their validation, and the state they define.

State = replay(genesis, records). :class:`ChainState` is immutable: applying a record returns a
new state, so a node can keep a few recent states to undo a bounded number of rounds, and a
simulator can share one state object among all the nodes that agree on a head.

Two levels of checking:

* :func:`check_record` (every node, every record): run, round, parent, the aggregator's rank and
  signature, the contributor bitmap, the aggregate's shape and range, and every membership
  entry (signed joins and leaves, equivocation evidence). Cheap: one signature per entry.
* :func:`check_contributions` (sampled verifiers): the signed inputs behind the record, their
  Merkle root, and the aggregate recomputed from them. A mismatch is a fraud proof.
"""

from __future__ import annotations

import functools
import itertools
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from seedswarm.crypto.hashing import beacon_of, h, merkle_root, round_seed, stream_seed
from seedswarm.crypto.keys import Identity
from seedswarm.gossip.wire import (
    Contribution,
    Equivocation,
    Join,
    Leave,
    Message,
    Record,
    WireError,
    decode_as,
)
from seedswarm.node.core.admission import admission_ok, join_bits
from seedswarm.node.core.codec import next_scale_exp, scale_of
from seedswarm.node.core.genesis import Genesis
from seedswarm.node.core.reasons import Reason
from seedswarm.sampling.aggregators import AGG_ONE, aggregate
from seedswarm.sampling.byzantine import trim_for
from seedswarm.sampling.committee import Committee, aggregator_order, select_committee

AGG_MAX = 127 * AGG_ONE
_MEMO_SIZE = 4096


class RecordError(Exception):
    """A record (or the inputs behind it) that must not be applied, and why."""

    def __init__(self, reason: Reason, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else str(reason))
        self.reason = reason
        self.detail = detail


def encode_aggregate(values: Sequence[int]) -> bytes:
    return b"".join(int(v).to_bytes(2, "big", signed=True) for v in values)


def decode_aggregate(data: bytes) -> list[int]:
    return [int.from_bytes(data[i : i + 2], "big", signed=True) for i in range(0, len(data), 2)]


def bitmap_of(ranks: Iterable[int], size: int) -> bytes:
    bits = bytearray((size + 7) // 8)
    for i in ranks:
        bits[i // 8] |= 1 << (i % 8)
    return bytes(bits)


def ranks_of(bitmap: bytes) -> tuple[int, ...]:
    return _ranks_of(bytes(bitmap))


@functools.lru_cache(maxsize=1024)
def _ranks_of(bitmap: bytes) -> tuple[int, ...]:
    # Cached: fork choice asks for it on every record at every node.
    return tuple(i for i in range(len(bitmap) * 8) if bitmap[i // 8] >> (i % 8) & 1)


@dataclass(frozen=True, eq=False)
class ChainState:
    """Everything the chain defines after ``round`` records (the next round to decide is ``round``)."""

    genesis: Genesis
    run_id: bytes
    round: int
    head: bytes
    members: dict[bytes, int]  # public key -> round its membership started
    missed: dict[bytes, int] = field(default_factory=dict)  # consecutive missed duties
    departed: dict[bytes, int] = field(default_factory=dict)  # public key -> round it left/was expelled
    scale_exp: int = 0
    recent_joins: tuple[int, ...] = ()  # rounds of the Joins admitted in the last join_ttl rounds
    trial: dict[bytes, int] = field(default_factory=dict)  # members on probation -> contributions they owe

    @classmethod
    def initial(cls, genesis: Genesis) -> ChainState:
        # Shared by run id, as checked_next_state shares later states: the state is immutable and
        # its committee (a sort of every member) is costly to derive once per simulated joiner.
        run = genesis.run_id
        st = _INITIAL.get(run)
        if st is None:
            st = cls(
                genesis=genesis, run_id=run, round=0, head=h(b"seedswarm/genesis-head", run),
                members={m: -genesis.join_delay for m in genesis.members}, scale_exp=genesis.scale_exp,
            )
            if len(_INITIAL) >= 16:
                _INITIAL.clear()
            _INITIAL[run] = st
        return st

    # ---- derived, cached (the state is immutable)
    @functools.cached_property
    def beacon(self) -> bytes:
        return beacon_of(self.head)

    @functools.cached_property
    def eligible(self) -> list[bytes]:
        limit = self.round - self.genesis.join_delay
        return [m for m, joined in self.members.items() if joined <= limit]

    @functools.cached_property
    def probation(self) -> frozenset[bytes]:
        """Members on probation: joined, and not yet contributed ``genesis.probation`` times."""
        return frozenset(self.trial)

    @functools.cached_property
    def committee(self) -> Committee:
        g = self.genesis
        seats = max(1, int(g.trainers * g.probation_share))
        trainers = select_committee(self.beacon, self.eligible, g.trainers, 0,
                                    probation=self.probation, probation_seats=seats).trainers
        # The aggregators are the first ranks of the full order, which every node needs anyway
        # (aggregator_rank of anyone off the committee): one sort of the members, not two.
        return Committee(trainers=trainers, aggregators=tuple(itertools.islice(self._full_aggregator_order,
                                                                               g.aggregators)))

    @functools.cached_property
    def _full_aggregator_order(self) -> dict[bytes, int]:
        return {p: i for i, p in enumerate(aggregator_order(self.beacon, self.eligible, self.probation))}

    @functools.cached_property
    def join_bits(self) -> int:
        """Bits of work a Join needs in a record of this round (open swarms; see ``admission``)."""
        return join_bits(self.genesis, len(self.recent_joins), len(self.members))

    def aggregator_rank(self, peer: bytes) -> int | None:
        """Rank of an eligible peer as aggregator of this round. The first ``a`` ranks are the
        committee's; any eligible member may publish as a fallback after everyone ranked before
        it stayed silent, so the chain moves on even when all ``a`` aggregators crashed."""
        aggs = self.committee.aggregators
        if peer in aggs:
            return aggs.index(peer)
        if peer not in self.members:
            return None
        return self._full_aggregator_order.get(peer)

    def aggregators_before(self, rank: int) -> list[bytes]:
        aggs = list(self.committee.aggregators)
        if rank <= len(aggs):
            return aggs[:rank]
        return [p for p, i in self._full_aggregator_order.items() if i < rank]

    @functools.cached_property
    def trainer_rank(self) -> dict[bytes, int]:
        return {p: i for i, p in enumerate(self.committee.trainers)}

    @functools.cached_property
    def trim(self) -> int:
        g = self.genesis
        return trim_for(g.trainers, g.byzantine_share, g.p_fail)

    @property
    def scale(self) -> float:
        return scale_of(self.scale_exp)

    @functools.cached_property
    def _all_streams(self) -> tuple[int, ...]:
        seed = round_seed(self.beacon)
        return tuple(stream_seed(seed, i) for i in range(self.genesis.total_directions))

    def streams(self, group: int | None = None) -> list[int]:
        """Direction streams of this round: all groups, or the K of one group."""
        k = self.genesis.directions
        return list(self._all_streams if group is None else self._all_streams[group * k : (group + 1) * k])

    def group_of(self, trainer_rank: int) -> int:
        return trainer_rank % self.genesis.groups

    def update_coefficients(self, agg: Sequence[int]) -> list[float]:
        """θ ← θ + Σ c_k z_k with c_k = −η_r · scale_r · (a_k / 256) / (G·K): a Python-float function of the chain."""
        g = self.genesis
        base = -g.lr_at(self.round) * self.scale / (AGG_ONE * g.total_directions)
        return [base * a for a in agg]


# ---------------------------------------------------------------------------------------------
# validation


_E = TypeVar("_E", bound=Message)


def _decode_entry(data: bytes, cls: type[_E], state: ChainState, what: Reason) -> _E:
    try:
        msg = decode_as(data, cls, state.run_id)
    except WireError as e:
        raise RecordError(what, str(e)) from None
    if not msg.signature_ok():
        raise RecordError(what, "invalid signature")
    return msg


def check_equivocation(state: ChainState, data: bytes) -> bytes:
    """Validate equivocation evidence; return the guilty peer."""
    ev = _decode_entry(data, Equivocation, state, Reason.BAD_EVIDENCE)
    a = _decode_entry(ev.a, Contribution, state, Reason.BAD_EVIDENCE)
    b = _decode_entry(ev.b, Contribution, state, Reason.BAD_EVIDENCE)
    if a.peer != b.peer or a.round != b.round or a.q == b.q:
        raise RecordError(Reason.BAD_EVIDENCE, "not two different contributions of one peer for one round")
    if a.round > state.round or state.round - a.round > state.genesis.join_ttl:
        raise RecordError(Reason.BAD_EVIDENCE, "evidence outside the ttl window")
    if a.peer not in state.members:
        raise RecordError(Reason.BAD_EVIDENCE, "peer is not a member")
    return bytes(a.peer)


def membership_changes(state: ChainState, rec: Record) -> tuple[list[bytes], list[bytes], list[bytes]]:
    """Validate the record's joins, leaves and evidence; return (joined, left, expelled) peers."""
    g, r = state.genesis, state.round
    joined: list[bytes] = []
    if len(rec.joins) > g.max_joins:
        raise RecordError(Reason.BAD_JOIN, f"{len(rec.joins)} joins in one record (at most {g.max_joins})")
    bits = state.join_bits
    for data in rec.joins:
        j = _decode_entry(data, Join, state, Reason.BAD_JOIN)
        if not (j.round <= r <= j.round + g.join_ttl):
            raise RecordError(Reason.BAD_JOIN, "join outside its validity window")
        if j.peer in state.members or j.peer in joined:
            raise RecordError(Reason.BAD_JOIN, "peer already a member")
        if state.departed.get(j.peer, -1) >= j.round:
            raise RecordError(Reason.BAD_JOIN, "join signed before the peer's last departure (replay)")
        if not admission_ok(g, state.run_id, j.peer, j.round, j.cert, bits):
            raise RecordError(Reason.BAD_JOIN, "missing or invalid admission certificate or work")
        joined.append(bytes(j.peer))
    left: list[bytes] = []
    for data in rec.leaves:
        lv = _decode_entry(data, Leave, state, Reason.BAD_LEAVE)
        if not (lv.round <= r <= lv.round + g.join_ttl):
            raise RecordError(Reason.BAD_LEAVE, "leave outside its validity window")
        if lv.peer not in state.members or lv.peer in left:
            raise RecordError(Reason.BAD_LEAVE, "peer is not a member")
        left.append(bytes(lv.peer))
    expelled: list[bytes] = []
    for data in rec.evidence:
        p = check_equivocation(state, data)
        if p in expelled:
            raise RecordError(Reason.BAD_EVIDENCE, "duplicate evidence")
        expelled.append(p)
    return joined, left, expelled


def check_record(state: ChainState, rec: Record) -> None:
    """Everything about a record that can be checked without its inputs. Raises RecordError."""
    g = state.genesis
    if rec.run != state.run_id:
        raise RecordError(Reason.WRONG_RUN)
    if rec.round != state.round:
        raise RecordError(Reason.WRONG_ROUND, f"record for round {rec.round}, state at {state.round}")
    if rec.prev != state.head:
        raise RecordError(Reason.WRONG_PARENT)
    if state.aggregator_rank(rec.aggregator) is None:
        raise RecordError(Reason.NOT_AGGREGATOR, "signed by a peer that is not an eligible member")
    if not rec.signature_ok():
        raise RecordError(Reason.BAD_SIGNATURE)
    n_trainers = len(state.committee.trainers)
    if len(rec.contributors) != (n_trainers + 7) // 8:
        raise RecordError(Reason.BAD_BITMAP, "contributor bitmap has the wrong length")
    ranks = ranks_of(rec.contributors)
    if ranks and ranks[-1] >= n_trainers:
        raise RecordError(Reason.BAD_BITMAP, "bit set beyond the committee")
    if len(rec.aggregate) != 2 * g.total_directions:
        raise RecordError(Reason.BAD_AGGREGATE, "wrong number of directions")
    agg = decode_aggregate(rec.aggregate)
    if any(abs(a) > AGG_MAX for a in agg):
        raise RecordError(Reason.BAD_AGGREGATE, "value outside the byte range")
    groups_present = {state.group_of(i) for i in ranks}
    k = g.directions
    for grp in range(g.groups):
        if grp not in groups_present and any(agg[grp * k : (grp + 1) * k]):
            raise RecordError(Reason.BAD_AGGREGATE, "non-zero aggregate for a group without contributions")
    membership_changes(state, rec)


def recompute_aggregate(state: ChainState, ranked: Sequence[tuple[int, bytes]]) -> list[int]:
    """The aggregate of (trainer rank, q bytes) pairs, per direction group, in integers."""
    g = state.genesis
    out: list[int] = []
    for grp in range(g.groups):
        rows = [q for rank, q in ranked if state.group_of(rank) == grp]
        out.extend(aggregate(g.aggregator_rule, rows, state.trim) if rows else [0] * g.directions)
    return out


_VERIFIED: OrderedDict[bytes, None] = OrderedDict()


def check_contributions(state: ChainState, rec: Record, contributions: Sequence[bytes]) -> None:
    """Full verification: the record's inputs exist, are signed by its trainers, and give its aggregate.

    Successful checks are memoised on (parent head, record, inputs): a pure function, so the
    verifiers simulated in one process share the work.
    """
    key = h(b"seedswarm/verified", state.head, record_hash(rec), *contributions)
    if key in _VERIFIED:
        return
    _check_contributions(state, rec, contributions)
    _VERIFIED[key] = None
    if len(_VERIFIED) > _MEMO_SIZE:
        _VERIFIED.popitem(last=False)


def _check_contributions(state: ChainState, rec: Record, contributions: Sequence[bytes]) -> None:
    ranks = ranks_of(rec.contributors)
    if len(contributions) != len(ranks):
        raise RecordError(Reason.BAD_INPUTS, f"{len(contributions)} inputs for {len(ranks)} contributors")
    if merkle_root(list(contributions)) != rec.contrib_root:
        raise RecordError(Reason.BAD_INPUTS, "inputs do not match the record's Merkle root")
    ranked: list[tuple[int, bytes]] = []
    for rank, data in zip(ranks, contributions, strict=True):
        c = validate_contribution(state, data)
        if state.trainer_rank[c.peer] != rank:
            raise RecordError(Reason.BAD_INPUTS, "input does not belong to the trainer at its rank")
        ranked.append((rank, c.q))
    if encode_aggregate(recompute_aggregate(state, ranked)) != rec.aggregate:
        raise RecordError(Reason.WRONG_AGGREGATE, "aggregate differs from the one recomputed from the inputs")


def validate_contribution(state: ChainState, data: bytes | Contribution) -> Contribution:
    """A contribution an aggregator may use for the round ``state`` is about to decide."""
    try:
        c = data if isinstance(data, Contribution) else decode_as(data, Contribution, state.run_id)
    except WireError as e:
        raise RecordError(Reason.BAD_CONTRIBUTION, str(e)) from None
    if c.round != state.round:
        raise RecordError(Reason.STALE_CONTRIBUTION if c.round < state.round else Reason.FUTURE_CONTRIBUTION)
    if c.peer not in state.trainer_rank:
        raise RecordError(Reason.NOT_TRAINER, "contribution from a peer outside this round's trainers")
    if len(c.q) != state.genesis.directions:
        raise RecordError(Reason.BAD_CONTRIBUTION, "wrong number of directions")
    if b"\x80" in c.q:
        raise RecordError(Reason.BAD_CONTRIBUTION, "byte -128 is outside the codec's range")
    if not c.signature_ok():
        raise RecordError(Reason.BAD_SIGNATURE, "contribution signature invalid")
    return c


# ---------------------------------------------------------------------------------------------
# building and applying


def build_record(
    state: ChainState,
    aggregator: Identity,
    contributions: Sequence[Contribution],
    joins: Sequence[bytes] = (),
    leaves: Sequence[bytes] = (),
    evidence: Sequence[bytes] = (),
) -> tuple[Record, list[bytes]]:
    """An aggregator's record for the state's round; returns it with its ordered encoded inputs."""
    by_rank = sorted((state.trainer_rank[c.peer], c) for c in contributions)
    ranks = [r for r, _ in by_rank]
    if len(set(ranks)) != len(ranks):
        raise ValueError("two contributions from one trainer")
    encoded = [c.encode() for _, c in by_rank]
    agg = recompute_aggregate(state, [(r, c.q) for r, c in by_rank])
    rec = Record(
        run=state.run_id, round=state.round, prev=state.head, aggregator=aggregator.public,
        contributors=bitmap_of(ranks, len(state.committee.trainers)), contrib_root=merkle_root(encoded),
        aggregate=encode_aggregate(agg), joins=tuple(joins), leaves=tuple(leaves), evidence=tuple(evidence),
    ).signed(aggregator)
    return rec, encoded


def record_hash(rec: Record) -> bytes:
    cached = rec.__dict__.get("_record_hash")  # immutable message: hash once (see Message.encode)
    if cached is None:
        cached = h(b"seedswarm/record", rec.encode())
        object.__setattr__(rec, "_record_hash", cached)
    return bytes(cached)


_INITIAL: dict[bytes, ChainState] = {}
_MEMO: OrderedDict[tuple[bytes, bytes], ChainState | RecordError] = OrderedDict()


def checked_next_state(parent: ChainState, rec: Record) -> ChainState:
    """check_record then next_state, memoised on (parent head, record hash).

    Both are pure functions of those two hashes (the head commits to the whole chain and so to
    the genesis), so nodes in one process that see the same record share the work and the
    resulting immutable state: a simulator of 10,000 nodes checks each record once.
    """
    key = (parent.head, record_hash(rec))
    hit = _MEMO.get(key)
    if hit is None:
        try:
            check_record(parent, rec)
            hit = next_state(parent, rec)
        except RecordError as e:
            hit = e
        _MEMO[key] = hit
        if len(_MEMO) > _MEMO_SIZE:
            _MEMO.popitem(last=False)
    if isinstance(hit, RecordError):
        raise RecordError(hit.reason, hit.detail)
    return hit


def next_state(state: ChainState, rec: Record) -> ChainState:
    """Apply a record that passed :func:`check_record` (membership, duty counters, scale, head)."""
    g, r = state.genesis, state.round
    joined, left, expelled = membership_changes(state, rec)
    members = dict(state.members)
    missed = dict(state.missed)
    departed = dict(state.departed)
    contributed = set(ranks_of(rec.contributors))
    # An empty record proves nothing about the trainers: its aggregator may simply have heard from
    # none of them (after a mass crash, live trainers wait to verify the previous record while
    # fallback aggregators publish empty ones). Only a record that holds some contribution counts
    # the others as missed duties.
    trial = dict(state.trial)
    for rank, peer in enumerate(state.committee.trainers):
        if rank in contributed:
            missed[peer] = 0
            if peer in trial:
                trial[peer] -= 1
                if trial[peer] <= 0:
                    del trial[peer]
        elif contributed or peer in state.probation:
            # An empty record counts only members on probation: a newcomer that has yet to
            # contribute gets no benefit of the doubt, so silent sybils leave even when records
            # are sparse (node/core/admission.py).
            missed[peer] = missed.get(peer, 0) + 1
    agg_rank = state.aggregator_rank(rec.aggregator)
    assert agg_rank is not None
    for peer in state.aggregators_before(agg_rank):
        missed[peer] = missed.get(peer, 0) + 1
    gone = set(left) | set(expelled) | {p for p, n in missed.items() if n >= g.expel_after}
    for p in gone:
        members.pop(p, None)
        missed.pop(p, None)
        trial.pop(p, None)
        departed[p] = r
    for p in joined:
        members[p] = r + 1
        departed.pop(p, None)
        if g.probation > 0:
            trial[p] = g.probation
    recent = tuple(j for j in state.recent_joins if j > r - g.join_ttl) + (r,) * len(joined)
    scale_exp = state.scale_exp
    if contributed:
        scale_exp = next_scale_exp(scale_exp, decode_aggregate(rec.aggregate), AGG_ONE)
    return ChainState(
        genesis=g, run_id=state.run_id, round=r + 1, head=record_hash(rec), members=members,
        missed=missed, departed=departed, scale_exp=scale_exp, recent_joins=recent, trial=trial,
    )
