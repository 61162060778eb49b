"""``seedswarm bench fuzz``: mutated and random messages against one live daemon.

One ``seedswarm node`` process trains alone (a one-member swarm, so it applies rounds as fast as
it can) while the fuzzer, from many throwaway identities at once, sends it

* **direct streams** on every protocol it serves (msg, inputs, chain, ckpt, hello): valid
  Contributions, ChainRequests, CheckpointRequests, ContributionsRequests and hellos of this
  run, mutated by :class:`~seedswarm.bench.adversary.Mutator` (bit flips, truncations,
  extensions, msgpack type confusion, field swaps and drops, length lies, header lies, run
  swaps, splices), random bytes, framing lies (a frame header that says more or less than
  follows), sometimes on the wrong protocol. One request per stream (the protocols allow no
  more), several streams in parallel per identity; an identity is dropped after 25 requests
  (the daemon bans a peer after 30 rejected inputs).
* **gossip** on hand-written ``/meshsub/1.1.0`` streams, many RPCs per stream and 50 messages
  per RPC: records, fraud proofs, joins and leaves that are *validly signed* but hostile in
  content (random fields re-signed, mutated records inside fraud proofs, out-of-window joins),
  which pass the topic validator and reach the protocol core; then a few byte-mutated ones
  that the validator rejects (GossipSub graylists a forwarder after about ten, so each
  identity sends eight).
* **raw pubsub frames** last (``--raw-frames on``): garbage RPCs, bad keys, bad varints,
  truncated and oversized RPCs (``adversary.RAW_PUBSUB_CASES``). Two of them stop a stock
  py-libp2p 0.8.1 host, so they run after everything else has been measured.

It samples the daemon's RSS (``/proc/<pid>/status`` VmRSS) every second and its round, and
checks at the end: the process is alive, it applied rounds during the fuzz, RSS grew by less
than ``--rss-limit-mb`` after the warm-up, and the rejection counters moved. Exit code 0 only
if all hold (and, with raw frames, it survived them too).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio
from libp2p.identity_utils import create_identity_from_seed

from seedswarm.bench.adversary import (
    GARBAGE,
    GRAYLIST_AFTER,
    PROTOCOLS,
    RAW_PUBSUB_CASES,
    ROTATE_AT_STRIKES,
    Mutator,
    RawPeer,
    Tally,
    Target,
    _quiet_libp2p,
    envelope_mutant,
    frame,
    raw_pubsub,
    rpc,
    send_pubsub,
    strikes,
    topic_of,
)
from seedswarm.bench.chaos import parse_metrics
from seedswarm.clihelp import parser
from seedswarm.crypto.keys import Identity
from seedswarm.gossip.libp2p import hostile
from seedswarm.gossip.wire import (
    MAX_U,
    PROTO_CHAIN,
    PROTO_CKPT,
    PROTO_HELLO,
    PROTO_INPUTS,
    PROTO_MSG,
    TOPIC,
    ChainRequest,
    ChainResponse,
    CheckpointManifest,
    CheckpointRequest,
    Contribution,
    ContributionsRequest,
    FraudProof,
    Hello,
    Join,
    Leave,
    Record,
    decode_as,
)
from seedswarm.node.core.reasons import Reason
from seedswarm.node.daemon.traffic import gossip_validator

#: Direct requests per identity at most (it also rotates on estimated strikes, see direct_streams).
DIRECT_PER_IDENTITY = 25
#: Gossip: messages per RPC and per connection (one throwaway identity per connection), deep and
#: broken. The node reads its pubsub streams one RPC at a time each, in turn, and a deep message
#: costs it several times what a broken one does: broken RPCs are larger, or the deep lane would
#: pace the broken one.
PER_RPC = {True: 50, False: 500}
PER_BATCH = {True: 1000, False: 5000}
#: Validator-failing messages at the start of a broken batch: with the guard's penalised drops
#: after them, the identity is graylisted after about GRAYLIST_AFTER invalid messages.
BAD_GOSSIP_PER_IDENTITY = GRAYLIST_AFTER // 2
#: Seconds a gossip connection stays open after its last write at most (it closes as soon as
#: the node has read everything, see Fuzzer.gossip_accounting).
GOSSIP_LINGER_MAX_S = 120.0
#: ... or as soon as the lane's counters stood still this long while it waited (messages lost).
GOSSIP_STALL_S = 15.0


@dataclass
class FuzzConfig:
    messages: int = 100_000
    seed: int = 0
    out: str = ""
    raw_frames: bool = True
    direct_workers: int = 6
    streams_per_worker: int = 3
    deep_share: float = 0.15  # share of gossip messages that reach the core (the rest: broken envelopes)
    gossip_rate: float = 700.0  # gossip messages written per second, all sessions together
    rss_limit_mb: float = 50.0
    warmup_s: float = 15.0
    drain_s: float = 120.0
    timeout_s: float = 3600.0
    quiet: bool = False


@dataclass
class Context:
    """What the fuzzer knows about the victim: enough to build valid messages of its run."""

    run_id: bytes
    target: Target
    directions: int
    round: int = 0
    head: bytes = b""
    records: list[bytes] = field(default_factory=list)
    record_hashes: list[bytes] = field(default_factory=list)
    manifest: CheckpointManifest | None = None


class Fuzzer:
    def __init__(self, cfg: FuzzConfig, log: Any = sys.stderr) -> None:
        self.cfg = cfg
        self.log = log
        self.rng = random.Random(cfg.seed)
        self.mut = Mutator(random.Random(cfg.seed + 1))
        self.tally = Tally()
        self.ops: Counter[str] = Counter()
        self.rss: list[tuple[float, float]] = []
        self.rounds: list[tuple[float, int]] = []
        self.identities = 0
        self.errors: Counter[str] = Counter()
        self.phase = "setup"
        self.waiting: dict[str, tuple[int, threading.Event]] = {}  # lane -> (messages, release)
        self.consumed: dict[str, float] = {}
        self.stalled: set[str] = set()

    def say(self, msg: str) -> None:
        if not self.cfg.quiet:
            print(msg, file=self.log, flush=True)

    # -- the victim -----------------------------------------------------------------------
    def start_daemon(self) -> None:
        from seedswarm import cli
        from seedswarm.bench.adversary import peer_id_of
        from seedswarm.crypto.keys import Identity
        from seedswarm.node.core.genesis import Genesis
        from seedswarm.sim.cluster import free_ports

        out = Path(self.cfg.out)
        out.mkdir(parents=True, exist_ok=True)
        self.genesis_path, self.data = out / "genesis.json", out / "node"
        if self.data.exists():
            raise RuntimeError(f"{self.data} exists: use a new --out folder")
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            rc = cli.main(["init", "--out", str(self.genesis_path), "--data-dir", str(self.data), "--trainers", "4",
                           "--seed", str(self.cfg.seed)])
        if rc != 0:
            raise RuntimeError("seedswarm init failed")
        g = Genesis.load(self.genesis_path)
        port, self.metrics_port = free_ports(2)
        key = Identity.load(self.data / "identity.key").public
        self.validator = gossip_validator(g.run_id)
        self.ctx = Context(run_id=g.run_id, directions=g.directions * g.groups,
                           target=Target("victim", f"/ip4/127.0.0.1/tcp/{port}/p2p/{peer_id_of(key)}", key))
        self.logf = open(out / "node.log", "ab")  # noqa: SIM115 - closed in stop_daemon
        env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "seedswarm", "node", "--genesis", str(self.genesis_path), "--data-dir", str(self.data),
             "--listen", f"/ip4/127.0.0.1/tcp/{port}", "--metrics-port", str(self.metrics_port), "--log-format", "json"],
            stdin=subprocess.DEVNULL, stdout=self.logf, stderr=self.logf, env=env, start_new_session=True)

    def http(self, path: str, timeout: float = 5.0) -> bytes | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}{path}", timeout=timeout) as r:
                data: bytes = r.read()
                return data
        except (OSError, ValueError):
            return None

    def status(self) -> dict[str, Any] | None:
        body = self.http("/status")
        with contextlib.suppress(ValueError, TypeError):
            return dict(json.loads(body)) if body else None
        return None

    def metrics(self) -> dict[str, float]:
        body = self.http("/metrics")
        return parse_metrics(body.decode(errors="replace")) if body else {}

    def rss_mb(self) -> float | None:
        try:
            for ln in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if ln.startswith("VmRSS:"):
                    return int(ln.split()[1]) / 1024.0
        except OSError:
            return None
        return None

    def stop_daemon(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                return None
        self.logf.close()
        return self.proc.returncode

    def log_tail(self, n: int = 25) -> str:
        try:
            return "\n".join((Path(self.cfg.out) / "node.log").read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    # -- valid messages of this run -----------------------------------------------------------
    def refresh(self, st: dict[str, Any] | None) -> None:
        if st:
            self.ctx.round = int(st["round"])
            self.ctx.head = bytes.fromhex(st["head"])

    async def learn_chain(self, peer: RawPeer) -> None:
        """Real records and the checkpoint manifest, fetched the way a peer would."""
        ctx = self.ctx
        out, body = await peer.request(ctx.target, PROTO_CHAIN, ChainRequest(run=ctx.run_id, start=max(0, ctx.round - 64), limit=64).encode())
        if out == "answered":
            from seedswarm.node.core.chain import record_hash

            resp = decode_as(body, ChainResponse, ctx.run_id)
            ctx.records = list(resp.records)
            ctx.record_hashes = [record_hash(decode_as(r, Record, ctx.run_id)) for r in resp.records]
        out, body = await peer.request(ctx.target, PROTO_CKPT, CheckpointRequest(run=ctx.run_id, digest=bytes(32), index=0).encode())
        if out == "answered":
            with contextlib.suppress(Exception):
                ctx.manifest = decode_as(body, CheckpointManifest, ctx.run_id)

    def valid_direct(self, peer: RawPeer) -> tuple[str, bytes]:
        """(protocol, a valid request of this run) for a direct stream."""
        ctx, r = self.ctx, self.rng
        k = r.randrange(6)
        if k == 0:
            return PROTO_MSG, Contribution(run=ctx.run_id, round=ctx.round, peer=peer.public,
                                           q=self.mut.random_bytes(ctx.directions)).signed(peer.identity).encode()
        if k == 1:
            return PROTO_CHAIN, ChainRequest(run=ctx.run_id, start=r.randrange(max(1, ctx.round + 2)),
                                             limit=r.choice((0, 1, 16, 256, MAX_U))).encode()
        if k == 2:
            digest = ctx.manifest.state if ctx.manifest is not None and r.random() < 0.7 else bytes(32)
            return PROTO_CKPT, CheckpointRequest(run=ctx.run_id, digest=digest, index=r.randrange(64)).encode()
        if k == 3:
            rh = r.choice(ctx.record_hashes) if ctx.record_hashes else os.urandom(32)
            return PROTO_INPUTS, ContributionsRequest(run=ctx.run_id, round=max(0, ctx.round - 1), record=rh).encode()
        if k == 4:
            return PROTO_HELLO, Hello.make(ctx.run_id, ctx.round, [f"/ip4/127.0.0.1/tcp/4001/p2p/{peer.id.to_base58()}"],
                                           {}).encode()
        return PROTO_MSG, r.choice(ctx.records) if ctx.records else b""

    def hostile_direct(self, peer: RawPeer) -> tuple[str, str, bytes]:
        """(op, protocol, raw bytes to write) for one hostile direct request."""
        r = self.rng
        proto, valid = self.valid_direct(peer)
        x = r.random()
        if x < 0.06:
            n = r.randrange(1, 2048)
            return "random-bytes", r.choice(PROTOCOLS), frame(self.mut.random_bytes(n))
        if x < 0.09:
            return "garbage", r.choice(PROTOCOLS), frame(GARBAGE + self.mut.random_bytes(r.randrange(300)))
        if x < 0.13:  # the frame header lies about the length
            _, data = self.mut.mutate(valid)
            lie = max(0, len(data) + r.choice((-8, -1, 1, 64, 1 << 19)))
            return "frame-length-lie", proto, lie.to_bytes(4, "big") + data
        if x < 0.16:
            return "frame-oversized", proto, (r.randrange(1 << 20 | 1, 1 << 31)).to_bytes(4, "big") + bytes(1024)
        op, data = self.mut.mutate(valid, r.choice(self.ctx.records) if self.ctx.records else None)
        if r.random() < 0.15:
            proto = r.choice(PROTOCOLS)  # a valid-looking message on the wrong protocol
            op += "+wrong-protocol"
        return op, proto, frame(data)

    def passing_gossip(self, peer: Identity) -> tuple[str, bytes]:
        """A gossip payload the topic validator accepts (signed, canonical) but that is hostile."""
        ctx, r = self.ctx, self.rng
        k = r.random()
        if k < 0.45:  # a record signed by us, random fields: reaches the core's record checks
            near = ctx.round + r.choice((0, 0, 1, 2, -1, 1000))
            prev = ctx.head if r.random() < 0.6 else (r.choice(ctx.record_hashes) if ctx.record_hashes and r.random() < 0.5 else os.urandom(32))
            joins = tuple(self.mut.mutate(j)[1][:400] for j in r.sample(ctx.records, min(len(ctx.records), r.randrange(3)))) if ctx.records else ()
            rec = Record(run=ctx.run_id, round=max(0, near), prev=prev, aggregator=peer.public,
                         contributors=self.mut.random_bytes(r.randrange(1, 4)), contrib_root=os.urandom(32),
                         aggregate=self.mut.random_bytes(2 * r.choice((ctx.directions, ctx.directions, 1, 3))),
                         joins=joins, evidence=tuple(self.mut.random_bytes(r.randrange(1, 80)) for _ in range(r.randrange(2))),
                         ).signed(peer)
            return "signed-record", rec.encode()
        if k < 0.8:  # a fraud proof around a real (or mutated) record, mutated contributions
            base = r.choice(ctx.records) if ctx.records else GARBAGE
            inner = base if r.random() < 0.3 else self.mut.mutate(base)[1]
            contribs = tuple(self.mut.random_bytes(r.randrange(1, 300)) for _ in range(r.randrange(4)))
            return "fraud-proof", FraudProof(run=ctx.run_id, record=inner[:150_000], contributions=contribs).encode()
        if k < 0.92:  # a join signed by a fresh key, outside its validity window, without work
            ident = Identity.from_seed(os.urandom(32))
            rnd = r.choice((ctx.round + 10**6, MAX_U))
            return "signed-join-out-of-window", Join(run=ctx.run_id, round=rnd, peer=ident.public,
                                                     cert=self.mut.random_bytes(r.randrange(0, 64))).signed(ident).encode()
        return "signed-leave-non-member", Leave(run=ctx.run_id, round=ctx.round, peer=peer.public).signed(peer).encode()

    def failing_gossip(self, peer: Identity) -> tuple[str, bytes]:
        """A byte-mutated gossip payload the node's topic validator rejects (it costs GossipSub
        score). Checked with that validator: a mutation inside a fraud proof's record, say,
        leaves a valid fraud proof, which would be delivered instead."""
        r = self.rng
        for _ in range(8):
            if r.random() < 0.15:
                op, data = "random-bytes", self.mut.random_bytes(r.randrange(1, 1024))
            else:
                base = r.choice(self.ctx.records) if self.ctx.records and r.random() < 0.5 else self.passing_gossip(peer)[1]
                op, data = self.mut.mutate(base)
            if not self.validator(data, ""):
                return op, data
        return "garbage", GARBAGE + self.mut.random_bytes(r.randrange(1, 256))

    def deep_gossip(self, peer: Identity) -> tuple[str, bytes]:
        """passing_gossip, checked with the node's topic validator (each deep message must be
        delivered: the lane's accounting counts on it)."""
        for _ in range(8):
            op, data = self.passing_gossip(peer)
            if self.validator(data, ""):
                return op, data
        raise AssertionError("passing_gossip built eight messages the node's validator rejects")

    # -- senders --------------------------------------------------------------------------
    def budget_left(self) -> bool:
        return self.tally.total < self.cfg.messages and self.proc.poll() is None

    async def direct_worker(self, w: int) -> None:
        while self.budget_left() and self.phase == "fuzz":
            peer = RawPeer(self.ctx.run_id)
            self.identities += 1
            spent = [0.0, 0.0]  # requests, estimated strikes
            try:
                async with peer.running():
                    with trio.fail_after(15):
                        await peer.connect(self.ctx.target)
                    async with trio.open_nursery() as nursery:
                        for _ in range(self.cfg.streams_per_worker):
                            nursery.start_soon(self.direct_streams, peer, spent)
            except Exception as e:  # noqa: BLE001 - a new identity and on
                self.errors[f"direct:{type(e).__name__}"] += 1
                await trio.sleep(0.2)

    async def direct_streams(self, peer: RawPeer, spent: list[float]) -> None:
        """One request per stream, one stream after the other, until the identity is spent:
        DIRECT_PER_IDENTITY requests, or strikes that with the requests still in flight could
        reach the ban (each refusal is counted at the worst weight of its protocol)."""
        worst = strikes(Reason.BAD_SIGNATURE)
        in_flight = self.cfg.streams_per_worker * worst
        while (spent[0] < DIRECT_PER_IDENTITY and spent[1] + in_flight < 2 * ROTATE_AT_STRIKES
               and self.budget_left() and self.phase == "fuzz"):
            spent[0] += 1
            op, proto, raw = self.hostile_direct(peer)
            half = not op.startswith("frame-length-lie") or self.rng.random() < 0.5
            out, _ = await peer.request(self.ctx.target, proto, raw=raw, timeout=15, half_close=half)
            if out not in ("answered", "too-large"):
                spent[1] += worst if proto in (PROTO_MSG, PROTO_HELLO) else strikes(Reason.MALFORMED)
            self.tally.add(f"direct:{proto}", 1, out)
            self.ops[f"direct:{op.split('+')[0]}"] += 1

    def gossip_batch(self, ident: Identity, kp: Any, deep: bool, budget: int) -> tuple[hostile.Attack, Counter[str]]:
        """The RPCs of one gossip connection (one throwaway identity), at most ``budget`` messages.

        Deep: every message signed and valid in form, hostile in content; they pass the topic
        validator and reach the protocol core. Broken: BAD_GOSSIP_PER_IDENTITY messages the
        validator rejects, then broken pubsub envelopes (bad or missing signature, data changed
        after signing, another author, a topic nobody has) that the pubsub guard drops; after
        about GRAYLIST_AFTER of those the identity is graylisted and the rest is dropped cheaply.
        """
        topic = topic_of(self.ctx.run_id)
        counts: Counter[str] = Counter()
        frames: list[bytes] = []
        left = budget
        if not deep:
            bad = [self.failing_gossip(ident) for _ in range(min(left, BAD_GOSSIP_PER_IDENTITY))]
            frames.append(rpc([hostile.signed_message(kp, topic, d) for _, d in bad]))
            for op, _ in bad:
                self.ops[f"gossip-validator-failing:{op}"] += 1
            counts["gossip:validator-failing"] += len(bad)
            left -= len(bad)
        pool = [self.passing_gossip(ident)[1] for _ in range(0 if deep else 8)]  # envelopes: payload unread
        while left > 0:
            msgs = []
            for _ in range(min(PER_RPC[deep], left)):
                if deep:
                    op, data = self.deep_gossip(ident)
                    msgs.append(hostile.signed_message(kp, topic, data))
                    self.ops[f"gossip-deep:{op}"] += 1
                else:
                    op, m = envelope_mutant(kp, topic, self.rng.choice(pool), self.rng)
                    msgs.append(m)
                    self.ops[f"gossip-envelope:{op}"] += 1
            left -= len(msgs)
            counts["gossip:deep (validator-passing)" if deep else "gossip:broken-envelope"] += len(msgs)
            frames.append(rpc(msgs))
        return hostile.Attack(tuple(frames)), counts

    async def gossip_lane(self, deep: bool) -> None:
        """Gossip batches of one kind (deep or broken, see gossip_batch), each from a fresh
        identity on its own connection (``hostile.send``), paced to the lane's share of
        ``--gossip-rate`` (a node saturated by gossip would starve the direct streams). Each
        connection stays open until the node has accounted for every message of the lane
        (a close would drop what it has not read yet): see gossip_accounting."""
        cfg = self.cfg
        lane = "deep" if deep else "broken"
        rate = max(1.0, cfg.gossip_rate * (cfg.deep_share if deep else 1.0 - cfg.deep_share))
        queued = 0
        while self.budget_left() and self.phase == "fuzz":
            seed = os.urandom(32)
            ident, kp = Identity.from_seed(seed), create_identity_from_seed(seed)
            self.identities += 1
            t0 = trio.current_time()
            attack, counts = self.gossip_batch(ident, kp, deep, min(PER_BATCH[deep],
                                                                    cfg.messages - self.tally.total))
            n = sum(counts.values())
            if n == 0:
                return
            queued += n
            release = threading.Event()
            self.waiting[lane] = (queued, release)
            out = await send_pubsub(self.ctx.target, attack, self.ctx.run_id, seed=seed, linger=GOSSIP_LINGER_MAX_S,
                                    timeout=60, release=release)
            for k, v in counts.items():
                self.tally.add(k, v, out)
            if out != "written":
                self.errors[f"gossip:{out}"] += 1
            if not release.is_set() or lane in self.stalled:  # not all accounted for: go on from here
                self.stalled.discard(lane)
                self.errors[f"gossip:{lane}: closed before the node had accounted for everything"] += 1
                queued = int(self.consumed.get(lane, 0))
            await trio.sleep(max(0.0, n / rate - (trio.current_time() - t0)))

    async def gossip_accounting(self, base: dict[str, float]) -> None:
        """Releases a lane's connection once the node has accounted for every message the lane
        sent: each one ends in exactly one counter, delivered (``gossip_messages_received``:
        every deep message passes the validator), refused by the validator
        (``gossip_rejected``) or dropped by the pubsub guard (``gossip_dropped{reason}``).
        One connection per lane at a time, so the counters attribute exactly."""

        def lanes(m: dict[str, float]) -> dict[str, float]:
            broken = m.get(f"gossip_rejected{{{TOPIC}}}", 0) + sum(v for k, v in m.items() if k.startswith("gossip_dropped{"))
            return {"deep": m.get(f"gossip_messages_received{{{TOPIC}}}", 0), "broken": broken}

        b = lanes(base)
        moved_at: dict[str, float] = {}
        while self.phase in ("fuzz", "drain"):
            m = await trio.to_thread.run_sync(self.metrics)
            t = trio.current_time()
            if m:
                now = lanes(m)
                consumed = {k: now[k] - b[k] for k in now}
                for k, v in consumed.items():
                    if v != self.consumed.get(k):
                        moved_at[k] = t
                self.consumed = consumed
                for lane, (need, ev) in list(self.waiting.items()):
                    if ev.is_set():
                        continue
                    if consumed[lane] >= need:
                        ev.set()
                    elif t - moved_at.get(lane, t) > GOSSIP_STALL_S:  # lost on the way: stop waiting
                        self.stalled.add(lane)
                        ev.set()
            await trio.sleep(0.3)

    async def drain(self) -> float:
        """After the last write: wait until the daemon's counters stop moving (bounded)."""
        t0 = time.time()

        def progress() -> float:
            m = self.metrics()
            # refusals only: the node's own rounds move core_events all the time
            return sum(v for k, v in m.items() if k.startswith(("rejected_total", "gossip_rejected", "gossip_dropped",
                                                                 "core_events{rejected.")))

        last, stable = -1.0, 0
        while time.time() - t0 < self.cfg.drain_s and self.proc.poll() is None:
            cur = await trio.to_thread.run_sync(progress)
            stable = stable + 1 if cur == last else 0
            if stable >= 4:
                break
            last = cur
            await trio.sleep(0.5)
        return time.time() - t0

    async def raw_frames(self) -> None:
        """Every raw pubsub case of ``hostile.build`` three times, each from a fresh identity,
        after everything else was measured (they used to stop a stock py-libp2p host)."""
        topic = topic_of(self.ctx.run_id)
        limiter = trio.CapacityLimiter(8)

        async def one(case: str) -> None:
            async with limiter:
                if self.proc.poll() is not None:
                    return
                seed = os.urandom(32)
                self.identities += 1
                attack, linger = raw_pubsub(case, topic, seed)
                out = await send_pubsub(self.ctx.target, attack, self.ctx.run_id, seed=seed, linger=linger)
                self.tally.add(f"raw-pubsub:{case}", 1, out)

        async with trio.open_nursery() as nursery:
            for case in RAW_PUBSUB_CASES:
                for _ in range(3):
                    nursery.start_soon(one, case)

    async def sampler(self, t0: float) -> None:
        last_print = 0.0
        while self.phase in ("fuzz", "drain", "raw"):
            now = time.time()
            rss = self.rss_mb()
            if rss is not None:
                self.rss.append((now - t0, rss))
            st = await trio.to_thread.run_sync(self.status)
            if st is not None:
                self.refresh(st)
                self.rounds.append((now - t0, int(st["round"])))
            if now - last_print > 5:
                last_print = now
                sent = self.tally.total
                rate = sent / max(1e-9, now - t0)
                eta = (self.cfg.messages - sent) / rate if rate > 0 else 0
                r0 = self.rounds[0][1] if self.rounds else 0
                self.say(f"fuzz {now - t0:6.0f}s  {self.phase:4s} sent {sent:7d}/{self.cfg.messages} ({rate:5.0f}/s, ETA "
                         f"{int(eta) // 60}:{int(eta) % 60:02d})  round {self.ctx.round} (+{self.ctx.round - r0})  "
                         f"RSS {rss or 0:.0f} MB (peak {max((x for _, x in self.rss), default=0):.0f})  "
                         f"identities {self.identities}")
            if self.proc.poll() is not None:
                return
            await trio.sleep(1.0)

    async def main(self) -> dict[str, Any]:
        cfg = self.cfg
        _quiet_libp2p()
        # the daemon: running and past round 3 (bounded)
        deadline = time.time() + 180
        st = None
        while time.time() < deadline:
            st = await trio.to_thread.run_sync(self.status)
            if st and st.get("state") == "running" and int(st["round"]) >= 3:
                break
            if self.proc.poll() is not None:
                raise RuntimeError(f"the daemon exited with {self.proc.returncode}:\n{self.log_tail()}")
            await trio.sleep(0.5)
        else:
            raise RuntimeError("the daemon did not reach round 3 within 180 s")
        self.refresh(st)
        probe = RawPeer(self.ctx.run_id)
        async with probe.running():
            await self.learn_chain(probe)
        self.say(f"fuzz: victim pid {self.proc.pid} at round {self.ctx.round}; {len(self.ctx.records)} real records, "
                 f"manifest {'yes' if self.ctx.manifest else 'no'}; sending {cfg.messages} messages")
        m0 = await trio.to_thread.run_sync(self.metrics)
        t0 = time.time()
        self.phase = "fuzz"
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.sampler, t0)
            nursery.start_soon(self.gossip_accounting, m0)
            async with trio.open_nursery() as senders:
                for w in range(cfg.direct_workers):
                    senders.start_soon(self.direct_worker, w)
                senders.start_soon(self.gossip_lane, True)
                senders.start_soon(self.gossip_lane, False)

                async def watchdog() -> None:
                    while self.budget_left() and time.time() - t0 < cfg.timeout_s:
                        await trio.sleep(0.5)
                    self.phase = "drain"  # the senders finish what they are writing, then stop

                senders.start_soon(watchdog)
            self.say(f"fuzz: {self.tally.total} messages written in {time.time() - t0:.0f} s; "
                     "waiting for the node to read them all")
            self.drain_seconds = await self.drain()
            fuzz_s = time.time() - t0
            alive_fuzz = self.proc.poll() is None
            st1 = await trio.to_thread.run_sync(self.status)
            m1 = await trio.to_thread.run_sync(self.metrics)
            m2 = m1
            rss_fuzz = list(self.rss)
            raw_alive: bool | None = None
            if cfg.raw_frames and alive_fuzz:
                self.phase = "raw"
                await self.raw_frames()
                r_before = int(st1["round"]) if st1 else 0
                # still applying rounds after the raw frames, and every drop counted? (bounded)
                last: dict[str, float] = {}
                for _ in range(60):
                    st2 = await trio.to_thread.run_sync(self.status)
                    m2 = await trio.to_thread.run_sync(self.metrics)
                    drops = {k: v for k, v in m2.items() if k.startswith("gossip_dropped")}
                    raw_alive = self.proc.poll() is None and st2 is not None and int(st2["round"]) > r_before + 3
                    if raw_alive and drops == last or self.proc.poll() is not None:
                        break
                    last = drops
                    await trio.sleep(0.5)
            self.phase = "done"
            nursery.cancel_scope.cancel()
        return self.summarize(t0, fuzz_s, m0, m1, m2, st1, alive_fuzz, rss_fuzz, raw_alive)

    def summarize(self, t0: float, fuzz_s: float, m0: dict[str, float], m1: dict[str, float], m2: dict[str, float],
                  st1: dict[str, Any] | None,
                  alive: bool, rss: list[tuple[float, float]], raw_alive: bool | None) -> dict[str, Any]:
        cfg = self.cfg
        failures: list[str] = []
        sent, outcomes = self.tally.snapshot()
        total = sum(v for k, v in sent.items() if not k.startswith("raw-pubsub"))
        rounds_in = [r for t, r in self.rounds if t <= fuzz_s]
        advanced = (max(rounds_in) - min(rounds_in)) if rounds_in else 0
        warm = [x for t, x in rss if t >= min(cfg.warmup_s, fuzz_s / 5)]
        rss_start = rss[0][1] if rss else None
        rss_warm = warm[0] if warm else None
        rss_peak = max((x for _, x in rss), default=None)
        rss_end = rss[-1][1] if rss else None
        growth = (max(warm) - rss_warm) if warm and rss_warm is not None else None
        # after the drain: what stayed (a leak) as opposed to what was buffered while we wrote
        residual = (rss_end - rss_warm) if rss_end is not None and rss_warm is not None else None

        def delta(prefix: str, a: dict[str, float] = m0, b: dict[str, float] = m1) -> dict[str, int]:
            keys = {k for k in (*a, *b) if k.startswith(prefix)}
            return {k[len(prefix):].strip("{}") or prefix: int(b.get(k, 0) - a.get(k, 0)) for k in sorted(keys)
                    if b.get(k, 0) - a.get(k, 0)}

        rejected = delta("rejected_total")
        gossip_rejected = sum(delta("gossip_rejected").values())
        transport = {k: int(m1.get(k, 0) - m0.get(k, 0)) for k in
                     ("frames_too_large", "protocol_mismatches", "requests_failed", "requests_served", "events_dropped",
                      "peers_refused_total", "validator_errors", "handler_errors")}
        core = delta("core_events")
        dropped = delta("gossip_dropped")
        raw_dropped = delta("gossip_dropped", m1, m2)
        moved = sum(rejected.values()) + gossip_rejected + sum(dropped.values())
        if not alive:
            failures.append(f"the daemon died during the fuzz (exit {self.proc.returncode}):\n{self.log_tail()}")
        if advanced < 5:
            failures.append(f"the daemon applied only {advanced} rounds during the fuzz")
        if growth is None or growth >= 2 * cfg.rss_limit_mb:
            failures.append(f"RSS peaked {growth} MB above its warm-up level (limit {2 * cfg.rss_limit_mb} MB)")
        if residual is None or residual >= cfg.rss_limit_mb:
            failures.append(f"RSS stayed {residual} MB above its warm-up level after the drain (limit {cfg.rss_limit_mb} MB)")
        if moved < total // 100:
            failures.append(f"rejection counters moved by {moved} for {total} hostile messages")
        if total < cfg.messages:
            failures.append(f"only {total} of {cfg.messages} messages were sent (timeout or the daemon died)")
        if raw_alive is False:
            failures.append(f"the daemon stopped applying rounds after the raw pubsub frames:\n{self.log_tail()}")
        elif raw_alive and not raw_dropped.get("rpc-decode") or raw_alive and not raw_dropped.get("no-key"):
            failures.append(f"the pubsub guard did not count the raw frames it dropped: {raw_dropped}")
        return {
            "ok": not failures,
            "failures": failures,
            "messages": total,
            "messages_per_second": round(total / max(fuzz_s, 1e-9), 1),
            "fuzz_seconds": round(fuzz_s, 1),
            "drain_seconds": round(getattr(self, "drain_seconds", 0.0), 1),
            "seed": cfg.seed,
            "sent_by_channel": dict(sorted(sent.items())),
            "mutations": dict(sorted(self.ops.items())),
            "direct_outcomes": {k: v for k, v in sorted(outcomes.items()) if k.startswith("direct:")},
            "raw_pubsub": {k: v for k, v in sorted(outcomes.items()) if k.startswith("raw-pubsub:")},
            "identities": self.identities,
            "alive_after_fuzz": alive,
            "alive_after_raw_frames": raw_alive,
            "rounds_applied_during_fuzz": advanced,
            "round_at_end": int(st1["round"]) if st1 else None,
            "rss_mb": {"start": rss_start, "after_warmup": rss_warm, "peak": rss_peak, "end": rss_end,
                       "growth_after_warmup": round(growth, 1) if growth is not None else None,
                       "residual_after_drain": round(residual, 1) if residual is not None else None,
                       "limit": cfg.rss_limit_mb, "peak_limit": 2 * cfg.rss_limit_mb},
            "rss_samples": [(round(t, 1), round(x, 1)) for t, x in rss[:: max(1, len(rss) // 60)]],
            "rejected_by_reason": rejected,
            "gossip_rejected_by_validator": gossip_rejected,
            "transport_counters": transport,
            "gossip_dropped_by_reason": dropped,
            "raw_pubsub_dropped_by_reason": raw_dropped,
            "bans": int(m1.get("bans_total", 0) - m0.get("bans_total", 0)),
            "core_rejections": {k: v for k, v in core.items() if k.startswith("rejected.")},
            "core_events": core,
            "client_errors": dict(self.errors),
        }


def table(s: dict[str, Any]) -> str:
    r = s["rss_mb"]
    lines = [
        f"seedswarm bench fuzz: {s['messages']} hostile messages in {s['fuzz_seconds']} s, drain included "
        f"({s['messages_per_second']}/s, {s['identities']} identities), seed {s['seed']}",
        "",
        f"{'RESULT':30s} {'PASS' if s['ok'] else 'FAIL'}",
    ]
    lines += [f"  FAILURE: {f}" for f in s["failures"]]
    lines += [
        f"{'alive after the fuzz':30s} {s['alive_after_fuzz']}",
        f"{'alive after raw pubsub frames':30s} {s['alive_after_raw_frames']}",
        f"{'rounds applied during the fuzz':30s} {s['rounds_applied_during_fuzz']}",
        f"{'RSS MB start/warm/peak/end':30s} {r['start']:.0f} / {r['after_warmup']:.0f} / {r['peak']:.0f} / {r['end']:.0f}"
        f"  (peak - warm {r['growth_after_warmup']} MB, limit {r['peak_limit']}; end - warm {r['residual_after_drain']} MB,"
        f" limit {r['limit']})" if r["start"] else "RSS: not sampled",
        "",
        "sent by channel:",
    ]
    lines += [f"  {k:40s} {v}" for k, v in s["sent_by_channel"].items()]
    lines.append("rejected by the daemon (rejected_total{reason}):")
    lines += [f"  {k:40s} {v}" for k, v in s["rejected_by_reason"].items()]
    lines.append(f"  {'gossip validator (gossip_rejected)':40s} {s['gossip_rejected_by_validator']}")
    lines.append(f"  {'peers banned (bans_total)':40s} {s['bans']}")
    lines.append("pubsub guard drops (gossip_dropped{reason}):")
    lines += [f"  {k:40s} {v}" for k, v in s["gossip_dropped_by_reason"].items()]
    lines.append("raw pubsub frames sent, and the guard's drops after them:")
    lines += [f"  {k:40s} {v}" for k, v in s["raw_pubsub"].items()]
    lines += [f"  dropped: {k:31s} {v}" for k, v in s["raw_pubsub_dropped_by_reason"].items()]
    lines.append("core events (core_events{event}, refusals and drops):")
    lines += [f"  {k:40s} {v}" for k, v in s["core_events"].items()
              if k.startswith(("rejected.", "records.duplicate", "records.orphan", "records.known_bad",
                               "checkpoints.missing", "inputs.unavailable", "banned."))]
    lines.append("transport counters:")
    lines += [f"  {k:40s} {v}" for k, v in s["transport_counters"].items()]
    lines.append("mutations (top 12):")
    lines += [f"  {k:40s} {v}" for k, v in sorted(s["mutations"].items(), key=lambda kv: -kv[1])[:12]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point for ``seedswarm bench fuzz``."""
    d = FuzzConfig()
    ap = parser("seedswarm bench fuzz",
                "Mutated valid messages and random bytes against a live daemon, over real libp2p streams and "
                "raw pubsub RPCs; checks that it survives, keeps training, counts what it refused and keeps "
                "its memory flat.",
                ["seedswarm bench fuzz --messages 100000 --json",
                 "seedswarm bench fuzz --messages 5000 --raw-frames off"])
    ap.add_argument("--messages", type=int, default=d.messages, help="messages to send in all")
    ap.add_argument("--seed", type=int, default=d.seed, help="seed of the mutations")
    ap.add_argument("--json", action="store_true", help="print one JSON summary on stdout")
    ap.add_argument("--out", default=None, help="output folder (default: a temporary one)")
    ap.add_argument("--raw-frames", choices=("on", "off"), default="on",
                    help="raw pubsub frames at the end (every case of seedswarm.gossip.libp2p.hostile, three times)")
    ap.add_argument("--direct-workers", type=int, default=d.direct_workers,
                    help="identities sending on direct streams at once")
    ap.add_argument("--gossip-rate", type=float, default=d.gossip_rate, help="gossip messages written per second")
    ap.add_argument("--deep-share", type=float, default=d.deep_share,
                    help="share of gossip messages valid in form (they reach the core); the rest break the pubsub envelope")
    ap.add_argument("--rss-limit-mb", type=float, default=d.rss_limit_mb,
                    help="RSS may end at most this far above its warm-up level, and peak at most twice as far")
    ap.add_argument("--timeout", type=float, default=d.timeout_s, help="seconds of fuzzing at most")
    ap.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    args = ap.parse_args(argv)
    if args.messages < 1:
        print("seedswarm bench fuzz: --messages must be positive", file=sys.stderr)
        return 2
    tmp = None
    out = args.out
    if out is None:
        tmp = tempfile.mkdtemp(prefix="seedswarm-fuzz-")
        out = tmp
    cfg = FuzzConfig(messages=args.messages, seed=args.seed, out=out, raw_frames=args.raw_frames == "on",
                     direct_workers=args.direct_workers, deep_share=args.deep_share,
                     gossip_rate=args.gossip_rate,
                     rss_limit_mb=args.rss_limit_mb, timeout_s=args.timeout, quiet=args.quiet)
    fz = Fuzzer(cfg)
    try:
        fz.start_daemon()
        summary = trio.run(fz.main)
    except KeyboardInterrupt:
        print("seedswarm bench fuzz: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - one clear line
        print(f"seedswarm bench fuzz: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    finally:
        rc = fz.stop_daemon() if hasattr(fz, "proc") else None
    summary["exit_code_on_sigterm"] = rc
    if summary["alive_after_fuzz"] and summary["alive_after_raw_frames"] is not False and rc != 0:
        summary["failures"].append(f"the daemon exited {rc} on SIGTERM (expected 0)")
        summary["ok"] = False
    summary["out"] = out
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "fuzz.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary) if args.json else table(summary))
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
