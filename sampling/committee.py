"""Committee selection by rendezvous hashing (DESIGN.md 3.2).

Every node derives the same committee of round ``r`` from two public inputs: the round's beacon
and the eligible membership set read off the chain. Each eligible peer gets one rank key per role,
``rank_key(domain, beacon, peer)``, and the peers with the lowest keys win the role. This is
rendezvous (highest-random-weight) hashing, as in MoDeST:

* it needs no coordination and no state beyond the beacon and the membership set;
* it is independent of the order in which a node happens to hold the membership set;
* a join or a leave changes the committee only where the peer that came or went would rank;
* trainers and aggregators use separate hash domains, so the two roles are drawn independently
  (a peer may hold both in one round), and aggregators come out *ranked*: index 0 publishes the
  round record first, index 1 only if index 0 is silent, and so on.

The selection runs every round for every node (and, in the simulator, for thousands of simulated
nodes), so it is written for speed: the SHA-256 state of the constant prefix (domain tag and
beacon) is computed once and copied per peer, which yields exactly ``rank_key`` (a test pins the
equality) at about half the cost, and only the ``s`` smallest keys are kept (``heapq.nsmallest``)
instead of sorting all of them.
"""

from __future__ import annotations

import hashlib
import heapq
import struct
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field

__all__ = [
    "AGGREGATOR_DOMAIN",
    "TRAINER_DOMAIN",
    "Committee",
    "aggregator_order",
    "rank_peers",
    "select_committee",
]

TRAINER_DOMAIN = b"seedswarm/rank-trainer"
AGGREGATOR_DOMAIN = b"seedswarm/rank-aggregator"


@dataclass(frozen=True)
class Committee:
    """The committee of one round: trainers (unordered in meaning) and ranked aggregators.

    ``trainers`` are listed in rank order too (lowest rank key first); the order carries no
    protocol meaning for trainers but makes the value canonical, so two nodes' committees compare
    equal exactly when they agree. ``aggregators[0]`` is the first to publish the round record.
    """

    trainers: tuple[bytes, ...]
    aggregators: tuple[bytes, ...]
    _trainer_index: dict[bytes, int] = field(
        init=False, repr=False, compare=False, hash=False, default_factory=dict
    )
    _aggregator_index: dict[bytes, int] = field(
        init=False, repr=False, compare=False, hash=False, default_factory=dict
    )

    def __post_init__(self) -> None:
        # Membership tests run for every incoming contribution, so index once (O(1) look-ups).
        t_index = {p: i for i, p in enumerate(self.trainers)}
        a_index = {p: i for i, p in enumerate(self.aggregators)}
        if len(t_index) != len(self.trainers):
            raise ValueError("duplicate peer among the trainers of a committee")
        if len(a_index) != len(self.aggregators):
            raise ValueError("duplicate peer among the aggregators of a committee")
        object.__setattr__(self, "_trainer_index", t_index)
        object.__setattr__(self, "_aggregator_index", a_index)

    def rank_of_trainer(self, peer: bytes) -> int | None:
        """Index of ``peer`` among the trainers, or None if it is not a trainer this round."""
        return self._trainer_index.get(peer)

    def is_trainer(self, peer: bytes) -> bool:
        return peer in self._trainer_index

    def is_aggregator(self, peer: bytes) -> bool:
        return peer in self._aggregator_index

    def aggregator_rank(self, peer: bytes) -> int | None:
        """Publication rank of ``peer`` (0 publishes first), or None if it is not an aggregator."""
        return self._aggregator_index.get(peer)


def _as_peer_list(eligible: Iterable[bytes]) -> list[bytes]:
    peers = list(eligible)
    for p in peers:
        if not isinstance(p, bytes):
            raise TypeError(f"peer ids must be bytes, got {type(p).__name__}")
        if not p:
            raise ValueError("empty peer id")
    if len(set(peers)) != len(peers):
        raise ValueError("duplicate peer ids in the eligible set")
    return peers


def _keyed(domain: bytes, beacon: bytes, peers: list[bytes]) -> list[tuple[bytes, bytes]]:
    """``(rank_key(domain, beacon, p), p)`` for every peer, computed from a shared hash prefix.

    ``crypto.hashing.h`` hashes ``>H len(domain) | domain | >I len(part) | part ...``; the first
    two parts (domain, beacon) are the same for every peer, so their SHA-256 state is computed
    once and copied.
    """
    base = hashlib.sha256()
    base.update(struct.pack(">H", len(domain)))
    base.update(domain)
    base.update(struct.pack(">I", len(beacon)))
    base.update(beacon)
    copy = base.copy
    out: list[tuple[bytes, bytes]] = []
    append = out.append
    prefix32 = struct.pack(">I", 32)
    for p in peers:
        m = copy()
        m.update(prefix32 + p if len(p) == 32 else struct.pack(">I", len(p)) + p)
        append((m.digest(), p))
    return out


def rank_peers(
    domain: bytes, beacon: bytes, eligible: Iterable[bytes], k: int | None = None
) -> list[bytes]:
    """The eligible peers ordered by ``rank_key(domain, beacon, peer)``, lowest first.

    With ``k`` only the first ``k`` are returned (all of them if fewer are eligible). Ties between
    two peers' keys would need a SHA-256 collision; they are broken by the peer id anyway so that
    the order is total.
    """
    peers = _as_peer_list(eligible)
    if k is not None and k < 0:
        raise ValueError(f"cannot take {k} peers")
    if k == 0:
        return []  # no hash of every peer for nothing (a committee asked for its trainers only)
    keyed = _keyed(domain, beacon, peers)
    if k is None or k >= len(keyed):
        keyed.sort()
    else:
        keyed = heapq.nsmallest(k, keyed)
    return [p for _, p in keyed]


def select_committee(
    beacon: bytes,
    eligible: Iterable[bytes],
    trainers: int,
    aggregators: int,
    probation: Collection[bytes] = (),
    probation_seats: int | None = None,
) -> Committee:
    """The committee of the round whose beacon is ``beacon``.

    ``eligible`` are the peers (raw 32-byte Ed25519 public keys) the chain allows on this round's
    committee; their order does not matter, duplicates are a ValueError (a duplicate would mean the
    caller's membership view is corrupt, and silently de-duplicating would hide it). The first
    ``trainers`` peers by trainer rank key become trainers and the first ``aggregators`` peers by
    aggregator rank key become aggregators, in rank order; if fewer peers are eligible than asked
    for, all of them are taken. The two draws are independent, so a peer may hold both roles.

    ``probation``: eligible peers still on probation (new members). Together they take at most
    ``probation_seats`` trainer seats (further ones are skipped in rank order), and they rank as
    aggregators only after every other eligible peer (:func:`aggregator_order`), so fresh keys,
    which cost nothing in an open swarm, can neither fill a committee nor publish its record.
    """
    if not isinstance(beacon, bytes):
        raise TypeError(f"beacon must be bytes, got {type(beacon).__name__}")
    if trainers < 0 or aggregators < 0:
        raise ValueError(
            f"committee sizes must be >= 0, got trainers={trainers}, aggregators={aggregators}"
        )
    peers = _as_peer_list(eligible)
    n = len(peers)
    new = set(probation)
    if not new.intersection(peers) or probation_seats is None:
        probation_seats = n

    def top_trainers(k: int) -> tuple[bytes, ...]:
        if k == 0 or n == 0:
            return ()
        keyed = _keyed(TRAINER_DOMAIN, beacon, peers)
        if probation_seats >= n:
            best = sorted(keyed) if k >= n else heapq.nsmallest(k, keyed)
            return tuple(p for _, p in best)
        out: list[bytes] = []
        seats = probation_seats
        for _, p in sorted(keyed):
            if p in new:
                if seats <= 0:
                    continue
                seats -= 1
            out.append(p)
            if len(out) == k:
                break
        return tuple(out)

    return Committee(
        trainers=top_trainers(trainers),
        aggregators=tuple(aggregator_order(beacon, peers, new, aggregators)),
    )


def aggregator_order(beacon: bytes, eligible: Iterable[bytes], probation: Collection[bytes] = (),
                     k: int | None = None) -> list[bytes]:
    """Eligible peers in aggregator rank order: every peer off probation first, then the rest.

    The first ``a`` are the round's aggregators; the others are the fallback ranks that may
    publish, one round timeout apart, when everyone ranked before them stayed silent.
    """
    peers = _as_peer_list(eligible)
    new = set(probation)
    veterans = [p for p in peers if p not in new]
    rookies = [p for p in peers if p in new]
    order = rank_peers(AGGREGATOR_DOMAIN, beacon, veterans, k)
    if k is None or len(order) < k:
        order += rank_peers(AGGREGATOR_DOMAIN, beacon, rookies, None if k is None else k - len(order))
    return order
