"""The fuzzer's lanes: the concurrent senders, and the samplers that watch the victim meanwhile.

Direct-stream workers (one identity each, several streams, rotated before the ban), a deep and
a broken gossip lane (a throwaway identity per connection, paced, each connection held until
the node's counters account for every message of the lane), the raw pubsub frames at the end,
the drain after the last write and the RSS and round sampler. A mixin of
:class:`seedswarm.bench.fuzz.Fuzzer`; the constants below size what each identity sends so that
the daemon's defences (bans, GossipSub graylisting) do not cut the lanes short.
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from typing import Any

import trio
from libp2p.identity_utils import create_identity_from_seed

from seedswarm.bench.fuzz_messages import FuzzMessages
from seedswarm.bench.hostile_peer import (
    GRAYLIST_AFTER,
    ROTATE_AT_STRIKES,
    RawPeer,
    strikes,
    topic_of,
)
from seedswarm.bench.hostile_pubsub import (
    RAW_PUBSUB_CASES,
    envelope_mutant,
    raw_pubsub,
    rpc,
    send_pubsub,
)
from seedswarm.crypto.keys import Identity
from seedswarm.gossip.libp2p import hostile
from seedswarm.gossip.wire import PROTO_HELLO, PROTO_MSG, TOPIC
from seedswarm.node.core.reasons import Reason

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
#: Not shorter: on an idle machine the node's own digits rounds run at about 17 a second and
#: take precedence, and a deep batch of 1,000 messages (records, fraud proofs, Joins that reach
#: the core) then waited more than 15 s to be counted in 3 to 4 of 5 batches, yet every one of
#: them was, within 45 s (the window this bench used to have was 15 s: those were not losses).
GOSSIP_STALL_S = 45.0


class FuzzLanes(FuzzMessages):
    """The senders and the samplers, run together by :meth:`seedswarm.bench.fuzz.Fuzzer.main`."""

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
                # A connection cut under us (a reset, a timeout: on a loaded machine a stream can
                # die mid-frame) lost what the node had not read yet; that is the transport, not
                # the node's accounting, so it is reported apart.
                what = "closed before the node had accounted for everything" if out == "written" else \
                    f"connection cut ({out}) before the node had read everything"
                self.errors[f"gossip:{lane}: {what}"] += 1
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
            t0 = trio.current_time()
            m = await trio.to_thread.run_sync(self.metrics)
            t = trio.current_time()
            self.slowest_metrics_poll_s = max(self.slowest_metrics_poll_s, t - t0)
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
                    # Lost on the way: stop waiting. "Still" is only seen between polls, and a node
                    # busy with the flood can take longer than the window to answer one: the
                    # window is never shorter than a few of the slowest polls.
                    elif t - moved_at.get(lane, t) > max(GOSSIP_STALL_S, 3 * self.slowest_metrics_poll_s):
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

