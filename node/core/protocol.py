"""The round state machine: sans-IO, fed with messages and time, returning effects.

A :class:`NodeCore` knows nothing of sockets, clocks, threads or tensors. Its inputs are calls
(``start``, ``on_message``, ``on_timer``, ``on_estimate``) that carry the current time; its
outputs are :data:`Effect` values that a driver carries out: gossip a message, send one to a
peer, compute a local estimate, move the model to a new head, note a rejected input. The asyncio
daemon and the virtual-time simulator are two such drivers of this one class.

Heads and forks. The node keeps the states of the last ``max_undo`` rounds and every valid
record on top of them. Its head is the deepest state it can reach; between two records of one
round the one with more contributions wins, then the lower aggregator rank, then the lower hash.
Every node applying this rule to the same records picks the same head, and no node ever undoes
more than ``max_undo`` rounds.

Verification. Every record is checked without its inputs (signatures, ranks, membership). The
trainers of the next round, the nodes that would build on it, fetch the inputs from the record's
aggregator and recompute the aggregate before they contribute. A mismatch is gossiped as a
fraud proof, which makes every node drop the record. Trainers ask the aggregator first, then the
record's other verifiers (any node that checked the inputs serves them), so a crashed aggregator
costs nothing. A record whose inputs nobody shows stays in fork choice (missing data proves
nothing, and local judgements there would split honest nodes), but honest trainers never
contribute on it, so the rounds after it are empty until a proof or the inputs arrive: an
aggregator can delay or omit, never forge, and a withheld record's step is bounded by the
public scale.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

from seedswarm.crypto.keys import Identity
from seedswarm.gossip.wire import (
    ChainRequest,
    ChainResponse,
    Contribution,
    ContributionsRequest,
    ContributionsResponse,
    Equivocation,
    FraudProof,
    Join,
    Leave,
    Message,
    Record,
    WireError,
    decode_as,
)
from seedswarm.node.core.chain import (
    ChainState,
    RecordError,
    admission_ok,
    build_record,
    check_contributions,
    check_record,
    checked_next_state,
    membership_changes,
    ranks_of,
    record_hash,
    validate_contribution,
)
from seedswarm.node.core.codec import quantize
from seedswarm.node.core.genesis import Genesis

log = logging.getLogger("seedswarm.protocol")


# ---------------------------------------------------------------------------------------------
# effects


@dataclass(frozen=True)
class Publish:
    """Gossip to every node of the swarm (records, joins, leaves, fraud proofs)."""

    msg: Message


@dataclass(frozen=True)
class Send:
    """Send to one peer over a direct stream (contributions, requests, responses)."""

    to: bytes
    msg: Message


@dataclass(frozen=True)
class Estimate:
    """Compute the local projected gradients on these direction streams, then call on_estimate."""

    round: int
    head: bytes
    streams: tuple[int, ...]


@dataclass(frozen=True)
class Apply:
    """Move the model: start from the parameters of ``base`` and apply ``steps`` in order.

    ``base`` is the current head in the common case (one step); after a fork switch it is the
    common ancestor, whose parameters the driver kept (at most ``max_undo`` rounds back).
    """

    base: ChainState
    steps: tuple[tuple[ChainState, Record], ...]  # (state before the record, record)
    head: ChainState


@dataclass(frozen=True)
class Rejected:
    """Bad input from a peer: count it, log it once, down-score the peer."""

    peer: bytes | None
    reason: str
    detail: str = ""


Effect = Publish | Send | Estimate | Apply | Rejected


@dataclass
class CoreConfig:
    max_undo: int = 4  # rounds a node may have to undo on a fork switch
    sync_after: float = 3.0  # seconds without progress before asking peers for the chain
    verify_timeout: float = 2.0  # seconds a trainer waits for a record's inputs from one source
    verify_sources: int = 8  # sources a trainer asks, one after the other, before it gives up
    keep_inputs: int = 8  # rounds of record inputs an aggregator keeps to serve verifiers
    max_future: int = 64  # buffered messages for rounds ahead of ours
    fallback_ranks: int = 64  # aggregator ranks that step in, one timeout apart, if all before are silent
    halt_at: int = 0  # take no duties from this round on (0: never); a launcher ends a run on one head


@dataclass
class _Candidate:
    rec: Record
    parent: ChainState
    state: ChainState


@dataclass
class _Aggregation:
    """An aggregator's collection for one round."""

    state: ChainState
    rank: int
    started: float
    got: dict[bytes, Contribution] = field(default_factory=dict)
    evidence: dict[bytes, bytes] = field(default_factory=dict)
    published: bool = False


@functools.lru_cache(maxsize=4096)
def _membership_peer(data: bytes, run_id: bytes) -> bytes | None:
    """The peer a record's Join or Leave entry is about (a pure function of the bytes, so it is
    shared by every core in a process)."""
    with contextlib.suppress(WireError):
        return bytes(decode_as(data, Join, run_id).peer)
    with contextlib.suppress(WireError):
        return bytes(decode_as(data, Leave, run_id).peer)
    return None


class NodeCore:
    """One node's protocol state. Pure: every output is a returned effect."""

    def __init__(
        self,
        genesis: Genesis,
        identity: Identity,
        config: CoreConfig | None = None,
        base: ChainState | None = None,
    ) -> None:
        self.genesis = genesis
        self.identity = identity
        self.me = identity.public
        self.cfg = config or CoreConfig()
        root = base or ChainState.initial(genesis)
        self.run_id = root.run_id
        self.head: ChainState = root
        self._states: dict[bytes, ChainState] = {root.head: root}  # recent states by head hash
        self._seen_at: dict[bytes, float] = {}  # state head -> when this node first had it
        self._held: dict[bytes, tuple[float, Record, bytes | None]] = {}  # fallback records not yet due
        self._children: dict[bytes, dict[bytes, _Candidate]] = {}  # parent head -> record hash -> candidate
        self._cand: dict[bytes, _Candidate] = {}  # record hash (= child head) -> candidate
        self._bad: set[bytes] = set()  # records proven or found invalid
        # record hash -> (time we last asked for its inputs, how many sources we asked)
        self._unverified: dict[bytes, tuple[float, int]] = {}
        self._verified: set[bytes] = set()
        self._agg: dict[int, _Aggregation] = {}
        self._inputs: OrderedDict[bytes, tuple[int, list[bytes]]] = OrderedDict()  # record hash -> inputs
        self._pending_joins: dict[bytes, bytes] = {}
        self._pending_leaves: dict[bytes, bytes] = {}
        self._future: list[tuple[bytes | None, Message]] = []
        self._estimating: tuple[int, bytes] | None = None
        self._contributed: set[int] = set()
        self._mine: tuple[Contribution, int] | None = None  # our contribution of this round, ranks sent
        self._round_started = 0.0
        self._last_progress = 0.0
        self._last_sync = -1e9
        self._quorum_times: list[float] = []
        self.joined_announced = False
        self.leaving = False
        self.counters: dict[str, int] = {}

    # ------------------------------------------------------------------ helpers
    def _count(self, key: str, n: int = 1) -> None:
        self.counters[key] = self.counters.get(key, 0) + n

    def _reject(self, peer: bytes | None, reason: str, detail: str = "") -> list[Effect]:
        self._count(f"rejected.{reason}")
        return [Rejected(peer, reason, detail)]

    @property
    def round(self) -> int:
        return self.head.round

    def is_member(self) -> bool:
        return self.me in self.head.members

    def deadline(self) -> float:
        """Adaptive aggregation deadline: twice the recent median time to quorum, within bounds."""
        g = self.genesis
        if not self._quorum_times:
            return g.round_timeout
        recent = sorted(self._quorum_times[-16:])
        return min(g.round_timeout, max(g.min_round_time, 2.0 * recent[len(recent) // 2]))

    # ------------------------------------------------------------------ inputs
    def start(self, now: float) -> list[Effect]:
        self._last_progress = now
        self._seen_at.setdefault(self.head.head, now)
        return self._enter_round(now)

    def join(self, now: float, cert: bytes = b"") -> list[Effect]:
        """Ask to become a member (gossip a signed Join; aggregators put it in a record)."""
        if self.is_member():
            return []
        j = Join(run=self.run_id, round=self.round, peer=self.me, cert=cert).signed(self.identity)
        self._pending_joins[self.me] = j.encode()
        self.joined_announced = True
        return [Publish(j)]

    def leave(self, now: float) -> list[Effect]:
        """Graceful departure: gossip a signed Leave."""
        self.leaving = True
        if not self.is_member():
            return []
        lv = Leave(run=self.run_id, round=self.round, peer=self.me).signed(self.identity)
        return [Publish(lv)]

    def on_message(self, now: float, msg: Message, peer: bytes | None = None) -> list[Effect]:
        """A decoded message from ``peer`` (None: arrived by gossip, origin unknown)."""
        if msg.run != self.run_id:
            return self._reject(peer, "wrong-run")
        if isinstance(msg, Record):
            return self._on_record(now, msg, peer)
        if isinstance(msg, Contribution):
            return self._on_contribution(now, msg, peer)
        if isinstance(msg, Join):
            return self._on_membership(msg, peer, self._pending_joins)
        if isinstance(msg, Leave):
            return self._on_membership(msg, peer, self._pending_leaves)
        if isinstance(msg, ContributionsRequest):
            return self._on_inputs_request(msg, peer)
        if isinstance(msg, ContributionsResponse):
            return self._on_inputs(now, msg, peer)
        if isinstance(msg, FraudProof):
            return self._on_fraud_proof(now, msg, peer)
        if isinstance(msg, ChainRequest):
            return self._on_chain_request(msg, peer)
        if isinstance(msg, ChainResponse):
            return self._on_chain_response(now, msg, peer)
        return []  # heartbeats and checkpoint traffic are the driver's business

    def on_timer(self, now: float) -> list[Effect]:
        out: list[Effect] = []
        for rh, (release, rec, peer) in sorted(self._held.items(), key=lambda kv: kv[1][0]):
            if release <= now:
                del self._held[rh]
                out += self._on_record(now, rec, peer)
        if self._mine is not None and self._mine[0].round == self.round:
            # No record yet: the aggregators before this rank look silent; try the next one.
            c, sent = self._mine
            due = int((now - self._round_started) / self.genesis.round_timeout)
            if due > sent:
                self._mine = (c, due)
                out += self._send_contribution(now, c, due)
        for agg in list(self._agg.values()):
            out += self._maybe_publish(now, agg)
        for rh, (asked, tries) in list(self._unverified.items()):
            if now - asked > self.cfg.verify_timeout:
                # No answer: ask the next source. Not having the inputs proves nothing (the
                # aggregator may just have crashed), so it never enters fork choice: a local,
                # unprovable judgement there would split honest nodes onto different heads.
                # We only withhold our own contribution until some source shows them.
                out += self._ask_inputs(now, rh, tries)
        if now - self._last_progress > self.cfg.sync_after and now - self._last_sync > self.cfg.sync_after:
            self._last_sync = now
            out += self._sync_request()
        return out

    def next_wakeup(self, now: float) -> float:
        """When the driver should call on_timer next (it may call earlier)."""
        # Exactly the moments on_timer acts on, so a node without duties sleeps until its sync
        # check: in a large swarm almost every node is idle in almost every round.
        cfg = self.cfg
        if now - self._last_progress > cfg.sync_after:
            t = self._last_sync + cfg.sync_after
        else:
            t = self._last_progress + cfg.sync_after + 1e-6
        if self._mine is not None and self._mine[0].round == self.round:
            t = min(t, self._round_started + (self._mine[1] + 1) * self.genesis.round_timeout + 1e-6)
        for agg in self._agg.values():
            if not agg.published:
                t = min(t, agg.started + self._publish_delay(agg) + 1e-6)
        for asked, _ in self._unverified.values():
            t = min(t, asked + cfg.verify_timeout + 1e-6)
        for release, _, _ in self._held.values():
            t = min(t, release + 1e-6)
        return max(t, now + 1e-3)  # always strictly later: a driver can never spin in place

    def on_estimate(self, now: float, round_: int, head: bytes, values: Sequence[float]) -> list[Effect]:
        """The driver's answer to an Estimate effect: quantise, sign, send to the aggregators."""
        self._estimating = None
        if head != self.head.head or round_ != self.round or round_ in self._contributed:
            self._count("estimates.stale")
            return []
        q = quantize(values, self.head.scale)
        c = Contribution(run=self.run_id, round=round_, peer=self.me, q=q).signed(self.identity)
        self._contributed.add(round_)
        self._mine = (c, 0)
        return self._send_contribution(now, c, 0)

    def _send_contribution(self, now: float, c: Contribution, rank: int) -> list[Effect]:
        """One copy to the aggregator of this rank: a trainer's bytes per round stay ~K + 140."""
        aggs = self.head.committee.aggregators
        if rank >= len(aggs):
            return []
        self._count("contributions.sent")
        if aggs[rank] == self.me:
            return self._on_contribution(now, c, self.me)
        return [Send(aggs[rank], c)]

    # ------------------------------------------------------------------ rounds
    def _enter_round(self, now: float) -> list[Effect]:
        """Called whenever the head changes: take up this round's duties."""
        st = self.head
        self._round_started = now
        self._last_progress = now
        out: list[Effect] = []
        for r in [r for r, a in self._agg.items() if a.state is not st]:
            del self._agg[r]
        if self.leaving or (self.cfg.halt_at and st.round >= self.cfg.halt_at):
            return out  # no duties; the node still follows, serves and verifies the chain
        my_rank = st.aggregator_rank(self.me) if self.me in st.members else None
        if my_rank is not None and my_rank < self.cfg.fallback_ranks and st.round not in self._agg:
            self._agg[st.round] = _Aggregation(st, my_rank, now)
        rank = st.trainer_rank.get(self.me)
        if rank is not None and st.round not in self._contributed:
            out += self._maybe_estimate(now)
        out += self._replay_future(now)
        return out

    def _maybe_estimate(self, now: float) -> list[Effect]:
        st = self.head
        rank = st.trainer_rank.get(self.me)
        if rank is None or self._estimating == (st.round, st.head) or st.round in self._contributed:
            return []
        # Build only on a record whose inputs we checked (or on genesis / an empty record).
        cand = self._record_of(st)
        if cand is not None and ranks_of(cand.rec.contributors):
            rh = st.head
            if rh not in self._verified:
                if rh not in self._unverified:
                    return self._ask_inputs(now, rh, 0)
                return []
        self._estimating = (st.round, st.head)
        return [Estimate(st.round, st.head, tuple(st.streams(st.group_of(rank))))]

    def _ask_inputs(self, now: float, rh: bytes, tries: int) -> list[Effect]:
        """Ask source number ``tries`` for a record's inputs: its aggregator first, then the
        nodes that must have checked them (this round's trainers, who verify before they build),
        then other members. Any of them can answer: a response is checked against the record's
        commitment, so it does not matter who sends it."""
        cand = self._cand.get(rh)
        if cand is None or tries >= self.cfg.verify_sources:
            self._unverified.pop(rh, None)
            if cand is not None:
                self._count("records.unverifiable")  # we stay on it, but never contribute on it
            return []
        sources = [cand.rec.aggregator]
        sources += [p for p in cand.state.committee.trainers if p not in sources]
        rest = [p for p in cand.state.members if p not in sources]
        sources += rest[: self.cfg.verify_sources]
        sources = [p for p in sources if p != self.me]
        if tries >= len(sources):
            self._unverified.pop(rh, None)
            self._count("records.unverifiable")
            return []
        self._unverified[rh] = (now, tries + 1)
        if tries:
            self._count("inputs.retries")
        return [Send(sources[tries], ContributionsRequest(run=self.run_id, round=cand.rec.round, record=rh))]

    def _record_of(self, st: ChainState) -> _Candidate | None:
        return self._cand.get(st.head)

    # ------------------------------------------------------------------ aggregation
    def _on_contribution(self, now: float, c: Contribution, peer: bytes | None) -> list[Effect]:
        if c.round > self.round:
            return self._buffer_future(peer, c)
        agg = self._agg.get(c.round)
        if agg is None or agg.published:
            self._count("contributions.ignored")  # not our duty, or too late: not an attack
            return []
        try:
            validate_contribution(agg.state, c)
        except RecordError as e:
            return self._reject(peer, e.reason, str(e))
        prev = agg.got.get(c.peer)
        if prev is not None:
            if prev.q != c.q and c.peer not in agg.evidence:
                ev = Equivocation(run=self.run_id, a=prev.encode(), b=c.encode())
                agg.evidence[c.peer] = ev.encode()
                self._count("equivocations")
            return []
        if c.peer in agg.evidence:
            return []
        agg.got[c.peer] = c
        quorum = self._quorum_count(agg.state)
        if len(agg.got) == quorum and any(p != self.me for p in agg.got):
            # Only quorums that crossed the network teach the deadline: a node that trained
            # alone would learn a deadline of microseconds and shut out the first joiner.
            self._quorum_times.append(now - agg.started)
        return self._maybe_publish(now, agg)

    def _quorum_count(self, st: ChainState) -> int:
        n = len(st.committee.trainers)
        return max(1, -(-int(n * self.genesis.quorum * 1000) // 1000))

    def _publish_delay(self, agg: _Aggregation) -> float:
        # Rank 0 waits the adaptive deadline. Rank j >= 1 steps in at (j + 0.5) timeouts: trainers
        # re-send to rank j at j timeouts, so it has their inputs by then.
        if agg.rank == 0:
            return self.deadline()
        return (agg.rank + 0.5) * self.genesis.round_timeout

    def _maybe_publish(self, now: float, agg: _Aggregation) -> list[Effect]:
        if agg.published or agg.state is not self.head:
            return []
        st = agg.state
        # an equivocator is in both maps (its first copy in got): count peers, not entries, or
        # rank 0 publishes one honest contribution early for every equivocator
        everyone = len(agg.got.keys() | agg.evidence.keys()) >= len(st.committee.trainers)
        waited = now - agg.started
        if not (everyone and agg.rank == 0) and waited < self._publish_delay(agg):
            return []
        contribs = [c for p, c in agg.got.items() if p not in agg.evidence]
        joins = self._valid_pending(st, self._pending_joins, Join)
        leaves = self._valid_pending(st, self._pending_leaves, Leave)
        rec, inputs = build_record(st, self.identity, contribs, joins, leaves, list(agg.evidence.values()))
        agg.published = True
        rh = record_hash(rec)
        self._inputs[rh] = (rec.round, inputs)
        while len(self._inputs) > self.cfg.keep_inputs:
            self._inputs.popitem(last=False)
        self._verified.add(rh)
        self._count("records.published")
        return [Publish(rec), *self._on_record(now, rec, self.me)]

    def _valid_pending(self, st: ChainState, pending: dict[bytes, bytes], cls: type) -> list[bytes]:
        out: list[bytes] = []
        for peer, data in list(pending.items()):
            if len(out) >= 64:
                break
            probe = Record(run=st.run_id, round=st.round, joins=(data,) if cls is Join else (),
                           leaves=(data,) if cls is Leave else ())
            try:
                membership_changes(st, probe)
            except RecordError:
                del pending[peer]  # expired, already applied, or invalid now
                continue
            out.append(data)
        return out

    def _on_membership(self, msg: Join | Leave, peer: bytes | None, pending: dict[bytes, bytes]) -> list[Effect]:
        if not msg.signature_ok():
            return self._reject(peer, "bad-signature", type(msg).__name__)
        if isinstance(msg, Join) and not admission_ok(self.genesis, self.run_id, msg.peer, msg.cert):
            # Checked before the Join takes a slot: uncertified keys are free, so in a
            # permissioned swarm they must not be able to fill the bounded pending set.
            return self._reject(peer, "no-admission", "Join without a valid admission certificate")
        if len(pending) >= 4096 and msg.peer not in pending:
            return self._reject(peer, "membership-flood")
        pending[msg.peer] = msg.encode()
        return []

    # ------------------------------------------------------------------ records and heads
    def _on_record(self, now: float, rec: Record, peer: bytes | None) -> list[Effect]:
        rh = record_hash(rec)
        if rh in self._bad:
            return []
        parent = self._states.get(rec.prev)
        if parent is None:
            if rec.round > self.round:
                out = self._buffer_future(peer, rec)
                if now - self._last_sync > self.cfg.sync_after / 4:
                    self._last_sync = now
                    out += self._sync_request()
                return out
            return []  # on a fork we pruned, or older than our undo window
        kids = self._children.setdefault(rec.prev, {})
        if rh in kids or rh in self._held:
            return []
        try:
            child = checked_next_state(parent, rec)
        except RecordError as e:
            return self._reject(peer, e.reason, str(e))
        rank = parent.aggregator_rank(rec.aggregator) or 0
        if rank >= self.cfg.fallback_ranks:
            return self._reject(peer, "aggregator-rank", f"rank {rank} never aggregates")
        release = self._seen_at.get(parent.head, now) + rank * self.genesis.round_timeout
        if now < release and len(self._held) < self.cfg.max_future:
            # A fallback aggregator of rank j may only step in after j timeouts (that is when
            # trainers turn to it). Records carry no time, so each node enforces it on its own
            # clock: the record waits, unseen by fork choice, until j timeouts after this node
            # reached its parent. An honest one arrives later than that anyway; a rushed one
            # loses to the round's rank-0 record, and a chain of them grows at most one round
            # per timeout.
            self._held[rh] = (release, rec, peer)
            self._count("records.held")
            return []
        return self._admit(now, rh, rec, parent, child)

    def _admit(self, now: float, rh: bytes, rec: Record, parent: ChainState, child: ChainState) -> list[Effect]:
        kids = self._children.setdefault(rec.prev, {})
        kids[rh] = self._cand[rh] = _Candidate(rec, parent, child)
        self._states[rh] = child
        self._seen_at.setdefault(rh, now)
        self._count("records.accepted")
        for p in [*(self._decode_peers(rec.joins)), *(self._decode_peers(rec.leaves))]:
            self._pending_joins.pop(p, None)
            self._pending_leaves.pop(p, None)
        return self._choose_head(now)

    def _decode_peers(self, entries: Sequence[bytes]) -> list[bytes]:
        return [p for data in entries if (p := _membership_peer(data, self.run_id)) is not None]

    @staticmethod
    def _quality(c: _Candidate) -> tuple[int, int, bytes]:
        rank = c.parent.aggregator_rank(c.rec.aggregator)
        return (-len(ranks_of(c.rec.contributors)), rank if rank is not None else 1 << 30, c.state.head)

    def _best_tip(self, st: ChainState) -> tuple[int, list[_Candidate]]:
        """Deepest reachable tip from st; ties broken by record quality at the first fork."""
        kids = [c for h, c in self._children.get(st.head, {}).items() if h not in self._bad]
        if not kids:
            return st.round, []
        best: tuple[int, tuple[int, int, bytes], list[_Candidate]] | None = None
        for c in kids:
            depth, path = self._best_tip(c.state)
            key = (depth, self._quality(c), [c, *path])
            if best is None or key[0] > best[0] or (key[0] == best[0] and key[1] < best[1]):
                best = key
        assert best is not None
        return best[0], best[2]

    def _root(self) -> ChainState:
        """The oldest state we keep: nothing before it can change."""
        st = self.head
        while st.round > 0 and self.head.round - st.round < self.cfg.max_undo:
            cand = self._record_of(st)
            if cand is None:
                break
            st = cand.parent
        return st

    def _choose_head(self, now: float) -> list[Effect]:
        root = self._root()
        _, path = self._best_tip(root)
        new_head = path[-1].state if path else root
        if new_head is self.head:
            return []
        # steps from the common ancestor of the current head and the new one
        old_chain = {c.state.head for c in self._path_to(root, self.head)}
        old_chain.add(root.head)
        i = 0
        while i < len(path) and path[i].state.head in old_chain:
            i += 1
        base = path[i - 1].state if i > 0 else root
        steps = tuple((c.parent, c.rec) for c in path[i:])
        if base is not self.head:
            self._count("heads.switched")
        self.head = new_head
        self._count("records.applied", len(steps))
        self._prune()
        return [Apply(base, steps, new_head), *self._enter_round(now)]

    def _path_to(self, root: ChainState, st: ChainState) -> list[_Candidate]:
        path: list[_Candidate] = []
        while st.head != root.head:
            cand = self._record_of(st)
            if cand is None:
                break
            path.append(cand)
            st = cand.parent
        return path[::-1]

    def _prune(self) -> None:
        root = self._root()
        keep = {root.head}
        frontier = [root.head]
        while frontier:
            h = frontier.pop()
            for rh in self._children.get(h, {}):
                keep.add(rh)
                frontier.append(rh)
        for h in [h for h in self._states if h not in keep]:
            del self._states[h]
            self._seen_at.pop(h, None)
            self._children.pop(h, None)
            self._cand.pop(h, None)
        self._bad = {h for h in self._bad if h in keep} if len(self._bad) > 1024 else self._bad
        self._verified = {h for h in self._verified if h in keep}

    def _buffer_future(self, peer: bytes | None, msg: Message) -> list[Effect]:
        if len(self._future) >= self.cfg.max_future:
            self._future.pop(0)
        self._future.append((peer, msg))
        return []

    def _replay_future(self, now: float) -> list[Effect]:
        if not self._future:
            return []
        ready = [(p, m) for p, m in self._future if getattr(m, "round", 0) <= self.round]
        self._future = [(p, m) for p, m in self._future if getattr(m, "round", 0) > self.round]
        out: list[Effect] = []
        for p, m in ready:
            out += self.on_message(now, m, p)
        return out

    # ------------------------------------------------------------------ verification
    def _on_inputs_request(self, msg: ContributionsRequest, peer: bytes | None) -> list[Effect]:
        if peer is None:
            return []
        entry = self._inputs.get(msg.record)
        if entry is None:
            self._count("inputs.unavailable")
            return []
        return [Send(peer, ContributionsResponse(run=self.run_id, round=entry[0], record=msg.record,
                                                 contributions=tuple(entry[1])))]

    def _on_inputs(self, now: float, msg: ContributionsResponse, peer: bytes | None) -> list[Effect]:
        rh = msg.record
        if rh not in self._unverified:
            return []
        cand = self._cand.get(rh)
        if cand is None:
            return []
        asked = self._unverified.pop(rh)
        try:
            check_contributions(cand.parent, cand.rec, msg.contributions)
        except RecordError as e:
            if e.reason == "wrong-aggregate":
                # Provable: the signed inputs match the record's commitment but not its aggregate.
                self._bad.add(rh)
                self._count("fraud.detected")
                proof = FraudProof(run=self.run_id, record=cand.rec.encode(), contributions=msg.contributions)
                return [Publish(proof), *self._reject(peer, e.reason, str(e)), *self._choose_head(now)]
            # Inputs that do not match the commitment prove nothing about the record (the
            # sender lied, not the aggregator): ask the next source, do not build on it meanwhile.
            return self._reject(peer, e.reason, str(e)) + self._ask_inputs(now, rh, asked[1])
        self._verified.add(rh)
        self._inputs[rh] = (cand.rec.round, list(msg.contributions))
        while len(self._inputs) > self.cfg.keep_inputs:
            self._inputs.popitem(last=False)
        return self._maybe_estimate(now)

    def _on_fraud_proof(self, now: float, msg: FraudProof, peer: bytes | None) -> list[Effect]:
        try:
            rec = decode_as(msg.record, Record, self.run_id)
        except WireError as e:
            return self._reject(peer, "bad-fraud-proof", str(e))
        rh = record_hash(rec)
        if rh in self._bad:
            return []
        parent = self._states.get(rec.prev)
        if parent is None:
            return []
        try:
            check_record(parent, rec)
        except RecordError:
            self._bad.add(rh)  # invalid anyway
            return self._choose_head(now)
        try:
            check_contributions(parent, rec, msg.contributions)
        except RecordError as e:
            if e.reason != "wrong-aggregate":
                return self._reject(peer, "bad-fraud-proof", str(e))
            self._bad.add(rh)
            self._count("fraud.accepted")
            return [Publish(msg), *self._choose_head(now)]
        return self._reject(peer, "bad-fraud-proof", "the record's aggregate is correct")

    # ------------------------------------------------------------------ sync
    def _sync_request(self) -> list[Effect]:
        self._count("sync.requests")
        peers = [p for p in self.head.members if p != self.me]
        if not peers:
            return []
        # Deterministic choice among members (a driver may redirect to any connected peer).
        target = peers[(self.counters["sync.requests"] * 7919) % len(peers)]
        return [Send(target, ChainRequest(run=self.run_id, start=self.round, limit=256))]

    def _on_chain_request(self, msg: ChainRequest, peer: bytes | None) -> list[Effect]:
        # The driver answers from its store; the core answers from its window (enough for peers
        # that are a few rounds behind, which is the common case after a lost gossip message).
        if peer is None:
            return []
        recs = [c.rec.encode() for c in self._path_to(self._root(), self.head) if c.rec.round >= msg.start]
        return [Send(peer, ChainResponse(run=self.run_id, start=msg.start, head=self.round,
                                          records=tuple(recs[: min(msg.limit, 1024)])))]

    def _on_chain_response(self, now: float, msg: ChainResponse, peer: bytes | None) -> list[Effect]:
        out: list[Effect] = []
        for data in msg.records:
            try:
                rec = decode_as(data, Record, self.run_id)
            except WireError as e:
                return out + self._reject(peer, "bad-chain-response", str(e))
            out += self._on_record(now, rec, peer)
        return out
