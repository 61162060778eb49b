"""A deterministic in-memory network of NodeCores, driven by hand (shared by the core's tests).

Messages cross the wire as bytes (re-decoded, as a real transport would), estimates are
deterministic fake values, and every node keeps its own parameters (a real torch model, replayed
from the Apply effects) and its own stored chain (what it serves to peers that sync), so
"bit-identical" is checked on model digests, not assumed.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable
from typing import Any

import torch

from seedswarm.crypto.hashing import h
from seedswarm.crypto.keys import Identity
from seedswarm.gossip.wire import CheckpointManifest, Contribution, Message, Record, decode
from seedswarm.node.core.admission import solve_work
from seedswarm.node.core.chain import (
    ChainState,
    build_record,
    checked_next_state,
    next_state,
    record_hash,
)
from seedswarm.node.core.effects import Apply, Estimate, Publish, Rejected, Reply, Send, SolveWork
from seedswarm.node.core.genesis import Genesis
from seedswarm.node.core.protocol import CoreConfig, NodeCore
from seedswarm.node.learn.replay import ModelStates, model_digest

IDS = [Identity.from_seed(bytes([i]) * 32) for i in range(1, 9)]
BY_PUB = {i.public: i for i in IDS}
OUTSIDER = Identity.from_seed(b"\xee" * 32)
LATENCY = 0.01


def honest_records(st: ChainState, n: int, seed: int) -> list[tuple[ChainState, Record]]:
    """``n`` honest records after ``st``, each with its parent state (every trainer's byte values
    drawn from ``seed``; signed by the members of ``IDS``)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        cs = []
        for p in st.committee.trainers:
            vals = [rng.randint(-127, 127) for _ in range(st.genesis.directions)]
            cs.append(Contribution(run=st.run_id, round=st.round, peer=p,
                                   q=bytes(v & 0xFF for v in vals)).signed(BY_PUB[p]))
        rec, _ = build_record(st, BY_PUB[st.committee.aggregators[0]], cs)
        out.append((st, rec))
        st = next_state(st, rec)
    return out


def make_genesis(**kw: Any) -> Genesis:
    base: dict[str, Any] = dict(members=tuple(i.public for i in IDS), trainers=5, aggregators=2, directions=8,
                                round_timeout=0.5, min_round_time=0.05, lr=0.1)
    base.update(kw)
    return Genesis(**base)


def fresh_params() -> list[torch.Tensor]:
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    return [p.detach().clone() for p in m.parameters()]


def fake_values(peer: bytes, st: ChainState) -> list[float]:
    """A trainer's deterministic 'estimate': a shared signal plus per-peer noise, in scale units."""
    rng = random.Random(h(b"test/est", peer, st.head))
    signal = random.Random(h(b"test/signal", st.head))
    return [st.scale * (signal.randint(-20, 20) + rng.randint(-6, 6)) for _ in range(st.genesis.directions)]


Hook = Callable[["Net", bytes, Any], list[Any] | None]


class NetHistory:
    """One node's stored chain (the records of its applied chain), as ``node.core.sync.History``."""

    def __init__(self, net: Net, key: bytes) -> None:
        self.net, self.key = net, key

    def length(self) -> int:
        return len(self.net.chains[self.key])

    def record(self, r: int) -> bytes | None:
        chain = self.net.chains[self.key]
        return self.net.records[chain[r]].encode() if 0 <= r < len(chain) else None

    def head_at(self, r: int) -> bytes | None:
        chain = self.net.chains[self.key]
        if r == 0:
            return ChainState.initial(self.net.genesis).head
        return chain[r - 1] if 0 < r <= len(chain) else None

    def manifest(self) -> CheckpointManifest | None:
        return None

    def chunk(self, digest: bytes, index: int) -> bytes | None:
        return None


class Net:
    """A deterministic in-memory network of NodeCores with per-node replayed models.

    ``outbound[key](net, key, effect)`` may rewrite a (Byzantine) node's effects: return a list of
    effects to use instead (``[]`` drops it), or None to keep it. ``inbound[key](net, key, (msg,
    frm))`` may answer a message in place of the core (return effects) or let the core see it.
    """

    def __init__(self, genesis: Genesis, idents: list[Identity] = IDS, config: CoreConfig | None = None) -> None:
        self.genesis = genesis
        self.records: dict[bytes, Record] = {}  # every applied record by hash (what stores hold)
        self.chains: dict[bytes, list[bytes]] = {}  # per node: record hashes applied, in order
        self.cores = {i.public: NodeCore(genesis, i, config, history=NetHistory(self, i.public)) for i in idents}
        root = ChainState.initial(genesis)
        self.models = {k: ModelStates(root, fresh_params(), keep=128) for k in self.cores}
        self.chains.update({k: [] for k in self.cores})
        self.now = 0.0
        self.q: list[tuple[float, int, str, bytes | None, Any]] = []
        self.seq = 0
        self.rejected: list[tuple[bytes, Rejected]] = []
        self.outbound: dict[bytes, Hook] = {}
        self.inbound: dict[bytes, Hook] = {}
        self.byzantine: set[bytes] = set()
        self.sent: list[tuple[float, bytes, bytes, Message]] = []  # (time, from, to, msg) direct sends

    def push(self, dt: float, kind: str, dst: bytes | None, payload: Any) -> None:
        self.seq += 1
        heapq.heappush(self.q, (self.now + dt, self.seq, kind, dst, payload))

    def send(self, frm: bytes, to: bytes, msg: Message, dt: float = LATENCY) -> None:
        self.push(dt, "msg", to, (decode(msg.encode()), frm))

    def publish(self, frm: bytes, msg: Message, dt: float = LATENCY) -> None:
        self.push(dt, "gossip", frm, decode(msg.encode()))

    def handle(self, key: bytes, effects: list[Any]) -> None:
        for e in effects:
            hook = self.outbound.get(key)
            if hook is not None:
                repl = hook(self, key, e)
                if repl is not None:
                    for r in repl:
                        self._do(key, r)
                    continue
            self._do(key, e)

    def _do(self, key: bytes, e: Any) -> None:
        core = self.cores[key]
        if isinstance(e, Send | Reply):
            self.sent.append((self.now, key, e.to, e.msg))
            self.send(key, e.to, e.msg)
        elif isinstance(e, Publish):
            self.publish(key, e.msg)
        elif isinstance(e, Estimate):
            self.push(0.005, "est", key, (e.round, e.head, fake_values(key, core.head)))
        elif isinstance(e, SolveWork):
            self.push(0.005, "work", key, (e.round, solve_work(core.run_id, key, e.round, e.bits)))
        elif isinstance(e, Apply):
            self.models[key].advance(e.base, e.steps)
            chain = self.chains[key][: e.base.round]
            for _, rec in e.steps:
                self.records[record_hash(rec)] = rec
                chain.append(record_hash(rec))
            self.chains[key] = chain
        elif isinstance(e, Rejected):
            self.rejected.append((key, e))

    def honest(self) -> list[bytes]:
        return [k for k in self.cores if k not in self.byzantine]

    def digest(self, key: bytes) -> bytes:
        params = self.models[key].get(self.cores[key].head.head)
        assert params is not None
        return model_digest(params)

    def run(self, until_round: int, max_time: float = 30.0) -> None:
        for k, c in self.cores.items():
            self.handle(k, c.start(self.now))
            for other in self.cores:  # every node knows every other (as hellos would tell it)
                if other != k and other not in c.sync.peer_heads:
                    self.handle(k, c.on_peer(self.now, other, len(self.chains[other])))
        self.push(0.05, "tick", None, None)
        while self.q and self.now < max_time:
            if all(self.cores[k].head.round >= until_round for k in self.honest()):
                break
            t, _, kind, dst, payload = heapq.heappop(self.q)
            self.now = t
            if kind == "tick":
                for k, c in self.cores.items():
                    self.handle(k, c.on_timer(self.now))
                self.push(0.05, "tick", None, None)
            elif kind == "gossip":
                for k in self.cores:
                    if k != dst:
                        self._deliver(k, payload, None)
            elif kind == "msg":
                msg, frm = payload
                assert dst is not None
                self._deliver(dst, msg, frm)
            elif kind == "est":
                assert dst is not None
                self.handle(dst, self.cores[dst].on_estimate(self.now, *payload))
            elif kind == "work":
                assert dst is not None
                self.handle(dst, self.cores[dst].on_join_work(self.now, *payload))
            elif kind == "call":
                payload(self)

    def settle(self, max_time: float = 10.0) -> None:
        """Go on until every honest node holds the same head (bounded in virtual time)."""
        end = self.now + max_time
        target = max(self.cores[k].head.round for k in self.honest())
        while len(self.heads()) > 1 and self.now < end:
            self.run(target + 1, max_time=min(end, self.now + 0.2))
            target = max(self.cores[k].head.round for k in self.honest())

    def _deliver(self, key: bytes, msg: Message, frm: bytes | None) -> None:
        if key not in self.cores:
            return  # no such node on this network (a peer that only exists as a key)
        hook = self.inbound.get(key)
        if hook is not None:
            repl = hook(self, key, (msg, frm))
            if repl is not None:
                self.handle(key, repl)
                return
        self.handle(key, self.cores[key].on_message(self.now, msg, frm))

    # ---- views
    def heads(self) -> set[bytes]:
        return {self.cores[k].head.head for k in self.honest()}

    def digests(self) -> set[bytes]:
        return {self.digest(k) for k in self.honest()}

    def state_at(self, key: bytes, round_: int) -> ChainState:
        """The state after ``round_`` records of ``key``'s chain (replayed from its records)."""
        st = ChainState.initial(self.genesis)
        for rh in self.chains[key][:round_]:
            st = checked_next_state(st, self.records[rh])
        return st

    def record_at(self, key: bytes, round_: int) -> Record:
        return self.records[self.chains[key][round_]]

    def rejected_reasons(self) -> list[str]:
        return [r.reason for k, r in self.rejected if k not in self.byzantine]
