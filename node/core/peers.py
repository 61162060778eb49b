"""Peer policy: strikes for bad input, temporary bans, forgiveness; all driven by ``now``.

A hostile peer must cost a counter and a score, never the process, and an honest peer that sent
one stale message must not be cut off. So each rejected input adds its reason's weight to the
peer's strikes; strikes decay (half-life ``forgive_s``), and a peer whose strikes reach
``ban_at`` is banned for ``ban_s`` (doubling for a repeat offender, capped). Inputs that an honest
peer produces in ordinary operation (a contribution that arrived a moment too late, a chain
response that crossed a fork switch) weigh little; forgeries and malformed bytes weigh a lot.

The policy keys peers by their public key (what the core sees); the driver maps keys to
connections and acts on :class:`~seedswarm.node.core.effects.Ban`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from seedswarm.node.core.effects import Ban, Reason

# weight of one rejection, by reason (default 1.0)
WEIGHTS: dict[Reason, float] = {
    Reason.MALFORMED: 3.0,
    Reason.BAD_SIGNATURE: 5.0,
    Reason.WRONG_AGGREGATE: 10.0,
    Reason.BAD_FRAUD_PROOF: 5.0,
    Reason.BAD_INPUTS: 5.0,
    Reason.BAD_CHECKPOINT: 5.0,
    Reason.BAD_CHAIN_RESPONSE: 3.0,
    Reason.NO_ADMISSION: 2.0,
    Reason.WRONG_RUN: 2.0,
    Reason.PROTOCOL_VERSION: 2.0,
    # ordinary in an honest swarm: a message that crossed a round change or a fork switch
    Reason.STALE_CONTRIBUTION: 0.2,
    Reason.FUTURE_CONTRIBUTION: 0.2,
    Reason.WRONG_ROUND: 0.2,
    Reason.WRONG_PARENT: 0.2,
    Reason.UNSOLICITED: 0.5,
    Reason.DEEP_FORK: 0.5,
}


@dataclass
class PolicyConfig:
    ban_at: float = 30.0  # strikes that ban a peer
    ban_s: float = 600.0  # first ban
    max_ban_s: float = 6 * 3600.0
    forgive_s: float = 300.0  # half-life of strikes
    max_peers: int = 65536  # peers tracked at once (the least struck are forgotten first)


@dataclass
class _Peer:
    strikes: float = 0.0
    at: float = 0.0  # time of the last update
    bans: int = 0
    banned_until: float = -math.inf


class PeerPolicy:
    def __init__(self, config: PolicyConfig | None = None) -> None:
        self.cfg = config or PolicyConfig()
        self._peers: dict[bytes, _Peer] = {}
        self.bans_total = 0

    def _decayed(self, p: _Peer, now: float) -> float:
        if now <= p.at:
            return p.strikes
        return p.strikes * 0.5 ** ((now - p.at) / self.cfg.forgive_s)

    def strikes(self, peer: bytes, now: float) -> float:
        p = self._peers.get(peer)
        return 0.0 if p is None else self._decayed(p, now)

    def is_banned(self, peer: bytes | None, now: float) -> bool:
        if peer is None:
            return False
        p = self._peers.get(peer)
        return p is not None and now < p.banned_until

    def banned_until(self, peer: bytes) -> float | None:
        p = self._peers.get(peer)
        return None if p is None or p.banned_until == -math.inf else p.banned_until

    def strike(self, peer: bytes | None, reason: Reason, now: float) -> list[Ban]:
        """Count one rejected input from ``peer``; a Ban effect when it crosses the line."""
        if peer is None:
            return []  # gossip: the forwarder is scored by the transport, not here
        p = self._peers.get(peer)
        if p is None:
            if len(self._peers) >= self.cfg.max_peers:
                self._forget(now)
            p = self._peers[peer] = _Peer(at=now)
        p.strikes = self._decayed(p, now) + WEIGHTS.get(reason, 1.0)
        p.at = now
        if p.strikes < self.cfg.ban_at or now < p.banned_until:
            return []
        duration = min(self.cfg.max_ban_s, self.cfg.ban_s * 2 ** p.bans)
        p.bans += 1
        p.banned_until = now + duration
        p.strikes = 0.0
        self.bans_total += 1
        return [Ban(peer, p.banned_until, p.bans)]

    def _forget(self, now: float) -> None:
        # Keep the banned and the most struck; drop the quietest half.
        order = sorted(self._peers, key=lambda k: (now < self._peers[k].banned_until, self._decayed(self._peers[k], now)))
        for k in order[: len(order) // 2]:
            del self._peers[k]
