"""The chaos bench's adversary: a seeded stream of hostile actions against live daemons.

:class:`Adversary` runs on its own trio thread and sends actions of every kind in :data:`KINDS`
to the nodes the bench says are online (:class:`View`), from throwaway identities
(:class:`~seedswarm.bench.hostile_peer.RawPeer`, rotated before the peer policy bans them: see
:mod:`seedswarm.bench.hostile_peer`), and floods the topic with Joins when the bench asks
(:class:`Flood`). An open swarm asks a Join for proof of work (``node/core/admission.py``), so
the Join flood pays for it. Kept apart from the peer, message and mutation helpers it shares
with the fuzzer, so that this module is only the schedule of attacks.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import trio

from seedswarm.bench.hostile_peer import (
    FRAME_HEADER_BYTES,
    GARBAGE,
    OTHER_RUN,
    PROTOCOLS,
    ROTATE_AT_STRIKES,
    STRIKES_TO_BAN,
    RawPeer,
    Tally,
    Target,
    dispose,
    frame,
    quiet_libp2p,
    strikes,
    topic_of,
)
from seedswarm.bench.hostile_pubsub import RAW_PUBSUB_CASES, publish, raw_pubsub, send_pubsub
from seedswarm.bench.mutator import Mutator, with_version
from seedswarm.crypto.keys import Identity
from seedswarm.gossip.wire import (
    MAX_U,
    PROTO_CHAIN,
    PROTO_CKPT,
    PROTO_HELLO,
    PROTO_INPUTS,
    PROTO_MSG,
    ChainRequest,
    CheckpointRequest,
    Contribution,
    ContributionsRequest,
    FraudProof,
    Hello,
    Join,
    Message,
    Record,
)
from seedswarm.node.core.admission import solve_work
from seedswarm.node.core.reasons import Reason
from seedswarm.node.daemon.netstack import MAX_MESSAGE_BYTES

log = logging.getLogger("seedswarm.bench.adversary")
ZERO32 = b"\x00" * 32


@dataclass
class View:
    """What the bench tells the adversary about the swarm (replaced wholesale, never mutated)."""

    online: list[Target] = field(default_factory=list)
    status: dict[str, dict[str, Any]] = field(default_factory=dict)  # target name -> status.json


#: kind -> (weight in the seeded schedule, what it is)
KINDS: dict[str, tuple[float, str]] = {
    "garbage-frame": (6, "0xC1 + random bytes on every direct protocol"),
    "truncated-frame": (3, "frame header promises more than arrives, then FIN"),
    "oversized-frame": (2, "frame header over the 1 MiB limit"),
    "truncated-message": (3, "a valid message cut short, on its own protocol"),
    "wrong-run": (3, "a well-formed message of another run id"),
    "wrong-version": (3, "a well-formed message under protocol version 99"),
    "wrong-run-hello": (1, "a hello claiming another run (the node refuses and disconnects)"),
    "forged-signature": (3, "a contribution claiming a member's key, random signature"),
    "non-member-contribution": (3, "a validly signed contribution from a non-member, to an aggregator"),
    "huge-chain-request": (2, "ChainRequest start 0, limit 2**63-1 (and start 2**63-1)"),
    "bad-checkpoint-request": (2, "CheckpointRequest of an unknown digest / index out of range"),
    "unknown-inputs-request": (1, "ContributionsRequest for a record nobody has"),
    "held-stream": (1, "streams opened, two header bytes written, then held"),
    "slow-stream": (1, "a valid request written one byte every 1.5 s"),
    "gossip-garbage": (2, "garbage and other-run records published on the topic"),
    "gossip-forged-record": (2, "a record with a member's key and a random signature"),
    "gossip-replayed-record": (3, "an old valid record published again"),
    "gossip-non-aggregator-record": (2, "a validly signed record from a non-member on the current head"),
    "gossip-bad-fraud-proof": (2, "fraud proofs whose record is garbage or correct"),
    "raw-pubsub": (3, "hand-made pubsub RPCs (hostile.build): garbage, bad key, bad signature, truncated, ..."),
    "join-flood": (0, "Joins from fresh keys with the genesis' join work (scheduled by the bench, not drawn)"),
}


@dataclass
class Flood:
    """One Join flood: the keys, the round their Joins name, the work they carry."""

    round: int
    bits: int
    keys: list[bytes]
    work_s: float
    outcome: str
    target: str


class Adversary:
    """A seeded stream of hostile actions against the online nodes, on its own trio thread.

    ``set_view`` (any thread) says who is online; ``start``/``stop``; ``tally`` counts what was
    sent by kind and what the daemons answered. ``join_flood(n)`` queues a flood of ``n`` Joins,
    each with ``join_bits`` bits of work (the genesis' ``join_pow_bits``: the difficulty of a
    chain with no recent joins, so the later Joins of a flood fall short once the first are in).
    """

    def __init__(self, run_id: bytes, members: Sequence[bytes], directions: int, seed: int, rate: float = 4.0,
                 workers: int = 3, exclude: Sequence[str] = (), raw_cases: Sequence[str] = RAW_PUBSUB_CASES,
                 join_bits: int = 16) -> None:
        self.run_id = run_id
        self.topic = topic_of(run_id)
        self.members = list(members)
        self.directions = directions
        self.rng = random.Random(seed)
        self.rate = rate
        self.workers = workers
        self.join_bits = join_bits
        self.exclude = set(exclude)
        self.raw_cases = [c for c in raw_cases if c not in self.exclude]
        self.tally = Tally()
        self._view = View()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._floods: list[int] = []
        self._lock = threading.Lock()
        self.rotations = 0
        self.errors: Counter[str] = Counter()
        self.floods: list[Flood] = []
        self.mutator = Mutator(random.Random(seed + 1))
        kinds = [k for k, (w, _) in KINDS.items() if w > 0 and k not in self.exclude]
        if not self.raw_cases and "raw-pubsub" in kinds:
            kinds.remove("raw-pubsub")
        self._kinds = kinds
        self._weights = [KINDS[k][0] for k in kinds]

    @property
    def flood_keys(self) -> list[bytes]:
        return [k for f in self.floods for k in f.keys]

    # -- control (any thread) ----------------------------------------------------------------
    def set_view(self, view: View) -> None:
        self._view = view

    def join_flood(self, n: int) -> None:
        with self._lock:
            self._floods.append(n)

    def start(self) -> None:
        quiet_libp2p()
        self._thread = threading.Thread(target=self._main, name="adversary", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- trio side ------------------------------------------------------------------------
    def _main(self) -> None:
        try:
            trio.run(self._run)
        except BaseException as e:  # noqa: BLE001 - the bench reports it
            self.errors[f"adversary crashed: {type(e).__name__}: {e}"] += 1
            log.exception("adversary crashed")

    async def _run(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._watch_stop, nursery.cancel_scope)
            for w in range(self.workers):
                nursery.start_soon(self._worker, w)

    async def _watch_stop(self, scope: trio.CancelScope) -> None:
        while not self._stop.is_set():
            await trio.sleep(0.2)
        scope.cancel()

    async def _worker(self, w: int) -> None:
        # Each worker keeps one identity until its weighted strikes at some node reach
        # ROTATE_AT_STRIKES (the peer policy bans at STRIKES_TO_BAN), then starts a fresh one.
        while not self._stop.is_set():
            peer = RawPeer(self.run_id)
            struck: defaultdict[str, float] = defaultdict(float)
            self.rotations += 1
            try:
                async with peer.running():
                    while not self._stop.is_set() and max(struck.values(), default=0) < ROTATE_AT_STRIKES:
                        await trio.sleep(self.rng.expovariate(self.rate / self.workers))
                        with self._lock:
                            flood = self._floods.pop(0) if self._floods else 0
                        view = self._view
                        if not view.online:
                            continue
                        target = self.rng.choice(view.online)
                        if flood:
                            await self._join_flood(target, flood)
                            continue
                        try:
                            with trio.fail_after(40):
                                kind = self.rng.choices(self._kinds, self._weights)[0]
                                struck[target.name] += await self._act(kind, peer, target, view, struck)
                        except trio.TooSlowError:
                            self.errors["action timed out"] += 1
                        if peer.hello_run != self.run_id:
                            break  # told a node we are on another run: it disconnects us
            except Exception as e:  # noqa: BLE001 - keep attacking with a new identity
                self.errors[f"{type(e).__name__}"] += 1
                await trio.sleep(0.5)

    def _status(self, view: View, target: Target) -> dict[str, Any]:
        return view.status.get(target.name, {})

    def _contribution(self, peer: RawPeer, round_: int, key: bytes | None = None) -> Contribution:
        c = Contribution(run=self.run_id, round=round_, peer=key or peer.public, q=self.mutator.random_bytes(self.directions))
        return c if key is not None else c.signed(peer.identity)

    async def _act(self, kind: str, peer: RawPeer, target: Target, view: View, struck: defaultdict[str, float]) -> float:
        """Carry out one hostile action; return the strikes it should cost at ``target``."""
        st = self._status(view, target)
        rnd = int(st.get("round", 0))
        head = bytes.fromhex(st["head"]) if st.get("head") else os.urandom(32)
        t = self.tally
        if kind == "garbage-frame":
            for proto in PROTOCOLS:
                out, _ = await peer.request(target, proto, GARBAGE + self.mutator.random_bytes(self.rng.randrange(1, 300)))
                t.add(kind, 1, out)
            return strikes(Reason.MALFORMED, len(PROTOCOLS))
        if kind == "truncated-frame":
            proto = self.rng.choice(PROTOCOLS)
            raw = (100).to_bytes(FRAME_HEADER_BYTES, "big") + GARBAGE + bytes(49)
            out, _ = await peer.request(target, proto, raw=raw, timeout=15)
            t.add(kind, 1, out)
            return 0
        if kind == "oversized-frame":
            proto = self.rng.choice(PROTOCOLS)
            raw = (2 * MAX_MESSAGE_BYTES).to_bytes(FRAME_HEADER_BYTES, "big") + bytes(64 * 1024)
            out, _ = await peer.request(target, proto, raw=raw, half_close=False)
            t.add(kind, 1, out)
            return 0
        if kind == "truncated-message":
            proto, msg = self._valid_request(peer, rnd, head)
            data = msg.encode()
            out, _ = await peer.request(target, proto, data[: self.rng.randrange(1, len(data))])
            t.add(kind, 1, out)
            return strikes(Reason.MALFORMED)
        if kind == "wrong-run":
            c = Contribution(run=OTHER_RUN, round=rnd, peer=peer.public, q=bytes(self.directions)).signed(peer.identity)
            out, _ = await peer.request(target, PROTO_MSG, c.encode())
            t.add(kind, 1, out)
            out, _ = await peer.request(target, PROTO_CHAIN, ChainRequest(run=OTHER_RUN, start=0, limit=10).encode())
            t.add(kind, 1, out)
            return strikes(Reason.WRONG_RUN, 2)
        if kind == "wrong-version":
            proto, msg = self._valid_request(peer, rnd, head)
            out, _ = await peer.request(target, proto, with_version(msg.encode(), 99))
            t.add(kind, 1, out)
            return strikes(Reason.PROTOCOL_VERSION)
        if kind == "wrong-run-hello":
            peer.hello_run = OTHER_RUN
            out, _ = await peer.request(target, PROTO_HELLO, Hello.make(OTHER_RUN, rnd, [], {}).encode())
            t.add(kind, 1, out)
            return STRIKES_TO_BAN  # the node disconnects us: this identity is spent
        if kind == "forged-signature":
            key = self.rng.choice(self.members)
            c = Contribution(run=self.run_id, round=rnd, peer=key, q=bytes(self.directions), sig=os.urandom(64))
            out, _ = await peer.request(target, PROTO_MSG, c.encode())
            t.add(kind, 1, out)
            return strikes(Reason.BAD_SIGNATURE)
        if kind == "non-member-contribution":
            aggs = [x for x in view.online if self._status(view, x).get("committee", {}).get("aggregator_rank") == 0]
            dest = aggs[0] if aggs else target
            rnd = int(self._status(view, dest).get("round", rnd))
            out, _ = await peer.request(dest, PROTO_MSG, self._contribution(peer, rnd).encode())
            t.add(kind, 1, out)
            struck[dest.name] += strikes(Reason.NOT_TRAINER)
            return 0
        if kind == "huge-chain-request":
            for start, limit in ((0, MAX_U), (MAX_U, MAX_U), (max(0, rnd - 5), 2**32)):
                out, body = await peer.request(target, PROTO_CHAIN, ChainRequest(run=self.run_id, start=start, limit=limit).encode())
                t.add(kind, 1, out)
                if body:
                    t.outcome(kind, f"answer-bytes-{len(body) // 10000 * 10}k")
            return 0
        if kind == "bad-checkpoint-request":
            reqs = [CheckpointRequest(run=self.run_id, digest=os.urandom(32), index=0),
                    CheckpointRequest(run=self.run_id, digest=os.urandom(32), index=MAX_U)]
            out, body = await peer.request(target, PROTO_CKPT, CheckpointRequest(run=self.run_id, digest=ZERO32, index=0).encode())
            t.add("checkpoint-manifest-request", 1, out)  # valid: not hostile, needed for the next
            if out == "answered" and len(body) > 100:
                with contextlib.suppress(Exception):
                    from seedswarm.gossip.wire import CheckpointManifest, decode_as

                    m = decode_as(body, CheckpointManifest, self.run_id)
                    reqs += [CheckpointRequest(run=self.run_id, digest=m.state, index=len(m.chunks)),
                             CheckpointRequest(run=self.run_id, digest=m.state, index=MAX_U)]
            for req in reqs:
                out, _ = await peer.request(target, PROTO_CKPT, req.encode())
                t.add(kind, 1, out)
            return 0
        if kind == "unknown-inputs-request":
            creq = ContributionsRequest(run=self.run_id, round=rnd, record=os.urandom(32))
            out, _ = await peer.request(target, PROTO_INPUTS, creq.encode())
            t.add(kind, 1, out)
            return 0
        if kind == "held-stream":
            await self._held(peer, target, kind, slow=False)
            return 0
        if kind == "slow-stream":
            await self._held(peer, target, kind, slow=True)
            return 0
        if kind.startswith("gossip-"):
            await self._gossip(kind, peer, target, rnd, head)
            return 0
        if kind == "raw-pubsub":
            case = self.rng.choice(self.raw_cases)
            seed = os.urandom(32)  # a throwaway identity per case: several cases cost GossipSub score
            attack, linger = raw_pubsub(case, self.topic, seed)
            out = await send_pubsub(target, attack, self.run_id, seed=seed, linger=linger)
            t.add(f"raw-pubsub:{case}", 1, out)
            return 0
        raise AssertionError(kind)

    def _valid_request(self, peer: RawPeer, rnd: int, head: bytes) -> tuple[str, Message]:
        choice = self.rng.randrange(4)
        if choice == 0:
            return PROTO_MSG, self._contribution(peer, rnd)
        if choice == 1:
            return PROTO_CHAIN, ChainRequest(run=self.run_id, start=max(0, rnd - 3), limit=3)
        if choice == 2:
            return PROTO_CKPT, CheckpointRequest(run=self.run_id, digest=ZERO32, index=0)
        return PROTO_INPUTS, ContributionsRequest(run=self.run_id, round=max(0, rnd - 1), record=head)

    async def _held(self, peer: RawPeer, target: Target, kind: str, slow: bool) -> None:
        """Streams that never finish their request: the node must time them out (10 s)."""
        n = 1 if slow else 4

        async def one() -> None:
            proto = self.rng.choice(PROTOCOLS)
            t0 = time.monotonic()
            try:
                stream = await peer.open(target, proto)
            except Exception:
                self.tally.add(kind, 1, "unreachable")
                return
            outcome = "held-to-our-limit"
            try:
                with trio.move_on_after(25):
                    if slow:
                        data = frame(ChainRequest(run=self.run_id, start=0, limit=1).encode())
                        for b in data:
                            await stream.write(bytes([b]))
                            await trio.sleep(1.5)
                    else:
                        await stream.write(b"\x00\x00")
                    await stream.read(1)  # the node times us out: EOF or reset
                    outcome = "answered"
            except Exception:
                outcome = f"closed-by-node-after-{int(time.monotonic() - t0) // 5 * 5}s"
            finally:
                await dispose(stream, graceful=False)
            self.tally.add(kind, 1, outcome)

        async with trio.open_nursery() as nursery:
            for _ in range(n):
                nursery.start_soon(one)

    async def _gossip(self, kind: str, peer: RawPeer, target: Target, rnd: int, head: bytes) -> None:
        t = self.tally
        datas: list[bytes] = []
        if kind == "gossip-garbage":
            datas = [GARBAGE + os.urandom(100),
                     Record(run=OTHER_RUN, round=rnd, prev=head, aggregator=peer.public, contributors=b"\x01",
                            contrib_root=os.urandom(32), aggregate=bytes(2 * self.directions)).signed(peer.identity).encode()]
        elif kind == "gossip-forged-record":
            datas = [Record(run=self.run_id, round=rnd, prev=head, aggregator=self.rng.choice(self.members),
                            contributors=b"\x01", contrib_root=os.urandom(32), aggregate=bytes(2 * self.directions),
                            sig=os.urandom(64)).encode()]
        elif kind == "gossip-non-aggregator-record":
            datas = [Record(run=self.run_id, round=rnd, prev=head, aggregator=peer.public, contributors=b"\x01",
                            contrib_root=os.urandom(32), aggregate=bytes(2 * self.directions)).signed(peer.identity).encode()]
        elif kind == "gossip-replayed-record":
            out, body = await peer.request(target, PROTO_CHAIN, ChainRequest(run=self.run_id, start=max(0, rnd - 40), limit=3).encode())
            t.add("chain-request-for-replay", 1, out)  # valid: fetches the records to replay
            if out == "answered":
                from seedswarm.gossip.wire import ChainResponse, decode_as

                with contextlib.suppress(Exception):
                    datas = list(decode_as(body, ChainResponse, self.run_id).records)
            if not datas:
                return
        elif kind == "gossip-bad-fraud-proof":
            datas = [FraudProof(run=self.run_id, record=GARBAGE + os.urandom(40)).encode(),
                     FraudProof(run=self.run_id, record=self.mutator.random_bytes(64)).encode()]
        else:
            raise AssertionError(kind)
        seed = os.urandom(32)  # the pubsub author: throwaway (validator rejections cost it score)
        out = await send_pubsub(target, publish(seed, self.topic, datas), self.run_id, seed=seed, linger=0.3)
        t.add(kind, len(datas), out)

    async def _join_flood(self, target: Target, n: int) -> None:
        """``n`` Joins from fresh keys, each with ``join_bits`` of work at the target's round,
        published in one RPC. The work is done on a worker thread (it is the flood's cost)."""
        rnd = int(self._status(self._view, target).get("round", 0))
        bits = self.join_bits

        def make() -> tuple[list[bytes], list[bytes], float]:
            t0 = time.monotonic()
            keys, datas = [], []
            for _ in range(n):
                ident = Identity.generate()
                cert = solve_work(self.run_id, ident.public, rnd, bits)
                keys.append(ident.public)
                datas.append(Join(run=self.run_id, round=rnd, peer=ident.public, cert=cert).signed(ident).encode())
            return keys, datas, time.monotonic() - t0

        keys, datas, work_s = await trio.to_thread.run_sync(make)
        seed = os.urandom(32)
        out = await send_pubsub(target, publish(seed, self.topic, datas), self.run_id, seed=seed, linger=0.5)
        self.floods.append(Flood(round=rnd, bits=bits, keys=keys, work_s=round(work_s, 1), outcome=out,
                                 target=target.name))
        self.tally.add("join-flood", n, out)
