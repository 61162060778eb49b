"""An aggregator's round: collecting contributions, when to publish, what goes in the record.

The rank-0 aggregator of a round publishes once every trainer reported, or once a quorum did
and the adaptive deadline passed, or after the round timeout; fallback ranks step in one timeout
apart. Nothing is ever published before the minimum round time. The deadline is learned from the
time honest quorums took to arrive (``Deadline``), and only from rounds that tell the truth about
it: see :meth:`Aggregation.offer`.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, field

from seedswarm.gossip.wire import (
    Contribution,
    Equivocation,
    Join,
    Leave,
    Record,
    WireError,
    decode_as,
)
from seedswarm.node.core.chain import (
    ChainState,
    RecordError,
    membership_changes,
    validate_contribution,
)
from seedswarm.node.core.genesis import Genesis


class Deadline:
    """Twice the recent median time to quorum, within [min_round_time, round_timeout]."""

    def __init__(self, genesis: Genesis) -> None:
        self.g = genesis
        self.samples: list[float] = []

    def learn(self, seconds: float) -> None:
        self.samples.append(seconds)
        del self.samples[:-64]

    def value(self) -> float:
        g = self.g
        if not self.samples:
            return g.round_timeout
        recent = sorted(self.samples[-16:])
        return min(g.round_timeout, max(g.min_round_time, 2.0 * recent[len(recent) // 2]))


def quorum_count(genesis: Genesis, st: ChainState) -> int:
    n = len(st.committee.trainers)
    return max(1, -(-int(n * genesis.quorum * 1000) // 1000))


@dataclass
class Aggregation:
    """One aggregator's collection for one round."""

    state: ChainState
    rank: int
    started: float
    me: bytes
    got: dict[bytes, Contribution] = field(default_factory=dict)
    evidence: dict[bytes, bytes] = field(default_factory=dict)
    published: bool = False
    behind: bool = False  # contributions were waiting when we entered the round: we were late

    def reported(self) -> int:
        # an equivocator is in both maps (its first copy in got): count peers, not entries
        return len(self.got.keys() | self.evidence.keys())

    def offer(self, c: Contribution, now: float, deadline: Deadline) -> str:
        """Take a contribution: "new", "duplicate" or "equivocation"; RecordError if invalid."""
        validate_contribution(self.state, c)
        prev = self.got.get(c.peer)
        if prev is not None:
            if prev.q != c.q and c.peer not in self.evidence:
                self.evidence[c.peer] = Equivocation(run=c.run, a=prev.encode(), b=c.encode()).encode()
                return "equivocation"
            return "duplicate"
        if c.peer in self.evidence:
            return "duplicate"
        self.got[c.peer] = c
        if now <= self.started and c.peer != self.me:
            self.behind = True
        if self.reported() == quorum_count(deadline.g, self.state) and any(p != self.me for p in self.got) \
                and not self.behind:
            # Only quorums that crossed the network teach the deadline: a node that trained
            # alone would learn a deadline of microseconds and shut out the first joiner. Nor
            # does a round this node entered late (its trainers' inputs were already waiting):
            # such a "time to quorum" is near zero, and a deadline learned from it made an
            # aggregator that got ahead (it had published the record before) publish with its
            # own contribution only, round after round, until the others were expelled.
            deadline.learn(now - self.started)
        return "new"

    def publish_delay(self, deadline: Deadline) -> float:
        """How long after entering the round this aggregator publishes, given what it has now.

        Rank 0: once every trainer reported; once a quorum did and the adaptive deadline passed,
        unless a silent trainer is on its last chance; else after the round timeout (a quorum
        that is late is waited for, never cut short by a deadline learned in easier rounds).
        Never before the minimum round time, so a lone member cannot outrun the nodes syncing to
        it. Rank j >= 1 steps in at (j + 0.5) timeouts: trainers re-send to rank j at j
        timeouts, so it has their inputs by then.

        *Last chance*: a record that leaves out a trainer with ``expel_after - 1`` missed duties
        expels it, and that must never happen on a deadline: the deadline is twice the median
        time to quorum, so a live member that is the slowest of its committees (a long link, a
        slow GPU) misses it now and then, and four such misses in a row used to expel a member
        that had sent every contribution (one in 60 fault-free runs of ``bench sweep``). So the
        record that would expel waits the full round timeout for it; a dead member costs the
        swarm one slow round, once.
        """
        g = deadline.g
        if self.rank > 0:
            return max(g.min_round_time, (self.rank + 0.5) * g.round_timeout)
        n = self.reported()
        if n >= len(self.state.committee.trainers):
            return g.min_round_time
        if n >= quorum_count(g, self.state) and not self._last_chance_waiting():
            return max(g.min_round_time, deadline.value())
        return max(g.min_round_time, g.round_timeout)

    def _last_chance_waiting(self) -> bool:
        """A trainer that has not reported would be expelled by a record without it."""
        st = self.state
        last = st.genesis.expel_after - 1
        return any(st.missed.get(p, 0) >= last for p in st.committee.trainers
                   if p not in self.got and p not in self.evidence)

    def contributions(self) -> list[Contribution]:
        return [c for p, c in self.got.items() if p not in self.evidence]


def pending_entries(st: ChainState, pending: dict[bytes, bytes], cls: type[Join] | type[Leave], limit: int) -> list[bytes]:
    """The pending Joins (or Leaves) a record of ``st`` can carry, at most ``limit``, in a fixed
    order (every aggregator picks alike); entries no longer valid are dropped from ``pending``."""
    out: list[bytes] = []
    for peer, data in sorted(pending.items()):
        if len(out) >= limit:
            break
        probe = Record(run=st.run_id, round=st.round, joins=(*out, data) if cls is Join else (),
                       leaves=(*out, data) if cls is Leave else ())
        try:
            membership_changes(st, probe)
        except RecordError:
            del pending[peer]  # expired, already applied, or invalid now (more work needed)
            continue
        out.append(data)
    return out


@functools.lru_cache(maxsize=4096)
def membership_peer(data: bytes, run_id: bytes) -> bytes | None:
    """The peer a record's Join or Leave entry is about (a pure function of the bytes, so it is
    shared by every core in a process)."""
    with contextlib.suppress(WireError):
        return bytes(decode_as(data, Join, run_id).peer)
    with contextlib.suppress(WireError):
        return bytes(decode_as(data, Leave, run_id).peer)
    return None
