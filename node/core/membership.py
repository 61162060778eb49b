"""The node core's membership: asking to join (with the join work of an open swarm), leaving,
and the Joins and Leaves other nodes gossip, checked before they take a slot.

A part of :class:`~seedswarm.node.core.protocol.NodeCore` kept in its own file (the rules of
admission and difficulty are in ``admission``; this is where the core applies them).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from seedswarm.crypto.keys import Identity
from seedswarm.gossip.wire import Join, Leave
from seedswarm.node.core.admission import admission_ok, join_bits
from seedswarm.node.core.aggregation import membership_peer
from seedswarm.node.core.chain import ChainState
from seedswarm.node.core.effects import Effect, Publish, Reason, SolveWork
from seedswarm.node.core.genesis import Genesis
from seedswarm.node.core.sync import ChainSync


class _CoreCfg(Protocol):
    auto_join: bool
    rejoin_after: float


class _Core(Protocol):
    """What of the node core the membership code uses."""

    me: bytes
    run_id: bytes
    genesis: Genesis
    identity: Identity
    cfg: _CoreCfg
    sync: ChainSync
    leaving: bool
    joined_announced: bool
    _last_join: float
    _pending_joins: dict[bytes, bytes]

    @property
    def head(self) -> ChainState: ...

    @property
    def round(self) -> int: ...

    @property
    def catching_up(self) -> bool: ...

    def is_member(self) -> bool: ...

    def _off_duty(self) -> bool: ...

    def _count(self, key: str, n: int = 1) -> None: ...

    def reject(self, now: float, peer: bytes | None, reason: Reason, detail: str = "") -> list[Effect]: ...


class MembershipMixin(_Core):
    _my_join: Join | None = None  # the last Join we announced (re-announced while still valid)

    def join(self, now: float, cert: bytes | None = None) -> list[Effect]:
        """Ask to become a member: gossip a signed Join (with the admission certificate of a
        permissioned swarm, or the work an open swarm asks for); aggregators put it in a record."""
        if self.is_member():
            return []
        st = self.head
        self._last_join = now
        mine = self._my_join
        if cert is None and mine is not None and st.round - mine.round <= self.genesis.join_ttl - 2 \
                and admission_ok(self.genesis, self.run_id, self.me, mine.round, mine.cert, st.join_bits):
            # Re-announce the Join we have while records can still take it and its work is still
            # enough: at a raised difficulty, new work every rejoin_after would be minutes wasted.
            self._count("joins.reannounced")
            self._pending_joins[self.me] = mine.encode()
            return [Publish(mine)]
        if cert is None and not self.genesis.admission_key:
            # enough for the difficulty after two more Joins: it may rise before a record takes
            # ours (in a large swarm it does not, and the work is the base cost)
            bits = join_bits(self.genesis, len(st.recent_joins) + 2, len(st.members))
            if bits > 0:
                self._count("joins.work_asked")
                return [SolveWork(st.round, bits)]
            cert = b""
        return self._announce_join(st.round, cert or b"")

    def on_join_work(self, now: float, round_: int, nonce: bytes) -> list[Effect]:
        """The driver's answer to SolveWork: announce the Join, unless it is no longer wanted (a
        member already, leaving) or would expire before a record could take it."""
        if self.is_member() or self.leaving or self.round - round_ > self.genesis.join_ttl - 2:
            self._count("joins.work_stale")
            return []
        return self._announce_join(round_, nonce)

    def _announce_join(self, round_: int, cert: bytes) -> list[Effect]:
        j = Join(run=self.run_id, round=round_, peer=self.me, cert=cert).signed(self.identity)
        self._my_join = j
        self._pending_joins[self.me] = j.encode()
        self.joined_announced = True
        self._count("joins.announced")
        return [Publish(j)]

    def _maybe_join(self, now: float) -> list[Effect]:
        # Only once caught up with a peer: a Join signed at a round far behind the swarm's
        # expires before any record can take it (join_ttl).
        if self._my_join is not None and self.is_member():
            self._my_join = None  # taken: an expelled member must not bring back its old Join
        if not self.cfg.auto_join or self.is_member() or self._off_duty() or self.catching_up \
                or not self.sync.peer_heads or self.sync.behind(self.round, now) > 1:
            return []
        if now - self._last_join < self.cfg.rejoin_after:
            return []
        return self.join(now)

    def leave(self, now: float) -> list[Effect]:
        """Graceful departure: gossip a signed Leave."""
        self.leaving = True
        if not self.is_member():
            return []
        lv = Leave(run=self.run_id, round=self.round, peer=self.me).signed(self.identity)
        return [Publish(lv)]

    def _on_membership(self, now: float, msg: Join | Leave, peer: bytes | None,
                       pending: dict[bytes, bytes]) -> list[Effect]:
        if isinstance(msg, Join) and not admission_ok(self.genesis, self.run_id, msg.peer, msg.round, msg.cert,
                                                      self.head.join_bits):
            # Checked before the signature (one hash) and before the Join takes a slot: keys are
            # free, so they must not be able to fill the bounded pending set.
            return self.reject(now, peer, Reason.NO_ADMISSION, "Join without a valid admission certificate or work")
        if not msg.signature_ok():
            return self.reject(now, peer, Reason.BAD_SIGNATURE, type(msg).__name__)
        if len(pending) >= 4096 and msg.peer not in pending:
            return self.reject(now, peer, Reason.MEMBERSHIP_FLOOD)
        pending[msg.peer] = msg.encode()
        return []

    def _decode_peers(self, entries: Sequence[bytes]) -> list[bytes]:
        return [p for data in entries if (p := membership_peer(data, self.run_id)) is not None]
