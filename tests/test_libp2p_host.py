"""Real py-libp2p hosts on loopback, driven through the asyncio adapter.

Every test is bounded (asyncio.timeout) and stops its hosts; the file runs in well under a
minute on two cores. Timings are printed (run with -s) and reported in docs/networking.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from libp2p.network.connection.raw_connection import RawConnection

from seedswarm.crypto.keys import Identity, peer_id_of, public_key_of
from seedswarm.gossip.libp2p import (
    FrameTooLargeError,
    GossipMessage,
    HostClosedError,
    HostConfig,
    HostError,
    Libp2pHost,
    PeerConnected,
    PeerDisconnected,
    ProtocolMismatchError,
    RemoteError,
    RequestTimeoutError,
    listen_address_problem,
)

PREFIX = "/seedswarm/1/0123456789abcdef"
LOOPBACK = "/ip4/127.0.0.1/tcp/0"

MakeHost = Callable[..., Awaitable[Libp2pHost]]


def _cfg(n: int, **kw: object) -> HostConfig:
    base: dict[str, object] = {
        "identity_seed": bytes([n]) * 32,
        "listen": [LOOPBACK],
        "protocol_prefix": PREFIX,
    }
    base.update(kw)
    return HostConfig(**base)


def _our_threads() -> set[threading.Thread]:
    # our trio threads, and the sweeper thread each libp2p Pubsub starts
    return {
        t for t in threading.enumerate()
        if t.name.startswith("libp2p-") or "_background_cleanup" in t.name
    }


@pytest.fixture
async def make_host() -> AsyncIterator[MakeHost]:
    hosts: list[Libp2pHost] = []

    async def make(n: int, start: bool = True, **kw: object) -> Libp2pHost:
        host = Libp2pHost(_cfg(n, **kw))
        hosts.append(host)
        if start:
            await host.start()
        return host

    yield make
    await asyncio.gather(*(h.stop() for h in hosts))


async def _next_matching(host: Libp2pHost, kind: type, timeout: float = 5.0) -> object:
    async with asyncio.timeout(timeout):
        while True:
            ev = await host.next_event()
            if isinstance(ev, kind):
                return ev


async def _wait_until(pred: Callable[[], Awaitable[bool]], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not await pred():
            await asyncio.sleep(0.05)


async def _wait_mesh(pairs: list[tuple[Libp2pHost, Libp2pHost]], topic: str) -> None:
    for a, b in pairs:
        async def in_mesh(a: Libp2pHost = a, b: Libp2pHost = b) -> bool:
            return b.peer_id in await a.topic_peers(topic, mesh_only=True)

        await _wait_until(in_mesh)


def _accept(data: bytes, peer: str) -> bool:
    return True


def _reject_bad(data: bytes, peer: str) -> bool:
    return not data.startswith(b"bad")


# -- identity -----------------------------------------------------------------------------


def test_peer_id_is_the_chain_identity() -> None:
    ident = Identity.from_seed(bytes(range(32)))
    pid = peer_id_of(ident.public)
    assert pid.startswith("12D3KooW")
    assert public_key_of(pid) == ident.public
    host = Libp2pHost(_cfg(0, identity_seed=ident.seed))
    assert host.peer_id == pid  # libp2p's own derivation agrees with crypto.keys
    with pytest.raises(ValueError):
        peer_id_of(b"short")
    with pytest.raises(ValueError):
        public_key_of("QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N")  # a hashed (non-Ed25519) id
    with pytest.raises(HostError):
        Libp2pHost(_cfg(0, identity_seed=b"x" * 31))
    with pytest.raises(HostError):
        Libp2pHost(_cfg(0, protocol_prefix="seedswarm/1/"))


# -- lifecycle ----------------------------------------------------------------------------


async def test_start_stop_cycles_leave_no_thread_and_keep_the_peer_id() -> None:
    before = _our_threads()
    ident = Identity.from_seed(b"\x07" * 32)
    ids = []
    async with asyncio.timeout(30):
        for _ in range(3):
            t0 = time.perf_counter()
            host = Libp2pHost(_cfg(7))
            await host.start()
            start_s = time.perf_counter() - t0
            assert host.running and host.listen_addrs
            assert all(a.endswith("/p2p/" + host.peer_id) for a in host.listen_addrs)
            ids.append(host.peer_id)
            t0 = time.perf_counter()
            await host.stop()
            await host.stop()  # idempotent
            stop_s = time.perf_counter() - t0
            assert stop_s < 3.0
            assert not host.running
            with pytest.raises(HostClosedError):
                await host.next_event()
            with pytest.raises(HostClosedError):
                await host.publish("t", b"x")
        print(f"\nhost start {start_s * 1e3:.1f} ms, stop {stop_s * 1e3:.1f} ms")
        assert ids == [peer_id_of(ident.public)] * 3
        # stop before start, and stop while start is in flight
        await Libp2pHost(_cfg(8)).stop()
        host = Libp2pHost(_cfg(9))
        starting = asyncio.ensure_future(host.start())
        await asyncio.sleep(0)
        await host.stop()
        with pytest.raises(HostError):
            await starting
    assert _our_threads() - before == set()


async def test_port_in_use_and_bad_multiaddr_give_host_error(make_host: MakeHost) -> None:
    before = _our_threads()
    async with asyncio.timeout(15):
        a = await make_host(1)
        port = a.listen_addrs[0].split("/")[4]
        b = Libp2pHost(_cfg(2, listen=[f"/ip4/127.0.0.1/tcp/{port}"]))
        with pytest.raises(HostError, match="in use"):
            await b.start()
        with pytest.raises(HostError, match="bad listen multiaddr"):
            await Libp2pHost(_cfg(3, listen=["/ip4/127.0.0.1/tcp/notaport"])).start()
        with pytest.raises(HostError, match="only /ip4"):
            await Libp2pHost(_cfg(3, listen=["/ip4/127.0.0.1/udp/0/quic-v1"])).start()
        with pytest.raises(HostError, match="bad peer multiaddr"):
            await Libp2pHost(_cfg(3, bootstrap=["/ip4/127.0.0.1/tcp/1"])).start()
        with pytest.raises(HostError, match="bad peer multiaddr"):
            await a.connect("/ip4/127.0.0.1/tcp/1/p2p/nonsense")
        with pytest.raises(HostError, match="own peer id"):
            await a.connect(a.listen_addrs[0])
        with pytest.raises(HostError, match="cannot connect"):
            c = Libp2pHost(_cfg(4))
            dead = c.peer_id  # a peer nobody runs
            await a.connect(f"/ip4/127.0.0.1/tcp/1/p2p/{dead}")
    await a.stop()
    assert _our_threads() - before == set()


async def test_restart_on_the_same_port_right_after_stop(make_host: MakeHost) -> None:
    """A host with inbound connections stops (its side closes them: they linger in TIME-WAIT on
    its port) and a new host listens on the same port at once. A plain bind fails here; the
    pre-check sets SO_REUSEADDR, so it does not (a restart used to fail for about 60 s)."""
    async with asyncio.timeout(30):
        a = await make_host(1)
        port = int(a.listen_addrs[0].split("/")[4])
        b, c = await make_host(2), await make_host(3)

        async def echo(peer: str, data: bytes) -> bytes:
            return data

        a.set_request_handler("echo", echo)
        for peer in (b, c):  # inbound connections to a, with traffic on them
            await peer.connect(a.listen_addrs[0])
            assert await peer.request(a.peer_id, "echo", b"x" * 1000) == b"x" * 1000
        await a.stop()
        addr = f"/ip4/127.0.0.1/tcp/{port}"
        with socket.socket() as plain:
            try:
                plain.bind(("127.0.0.1", port))
                print("\n(no TIME-WAIT left on the port this time)")
            except OSError as e:
                assert e.errno == errno.EADDRINUSE  # what a restart ran into before
        assert listen_address_problem(addr) is None
        t0 = time.perf_counter()
        a2 = await make_host(1, listen=[addr])
        print(f"\nrestart on the same port in {(time.perf_counter() - t0) * 1e3:.0f} ms")
        assert a2.listen_addrs[0].startswith(addr + "/p2p/")
        a2.set_request_handler("echo", echo)
        assert await b.connect(a2.listen_addrs[0]) == a2.peer_id
        assert await b.request(a2.peer_id, "echo", b"again") == b"again"
        # ... while a live listener is still refused, by start() and by the CLI-level check
        assert "in use" in (listen_address_problem(addr) or "")
        with pytest.raises(HostError, match="in use"):
            await make_host(4, listen=[addr])


async def test_stop_with_a_pending_request_does_not_hang(make_host: MakeHost) -> None:
    async with asyncio.timeout(15):
        a, b = await make_host(1), await make_host(2)
        started = asyncio.Event()

        async def slow(peer: str, data: bytes) -> bytes:
            started.set()
            await asyncio.sleep(60)
            return b""

        b.set_request_handler("slow", slow)
        await a.connect(b.listen_addrs[0])
        pending = asyncio.ensure_future(a.request(b.peer_id, "slow", b"x", timeout=30))
        await started.wait()
        t0 = time.perf_counter()
        await a.stop()
        assert time.perf_counter() - t0 < 3.0
        with pytest.raises(HostClosedError):
            await pending


# -- the libp2p defaults we override (pinned against library upgrades) -----------------


async def test_libp2p_defaults_are_overridden(make_host: MakeHost) -> None:
    async with asyncio.timeout(10):
        a = await make_host(1)
        host = a._host
        upgrader = host.get_network().upgrader
        assert list(upgrader.security_multistream.transports) == ["/noise"]
        assert list(upgrader.muxer_multistream.transports) == ["/yamux/1.0.0"]
        assert host.get_network().connection_config.max_connections_per_peer == 1
        assert host.mDNS is None
        # the peerstore's expiry path may not raise (tests/test_peerstore_expiry.py)
        assert "guard_peerstore" in host.get_peerstore().maybe_delete_peer_record.__qualname__
        gs = a._gossip.gossipsub
        assert gs is not None and gs.scorer is not None
        assert not gs.adaptive_gossip_enabled and not gs.spam_protection_enabled
        params = gs.scorer.params
        assert params.p4_invalid_messages.weight > 0
        assert -20 < params.graylist_threshold <= params.publish_threshold <= params.gossip_threshold < 0
        for name in ("libp2p.kad_dht", "libp2p.pubsub"):
            assert logging.getLogger(name).getEffectiveLevel() == logging.ERROR
        await a.subscribe("records", _accept)
        for _ in range(3):
            await a.publish("records", b"x")
        await asyncio.sleep(2.5)  # a few heartbeats: nothing may stretch the 1 s heartbeat
        assert gs.heartbeat_interval == 1.0
        assert not gs.recent_message_deliveries  # cleared every heartbeat


async def test_inbound_connections_that_came_and_went_do_not_use_up_the_host(make_host: MakeHost) -> None:
    """py-libp2p 0.8.1 keeps an inbound slot (max_connections - min_connections) for every
    inbound connection until the swarm stops: 250 throwaway connections in a node's life and it
    refused every new one. Here the cap leaves one slot; 12 peers come and go one after another
    and every one gets in (a real daemon with the default 300 locked up after about 240)."""
    from seedswarm.gossip.libp2p import hostile

    async with asyncio.timeout(120):
        a = await make_host(1, max_connections=8)
        addr = a.listen_addrs[0]
        for i in range(12):
            await hostile.send_async(addr, hostile.Attack(frames=()), seed=bytes([100 + i]) * 32, linger=0.05,
                                     timeout=20)
            await _wait_until(lambda: _no_peers(a), timeout=30)  # it came and went
        await hostile.send_async(addr, hostile.Attack(frames=()), seed=bytes([99]) * 32, linger=0.05, timeout=20)


async def _no_peers(host: Libp2pHost) -> bool:
    return not host.peers()


# -- security -----------------------------------------------------------------------------


def _ms_msg(text: str) -> bytes:
    body = text.encode() + b"\n"
    assert len(body) < 128
    return bytes([len(body)]) + body


async def _ms_read(reader: asyncio.StreamReader) -> str:
    n = (await reader.readexactly(1))[0]
    return (await reader.readexactly(n)).decode().rstrip("\n")


async def _propose_security(addr: str, protocol: str) -> str:
    """Speak multistream-select by hand to the listener; return its answer to `protocol`."""
    parts = addr.split("/")
    reader, writer = await asyncio.open_connection(parts[2], int(parts[4]))
    try:
        writer.write(_ms_msg("/multistream/1.0.0") + _ms_msg(protocol))
        await writer.drain()
        assert await _ms_read(reader) == "/multistream/1.0.0"
        return await _ms_read(reader)
    finally:
        writer.close()


async def test_only_noise_is_offered(make_host: MakeHost) -> None:
    async with asyncio.timeout(10):
        a = await make_host(1)
        addr = a.listen_addrs[0]
        for insecure in ("/plaintext/2.0.0", "/plaintext/1.0.0", "/tls/1.0.0", "/secio/1.0.0"):
            assert await _propose_security(addr, insecure) == "na", insecure
        assert await _propose_security(addr, "/noise") == "/noise"


# -- gossip -------------------------------------------------------------------------------


async def test_three_hosts_gossip_and_a_rejected_message_stops(make_host: MakeHost) -> None:
    async with asyncio.timeout(240):  # generous: each wait below is bounded on its own
        a, b, c = await make_host(1), await make_host(2), await make_host(3)
        t0 = time.perf_counter()
        assert await a.connect(b.listen_addrs[0]) == b.peer_id
        connect_s = time.perf_counter() - t0
        await c.connect(b.listen_addrs[0])
        assert await _next_matching(a, PeerConnected) == PeerConnected(b.peer_id)
        # the listener side learns of an inbound connection a moment after connect() returns
        async def b_sees_both() -> bool:
            return sorted(b.peers()) == sorted([a.peer_id, c.peer_id])

        await _wait_until(b_sees_both)
        assert c.peers() == [b.peer_id]  # a line: a - b - c
        await a.subscribe("records", _accept)  # a lets its own "bad" message out
        await b.subscribe("records", _reject_bad)
        await c.subscribe("records", _accept)
        await _wait_mesh([(a, b), (b, a), (b, c), (c, b)], "records")

        lat = []
        for i in range(5):
            t0 = time.perf_counter()
            await a.publish("records", b"good %d" % i)
            # 30 s, not 5: on a loaded 2-core CI machine one delivery in a few hundred runs took
            # longer than 5 s, and once longer than 10 (two hops, each through a trio thread and a
            # GossipSub validator).
            got = await _next_matching(c, GossipMessage, timeout=30.0)
            lat.append(time.perf_counter() - t0)
            assert got == GossipMessage("records", b"good %d" % i, a.peer_id)
            assert await _next_matching(b, GossipMessage) == got
        print(f"\nconnect {connect_s * 1e3:.1f} ms; gossip a->b->c latency p50 "
              f"{statistics.median(lat) * 1e3:.1f} ms")

        await a.publish("records", b"bad one")
        await a.publish("records", b"good after")
        assert await _next_matching(c, GossipMessage) == GossipMessage("records", b"good after", a.peer_id)
        assert await _next_matching(b, GossipMessage) == GossipMessage("records", b"good after", a.peer_id)
        await asyncio.sleep(0.3)
        assert c._bridge.pending_events() == 0 and b._bridge.pending_events() == 0  # "bad one" reached neither
        assert b.stats.gossip_rejected == {"records": 1}
        assert c.stats.gossip_rejected == {}
        assert c.stats.gossip_messages_received == {"records": 6}
        assert b.stats.gossip_bytes_received == {"records": 6 * 6 + 4}
        assert a.stats.gossip_bytes_published["records"] > 0

        # subscription queues are drained continuously (libp2p's hold 32 messages) and
        # there is no 10 msg/s per-peer rate limit: a burst arrives whole
        for i in range(60):
            await a.publish("records", b"burst %d" % i)
        got = [await _next_matching(b, GossipMessage) for _ in range(60)]
        assert sorted(m.data for m in got) == sorted(b"burst %d" % i for i in range(60))  # type: ignore[attr-defined]

        # a message of exactly max_message_bytes goes through (libp2p's RPC limit is 1 MiB
        # *including* the signature and peer record: we raise it)
        big = bytes(range(256)) * 4096
        await a.publish("records", big)
        async with asyncio.timeout(10):
            while (got_big := await _next_matching(c, GossipMessage)) != GossipMessage("records", big, a.peer_id):
                assert got_big.data.startswith(b"burst")  # type: ignore[attr-defined]

        # our own validator rejecting our own message: a clear error, nothing sent
        with pytest.raises(HostError, match="own validator"):
            await b.publish("records", b"bad from b")
        with pytest.raises(FrameTooLargeError):
            await a.publish("records", b"x" * ((1 << 20) + 1))

        await a.stop()
        assert await _next_matching(b, PeerDisconnected) == PeerDisconnected(a.peer_id)
        assert b.peers() == [c.peer_id]


async def test_peer_sending_invalid_messages_is_graylisted(make_host: MakeHost) -> None:
    async with asyncio.timeout(20):
        a, b = await make_host(1), await make_host(2)
        await a.connect(b.listen_addrs[0])
        await a.subscribe("records", _accept)
        await b.subscribe("records", _reject_bad)
        await _wait_mesh([(a, b), (b, a)], "records")
        await a.publish("records", b"good before")
        assert await _next_matching(b, GossipMessage) == GossipMessage("records", b"good before", a.peer_id)
        for i in range(15):
            await a.publish("records", b"bad %d" % i)

        async def settled() -> bool:
            return b.stats.gossip_rejected.get("records", 0) >= 10

        await _wait_until(settled)
        await asyncio.sleep(0.5)
        rejected = b.stats.gossip_rejected["records"]
        # about ten are validated and rejected; after that a's score is under the
        # graylist/publish thresholds and its messages are dropped before validation
        assert 10 <= rejected <= 12
        await a.publish("records", b"good after")
        with pytest.raises(TimeoutError):
            await _next_matching(b, GossipMessage, timeout=1.5)


async def test_bootstrap_drops_own_id_and_connects(make_host: MakeHost) -> None:
    async with asyncio.timeout(15):
        b = await make_host(2)
        me = peer_id_of(Identity.from_seed(b"\x05" * 32).public)
        c = await make_host(5, bootstrap=[f"/ip4/127.0.0.1/tcp/9/p2p/{me}", b.listen_addrs[0]])
        assert await _next_matching(c, PeerConnected) == PeerConnected(b.peer_id)
        assert c.peers() == [b.peer_id]


# -- direct streams -----------------------------------------------------------------------


async def test_request_response_including_one_mib(make_host: MakeHost) -> None:
    async with asyncio.timeout(20):
        a, b = await make_host(1), await make_host(2)
        seen: list[tuple[str, int]] = []
        loop = asyncio.get_running_loop()
        on_loop: list[bool] = []

        async def echo(peer: str, data: bytes) -> bytes:
            seen.append((peer, len(data)))
            on_loop.append(asyncio.get_running_loop() is loop)
            return data[::-1]

        async def nothing(peer: str, data: bytes) -> None:
            return None

        async def boom(peer: str, data: bytes) -> bytes:
            raise RuntimeError("handler bug")

        b.set_request_handler("echo", echo)
        b.set_request_handler("nothing", nothing)
        b.set_request_handler("boom", boom)
        await a.connect(b.listen_addrs[0])

        assert await a.request(b.peer_id, "echo", b"hello") == b"olleh"
        rtts = []
        for _ in range(30):
            t0 = time.perf_counter()
            await a.request(b.peer_id, "echo", b"x" * 40)
            rtts.append(time.perf_counter() - t0)
        big = bytes(range(256)) * 4096  # 1 MiB
        t0 = time.perf_counter()
        assert await a.request(b.peer_id, "echo", big) == big[::-1]
        big_s = time.perf_counter() - t0
        print(f"\nrequest round trip p50 {statistics.median(rtts) * 1e3:.2f} ms; "
              f"1 MiB echo {big_s * 1e3:.1f} ms")
        assert seen[0] == (a.peer_id, 5) and seen[-1] == (a.peer_id, 1 << 20)
        assert all(on_loop)  # handlers ran on the asyncio loop

        with pytest.raises(RemoteError, match="no response"):
            await a.request(b.peer_id, "nothing", b"x")
        with pytest.raises(RemoteError, match="failed to handle"):
            await a.request(b.peer_id, "boom", b"x")
        assert b.stats.handler_errors == 1
        assert b.stats.requests_served == 32
        assert a.stats.stream_bytes_sent["echo"] > (1 << 20)
        assert b.stats.stream_bytes_received["echo"] > (1 << 20)
        # transport counters: per host, below Noise, with libp2p itself left unpatched
        assert a.stats.transport_bytes_sent > a.stats.stream_bytes_sent["echo"]
        assert b.stats.transport_bytes_received > b.stats.stream_bytes_received["echo"]
        assert b.stats.transport_bytes_sent > (1 << 20) and a.stats.transport_bytes_received > (1 << 20)
        assert RawConnection.read.__module__ == RawConnection.write.__module__ == RawConnection.__module__

        async def slow(peer: str, data: bytes) -> bytes:
            await asyncio.sleep(5)
            return b""

        b.set_request_handler("slow", slow)
        with pytest.raises(RequestTimeoutError):
            await a.request(b.peer_id, "slow", b"x", timeout=0.5)
        # the host is still healthy afterwards
        assert await a.request(b.peer_id, "echo", b"ab") == b"ba"


async def test_oversized_frames_are_refused(make_host: MakeHost) -> None:
    async with asyncio.timeout(15):
        small = await make_host(1, max_message_bytes=1024)
        large = await make_host(2)
        called: list[int] = []

        async def echo(peer: str, data: bytes) -> bytes:
            called.append(len(data))
            return data

        async def big_answer(peer: str, data: bytes) -> bytes:
            return b"y" * 4096

        small.set_request_handler("echo", echo)
        large.set_request_handler("big", big_answer)
        await large.connect(small.listen_addrs[0])

        # the responder refuses a request frame over its limit before reading the body
        with pytest.raises(FrameTooLargeError, match="refused"):
            await large.request(small.peer_id, "echo", b"x" * 4096)
        assert called == []
        assert small.stats.frames_too_large == 1
        # the requester refuses a response frame over its limit
        with pytest.raises(FrameTooLargeError, match="refused"):
            await small.request(large.peer_id, "big", b"q")
        assert small.stats.frames_too_large == 2
        # and nobody sends a frame over its own limit
        with pytest.raises(FrameTooLargeError):
            await small.request(large.peer_id, "big", b"x" * 1025)
        assert await large.request(small.peer_id, "echo", b"x" * 1024) == b"x" * 1024


async def test_other_run_fails_negotiation_with_a_clear_error(
    make_host: MakeHost, caplog: pytest.LogCaptureFixture
) -> None:
    async with asyncio.timeout(15):
        other_prefix = "/seedswarm/1/fedcba9876543210"
        a = await make_host(1)
        b = await make_host(2, protocol_prefix=other_prefix)

        async def chain(peer: str, data: bytes) -> bytes:
            return b"head"

        b.set_request_handler("chain", chain)
        await a.connect(b.listen_addrs[0])
        caplog.set_level(logging.WARNING, logger="seedswarm.gossip.libp2p")
        for _ in range(2):
            with pytest.raises(ProtocolMismatchError) as err:
                await a.request(b.peer_id, "chain", b"head?")
            assert str(err.value) == (
                f"peer {b.peer_id} does not speak {PREFIX}/chain: different run or protocol version"
            )
        assert b.stats.protocol_mismatches == 2
        assert b.stats.protocol_mismatches_by_reason == {"wrong-run": 2}
        logged = [r.getMessage() for r in caplog.records if "different run" in r.getMessage()]
        assert len(logged) == 1 and a.peer_id in logged[0]  # responder logs it once
        assert "wrong-run" in logged[0]

        # another protocol version of the same run, and a name the peer does not serve
        c = await make_host(3, protocol_prefix="/seedswarm/2/0123456789abcdef")
        c.set_request_handler("chain", chain)
        await a.connect(c.listen_addrs[0])
        with pytest.raises(ProtocolMismatchError, match="different run or protocol version"):
            await a.request(c.peer_id, "chain", b"head?")
        assert c.stats.protocol_mismatches_by_reason == {"protocol-version": 1}
        d = await make_host(4)  # our prefix, but no "chain" handler
        d.set_request_handler("other", chain)
        await a.connect(d.listen_addrs[0])
        with pytest.raises(ProtocolMismatchError):
            await a.request(d.peer_id, "chain", b"head?")
        assert d.stats.protocol_mismatches_by_reason == {"no-handler": 1}


# -- log hygiene --------------------------------------------------------------------------

#: Lines py-libp2p 0.8.1 logs at ERROR/WARNING for ordinary events (copied from its source, as
#: seen on a peer's SIGKILL or stop), and the logger each comes from.
ORDINARY_LINES = [
    ("libp2p.protocol_muxer.multiselect_client",
     "MultiselectClient handshake: read failed: fail to read from multiselect communicator"),
    ("libp2p.stream_muxer.yamux.yamux", "Incomplete read for data on stream 3: 0 bytes read"),
    ("libp2p.stream_muxer.yamux.yamux",
     "Error in handle_incoming for peer 12D3KooWabc: RawConnError: connection reset"),
    ("libp2p.identity.identify.identify",
     "Error sending identify response to 12D3KooWabc: Write operation failed: TCP connection reset by "
     "remote peer (type: <class 'libp2p.network.stream.exceptions.StreamError'>)\nTraceback ..."),
    ("libp2p.host.basic_host", "Failed to open stream to peer 12D3KooWabc:\n  Error: ..."),
]


@pytest.mark.parametrize(("logger", "line"), ORDINARY_LINES)
async def test_ordinary_libp2p_errors_are_debug_lines(make_host: MakeHost, caplog: pytest.LogCaptureFixture,
                                                      logger: str, line: str) -> None:
    await make_host(1)  # the first start installs the log policy
    caplog.set_level(logging.INFO)
    logging.getLogger(logger).error(line)
    logging.getLogger(logger).error("something else went wrong")  # not ordinary: stays an ERROR
    assert [r.getMessage() for r in caplog.records if r.name == logger] == ["something else went wrong"]
    caplog.clear()
    caplog.set_level(logging.DEBUG, logger=logger)  # still there for whoever asks
    logging.getLogger(logger).error(line)
    assert [(r.levelno, r.getMessage()) for r in caplog.records if r.name == logger] == [(logging.DEBUG, line)]


_PEER_SCRIPT = """
import asyncio, sys
from seedswarm.gossip.libp2p import HostConfig, Libp2pHost

async def main() -> None:
    host = Libp2pHost(HostConfig(identity_seed=bytes([42]) * 32, listen=["/ip4/127.0.0.1/tcp/0"],
                                 protocol_prefix=sys.argv[2]))
    await host.start()
    await host.connect(sys.argv[1])
    await host.subscribe("records", lambda data, peer: True)

    async def echo(peer: str, data: bytes) -> bytes:
        return data

    host.set_request_handler("echo", echo)
    target = sys.argv[1].rsplit("/", 1)[1]
    n = 0
    while True:  # gossip and requests in both directions until killed
        n += 1
        await host.publish("records", b"from the peer %d" % n * (3000 if n % 3 == 0 else 1))
        try:
            await host.request(target, "echo", b"y" * 200_000, timeout=5)
        except Exception:
            pass
        await asyncio.sleep(0.02)

asyncio.run(main())
"""


@pytest.mark.slow
async def test_a_killed_peer_leaves_no_error_lines(make_host: MakeHost, caplog: pytest.LogCaptureFixture) -> None:
    """SIGKILL of a peer in mid-traffic (gossip, requests both ways) is ordinary: libp2p logged
    ERROR lines for it (multistream, Yamux, identify); now nothing at WARNING or above."""
    caplog.set_level(logging.WARNING)
    a = await make_host(1)
    got: list[bytes] = []

    async def echo(peer: str, data: bytes) -> bytes:
        return data

    a.set_request_handler("echo", echo)
    await a.subscribe("records", _accept)
    peer = subprocess.Popen([sys.executable, "-c", _PEER_SCRIPT, a.listen_addrs[0], PREFIX],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        async with asyncio.timeout(90):  # the peer imports libp2p on a busy machine
            while len(got) < 5:
                ev = await a.next_event()
                if isinstance(ev, GossipMessage):
                    got.append(ev.data)
            pid = peer_id_of(Identity.from_seed(bytes([42]) * 32).public)

            async def traffic() -> None:
                while True:
                    with contextlib.suppress(HostError):
                        await a.publish("records", b"z" * 300_000)
                        await a.request(pid, "echo", b"x" * 300_000, timeout=5)
                    await asyncio.sleep(0.01)

            pump = asyncio.create_task(traffic())
            await asyncio.sleep(0.5)
            peer.send_signal(signal.SIGKILL)
            assert await _next_matching(a, PeerDisconnected, timeout=30) == PeerDisconnected(pid)
            await asyncio.sleep(1.0)  # the traffic runs into the dead connection meanwhile
            pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pump
    finally:
        if peer.poll() is None:
            peer.kill()
        peer.wait()
        if peer.stderr is not None:
            peer.stderr.close()
    noisy = [f"{r.name}: {r.getMessage()[:200]}" for r in caplog.records
             if r.name.startswith("libp2p") and r.levelno >= logging.WARNING]
    assert noisy == [], noisy
    assert a.running
