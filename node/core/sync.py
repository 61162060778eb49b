"""Chain sync: catching up, noticing a fork, and answering other nodes' chain requests.

One rule for live operation, restarts and joins: records fetched from a peer go through the same
validation and the same fork choice as gossiped ones, inside the same bounded window
(``forks.ForkTree``). What this module decides is *what to ask whom, and when*:

* **From the fork point.** A request starts at the root of our window (``max_undo`` rounds
  back), not at our head: a node that holds a different record for a recent round gets the
  winning one with the rest and fork choice moves it over. (Asking from our own round, as the
  first version did, left such a node split for good: it never received the record it lacked.)
* **Whom.** Peers tell us their chain length (hello hints, every response's ``head``); we ask the
  one furthest ahead, another one after a timeout, and keep paging while a page helps.
* **Deeper forks.** When a peer's records do not connect to our window, its chain left ours
  before the root: we look further back in our stored history for the fork point and record the
  peer's vote. Undoing more than ``max_undo`` rounds needs the votes of at least ``resync_votes``
  distinct peers that agree with each other and are a majority of the peers we heard from
  recently, so one hostile peer can never make a node give up its chain. The node then resyncs:
  the driver archives the rounds after the fork point (nothing is deleted) and starts over from
  there, catching up from a checkpoint when it is far behind.

``serve_chain`` is the one place a ChainRequest is answered, from the driver's stored chain
(``History``), with one set of limits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from seedswarm.gossip.wire import (
    MAX_RECORDS_PER_RESPONSE,
    ChainRequest,
    ChainResponse,
    CheckpointManifest,
    Record,
    WireError,
    decode_as,
)

PAGE = 256  # records per request
MAX_RESPONSE_BYTES = (1 << 20) - 4096  # what one response may carry (below the stream frame limit)


class History(Protocol):
    """The driver's persisted chain, read-only (records ``0 .. length() - 1``, no holes)."""

    def length(self) -> int: ...

    def record(self, r: int) -> bytes | None: ...

    def head_at(self, r: int) -> bytes | None:
        """The chain head after ``r`` records (``head_at(0)`` is the genesis head)."""
        ...

    def manifest(self) -> CheckpointManifest | None:
        """The manifest of our newest checkpoint on this chain (None: we serve none)."""
        ...

    def chunk(self, digest: bytes, index: int) -> bytes | None:
        """Chunk ``index`` of a recent checkpoint whose blob hash is ``digest``."""
        ...


class NoHistory:
    """A history that holds nothing (a node that answers from its window only)."""

    def length(self) -> int:
        return 0

    def record(self, r: int) -> bytes | None:
        return None

    def head_at(self, r: int) -> bytes | None:
        return None

    def manifest(self) -> CheckpointManifest | None:
        return None

    def chunk(self, digest: bytes, index: int) -> bytes | None:
        return None


def serve_chain(run_id: bytes, req: ChainRequest, history: History) -> ChainResponse:
    """Records ``req.start ..`` of our stored chain: at most ``PAGE`` and ``MAX_RESPONSE_BYTES``."""
    length = history.length()
    records: list[bytes] = []
    size = 0
    for r in range(req.start, min(length, req.start + min(req.limit, PAGE, MAX_RECORDS_PER_RESPONSE))):
        data = history.record(r)
        if data is None:
            break
        size += len(data) + 8
        if size > MAX_RESPONSE_BYTES:
            break
        records.append(data)
    return ChainResponse(run=run_id, start=req.start, head=length, records=tuple(records))


@dataclass
class SyncConfig:
    sync_after: float = 3.0  # seconds without progress before asking peers for the chain
    request_timeout: float = 5.0  # seconds before a request counts as lost and another peer is asked
    resync_votes: int = 2  # distinct agreeing peers needed to undo beyond max_undo
    vote_ttl: float = 60.0  # seconds a peer's head or deep-fork vote counts


@dataclass
class DeepFork:
    """Peers whose chains leave ours before our window: the fork point and who says so."""

    fork_round: int  # records both chains share
    their_record: bytes  # their record at fork_round (hash), to tell agreeing voters apart
    voters: dict[bytes, float] = field(default_factory=dict)  # peer -> when it voted


@dataclass
class _Ask:
    peer: bytes
    start: int
    sent: float
    deep: bool  # a probe further back, looking for a fork point
    origin: int  # the round whose record did not connect (probes), else start


class ChainSync:
    def __init__(self, run_id: bytes, me: bytes, config: SyncConfig | None = None) -> None:
        self.run_id = run_id
        self.me = me
        self.cfg = config or SyncConfig()
        self.peer_heads: dict[bytes, tuple[int, float]] = {}  # peer -> (chain length, when told)
        self.asks: dict[bytes, _Ask] = {}
        self.last_request = -1e9
        self.forks: dict[bytes, DeepFork] = {}  # their record hash at the fork point -> votes
        self.requests = 0
        self.deep_forks_seen = 0

    # ------------------------------------------------------------------ what peers say
    def hint(self, peer: bytes, length: int, now: float) -> None:
        if peer != self.me:
            self.peer_heads[peer] = (length, now)

    def forget(self, peer: bytes) -> None:
        self.peer_heads.pop(peer, None)
        self.asks.pop(peer, None)

    def best_known(self, now: float) -> int:
        live = [n for n, t in self.peer_heads.values() if now - t <= self.cfg.vote_ttl]
        return max(live, default=0)

    def behind(self, our_length: int, now: float) -> int:
        """Rounds the furthest peer we heard from recently is ahead of us."""
        return max(0, self.best_known(now) - our_length)

    # ------------------------------------------------------------------ asking
    def pick(self, now: float, candidates: Sequence[bytes], exclude: set[bytes]) -> bytes | None:
        """The peer furthest ahead among ``candidates`` (deterministic among equals)."""
        pool = [p for p in candidates if p != self.me and p not in exclude]
        if not pool:
            return None
        self.requests += 1
        ahead = sorted(pool, key=lambda p: -self.peer_heads.get(p, (0, 0.0))[0])
        top = self.peer_heads.get(ahead[0], (0, 0.0))[0]
        best = [p for p in ahead if self.peer_heads.get(p, (0, 0.0))[0] == top]
        return best[(self.requests * 7919) % len(best)]

    def request(self, now: float, peer: bytes, start: int, probe_from: int | None = None) -> ChainRequest:
        """Records from ``start``; a probe (``probe_from`` < start) asks from further back for
        the fork point of a chain that did not connect at ``start``."""
        first = start if probe_from is None else probe_from
        self.asks[peer] = _Ask(peer, first, now, probe_from is not None, start)
        self.last_request = now
        return ChainRequest(run=self.run_id, start=first, limit=min(PAGE, start - first + 1) if probe_from is not None else PAGE)

    def expired(self, now: float) -> list[bytes]:
        """Peers whose request timed out (they are asked no more until they answer something)."""
        gone = [p for p, a in self.asks.items() if now - a.sent > self.cfg.request_timeout]
        for p in gone:
            del self.asks[p]
        return gone

    def outstanding(self) -> bool:
        return bool(self.asks)

    # ------------------------------------------------------------------ answers
    def take(self, peer: bytes | None, resp: ChainResponse) -> _Ask | None:
        """The request this response answers (None: nobody asked this peer for it)."""
        if peer is None:
            return None
        ask = self.asks.get(peer)
        if ask is None or ask.start != resp.start:
            return None
        del self.asks[peer]
        return ask

    @staticmethod
    def decode(resp: ChainResponse, run_id: bytes) -> list[Record]:
        """The response's records, in order; raises WireError on the first bad one."""
        out: list[Record] = []
        for i, data in enumerate(resp.records):
            rec = decode_as(data, Record, run_id)
            if rec.round != resp.start + i:
                raise WireError(f"record {i} of a response from round {resp.start} is for round {rec.round}")
            out.append(rec)
        return out

    @staticmethod
    def fork_point(recs: Sequence[Record], history: History) -> tuple[int, bytes] | None:
        """Where a page of a peer's chain leaves our stored chain: (records both share, hash of
        their record at that round). None when even the page's first record has a parent we do
        not share (the fork is older: look further back)."""
        from seedswarm.node.core.chain import record_hash

        shared: Record | None = None
        for rec in recs:
            if history.head_at(rec.round) != rec.prev:
                break
            shared = rec
        if shared is None:
            return None
        return shared.round, record_hash(shared)

    def vote(self, peer: bytes, fork_round: int, their_record: bytes, now: float) -> DeepFork:
        self.deep_forks_seen += 1
        fk = self.forks.setdefault(their_record, DeepFork(fork_round, their_record))
        fk.voters[peer] = now
        return fk

    def verdict(self, now: float) -> DeepFork | None:
        """A deep fork enough peers agree on to give up our chain after its fork point."""
        recent = {p for p, (_, t) in self.peer_heads.items() if now - t <= self.cfg.vote_ttl}
        for fk in list(self.forks.values()):
            fk.voters = {p: t for p, t in fk.voters.items() if now - t <= self.cfg.vote_ttl}
            if not fk.voters:
                del self.forks[fk.their_record]
                continue
            votes = len(fk.voters)
            if votes >= self.cfg.resync_votes and votes * 2 > len(recent | set(fk.voters)):
                return fk
        return None

    def clear_forks(self) -> None:
        self.forks.clear()
