"""Hostile pubsub input against a real Libp2pHost (py-libp2p 0.8.1 on loopback).

For each attack of ``seedswarm.gossip.libp2p.hostile``: a victim and an honest peer share the
topic ``records``; the attacker (a raw py-libp2p host) writes its bytes on a ``/meshsub/1.x``
stream to the victim. The victim must keep running, count the drop under its reason in
``HostStats.gossip_dropped``, charge the attacker score for it unless an honest peer can cause
it, and still deliver the honest peer's next message.

The last tests pin the stock library behaviour the guard exists for (py-libp2p 0.8.1: one input
each stops the host). They are cheap (a few seconds) and fail only when the library is fixed.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import pytest
import trio
from libp2p.peer.id import ID

from seedswarm.gossip.libp2p import UNPENALISED, GossipMessage, HostConfig, Libp2pHost, hostile
from seedswarm.gossip.libp2p.tuning import PUBSUB_MAX_TOPICS_PER_PEER

PREFIX = "/seedswarm/1/0123456789abcdef"
TOPIC = "records"
WIRE_TOPIC = f"{PREFIX}/{TOPIC}"
ATTACKER_SEED = b"\xa7" * 32
ATTACKER = hostile.peer_id_of_seed(ATTACKER_SEED)


def _accept(data: bytes, peer: str) -> bool:
    return True


async def _wait(pred: Callable[[], Awaitable[bool] | bool], timeout: float, what: str) -> None:
    """Poll a condition (generous bounds: the machine has two busy cores)."""
    async with asyncio.timeout(timeout):
        while True:
            v = pred()
            if isinstance(v, Awaitable):
                v = await v
            if v:
                return
            await asyncio.sleep(0.05)
    raise AssertionError(what)  # pragma: no cover - asyncio.timeout raises first


@dataclass
class Pair:
    victim: Libp2pHost
    honest: Libp2pHost

    @property
    def addr(self) -> str:
        return self.victim.listen_addrs[0]

    async def attacker_p4(self) -> float:
        """The attacker's invalid-message score counters, read on the victim's trio thread."""
        async def op() -> float:
            gs = self.victim._gossip.gossipsub
            assert gs is not None and gs.scorer is not None
            return float(sum(gs.scorer.invalid_messages.get(ID.from_base58(ATTACKER), {}).values()))

        return await self.victim._bridge.call(op, "read the score")

    async def raw_messages(self) -> list[bytes]:
        out = []
        while self.victim._bridge.pending_events():
            ev = await self.victim.next_event()
            if isinstance(ev, GossipMessage):
                out.append(ev.data)
        return out

    async def still_delivers(self) -> None:
        """The victim is running and receives the honest peer's next message."""
        assert self.victim.running
        await self.honest.publish(TOPIC, b"normal after attack")
        async with asyncio.timeout(15):
            while True:
                ev = await self.victim.next_event()
                if isinstance(ev, GossipMessage) and ev.data == b"normal after attack":
                    return


@pytest.fixture
async def pair() -> AsyncIterator[Pair]:
    def cfg(seed: int) -> HostConfig:
        # io_timeout_s=1: the stalled-frame deadline (io_timeout_s + size at 64 KiB/s) is short
        return HostConfig(identity_seed=bytes([seed]) * 32, listen=["/ip4/127.0.0.1/tcp/0"],
                          protocol_prefix=PREFIX, io_timeout_s=1.0)

    victim, honest = Libp2pHost(cfg(10)), Libp2pHost(cfg(11))
    try:
        async with asyncio.timeout(30):
            await victim.start()
            await honest.start()
            await honest.connect(victim.listen_addrs[0])
            await victim.subscribe(TOPIC, _accept)
            await honest.subscribe(TOPIC, _accept)
            await _wait(lambda: _in_mesh(victim, honest), 20, "mesh")
        yield Pair(victim, honest)
    finally:
        await honest.stop()
        await victim.stop()


async def _in_mesh(a: Libp2pHost, b: Libp2pHost) -> bool:
    return b.peer_id in await a.topic_peers(TOPIC, mesh_only=True)


#: attack -> what the victim counts (one attack each).
EXPECTED: dict[str, dict[str, int]] = {
    "valid": {},
    "garbage-rpc": {"rpc-decode": 1},
    "bad-key": {"no-key": 1},
    "bad-signature": {"bad-signature": 1},
    "key-mismatch": {"bad-signature": 1},  # the key embedded in the claimed author wins
    "no-signature": {"no-signature": 1},
    "truncated-rpc": {"truncated-rpc": 1},
    "oversized-rpc": {"oversized-rpc": 1},
    "stalled-rpc": {"stalled-rpc": 1},
    "bad-varint": {"bad-varint": 1},
    "bad-peer-record": {"bad-peer-record": 1},
    "wrong-topic": {"unsubscribed-topic": 1},
    "bad-then-valid": {"bad-signature": 1},
    "empty-rpcs": {},
    "control-junk": {},
}


async def _attack(p: Pair, kind: str, protocol: str = hostile.MESHSUB_V11, linger: float = 1.0,
                  release: threading.Event | None = None) -> None:
    attack = hostile.build(kind, WIRE_TOPIC, ATTACKER_SEED)
    who = await hostile.send_async(p.addr, attack, protocol=protocol, seed=ATTACKER_SEED, linger=linger,
                                   release=release)
    assert who == ATTACKER


@pytest.mark.parametrize("kind", list(EXPECTED))
async def test_host_survives_counts_and_charges(pair: Pair, kind: str) -> None:
    expected = EXPECTED[kind]
    # The attacker stays connected while we check its score (py-libp2p forgets a peer's score
    # when it disconnects), and the stalled frame needs its deadline (about 1 s) to pass.
    release = threading.Event()
    attack = asyncio.create_task(_attack(pair, kind, linger=30.0, release=release))
    try:
        await _wait(lambda: pair.victim.stats.gossip_dropped == expected, 20,
                    f"{kind}: dropped {pair.victim.stats.gossip_dropped}, expected {expected}")
        if kind in ("valid", "bad-then-valid"):
            async def arrived() -> bool:
                got.extend(await pair.raw_messages())
                return bool(got)

            got: list[bytes] = []
            await _wait(arrived, 10, "the valid message")
            assert len(got) == 1 and got[0].startswith(b"valid")
        penalised = any(r not in UNPENALISED for r in expected)
        if penalised:
            await _wait(lambda: _positive(pair.attacker_p4()), 10, "the attacker charged")
        else:
            await asyncio.sleep(0.2)
            assert await pair.attacker_p4() == 0
        assert pair.victim.stats.gossip_dropped == expected
    finally:
        release.set()
        await attack
    await pair.still_delivers()


async def _positive(v: Awaitable[float]) -> bool:
    return await v > 0


@pytest.mark.parametrize("kind", ["garbage-rpc", "bad-key", "truncated-rpc", "wrong-topic"])
async def test_meshsub_1_0_is_guarded_too(pair: Pair, kind: str) -> None:
    await _attack(pair, kind, protocol=hostile.MESHSUB_V10, linger=0.2)
    await _wait(lambda: pair.victim.stats.gossip_dropped == EXPECTED[kind], 20, f"{kind} counted")
    await pair.still_delivers()


async def test_a_flood_of_forged_messages_gets_the_forwarder_graylisted(pair: Pair) -> None:
    await _attack(pair, "flood-then-valid", linger=0.5)  # 15 forged, then a valid one

    def settled() -> bool:
        d = pair.victim.stats.gossip_dropped
        return d.get("bad-signature", 0) + d.get("graylisted", 0) == 16

    await _wait(settled, 20, f"16 drops, got {pair.victim.stats.gossip_dropped}")
    dropped = pair.victim.stats.gossip_dropped
    assert 10 <= dropped["bad-signature"] <= 12 and dropped["graylisted"] >= 4, dropped
    assert await pair.raw_messages() == []  # the valid one came from a graylisted peer
    await pair.still_delivers()


async def test_subscription_junk_is_bounded(pair: Pair) -> None:
    await _attack(pair, "subscription-junk", linger=0.5)  # 200 made-up topics, then 100 in one RPC
    want = {"too-many-topics": 200 - PUBSUB_MAX_TOPICS_PER_PEER, "too-many-subscriptions": 1}
    await _wait(lambda: pair.victim.stats.gossip_dropped == want, 20,
                f"junk counted: {pair.victim.stats.gossip_dropped}")
    await pair.still_delivers()


async def test_control_junk_leaves_no_per_topic_state(pair: Pair) -> None:
    """GRAFT/PRUNE/IHAVE for made-up topics create score entries and PRUNE backoffs in
    GossipSub; the heartbeat trim drops every one of them for topics we do not use."""
    release = threading.Event()
    task = asyncio.create_task(_attack(pair, "control-junk", linger=30.0, release=release))

    async def foreign_state() -> tuple[set[str], set[str]]:
        async def op() -> tuple[set[str], set[str]]:
            gs = pair.victim._gossip.gossipsub
            assert gs is not None and gs.scorer is not None
            scored = {t for table in (gs.scorer.time_in_mesh, gs.scorer.first_message_deliveries,
                                      gs.scorer.mesh_message_deliveries, gs.scorer.invalid_messages)
                      for per_topic in table.values() for t in per_topic}
            return scored - {WIRE_TOPIC}, set(gs.back_off) - {WIRE_TOPIC}

        return await pair.victim._bridge.call(op, "read GossipSub state")

    try:
        await asyncio.sleep(0.5)  # the junk has arrived and been handled
        # ... and at most one heartbeat (1 s) later it is gone, while the attacker is connected
        async def clean() -> bool:
            return await foreign_state() == (set(), set())

        await _wait(clean, 10, "foreign-topic state trimmed")
    finally:
        release.set()
        await task
    await pair.still_delivers()


# -- the stock library (pinned: py-libp2p 0.8.1) -------------------------------------------------


def _stock_victim(addrs: queue.Queue[str], attacked: threading.Event) -> str:
    """A plain py-libp2p host with the stock Pubsub and GossipSub (no seedswarm code but the
    security/muxer options), subscribed to the topic. 'died: ...' or 'survived'."""
    import multiaddr
    from libp2p import new_host
    from libp2p.identity_utils import create_identity_from_seed
    from libp2p.pubsub.gossipsub import GossipSub
    from libp2p.pubsub.pubsub import Pubsub
    from libp2p.tools.anyio_service import background_trio_service

    from seedswarm.gossip.libp2p.common import reason
    from seedswarm.gossip.libp2p.tuning import GOSSIPSUB_PROTOCOLS, muxer_options, security_options

    async def main() -> str:
        kp = create_identity_from_seed(b"\x31" * 32)
        listen = [multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]
        host = new_host(key_pair=kp, sec_opt=security_options(kp), muxer_opt=muxer_options(),
                        listen_addrs=listen, enable_mDNS=False, enable_upnp=False)
        gossipsub = GossipSub(protocols=list(GOSSIPSUB_PROTOCOLS), degree=6, degree_low=4, degree_high=12)
        pubsub = Pubsub(host, gossipsub)
        async with host.run(listen), background_trio_service(pubsub), background_trio_service(gossipsub):
            await pubsub.wait_until_ready()
            await pubsub.subscribe(WIRE_TOPIC)
            addrs.put(str(host.get_addrs()[0]))
            while not attacked.is_set():
                await trio.sleep(0.05)
            await trio.sleep(3.0)  # a stock host dies well within this
            return "survived"

    try:
        return trio.run(main)
    except BaseException as e:  # noqa: BLE001 - that is what we are here to see
        return f"died: {reason(e)}"


@pytest.mark.parametrize("kind", ["garbage-rpc", "bad-key"])
async def test_stock_pubsub_dies_on_it(kind: str, caplog: pytest.LogCaptureFixture) -> None:
    """Why the guard exists. If this fails, py-libp2p handles the input itself now: the guard
    may shrink (keep counting the drops)."""
    caplog.set_level("CRITICAL")  # the stock host logs its own death at length
    addrs: queue.Queue[str] = queue.Queue()
    attacked = threading.Event()
    victim = asyncio.create_task(asyncio.to_thread(_stock_victim, addrs, attacked))
    try:
        addr = await asyncio.to_thread(addrs.get, True, 30)
        attack = hostile.build(kind, WIRE_TOPIC, ATTACKER_SEED)
        with contextlib.suppress(Exception):  # the victim may die under the attacker's feet
            await hostile.send_async(addr, attack, linger=0.5)
    finally:
        attacked.set()
        outcome = await victim
    assert outcome.startswith("died"), outcome
