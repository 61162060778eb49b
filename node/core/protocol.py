"""The node's protocol state machine: sans-IO, fed with messages and time, returning effects.

A :class:`NodeCore` knows nothing of sockets, clocks, threads or tensors. Its inputs are calls
(``start``, ``on_message``, ``on_timer``, ``on_estimate``, ``on_peer``, ``reject``) that carry the
current time; its outputs are effects (``effects.py``) that a driver carries out. The asyncio
daemon and the virtual-time simulator are two such drivers of this one class, so what the
simulator shows (rounds, joins, syncs, forks, bans) is what the network does.

The pieces it composes, one concern each: rounds and aggregation (here), fork choice
(``forks``), verification of records (``verify``), chain sync (``sync``), checkpoint download
when joining far behind (``joinplan``, driven from ``syncing``), joining and leaving
(``membership``), peer policy (``peers``), admission (``admission``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from seedswarm.crypto.keys import Identity
from seedswarm.gossip.wire import (
    ChainRequest,
    ChainResponse,
    CheckpointChunk,
    CheckpointManifest,
    CheckpointRequest,
    Contribution,
    ContributionsRequest,
    ContributionsResponse,
    FraudProof,
    Join,
    Leave,
    Message,
    Record,
)
from seedswarm.node.core.aggregation import Aggregation, Deadline, pending_entries
from seedswarm.node.core.chain import (
    ChainState,
    RecordError,
    build_record,
    checked_next_state,
    ranks_of,
    record_hash,
)
from seedswarm.node.core.codec import quantize
from seedswarm.node.core.effects import (
    Apply,
    Effect,
    Estimate,
    Notice,
    Publish,
    Reason,
    Rejected,
    Reply,
    Send,
)
from seedswarm.node.core.forks import ForkTree
from seedswarm.node.core.genesis import Genesis
from seedswarm.node.core.joinplan import PlanConfig
from seedswarm.node.core.membership import MembershipMixin
from seedswarm.node.core.peers import PeerPolicy, PolicyConfig
from seedswarm.node.core.sync import ChainSync, History, NoHistory, SyncConfig, serve_chain
from seedswarm.node.core.syncing import SyncMixin
from seedswarm.node.core.verify import Verifier, VerifyConfig

__all__ = ["CoreConfig", "NodeCore"]

log = logging.getLogger("seedswarm.protocol")


@dataclass
class CoreConfig:
    max_undo: int = 4  # rounds a node may have to undo on a fork switch
    sync_after: float = 3.0  # seconds without progress before asking peers for the chain
    request_timeout: float = 5.0  # seconds before a chain request is given up on a peer
    resync_votes: int = 2  # agreeing peers needed to give up our chain beyond max_undo
    verify_timeout: float = 2.0  # seconds a trainer waits for a record's inputs from one source
    verify_sources: int = 8  # sources a trainer asks, one after the other, before it gives up
    keep_inputs: int = 8  # rounds of record inputs an aggregator keeps to serve verifiers
    max_future: int = 64  # buffered messages for rounds ahead of ours
    fallback_ranks: int = 64  # aggregator ranks that step in, one timeout apart, if all before are silent
    halt_at: int = 0  # take no duties from this round on (0: never); a launcher ends a run on one head
    auto_join: bool = False  # announce a Join once caught up, and again every rejoin_after until admitted
    rejoin_after: float = 10.0
    checkpoint_gap: int = 0  # rounds behind beyond which a joiner fetches a checkpoint (0: replay)
    model_round: int = 0  # the round the driver's model starts from without a checkpoint
    startup_wait: float = 0.0  # seconds off duty after start unless a peer's chain arrives first
    policy: PolicyConfig = field(default_factory=PolicyConfig)


class NodeCore(MembershipMixin, SyncMixin):
    """One node's protocol state. Pure: every output is a returned effect."""

    def __init__(self, genesis: Genesis, identity: Identity, config: CoreConfig | None = None,
                 base: ChainState | None = None, history: History | None = None) -> None:
        self.genesis = genesis
        self.identity = identity
        self.me = identity.public
        self.cfg = cfg = config or CoreConfig()
        root = base or ChainState.initial(genesis)
        self.run_id = root.run_id
        self.history: History = history or NoHistory()
        self.tree = ForkTree(root, cfg.max_undo)
        self.verifier = Verifier(self.me, self.run_id, self.tree, self._count,
                                 VerifyConfig(cfg.verify_timeout, cfg.verify_sources, cfg.keep_inputs))
        self.sync = ChainSync(self.run_id, self.me, SyncConfig(cfg.sync_after, cfg.request_timeout, cfg.resync_votes))
        self.policy = PeerPolicy(cfg.policy)
        self.plan = None
        self._plan_cfg = PlanConfig(gap=cfg.checkpoint_gap)
        self._held: dict[bytes, tuple[float, Record, bytes | None]] = {}  # fallback records not yet due
        self._agg: dict[int, Aggregation] = {}
        self._pending_joins: dict[bytes, bytes] = {}
        self._pending_leaves: dict[bytes, bytes] = {}
        self._future: list[tuple[bytes | None, Message]] = []
        self._estimating: tuple[int, bytes] | None = None
        self._contributed: set[int] = set()
        self._mine: tuple[Contribution, int] | None = None  # our contribution of this round, ranks sent
        self._round_started = 0.0
        self._last_progress = 0.0
        self._last_join = -1e18
        self._paging = False  # the last chain response advanced us by a full page: more follows
        self._waiting = cfg.startup_wait > 0  # just started: no duties before we heard the swarm
        self._quiet_until = 0.0
        self._deadline = Deadline(genesis)
        self.joined_announced = False
        self.leaving = False
        self.counters: dict[str, int] = {}

    # ------------------------------------------------------------------ helpers
    def _count(self, key: str, n: int = 1) -> None:
        self.counters[key] = self.counters.get(key, 0) + n

    def reject(self, now: float, peer: bytes | None, reason: Reason, detail: str = "") -> list[Effect]:
        """Count a bad input and strike its sender (drivers call this for what they refuse)."""
        self._count(f"rejected.{reason}")
        return [Rejected(peer, reason, detail), *self.policy.strike(peer, reason, now)]

    def is_banned(self, peer: bytes | None, now: float) -> bool:
        return self.policy.is_banned(peer, now)

    @property
    def head(self) -> ChainState:
        return self.tree.head

    @property
    def round(self) -> int:
        return self.tree.head.round

    def is_member(self) -> bool:
        return self.me in self.head.members

    @property
    def catching_up(self) -> bool:
        """A checkpoint download is under way: the driver may persist records and defer the model."""
        return self.plan is not None and not self.plan.done

    def _off_duty(self) -> bool:
        # Waiting for manifests is no reason to stop working (a peer may claim a chain it does
        # not have); paging through records, or fetching a chosen checkpoint, is.
        downloading = self.catching_up and self.plan is not None and self.plan.manifest is not None
        return self.leaving or self._halted() or self._paging or self._waiting or downloading

    def in_sync(self, now: float) -> bool:
        """Caught up with every peer we heard from, model in hand, past the startup wait."""
        return not (self._paging or self._waiting or self.catching_up) and self.sync.behind(self.round, now) <= 1

    def _end_wait(self, now: float) -> list[Effect]:
        if not self._waiting:
            return []
        self._waiting = False
        return self._enter_round(now)

    def deadline(self) -> float:
        """Adaptive aggregation deadline: twice the recent median time to quorum, within bounds."""
        return self._deadline.value()

    def keep_inputs(self, rh: bytes, round_: int, inputs: list[bytes]) -> None:
        """Serve these inputs of a record to verifiers (what an aggregator keeps of its own)."""
        self.verifier.keep(rh, round_, inputs)

    def inputs_of(self, rh: bytes) -> list[bytes] | None:
        entry = self.verifier.inputs.get(rh)
        return None if entry is None else entry[1]

    # ------------------------------------------------------------------ inputs
    def start(self, now: float) -> list[Effect]:
        self._last_progress = now
        self._quiet_until = now + self.cfg.startup_wait
        self.tree.seen_at.setdefault(self.head.head, now)
        return self._enter_round(now) + self._maybe_join(now)

    def on_message(self, now: float, msg: Message, peer: bytes | None = None) -> list[Effect]:
        """A decoded message from ``peer`` (None: arrived by gossip, origin unknown)."""
        if peer is not None and self.policy.is_banned(peer, now):
            self._count("banned.dropped")
            return []
        if msg.run != self.run_id:
            return self.reject(now, peer, Reason.WRONG_RUN)
        if isinstance(msg, Record):
            return self._on_record(now, msg, peer)
        if isinstance(msg, Contribution):
            return self._on_contribution(now, msg, peer)
        if isinstance(msg, Join):
            return self._on_membership(now, msg, peer, self._pending_joins)
        if isinstance(msg, Leave):
            return self._on_membership(now, msg, peer, self._pending_leaves)
        if isinstance(msg, FraudProof):
            return self._on_fraud_proof(now, msg, peer)
        if peer is None:
            return []  # requests and responses come over direct streams only
        if isinstance(msg, ContributionsRequest):
            resp = self.verifier.serve(msg)
            return [] if resp is None else [Reply(peer, msg, resp)]
        if isinstance(msg, ContributionsResponse):
            return self._on_inputs(now, msg, peer)
        if isinstance(msg, ChainRequest):
            return [Reply(peer, msg, serve_chain(self.run_id, msg, self.history))]
        if isinstance(msg, ChainResponse):
            return self._on_chain_response(now, msg, peer)
        if isinstance(msg, CheckpointRequest):
            return self._serve_checkpoint(msg, peer)
        if isinstance(msg, CheckpointManifest | CheckpointChunk):
            return self._on_checkpoint(now, msg, peer)
        return []

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
        for rh, tries in self.verifier.due(now):
            # No answer: ask the next source. Not having the inputs proves nothing (the
            # aggregator may just have crashed), so it never enters fork choice: a local,
            # unprovable judgement there would split honest nodes onto different heads.
            # We only withhold our own contribution until some source shows them.
            out += self._ask_inputs(now, rh, tries)
        if self._waiting and now >= self._quiet_until:
            out += self._end_wait(now)
        out += self._sync_timer(now)
        out += self._maybe_join(now)
        return out

    def next_wakeup(self, now: float) -> float:
        """When the driver should call on_timer next (it may call earlier)."""
        # Exactly the moments on_timer acts on, so a node without duties sleeps until its sync
        # check: in a large swarm almost every node is idle in almost every round.
        # Asked after every message a node handles (2.5 million times in 40 rounds of a
        # 10,000-node simulation): the empty cases cost a truth test each, nothing more.
        t = self._sync_wakeup(now)
        mine = self._mine
        if mine is not None and mine[0].round == self.tree.head.round:
            t = min(t, self._round_started + (mine[1] + 1) * self.genesis.round_timeout + 1e-6)
        if self._agg:
            for agg in self._agg.values():
                if not agg.published:
                    t = min(t, agg.started + agg.publish_delay(self._deadline) + 1e-6)
        if self.verifier.unverified:
            t = min(t, self.verifier.next_wakeup())
        if self._held:
            t = min(t, min(release for release, _, _ in self._held.values()) + 1e-6)
        cfg = self.cfg
        if cfg.auto_join and not self.leaving and self.me not in self.tree.head.members:
            t = min(t, self._last_join + cfg.rejoin_after + 1e-6)
        if self._waiting:
            t = min(t, self._quiet_until + 1e-6)
        return t if t > now + 1e-3 else now + 1e-3  # always strictly later: a driver never spins

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
    def _halted(self) -> bool:
        return bool(self.cfg.halt_at and self.head.round >= self.cfg.halt_at)

    def _enter_round(self, now: float) -> list[Effect]:
        """Called whenever the head changes: take up this round's duties."""
        st = self.head
        self._round_started = now
        self._last_progress = now
        out: list[Effect] = []
        for r in [r for r, a in self._agg.items() if a.state is not st]:
            del self._agg[r]
        if self._off_duty():
            return out  # no duties; the node still follows, serves and verifies the chain
        my_rank = st.aggregator_rank(self.me) if self.me in st.members else None
        if my_rank is not None and my_rank < self.cfg.fallback_ranks and st.round not in self._agg:
            self._agg[st.round] = Aggregation(st, my_rank, now, self.me)
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
        cand = self.tree.record_of(st)
        if cand is not None and ranks_of(cand.rec.contributors):
            rh = st.head
            if rh not in self.verifier.verified:
                if rh not in self.verifier.unverified:
                    return self._ask_inputs(now, rh, 0)
                return []
        self._estimating = (st.round, st.head)
        return [Estimate(st.round, st.head, tuple(st.streams(st.group_of(rank))))]

    def _ask_inputs(self, now: float, rh: bytes, tries: int) -> list[Effect]:
        ask = self.verifier.ask(now, rh, tries)
        return [] if ask is None else [Send(*ask)]

    # ------------------------------------------------------------------ aggregation
    def _on_contribution(self, now: float, c: Contribution, peer: bytes | None) -> list[Effect]:
        if c.round > self.round:
            return self._buffer_future(peer, c)
        agg = self._agg.get(c.round)
        if agg is None or agg.published:
            if not c.signature_ok():  # one check, here: a forgery is counted even when unused
                return self.reject(now, peer, Reason.BAD_SIGNATURE, "contribution")
            self._count("contributions.ignored")  # not our duty, or too late: not an attack
            return []
        try:
            took = agg.offer(c, now, self._deadline)
        except RecordError as e:
            return self.reject(now, peer, e.reason, e.detail)
        if took == "equivocation":
            self._count("equivocations")
        return self._maybe_publish(now, agg) if took == "new" else []

    def _maybe_publish(self, now: float, agg: Aggregation) -> list[Effect]:
        if agg.published or agg.state is not self.head:
            return []
        st = agg.state
        if now - agg.started < agg.publish_delay(self._deadline):
            return []
        joins = pending_entries(st, self._pending_joins, Join, self.genesis.max_joins)
        leaves = pending_entries(st, self._pending_leaves, Leave, 64)
        rec, inputs = build_record(st, self.identity, agg.contributions(), joins, leaves, list(agg.evidence.values()))
        agg.published = True
        self.verifier.keep(record_hash(rec), rec.round, inputs)
        self._count("records.published")
        return [Publish(rec), *self._on_record(now, rec, self.me)]

    # ------------------------------------------------------------------ records and heads
    def _on_record(self, now: float, rec: Record, peer: bytes | None) -> list[Effect]:
        rh = record_hash(rec)
        tree = self.tree
        if rh in tree.bad:
            self._count("records.known_bad")
            return []
        parent = tree.state(rec.prev)
        if parent is None:
            if rec.round > self.round:
                return self._buffer_future(peer, rec) + self._sync_soon(now)
            self._count("records.orphan")  # on a fork we pruned, or older than our undo window
            return []
        if tree.has(rec.prev, rh) or rh in self._held:
            self._count("records.duplicate")  # a replay, or an overlap of two chain pages
            return []
        try:
            child = checked_next_state(parent, rec)
        except RecordError as e:
            return self.reject(now, peer, e.reason, e.detail)
        rank = parent.aggregator_rank(rec.aggregator) or 0
        if rank >= self.cfg.fallback_ranks:
            return self.reject(now, peer, Reason.AGGREGATOR_RANK, f"rank {rank} never aggregates")
        release = tree.seen_at.get(parent.head, now) + rank * self.genesis.round_timeout
        if now < release and len(self._held) < self.cfg.max_future and not self._paging:
            # A fallback aggregator of rank j may only step in after j timeouts (that is when
            # trainers turn to it). Records carry no time, so each node enforces it on its own
            # clock: the record waits, unseen by fork choice, until j timeouts after this node
            # reached its parent. An honest one arrives later than that anyway; a rushed one
            # loses to the round's rank-0 record, and a chain of them grows at most one round
            # per timeout. (A node paging through history takes settled records as they come.)
            self._held[rh] = (release, rec, peer)
            self._count("records.held")
            return []
        tree.add(now, rh, rec, parent, child)
        self._count("records.accepted")
        for p in [*self._decode_peers(rec.joins), *self._decode_peers(rec.leaves)]:
            self._pending_joins.pop(p, None)
            self._pending_leaves.pop(p, None)
        return self._choose_head(now)

    def _choose_head(self, now: float) -> list[Effect]:
        change = self.tree.choose()
        if change is None:
            return []
        out: list[Effect] = []
        if change.undone:
            self._count("heads.switched")
            out.append(Notice("fork-switch", f"undid {change.undone} round(s) back to round {change.base.round}"))
        self._count("records.applied", len(change.steps))
        self.verifier.prune()
        out.append(Apply(change.base, change.steps, change.head, self.catching_up))
        return out + self._enter_round(now) + self._plan_progress(now)

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
    def _on_inputs(self, now: float, msg: ContributionsResponse, peer: bytes) -> list[Effect]:
        outcome, err = self.verifier.on_inputs(msg)
        if outcome == "fraud":
            cand = self.tree.cand[msg.record]
            self.tree.mark_bad(msg.record)
            proof = FraudProof(run=self.run_id, record=cand.rec.encode(), contributions=msg.contributions)
            assert err is not None
            return [Publish(proof), *self.reject(now, peer, err.reason, err.detail), *self._choose_head(now)]
        if outcome == "retry":
            assert err is not None
            tries = self.verifier.unverified.get(msg.record, (0.0, 0))[1]
            return self.reject(now, peer, err.reason, err.detail) + self._ask_inputs(now, msg.record, tries)
        if outcome == "verified":
            return self._maybe_estimate(now)
        return []

    def _on_fraud_proof(self, now: float, msg: FraudProof, peer: bytes | None) -> list[Effect]:
        rh, valid, err = self.verifier.check_proof(msg)
        if err is not None:
            return self.reject(now, peer, err.reason, err.detail)
        if rh is None:
            return []
        self.tree.mark_bad(rh)
        return ([Publish(msg)] if valid else []) + self._choose_head(now)
