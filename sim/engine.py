"""Virtual-time discrete-event simulator over the real sans-IO protocol core.

Each simulated node is a :class:`~seedswarm.node.core.protocol.NodeCore`, the same class the daemon
drives; this module only plays the network (latency, bandwidth, loss, gossip), the clock, the
local computation, churn and Byzantine behaviour. Everything is drawn from one seeded RNG, so a
run is a deterministic function of its configuration.

Honest nodes on the same head share one parameter list (:class:`ModelStates`), so memory does
not grow with the number of nodes; work done per round grows with the committee, not with N,
except for delivering the record to every node.
"""

from __future__ import annotations

import heapq
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from seedswarm.crypto.keys import Identity
from seedswarm.gossip.wire import Message
from seedswarm.node.core.admission import solve_work
from seedswarm.node.core.chain import ChainState
from seedswarm.node.core.effects import (
    Apply,
    Estimate,
    InstallCheckpoint,
    Notice,
    Publish,
    Rejected,
    Reply,
    Resync,
    Send,
    SolveWork,
)
from seedswarm.node.core.genesis import Genesis
from seedswarm.node.core.protocol import CoreConfig, NodeCore
from seedswarm.node.learn.checkpoint import decode_params
from seedswarm.node.learn.estimators import local_estimate
from seedswarm.node.learn.momentum import direction_momentum, replay_state
from seedswarm.node.learn.replay import ModelStates, bind_, direction_scale, model_digest
from seedswarm.node.learn.tasks import Task
from seedswarm.sim.chainview import ChainIndex, SimHistory

Attack = Callable[["SimNode", list[float], "Simulation"], list[float] | None]

STATE_BUDGET_BYTES = 4 << 30
"""Memory for the model states the simulator keeps (shared by all its nodes: up to 64 heads).

A state is a full parameter copy, so 64 of a 100M-parameter model would be 25 GB; within
4 GiB a model up to 16M parameters keeps all 64 and a 100M one 10. A node whose base state
fell out is replayed from the nearest kept ancestor (``ChainIndex.materialize``).
"""


def identities(n: int, seed: int, offset: int = 0) -> list[Identity]:
    """Deterministic simulated identities (a run replays exactly from its seed)."""
    rng = np.random.default_rng([seed, 0x5EED])
    seeds = rng.integers(0, 256, size=(offset + n, 32), dtype=np.uint8)
    return [Identity.from_seed(bytes(seeds[i])) for i in range(offset, offset + n)]


@dataclass
class NetConfig:
    latency_ms: float = 40.0  # median one-way latency between two nodes
    jitter: float = 0.3  # lognormal sigma of per-node access latency
    bandwidth_mbps: float = 100.0  # per-node link
    loss: float = 0.0  # probability a direct message is lost
    compute_ms: float = 30.0  # median virtual time of one local estimate
    gossip_degree: int = 6  # GossipSub mesh degree D (gossip/libp2p_host.py uses go-libp2p's 6)


@dataclass
class SimNode:
    index: int
    identity: Identity
    core: NodeCore
    shard: Any
    rng: np.random.Generator
    access_s: float
    speed: float
    online: bool = True
    byzantine: bool = False
    timer_at: float = math.inf
    bytes_sent: int = 0
    bytes_received: int = 0
    joined_at: float = 0.0
    up_free: float = 0.0  # its link is busy sending until then
    down_free: float = 0.0  # ... and receiving
    first_applied_at: float | None = None  # first record applied to its model
    synced_at: float | None = None  # joiners: caught up with the swarm, model in hand
    member_at: float | None = None  # joiners: a record made it a member
    model_ready: bool = True  # false while it waits for a checkpoint (records kept, model deferred)
    checkpoint_round: int | None = None  # joiners: the round of the checkpoint it installed

    @property
    def key(self) -> bytes:
        return self.identity.public


@dataclass
class Simulation:
    genesis: Genesis
    task: Task
    nodes: list[SimNode]
    net: NetConfig
    rng: np.random.Generator
    states: ModelStates
    index: ChainIndex
    core_config: CoreConfig
    shard_count: int = 0
    attack: Attack | None = None
    now: float = 0.0
    events: list[tuple[float, int, str, int, Any]] = field(default_factory=list)
    seq: int = 0
    by_key: dict[bytes, SimNode] = field(default_factory=dict)
    bytes_total: int = 0
    bytes_by_kind: dict[str, int] = field(default_factory=dict)
    rejected: dict[str, int] = field(default_factory=dict)
    notices: dict[str, int] = field(default_factory=dict)
    best_round: int = 0
    on_round: Callable[[Simulation, ChainState], None] | None = None
    model: torch.nn.Module | None = None
    estimates: int = 0

    # ------------------------------------------------------------------ construction
    @classmethod
    def create(cls, genesis: Genesis, task: Task, identities: list[Identity], net: NetConfig, seed: int,
               core_config: CoreConfig | None = None, checkpoint_every: int = 0,
               checkpoint_chunk_bytes: int = 1 << 16) -> Simulation:
        rng = np.random.default_rng(seed)
        model = task.build_model()
        root = ChainState.initial(genesis)
        params = replay_state(model)  # the parameters (and momentum buffers: momentum.py)
        states = ModelStates(root, params, keep=64, budget_bytes=STATE_BUDGET_BYTES, scale=direction_scale(model),
                             momentum=direction_momentum(model))
        index = ChainIndex(root, params, checkpoint_every, checkpoint_chunk_bytes)
        sim = cls(genesis=genesis, task=task, nodes=[], net=net, rng=rng, states=states, index=index,
                  core_config=core_config or CoreConfig(), model=model)
        for ident in identities:
            sim.add_node(ident, root)
        return sim

    def add_node(self, ident: Identity, base: ChainState, config: CoreConfig | None = None) -> SimNode:
        i = len(self.nodes)
        node = SimNode(
            index=i, identity=ident, core=None,  # type: ignore[arg-type]  # set below: the history needs the node
            shard=self.task.shard(i % max(1, self.shard_count), max(1, self.shard_count)),
            rng=np.random.default_rng([int(self.rng.integers(1 << 62)), i]),
            access_s=self.net.latency_ms / 2000.0 * float(math.exp(self.rng.normal(0.0, self.net.jitter))),
            speed=float(math.exp(self.rng.normal(0.0, 0.25))), joined_at=self.now,
        )
        node.core = NodeCore(self.genesis, ident, config or self.core_config, base=base,
                             history=SimHistory(self.index, node))
        self.nodes.append(node)
        self.by_key[ident.public] = node
        return node

    # ------------------------------------------------------------------ event plumbing
    def push(self, t: float, kind: str, node: int, payload: Any = None) -> None:
        self.seq += 1
        heapq.heappush(self.events, (t, self.seq, kind, node, payload))

    def start(self) -> None:
        for n in self.nodes:
            self.handle(n, n.core.start(self.now))

    def start_node(self, node: SimNode, join: bool, peers: int = 8) -> None:
        """Start a node; a joiner learns a few online peers (as peer exchange would) and syncs,
        downloads a checkpoint and announces its Join on its own, through its core."""
        node.joined_at = self.now
        self.handle(node, node.core.start(self.now))
        if join:
            node.model_ready = False
            online = [n for n in self.nodes if n.online and n is not node and not n.byzantine]
            for i in self.rng.permutation(len(online))[:peers]:
                p = online[int(i)]
                self.handle(node, node.core.on_peer(self.now, p.key, p.core.head.round))
            self.handle(node, node.core.join(self.now) if not node.core.cfg.auto_join else [])

    def _count_bytes(self, kind: str, size: int) -> None:
        self.bytes_total += size
        self.bytes_by_kind[kind] = self.bytes_by_kind.get(kind, 0) + size

    def handle(self, node: SimNode, effects: list[Any]) -> None:
        if not effects:  # most gossip needs no answer
            self._schedule_timer(node)
            return
        for e in effects:
            if isinstance(e, Send | Reply):
                self._send(node, e.to, e.msg)
            elif isinstance(e, Publish):
                self._publish(node, e.msg)
            elif isinstance(e, Estimate):
                self._estimate(node, e)
            elif isinstance(e, SolveWork):
                # At once, in virtual time: the work costs the simulator's CPU, not the swarm's clock.
                nonce = solve_work(node.core.run_id, node.key, e.round, e.bits)
                self.handle(node, node.core.on_join_work(self.now, e.round, nonce))
            elif isinstance(e, Apply):
                self._apply(node, e)
            elif isinstance(e, InstallCheckpoint):
                self._install(node, e)
            elif isinstance(e, Rejected):
                self.rejected[e.reason] = self.rejected.get(e.reason, 0) + 1
            elif isinstance(e, Notice):
                self.notices[e.what] = self.notices.get(e.what, 0) + 1
            elif isinstance(e, Resync):
                self._resync(node, e)
                return
        self._schedule_timer(node)

    def _schedule_timer(self, node: SimNode) -> None:
        if not node.online:
            return
        t = node.core.next_wakeup(self.now)
        if t < node.timer_at - 1e-9:
            node.timer_at = t
            self.push(t, "timer", node.index)

    def _send(self, src: SimNode, to: bytes, msg: Message) -> None:
        # A direct message is serialised on the sender's link, crosses the network, and is
        # serialised again on the receiver's: a joiner fetching checkpoint chunks from several
        # peers at once is limited by its own link, as a real one is.
        size = len(msg.encode())
        src.bytes_sent += size
        self._count_bytes(type(msg).__name__, size)
        dst = self.by_key.get(to)
        if dst is None or not dst.online or (self.net.loss and self.rng.random() < self.net.loss):
            return
        dst.bytes_received += size
        wire = size * 8 / (self.net.bandwidth_mbps * 1e6)
        src.up_free = max(self.now, src.up_free) + wire
        dst.down_free = max(src.up_free + src.access_s + dst.access_s, dst.down_free) + wire
        self.push(dst.down_free, "msg", dst.index, (msg, src.key))

    def _publish(self, src: SimNode, msg: Message) -> None:
        # GossipSub as the daemon runs it (mesh degree D): the publisher sends to its D mesh
        # peers, and every node forwards a new message to its mesh peers but the one it came
        # from, so each node receives about D - 1 copies (one, then duplicates it cannot refuse;
        # IDONTWANT only helps for large messages). Every copy is counted.
        size = len(msg.encode())
        online = [n for n in self.nodes if n.online and n is not src]
        copies = max(1, min(self.net.gossip_degree - 1, len(online) - 1))
        hops = max(1.0, math.log(max(2, len(online)), self.net.gossip_degree))
        src.bytes_sent += size * min(self.net.gossip_degree, len(online))
        for n in online:
            n.bytes_received += size * copies
        self._count_bytes(type(msg).__name__, size * copies * len(online))
        self.push(self.now + 2 * hops * self.net.latency_ms / 2000.0 + 0.002, "gossip", src.index, msg)

    def _estimate(self, node: SimNode, e: Estimate) -> None:
        params = self.states.get(e.head)
        if params is None:
            return
        assert self.model is not None
        self.estimates += 1
        values = local_estimate(self.task, self.genesis, bind_(self.model, params), node.shard, node.rng, e.streams)
        if node.byzantine and self.attack is not None:
            forged = self.attack(node, values, self)
            if forged is None:
                return  # withholding
            values = forged
        delay = self.net.compute_ms / 1000.0 * node.speed
        self.push(self.now + delay, "estimate", node.index, (e.round, e.head, values))

    def _apply(self, node: SimNode, e: Apply) -> None:
        self.index.add(e.steps)
        if e.catching_up:
            node.model_ready = False  # records kept; the model waits for the checkpoint
            return
        if node.byzantine and not self.states.has(e.base.head):
            # A Byzantine node left on its own fork (e.g. the rushers' records, which honest nodes
            # hold and drop) can fall out of the shared parameter cache; its model is never measured.
            return
        if not self.states.has(e.base.head):
            self.index.materialize(self.states, e.base)  # a node that replays instead of a checkpoint
        self.states.advance(e.base, e.steps)
        node.model_ready = True
        for st in [p for p, _ in e.steps[1:]] + [e.head]:
            self.index.maybe_checkpoint(st, self.states)
        if node.first_applied_at is None and e.steps:
            node.first_applied_at = self.now
        st = e.head
        if node.synced_at is None and st.round >= self.best_round - 1:
            node.synced_at = self.now
        if node.member_at is None and node.key in st.members:
            node.member_at = self.now
        if st.round > self.best_round and not node.byzantine:
            self.best_round = st.round
            if self.on_round is not None:
                self.on_round(self, st)

    def _install(self, node: SimNode, e: InstallCheckpoint) -> None:
        """A joiner's downloaded checkpoint: decode it and check it against the shared model."""
        _, head, params = decode_params(e.blob, self.index.genesis_params)
        have = self.states.get(e.head)
        if have is not None and model_digest(have) != model_digest(params):
            self.rejected["checkpoint-mismatch"] = self.rejected.get("checkpoint-mismatch", 0) + 1
            return
        if have is None:
            self.states.put(e.head, params)
        node.checkpoint_round = e.round

    def _resync(self, node: SimNode, e: Resync) -> None:
        """Peers agree on a chain that left ours too deep to undo: restart from the fork point."""
        base = self.index.state_at(node.core.head, e.fork_round)
        old = node.core
        node.core = NodeCore(self.genesis, node.identity, old.cfg, base=base, history=SimHistory(self.index, node))
        node.timer_at = math.inf
        self.handle(node, node.core.start(self.now))
        for p in e.voters:
            peer = self.by_key.get(p)
            if peer is not None:
                self.handle(node, node.core.on_peer(self.now, p, peer.core.head.round))

    # ------------------------------------------------------------------ running
    def step(self) -> bool:
        if not self.events:
            return False
        t, _, kind, idx, payload = heapq.heappop(self.events)
        self.now = max(self.now, t)
        if kind == "gossip":
            # Every online node but the sender (10,000 calls per message in bench scale).
            now, handle = self.now, self.handle
            for n in self.nodes:
                if n.online and n.index != idx:
                    handle(n, n.core.on_message(now, payload, None))
            return True
        node = self.nodes[idx]
        if not node.online:
            return True
        if kind == "msg":
            msg, frm = payload
            self.handle(node, node.core.on_message(self.now, msg, frm))
        elif kind == "estimate":
            r, head, values = payload
            self.handle(node, node.core.on_estimate(self.now, r, head, values))
        elif kind == "timer":
            if abs(t - node.timer_at) > 1e-9:
                return True  # superseded
            node.timer_at = math.inf
            self.handle(node, node.core.on_timer(self.now))
        elif kind == "call":
            payload(self)
        return True

    def run(self, until_round: int, max_time: float = math.inf, max_wall: float = math.inf,
            stop: Callable[[Simulation], bool] | None = None) -> None:
        wall0 = time.monotonic()
        while self.best_round < until_round and self.now < max_time:
            if not self.step():
                break
            if stop is not None and stop(self):
                break
            if time.monotonic() - wall0 > max_wall:
                break

    def settle(self, grace: float) -> None:
        """Deliver what is in flight (bounded virtual time) until honest online nodes share a head."""
        end = self.now + grace
        steps = 0
        while self.now < end and self.events:
            if steps % 64 == 0:
                heads = {n.core.head.head for n in self.honest_online()}
                if len(heads) <= 1 and all(n.core.head.round >= self.best_round for n in self.honest_online()):
                    return
            self.step()
            steps += 1

    # ------------------------------------------------------------------ churn
    def crash(self, node: SimNode) -> None:
        node.online = False

    def honest_online(self) -> list[SimNode]:
        return [n for n in self.nodes if n.online and not n.byzantine]

    def digest_agreement(self) -> tuple[float, bytes | None]:
        """Fraction of honest online nodes whose model digest equals the majority's."""
        heads: dict[bytes, int] = {}
        nodes = self.honest_online()
        for n in nodes:
            heads[n.core.head.head] = heads.get(n.core.head.head, 0) + 1
        digests: dict[bytes, int] = {}
        for head, count in heads.items():
            params = self.states.get(head)
            d = model_digest(params) if params is not None else b"missing" + head
            digests[d] = digests.get(d, 0) + count
        if not nodes:
            return 0.0, None
        best = max(digests.items(), key=lambda kv: kv[1])
        return best[1] / len(nodes), best[0]
