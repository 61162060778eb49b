"""A peer whose addresses expire must not stop the host (py-libp2p 0.8.1 peerstore bug).

py-libp2p's expiry sweep (``PeerStore._cleanup_expired_records``, run by ``start_cleanup_task``)
calls ``maybe_delete_peer_record`` for each expired peer, which calls ``addrs()``, which raises
``PeerStoreError('peer ID is expired')`` for exactly those peers when they had sent a signed
peer record. In the WAN bench that stopped 2 of 16 daemons (docs/networking.md). These tests
build the case with real libp2p objects: a real signed record, a TTL of 1 s that really passes
(a bounded wait on ``is_expired()``, at most 3 s), then the sweep.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import multiaddr
import pytest
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID
from libp2p.peer.peerstore import PeerStore, PeerStoreError, create_signed_peer_record

from seedswarm.gossip.libp2p import HostConfig, Libp2pHost, tuning
from seedswarm.gossip.libp2p.api import Counters

PREFIX = "/seedswarm/1/0123456789abcdef"
LOOPBACK = "/ip4/127.0.0.1/tcp/0"


def _cfg(n: int) -> HostConfig:
    return HostConfig(identity_seed=bytes([n]) * 32, listen=[LOOPBACK], protocol_prefix=PREFIX)


def _add_expiring_peer(ps: PeerStore, seed: int) -> ID:
    """A peer with a real signed record and a 1 s address TTL, as identify would leave it."""
    kp = create_new_key_pair(bytes([seed]) * 32)
    pid = ID.from_pubkey(kp.public_key)
    env = create_signed_peer_record(pid, [multiaddr.Multiaddr("/ip4/10.0.0.1/tcp/4001")], kp.private_key)
    assert ps.consume_peer_record(env, 1)
    assert pid in ps.peer_record_map
    return pid


def _wait_expired(ps: PeerStore, pid: ID) -> None:
    """Bounded: a 1 s TTL has passed within 2 s (``is_expired`` compares whole seconds)."""
    deadline = time.monotonic() + 3.0
    while not ps.peer_data_map[pid].is_expired():
        assert time.monotonic() < deadline, "a 1 s TTL did not expire within 3 s"
        time.sleep(0.05)


def test_libp2p_sweep_still_raises_on_an_expired_peer_with_a_record() -> None:
    """Pins the library bug: if an upgrade fixes it, this fails and the guard can go."""
    ps = PeerStore()
    pid = _add_expiring_peer(ps, 7)
    _wait_expired(ps, pid)
    with pytest.raises(PeerStoreError, match="expired"):
        ps._cleanup_expired_records()


def test_guarded_peerstore_sweeps_an_expired_peer_and_counts_it() -> None:
    """The peerstore of a host built by ``build_libp2p_host``: the sweep and ``get_peer_record``
    (GossipSub peer exchange, Kademlia) drop the expired peer instead of raising."""
    counters = Counters()
    errors: list[tuple[str, Exception]] = []

    def on_error(where: str, e: Exception) -> None:
        counters.inc("peerstore_errors")
        errors.append((where, e))

    host: Any = tuning.build_libp2p_host(create_new_key_pair(bytes([1]) * 32),
                                         [multiaddr.Multiaddr(LOOPBACK)], _cfg(1), counters, on_error)
    ps: PeerStore = host.get_peerstore()
    swept, looked_up, live = _add_expiring_peer(ps, 7), _add_expiring_peer(ps, 8), _add_expiring_peer(ps, 9)
    ps.peer_data_map[live].set_ttl(3600)
    _wait_expired(ps, swept)
    _wait_expired(ps, looked_up)

    assert ps.get_peer_record(looked_up) is None
    assert looked_up not in ps.peer_record_map
    ps._cleanup_expired_records()
    assert swept not in ps.peer_data_map and swept not in ps.peer_record_map
    assert looked_up not in ps.peer_data_map
    assert live in ps.peer_record_map and ps.addrs(live)  # a live peer's record is kept
    assert [w for w, _ in errors] == ["maybe_delete_peer_record"] * 2
    assert all(isinstance(e, PeerStoreError) for _, e in errors)
    assert counters.snapshot().peerstore_errors == 2


MakeHost = Callable[[int], Awaitable[Libp2pHost]]


@pytest.fixture
async def make_host() -> AsyncIterator[MakeHost]:
    hosts: list[Libp2pHost] = []

    async def make(n: int) -> Libp2pHost:
        host = Libp2pHost(_cfg(n))
        hosts.append(host)
        await host.start()
        return host

    yield make
    await asyncio.gather(*(h.stop() for h in hosts))


async def test_running_host_survives_a_peer_whose_addresses_expired(
    make_host: MakeHost, monkeypatch: pytest.MonkeyPatch
) -> None:
    """End to end, as in the WAN bench: a peer connects (identify hands over its signed record),
    leaves, its addresses expire, the host's own sweep runs. Unguarded, the host stopped."""
    monkeypatch.setattr(tuning, "PEERSTORE_CLEANUP_INTERVAL_S", 0.1)
    async with asyncio.timeout(180):  # generous: a loaded 2-core machine
        a, b = await make_host(1), await make_host(2)
        assert a._host is not None
        ps: PeerStore = a._host.get_peerstore()
        b_id = ID.from_base58(b.peer_id)
        await a.connect(b.listen_addrs[0])

        async def has_record() -> bool:
            return b_id in ps.peer_record_map

        await _wait_until(has_record, timeout=60)  # identify delivered b's signed record

        await b.stop()

        async def b_gone() -> bool:
            return b.peer_id not in a.peers()

        # Only once b is gone: until then any pubsub RPC from b carries its signed record, which
        # py-libp2p consumes with a fresh 2 h TTL, undoing a shorter one set earlier.
        await _wait_until(b_gone, timeout=60)

        async def expire_soon() -> None:  # on a's trio thread, where the peerstore lives
            ps.peer_data_map[b_id].set_ttl(1)

        await a._bridge.call(expire_soon, "shorten b's address TTL")

        async def swept_or_stopped() -> bool:
            return (b_id not in ps.peer_data_map and a.stats.peerstore_errors >= 1) or not a.running

        await _wait_until(swept_or_stopped, timeout=60)
        assert a.running, "the host stopped on a peer whose addresses expired"
        assert a.stats.peerstore_errors >= 1
        c = await make_host(3)
        assert await a.connect(c.listen_addrs[0]) == c.peer_id  # and it still works


async def _wait_until(pred: Callable[[], Awaitable[bool]], timeout: float = 30.0) -> None:
    async with asyncio.timeout(timeout):
        while not await pred():
            await asyncio.sleep(0.05)
